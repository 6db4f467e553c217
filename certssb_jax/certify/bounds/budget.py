"""What a margin certifies against a concrete attack (docs/method.md section 3): the whitened norm of an
attack, whether it is covered, the poison budget at trigger norm t, and certified accuracy curves."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from certssb_jax.certify.bounds.intervals import _as_nonneg, _as_positive

# Radii of the certified-robust-accuracy curve (docs/method.md section 7): 0, 0.25, ..., 2.5.
CRA_GRID = tuple(float(r) for r in np.round(np.arange(0, 2.5 + 1e-9, 0.25), 2))


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
