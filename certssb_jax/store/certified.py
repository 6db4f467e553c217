"""Storage-update certification (docs/method.md section 5): a persistent store of answered queries.

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
SAFETY = 2^-32 (``distances.SAFETY``, about 2.3e-10): the trimmed radius is min over k of
(d_k - R_k - SAFETY * (d_k + R_k)) and the aligned one is R_k - d_k - SAFETY * (R_k + d_k), so the invariant
holds exactly (no tolerance) when it is checked with distances summed in any other order. An aligned ball lies
inside ball k, hence (triangle inequality) it is disjoint from every ball that ball k is disjoint from; it is
nevertheless trimmed once more against every ball whose label differs from the answer, so that rounding can
never break the invariant.

Where the distances come from: ``ball_index.py`` holds the stored balls (host blocks, device chunks, memory)
and finds the nearest conflicting ball, recomputing exactly only the pairs that the float32 device kernels of
``distances.py`` cannot rule out (the kernels' error bound is documented in distances.py, the recompute rule in
ball_index.py). Within a block of queries later queries see the earlier ones of the same block that got
stored; the sequential align/trim logic runs on the host in numpy, one query at a time, vectorised over the
store.

Host-side code: the exact float64 geometry and the sequential logic are deliberately numpy, on the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np

from certssb_jax import files
from certssb_jax.store import ball_index, distances

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 2


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
      tol_rel: relative error bound of the float32 squared distances; default ``distances.default_tol_rel(D)``.
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
    self._tol_rel = distances.default_tol_rel(self._dim) if tol_rel is None else float(tol_rel)
    if not self._tol_rel >= 0:
      raise ValueError(f"tol_rel must be >= 0, got {tol_rel}")
    if self._tol_rel >= distances.MAX_TOL_REL:
      logger.warning("dimension %d too large for a float32 error bound: every pair is recomputed exactly",
                     self._dim)
    self._counters = dict(num_queries=0, num_abstained=0, num_aligned=0, num_trimmed=0, num_stored=0,
                          num_exact_pairs=0, num_chunk_fallbacks=0)
    self._seconds = dict(device=0.0, host=0.0)
    # The index adds its search work (num_exact_pairs, num_chunk_fallbacks) to these same counters.
    self._index = ball_index.BallIndex(
        self._dim, chunk_size=self._chunk_size, dtype=self._dtype,
        num_candidates=min(int(num_candidates), self._chunk_size), tol_rel=self._tol_rel,
        device_cache_bytes=int(device_cache_bytes), counters=self._counters)

  # ------------------------------------------------------------------ introspection

  def __len__(self) -> int:
    return len(self._index)

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
    x = self._index.inputs()
    return (x.reshape((len(self._index),) + self._input_shape).copy(), self._index.label.copy(),
            self._index.radius.copy())

  def stored_joint_radii(self) -> np.ndarray:
    """Copy of the stored joint radii (n,) float64, in insertion order."""
    return self._index.joint.copy()

  def stats(self) -> dict[str, Any]:
    """Store size, per-label counts and cumulative counters.

    Returns:
      dict with ``size``, ``label_counts`` ({label: count} of stored balls), ``num_queries``,
      ``num_abstained``, ``num_aligned``, ``num_trimmed``, ``num_stored`` (insertions by ``certify``),
      ``num_exact_pairs`` (float64 distances recomputed), ``num_chunk_fallbacks`` (chunks recomputed because
      their candidates did not fit), ``seconds_device`` (kernel dispatch, transfers and waits) and
      ``seconds_host`` (host logic).
    """
    labels, counts = np.unique(self._index.label, return_counts=True)
    return dict(size=len(self._index), label_counts={int(l): int(c) for l, c in zip(labels, counts)},
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
      sigma_min: scalar or (N,) min(sigma_x, min_j sigma_j) of each certificate, for the joint radius (0: the
        certificate has no joint radius); None: sigma_x (the joint radius is then the test-input radius).

    Returns:
      A ``StoreAnswer`` of arrays (N,). The store is updated in place.
    """
    x, pred, radius_test, sigma_x = self._validate(x, pred, radius_test, sigma_x)
    n = pred.shape[0]
    scale = np.ones(n) if sigma_min is None else np.broadcast_to(np.asarray(sigma_min, np.float64), (n,)) / sigma_x
    if not (np.all(scale >= 0) and np.all(scale <= 1)):  # 0: the answer certifies no joint radius
      raise ValueError("sigma_min must lie in [0, sigma_x]")
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
    q, q_sq = ball_index.pad_queries(x, sq, self._query_batch)
    t1 = time.perf_counter()
    bounds, d2 = self._index.device_bounds(q, q_sq, n, pairwise=active.sum() > 1)
    t2 = time.perf_counter()
    block = ball_index.QueryBlock(x, sq, d2, self._tol_rel, len(self._index))
    for i in np.nonzero(active)[0]:
      answer, radius, joint, src, cut = self._answer(i, int(pred[i]), float(radius_test[i]), float(scale[i]),
                                                      x64[i], bounds, block)
      out_pred[i], out_radius[i], out_joint[i] = answer, radius, joint
      aligned[i], trimmed[i], source[i] = src >= 0, cut, src
      stored[i] = True  # step 4: store every answer, radius 0 included
      block.add(i, answer, radius, joint)
    rows = block.rows[:block.count]
    if rows.size:
      self._index.append(x[rows], block.label[:block.count], block.radius[:block.count],
                         block.joint[:block.count], sq[rows])
    t3 = time.perf_counter()
    self._seconds["device"] += t2 - t1
    self._seconds["host"] += (t1 - t0) + (t3 - t2)

  def _answer(self, i: int, c: int, radius: float, scale: float, x64: np.ndarray,
              bounds: ball_index.StoreBounds | None,
              block: ball_index.QueryBlock) -> tuple[int, float, float, int, bool]:
    """Steps 2 and 3 for query ``i`` of the block, certified (c, radius).

    Returns:
      ``(answer, radius, joint radius, align source or -1, trimmed)``, radii floored at 0.
    """
    conflict = self._index.nearest_conflict(i, c, radius, x64, bounds, block)
    if conflict is not None and (conflict.g < 0 or conflict.d == 0):  # step 2: inside a ball of another class
      answer = conflict.label
      radius = conflict.radius - conflict.d - distances.SAFETY * (conflict.radius + conflict.d)
      joint = conflict.joint - conflict.d - distances.SAFETY * (conflict.joint + conflict.d)
      if radius > 0:  # keep the invariant under rounding: trim against every other label once more
        retrim = self._index.nearest_conflict(i, answer, radius, x64, bounds, block)
        if retrim is not None:
          radius = min(radius, retrim.gamma_min)
      joint = min(joint, radius)
      return answer, max(radius, 0.0), max(joint, 0.0), conflict.index, False
    trimmed = conflict is not None and conflict.gamma_min < radius  # step 3: trim
    if trimmed:
      radius = conflict.gamma_min
    joint = max(radius, 0.0) * scale
    return c, max(radius, 0.0), max(joint, 0.0), -1, trimmed

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
      store._index.append(piece, label[sl], radius[sl], joint[sl], np.sum(piece64 * piece64, axis=1))
    return store

  def save(self, path: str | os.PathLike) -> None:
    """Writes the store to ``path`` (.npz: x, label, radius, joint, meta) atomically."""
    path = os.fspath(path)
    x, label, radius = self.stored_arrays()
    meta = dict(format_version=_FORMAT_VERSION, input_shape=list(self._input_shape), dtype=self._dtype.name,
                chunk_size=self._chunk_size, counters=self._counters)
    files.save_npz(path, x=x, label=label, radius=radius, joint=self.stored_joint_radii(),
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
  ``distances.default_tol_rel``) and every pair within that bound of the threshold is recomputed exactly.

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
        d = distances.exact_dist(flat[rows[b + k]][None], flat[rows[a + i]].astype(np.float64))[0]
        if d < rad[a + i] + rad[b + k]:
          count += 1
          if len(found) < max_pairs:
            found.append((rows[a + i], rows[b + k]))
  return count, np.asarray(found, np.int64).reshape(-1, 2)
