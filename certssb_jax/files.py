"""Atomic writes and reads of the small files a run keeps (npz arrays, JSON): the ground floor of the run folder,
so that the store and the run folder write the same way without the store importing the run layer."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file in the same folder and ``os.replace`` (mode 0644)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600: results are meant to be read by others
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def copy_figures(page: str, paths: list[str]) -> list[str]:
  """Copies each figure into ``figures/`` beside the page ``page`` (a study's markdown); returns the markdown
  image lines that show them there."""
  folder = os.path.join(os.path.dirname(os.path.abspath(page)), "figures")
  os.makedirs(folder, exist_ok=True)
  lines = []
  for path in paths:
    name = os.path.basename(path)
    shutil.copyfile(path, os.path.join(folder, name))
    lines.append(f"![{name}](figures/{name})")
  return lines


def save_npz(path: str, **arrays: Any) -> None:
  """Atomically writes arrays as an uncompressed ``.npz``."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Reads every array of an ``.npz`` into memory."""
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def save_json(path: str, obj: Any) -> None:
  """Atomically writes JSON (indented, keys in insertion order)."""
  atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def load_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _json_default(o: Any) -> Any:
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, (np.ndarray, tuple)):
    return list(o) if isinstance(o, tuple) else o.tolist()
  raise TypeError(f"cannot write {type(o).__name__} to JSON")
