"""Storage-update certification (METHOD.md section 5): a persistent store of answered queries.

With a sample-specific sigma_x the smoothing distribution depends on the query, so two nearby queries can get
certified l2 balls that overlap with different labels, and then at least one of the two certificates is false
(Sukenik et al., ICML 2022). The defense keeps a store of answered queries (x_k, c_k, R_k) and answers each new
query, in arrival order, so that any two stored balls with different labels stay disjoint (after Alfarra et
al., UAI 2022, memory-based certification of data-dependent smoothing):

1. the query arrives certified as in section 3: (c, R) with R = ``radius_test``; an abstention (c = -1) is
   answered -1 with radius 0 and stores nothing;
2. align: if x lies inside a stored ball of another class (d_k = ||x - x_k||_2 < R_k, or x = x_k, with
   c_k != c), answer c_k with radius R_k - d_k (the largest such over k);
3. trim: otherwise R = min(R, min over stored k with c_k != c of (d_k - R_k)), floored at 0;
4. store (x, answer, R), also when R = 0, and report the margin R / sigma_x.

Answers of radius 0 are stored too: an input already answered with one label must never fall inside a later
ball of another label (that pair would be a contradiction the audit counts, ``audit``).

Invariant: any two stored balls with different labels are disjoint, d(x_i, x_k) >= R_i + R_k, in float64.

Joint radius. A query may also carry the sigma_min of its certificate (``certify(..., sigma_min=...)``); its
answer then gets a joint radius (training and test triggers together, docs/method.md section 3): sigma_min
times the stored margin for its own (possibly trimmed) ball, and for an aligned answer J_k - d_k, with J_k the
joint radius of the ball it took its label from. Why J_k - d_k: ball k certifies every joint perturbation of
its centre of whitened norm below its margin; a perturbation (Delta_train, delta) of x = x_k + e, ||e|| = d_k,
is the perturbation (Delta_train, e + delta) of x_k, whose isotropic norm is at most
sqrt(||Delta_train||^2 + (d_k + ||delta||)^2) <= ||(Delta_train, delta)|| + d_k. Every stored ball keeps its
joint radius, so chains of alignments stay sound.

Exactness. Every decision and every stored radius comes from distances computed exactly in float64 on the host,
``sqrt(sum((x_k - x)^2))`` of the stored values (queries are rounded to the store's ``dtype`` on arrival, and all
geometry is that of the rounded points). Every stored radius is also lowered by a relative safety margin
``SAFETY`` = 2^-32 (about 2.3e-10): the trimmed radius is min over k of (d_k - R_k - SAFETY * (d_k + R_k)) and
the aligned one is R_k - d_k - SAFETY * (R_k + d_k), so the invariant holds exactly (no tolerance) when it is
checked with distances summed in any other order. An aligned ball lies inside ball k, hence (triangle
inequality) it is disjoint from every ball that ball k is disjoint from; it is nevertheless trimmed once more
against every ball whose label differs from the answer, so that rounding can never break the invariant.

Device kernel and the recompute rule. The distances from a block of queries to the whole store are computed on
the device by one jitted kernel, chunk by chunk, as ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b in float32 (matmul at
``Precision.HIGHEST``: TF32 would void the bound below). The float32 squared distance is within
``tol_rel * (|a|^2 + |b|^2)`` of the exact one, with the default ``tol_rel = gamma_D + 16 u`` (u = 2^-24,
gamma_D = D u / (1 - D u)): Higham's error bound of a float32 dot product of length D, which holds for every
summation order, plus the rounding of the norms and of the final sums. From it the kernel gets, for every
(query, stored) pair, a lower bound ``lo`` and an upper bound ``hi`` on the conservative gap
gamma_k = d_k - R_k - SAFETY * (d_k + R_k), and returns, per query and per stored label, the
``num_candidates`` smallest ``lo`` of the chunk and the smallest ``hi``. For a query with radius R and a set S of
conflicting labels, a pair is recomputed exactly in float64 when

    lo_k <= theta = min(R, min over k in S of hi_k)

and a whole chunk (that label's rows) is recomputed when its ``num_candidates``-th smallest ``lo`` is <= theta
(the candidates did not fit). Every pair left out has gamma_k >= theta: it can neither contain x nor trim R, so
the exact minimum over the recomputed pairs is the exact minimum over the store. Near-ties and balls within
about R of the query are recomputed; distant balls never are. With large inputs (D = 150,528 at 224 pixels,
gamma_D ~ 0.9%) the worst-case bound is loose but distant points still fall out; ``tol_rel`` can be lowered
(e.g. to ``64 * sqrt(D) * u``, a probabilistic bound) to recompute fewer pairs at the price of rigour.

Within a block of queries later queries see the earlier ones of the same block that got stored: the kernel
also gives the (block x block) float32 distances, the same rule picks the pairs to recompute, and the
sequential align/trim logic runs on the host in numpy, one query at a time, vectorised over the store.

Memory. The host keeps the inputs as a list of blocks of ``chunk_size`` rows in ``dtype`` (one block per device
chunk, the last one partly filled; a new block is allocated when the last fills, so growth never copies the
inputs), and labels, radii and squared norms in 1-D arrays that double. The device holds the query block, the
kernel's small outputs, at most two streamed chunks (one being computed, one being fetched) and the chunks
kept in a device cache of at most ``device_cache_bytes`` (chunks whose rows change are evicted). With
``device_cache_bytes=0`` a store of any size needs device memory for two chunks plus the block only: a store
of 100,000 inputs of 224 x 224 x 3 floats (60 GB on the host) runs with ``chunk_size=512`` in about 0.6 GB.
The kernel compiles once per (query bucket, chunk_size, D, label bucket) shape; query blocks are padded to a
power of two between 8 and ``query_batch``.

Host-side code: the exact float64 geometry and the sequential logic are deliberately numpy, on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from certssb_jax import rundir

logger = logging.getLogger(__name__)

SAFETY = 2.0**-32  # relative safety margin of every stored radius (see the module docstring)
_U32 = 2.0**-24  # unit roundoff of float32
_SLACK32 = 2.0**-16  # relative widening of the float32 gap bounds (rounding of sqrt, R in float32, subtraction)
_MAX_TOL_REL = 1e30  # stands for "no useful bound" (D u >= 1/2): every pair is a candidate
_FORMAT_VERSION = 2
_MIN_BUCKET = 8
_EXACT_PIECE_ELEMENTS = 2**22  # float64 values per piece of the exact host distances (32 MiB)


@dataclasses.dataclass(frozen=True)
class StoreAnswer:
  """Answers to a stream of queries (arrays of shape (N,), in query order).

  Attributes:
    pred: int64 answered label, -1 for an abstention.
    radius_stored: float64 l2 radius in the test input after align/trim (0 for an abstention).
    radius_joint: float64 joint l2 radius of the answer (module docstring, "Joint radius"); equals
      ``radius_stored`` when no ``sigma_min`` was given.
    margin_stored: float64 ``radius_stored / sigma_x``: the margin in sigma units, so the joint radius of
      section 3 shrinks with it.
    aligned: bool, the query lay inside a stored ball of another class and took its label (step 2).
    trimmed: bool, the radius was strictly reduced by step 3 (never set for aligned answers).
    stored: bool, the answer was inserted into the store (every answer that is not an abstention).
    align_source: int64 index in the store of the ball an aligned answer took its label from, else -1.
  """

  pred: np.ndarray
  radius_stored: np.ndarray
  radius_joint: np.ndarray
  margin_stored: np.ndarray
  aligned: np.ndarray
  trimmed: np.ndarray
  stored: np.ndarray
  align_source: np.ndarray


def _sq_dist(q: jax.Array, q_sq: jax.Array, s: jax.Array, s_sq: jax.Array) -> jax.Array:
  """Float32 squared distances |a|^2 + |b|^2 - 2 a.b. Returns (B, C)."""
  dot = jnp.dot(q, s.T, precision=jax.lax.Precision.HIGHEST)  # (B, C); HIGHEST: no TF32 / bf16 passes
  return q_sq[:, None] + s_sq[None, :] - 2.0 * dot


@jax.jit
def pair_sq_dist_kernel(q: jax.Array, q_sq: jax.Array, s: jax.Array, s_sq: jax.Array) -> jax.Array:
  """Float32 squared distances between two sets of rows.

  Args:
    q: (B, D) float32 rows.
    q_sq: (B,) float32 squared norms of ``q`` (rounded from float64).
    s: (C, D) float32 rows.
    s_sq: (C,) float32 squared norms of ``s``.

  Returns:
    (B, C) float32 squared distances, within ``tol_rel * (q_sq + s_sq)`` of the exact ones.
  """
  return _sq_dist(q, q_sq, s, s_sq)


@functools.partial(jax.jit, static_argnames=("num_labels", "num_candidates"))
def chunk_candidates_kernel(q: jax.Array, q_sq: jax.Array, s: jax.Array, s_sq: jax.Array, s_radius: jax.Array,
                            s_label: jax.Array, tol_rel: jax.Array, *, num_labels: int,
                            num_candidates: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bounds on the gaps d - R between a query block and one store chunk, reduced per stored label.

  The gap of a (query, stored k) pair is gamma_k = d_k - R_k - SAFETY * (d_k + R_k); ``lo`` <= gamma_k <= ``hi``
  whenever the float32 squared distance is within ``tol_rel * (|q|^2 + |s_k|^2)`` of the exact one.

  Args:
    q: (B, D) float32 query block (padded rows are ignored by the host).
    q_sq: (B,) float32 squared norms of the queries.
    s: (C, D) float32 store chunk (padded rows carry label -1).
    s_sq: (C,) float32 squared norms of the chunk rows.
    s_radius: (C,) float32 stored radii.
    s_label: (C,) int32 dense label ids of the chunk rows, -1 for padding.
    tol_rel: () float32 relative error bound of the float32 squared distances.
    num_labels: static number of label ids (a bucket, >= the number of labels in the store).
    num_candidates: static number of smallest lower bounds kept per (query, label).

  Returns:
    lo (B, L, k) float32, the k smallest lower bounds per label (+inf where fewer rows),
    idx (B, L, k) int32 their row indices in the chunk,
    hi_min (B, L) float32, the smallest upper bound per label (+inf where none).
  """
  d2 = _sq_dist(q, q_sq, s, s_sq)  # (B, C)
  tol2 = tol_rel * (q_sq[:, None] + s_sq[None, :])  # (B, C)
  d_lo = jnp.sqrt(jnp.maximum(d2 - tol2, 0.0)) * (1.0 - _SLACK32)
  d_hi = jnp.sqrt(jnp.maximum(d2 + tol2, 0.0)) * (1.0 + _SLACK32)
  g_lo = d_lo - s_radius[None, :] * (1.0 + _SLACK32)  # (B, C)
  g_hi = d_hi - s_radius[None, :] * (1.0 - _SLACK32)  # (B, C)
  member = s_label[None, :] == jnp.arange(num_labels, dtype=s_label.dtype)[:, None]  # (L, C)
  lo = jnp.where(member[None], g_lo[:, None, :], jnp.inf)  # (B, L, C)
  hi_min = jnp.min(jnp.where(member[None], g_hi[:, None, :], jnp.inf), axis=-1)  # (B, L)
  neg_lo, idx = jax.lax.top_k(-lo, num_candidates)  # (B, L, k)
  return -neg_lo, idx.astype(jnp.int32), hi_min


