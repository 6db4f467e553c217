"""Certificate arithmetic of Cert-SSB (docs/method.md section 3): host-side, float64, scipy.

This module is deliberately host-side code. The device produces exact integer vote counts (or soft-score sums)
over the M ensemble members; everything statistical happens here in numpy float64 with scipy, vectorised over
the N test inputs. Nothing here runs in float32 or under ``jit``.

What is certified (docs/method.md section 3). With Sigma = diag(sigma_1^2 I, ..., sigma_n^2 I, sigma_x^2 I), a lower
bound ``pA_low`` on the probability of the predicted class c_A and an upper bound ``pB_high`` on every other
class, the smoothed prediction is constant for every joint perturbation Delta with

    || Sigma^(-1/2) Delta ||_2  <  margin := (Phi^-1(pA_low) - Phi^-1(pB_high)) / 2.

We report ``margin`` (sigma units), ``radius = sigma_min * margin`` (joint isotropic l2 radius, sigma_min =
min(sigma_x, min_j sigma_j)) and ``radius_test = sigma_x * margin`` (test input alone), and abstain
(``pred = -1``, margin = radius = radius_test = 0) when ``pA_low <= pB_high``.

Statistics (decided; docs/method.md section 3 "Statistics"):

* Selection. c_A is the argmax of the votes (``bound="clopper_pearson"``) or of the soft scores
  (``bound="hoeffding"``); ties go to the lowest class index (``np.argmax``).
* ``correction="bonferroni"`` (default). Choosing c_A from the same draws that bound it biases the bound (the
  selected class is the one whose count happened to come out high). We bound every one of the K classes
  simultaneously at level ``alpha / K`` each; by the union bound all K lower bounds hold together with
  probability >= 1 - alpha, so in particular the bound of whichever class was selected holds.
* ``correction="holdout"``. Cohen et al.'s CERTIFY (n0 selection draws): ``selection_votes`` from M0 held-out
  models choose c_A, and ``votes`` (or soft scores) from the other, independent models bound it at level
  ``alpha`` with no K factor. M is then the number of estimation models, ``votes.sum(axis=1)``.
* ``correction=None``. No selection correction: c_A and its bound come from the same draws at level alpha.
  This is BIASED (the coverage can fall below 1 - alpha, up to about K * alpha when classes are close) and is
  only provided to compare with the reference code and RAB, which do this.
* ``bound="clopper_pearson"`` (default): the exact one-sided Clopper-Pearson lower bound on votes[c_A] out of
  M at level alpha' (alpha / K or alpha), via ``scipy.stats.beta.ppf``.
* ``bound="hoeffding"``: on the mean soft score s_A = soft_sums[:, c_A] / M of M i.i.d. [0, 1] variables,
  pA_low = s_A - sqrt(ln(1 / alpha') / (2 M)), with M = ``num_models`` the REAL ensemble size (the reference
  release hard-codes 1000 there, which is wrong for M = 200).
* pB_high = 1 - pA_low in every case. This is valid because the class probabilities (of votes, and of mean
  soft scores alike) sum to one, so every runner-up has probability <= 1 - p_A <= 1 - pA_low. Hence the
  abstain rule pA_low <= pB_high is pA_low <= 1/2, and the margin equals Phi^-1(pA_low).
* Phi^-1 is ``scipy.special.ndtri`` in float64; probabilities are clipped away from {0, 1} only to avoid
  infinities (no certified margin is affected: pA_low of a certified input lies in (1/2, 1)).

``margin_ceiling`` gives the largest margin M and alpha allow at all, so users know when M is too small for the
radius they want (docs/method.md section 7: Hoeffding, M = 1000, alpha = 0.001, no correction: 1.565;
Clopper-Pearson with all votes on one class: about 2.46 uncorrected, 2.43 at alpha / 2).

``poison_budget`` turns a margin into the structured joint certificate: how many training images a trigger of
norm t may poison, the test input triggered too, before the certificate stops covering the attack.

``reference_certificate`` reproduces the reference release's formulas (docs/method.md section 6) for comparison
only; it is unsound and never the default.
"""

