"""Tests of `python -m certssb_jax.data fetch`: real-format fixture files served from 127.0.0.1, no network.

The fixtures are tiny versions of the real releases (gzipped IDX files, the CIFAR-10 python tarball with its
``cifar-10-batches-py`` pickles, the ImageNette tarball with its WordNet-id folders of JPEGs), so a fetch from
the local server exercises the same download, checksum, extraction and loading code as the real hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading

import numpy as np
from PIL import Image
import pytest

from certssb_jax.data import fetch, sources as data
from certssb_jax.experiment import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "imagenette": "imagenette2-320.tgz"}
IDX_FILES = tuple(r.filename for r in fetch.DATASETS["mnist"].files)
# ImageNette's ten WordNet ids; class ids index them sorted (0 = tench, 1 = English springer).
WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042", "n03425413",
         "n03445777", "n03888257")

# ----------------------------------------------------------------------------------------------------------
# Fixture files in the real formats.
# ----------------------------------------------------------------------------------------------------------


def _idx_gz(arr: np.ndarray) -> bytes:
  """IDX by hand: magic 0x0000 08 ndim, big-endian uint32 sizes, uint8 data; gzipped like the releases."""
  header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
  return gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)


def _write_idx_release(folder: str, rng: np.random.RandomState) -> None:
  """28x28 digits, labels cycling 0..3 (20 train / 6 test per class); class k is brighter with k."""
  for prefix, n in (("train", 80), ("t10k", 24)):
    y = np.arange(n) % 4
    x = np.clip(40 + 50 * y[:, None, None] + rng.randint(-30, 30, (n, 28, 28)), 0, 255)
    for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
      with open(os.path.join(folder, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
        f.write(_idx_gz(arr))


def _tar_folder(archive: str, src_parent: str, top: str) -> None:
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(os.path.join(src_parent, top), arcname=top)


def _write_cifar_release(folder: str, rng: np.random.RandomState, work: str) -> None:
  """cifar-10-python.tar.gz holding cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
  top = os.path.join(work, "cifar-10-batches-py")
  os.makedirs(top)

  def batch(labels, tag):
    # channel-major rows of 3072 uint8; airplanes (0) brighter than birds (2)
    base = np.where(np.asarray(labels)[:, None] == 0, 170, 80)
    rows = np.clip(base + rng.randint(-60, 60, (len(labels), 3072)), 0, 255).astype(np.uint8)
    return {b"batch_label": tag.encode(), b"labels": list(labels), b"data": rows,
            b"filenames": [f"{tag}_{i}.png".encode() for i in range(len(labels))]}

  for i in range(1, 6):  # 4 airplanes, 4 birds and 2 others per batch
    with open(os.path.join(top, f"data_batch_{i}"), "wb") as f:
      pickle.dump(batch([0, 2, 1, 0, 2, 0, 2, 9, 0, 2], f"training batch {i} of 5"), f, protocol=2)
  with open(os.path.join(top, "test_batch"), "wb") as f:
    pickle.dump(batch([0, 2] * 10 + [1, 1], "testing batch 1 of 1"), f, protocol=2)
  names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
  with open(os.path.join(top, "batches.meta"), "wb") as f:
    pickle.dump({b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 10}, f, protocol=2)
  _tar_folder(os.path.join(folder, ARCHIVES["cifar10"]), work, "cifar-10-batches-py")


