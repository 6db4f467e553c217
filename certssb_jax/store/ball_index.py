"""The stored balls of the storage-update store (``store.py``) and the exact search for the nearest conflict.

``BallIndex`` holds the answered queries (x_k, c_k, R_k, J_k) and finds, for a query x with radius R and a
label to exclude, the stored ball of another label with the smallest gap d_k - R_k, exactly in float64. The
device kernels of ``distances.py`` bound every gap from below (``lo``) and above (``hi``); a pair is recomputed
exactly in float64 when

    lo_k <= theta = min(R, min over k of another label of hi_k)

and a whole chunk (that label's rows) is recomputed when its ``num_candidates``-th smallest ``lo`` is <= theta
(the candidates did not fit). Every pair left out has gamma_k >= theta: it can neither contain x nor trim R, so
the exact minimum over the recomputed pairs is the exact minimum over the store. Near-ties and balls within
about R of the query are recomputed; distant balls never are. With large inputs (D = 150,528 at 224 pixels,
gamma_D ~ 0.9%) the worst-case bound is loose but distant points still fall out; ``tol_rel`` can be lowered
(e.g. to ``64 * sqrt(D) * u``, a probabilistic bound) to recompute fewer pairs at the price of rigour.

Within a block of queries later queries see the earlier ones of the same block that got stored
(``QueryBlock``): the kernel also gives the (block x block) float32 distances and the same rule picks the pairs
to recompute.

Memory. The host keeps the inputs as a list of blocks of ``chunk_size`` rows in ``dtype`` (one block per device
chunk, the last one partly filled; a new block is allocated when the last fills, so growth never copies the
inputs), and labels, radii and squared norms in 1-D arrays that double. The device holds the query block, the
kernel's small outputs, at most two streamed chunks (one being computed, one being fetched) and the chunks
kept in a device cache of at most ``device_cache_bytes`` (chunks whose rows change are evicted). With
``device_cache_bytes=0`` a store of any size needs device memory for two chunks plus the block only: a store
of 100,000 inputs of 224 x 224 x 3 floats (60 GB on the host) runs with ``chunk_size=512`` in about 0.6 GB.
The kernel compiles once per (query bucket, chunk_size, D, label bucket) shape; query blocks are padded to a
power of two between 8 and ``query_batch``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from certssb_jax.store import distances

logger = logging.getLogger(__name__)

_MIN_BUCKET = 8  # smallest padded query block


def _bucket(n: int, cap: int) -> int:
  """Query block size padded to a power of two in [8, cap] (cap itself if smaller)."""
  return min(cap, max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


def pad_queries(x: np.ndarray, sq: np.ndarray, query_batch: int) -> tuple[np.ndarray, np.ndarray]:
  """The float32 query block (B, D) and its squared norms (B,), zero-padded to ``_bucket`` rows.

  Padding to a few sizes keeps the kernels from compiling once per block length.
  """
  bucket = _bucket(x.shape[0], query_batch)
  q = np.zeros((bucket, x.shape[1]), np.float32)
  q[:x.shape[0]] = x
  q_sq = np.zeros(bucket, np.float32)
  q_sq[:x.shape[0]] = sq
  return q, q_sq


@dataclasses.dataclass
class StoreBounds:
  """Kernel outputs for one query block against the whole store, chunks concatenated on the last axis."""

  lo: np.ndarray  # (n, L, num_chunks * k) float32 lower bounds on the gaps
  index: np.ndarray  # (n, L, num_chunks * k) int64 store indices
  hi_min: np.ndarray  # (n, L) float32 smallest upper bound per label
  kth: np.ndarray  # (n, L, num_chunks) float32 k-th smallest lower bound per chunk


@dataclasses.dataclass
class Conflict:
  """The nearest conflicting ball of a query, exactly in float64."""

  gamma_min: float  # min over the conflicting balls of d - R - SAFETY * (d + R)
  g: float  # d - R of the ball with the smallest d - R (ties: earliest stored)
  d: float  # its distance to the query
  radius: float  # its radius
  joint: float  # its joint radius
  label: int  # its label
  index: int  # its index in the store (block rows: the index they get when appended)


class QueryBlock:
  """Host state of one query block during the sequential logic: its distance bounds and its stored rows."""

  def __init__(self, x: np.ndarray, sq: np.ndarray, d2: np.ndarray | None, tol_rel: float, base: int):
    n = x.shape[0]
    self.x64 = x.astype(np.float64)  # (n, D)
    self.d_lo = self.d_hi = None  # (n, n) bounds on the block's distances; None when one query is active
    if d2 is not None:
      tol2 = tol_rel * (sq[:, None] + sq[None, :])  # (n, n)
      self.d_lo = np.sqrt(np.maximum(d2 - tol2, 0.0)) * (1.0 - distances.SLACK32)  # (n, n)
      self.d_hi = np.sqrt(np.maximum(d2 + tol2, 0.0)) * (1.0 + distances.SLACK32)  # (n, n)
    self.rows = np.zeros(n, np.int64)  # block rows stored so far, in order
    self.label = np.zeros(n, np.int64)
    self.radius = np.zeros(n, np.float64)
    self.joint = np.zeros(n, np.float64)
    self.count = 0
    self.base = base  # store size before the block

  def add(self, row: int, label: int, radius: float, joint: float) -> None:
    self.rows[self.count] = row
    self.label[self.count] = label
    self.radius[self.count] = radius
    self.joint[self.count] = joint
    self.count += 1


class BallIndex:
  """The stored balls in host blocks and device chunks, and the exact nearest-conflict search over them."""

  def __init__(self, dim: int, *, chunk_size: int, dtype: np.dtype, num_candidates: int, tol_rel: float,
               device_cache_bytes: int, counters: dict[str, Any]):
    """Creates an empty index (the store has checked the options).

    Args:
      dim: D, the length of one flattened input.
      chunk_size: rows per device chunk and per host block.
      dtype: the precision of the stored inputs.
      num_candidates: lower bounds kept per (query, label, chunk), at most ``chunk_size``.
      tol_rel: relative error bound of the float32 squared distances.
      device_cache_bytes: device memory for chunks kept between calls.
      counters: the store's counters; the search adds to ``num_exact_pairs`` and ``num_chunk_fallbacks``.
    """
    self._dim = dim
    self._chunk_size = chunk_size
    self._dtype = dtype
    self._num_candidates = num_candidates
    self._tol_rel = tol_rel
    self._device_cache_bytes = device_cache_bytes
    self._counters = counters
    # Host state: inputs in blocks of chunk_size rows; per-row arrays with capacity a multiple of chunk_size.
    self._blocks: list[np.ndarray] = []  # each (chunk_size, D) in dtype
    self._label = np.zeros(0, np.int64)  # (capacity,)
    self._label_id = np.zeros(0, np.int32)  # (capacity,) dense label ids, -1 past the end
    self._radius = np.zeros(0, np.float64)  # (capacity,)
    self._joint = np.zeros(0, np.float64)  # (capacity,) joint radii
    self._sq = np.zeros(0, np.float64)  # (capacity,) squared norms of the stored inputs
    self._size = 0
    self._label_to_id: dict[int, int] = {}
    self._id_to_label: list[int] = []
    self._device_cache: dict[int, tuple[jax.Array, ...]] = {}
    self._cached_bytes = 0

  def __len__(self) -> int:
    return self._size

  def inputs(self) -> np.ndarray:
    """The stored inputs (n, D) in ``dtype``, in insertion order (a new array)."""
    if self._size == 0:
      return np.zeros((0, self._dim), self._dtype)
    return np.concatenate(self._blocks, axis=0)[:self._size]

  @property
  def label(self) -> np.ndarray:
    """(n,) int64 stored labels (a view)."""
    return self._label[:self._size]

  @property
  def radius(self) -> np.ndarray:
    """(n,) float64 stored radii (a view)."""
    return self._radius[:self._size]

  @property
  def joint(self) -> np.ndarray:
    """(n,) float64 stored joint radii (a view)."""
    return self._joint[:self._size]

  def device_bounds(self, q: np.ndarray, q_sq: np.ndarray, n: int,
                    pairwise: bool) -> tuple[StoreBounds | None, np.ndarray | None]:
    """Runs the kernels for a padded query block (``pad_queries``) of ``n`` real queries.

    Returns:
      The bounds against the store (None when it is empty) and, when ``pairwise``, the (n, n) float32 squared
      distances within the block as float64 (else None).
    """
    q_dev, q_sq_dev = jax.device_put(q), jax.device_put(q_sq)
    bounds = self._store_bounds(q_dev, q_sq_dev, n) if self._size else None
    d2 = None
    if pairwise:
      d2 = distances.pair_sq_dist_kernel(q_dev, q_sq_dev, q_dev, q_sq_dev)
      d2 = np.asarray(d2)[:n, :n].astype(np.float64)
    return bounds, d2

  def _store_bounds(self, q_dev: jax.Array, q_sq_dev: jax.Array, n: int) -> StoreBounds:
    """Runs the kernel over every chunk of the store, at most two chunks in flight; returns host arrays."""
    num_labels = max(2, 1 << (len(self._id_to_label) - 1).bit_length())
    tol = jnp.float32(min(self._tol_rel, distances.MAX_TOL_REL))
    num_chunks = len(self._blocks)
    k = self._num_candidates
    lo, idx, hi = [], [], []

    def fetch(c, out):
      lo_c, idx_c, hi_c = jax.device_get(out)
      lo.append(lo_c[:n])
      idx.append(idx_c[:n].astype(np.int64) + c * self._chunk_size)
      hi.append(hi_c[:n])

    pending = None
    for c in range(num_chunks):
      out = distances.chunk_candidates_kernel(q_dev, q_sq_dev, *self._device_chunk(c), tol,
                                              num_labels=num_labels, num_candidates=k)
      if pending is not None:
        fetch(*pending)
      pending = (c, out)
    fetch(*pending)
    lo_all = np.concatenate(lo, axis=-1)  # (n, L, num_chunks * k)
    return StoreBounds(lo=lo_all, index=np.concatenate(idx, axis=-1), hi_min=np.min(np.stack(hi), axis=0),
                        kth=lo_all[..., k - 1::k])

  def _device_chunk(self, c: int) -> tuple[jax.Array, ...]:
    """Device copy of chunk c: (x (C, D) f32, sq (C,) f32, radius (C,) f32, label id (C,) int32)."""
    hit = self._device_cache.get(c)
    if hit is not None:
      return hit
    sl = slice(c * self._chunk_size, (c + 1) * self._chunk_size)
    arrays = jax.device_put((np.asarray(self._blocks[c], np.float32), self._sq[sl].astype(np.float32),
                             self._radius[sl].astype(np.float32), self._label_id[sl]))
    nbytes = sum(a.nbytes for a in arrays)
    if self._cached_bytes + nbytes <= self._device_cache_bytes:
      self._device_cache[c] = arrays
      self._cached_bytes += nbytes
    return arrays

  def nearest_conflict(self, i: int, exclude: int, cap: float, x64: np.ndarray, bounds: StoreBounds | None,
                       block: QueryBlock) -> Conflict | None:
    """Exact nearest ball (smallest d - R) among stored balls with label != ``exclude``, block rows included.

    Only pairs whose float32 lower bound is <= theta = min(cap, smallest upper bound) are recomputed (module
    docstring); every other ball has gamma >= theta. Returns None when no pair is recomputed, which implies
    gamma >= cap for every conflicting ball.
    """
    theta = cap
    ids = np.asarray([l for l, lab in enumerate(self._id_to_label) if lab != exclude], np.int64)
    if bounds is not None and ids.size:
      theta = min(theta, float(bounds.hi_min[i, ids].min()))
    b_rows = block.rows[:block.count]
    keep = block.label[:block.count] != exclude
    b_rows, b_label, b_radius = b_rows[keep], block.label[:block.count][keep], block.radius[:block.count][keep]
    b_joint = block.joint[:block.count][keep]
    b_index = block.base + np.nonzero(keep)[0]
    if b_rows.size:  # block.d_hi exists: two active queries at least
      g_hi = block.d_hi[i, b_rows] - b_radius * (1.0 - distances.SLACK32)
      theta = min(theta, float(g_hi.min()))
      b_sel = block.d_lo[i, b_rows] - b_radius * (1.0 + distances.SLACK32) <= theta
      b_rows, b_label, b_radius, b_index = b_rows[b_sel], b_label[b_sel], b_radius[b_sel], b_index[b_sel]
      b_joint = b_joint[b_sel]
    cand = []
    if bounds is not None:
      for l in ids:
        sel = bounds.lo[i, l] <= theta
        if sel.any():
          cand.append(bounds.index[i, l][sel])
        for c in np.nonzero(bounds.kth[i, l] <= theta)[0]:  # candidates did not fit: the whole chunk
          lo_row = c * self._chunk_size
          cand.append(lo_row + np.nonzero(self._label_id[lo_row:lo_row + self._chunk_size] == l)[0])
          self._counters["num_chunk_fallbacks"] += 1
          logger.debug("query %d: chunk %d label %d recomputed exactly", i, c, l)
    s_index = np.unique(np.concatenate(cand)) if cand else np.zeros(0, np.int64)
    if s_index.size == 0 and b_rows.size == 0:
      return None
    d = np.concatenate([self._exact_store_dist(s_index, x64), distances.exact_dist(block.x64, x64, b_rows)])
    radius = np.concatenate([self._radius[s_index], b_radius])
    joint = np.concatenate([self._joint[s_index], b_joint])
    label = np.concatenate([self._label[s_index], b_label])
    index = np.concatenate([s_index, b_index])
    self._counters["num_exact_pairs"] += int(d.size)
    g = d - radius
    gamma = g - distances.SAFETY * (d + radius)
    j = int(np.argmin(g))  # first minimum: the earliest stored ball
    return Conflict(gamma_min=float(gamma.min()), g=float(g[j]), d=float(d[j]), radius=float(radius[j]),
                    joint=float(joint[j]), label=int(label[j]), index=int(index[j]))

  def _exact_store_dist(self, index: np.ndarray, x64: np.ndarray) -> np.ndarray:
    """Exact float64 distances from ``x64`` (D,) to the stored rows ``index`` (n,). Returns (n,)."""
    out = np.empty(index.shape[0], np.float64)
    blk, off = np.divmod(index, self._chunk_size)
    for b in np.unique(blk):
      sel = blk == b
      out[sel] = distances.exact_dist(self._blocks[b], x64, off[sel])
    return out

  def append(self, x: np.ndarray, label: np.ndarray, radius: np.ndarray, joint: np.ndarray,
             sq: np.ndarray) -> None:
    """Appends rows x (n, D) with their labels, radii, joint radii and squared norms (no checks)."""
    n = label.shape[0]
    new_size = self._size + n
    if new_size > self._label.shape[0]:  # double the per-row arrays, to a multiple of chunk_size
      cap = max(new_size, 2 * self._label.shape[0], self._chunk_size)
      cap = -(-cap // self._chunk_size) * self._chunk_size
      grow = cap - self._label.shape[0]
      self._label = np.concatenate([self._label, np.zeros(grow, np.int64)])
      self._label_id = np.concatenate([self._label_id, np.full(grow, -1, np.int32)])
      self._radius = np.concatenate([self._radius, np.zeros(grow, np.float64)])
      self._joint = np.concatenate([self._joint, np.zeros(grow, np.float64)])
      self._sq = np.concatenate([self._sq, np.zeros(grow, np.float64)])
    for lab in np.unique(label):
      if int(lab) not in self._label_to_id:
        self._label_to_id[int(lab)] = len(self._id_to_label)
        self._id_to_label.append(int(lab))
    sl = slice(self._size, new_size)
    self._label[sl] = label
    self._label_id[sl] = [self._label_to_id[int(l)] for l in label]
    self._radius[sl] = radius
    self._joint[sl] = joint
    self._sq[sl] = sq
    pos = 0
    while pos < n:
      b, off = divmod(self._size + pos, self._chunk_size)
      if b == len(self._blocks):
        self._blocks.append(np.zeros((self._chunk_size, self._dim), self._dtype))
      take = min(self._chunk_size - off, n - pos)
      self._blocks[b][off:off + take] = x[pos:pos + take]
      self._evict(b)
      pos += take
    self._size = new_size

  def _evict(self, c: int) -> None:
    arrays = self._device_cache.pop(c, None)
    if arrays is not None:
      self._cached_bytes -= sum(a.nbytes for a in arrays)