# Longer than the module size rule on purpose: one concept (the certificate arithmetic), all of it public API.

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike
import scipy.special
import scipy.stats

logger = logging.getLogger(__name__)

CORRECTIONS = ("bonferroni", "holdout")
# Radii of the certified-robust-accuracy curve (docs/method.md section 7): 0, 0.25, ..., 2.5.
CRA_GRID = tuple(float(r) for r in np.round(np.arange(0, 2.5 + 1e-9, 0.25), 2))

# Hoeffding's M as hard-coded by the reference release (used only by `reference_certificate`).
_REFERENCE_NUM_MODELS = 1000
# The reference release's clipping of its probability bounds.
_REFERENCE_CLIP = 1e-8


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


# ----------------------------------------------------------------------------------------------------------
# Validation helpers.


def _check_alpha(alpha: ArrayLike) -> np.ndarray:
  a = np.asarray(alpha, dtype=np.float64)
  if not np.all(np.isfinite(a)) or np.any(a <= 0.0) or np.any(a >= 1.0):
    raise ValueError(f"alpha must lie in the open interval (0, 1), got {alpha!r}.")
  return a


def _check_choice(name: str, value, allowed: tuple) -> None:
  if value not in allowed:
    raise ValueError(f"Unknown {name} {value!r}; allowed values are {allowed}.")


def _as_counts(x: ArrayLike, name: str) -> np.ndarray:
  """Returns `x` as an int64 array after checking it holds non-negative integers."""
  a = np.asarray(x)
  if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
    raise ValueError(f"{name} must hold non-negative integers, got dtype {a.dtype}.")
  if np.issubdtype(a.dtype, np.floating):
    if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
      raise ValueError(f"{name} must hold non-negative integers, got non-integral values.")
  if np.any(a < 0):
    raise ValueError(f"{name} must hold non-negative integers, got negative values.")
  return a.astype(np.int64)


def _as_votes(x: ArrayLike, name: str) -> np.ndarray:
  """Returns a (N, K) int64 vote array with K >= 2 and at least one vote per row."""
  v = _as_counts(x, name)
  if v.ndim != 2 or v.shape[1] < 2:
    raise ValueError(f"{name} must have shape (N, K) with K >= 2 classes, got shape {v.shape}.")
  if np.any(v.sum(axis=1) <= 0):
    raise ValueError(f"{name}: every row needs at least one vote (M > 0).")
  return v


def _as_positive(x: ArrayLike, name: str) -> np.ndarray:
  a = np.asarray(x, dtype=np.float64)
  if not np.all(np.isfinite(a)) or np.any(a <= 0.0):
    raise ValueError(f"{name} must be finite and > 0, got {x!r}.")
  return a


def _as_nonneg(x: ArrayLike, name: str) -> np.ndarray:
  a = np.asarray(x, dtype=np.float64)
  if not np.all(np.isfinite(a)) or np.any(a < 0.0):
    raise ValueError(f"{name} must be finite and >= 0, got {x!r}.")
  return a


# ----------------------------------------------------------------------------------------------------------
# One-sided confidence bounds.


def _binomial_args(successes: ArrayLike, trials: ArrayLike, alpha: ArrayLike) -> list[np.ndarray]:
  """(k, n, alpha) checked (0 <= k <= n, n > 0, alpha in (0, 1)) and broadcast to one shape."""
  k = _as_counts(successes, "successes")
  n = _as_counts(trials, "trials")
  a = _check_alpha(alpha)
  if np.any(n <= 0):
    raise ValueError("trials must be > 0.")
  if np.any(k > n):
    raise ValueError("successes must not exceed trials.")
  return np.broadcast_arrays(k, n, a)