def _write_imagenette_release(folder: str, rng: np.random.RandomState, work: str) -> None:
  """imagenette2-320.tgz holding imagenette2-320/{train,val}/<wnid>/<wnid>_<i>.JPEG for the ten wnids."""
  for split, n in (("train", 12), ("val", 6)):
    for k, wnid in enumerate(WNIDS):
      d = os.path.join(work, "imagenette2-320", split, wnid)
      os.makedirs(d)
      for i in range(n if k < 2 else 1):
        img = np.clip(60 + 100 * min(k, 2) + rng.randint(-40, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{wnid}_{i}.JPEG"), quality=90)
  with open(os.path.join(work, "imagenette2-320", "noisy_imagenette.csv"), "w") as f:
    f.write("path,noisy_labels_0\n")  # the real archive carries this file too
  _tar_folder(os.path.join(folder, ARCHIVES["imagenette"]), work, "imagenette2-320")


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, str]:
  """name -> folder holding that data set's fixture release files, built once."""
  base = tmp_path_factory.mktemp("releases")
  rng = np.random.RandomState(0)
  out = {}
  for name in ("mnist", "fashion_mnist", "cifar10", "imagenette"):
    folder = str(base / name)
    os.makedirs(folder)
    if name in ARCHIVES:
      work = str(base / f"{name}_work")
      (_write_cifar_release if name == "cifar10" else _write_imagenette_release)(folder, rng, work)
    else:
      _write_idx_release(folder, rng)
    out[name] = folder
  return out


def _digest(path: str, algo: str = "md5") -> str:
  return hashlib.new(algo, open(path, "rb").read()).hexdigest()


def _checksums(folder: str, algo: str = "md5") -> dict[str, str]:
  """The fixture's own checksums, in fetch's ``algo:hex`` form."""
  return {f: f"{algo}:{_digest(os.path.join(folder, f), algo)}" for f in sorted(os.listdir(folder))}


# ----------------------------------------------------------------------------------------------------------
# The local server.
# ----------------------------------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves a folder; records each request, and cuts the files named in ``truncate`` after half their bytes
  (the Content-Length still announces all of them, as a dropped connection does)."""

  def __init__(self, *args, server_state, **kwargs):
    self.state = server_state
    super().__init__(*args, **kwargs)

  def do_GET(self):
    self.state["requests"].append(self.path)
    super().do_GET()

  def copyfile(self, source, outputfile):
    if os.path.basename(self.path) in self.state["truncate"]:
      body = source.read()
      outputfile.write(body[: len(body) // 2])
      self.close_connection = True
      return
    super().copyfile(source, outputfile)

  def log_message(self, *args):
    pass


@pytest.fixture
def serve(tmp_path, monkeypatch):
  """serve(folder) -> (base_url, state): an http.server on 127.0.0.1 (a free port) serving a COPY of
  ``folder`` (tests may change the served files through ``state["dir"]``)."""
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # never route the local server through a proxy
  servers = []

  def start(folder):
    served = str(tmp_path / f"served_{len(servers)}")
    shutil.copytree(folder, served)
    state = {"requests": [], "truncate": set(), "dir": served}
    handler = functools.partial(_Handler, server_state=state, directory=served)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    servers.append(httpd)
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/"
    return state["url"], state

  yield start
  for httpd in servers:
    httpd.shutdown()
    httpd.server_close()


def _closed_port_url() -> str:
  """A base URL on 127.0.0.1 whose port nothing listens on."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/"


# ----------------------------------------------------------------------------------------------------------
# The catalog.
# ----------------------------------------------------------------------------------------------------------


def test_catalog_matches_the_source_registry():
  fetched = {n: src for src, entry in data.SOURCES.items() for n in entry.fetches}
  assert set(fetch.DATASETS) == set(fetched) == {"mnist", "fashion_mnist", "cifar10", "imagenette"}
  for name, spec in fetch.DATASETS.items():
    assert spec.mirrors and all(m.endswith("/") for m in spec.mirrors), name
    for remote in spec.files:
      algo, digest = fetch._parse_checksum(remote.checksum, remote.filename)
      assert remote.checksum == f"{algo}:{digest}"
    assert spec.config.split(":")[0] in ("configs/mnist.py", "configs/cifar10.py", "configs/imagenette.py")
  assert [r.filename for r in fetch.DATASETS["fashion_mnist"].files] == list(IDX_FILES)
  assert fetch.DATASETS["cifar10"].extract_to == "cifar-10-batches-py"
  assert fetch.DATASETS["imagenette"].extract_to == "imagenette2-320"
  assert fetch.DATASETS["mnist"].mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"


def test_checksum_arguments_are_checked(tmp_path):
  assert fetch._parse_checksum("D41D8CD98F00B204E9800998ECF8427E", "f") == ("md5", "d41d8cd98f00b204e9800998ecf8427e")
  assert fetch._parse_checksum("sha256:" + "ab" * 32, "f") == ("sha256", "ab" * 32)
  for bad in ("md5:xyz", "sha1:" + "a" * 40, "abc", "md5:" + "a" * 64):
    with pytest.raises(fetch.FetchError, match="bad checksum"):
      fetch._parse_checksum(bad, "f")
  with pytest.raises(fetch.FetchError, match="does not have"):
    fetch.fetch("mnist", str(tmp_path), checksums={"mnist.npz": "md5:" + "0" * 32})
  with pytest.raises(fetch.FetchError, match="unknown data set 'svhn'"):
    fetch.fetch("svhn", str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# Fetch every data set, then load it and run its paper config's quick variant.
# ----------------------------------------------------------------------------------------------------------


def _fetch_fixture(name, releases, serve, dest, algo="md5"):
  base_url, state = serve(releases[name])
  folder = fetch.fetch(name, dest, base_url=base_url, checksums=_checksums(releases[name], algo))
  return folder, state


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_fetch_idx_lands_where_load_idx_reads(name, releases, serve, tmp_path):
  dest = str(tmp_path / "data" / name)
  folder, state = _fetch_fixture(name, releases, serve, dest)
  assert folder == dest and sorted(os.listdir(dest)) == sorted(IDX_FILES)  # nothing else: no temp files
  for f in IDX_FILES:
    assert open(os.path.join(dest, f), "rb").read() == open(os.path.join(releases[name], f), "rb").read()
  assert sorted(state["requests"]) == sorted("/" + f for f in IDX_FILES)
  ds = data.load_dataset("idx", name=name, classes=(0, 1), data_dir=folder)
  assert ds.input_shape == (28, 28, 1) and len(ds.y_train) == 40 and len(ds.y_test) == 12

  # Files already there with the right checksum are not downloaded again ...
  state["requests"].clear()
  assert fetch.fetch(name, dest, base_url=state["url"], checksums=_checksums(releases[name])) == dest
  assert state["requests"] == []
  # ... and a damaged one is (only that one).
  with open(os.path.join(dest, IDX_FILES[1]), "r+b") as f:
    f.write(b"\x00\x00\x00\x00")
  fetch.fetch(name, dest, base_url=state["url"], checksums=_checksums(releases[name]))
  assert state["requests"] == ["/" + IDX_FILES[1]]
  assert _checksums(dest) == _checksums(releases[name])


@pytest.mark.parametrize("name,algo", [("cifar10", "md5"), ("imagenette", "sha256")])
def test_fetch_archive_extracts_where_the_loader_reads(name, algo, releases, serve, tmp_path):
  dest = str(tmp_path / "data" / name)
  folder, state = _fetch_fixture(name, releases, serve, dest, algo)
  top = fetch.DATASETS[name].extract_to
  archive = ARCHIVES[name]
  # The extracted folder and the record of the archive's checksum; the archive itself and temp files are gone.
  assert sorted(os.listdir(dest)) == sorted([top, f".{archive}.verified"])
  assert open(os.path.join(dest, f".{archive}.verified")).read().strip() == _checksums(releases[name], algo)[archive]
  if name == "cifar10":
    assert sorted(os.listdir(os.path.join(dest, top))) == sorted(
        ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)])
    ds = data.load_dataset("cifar_pickle", name=name, classes=(2, 0), data_dir=folder)
    assert ds.input_shape == (32, 32, 3) and (len(ds.y_train), len(ds.y_test)) == (40, 20)
  else:
    assert sorted(os.listdir(os.path.join(dest, top, "train"))) == list(WNIDS)
    assert sorted(os.listdir(os.path.join(dest, top, "val", WNIDS[0])))[0] == f"{WNIDS[0]}_0.JPEG"
    ds = data.load_dataset("image_folder", name=name, classes=(0, 1), data_dir=folder, image_size=32)
    assert ds.input_shape == (32, 32, 3) and (len(ds.y_train), len(ds.y_test)) == (24, 12)
  # Run again: the extracted folder with a matching record is kept, nothing is downloaded.
  state["requests"].clear()
  fetch.fetch(name, dest, base_url=state["url"], checksums=_checksums(releases[name], algo))
  assert state["requests"] == []
  # An archive already in the folder with the right checksum is extracted without a download.
  shutil.rmtree(os.path.join(dest, top))
  shutil.copy(os.path.join(releases[name], archive), dest)
  fetch.fetch(name, dest, base_url=state["url"], checksums=_checksums(releases[name], algo))
  assert state["requests"] == [] and sorted(os.listdir(dest)) == sorted([top, f".{archive}.verified"])


