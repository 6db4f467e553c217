"""Flax models of the paper (docs/method.md section 7) and the helpers that turn their outputs into probabilities.

Every model maps pixel-space inputs in [0, 1], shape (B, H, W, C), to logits of shape (B, L): L = 1 for the
paper's binary tasks (one logit, sigmoid) or L = K for K-class heads (softmax). Normalisation, if any,
happens inside the model, so all smoothing noise lives in pixel space (docs/method.md section 1).

Registered models (``MODELS``, built by ``get_model(name, num_classes)``):

* ``"mnist_cnn"``: the paper's MNIST CNN (28x28x1).
* ``"preact_resnet"``: the paper's CIFAR-10 pre-activation ResNet (32x32x3), widths 16/32/64, 3 x 5 blocks.
* ``"resnet18"``: the standard ImageNet ResNet-18 for the 224-pixel task; ``load_pretrained`` starts it from
  local weights written by ``save_params``.

The ResNets use batch norm: their ``batch_stats`` collection is updated in training (``train=True``,
``mutable=["batch_stats"]``) and used at inference (``train=False``); ``certssb_jax/ensemble/trainer.py`` stacks it with
the params along the model axis, so each model of the ensemble keeps its own running statistics.

Every model also takes (``get_model(name, num_classes, conv=..., dtype=...)``):

* ``conv``: how its convolutions are computed (``CONV_FORMULATIONS``). ``"xla"`` is ``nn.Conv``, one
  ``lax.conv_general_dilated`` per layer; under ``vmap`` over the models of an ensemble it becomes a grouped
  convolution. ``"patches"`` extracts the patches (``lax.conv_general_dilated_patches``) and multiplies them with
  the kernel, so under ``vmap`` the weights meet the data in a batched matrix product instead. Both have the
  same parameters (names, shapes, initialisation), so a model trained with one runs with the other.
* ``dtype``: the compute dtype (default float32). Parameters and batch statistics stay float32 and the logits
  are returned as float32, so ``jnp.bfloat16`` trains in bfloat16 with float32 weights and loss.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from certssb_jax.models.layers import (
  CIFAR10_MEAN,
  CIFAR10_STD,
  IMAGENET_MEAN,
  IMAGENET_STD,
  batch_norm,
  check_conv,
  check_head,
  conv2d,
  conv_init,
  max_pool_2x2,
  normalize,
)

logger = logging.getLogger(__name__)


class MnistCNN(nn.Module):
  """The paper's MNIST CNN: conv 5x5x16, max-pool 2, conv 5x5x32, max-pool 2, dense 512, head.

  Convolutions are unpadded (PyTorch's default), so a 28x28 input gives 4x4x32 = 512 features before the
  dense layer.

  Attributes:
    num_outputs: 1 for one logit (binary), K for a K-class softmax head.
    hidden: width of the dense layer.
    conv: convolution formulation, ``"xla"`` or ``"patches"`` (``CONV_FORMULATIONS``; same parameters).
    dtype: compute dtype; parameters and the returned logits are float32.
  """

  num_outputs: int = 1
  hidden: int = 512
  conv: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout or batch norm in this model
    check_conv(self.conv, "mnist_cnn")
    # explicit names, the ones nn.Conv would get automatically, so both formulations share one parameter tree
    x = nn.relu(conv2d(self.conv, 16, (5, 5), padding="VALID", dtype=self.dtype, name="Conv_0")(x))
    x = max_pool_2x2(x)
    x = nn.relu(conv2d(self.conv, 32, (5, 5), padding="VALID", dtype=self.dtype, name="Conv_1")(x))
    x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
    return nn.Dense(self.num_outputs, dtype=self.dtype, name="head")(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------- CIFAR-10


class PreActBlock(nn.Module):
  """Pre-activation basic block (He et al. 2016, "Identity mappings"): BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut.

  The shortcut is the identity, or a 1x1 projection of the pre-activated input when the stride or the width
  changes (as in the reference PyTorch PreActResNet).

  Attributes:
    features: output channels.
    strides: stride of the first convolution (2 at the start of stages 2 and 3).
    conv: convolution formulation (``CONV_FORMULATIONS``).
    dtype: compute dtype.
  """

  features: int
  strides: int = 1
  conv: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(conv2d, self.conv, self.features, use_bias=False, kernel_init=conv_init,
                             dtype=self.dtype)
    out = nn.relu(batch_norm(train, "bn1", self.dtype)(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv((1, 1), strides=self.strides, name="proj")(out)
    y = conv((3, 3), strides=self.strides, padding=((1, 1), (1, 1)), name="conv1")(out)
    y = nn.relu(batch_norm(train, "bn2", self.dtype)(y))
    y = conv((3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    return y + shortcut


class PreActResNet(nn.Module):
  """The paper's CIFAR-10 model (docs/method.md section 7): pre-activation ResNet, widths 16/32/64, 3 x 5 blocks.

  conv3x3 16 (stem) -> 3 stages of ``blocks_per_stage`` PreActBlocks (stride 2 at the start of stages 2 and 3)
  -> BN-ReLU -> global average pool -> dense head. With 5 blocks per stage this is the 32-layer network of
  He et al. (6 * 5 + 2). Fully convolutional up to the pool, so any input size works (32x32x3 for CIFAR-10).

  Attributes:
    num_outputs: 1 for one logit (binary), K for a K-class softmax head.
    widths: channels of the stem and of the three stages (the stem has ``widths[0]``).
    blocks_per_stage: blocks in each stage.
    mean: per-channel mean of the pixel inputs, subtracted inside the model (noise stays in pixel space).
    std: per-channel std of the pixel inputs.
    conv: convolution formulation, ``"xla"`` or ``"patches"`` (``CONV_FORMULATIONS``; same parameters).
    dtype: compute dtype; parameters, batch statistics and the returned logits are float32.
  """

  num_outputs: int = 1
  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 5
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  conv: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_head(self.num_outputs, "preact_resnet")
    check_conv(self.conv, "preact_resnet")
    x = normalize(x, self.mean, self.std, "preact_resnet")  # (B, H, W, 3)
    x = conv2d(self.conv, self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=conv_init,
               dtype=self.dtype, name="stem_conv")(x)
    for s, width in enumerate(self.widths):
      for b in range(self.blocks_per_stage):
        x = PreActBlock(width, strides=2 if (s > 0 and b == 0) else 1, conv=self.conv, dtype=self.dtype,
                        name=f"stage{s + 1}_block{b + 1}")(x, train)
    x = nn.relu(batch_norm(train, "final_bn", self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))  # (B, widths[-1])
    return nn.Dense(self.num_outputs, dtype=self.dtype, name="head")(x).astype(jnp.float32)  # (B, L)


# ---------------------------------------------------------------------------------------------- 224 pixels


class BasicBlock(nn.Module):
  """ResNet basic block (post-activation): conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU.

  The shortcut is the identity, or conv1x1 + BN when the stride or the width changes (torchvision's layout).

  Attributes:
    features: output channels.
    strides: stride of the first convolution and of the projection.
    conv: convolution formulation (``CONV_FORMULATIONS``).
    dtype: compute dtype.
  """

  features: int
  strides: int = 1
  conv: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(conv2d, self.conv, self.features, use_bias=False, kernel_init=conv_init,
                             dtype=self.dtype)
    y = conv((3, 3), strides=self.strides, padding=((1, 1), (1, 1)), name="conv1")(x)
    y = nn.relu(batch_norm(train, "bn1", self.dtype)(y))
    y = conv((3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    y = batch_norm(train, "bn2", self.dtype)(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv((1, 1), strides=self.strides, name="proj_conv")(x)
      shortcut = batch_norm(train, "proj_bn", self.dtype)(shortcut)
    return nn.relu(y + shortcut)


class ResNet18(nn.Module):
  """The paper's 224-pixel model (docs/method.md section 7): the standard ImageNet ResNet-18 with its own head.

  conv7x7/2 64 -> BN-ReLU -> max pool 3x3/2 (padding 1) -> [2, 2, 2, 2] basic blocks of 64/128/256/512
  channels (stride 2 at the start of stages 2-4) -> global average pool -> dense head. Paddings follow
  torchvision, so a 224x224 input gives 7x7x512 features. Any input size of at least 32x32 works (the tests
  use small ones). Start from converted ImageNet weights with ``load_pretrained``.

  Attributes:
    num_outputs: 1 for one logit (binary), K for a K-class softmax head.
    stage_sizes: blocks per stage.
    widths: channels per stage (the stem has ``widths[0]``).
    mean: per-channel mean of the pixel inputs (ImageNet's: what pretrained weights expect).
    std: per-channel std of the pixel inputs.
    conv: convolution formulation, ``"xla"`` or ``"patches"`` (``CONV_FORMULATIONS``; same parameters).
    dtype: compute dtype; parameters, batch statistics and the returned logits are float32.
  """

  num_outputs: int = 1
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  mean: Sequence[float] = IMAGENET_MEAN
  std: Sequence[float] = IMAGENET_STD
  conv: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_head(self.num_outputs, "resnet18")
    check_conv(self.conv, "resnet18")
    x = normalize(x, self.mean, self.std, "resnet18")  # (B, H, W, 3)
    x = conv2d(self.conv, self.widths[0], (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
               kernel_init=conv_init, dtype=self.dtype, name="stem_conv")(x)  # (B, H/2, W/2, 64)
    x = nn.relu(batch_norm(train, "stem_bn", self.dtype)(x))
    # nn.max_pool, not a reshape-based pool: an exact reshape version of this padded 3x3/2 pool measured no
    # faster in a whole ResNet-18 step on XLA:CPU (0.60 s vs 0.56 s per step of 8 images at 224, jax 0.10.2).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # (B, H/4, W/4, 64)
    for s, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for b in range(num_blocks):
        x = BasicBlock(width, strides=2 if (s > 0 and b == 0) else 1, conv=self.conv, dtype=self.dtype,
                       name=f"stage{s + 1}_block{b + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))  # (B, widths[-1])
    return nn.Dense(self.num_outputs, dtype=self.dtype, name="head")(x).astype(jnp.float32)  # (B, L)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": MnistCNN, "preact_resnet": PreActResNet, "resnet18": ResNet18}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a model by name with the head the task needs (one logit when ``num_classes == 2``).

  ``kwargs`` go to the model's constructor: ``conv`` (``CONV_FORMULATIONS``), ``dtype`` (compute dtype) and the
  model's own attributes (e.g. ``blocks_per_stage``).
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  return MODELS[name](num_outputs=1 if num_classes == 2 else num_classes, **kwargs)


def logits_to_probs(logits: jax.Array) -> jax.Array:
  """Class probabilities from logits: (..., 1) -> [1 - sigmoid, sigmoid]; (..., K) -> softmax. Returns (..., K)."""
  if logits.shape[-1] == 1:
    p = jax.nn.sigmoid(logits[..., 0])
    return jnp.stack([1.0 - p, p], axis=-1)
  return jax.nn.softmax(logits, axis=-1)


def logits_to_pred(logits: jax.Array) -> jax.Array:
  """Predicted class from logits (ties to the lower class, as argmax of ``logits_to_probs``)."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def loss_fn(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy: sigmoid BCE for one logit, softmax CE for K logits. ``labels`` (B,) int."""
  if logits.shape[-1] == 1:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits[..., 0], labels.astype(logits.dtype)))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))



