"""One-sided confidence bounds on a class's probability (Clopper-Pearson on votes, Hoeffding on mean soft
scores), the ``BOUNDS`` registry, and the argument checks every part of ``bounds`` shares. Host-side float64."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike
import scipy.stats


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