def clopper_pearson_lower(successes: ArrayLike, trials: ArrayLike, alpha: ArrayLike) -> np.ndarray:
  """Exact one-sided Clopper-Pearson lower confidence bound on a binomial proportion.

  P[p >= bound] >= 1 - alpha for every true p. The bound is the alpha quantile of Beta(k, n - k + 1), and 0
  when k = 0 (docs/method.md section 3, default bound).

  Args:
    successes: k, non-negative integers (any shape broadcasting with `trials`).
    trials: n > 0, integers, n >= k.
    alpha: one-sided error level in (0, 1) (broadcasts).

  Returns:
    float64 array of the broadcast shape.
  """
  k, n, a = _binomial_args(successes, trials, alpha)
  safe_k = np.maximum(k, 1)  # Beta(0, .) is undefined; those entries are set to 0 below.
  lower = scipy.stats.beta.ppf(a, safe_k, n - k + 1)
  return np.where(k == 0, 0.0, lower).astype(np.float64)


def clopper_pearson_upper(successes: ArrayLike, trials: ArrayLike, alpha: ArrayLike) -> np.ndarray:
  """Exact one-sided Clopper-Pearson upper confidence bound; 1 when k = n.

  P[p <= bound] >= 1 - alpha for every true p: the 1 - alpha quantile of Beta(k + 1, n - k).

  Args:
    successes: k, non-negative integers.
    trials: n > 0, integers, n >= k.
    alpha: one-sided error level in (0, 1).

  Returns:
    float64 array of the broadcast shape.
  """
  k, n, a = _binomial_args(successes, trials, alpha)
  safe_b = np.maximum(n - k, 1)  # Beta(., 0) is undefined; those entries are set to 1 below.
  upper = scipy.stats.beta.ppf(1.0 - a, k + 1, safe_b)
  return np.where(k == n, 1.0, upper).astype(np.float64)


def hoeffding_lower(mean: ArrayLike, trials: ArrayLike, alpha: ArrayLike) -> np.ndarray:
  """One-sided Hoeffding lower bound on the mean of `trials` i.i.d. variables in [0, 1].

  bound = mean - sqrt(ln(1 / alpha) / (2 n)), clipped to [0, 1] (docs/method.md section 3, as RAB does).

  Args:
    mean: empirical mean(s) in [0, 1].
    trials: n > 0, the REAL number of draws (ensemble size M).
    alpha: one-sided error level in (0, 1).

  Returns:
    float64 array of the broadcast shape.
  """
  m = np.asarray(mean, dtype=np.float64)
  if not np.all(np.isfinite(m)) or np.any(m < 0.0) or np.any(m > 1.0):
    raise ValueError("mean must lie in [0, 1].")
  n = _as_counts(trials, "trials")
  if np.any(n <= 0):
    raise ValueError("trials must be > 0.")
  a = _check_alpha(alpha)
  return np.clip(m - np.sqrt(np.log(1.0 / a) / (2.0 * n)), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Bound:
  """A lower confidence bound on the top class's probability (an entry of ``BOUNDS``).

  Attributes:
    lower: (votes of c_A (N,), mean soft score of c_A (N,), M (N,), alpha') -> pA_low (N,) float64.
    uses_soft_scores: c_A is chosen from, and bounded with, the mean soft scores (else the votes).
    supports_holdout: c_A can be chosen by held-out models (``correction="holdout"``).
  """

  lower: Callable[[np.ndarray, np.ndarray | None, np.ndarray, float], np.ndarray]
  uses_soft_scores: bool
  supports_holdout: bool


BOUNDS: dict[str, Bound] = {
    # exact one-sided Clopper-Pearson on the votes of c_A
    "clopper_pearson": Bound(lambda k, s, m, a: clopper_pearson_lower(k, m, a), uses_soft_scores=False,
                             supports_holdout=True),
    # Hoeffding on the mean soft score of c_A, with the real M (RAB's and the reference's bound)
    "hoeffding": Bound(lambda k, s, m, a: hoeffding_lower(s, m, a), uses_soft_scores=True,
                       supports_holdout=False),
}


# ----------------------------------------------------------------------------------------------------------
# Margin and certificates.

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


# ----------------------------------------------------------------------------------------------------------
# Concrete attacks and metrics.


def whitened_norm(sigma_train: ArrayLike, poisoned_indices: ArrayLike, train_trigger_norms: ArrayLike,
                  sigma_x: ArrayLike, test_trigger_norm: ArrayLike) -> float | np.ndarray:
  """|| Sigma^(-1/2) Delta ||_2 of a concrete attack (docs/method.md section 3).

  sqrt(sum_{j poisoned} ||delta_j||^2 / sigma_j^2 + ||delta_x||^2 / sigma_x^2).

  Args:
    sigma_train: (n,) the training samples' sigma_j.
    poisoned_indices: (P,) distinct indices into the training set of the poisoned samples (may be empty).
    train_trigger_norms: (P,) or scalar, ||delta_j||_2 of each poisoned training input.
    sigma_x: scalar or (N,), the test inputs' sigma.
    test_trigger_norm: scalar or (N,), ||delta_x||_2 of the test trigger.

  Returns:
    A float if `sigma_x` and `test_trigger_norm` are scalars, else an array of their broadcast shape.
  """
  st = _as_positive(sigma_train, "sigma_train").reshape(-1)  # (n,)
  idx = np.asarray(poisoned_indices).reshape(-1)
  if idx.size and not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"poisoned_indices must be integers, got dtype {idx.dtype}.")
  idx = idx.astype(np.int64)
  if np.any(idx < 0) or np.any(idx >= st.size):
    raise ValueError(f"poisoned_indices must lie in [0, {st.size}).")
  if np.unique(idx).size != idx.size:
    raise ValueError("poisoned_indices must be distinct.")
  tn = np.broadcast_to(_as_nonneg(train_trigger_norms, "train_trigger_norms"), idx.shape)  # (P,)
  sx = _as_positive(sigma_x, "sigma_x")
  xn = _as_nonneg(test_trigger_norm, "test_trigger_norm")
  train_part = float(np.sum((tn / st[idx]) ** 2))
  out = np.sqrt(train_part + (xn / sx) ** 2)
  return float(out) if out.ndim == 0 else out