def test_fetch_into_the_default_folders_then_load_without_data_dir(releases, serve, tmp_path, monkeypatch):
  """`fetch NAME` with no --dir fills default_data_dir(NAME), which the paper configs' data_dir="" reads."""
  from certssb_jax.experiment import pipeline  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "root"))
  monkeypatch.setattr(data, "_DEBIAN_FASHION_MNIST", str(tmp_path / "no_debian"))
  for name in ("mnist", "fashion_mnist", "cifar10", "imagenette"):
    folder, _ = _fetch_fixture(name, releases, serve, None)
    assert folder == data.default_data_dir(name) == str(tmp_path / "root" / name)
  for spec, n_train in (("configs/mnist.py", 40), ("configs/mnist.py:data.name=fashion_mnist", 40),
                        ("configs/cifar10.py:quick", 40), ("configs/imagenette.py:quick", 24)):
    c = config_lib.load_config(os.path.join(ROOT, spec))
    assert c.data.data_dir == ""
    ds = pipeline.load_data(c)
    assert ds.name == c.data.name and len(ds.y_train) == n_train, spec


@pytest.mark.parametrize("spec,name,overrides", [
    ("configs/mnist.py:quick", "mnist", "source=idx,batch_size=16,"),  # 128 > the fixture's 40 images
    ("configs/cifar10.py:quick", "cifar10", ""),
    ("configs/imagenette.py:quick", "imagenette", ""),
])
@pytest.mark.slow
def test_paper_quick_configs_run_on_fetched_files(spec, name, overrides, releases, serve, tmp_path):
  """Each paper config's quick variant, end to end on the fetched files (2 models, no undefended model: the
  quick runs of tests/test_models.py and tests/test_launch.py cover those parts; 10% poisoning, as 2% of the
  20 non-target images selects none)."""
  from certssb_jax.experiment import pipeline  # pylint: disable=g-import-not-at-top

  folder, _ = _fetch_fixture(name, releases, serve, str(tmp_path / "data" / name))
  c = config_lib.load_config(os.path.join(ROOT, f"{spec},{overrides}data_dir={folder},num_models=2,"
                                                 "poison_rate=0.1,undefended.enabled=false"))
  summary = pipeline.run(c, str(tmp_path / "run"))
  assert summary["dataset"] == name and summary["num_models"] == 2
  assert summary["n_train"] == {"mnist": 40, "cifar10": 40, "imagenette": 24}[name]
  assert os.path.isfile(tmp_path / "run" / "summary.json")


