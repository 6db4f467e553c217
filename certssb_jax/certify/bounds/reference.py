"""The reference release's formulas (docs/method.md section 6), for comparison only: unsound, never the
default."""

from __future__ import annotations

import logging
import math

import numpy as np
from numpy.typing import ArrayLike

from certssb_jax.certify.bounds.certificates import Certificate, _margin_from_bounds
from certssb_jax.certify.bounds.intervals import _as_counts, _as_positive, _as_votes, _check_alpha

logger = logging.getLogger(__name__)


# Hoeffding's M as hard-coded by the reference release.
_REFERENCE_NUM_MODELS = 1000
# The reference release's clipping of its probability bounds.
_REFERENCE_CLIP = 1e-8


def _reference_mean_scores(soft_sums: ArrayLike, num_models: int | ArrayLike | None) -> np.ndarray:
  """The (N, K) mean soft scores of the reference: the sums over M, M given or inferred from the row sums."""
  s = np.asarray(soft_sums, dtype=np.float64)  # (N, K)
  if s.ndim != 2 or s.shape[1] < 2:
    raise ValueError(f"soft_sums must have shape (N, K) with K >= 2, got {s.shape}.")
  if not np.all(np.isfinite(s)) or np.any(s < 0.0):
    raise ValueError("soft_sums must be finite and >= 0.")
  if num_models is None:
    m = np.round(s.sum(axis=1))
    if np.any(m <= 0):
      raise ValueError("soft_sums rows must sum to the (positive) number of models.")
  else:
    m = np.broadcast_to(_as_counts(num_models, "num_models"), (s.shape[0],)).astype(np.float64)
    if np.any(m <= 0):
      raise ValueError("num_models must be > 0.")
  return s / m[:, None]


def _reference_votes_top(votes: ArrayLike | None, shape: tuple[int, ...], top: np.ndarray) -> np.ndarray:
  """The (N,) int64 votes of the selected classes, -1 without votes."""
  if votes is None:
    return np.full(shape[0], -1, dtype=np.int64)
  v = _as_votes(votes, "votes")
  if v.shape != shape:
    raise ValueError(f"votes shape {v.shape} differs from soft_sums shape {shape}.")
  return v[np.arange(shape[0]), top].astype(np.int64)


def reference_certificate(soft_sums: ArrayLike, sigma_search: ArrayLike, sigma_sampled: ArrayLike,
                          alpha: float, *, num_models: int | ArrayLike | None = None,
                          votes: ArrayLike | None = None) -> Certificate:
  """The reference release's certificate (github NcepuQiaoTing/Cert-SSB, eval.py). UNSOUND; comparison only.

  Reproduces its formulas (docs/method.md section 6): pA = the largest mean soft score, pB = the runner-up's,
  pA_low = max(1e-8, pA - h), pB_high = min(1 - 1e-8, pB + h) with h = sqrt(ln(1 / alpha) / (2 * 1000)), margin
  = (Phi^-1(pA_low) - Phi^-1(pB_high)) / 2 and radius = sigma_search * margin. It is unsound because:
    * the Hoeffding term hard-codes M = 1000 whatever the real ensemble size (too narrow for M = 200);
    * c_A is chosen from the same scores it bounds, with no selection correction;
    * the radius is multiplied by the optimised sigma_x (`sigma_search`) although the test noise was sampled
      with `sigma_sampled` (the base sigma_0): Cohen's theorem gives sigma_sampled * margin, so the radii are
      inflated by sigma_search / sigma_sampled (1.2x to 2.7x in the paper's settings);
    * no storage-update step is run (docs/method.md section 5).
  The reference never abstains explicitly; a non-positive radius just fails every `radius > r` test. Here such
  inputs get pred = -1 and margin 0, which leaves every CRA(r) unchanged. `radius` and `radius_test` are both
  the reference's radius.

  Args:
    soft_sums: (N, K) sums over the models of the class probabilities.
    sigma_search: (N,) or scalar, the optimised sigma_x the reference multiplies the margin by.
    sigma_sampled: (N,) or scalar, the sigma the test noise was actually sampled with (used only to log the
      inflation factor).
    alpha: the reference's alpha, in (0, 1).
    num_models: the real ensemble size behind `soft_sums`, used only to form the mean; None infers it from the
      row sums (probabilities of one model sum to 1).
    votes: optional (N, K) votes, only to fill `votes_top` (-1 otherwise).

  Returns:
    A `Certificate`.
  """
  alpha = float(_check_alpha(alpha))
  gx = _reference_mean_scores(soft_sums, num_models)  # (N, K) mean soft scores
  num_inputs = gx.shape[0]
  top = np.argmax(gx, axis=1)  # (N,)
  rows = np.arange(num_inputs)
  pa = gx[rows, top]
  rest = gx.copy()
  rest[rows, top] = -1.0
  pb = rest.max(axis=1)
  h = math.sqrt(math.log(1.0 / alpha) / 2.0 / _REFERENCE_NUM_MODELS)
  p_lower = np.maximum(_REFERENCE_CLIP, pa - h)
  p_upper_runner = np.minimum(1.0 - _REFERENCE_CLIP, pb + h)
  margin = _margin_from_bounds(p_lower, p_upper_runner)
  certified = p_lower > p_upper_runner
  s_search = np.broadcast_to(_as_positive(sigma_search, "sigma_search"), (num_inputs,))
  s_sampled = np.broadcast_to(_as_positive(sigma_sampled, "sigma_sampled"), (num_inputs,))
  ratio = s_search / s_sampled
  logger.info("reference_certificate: radii inflated by sigma_search / sigma_sampled in [%.3g, %.3g].",
              float(ratio.min()), float(ratio.max()))
  votes_top = _reference_votes_top(votes, gx.shape, top)
  radius = s_search * margin
  return Certificate(pred=np.where(certified, top, -1).astype(np.int64), p_lower=p_lower,
                     p_upper_runner=p_upper_runner, margin=margin, radius=radius, radius_test=radius.copy(),
                     votes_top=votes_top)