def certified_against(margin: ArrayLike, sigma_train: ArrayLike, poisoned_indices: ArrayLike,
                      train_trigger_norms: ArrayLike, sigma_x: ArrayLike,
                      test_trigger_norm: ArrayLike) -> bool | np.ndarray:
  """Whether a certificate covers a concrete attack: `whitened_norm(...) < margin` (strict; docs/method.md §3).

  An abstained input (margin 0) is never certified.

  Args:
    margin: scalar or (N,) certified margins.
    sigma_train, poisoned_indices, train_trigger_norms, sigma_x, test_trigger_norm: as in `whitened_norm`.

  Returns:
    A bool for scalar inputs, else a boolean array.
  """
  m = _as_nonneg(margin, "margin")
  out = np.asarray(whitened_norm(sigma_train, poisoned_indices, train_trigger_norms, sigma_x,
                                 test_trigger_norm)) < m
  return bool(out) if out.ndim == 0 else out


# Beyond this many images a float64 k is no longer an exact integer, so the budget could not be exact.
_MAX_POISON_BUDGET = 2 ** 52
# A budget whose whitened norm lies this close to the margin is decided by certified_against itself ...
_TIE_RTOL = 1e-12
# ... unless it is this large (the sum over its images would not fit in memory).
_MAX_EXACT_SUM = 2 ** 24