# ----------------------------------------------------------------------------------------------------------
# Corrupt, truncated and unsafe downloads; unreachable hosts.
# ----------------------------------------------------------------------------------------------------------


def test_corrupt_download_is_refused_and_deleted(releases, serve, tmp_path):
  base_url, state = serve(releases["cifar10"])
  good = _checksums(releases["cifar10"])
  archive = ARCHIVES["cifar10"]
  served = os.path.join(state["dir"], archive)
  body = open(served, "rb").read()
  with open(served, "wb") as f:  # same length, one byte changed
    f.write(body[:100] + bytes([body[100] ^ 0xFF]) + body[101:])
  bad_md5 = _digest(served)
  dest = str(tmp_path / "cifar10")
  with pytest.raises(fetch.FetchError) as e:
    fetch.fetch("cifar10", dest, base_url=base_url, checksums=good)
  msg = str(e.value)
  assert archive in msg and good[archive].split(":")[1] in msg and bad_md5 in msg and "\n" not in msg
  assert not os.path.exists(dest)  # no partial or temp file, nothing extracted, no empty folder
  with open(served, "wb") as f:  # the server is fixed: a re-run succeeds
    f.write(body)
  assert fetch.fetch("cifar10", dest, base_url=base_url, checksums=good) == dest
  assert data.load_dataset("cifar_pickle", name="cifar10", classes=(2, 0), data_dir=dest).input_shape == (32, 32, 3)