def default_tol_rel(dim: int) -> float:
  """Relative error bound of the float32 squared distances in dimension ``dim`` (see the module docstring).

  Higham's bound |fl(a.b) - a.b| <= gamma_D |a|.|b| <= gamma_D (|a|^2 + |b|^2) / 2 holds for every summation
  order; 16 u more covers the rounding of the norms, of the final sums and of float64 inputs to float32.
  """
  du = dim * _U32
  if du >= 0.5:
    return _MAX_TOL_REL
  return du / (1.0 - du) + 16.0 * _U32


def _exact_dist(rows: np.ndarray, x64: np.ndarray, take: np.ndarray | None = None) -> np.ndarray:
  """Exact float64 l2 distances (no cancellation) from ``x64`` (D,) to ``rows`` (or ``rows[take]``).

  Works in pieces of at most ``_EXACT_PIECE_ELEMENTS`` float64 values, so host memory stays bounded even when
  a whole chunk of large inputs is recomputed. Each row's sum is a numpy pairwise sum over that row alone,
  so a distance does not depend on which other rows are computed with it.

  Args:
    rows: (m, D) stored rows (any float dtype).
    x64: (D,) float64 query.
    take: optional (n,) row indices into ``rows``.

  Returns:
    (n,) float64 distances.
  """
  n = rows.shape[0] if take is None else take.shape[0]
  step = max(1, _EXACT_PIECE_ELEMENTS // max(1, x64.shape[0]))
  out = np.empty(n, np.float64)
  for start in range(0, n, step):
    sl = slice(start, min(n, start + step))
    piece = rows[sl] if take is None else rows[take[sl]]
    diff = piece.astype(np.float64) - x64[None, :]  # (p, D)
    out[sl] = np.sqrt(np.sum(diff * diff, axis=1))
  return out


def _bucket(n: int, cap: int) -> int:
  """Query block size padded to a power of two in [8, cap] (cap itself if smaller)."""
  return min(cap, max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


@dataclasses.dataclass
class _StoreBounds:
  """Kernel outputs for one query block against the whole store, chunks concatenated on the last axis."""

  lo: np.ndarray  # (n, L, num_chunks * k) float32 lower bounds on the gaps
  index: np.ndarray  # (n, L, num_chunks * k) int64 store indices
  hi_min: np.ndarray  # (n, L) float32 smallest upper bound per label
  kth: np.ndarray  # (n, L, num_chunks) float32 k-th smallest lower bound per chunk


@dataclasses.dataclass
class _Conflict:
  """The nearest conflicting ball of a query, exactly in float64."""

  gamma_min: float  # min over the conflicting balls of d - R - SAFETY * (d + R)
  g: float  # d - R of the ball with the smallest d - R (ties: earliest stored)
  d: float  # its distance to the query
  radius: float  # its radius
  joint: float  # its joint radius
  label: int  # its label
  index: int  # its index in the store (block rows: the index they get when appended)


class _Block:
  """Host state of one query block during the sequential logic."""

  def __init__(self, x: np.ndarray, sq: np.ndarray, d2: np.ndarray | None, tol_rel: float, base: int):
    n = x.shape[0]
    self.x64 = x.astype(np.float64)  # (n, D)
    self.d_lo = self.d_hi = None  # (n, n) bounds on the block's distances; None when one query is active
    if d2 is not None:
      tol2 = tol_rel * (sq[:, None] + sq[None, :])  # (n, n)
      self.d_lo = np.sqrt(np.maximum(d2 - tol2, 0.0)) * (1.0 - _SLACK32)  # (n, n)
      self.d_hi = np.sqrt(np.maximum(d2 + tol2, 0.0)) * (1.0 + _SLACK32)  # (n, n)
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


class CertifiedStore:
  """A persistent store of answered queries (x_k, c_k, R_k) with storage-update certification (section 5).

  Queries are answered in arrival order across calls: the store persists, so a stream can continue, and
  ``save``/``load`` continue it in another process with identical answers.
  """

  def __init__(self, input_shape: Sequence[int], *, chunk_size: int = 4096, dtype: Any = np.float32,
               query_batch: int = 256, num_candidates: int = 8, tol_rel: float | None = None,
               device_cache_bytes: int = 2**30):
    """Creates an empty store.

    Args:
      input_shape: shape of one input, e.g. (28, 28, 1).
      chunk_size: rows of the store per device chunk (and per host block); fixed so the kernel compiles once.
      dtype: float32 or float64, the precision of the stored inputs (queries are rounded to it on arrival).
      query_batch: largest query block sent to the device at once (a power of two is best).
      num_candidates: lower bounds kept per (query, label, chunk); a chunk whose candidates do not fit is
        recomputed exactly on the host, so this only trades device output for host work.
      tol_rel: relative error bound of the float32 squared distances; default ``default_tol_rel(D)``.
      device_cache_bytes: device memory for chunks kept between calls; 0 streams every chunk every call.
    """
    self._input_shape = tuple(int(s) for s in input_shape)
    if any(s <= 0 for s in self._input_shape):
      raise ValueError(f"input_shape must have positive entries, got {self._input_shape}")
    if int(chunk_size) <= 0:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if int(query_batch) <= 0:
      raise ValueError(f"query_batch must be positive, got {query_batch}")
    if int(num_candidates) <= 0:
      raise ValueError(f"num_candidates must be positive, got {num_candidates}")
    self._dtype = np.dtype(dtype)
    if self._dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
      raise ValueError(f"dtype must be float32 or float64, got {self._dtype}")
    if device_cache_bytes < 0:
      raise ValueError(f"device_cache_bytes must be >= 0, got {device_cache_bytes}")
    self._dim = int(math.prod(self._input_shape))
    self._chunk_size = int(chunk_size)
    self._query_batch = int(query_batch)
    self._num_candidates = min(int(num_candidates), self._chunk_size)
    self._tol_rel = default_tol_rel(self._dim) if tol_rel is None else float(tol_rel)
    if not self._tol_rel >= 0:
      raise ValueError(f"tol_rel must be >= 0, got {tol_rel}")
    if self._tol_rel >= _MAX_TOL_REL:
      logger.warning("dimension %d too large for a float32 error bound: every pair is recomputed exactly",
                     self._dim)
    self._device_cache_bytes = int(device_cache_bytes)
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
    self._counters = dict(num_queries=0, num_abstained=0, num_aligned=0, num_trimmed=0, num_stored=0,
                          num_exact_pairs=0, num_chunk_fallbacks=0)
    self._seconds = dict(device=0.0, host=0.0)

  # ------------------------------------------------------------------ introspection

  def __len__(self) -> int:
    return self._size

  @property
  def input_shape(self) -> tuple[int, ...]:
    return self._input_shape

  @property
  def chunk_size(self) -> int:
    return self._chunk_size

  @property
  def tol_rel(self) -> float:
    return self._tol_rel

  def stored_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of the stored (x (n, *input_shape), label (n,) int64, radius (n,) float64), in insertion order."""
    if self._size == 0:
      x = np.zeros((0, self._dim), self._dtype)
    else:
      x = np.concatenate(self._blocks, axis=0)[:self._size]
    return (x.reshape((self._size,) + self._input_shape).copy(), self._label[:self._size].copy(),
            self._radius[:self._size].copy())

  def stored_joint_radii(self) -> np.ndarray:
    """Copy of the stored joint radii (n,) float64, in insertion order."""
    return self._joint[:self._size].copy()

  def stats(self) -> dict[str, Any]:
    """Store size, per-label counts and cumulative counters.

    Returns:
      dict with ``size``, ``label_counts`` ({label: count} of stored balls), ``num_queries``,
      ``num_abstained``, ``num_aligned``, ``num_trimmed``, ``num_stored`` (insertions by ``certify``),
      ``num_exact_pairs`` (float64 distances recomputed), ``num_chunk_fallbacks`` (chunks recomputed because
      their candidates did not fit), ``seconds_device`` (kernel dispatch, transfers and waits) and
      ``seconds_host`` (host logic).
    """
    labels, counts = np.unique(self._label[:self._size], return_counts=True)
    return dict(size=self._size, label_counts={int(l): int(c) for l, c in zip(labels, counts)},
                **self._counters, seconds_device=self._seconds["device"], seconds_host=self._seconds["host"])

  # ------------------------------------------------------------------ certification

  def certify(self, x: np.ndarray, pred: np.ndarray, radius_test: np.ndarray, sigma_x: float | np.ndarray,
              sigma_min: float | np.ndarray | None = None) -> StoreAnswer:
    """Answers queries in order with storage-update certification (docs/method.md section 5).

    Args:
      x: (N, *input_shape) queries, on the scale the radii are measured in (pixels in [0, 1]).
      pred: (N,) integer certified labels c of section 3, -1 for an abstention.
      radius_test: (N,) certified radii R = sigma_x * margin in the test input (ignored for abstentions).
      sigma_x: scalar or (N,) noise level of each query, > 0; the stored margin is radius / sigma_x.
      sigma_min: scalar or (N,) min(sigma_x, min_j sigma_j) of each certificate, for the joint radius; None:
        sigma_x (the joint radius is then the test-input radius).

    Returns:
      A ``StoreAnswer`` of arrays (N,). The store is updated in place.
    """
    x, pred, radius_test, sigma_x = self._validate(x, pred, radius_test, sigma_x)
    n = pred.shape[0]
    scale = np.ones(n) if sigma_min is None else np.broadcast_to(np.asarray(sigma_min, np.float64), (n,)) / sigma_x
    if not (np.all(scale > 0) and np.all(scale <= 1)):
      raise ValueError("sigma_min must lie in (0, sigma_x]")
    out_pred = np.full(n, -1, np.int64)
    out_radius = np.zeros(n, np.float64)
    out_joint = np.zeros(n, np.float64)
    aligned = np.zeros(n, bool)
    trimmed = np.zeros(n, bool)
    stored = np.zeros(n, bool)
    source = np.full(n, -1, np.int64)
    for start in range(0, n, self._query_batch):
      sl = slice(start, min(n, start + self._query_batch))
      self._certify_block(x[sl], pred[sl], radius_test[sl], scale[sl], out_pred[sl], out_radius[sl],
                          out_joint[sl], aligned[sl], trimmed[sl], stored[sl], source[sl])
    self._counters["num_queries"] += n
    self._counters["num_abstained"] += int(np.sum(pred < 0))
    self._counters["num_aligned"] += int(aligned.sum())
    self._counters["num_trimmed"] += int(trimmed.sum())
    self._counters["num_stored"] += int(stored.sum())
    return StoreAnswer(pred=out_pred, radius_stored=out_radius, radius_joint=out_joint,
                       margin_stored=out_radius / sigma_x,
                       aligned=aligned, trimmed=trimmed, stored=stored, align_source=source)

  def _validate(self, x, pred, radius_test, sigma_x) -> tuple[np.ndarray, ...]:
    x = np.asarray(x)
    if x.ndim != 1 + len(self._input_shape) or tuple(x.shape[1:]) != self._input_shape:
      raise ValueError(f"x has shape {x.shape}, expected (N, *{self._input_shape})")
    n = x.shape[0]
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"x must be numeric, got dtype {x.dtype}")
    x = np.ascontiguousarray(x.reshape(n, self._dim), dtype=self._dtype)
    if np.isnan(x).any():
      raise ValueError("x contains NaN")
    if not np.isfinite(x).all():
      raise ValueError("x contains inf (or overflows the store dtype)")
    pred = np.asarray(pred)
    if pred.size == 0:
      pred = pred.astype(np.int64)
    if pred.shape != (n,):
      raise ValueError(f"pred has shape {pred.shape}, expected ({n},)")
    if not (np.issubdtype(pred.dtype, np.integer) or pred.dtype == bool):
      raise ValueError(f"pred must be integer labels (-1 for abstain), got dtype {pred.dtype}")
    pred = pred.astype(np.int64)
    if (pred < -1).any():
      raise ValueError(f"pred must be >= -1 (-1 = abstain), got {pred.min()}")
    radius_test = np.asarray(radius_test, dtype=np.float64)
    if radius_test.shape != (n,):
      raise ValueError(f"radius_test has shape {radius_test.shape}, expected ({n},)")
    if np.isnan(radius_test).any():
      raise ValueError("radius_test contains NaN")
    if (radius_test < 0).any():
      raise ValueError(f"radius_test must be >= 0 (negative radius {radius_test.min()})")
    if not np.isfinite(radius_test).all():
      raise ValueError("radius_test must be finite")
    sigma_x = np.asarray(sigma_x, dtype=np.float64)
    if sigma_x.shape not in ((), (n,)):
      raise ValueError(f"sigma_x has shape {sigma_x.shape}, expected a scalar or ({n},)")
    if np.isnan(sigma_x).any():
      raise ValueError("sigma_x contains NaN")
    if (sigma_x <= 0).any() or not np.isfinite(sigma_x).all():
      raise ValueError("sigma_x must be finite and > 0")
    return x, pred, radius_test, np.broadcast_to(sigma_x, (n,))

  def _certify_block(self, x: np.ndarray, pred: np.ndarray, radius_test: np.ndarray, scale: np.ndarray,
                     out_pred: np.ndarray, out_radius: np.ndarray, out_joint: np.ndarray, aligned: np.ndarray,
                     trimmed: np.ndarray, stored: np.ndarray, source: np.ndarray) -> None:
    """Answers one block of at most ``query_batch`` queries; writes into the output views."""
    n = pred.shape[0]
    active = pred >= 0
    if not active.any():
      return
    t0 = time.perf_counter()
    x64 = x.astype(np.float64)  # (n, D)
    sq = np.sum(x64 * x64, axis=1)  # (n,) exact squared norms of the (rounded) queries
    bucket = _bucket(n, self._query_batch)
    q = np.zeros((bucket, self._dim), np.float32)
    q[:n] = x
    q_sq = np.zeros(bucket, np.float32)
    q_sq[:n] = sq
    t1 = time.perf_counter()
    q_dev, q_sq_dev = jax.device_put(q), jax.device_put(q_sq)
    bounds = self._store_bounds(q_dev, q_sq_dev, n) if self._size else None
    d2 = None
    if active.sum() > 1:
      d2 = np.asarray(pair_sq_dist_kernel(q_dev, q_sq_dev, q_dev, q_sq_dev))[:n, :n].astype(np.float64)
    t2 = time.perf_counter()
    block = _Block(x, sq, d2, self._tol_rel, self._size)
    for i in np.nonzero(active)[0]:
      c, radius = int(pred[i]), float(radius_test[i])
      conflict = self._nearest_conflict(i, c, radius, x64[i], bounds, block)
      if conflict is not None and (conflict.g < 0 or conflict.d == 0):  # step 2: inside a ball of another class
        answer = conflict.label
        radius = conflict.radius - conflict.d - SAFETY * (conflict.radius + conflict.d)
        joint = conflict.joint - conflict.d - SAFETY * (conflict.joint + conflict.d)
        aligned[i] = True
        source[i] = conflict.index
        if radius > 0:  # keep the invariant under rounding: trim against every other label once more
          retrim = self._nearest_conflict(i, answer, radius, x64[i], bounds, block)
          if retrim is not None:
            radius = min(radius, retrim.gamma_min)
        joint = min(joint, radius)
      else:  # step 3: trim
        answer = c
        if conflict is not None and conflict.gamma_min < radius:
          radius = conflict.gamma_min
          trimmed[i] = True
        joint = max(radius, 0.0) * float(scale[i])
      radius, joint = max(radius, 0.0), max(joint, 0.0)
      out_pred[i], out_radius[i], out_joint[i] = answer, radius, joint
      stored[i] = True  # step 4: store every answer, radius 0 included
      block.add(i, answer, radius, joint)
    rows = block.rows[:block.count]
    if rows.size:
      self._append(x[rows], block.label[:block.count], block.radius[:block.count], block.joint[:block.count],
                   sq[rows])
    t3 = time.perf_counter()
    self._seconds["device"] += t2 - t1
    self._seconds["host"] += (t1 - t0) + (t3 - t2)

  def _store_bounds(self, q_dev: jax.Array, q_sq_dev: jax.Array, n: int) -> _StoreBounds:
    """Runs the kernel over every chunk of the store, at most two chunks in flight; returns host arrays."""
    num_labels = max(2, 1 << (len(self._id_to_label) - 1).bit_length())
    tol = jnp.float32(min(self._tol_rel, _MAX_TOL_REL))
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
      out = chunk_candidates_kernel(q_dev, q_sq_dev, *self._device_chunk(c), tol, num_labels=num_labels,
                                    num_candidates=k)
      if pending is not None:
        fetch(*pending)
      pending = (c, out)
    fetch(*pending)
    lo_all = np.concatenate(lo, axis=-1)  # (n, L, num_chunks * k)
    return _StoreBounds(lo=lo_all, index=np.concatenate(idx, axis=-1), hi_min=np.min(np.stack(hi), axis=0),
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

  def _nearest_conflict(self, i: int, exclude: int, cap: float, x64: np.ndarray, bounds: _StoreBounds | None,
                        block: _Block) -> _Conflict | None:
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
      g_hi = block.d_hi[i, b_rows] - b_radius * (1.0 - _SLACK32)
      theta = min(theta, float(g_hi.min()))
      b_sel = block.d_lo[i, b_rows] - b_radius * (1.0 + _SLACK32) <= theta
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
    d = np.concatenate([self._exact_store_dist(s_index, x64), _exact_dist(block.x64, x64, b_rows)])
    radius = np.concatenate([self._radius[s_index], b_radius])
    joint = np.concatenate([self._joint[s_index], b_joint])
    label = np.concatenate([self._label[s_index], b_label])
    index = np.concatenate([s_index, b_index])
    self._counters["num_exact_pairs"] += int(d.size)
    g = d - radius
    gamma = g - SAFETY * (d + radius)
    j = int(np.argmin(g))  # first minimum: the earliest stored ball
    return _Conflict(gamma_min=float(gamma.min()), g=float(g[j]), d=float(d[j]), radius=float(radius[j]),
                     joint=float(joint[j]), label=int(label[j]), index=int(index[j]))

  def _exact_store_dist(self, index: np.ndarray, x64: np.ndarray) -> np.ndarray:
    """Exact float64 distances from ``x64`` (D,) to the stored rows ``index`` (n,). Returns (n,)."""
    out = np.empty(index.shape[0], np.float64)
    blk, off = np.divmod(index, self._chunk_size)
    for b in np.unique(blk):
      sel = blk == b
      out[sel] = _exact_dist(self._blocks[b], x64, off[sel])
    return out

  # ------------------------------------------------------------------ growth

  def _append(self, x: np.ndarray, label: np.ndarray, radius: np.ndarray, joint: np.ndarray,
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

  # ------------------------------------------------------------------ persistence

  @classmethod
  def from_arrays(cls, x: np.ndarray, label: np.ndarray, radius: np.ndarray, joint: np.ndarray | None = None,
                  **kwargs: Any) -> CertifiedStore:
    """A store holding the given balls, trusted as they are (the invariant is not checked: that costs O(n^2)).

    Args:
      x: (n, *input_shape) stored inputs.
      label: (n,) int labels >= 0.
      radius: (n,) radii >= 0.
      joint: (n,) joint radii in [0, radius]; None: the radii.
      **kwargs: constructor options (``chunk_size``, ``dtype``, ...).

    Returns:
      The store.
    """
    x = np.asarray(x)
    store = cls(x.shape[1:], **kwargs)
    n = x.shape[0]
    label = np.asarray(label)
    radius = np.asarray(radius, np.float64)
    joint = radius if joint is None else np.asarray(joint, np.float64)
    if label.shape != (n,) or radius.shape != (n,) or joint.shape != (n,):
      raise ValueError(f"label {label.shape}, radius {radius.shape} and joint {joint.shape} must have shape ({n},)")
    if n and not np.issubdtype(label.dtype, np.integer):
      raise ValueError(f"label must be integers, got dtype {label.dtype}")
    if (label < 0).any():
      raise ValueError("stored labels must be >= 0")
    if np.isnan(radius).any() or not np.isfinite(radius).all() or (radius < 0).any():
      raise ValueError("stored radii must be finite and >= 0")
    if np.isnan(joint).any() or (joint < 0).any() or (joint > radius).any():
      raise ValueError("stored joint radii must lie in [0, radius]")
    x = x.reshape(n, store._dim)
    label = label.astype(np.int64)
    for start in range(0, n, store._chunk_size):  # piecewise: temporaries of one chunk only
      sl = slice(start, min(n, start + store._chunk_size))
      piece = np.asarray(x[sl], dtype=store._dtype)
      if not np.isfinite(piece).all():
        raise ValueError("x contains NaN or inf")
      piece64 = piece.astype(np.float64)
      store._append(piece, label[sl], radius[sl], joint[sl], np.sum(piece64 * piece64, axis=1))
    return store

  def save(self, path: str | os.PathLike) -> None:
    """Writes the store to ``path`` (.npz: x, label, radius, joint, meta) atomically."""
    path = os.fspath(path)
    x, label, radius = self.stored_arrays()
    meta = dict(format_version=_FORMAT_VERSION, input_shape=list(self._input_shape), dtype=self._dtype.name,
                chunk_size=self._chunk_size, counters=self._counters)
    rundir.save_npz(path, x=x, label=label, radius=radius, joint=self.stored_joint_radii(),
                meta=np.asarray(json.dumps(meta)))

  @classmethod
  def load(cls, path: str | os.PathLike, **kwargs: Any) -> CertifiedStore:
    """Reads a store written by ``save``; the stream continues with identical answers.

    Args:
      path: the .npz file.
      **kwargs: constructor options overriding the saved ones (``chunk_size``, ``device_cache_bytes``, ...).

    Returns:
      The store, with its cumulative counters.
    """
    with np.load(os.fspath(path), allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported store format {meta.get('format_version')}")
      x, label, radius, joint = z["x"], z["label"], z["radius"], z["joint"]
    options = dict(chunk_size=meta["chunk_size"], dtype=meta["dtype"])
    options.update(kwargs)
    if tuple(x.shape[1:]) != tuple(meta["input_shape"]):
      raise ValueError(f"{path}: x has shape {x.shape}, metadata says input_shape {meta['input_shape']}")
    store = cls.from_arrays(x.reshape((-1,) + tuple(meta["input_shape"])), label, radius, joint, **options)
    store._counters.update(meta["counters"])
    return store


# ---------------------------------------------------------------------------------------------- audit


def audit(x: np.ndarray, pred: np.ndarray, radius: np.ndarray, *, max_pairs: int = 100) -> tuple[int, np.ndarray]:
  """Counts the pairs of answers that contradict each other, exactly in float64.

  Two answers contradict each other when both are labels (not abstentions), the labels differ and their
  certified balls meet, d(x_i, x_k) < R_i + R_k: some input (possibly one of the two queries) is then certified
  with both labels. Answers of the storage-update step never contradict each other (module docstring); the
  certificates before it can.

  Distances are screened with a float64 Gram matrix whose error is bounded (Higham, as in
  ``default_tol_rel``) and every pair within that bound of the threshold is recomputed exactly.

  Args:
    x: (N, *input_shape) the answered inputs.
    pred: (N,) labels, -1 for an abstention.
    radius: (N,) certified radii (>= 0) in the input.
    max_pairs: at most this many contradicting pairs are returned (the count is always complete).

  Returns:
    (number of contradicting pairs, (min(count, max_pairs), 2) int64 indices i < k of some of them).
  """
  pred = np.asarray(pred)
  radius = np.asarray(radius, np.float64)
  rows = np.flatnonzero(pred >= 0)
  n = rows.size
  if n < 2:
    return 0, np.zeros((0, 2), np.int64)
  flat = np.asarray(x).reshape(len(pred), -1)
  dim = flat.shape[1]
  lab, rad = pred[rows], radius[rows]
  sq = np.einsum("ij,ij->i", flat[rows].astype(np.float64), flat[rows].astype(np.float64))
  tol_rel = (dim + 8) * 2.0**-52
  step = max(1, 2**25 // dim)  # rows per block: at most 256 MiB of float64 per operand
  count, found = 0, []
  for a in range(0, n, step):
    xa = flat[rows[a:a + step]].astype(np.float64)
    for b in range(a, n, step):
      xb = xa if b == a else flat[rows[b:b + step]].astype(np.float64)
      d2 = sq[a:a + step, None] + sq[None, b:b + step] - 2.0 * (xa @ xb.T)  # (A, B)
      reach = rad[a:a + step, None] + rad[None, b:b + step]
      maybe = (lab[a:a + step, None] != lab[None, b:b + step]) & (reach > 0)
      maybe &= d2 - tol_rel * (sq[a:a + step, None] + sq[None, b:b + step]) < reach * reach
      if b == a:
        maybe = np.triu(maybe, k=1)
      for i, k in zip(*np.nonzero(maybe)):
        d = _exact_dist(flat[rows[b + k]][None], flat[rows[a + i]].astype(np.float64))[0]
        if d < rad[a + i] + rad[b + k]:
          count += 1
          if len(found) < max_pairs:
            found.append((rows[a + i], rows[b + k]))
  return count, np.asarray(found, np.int64).reshape(-1, 2)