def poison_budget(margin: ArrayLike, sigma_train_min: ArrayLike, sigma_x: ArrayLike,
                  trigger_norm: ArrayLike) -> np.ndarray:
  """Certified poison budget at trigger norm t: how many training images a trigger of norm t may poison.

  The structured joint threat (docs/method.md section 3, "Certified poison budget at trigger norm t"): the
  attacker adds a trigger of l2 norm at most t to k training images (labels unchanged) and to the test input.
  Every training sigma_j is at least s_train = `sigma_train_min`, so the whitened norm of that attack is at most
  t * sqrt(k / s_train^2 + 1 / sigma_x^2), and the certificate (whitened norm < margin, strict) covers it for
  every k <= k*, k* = the largest integer k >= 0 with

      t^2 * (k / s_train^2 + 1 / sigma_x^2)  <  margin^2,

  that is k* = ceil(q) - 1 for q = s_train^2 * (margin^2 / t^2 - 1 / sigma_x^2) > 0. k* = 0 means certified
  against the test trigger with no poisoned training image; -1 means not even that (margin <= t / sigma_x, and
  every abstention, margin 0). The closed form is then checked in float64, and moved by one where rounding put
  it on the wrong side, with sqrt(k * (t / s_train)^2 + (t / sigma_x)^2) < margin; where that norm lies within
  1e-12 (relative) of the margin, k is decided by `certified_against` itself (whose sum over the k images can
  round differently from the product). So `certified_against` certifies an attack of k* images on training
  samples at s_train and refuses one of k* + 1, ties included. Since the whitened norm grows with every trigger
  norm and falls with every sigma_j, triggers of norm below t and images of larger sigma_j are covered too.

  An isotropic joint radius J (every Delta with ||Delta||_2 < J) is the same certificate with every sigma 1 and
  margin J: ``poison_budget(J, 1.0, 1.0, t)`` is the largest k with t^2 (k + 1) < J^2.

  Args:
    margin: certified margins (sigma units), >= 0, 0 where abstained; any shape broadcasting with the others.
    sigma_train_min: s_train = min_j sigma_j of the training samples, > 0.
    sigma_x: the sigma each test input was certified at, > 0.
    trigger_norm: t, the l2 norm of the trigger, > 0.

  Returns:
    int64 array of the broadcast shape: k*, or -1.

  Raises:
    ValueError: on a negative or non-finite margin, a non-positive or non-finite sigma or trigger norm, or a
      budget above 2^52 images (t too small for the margin to count exactly).
  """
  m = _as_nonneg(margin, "margin")
  s = _as_positive(sigma_train_min, "sigma_train_min")
  sx = _as_positive(sigma_x, "sigma_x")
  t = _as_positive(trigger_norm, "trigger_norm")
  m, s, sx, t = np.broadcast_arrays(m, s, sx, t)
  shape = m.shape
  m, s, sx, t = (a.reshape(-1) for a in (m, s, sx, t))  # (N,)
  per_image = (t / s) ** 2  # whitened squared norm of one poisoned training image
  test_part = (t / sx) ** 2  # ... and of the test trigger
  with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # a tiny t: q = inf, caught below
    q = s ** 2 * (m ** 2 / t ** 2 - 1.0 / sx ** 2)  # k is certified iff k < q
  if np.any(q > _MAX_POISON_BUDGET):
    raise ValueError(f"poison budget above 2^52 images: trigger_norm is too small for margin {m.max()!r}.")
  k = np.where(q > 0, np.ceil(q) - 1, -1).astype(np.int64)

  def norm(n):  # whitened norm of n >= 0 poisoned images at s_train, whitened_norm's sum as a product
    return np.sqrt(n * per_image + test_part)

  for _ in range(8):  # the closed form is off by at most one where q rounded across an integer
    up = norm(k + 1) < m
    down = (k >= 0) & ~(norm(np.maximum(k, 0)) < m)
    if not (up.any() or down.any()):
      break
    k = k + up.astype(np.int64) - down.astype(np.int64)
  # Within rounding of a tie the product and whitened_norm's sum can differ in the last bit: decide those few
  # exactly as certified_against does.
  def tie(n):
    return np.abs(norm(n) - m) <= _TIE_RTOL * m

  near = tie(k + 1) | ((k >= 0) & tie(np.maximum(k, 0)))  # (N,)
  for i in np.flatnonzero(near & (k < _MAX_EXACT_SUM)):
    k[i] = _budget_at_tie(float(m[i]), float(s[i]), float(sx[i]), float(t[i]), int(k[i]))
  return k.reshape(shape)


