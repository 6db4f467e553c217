"""The building blocks of the models: convolutions in two formulations, pooling, batch norm, normalisation.

``conv2d`` builds a convolution as ``nn.Conv`` (``"xla"``) or as patches times the kernel (``"patches"``,
``PatchesConv``): the same parameters either way, so under ``vmap`` over the models of an ensemble the second
becomes a batched matrix product instead of a grouped convolution (which of the two is faster depends on the
backend: BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
from jax import lax
import jax.numpy as jnp


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



# ---------------------------------------------------------------------------------------------- shared parts

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the CIFAR-10 training images on [0, 1]
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # per-channel std of the CIFAR-10 training images on [0, 1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet constants (what pretrained ResNets expect)
IMAGENET_STD = (0.229, 0.224, 0.225)

# He (Kaiming) normal init with fan_out, as torchvision initialises ResNet convolutions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, name: str | None = None, dtype: Any = None) -> nn.BatchNorm:
  """The batch norm of every model here: PyTorch's defaults in Flax's convention.

  ``momentum=0.9`` keeps 0.9 of the running statistics per step (PyTorch's ``momentum=0.1``); in training the
  batch statistics normalise and the running averages are updated (the ``batch_stats`` collection, mutable),
  at inference the running averages normalise, so a sample's logit does not depend on the rest of its batch.
  Inside the vmapped ensemble (``certssb_jax/ensemble/trainer.py``) the statistics are reduced over each model's own
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


def check_head(num_outputs: int, model: str) -> None:
  if num_outputs < 1:
    raise ValueError(f"{model}: num_outputs must be >= 1 (1 for a binary task, K for K classes), got {num_outputs}")
