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
``mutable=["batch_stats"]``) and used at inference (``train=False``); ``certssb_jax/ensemble.py`` stacks it with
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
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
from flax import traverse_util
from flax.linen import dtypes as flax_dtypes

logger = logging.getLogger(__name__)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 by reshape-and-max.

  Same result as ``nn.max_pool(x, (2, 2), (2, 2))`` on even sizes (odd trailing rows/columns are dropped,
  as VALID pooling does), but its backward pass is ~1.7x faster on XLA:CPU and as fast on accelerators.
  """
  b, h, w, c = x.shape
  x = x[:, : h - h % 2, : w - w % 2, :]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


# ---------------------------------------------------------------------------------------------- convolutions

CONV_FORMULATIONS = ("xla", "patches")
Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]


def check_conv(conv: str, model: str) -> None:
  """Raises ValueError when ``conv`` is not one of ``CONV_FORMULATIONS``."""
  if conv not in CONV_FORMULATIONS:
    raise ValueError(f"{model}: conv must be one of {CONV_FORMULATIONS}, got {conv!r}")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def _explicit_padding(padding: Padding, in_hw: Sequence[int], kernel: tuple[int, int],
                      strides: tuple[int, int]) -> list[tuple[int, int]]:
  """``nn.Conv``'s padding argument ("SAME", "VALID", an int, ints or (low, high) pairs) as (low, high) pairs."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"PatchesConv supports SAME, VALID or explicit paddings, got {padding!r}")
    return [tuple(p) for p in lax.padtype_to_pads(tuple(in_hw), kernel, strides, padding.upper())]
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  return [(p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding]


class PatchesConv(nn.Module):
  """A 2-D convolution computed as patches times kernel, with the parameters of ``nn.Conv``.

  The input's patches are extracted by ``lax.conv_general_dilated_patches``, a convolution with a fixed one-hot
  filter, then contracted with the kernel in one ``dot_general``. Vmapped over the models of an ensemble, the
  extraction maps its model axis into the batch (its filter is shared) and the contraction becomes a batched
  matrix product: no grouped convolution, which accelerators run far below the speed of a matrix product.

  The kernel is HWIO ``(kh, kw, C, F)`` and the bias ``(F,)``, named, shaped and initialised as by ``nn.Conv``
  (the same RNG path gives the same values). The patches' features are ordered (C, kh, kw), so the kernel is
  moved to (C, kh, kw, F) before it is flattened. The extraction runs at ``Precision.HIGHEST`` so its values are
  exact copies of the input on backends whose default float32 convolution rounds its inputs (TF32); the
  product uses ``precision`` like ``nn.Conv``. 1x1 kernels without padding skip the extraction (a strided slice).

  Attributes:
    features: output channels F.
    kernel_size: (kh, kw).
    strides: an int or (sh, sw).
    padding: "SAME", "VALID", an int, or one (low, high) pair per spatial dimension (as ``nn.Conv``).
    use_bias: add a bias of shape (F,).
    dtype: compute dtype (None: that of the inputs and parameters).
    param_dtype: dtype of the parameters.
    precision: precision of the kernel product.
    kernel_init: kernel initialiser (``nn.Conv``'s default).
    bias_init: bias initialiser (``nn.Conv``'s default).
  """

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"PatchesConv expects inputs (B, H, W, C), got shape {x.shape}")
    kh, kw = _pair(self.kernel_size)
    strides = _pair(self.strides)
    c = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (kh, kw, c, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = flax_dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pads = _explicit_padding(self.padding, x.shape[1:3], (kh, kw), strides)
    if (kh, kw) == (1, 1) and all(p == (0, 0) for p in pads):
      patches = x[:, ::strides[0], ::strides[1], :]  # (B, H', W', C): a 1x1 patch is the pixel
    else:
      patches = lax.conv_general_dilated_patches(x, (kh, kw), strides, pads,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                 precision=lax.Precision.HIGHEST)  # (B, H', W', C * kh * kw)
    w = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(c * kh * kw, self.features)  # (C * kh * kw, F)
    y = lax.dot_general(patches, w, (((3,), (0,)), ((), ())), precision=self.precision)  # (B, H', W', F)
    return y if bias is None else y + bias


def conv2d(formulation: str, features: int, kernel_size: Sequence[int], *, dtype: Any, name: str | None = None,
           **kwargs: Any) -> nn.Module:
  """A convolution layer of the given formulation: ``nn.Conv`` (``"xla"``) or ``PatchesConv`` (``"patches"``).

  ``kwargs`` (strides, padding, use_bias, kernel_init) mean the same for both, and so do the parameters.
  """
  cls = nn.Conv if formulation == "xla" else PatchesConv
  return cls(features, tuple(kernel_size), dtype=dtype, name=name, **kwargs)


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


# ---------------------------------------------------------------------------------------------- shared parts

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the CIFAR-10 training images on [0, 1]
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # per-channel std of the CIFAR-10 training images on [0, 1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet constants (what pretrained ResNets expect)
IMAGENET_STD = (0.229, 0.224, 0.225)

# He (Kaiming) normal init with fan_out, as torchvision initialises ResNet convolutions.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, name: str | None = None, dtype: Any = None) -> nn.BatchNorm:
  """The batch norm of every model here: PyTorch's defaults in Flax's convention.

  ``momentum=0.9`` keeps 0.9 of the running statistics per step (PyTorch's ``momentum=0.1``); in training the
  batch statistics normalise and the running averages are updated (the ``batch_stats`` collection, mutable),
  at inference the running averages normalise, so a sample's logit does not depend on the rest of its batch.
  Inside the vmapped ensemble (``certssb_jax/ensemble.py``) the statistics are reduced over each model's own
  batch only (no ``axis_name``), so every model's running statistics are its own. Flax updates the running
  variance with the biased batch variance (PyTorch with the unbiased one): a factor B / (B - 1). With a
  ``dtype`` of bfloat16 the statistics are still reduced and kept in float32; only the output is bfloat16.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float], model_name: str) -> jax.Array:
  """(x - mean) / std per channel, for pixel inputs x (B, H, W, C) in [0, 1] (docs/method.md section 1).

  Raises:
    ValueError: x is not 4-D or its channel count differs from ``len(mean)`` / ``len(std)``.
  """
  if x.ndim != 4:
    raise ValueError(f"{model_name} expects images (B, H, W, C), got shape {x.shape}")
  if not len(mean) == len(std) == x.shape[-1]:
    raise ValueError(f"{model_name}: inputs have {x.shape[-1]} channels but mean/std have {len(mean)}/{len(std)} "
                     "entries; pass mean and std of the data set's channels")
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def _check_head(num_outputs: int, model: str) -> None:
  if num_outputs < 1:
    raise ValueError(f"{model}: num_outputs must be >= 1 (1 for a binary task, K for K classes), got {num_outputs}")


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
    conv = functools.partial(conv2d, self.conv, self.features, use_bias=False, kernel_init=_conv_init,
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
  """The paper's CIFAR-10 model (docs/method.md section 7): pre-activation ResNet, widths 16/32/64, 3 stages of 5 blocks.

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
    _check_head(self.num_outputs, "preact_resnet")
    check_conv(self.conv, "preact_resnet")
    x = normalize(x, self.mean, self.std, "preact_resnet")  # (B, H, W, 3)
    x = conv2d(self.conv, self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=_conv_init,
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
    conv = functools.partial(conv2d, self.conv, self.features, use_bias=False, kernel_init=_conv_init,
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
    _check_head(self.num_outputs, "resnet18")
    check_conv(self.conv, "resnet18")
    x = normalize(x, self.mean, self.std, "resnet18")  # (B, H, W, 3)
    x = conv2d(self.conv, self.widths[0], (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
               kernel_init=_conv_init, dtype=self.dtype, name="stem_conv")(x)  # (B, H/2, W/2, 64)
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



# ---------------------------------------------------------------------------------------------- weights on disk
#
# Format: one ``.npz`` file (numpy's zip of ``.npy`` arrays, read with ``allow_pickle=False``), one entry per
# array of the variable tree, keyed by the "/"-joined path of nested dict keys: for ResNet18 params
# "stem_conv/kernel" (7, 7, 3, 64), "stem_bn/scale" (64,), "stage2_block1/proj_conv/kernel" (1, 1, 64, 128),
# "head/kernel" (512, L), ... Convolution kernels are Flax's HWIO (a PyTorch OIHW kernel converts with
# ``w.transpose(2, 3, 1, 0)``; a PyTorch linear weight with ``w.T``). The same functions work on the
# ``batch_stats`` tree ("stem_bn/mean", "stem_bn/var") or on the whole variables dict ("params/stem_conv/kernel").


def save_params(params: Mapping[str, Any], path: str) -> None:
  """Writes a (nested dict) variable tree of ONE model to ``path`` as an ``.npz`` with "a/b/c" keys.

  Args:
    params: nested mapping of arrays (e.g. ``variables["params"]``), without a leading model axis.
    path: output file; written exactly there (no ``.npz`` suffix appended), through a temporary file.

  Raises:
    ValueError: a key contains "/" (it could not be read back unambiguously) or the tree is empty.
  """
  flat = _flatten(params)
  if not flat:
    raise ValueError("save_params: the parameter tree has no arrays")
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
  os.replace(tmp, path)


def read_params(path: str) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` written by ``save_params``, as a flat {"a/b/c": array} dict.

  Raises:
    ValueError: the file is missing or not a readable ``.npz`` of arrays.
  """
  if not os.path.isfile(path):
    raise ValueError(f"pretrained weights file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read pretrained weights {path} as an .npz of arrays: {e}") from e


def merge_params(params: Mapping[str, Any], flat: Mapping[str, Any], *, exclude: Sequence[str] = ("head",),
                 source: str = "pretrained weights") -> dict[str, Any]:
  """Replaces every array of ``params`` whose "/"-joined path is a key of ``flat``, except excluded modules.

  Pure (no I/O), so it can run inside a jitted, vmapped init: every model of an ensemble then starts from the
  same pretrained body and its own randomly initialised head (which keeps model m a function of its keys and
  its noised data, docs/method.md section 2).

  Args:
    params: nested mapping of arrays of one model (the freshly initialised tree).
    flat: {"a/b/c": array} of the weights to load.
    exclude: path components whose arrays are never replaced (default the ``head`` module, whose shape
      depends on the task).
    source: what ``flat`` is, for messages.

  Returns:
    A new nested dict, with replaced arrays cast to the dtype of the ones they replace.

  Raises:
    ValueError: a matching key has a different shape (names the key and both shapes), or no key matches.
  """
  own = _flatten(params)
  out, loaded = {}, 0
  for key, value in own.items():
    if key in flat and not set(key.split("/")) & set(exclude):
      new = flat[key]
      if tuple(np.shape(new)) != tuple(np.shape(value)):
        raise ValueError(f"{source}: {key!r} has shape {tuple(np.shape(new))} but the model expects "
                         f"{tuple(np.shape(value))}")
      out[key] = jnp.asarray(new, dtype=jnp.result_type(value))
      loaded += 1
    else:
      out[key] = value
  if loaded == 0:
    raise ValueError(f"{source}: none of its {len(flat)} arrays matches a parameter of the model (model keys "
                     f"look like {sorted(own)[:3]}, file keys like {sorted(flat)[:3]})")
  missing = [k for k in own if k not in flat and not set(k.split("/")) & set(exclude)]
  unused = [k for k in flat if k not in own]
  if missing or unused:
    logger.warning("%s: loaded %d arrays; %d model arrays not in the file (kept as initialised, e.g. %s); "
                   "%d file arrays unused (e.g. %s)", source, loaded, len(missing), missing[:3], len(unused),
                   unused[:3])
  return traverse_util.unflatten_dict(out, sep="/")


def load_pretrained(params: Mapping[str, Any], path: str, *, exclude: Sequence[str] = ("head",)) -> dict[str, Any]:
  """Loads local weights (an ``.npz`` of ``save_params``) into ``params``, keeping the head as initialised.

  Nothing is downloaded: convert published weights to this format once (see the format note above) and point
  here. Arrays are matched by their "/"-joined path; the ``head`` module (one logit or K) is never replaced,
  so an ImageNet classifier's 1000-way head is simply ignored.

  Args:
    params: the model's initialised variable tree (one model, e.g. ``variables["params"]``).
    path: the ``.npz`` file.
    exclude: module names never loaded (default ``("head",)``).

  Returns:
    The tree with every matching array replaced.

  Raises:
    ValueError: missing or unreadable file, a shape mismatch (naming the key), or no matching key.
  """
  return merge_params(params, read_params(path), exclude=exclude, source=f"pretrained weights {path}")


def _flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} of a nested mapping; raises ValueError on keys that contain "/"."""
  flat = traverse_util.flatten_dict(tree)
  for path in flat:
    bad = [k for k in path if "/" in str(k)]
    if bad:
      raise ValueError(f"parameter key {bad[0]!r} contains '/', which the flat format uses as separator")
  return {"/".join(map(str, path)): leaf for path, leaf in flat.items()}