def _budget_at_tie(margin: float, s_train: float, sigma_x: float, t: float, k: int) -> int:
  """Moves a budget k found near a tie to the one `certified_against` gives, summing as it does."""
  def covered(n):
    return certified_against(margin, np.full(max(n, 1), s_train), np.arange(n), t, sigma_x, t)

  while covered(k + 1):
    k += 1
  while k >= 0 and not covered(k):
    k -= 1
  return k


def budget_grid(max_budget: int) -> tuple[int, ...]:
  """Budgets k at which certified accuracy against k is reported: 0, 1, 2, 4, ..., the first power of 2 above
  `max_budget` (where no input can count any more); (0,) when no input is certified (`max_budget` = -1)."""
  if int(max_budget) != max_budget or max_budget < -1:
    raise ValueError(f"max_budget must be an integer >= -1, got {max_budget!r}.")
  grid, k = [0], 1
  while max_budget >= 0 and grid[-1] <= max_budget:
    grid.append(k)
    k *= 2
  return tuple(grid)


def certified_accuracy_budget(budget: ArrayLike, correct: ArrayLike, grid: tuple[int, ...]) -> dict[str, float]:
  """Certified accuracy against k poisoned images, mean(correct & budget >= k) (`poison_budget`).

  Args:
    budget: (N,) integer poison budgets, -1 where not even the test trigger is covered.
    correct: (N,) booleans, prediction == label (False where abstained).
    grid: budgets k at which to evaluate (`budget_grid`).

  Returns:
    {str(k): accuracy}, e.g. keys "0", "1", "2", "4".
  """
  b = np.asarray(budget)
  cor = np.asarray(correct)
  if b.ndim != 1 or cor.shape != b.shape:
    raise ValueError(f"budget and correct must both have shape (N,), got {b.shape} and {cor.shape}.")
  if b.size == 0:
    raise ValueError("budget must not be empty.")
  if not np.issubdtype(b.dtype, np.integer):
    raise ValueError(f"budget must hold integers, got dtype {b.dtype}.")
  if cor.dtype != np.bool_:
    raise ValueError(f"correct must be boolean, got dtype {cor.dtype}.")
  return {str(int(k)): float(np.mean(cor & (b >= int(k)))) for k in grid}


def certified_accuracy(radius: ArrayLike, correct: ArrayLike, grid: tuple = CRA_GRID) -> dict[str, float]:
  """Certified robust accuracy CRA(r) = mean(correct & radius > r) (docs/method.md section 7).

  `correct` must already be False where the classifier abstained (pred != -1 is implied by correct); an
  abstained input also has radius 0, so it never counts.

  Args:
    radius: (N,) certified radii (use `radius` or `radius_test` as the experiment requires).
    correct: (N,) booleans, prediction == label.
    grid: radii r at which to evaluate.

  Returns:
    {str(float(r)): CRA(r)}, e.g. keys "0.0", "0.25", ..., "2.5".
  """
  rad = np.asarray(radius, dtype=np.float64)
  cor = np.asarray(correct)
  if rad.ndim != 1 or cor.shape != rad.shape:
    raise ValueError(f"radius and correct must both have shape (N,), got {rad.shape} and {cor.shape}.")
  if rad.size == 0:
    raise ValueError("radius must not be empty.")
  if cor.dtype != np.bool_:
    if not np.all((cor == 0) | (cor == 1)):
      raise ValueError("correct must be boolean.")
    cor = cor.astype(bool)
  if np.any(np.isnan(rad)):
    raise ValueError("radius must not contain NaN.")
  return {str(float(r)): float(np.mean(cor & (rad > float(r)))) for r in grid}


# ----------------------------------------------------------------------------------------------------------
# The reference release's formulas (comparison only).


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
