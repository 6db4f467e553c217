"""Readers of the image sources whose images can have any size: prepared tfds data sets and image folders.

Both decode uint8 images, optionally bring them to one side with ``resize_center_crop`` (the paper's 224-pixel
setting), keep the requested classes (new label = position) and return a validated ``data.Dataset`` of
pixels / 255. ``data.SOURCES`` dispatches to them; the fixed-size array formats are in ``readers.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
import os

import numpy as np
from PIL import Image

from certssb_jax.data import dataset as data_lib, readers

logger = logging.getLogger(__name__)

# Image file suffixes read by `load_image_folder` (lower case).
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------------------
# Resizing (shared by tfds and image folders).
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


# ----------------------------------------------------------------------------------------------------------
# TensorFlow Datasets (already prepared; read with tfds.data_source, no TensorFlow).
# ----------------------------------------------------------------------------------------------------------


class TfdsNotPrepared(data_lib.DataError):
  """A tfds data set that is not prepared in the given data_dir (``data.load_dataset`` adds what to run)."""


def _tfds_not_ready(name: str, data_dir: str | None, err: BaseException) -> TfdsNotPrepared:
  where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  return TfdsNotPrepared(
      f"tfds data set {name!r} is not prepared in {where} in array_record format ({type(err).__name__}: "
      f"{str(err).splitlines()[0] if str(err) else ''}); source=tfds never downloads.")


def _read_tfds_split(src: Sequence[dict], classes: tuple[int, ...], image_size: int | None, where: str,
                     name: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """Reads the records of ``classes`` from one split in index order.

  Returns:
    ``(x, labels)``: ``(n, H, W, C)`` uint8 images (resized when ``image_size`` is set) and ``(n,)`` int64
    original labels.
  """
  images, labels = [], []
  try:
    for i in range(len(src)):
      rec = src[i]
      if "image" not in rec or "label" not in rec:
        raise data_lib.DataError(f"{where}: record {i} lacks 'image'/'label' (keys: {sorted(rec)})")
      label = int(rec["label"])
      if label not in classes:
        continue
      img = np.asarray(rec["image"])
      if img.dtype != np.uint8 or img.ndim != 3:
        raise data_lib.DataError(
            f"{where}: record {i} image must be uint8 (H, W, C), got {img.dtype} {img.shape}")
      images.append(img if image_size is None else _resize_center_crop_array(img, image_size))
      labels.append(label)
  except data_lib.DataError:
    raise
  except Exception as e:  # A prepared-but-broken data set fails on read.
    raise _tfds_not_ready(name, data_dir, e) from e
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise data_lib.DataError(f"{where}: images have different sizes {sorted(shapes)[:4]}...; pass image_size")
  x = np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)  # (n, H, W, C)
  return x, np.asarray(labels, np.int64)


def load_tfds(name: str, classes: Sequence[int], data_dir: str | None = None,
              image_size: int | None = None) -> data_lib.Dataset:
  """Reads a prepared TensorFlow Datasets image data set with ``tfds.data_source`` (``download=False``).

  Records are read in index order; their ``"image"`` (uint8 HWC) and ``"label"`` fields are used. The test
  split is ``"test"``, or ``"validation"`` where the data set has no test split (ImageNette).

  Args:
    name: tfds name, e.g. ``"mnist"``, ``"cifar10"``, ``"imagenette/320px-v2"``.
    classes: original class ids to keep; new label = position (docs/method.md §7).
    data_dir: where the data set was prepared (array_record format); None = tfds's default.
    image_size: if set, every image is resized (shorter side to ``image_size``, bilinear) and center-cropped
      to ``image_size x image_size`` (see ``resize_center_crop``); None keeps the native size, which must then
      be the same for every image.

  Returns:
    A Dataset with ``source="tfds"``.

  Raises:
    DataError: unknown name, data set not prepared (no download here), a bad record or mixed image sizes.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only here)

  classes = data_lib.check_classes(classes)
  if data_dir is not None and not os.path.isdir(data_dir):
    raise data_lib.DataError(f"tfds data_dir does not exist: {data_dir}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends.
    raise data_lib.DataError(f"unknown tfds data set {name!r}: {str(e).splitlines()[0]}") from e
  splits = builder.info.splits
  test_split = "validation" if ("test" not in splits and "validation" in splits) else "test"
  try:
    sources = tfds.data_source(name, split=["train", test_split], data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises a not-implemented error when not prepared, or OSError, ValueError, ...
    raise _tfds_not_ready(name, data_dir, e) from e

  arrays = []
  for split, src in zip(("train", test_split), sources):
    where = f"tfds {name} ({split})"
    x, labels = _read_tfds_split(src, classes, image_size, where, name, data_dir)
    x, y = readers.select_classes(x, labels, classes, where)
    arrays += [readers.to_unit(x), y]
  logger.info(
      "tfds %s: %d train / %d test images of classes %s", name, len(arrays[1]), len(arrays[3]), classes
  )
  return data_lib.Dataset(*arrays, name=name, classes=classes, source="tfds")


# ----------------------------------------------------------------------------------------------------------
# Image folders (ImageNette layout).
# ----------------------------------------------------------------------------------------------------------


def _list_dirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def _image_folder_root(folder: str) -> str:
  """``folder``, or its one sub-folder holding ``train/`` when ``folder`` has none (an extracted archive's
  top folder, e.g. ``imagenette2-320``)."""
  if os.path.isdir(os.path.join(folder, "train")) or not os.path.isdir(folder):
    return folder
  nested = [d for d in _list_dirs(folder) if os.path.isdir(os.path.join(folder, d, "train"))]
  return os.path.join(folder, nested[0]) if len(nested) == 1 else folder


def has_image_folder(folder: str) -> bool:
  """Whether ``folder`` (or its one sub-folder, see ``_image_folder_root``) has ``train/`` and ``val/`` or
  ``test/``."""
  root = _image_folder_root(folder)
  return os.path.isdir(os.path.join(root, "train")) and any(
      os.path.isdir(os.path.join(root, d)) for d in ("val", "test"))


def _image_folder_layout(folder: str, classes: tuple[int, ...]) -> tuple[str, str, str, list[str]]:
  """Finds the tree's root, its train and test folders and its sorted class dirs; checks the class indices.

  Returns:
    ``(root, train_dir, test_dir, class_dirs)``; ``test_dir`` is ``val/``, else ``test/``.
  """
  if not os.path.isdir(folder):
    raise data_lib.DataError(f"image folder does not exist: {folder}")
  folder = _image_folder_root(folder)
  train_dir = os.path.join(folder, "train")
  if not os.path.isdir(train_dir):
    raise data_lib.DataError(f"image folder has no train/ sub-folder: {train_dir}")
  test_dirs = [os.path.join(folder, d) for d in ("val", "test") if os.path.isdir(os.path.join(folder, d))]
  if not test_dirs:
    raise data_lib.DataError(f"image folder has no val/ (or test/) sub-folder: {folder}")
  class_dirs = _list_dirs(train_dir)
  bad = [c for c in classes if c >= len(class_dirs)]
  if bad:
    raise data_lib.DataError(
        f"class index {bad} out of range: {train_dir} has {len(class_dirs)} class dirs {class_dirs}"
    )
  return folder, train_dir, test_dirs[0], class_dirs


def _read_image_split(split_dir: str, class_dirs: list[str], classes: tuple[int, ...],
                      image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Reads every image of ``classes`` under ``split_dir`` in sorted name order, as RGB.

  Returns:
    ``(x, y)``: ``(n, H, W, 3)`` float32 images in [0, 1] and ``(n,)`` int32 labels (class positions).
  """
  images, labels = [], []
  for k, c in enumerate(classes):
    cdir = os.path.join(split_dir, class_dirs[c])
    files = []
    if os.path.isdir(cdir):
      files = sorted(f for f in os.listdir(cdir) if f.lower().endswith(_IMAGE_SUFFIXES))
    if not files:
      raise data_lib.DataError(f"class {c} ({class_dirs[c]}) has no images in {cdir}")
    for fname in files:
      path = os.path.join(cdir, fname)
      try:
        with Image.open(path) as im:
          im = im.convert("RGB")
          if image_size is not None:
            im = resize_center_crop(im, int(image_size))
          images.append(np.asarray(im, np.uint8))  # (H, W, 3)
      except (OSError, ValueError) as e:
        raise data_lib.DataError(f"cannot read image {path}: {e}") from e
      labels.append(k)
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise data_lib.DataError(f"{split_dir}: images have different sizes {sorted(shapes)[:4]}; pass image_size")
  return readers.to_unit(np.stack(images)), np.asarray(labels, np.int32)


def load_image_folder(
    folder: str, classes: Sequence[int], image_size: int | None, *, name: str | None = None
) -> data_lib.Dataset:
  """Loads an ImageNette-style tree: ``folder/train/<class dir>/*`` and ``folder/val/<class dir>/*``.

  ``folder`` may also be the parent of one such tree (the folder ``imagenette2-320.tgz`` was extracted into).

  Class ids are indices into the SORTED class-directory names of ``folder/train`` (for ImageNette the WordNet
  ids, so 0 = n01440764 tench ... 9 = n03888605 parachute); ``folder/test`` is used when there is no ``val``.
  Files are read in sorted name order, converted to RGB with PIL (ImageNette holds some grayscale JPEGs) and,
  when ``image_size`` is set, resized as in ``resize_center_crop``: shorter side to ``image_size`` (bilinear),
  then center crop to ``image_size x image_size`` (the paper's 224-pixel setting, docs/method.md §7).

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
  classes = data_lib.check_classes(classes)
  if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
    raise data_lib.DataError(f"image_size must be a positive integer, got {image_size!r}")
  folder, train_dir, test_dir, class_dirs = _image_folder_layout(folder, classes)
  arrays = []
  for split_dir in (train_dir, test_dir):
    arrays += _read_image_split(split_dir, class_dirs, classes, image_size)
  name = name or os.path.basename(os.path.normpath(folder))
  return data_lib.Dataset(*arrays, name=name, classes=classes, source="image_folder")
