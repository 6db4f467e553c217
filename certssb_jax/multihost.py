"""Agreement between the processes of a multi-host run (``launch --distributed``).

Every process runs the whole pipeline; the run folder must be on a filesystem they all see. Process 0 alone
writes it and decides what is reused (the others follow its decision, so a file appearing mid-run cannot make
them diverge); results computed by every process are replaced by process 0's bits. With one process these
helpers do nothing.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np


def is_primary() -> bool:
  """Whether this process writes the outputs (process 0)."""
  return jax.process_index() == 0


def agree(flag: bool) -> bool:
  """Process 0's answer, on every process."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def broadcast_exact(tree: Any) -> Any:
  """Process 0's arrays on every process, bit for bit (sent as bytes, so float64 survives x32 mode).

  Nothing is sent when every process already holds the same bits (results of collective stages): digests are
  compared first.
  """
  if jax.process_count() == 1:
    return tree
  digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in jax.tree.leaves(tree))).digest()
  digests = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest[:16], np.int32)))  # (P, 4)
  if (digests == digests[0]).all():
    return tree

  def send(a):
    a = np.asarray(a)
    raw = np.ascontiguousarray(a).view(np.uint8).astype(np.int32)  # int32: psum of one nonzero term is exact
    return np.asarray(multihost_utils.broadcast_one_to_all(raw)).astype(np.uint8).view(a.dtype).reshape(a.shape)

  return jax.tree.map(send, tree)