def test_truncated_download_is_refused_and_deleted(releases, serve, tmp_path):
  base_url, state = serve(releases["mnist"])
  good = _checksums(releases["mnist"])
  state["truncate"].add(IDX_FILES[0])
  dest = str(tmp_path / "mnist")
  with pytest.raises(fetch.FetchError) as e:
    fetch.fetch("mnist", dest, base_url=base_url, checksums=good)
  msg = str(e.value)
  assert IDX_FILES[0] in msg and good[IDX_FILES[0]].split(":")[1] in msg and "\n" not in msg
  size = os.path.getsize(os.path.join(releases["mnist"], IDX_FILES[0]))
  assert f"{size // 2} of {size} bytes" in msg
  assert not os.path.exists(dest)
  state["truncate"].clear()
  fetch.fetch("mnist", dest, base_url=base_url, checksums=good)
  assert _checksums(dest) == good


@pytest.mark.parametrize("data_filter", [True, False])
def test_unsafe_archive_is_not_extracted(data_filter, serve, tmp_path, monkeypatch):
  """A member escaping the folder is refused, with tarfile's "data" filter and with the fallback check."""
  if not data_filter:
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
  release = tmp_path / "release"
  release.mkdir()
  with tarfile.open(release / ARCHIVES["cifar10"], "w:gz") as tar:
    for member in ("cifar-10-batches-py/test_batch", "cifar-10-batches-py/../../evil.txt"):
      info = tarfile.TarInfo(member)
      info.size = 4
      tar.addfile(info, io.BytesIO(b"evil"))
  base_url, _ = serve(str(release))
  dest = tmp_path / "a" / "b"
  with pytest.raises(fetch.FetchError, match="cannot extract .*cifar-10-python.tar.gz"):
    fetch.fetch("cifar10", str(dest), base_url=base_url, checksums=_checksums(str(release)))
  assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
  assert not (tmp_path / "a").exists()  # the refused archive, the extraction folder and the folders made for it


def test_unreachable_host_is_one_clear_error(tmp_path):
  url = _closed_port_url()
  with pytest.raises(fetch.UnreachableError, match=f"cannot reach {url}train-images-idx3-ubyte.gz: ") as e:
    fetch.fetch("mnist", str(tmp_path), base_url=url, timeout=5)
  assert os.listdir(tmp_path) == []  # the folder existed before: it stays
  # offline, the message says which files to place where
  assert f"copy {', '.join(IDX_FILES)} into {tmp_path}" in str(e.value)


