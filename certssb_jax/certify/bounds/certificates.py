"""Margins and radii from votes (docs/method.md section 3): ``certify_counts``, the ``Certificate`` of N
inputs, the selection corrections and the margin ceiling. Host-side float64."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from numpy.typing import ArrayLike
import scipy.special

from certssb_jax.certify.bounds.intervals import (
  BOUNDS,
  Bound,
  _as_counts,
  _as_positive,
  _as_votes,
  _check_alpha,
  _check_choice,
)

logger = logging.getLogger(__name__)

CORRECTIONS = ("bonferroni", "holdout")


@dataclasses.dataclass(frozen=True)
class Certificate:
  """Certificates of N test inputs (docs/method.md section 3). Every field has shape (N,).

  Attributes:
    pred: int64 predicted class c_A, -1 where the smoothed classifier abstains.
    p_lower: float64 pA_low, the lower confidence bound on P[c_A] (reported also where abstained).
    p_upper_runner: float64 pB_high, the upper bound on every other class's probability.
    margin: (Phi^-1(pA_low) - Phi^-1(pB_high)) / 2, the certified whitened norm; 0 where abstained.
    radius: sigma_min * margin, the joint isotropic l2 radius over all training and test triggers.
    radius_test: sigma_x * margin, the l2 radius in the test input alone (clean training set).
    votes_top: int64 count of the selected class among the estimation votes (also where abstained); -1 where
      no votes were given (soft scores only).
  """

  pred: np.ndarray
  p_lower: np.ndarray
  p_upper_runner: np.ndarray
  margin: np.ndarray
  radius: np.ndarray
  radius_test: np.ndarray
  votes_top: np.ndarray

  @property
  def abstained(self) -> np.ndarray:
    """Boolean (N,) mask of the inputs where the classifier abstains."""
    return self.pred == -1


_P_MIN = np.finfo(np.float64).tiny
_P_MAX = 1.0 - np.finfo(np.float64).epsneg


def _margin_from_bounds(p_lower: np.ndarray, p_upper_runner: np.ndarray) -> np.ndarray:
  """(Phi^-1(pA_low) - Phi^-1(pB_high)) / 2 in float64, 0 where pA_low <= pB_high (abstain)."""
  lo = np.clip(p_lower, _P_MIN, _P_MAX)
  hi = np.clip(p_upper_runner, _P_MIN, _P_MAX)
  margin = 0.5 * (scipy.special.ndtri(lo) - scipy.special.ndtri(hi))
  return np.where(p_lower > p_upper_runner, margin, 0.0)


def _alpha_prime(alpha: float, correction: str | None, num_classes: int) -> float:
  return alpha / num_classes if correction == "bonferroni" else alpha


def sigma_min_of(sigma_x: ArrayLike, sigma_train: ArrayLike) -> np.ndarray:
  """sigma_min = min(sigma_x, min_j sigma_j), the sigma of the joint isotropic radius (docs/method.md section 3).

  Args:
    sigma_x: (N,) or scalar, the sigma each test input was sampled with.
    sigma_train: (n,) the training samples' sigma_j.

  Returns:
    float64 array with the shape of `sigma_x`.
  """
  sx = _as_positive(sigma_x, "sigma_x")
  st = _as_positive(sigma_train, "sigma_train")
  if st.size == 0:
    raise ValueError("sigma_train must not be empty.")
  return np.minimum(sx, st.min())


def _check_certify_args(votes: ArrayLike | None, alpha: float, bound: str,
                        correction: str | None) -> tuple[float, np.ndarray | None]:
  """Checks the bound, the correction and alpha; returns alpha as a float and the (N, K) votes (or None)."""
  _check_choice("bound", bound, BOUNDS)
  _check_choice("correction", correction, CORRECTIONS + (None,))
  if not np.isscalar(alpha):
    raise ValueError(f"alpha must be a scalar, got {alpha!r}.")
  alpha = float(_check_alpha(alpha))
  if votes is None:
    if not BOUNDS[bound].uses_soft_scores:
      raise ValueError(f"votes are required for bound={bound!r}.")
    return alpha, None
  return alpha, _as_votes(votes, "votes")  # (N, K)


def _mean_soft_scores(soft_sums: ArrayLike | None, num_models: int | ArrayLike | None,
                      v: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """Checks the soft-score sums against M (and the votes); returns the (N, K) mean scores and M (N,)."""
  if soft_sums is None or num_models is None:
    raise ValueError("bound='hoeffding' needs soft_sums and num_models (the real ensemble size M).")
  s = np.asarray(soft_sums, dtype=np.float64)  # (N, K)
  if s.ndim != 2 or s.shape[1] < 2:
    raise ValueError(f"soft_sums must have shape (N, K) with K >= 2, got {s.shape}.")
  if v is not None and s.shape != v.shape:
    raise ValueError(f"soft_sums shape {s.shape} differs from votes shape {v.shape}.")
  m_soft = _as_counts(num_models, "num_models")
  if np.any(m_soft <= 0):
    raise ValueError("num_models must be > 0.")
  m_soft = np.broadcast_to(m_soft, s.shape[:1])  # (N,)
  if v is not None and np.any(v.sum(axis=1) != m_soft):
    raise ValueError("num_models must equal votes.sum(axis=1) (the same estimation models).")
  if not np.all(np.isfinite(s)) or np.any(s < 0.0):
    raise ValueError("soft_sums must be finite and >= 0.")
  row = s.sum(axis=1)
  if np.any(np.abs(row - m_soft) > 1e-3 * m_soft):
    raise ValueError(
        "soft_sums rows must sum to num_models (class probabilities sum to 1 per model); got row sums "
        f"in [{row.min()}, {row.max()}].")
  return np.clip(s / m_soft[:, None], 0.0, 1.0), m_soft  # (N, K) mean soft scores, (N,)


def _select_top(spec: Bound, bound: str, correction: str | None, selection_votes: ArrayLike | None,
                v: np.ndarray | None, scores: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
  """The selected class c_A (N,): argmax of the held-out votes, else of the scores or votes (ties: lowest)."""
  if correction == "holdout":
    if not spec.supports_holdout:
      raise ValueError(f"correction='holdout' does not work with bound={bound!r}.")
    if selection_votes is None:
      raise ValueError("correction='holdout' needs selection_votes from held-out models.")
    sel = _as_votes(selection_votes, "selection_votes")
    if sel.shape != shape:
      raise ValueError(f"selection_votes shape {sel.shape} differs from {shape}.")
    return np.argmax(sel, axis=1)  # (N,), ties -> lowest index
  if selection_votes is not None:
    raise ValueError(f"selection_votes are only used with correction='holdout', got {correction!r}.")
  return np.argmax(scores if spec.uses_soft_scores else v, axis=1)  # (N,)


def _certify_sigmas(sigma_x: float | ArrayLike, sigma_min: float | ArrayLike | None,
                    num_inputs: int) -> tuple[np.ndarray, np.ndarray]:
  """sigma_x and sigma_min broadcast to (N,), after checking 0 < sigma_min <= sigma_x."""
  sx = np.broadcast_to(_as_positive(sigma_x, "sigma_x"), (num_inputs,))
  if sigma_min is None:
    return sx, sx
  smin = np.broadcast_to(_as_positive(sigma_min, "sigma_min"), (num_inputs,))
  if np.any(smin > sx):
    raise ValueError("sigma_min must be <= sigma_x (it is min(sigma_x, min_j sigma_j)).")
  return sx, smin


def certify_counts(votes: ArrayLike | None, *, alpha: float, bound: str = "clopper_pearson",
                   correction: str | None = "bonferroni", soft_sums: ArrayLike | None = None,
                   num_models: int | ArrayLike | None = None, selection_votes: ArrayLike | None = None,
                   sigma_x: float | ArrayLike = 1.0, sigma_min: float | ArrayLike | None = None) -> Certificate:
  """Certifies N test inputs from the ensemble's votes or soft scores (docs/method.md section 3).

  See the module docstring for the statistics. With the default sigmas (1.0) `radius` and `radius_test` are the
  margin in sigma units.

  Args:
    votes: (N, K) exact integer vote counts of the estimation models; M = votes.sum(axis=1). May be None only
      for ``bound="hoeffding"`` (then `votes_top` is -1).
    alpha: total failure probability of each input's certificate, in (0, 1).
    bound: "clopper_pearson" (on votes) or "hoeffding" (on mean soft scores).
    correction: "bonferroni" (alpha / K on every class), "holdout" (c_A from `selection_votes`), or None (no
      selection correction; biased, for comparison with the reference only).
    soft_sums: (N, K) sums over the estimation models of the class probabilities; required for hoeffding.
    num_models: the REAL number of estimation models M behind `soft_sums` (int or (N,)); required for
      hoeffding. Must equal votes.sum(axis=1) when votes are given.
    selection_votes: (N, K) votes of M0 held-out models, required for (and only for) ``correction="holdout"``.
    sigma_x: (N,) or scalar, the sigma each test input's noise was sampled with.
    sigma_min: (N,) or scalar, min(sigma_x, min_j sigma_j) (see `sigma_min_of`). None means sigma_x, which is
      right only when every training sigma_j >= sigma_x (e.g. RAB with one global sigma).

  Returns:
    A `Certificate` with fields of shape (N,).

  Raises:
    ValueError: on an unknown bound or correction, alpha outside (0, 1), non-integer or negative votes, M = 0,
      inconsistent shapes or model counts, or sigma_min > sigma_x.
  """
  alpha, v = _check_certify_args(votes, alpha, bound, correction)
  spec = BOUNDS[bound]
  scores = m_soft = None
  if spec.uses_soft_scores:
    scores, m_soft = _mean_soft_scores(soft_sums, num_models, v)
  elif soft_sums is not None:
    logger.debug("soft_sums ignored for bound='clopper_pearson'.")
  num_inputs, num_classes = scores.shape if spec.uses_soft_scores else v.shape
  top = _select_top(spec, bound, correction, selection_votes, v, scores, (num_inputs, num_classes))
  a_prime = _alpha_prime(alpha, correction, num_classes)
  rows = np.arange(num_inputs)
  if spec.uses_soft_scores:
    p_lower = spec.lower(None, scores[rows, top], m_soft, a_prime)  # (N,)
  else:
    p_lower = spec.lower(v[rows, top], None, v.sum(axis=1), a_prime)  # (N,)
  p_upper_runner = 1.0 - p_lower  # (N,)
  sx, smin = _certify_sigmas(sigma_x, sigma_min, num_inputs)
  margin = _margin_from_bounds(p_lower, p_upper_runner)  # (N,)
  certified = p_lower > p_upper_runner
  pred = np.where(certified, top, -1).astype(np.int64)
  votes_top = v[rows, top] if v is not None else np.full(num_inputs, -1)
  logger.debug("certify_counts: %d of %d inputs certified (bound=%s, correction=%s, alpha'=%g).",
               int(certified.sum()), num_inputs, bound, correction, a_prime)
  return Certificate(pred=pred, p_lower=p_lower.astype(np.float64), p_upper_runner=p_upper_runner.astype(np.float64),
                     margin=margin, radius=smin * margin, radius_test=sx * margin,
                     votes_top=votes_top.astype(np.int64))


def margin_ceiling(num_models: int, alpha: float, *, bound: str = "clopper_pearson",
                   correction: str | None = "bonferroni", num_classes: int = 2) -> float:
  """The largest margin that M and alpha allow at all (docs/method.md sections 3 and 7).

  It is reached when all M votes (clopper_pearson) or a soft score of 1 (hoeffding) go to one class. No input
  can be certified beyond `margin_ceiling * sigma_min` (joint) or `* sigma_x` (test-only), whatever the models.

  Args:
    num_models: M, the number of models that estimate pA_low (for "holdout": the estimation models only).
    alpha: failure probability in (0, 1).
    bound: "clopper_pearson" or "hoeffding".
    correction: "bonferroni" (alpha / num_classes), "holdout" or None (alpha).
    num_classes: K, used by the Bonferroni correction.

  Returns:
    The ceiling margin (sigma units), 0 if even a unanimous ensemble cannot be certified.
  """
  _check_choice("bound", bound, BOUNDS)
  _check_choice("correction", correction, CORRECTIONS + (None,))
  alpha = float(_check_alpha(alpha))
  if int(num_models) != num_models or num_models <= 0:
    raise ValueError(f"num_models must be a positive integer, got {num_models!r}.")
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
  a_prime = _alpha_prime(alpha, correction, int(num_classes))
  p_lower = BOUNDS[bound].lower(num_models, 1.0, num_models, a_prime)  # unanimous votes, soft score 1
  return float(_margin_from_bounds(np.atleast_1d(p_lower), 1.0 - np.atleast_1d(p_lower))[0])
