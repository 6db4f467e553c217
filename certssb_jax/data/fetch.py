"""Downloads the paper's data sets, checksums verified, into the folders the local loaders of data.py read.

  python -m certssb_jax.data fetch mnist|fashion_mnist|cifar10|imagenette [--dir DIR] [--base_url URL]

Without ``--dir`` the files go to ``data.default_data_dir(name)`` (``$CERTSSB_JAX_DATA/<name>``, else
``~/.cache/certssb_jax/data/<name>``), where ``load_dataset`` looks when a file source gets no ``data_dir``:

* ``mnist``, ``fashion_mnist``: the four IDX ``.gz`` files (``source=idx``);
* ``cifar10``: ``cifar-10-python.tar.gz`` extracted to ``DIR/cifar-10-batches-py`` (``source=cifar_pickle``);
* ``imagenette``: ``imagenette2-320.tgz`` extracted to ``DIR/imagenette2-320/{train,val}/<wnid>/*.JPEG``
  (``source=image_folder``); the archives are deleted after extraction.

Every file is checked against its PUBLISHED checksum while it streams in (the sources are named next to each
entry of ``DATASETS``); it is written to a temporary file in the target folder and renamed only after the
checksum matched, so a corrupt or truncated download never lands (the partial file is deleted). Files
already there with the right checksum (for archives: the extracted folder with its ``.<archive>.verified``
record) are not downloaded again. Archives are extracted into a temporary folder with tarfile's ``"data"``
filter (no absolute paths, no ``..``, no links out of the folder, no device files) and moved into place
whole. Only the standard library is used (``urllib.request``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import contextlib
import dataclasses
import hashlib
import http.client
import logging
import os
import shlex
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib

from certssb_jax.data import sources as data_lib

logger = logging.getLogger(__name__)

TIMEOUT_S = 60.0  # seconds without any bytes (connect or read) before a download is given up
_CHUNK = 1 << 20  # bytes read and hashed at a time
_LOG_EVERY = 64 << 20  # log progress every this many bytes
_USER_AGENT = "certssb-jax-fetch/0.1 (python urllib)"  # some hosts refuse urllib's default agent
_ALGOS = {32: "md5", 64: "sha256"}  # hex digest length -> algorithm, for bare checksums


class FetchError(data_lib.DataError):
  """A download or extraction failed; the one-line message names the URL or the file and the problem."""


class UnreachableError(FetchError):
  """No mirror of a file could be reached (no network, or the host is down)."""


@dataclasses.dataclass(frozen=True)
class Remote:
  """One file to download.

  Attributes:
    filename: the file name, appended to each mirror's base URL and kept in the target folder.
    checksum: the published checksum, ``"md5:<hex>"`` or ``"sha256:<hex>"``.
    size: the published size in bytes, when the publisher gives one (for the error message).
  """

  filename: str
  checksum: str
  size: int | None = None


@dataclasses.dataclass(frozen=True)
class FetchSpec:
  """How to get one data set.

  Attributes:
    mirrors: base URLs (ending in ``/``), tried in order until one serves a file with the right checksum.
    files: the files to download.
    extract_to: for an archive: the top folder it holds, extracted into the target folder (the archive is
      then deleted); None: the files are kept as they are.
    config: the ``--config`` value that runs the paper's protocol on the data set.
  """

  mirrors: tuple[str, ...]
  files: tuple[Remote, ...]
  extract_to: str | None = None
  config: str = ""


# The data sets `load_dataset` reads after a fetch (data.SOURCES[...].fetches names the same set).
DATASETS: dict[str, FetchSpec] = {
    # MD5s: pytorch/vision, torchvision/datasets/mnist.py, class MNIST (`resources`). torchvision's own S3
    # mirror first: yann.lecun.com is often down or refuses downloads.
    "mnist": FetchSpec(
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        files=(
            Remote("train-images-idx3-ubyte.gz", "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            Remote("train-labels-idx1-ubyte.gz", "md5:d53e105ee54ea40749a09fcbcd1e9432"),
            Remote("t10k-images-idx3-ubyte.gz", "md5:9fb629c4189551a2d022fa330f9573f3"),
            Remote("t10k-labels-idx1-ubyte.gz", "md5:ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        config="configs/mnist.py",
    ),
    # MD5s: pytorch/vision, torchvision/datasets/mnist.py, class FashionMNIST (`resources`).
    "fashion_mnist": FetchSpec(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=(
            Remote("train-images-idx3-ubyte.gz", "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            Remote("train-labels-idx1-ubyte.gz", "md5:25c81989df183df01b3e8a0aad5dffbe"),
            Remote("t10k-images-idx3-ubyte.gz", "md5:bef4ecab320f06d8554ea6380940ec79"),
            Remote("t10k-labels-idx1-ubyte.gz", "md5:bb300cfdad3c16e7a12a480ee83cd310"),
        ),
        config="configs/mnist.py:data.name=fashion_mnist",
    ),
    # MD5: the CIFAR page (https://www.cs.toronto.edu/~kriz/cifar.html) and pytorch/vision,
    # torchvision/datasets/cifar.py (`tgz_md5`).
    "cifar10": FetchSpec(
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files=(Remote("cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a"),),
        extract_to="cifar-10-batches-py",
        config="configs/cifar10.py",
    ),
    # SHA-256 and size: tensorflow/datasets, tensorflow_datasets/datasets/imagenette/checksums.tsv (fast.ai
    # publishes none; pytorch/vision's torchvision/datasets/imagenette.py lists MD5
    # 3df6f0d01a2c9592104656642f5e78a3 for the same URL).
    "imagenette": FetchSpec(
        mirrors=("https://s3.amazonaws.com/fast-ai-imageclas/",),
        files=(Remote(
            "imagenette2-320.tgz",
            "sha256:569b4497c98db6dd29f335d1f109cf315fe127053cedf69010d047f0188e158c",
            size=341663724,
        ),),
        extract_to="imagenette2-320",
        config="configs/imagenette.py",
    ),
}


def _parse_checksum(text: str, where: str) -> tuple[str, str]:
  """``"md5:<hex>"``, ``"sha256:<hex>"`` or a bare hex digest (algorithm from its length) -> (algo, hex)."""
  algo, sep, digest = text.strip().partition(":")
  if not sep:
    algo, digest = _ALGOS.get(len(algo), "?"), algo
  digest = digest.lower()
  if algo not in _ALGOS.values() or len(digest) != hashlib.new(algo).digest_size * 2 or any(
      ch not in "0123456789abcdef" for ch in digest):
    raise FetchError(f"{where}: bad checksum {text!r}; expected 'md5:<32 hex>' or 'sha256:<64 hex>'")
  return algo, digest


def file_digest(path: str, algo: str) -> str:
  """Hex digest of the file at ``path`` with ``algo`` (``"md5"`` or ``"sha256"``), read in chunks."""
  h = hashlib.new(algo)
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _one_line(err: BaseException) -> str:
  """An exception (or a URLError's reason) as one line."""
  reason = getattr(err, "reason", None) or err
  text = " ".join(str(reason).split())
  return text or type(reason).__name__


def _download(url: str, path: str, algo: str, digest: str, size: int | None, timeout: float) -> None:
  """Streams ``url`` into a temporary file next to ``path``, hashing as it goes; renames it to ``path`` only
  when the digest matches, and deletes it on any failure (mismatch, lost connection, interrupt).

  Raises:
    FetchError: host unreachable, HTTP error, interrupted transfer, or a checksum mismatch naming the file,
      the expected and the actual digest.
  """
  name = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{name}.", suffix=".part")
  try:
    h, n = hashlib.new(algo), 0
    with os.fdopen(fd, "wb") as out:
      request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
      try:
        response = urllib.request.urlopen(request, timeout=timeout)
      except urllib.error.HTTPError as e:
        raise FetchError(f"cannot download {url}: HTTP {e.code} {_one_line(e)}") from e
      except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, a bad URL
        raise UnreachableError(f"cannot reach {url}: {_one_line(e)}") from e
      with response:
        announced = response.headers.get("Content-Length")
        logger.info("downloading %s (%s bytes) to %s", url, announced or "?", path)
        try:
          while chunk := response.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
            n += len(chunk)
            if n // _LOG_EVERY != (n - len(chunk)) // _LOG_EVERY:
              logger.info("  %s: %d MiB", name, n >> 20)
        except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
          raise FetchError(f"download of {url} interrupted after {n} bytes: {_one_line(e)}") from e
    got = h.hexdigest()
    if got != digest:
      expected_size = announced or size
      of = f" of {expected_size}" if expected_size is not None and str(expected_size) != str(n) else ""
      raise FetchError(
          f"{name}: {algo} checksum mismatch: expected {digest}, got {got} ({n}{of} bytes from {url}); "
          "the download is corrupt or truncated and was deleted"
      )
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def _download_from_mirrors(
    mirrors: Sequence[str], remote: Remote, path: str, algo: str, digest: str, timeout: float
) -> None:
  """Tries each mirror in turn; raises one FetchError joining every mirror's failure when none succeeds."""
  errors: list[FetchError] = []
  for base in mirrors:
    url = base.rstrip("/") + "/" + remote.filename
    try:
      _download(url, path, algo, digest, remote.size, timeout)
      if errors:  # said once here, not once per mirror and again in the error
        logger.info("%s: downloaded from %s after %s", remote.filename, base, "; ".join(map(str, errors)))
      return
    except FetchError as e:
      errors.append(e)
  kind = UnreachableError if all(isinstance(e, UnreachableError) for e in errors) else FetchError
  raise kind("; ".join(map(str, errors)))


def _check_members(tar: tarfile.TarFile, root: str, archive: str) -> None:
  """For Pythons without tarfile's ``"data"`` filter: refuses links, devices and paths outside ``root``."""
  root = os.path.realpath(root)
  for m in tar.getmembers():
    target = os.path.realpath(os.path.join(root, m.name))
    if not (m.isfile() or m.isdir()) or os.path.commonpath([root, target]) != root:
      raise FetchError(f"cannot extract {archive}: unsafe member {m.name!r} (a link, device or path outside "
                       "the folder)")


def _extract(archive: str, dest: str, top: str) -> None:
  """Extracts ``archive`` safely and moves its ``top`` folder to ``dest/top`` (replacing an older one)."""
  tmp = tempfile.mkdtemp(dir=dest, prefix=".extract-")
  try:
    with tarfile.open(archive, "r:*") as tar:
      if hasattr(tarfile, "data_filter"):
        tar.extractall(tmp, filter="data")
      else:
        _check_members(tar, tmp, archive)
        tar.extractall(tmp)  # nosec: every member was checked above
    src = os.path.join(tmp, top)
    if not os.path.isdir(src):
      raise FetchError(f"cannot extract {archive}: it holds no {top}/ folder (found {sorted(os.listdir(tmp))[:5]})")
    target = os.path.join(dest, top)
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target)  # an older or half-replaced copy
    elif os.path.lexists(target):
      os.remove(target)
    os.rename(src, target)
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # FilterError is a TarError
    raise FetchError(f"cannot extract {archive}: {type(e).__name__}: {_one_line(e)}") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _write_atomic(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _read_text(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None


def _fetch_file(dest: str, remote: Remote, algo: str, digest: str, mirrors: Sequence[str], timeout: float) -> bool:
  """One plain file; returns whether it was downloaded (False: already there with the right checksum)."""
  path = os.path.join(dest, remote.filename)
  if os.path.isfile(path):
    got = file_digest(path, algo)
    if got == digest:
      logger.info("%s: already there, %s verified", path, algo)
      return False
    logger.warning("%s: %s is %s, not %s: downloading it again", path, algo, got, digest)
  _download_from_mirrors(mirrors, remote, path, algo, digest, timeout)
  return True


def _fetch_archive(
    dest: str, remote: Remote, algo: str, digest: str, mirrors: Sequence[str], top: str, timeout: float
) -> bool:
  """One archive, extracted to ``dest/top``; returns whether it was downloaded.

  ``dest/.<archive>.verified`` records the checksum of the archive ``dest/top`` came from, so a later fetch
  with the same checksum skips the download; an archive already in ``dest`` with the right checksum is
  extracted without downloading.
  """
  archive = os.path.join(dest, remote.filename)
  record = os.path.join(dest, f".{remote.filename}.verified")
  expected = f"{algo}:{digest}"
  if os.path.isdir(os.path.join(dest, top)) and _read_text(record) == expected:
    logger.info("%s: already extracted from an archive with %s %s", os.path.join(dest, top), algo, digest)
    return False
  downloaded = False
  if not (os.path.isfile(archive) and file_digest(archive, algo) == digest):
    _download_from_mirrors(mirrors, remote, archive, algo, digest, timeout)
    downloaded = True
  with contextlib.suppress(FileNotFoundError):
    os.remove(record)  # the folder is about to change: no stale record
  try:
    logger.info("extracting %s", archive)
    _extract(archive, dest, top)
    _write_atomic(record, expected + "\n")
  finally:
    # Extracted, or refused (an unsafe or malformed archive is not kept either).
    with contextlib.suppress(FileNotFoundError):
      os.remove(archive)
  return downloaded


def fetch(
    name: str,
    dest: str | None = None,
    *,
    base_url: str | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = TIMEOUT_S,
) -> str:
  """Downloads data set ``name`` into ``dest``, verifying checksums, and returns the folder to load it from.

  Args:
    name: one of ``DATASETS``: ``mnist``, ``fashion_mnist``, ``cifar10``, ``imagenette``.
    dest: the target folder (created); None: ``default_data_root()/<name>`` (``load_dataset``'s default).
    base_url: one base URL replacing the data set's mirrors (a file's URL is ``base_url/<filename>``).
    checksums: file name -> checksum (``"md5:<hex>"``, ``"sha256:<hex>"`` or bare hex) replacing the
      published ones, e.g. for files served by a test; unlisted files keep the published checksum.
    timeout: seconds without any bytes before a connection or read is given up.

  Returns:
    The absolute path of ``dest``: the ``data_dir`` of ``load_dataset(SOURCE, name=name, ...)`` (the file
    sources find the extracted sub-folder themselves).

  Raises:
    FetchError: unknown name, bad checksum argument, unreachable host, HTTP error, checksum mismatch (the
      partial download deleted), or an archive that cannot be extracted safely.
  """
  if name not in DATASETS:
    raise FetchError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
  spec = DATASETS[name]
  checksums = dict(checksums or {})
  unknown = sorted(set(checksums) - {r.filename for r in spec.files})
  if unknown:
    raise FetchError(f"checksums for files {name} does not have: {unknown}")
  dest = os.path.abspath(os.path.expanduser(dest or os.path.join(data_lib.default_data_root(), name)))
  created = [d for d in _parents(dest) if not os.path.exists(d)]  # removed again if nothing lands in them
  try:
    os.makedirs(dest, exist_ok=True)
  except OSError as e:
    raise FetchError(f"cannot create {dest}: {_one_line(e)}") from e
  mirrors = (base_url,) if base_url else spec.mirrors
  try:
    for remote in spec.files:
      published = checksums.get(remote.filename, remote.checksum)
      algo, digest = _parse_checksum(published, remote.filename)
      remote = remote if remote.filename not in checksums else dataclasses.replace(remote, size=None)
      if spec.extract_to:
        _fetch_archive(dest, remote, algo, digest, mirrors, spec.extract_to, timeout)
      else:
        _fetch_file(dest, remote, algo, digest, mirrors, timeout)
  except FetchError as e:
    for d in created:  # deepest first: no empty folder is left behind
      with contextlib.suppress(OSError):
        os.rmdir(d)
    if isinstance(e, UnreachableError):  # offline: the files can be placed by hand and verified by a rerun
      files = ", ".join(r.filename for r in spec.files)
      raise UnreachableError(f"{e}; without network, copy {files} into {dest} (or pass --dir) and run this "
                             "again: the files there are checked against their published checksums") from e
    raise
  return dest


def _parents(path: str) -> list[str]:
  """``path`` and its parent folders, deepest first."""
  out = [path]
  while os.path.dirname(out[-1]) != out[-1]:
    out.append(os.path.dirname(out[-1]))
  return out


def config_flag(name: str, folder: str) -> str:
  """The ``--config ...`` argument that runs the paper's protocol on data set ``name`` fetched to ``folder``."""
  config = DATASETS[name].config
  if os.path.abspath(folder) != os.path.abspath(data_lib.default_data_dir(name)):
    config += ("," if ":" in config else ":") + f"data_dir={folder}"
  return f"--config {shlex.quote(config)}"


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (exit 2), as every user error of the command line."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m certssb_jax.data fetch NAME [--dir DIR] [--base_url URL]``; returns the exit code.

  Prints where the files went and the ``--config`` line that uses them; a user error (unknown name,
  unreachable host, bad checksum, ...) prints one line on stderr and returns 2.
  """
  parser = _Parser(prog="python -m certssb_jax.data", description="Downloads a data set, checksums verified.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  cmd = sub.add_parser("fetch", help="download a data set")
  cmd.add_argument("name", help=" | ".join(DATASETS))
  cmd.add_argument("--dir", default=None, help="target folder (default: the folder load_dataset reads)")
  cmd.add_argument("--base_url", default=None, help="download from this base URL instead of the mirrors")
  cmd.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds without bytes before giving up")
  args = parser.parse_args(argv)
  # Progress goes to stdout with the result, so stderr holds nothing but an error line.
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(message)s"))
  saved = logger.level, logger.propagate
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  try:
    folder = fetch(args.name, args.dir, base_url=args.base_url, timeout=args.timeout)
  except data_lib.DataError as e:
    print(f"{parser.prog} fetch: error: {e}", file=sys.stderr)
    return 2
  finally:
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
  print(f"{args.name}: verified files in {folder}")
  print(f"run: python -m certssb_jax.launch {config_flag(args.name, folder)} --workdir runs/{args.name}")
  return 0