def test_missing_file_on_the_server_is_an_http_error(serve, tmp_path):
  (tmp_path / "empty").mkdir()
  base_url, _ = serve(str(tmp_path / "empty"))
  with pytest.raises(fetch.FetchError, match=f"cannot download {base_url}cifar-10-python.tar.gz: HTTP 404"):
    fetch.fetch("cifar10", str(tmp_path / "d"), base_url=base_url)
  assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------------------------------------


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "certssb_jax.data", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=env)


def test_cli_unknown_name_exits_2_with_one_line():
  out = _cli("fetch", "nosuch")
  assert out.returncode == 2
  assert out.stderr.count("\n") == 1 and "unknown data set 'nosuch'" in out.stderr
  assert "mnist, fashion_mnist, cifar10, imagenette" in out.stderr


def test_cli_unreachable_base_url_exits_2_naming_the_url(tmp_path):
  url = _closed_port_url()
  out = _cli("fetch", "mnist", "--dir", str(tmp_path / "m"), "--base_url", url, "--timeout", "5")
  assert out.returncode == 2
  assert out.stderr.count("\n") == 1 and f"cannot reach {url}train-images-idx3-ubyte.gz" in out.stderr
  assert f"into {tmp_path / 'm'}" in out.stderr and out.stdout.count("cannot reach") == 0  # said once
  assert not (tmp_path / "m").exists()


def test_cli_prints_the_folder_and_the_config_line(releases, serve, tmp_path, monkeypatch, capsys):
  """In process, with the catalog's checksums swapped for the fixture's (the CLI always checks the published
  ones)."""
  monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "root"))
  base_url, _ = serve(releases["cifar10"])
  spec = fetch.DATASETS["cifar10"]
  remote = dataclasses.replace(spec.files[0], checksum=_checksums(releases["cifar10"])[ARCHIVES["cifar10"]])
  monkeypatch.setitem(fetch.DATASETS, "cifar10", dataclasses.replace(spec, files=(remote,)))

  assert fetch.main(["fetch", "cifar10", "--base_url", base_url]) == 0
  out = capsys.readouterr()
  default = str(tmp_path / "root" / "cifar10")
  assert f"cifar10: verified files in {default}" in out.out and out.err == ""
  assert "run: python -m certssb_jax.launch --config configs/cifar10.py --workdir runs/cifar10" in out.out

  own = str(tmp_path / "own dir")
  assert fetch.main(["fetch", "cifar10", "--dir", own, "--base_url", base_url]) == 0
  out = capsys.readouterr().out
  assert f"--config 'configs/cifar10.py:data_dir={own}'" in out
  c = config_lib.load_config(os.path.join(ROOT, f"configs/cifar10.py:quick,data_dir={own}"))
  assert data.load_dataset(c.data.source, name=c.data.name, classes=tuple(c.data.classes),
                           data_dir=c.data.data_dir).num_classes == 2

  # A user error returns 2 with one line on stderr.
  assert fetch.main(["fetch", "cifar10", "--base_url", _closed_port_url(), "--dir", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("python -m certssb_jax.data fetch: error: cannot reach")


def test_cli_with_every_mirror_unreachable_says_each_once(tmp_path, monkeypatch, capsys):
  """Two mirrors down: one error line naming both URLs and where to put the files; nothing repeated on stdout."""
  urls = [_closed_port_url(), _closed_port_url()]
  monkeypatch.setitem(fetch.DATASETS, "mnist", dataclasses.replace(fetch.DATASETS["mnist"], mirrors=tuple(urls)))
  assert fetch.main(["fetch", "mnist", "--dir", str(tmp_path / "m"), "--timeout", "5"]) == 2
  out, err = capsys.readouterr()
  assert "cannot reach" not in out and err.count("\n") == 1
  assert all(err.count(f"cannot reach {u}train-images-idx3-ubyte.gz") == 1 for u in urls)
  assert "without network, copy" in err and not (tmp_path / "m").exists()
