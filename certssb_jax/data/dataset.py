"""The data set container of certssb-jax and its validation (every reader returns a ``Dataset``).

Images are float32 NHWC on the [0, 1] pixel scale, labels int32 positions in ``classes``: the threat model puts
every input on the pixel scale (docs/method.md section 1), so a loader that forgot to divide by 255, or produced
NaN, fails here rather than certify nonsense.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np


class DataError(ValueError):
  """A data source is missing, malformed or inconsistent; the message names the file or the problem."""


# ----------------------------------------------------------------------------------------------------------
# The data set container and its validation.
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification data set with a fixed train/test split, validated on construction.

  Attributes:
    x_train: ``(n, H, W, C)`` float32 images in [0, 1].
    y_train: ``(n,)`` int32 labels in ``[0, K)``: the position of the sample's class in ``classes``.
    x_test: ``(n_test, H, W, C)`` float32 images in [0, 1].
    y_test: ``(n_test,)`` int32 labels in ``[0, K)``.
    name: the data set's name (e.g. ``"mnist"``).
    classes: original class ids in order; new label = position (docs/method.md §7).
    source: where it came from (a key of ``data.SOURCES``).
  """

  x_train: np.ndarray  # (n, H, W, C)
  y_train: np.ndarray  # (n,)
  x_test: np.ndarray  # (n_test, H, W, C)
  y_test: np.ndarray  # (n_test,)
  name: str
  classes: tuple[int, ...]
  source: str

  def __post_init__(self):
    object.__setattr__(self, "classes", check_classes(self.classes))
    where = f"{self.name} ({self.source})"
    validate_images(self.x_train, f"{where} x_train")
    validate_images(self.x_test, f"{where} x_test")
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise DataError(
          f"{where}: train images have shape {self.x_train.shape[1:]} but test images "
          f"{self.x_test.shape[1:]}"
      )
    k = len(self.classes)
    _validate_labels(self.y_train, len(self.x_train), k, f"{where} y_train")
    _validate_labels(self.y_test, len(self.x_test), k, f"{where} y_test")

  @property
  def num_classes(self) -> int:
    """K, the number of classes (``len(classes)``)."""
    return len(self.classes)

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of one image."""
    return tuple(self.x_train.shape[1:])


def validate_images(x: np.ndarray, where: str) -> None:
  """Checks that ``x`` is a non-empty 4-D NHWC float32 array of finite values in [0, 1].

  The certificate is stated for inputs on the [0, 1] pixel scale (docs/method.md §1), so a loader that forgot to
  divide by 255, or produced NaN, must fail here rather than certify nonsense.

  Args:
    x: the images, ``(N, H, W, C)``.
    where: what ``x`` is (a file, a split), for the error message.

  Raises:
    DataError: naming ``where`` and the problem.
  """
  if not isinstance(x, np.ndarray):
    raise DataError(f"{where}: images must be a numpy array, got {type(x).__name__}")
  if x.ndim != 4:
    raise DataError(f"{where}: images must be 4-D (N, H, W, C), got shape {x.shape}")
  if x.shape[0] == 0:
    raise DataError(f"{where}: no images")
  if min(x.shape[1:]) == 0:
    raise DataError(f"{where}: empty image shape {x.shape[1:]}")
  if x.dtype != np.float32:
    raise DataError(f"{where}: images must be float32, got {x.dtype}")
  # min/max propagate NaN and +-inf, so no full-size temporary is made on the good path.
  lo, hi = float(x.min()), float(x.max())
  if not (np.isfinite(lo) and np.isfinite(hi)):
    n_nan = int(np.isnan(x).sum())
    n_inf = int(np.isinf(x).sum())
    raise DataError(f"{where}: images are not finite ({n_nan} NaN, {n_inf} inf values)")
  if lo < 0.0 or hi > 1.0:
    raise DataError(
        f"{where}: pixel values must lie in [0, 1], found range [{lo:g}, {hi:g}] "
        "(divide 0..255 pixels by 255)"
    )


def _validate_labels(y: np.ndarray, n: int, num_classes: int, where: str) -> None:
  """Checks that ``y`` is ``(n,)`` int32 in ``[0, num_classes)``, else raises DataError naming ``where``."""
  if not isinstance(y, np.ndarray) or y.ndim != 1:
    raise DataError(f"{where}: labels must be a 1-D numpy array, got {getattr(y, 'shape', type(y))}")
  if y.dtype != np.int32:
    raise DataError(f"{where}: labels must be int32, got {y.dtype}")
  if len(y) != n:
    raise DataError(f"{where}: {len(y)} labels for {n} images")
  if n and (y.min() < 0 or y.max() >= num_classes):
    raise DataError(
        f"{where}: labels must lie in [0, {num_classes}), found range [{y.min()}, {y.max()}]"
    )


def check_classes(classes: Sequence[int]) -> tuple[int, ...]:
  """Returns ``classes`` as a tuple of distinct non-negative ints (K >= 2), else raises DataError."""
  try:
    out = tuple(int(c) for c in classes)
  except (TypeError, ValueError) as e:
    raise DataError(f"classes must be a sequence of class ids, got {classes!r}") from e
  if any(isinstance(c, bool) for c in classes) or any(int(c) != c for c in classes):
    raise DataError(f"classes must be integer class ids, got {classes!r}")
  if len(out) < 2:
    raise DataError(f"need at least 2 classes, got {out}")
  if len(set(out)) != len(out):
    raise DataError(f"classes must be distinct, got {out}")
  if min(out) < 0:
    raise DataError(f"class ids must be non-negative, got {out}")
  return out
