"""Distances of the storage-update store (``store.py``): float32 device kernels with an error bound, exact float64.

The distances from a block of queries to the whole store are computed on the device by one jitted kernel, chunk
by chunk, as ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b in float32 (matmul at ``Precision.HIGHEST``: TF32 would void
the bound below). The float32 squared distance is within ``tol_rel * (|a|^2 + |b|^2)`` of the exact one, with
the default ``tol_rel = gamma_D + 16 u`` (u = 2^-24, gamma_D = D u / (1 - D u)): Higham's error bound of a
float32 dot product of length D, which holds for every summation order, plus the rounding of the norms and of
the final sums. From it the kernel gets, for every (query, stored) pair, a lower bound ``lo`` and an upper bound
``hi`` on the conservative gap gamma_k = d_k - R_k - SAFETY * (d_k + R_k), and returns, per
query and per stored label, the ``num_candidates`` smallest ``lo`` of the chunk and the smallest ``hi``.
``ball_index.py`` turns these bounds into the pairs it recomputes exactly with ``exact_dist``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SAFETY = 2.0**-32  # relative safety margin of every stored radius (store.py's docstring, "Exactness")
_U32 = 2.0**-24  # unit roundoff of float32
SLACK32 = 2.0**-16  # relative widening of the float32 gap bounds (rounding of sqrt, R in float32, subtraction)
MAX_TOL_REL = 1e30  # stands for "no useful bound" (D u >= 1/2): every pair is a candidate
_EXACT_PIECE_ELEMENTS = 2**22  # float64 values per piece of the exact host distances (32 MiB)


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
  d_lo = jnp.sqrt(jnp.maximum(d2 - tol2, 0.0)) * (1.0 - SLACK32)
  d_hi = jnp.sqrt(jnp.maximum(d2 + tol2, 0.0)) * (1.0 + SLACK32)
  g_lo = d_lo - s_radius[None, :] * (1.0 + SLACK32)  # (B, C)
  g_hi = d_hi - s_radius[None, :] * (1.0 - SLACK32)  # (B, C)
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
    return MAX_TOL_REL
  return du / (1.0 - du) + 16.0 * _U32


def exact_dist(rows: np.ndarray, x64: np.ndarray, take: np.ndarray | None = None) -> np.ndarray:
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
