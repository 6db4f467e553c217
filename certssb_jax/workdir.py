"""Host-side storage of a run: atomic files in the workdir, so a kill at any moment leaves a workdir that resumes.

Every finished stage is one ``.npz`` (or ``.json``) written to a temporary name and renamed into place;
ensemble chunks are Orbax checkpoints (which Orbax also commits atomically). A stage whose file exists is
reused on resume.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_npz(path: str, **arrays: Any) -> None:
  """Atomically writes arrays as an uncompressed ``.npz``."""
  import io  # pylint: disable=g-import-not-at-top

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
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"cannot write {type(o).__name__} to JSON")
