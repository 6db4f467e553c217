"""Tests of the sample-specific sigma search (docs/method.md section 4) against independent truth.

The key test builds a 1-D slab scorer whose smoothed probability psi(sigma) is computed independently by
quadrature (scipy, float64), finds the maximiser of r(sigma) on a grid, and checks that the stochastic ascent
lands there. Other tests check hand-computed updates (constant scorers, the reference rule), a float64
finite-difference replica of the reparameterised gradient for a K = 3 scorer, batching invariance, clipping,
validation and that a batched run compiles once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, optimize, special, stats

from certssb_jax import rng
from certssb_jax.defenses import sigma_search as ss

KEY = rng.stream(0, rng.SIGMA_SEARCH)

# Runs with more than a few steps on toy scorers pass unroll=1: without convolutions to break fusion, XLA:CPU
# fuses across fully unrolled steps and compile time grows ~T^2 (the CPU default is full unrolling).

# ----------------------------------------------------------------------------------------------------------
# Slab scorer: class-1 probability F(u) = LO + (HI - LO) * [sigmoid((u + W) / TAU) - sigmoid((u - W) / TAU)]
# of the first coordinate u = x_0 (a soft indicator of |u| < W; the other coordinates are ignored). F stays in
# [LO, HI] = [0.1, 0.9], inside [kappa, 1 - kappa], so the clip never acts and r is smooth; for x = 0,
# r(sigma) = sigma * Phi^-1(psi_1(sigma)) first grows (psi_1 ~ 0.9) and then falls (psi_1 -> 0.1 as the noise
# leaves the slab): an interior maximiser near sigma = 0.57.
# ----------------------------------------------------------------------------------------------------------
SLAB_LO, SLAB_HI, SLAB_W, SLAB_TAU = 0.1, 0.9, 1.0, 0.1
INPUT_SHAPE = (3,)


def slab_score(params, xb):
  del params
  u = xb[:, 0]  # (B,)
  p = SLAB_LO + (SLAB_HI - SLAB_LO) * (jax.nn.sigmoid((u + SLAB_W) / SLAB_TAU) -
                                       jax.nn.sigmoid((u - SLAB_W) / SLAB_TAU))
  return jnp.stack([1.0 - p, p], axis=-1)  # (B, 2)


def slab_f64(u):
  return SLAB_LO + (SLAB_HI - SLAB_LO) * (special.expit((u + SLAB_W) / SLAB_TAU) -
                                          special.expit((u - SLAB_W) / SLAB_TAU))


def slab_psi(u0: float, sigma: float) -> float:
  """psi_1(sigma) = E F(u0 + sigma z), z ~ N(0, 1), by adaptive quadrature in float64."""
  integrand = lambda z: slab_f64(u0 + sigma * z) * stats.norm.pdf(z)
  breaks = [(-SLAB_W - u0) / sigma, (SLAB_W - u0) / sigma]
  breaks = [b for b in breaks if -12 < b < 12]
  return integrate.quad(integrand, -12, 12, points=breaks or None, limit=200, epsabs=1e-12)[0]


def slab_radius(u0: float, sigma: float, kappa: float = 0.02) -> float:
  """r(sigma) for target class 1 of the binary slab scorer (class B = 0, psi_B = 1 - psi_1)."""
  psi = slab_psi(u0, sigma)
  clip = lambda p: np.clip(p, kappa, 1 - kappa)
  return 0.5 * sigma * (stats.norm.ppf(clip(psi)) - stats.norm.ppf(clip(1 - psi)))


def grid_maximiser(u0: float, lo: float, hi: float) -> tuple[float, np.ndarray, np.ndarray]:
  """Maximiser of r on [lo, hi]: a 0.01 grid, refined by bounded Brent around the best grid point."""
  grid = np.linspace(lo, hi, int(round((hi - lo) / 0.01)) + 1)
  r = np.array([slab_radius(u0, s) for s in grid])
  i = int(np.argmax(r))
  if 0 < i < len(grid) - 1:
    res = optimize.minimize_scalar(lambda s: -slab_radius(u0, s), bounds=(grid[i - 1], grid[i + 1]),
                                   method="bounded", options={"xatol": 1e-6})
    return float(res.x), grid, r
  return float(grid[i]), grid, r


def slab_inputs(num: int, u0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  x = np.zeros((num, *INPUT_SHAPE), np.float32)
  x[:, 0] = u0
  x[:, 1:] = np.linspace(0.2, 0.8, num)[:, None]  # irrelevant coordinates, different per sample
  return x, np.ones(num, np.int32), np.arange(num, dtype=np.int32)


def test_interior_maximiser_matches_quadrature():
  u0, lo, hi = 0.0, 0.05, 3.0
  sigma_star, grid, r = grid_maximiser(u0, lo, hi)
  # Really interior: the maximiser is well inside the bounds and beats both ends clearly.
  assert lo + 0.2 < sigma_star < hi - 0.2
  assert r.max() > max(r[0], r[-1]) + 0.3
  assert 0.5 < sigma_star < 0.65  # ~0.572

  # Tolerance from the Monte-Carlo noise. Near sigma*, r'' = -3.2 (from the grid), so plain ascent contracts
  # by 1 - lr |r''| = 0.84 per step: from sigma_0 = 0.2 the transient is < 1e-4 after T = 60 steps. With
  # S = 1024 draws the gradient estimate has sd ~0.07 (one draw ~2.2, measured), so the final iterate jitters
  # around sigma* with sd ~ sqrt(lr var_g / (2 |r''|)) ~ 0.0063. Each of 16 independent samples must lie
  # within 0.04 (> 6 sd) and their mean within 0.008 (> 5 standard errors of 0.0016).
  num = 16
  config = ss.SearchConfig(sigma_0=0.2, sigma_lo=lo, sigma_hi=hi, num_steps=60, num_draws=1024, lr=0.05)
  x, target, indices = slab_inputs(num, u0)
  sigma = np.asarray(ss.search_sigma(slab_score, None, x, target, indices, KEY, config, unroll=1))
  assert sigma.shape == (num,) and sigma.dtype == np.float32
  np.testing.assert_allclose(sigma, sigma_star, atol=0.04)
  assert abs(sigma.mean() - sigma_star) < 0.008
  assert sigma.std() > 0  # different keys per sample: the draws really are independent


@pytest.mark.parametrize("lo,hi,sigma_0,bound", [(0.1, 0.4, 0.2, "hi"), (0.8, 2.0, 1.5, "lo")])
def test_maximiser_at_bound(lo, hi, sigma_0, bound):
  u0 = 0.0
  sigma_star, grid, r = grid_maximiser(u0, lo, hi)
  # r is monotone on [lo, hi], so the constrained maximiser is the bound (r' is at least ~0.5 in size there,
  # which dominates the gradient noise of ~0.14 at S = 256).
  assert sigma_star == pytest.approx(hi if bound == "hi" else lo)
  assert np.all(np.diff(r) > 0) if bound == "hi" else np.all(np.diff(r) < 0)
  config = ss.SearchConfig(sigma_0=sigma_0, sigma_lo=lo, sigma_hi=hi, num_steps=40, num_draws=256, lr=0.05)
  x, target, indices = slab_inputs(4, u0)
  sigma = np.asarray(ss.search_sigma(slab_score, None, x, target, indices, KEY, config, unroll=1))
  np.testing.assert_array_equal(sigma, np.float32(sigma_star))


# ----------------------------------------------------------------------------------------------------------
# Hand-computed updates with constant scorers (psi does not depend on sigma, so dr/dsigma = margin exactly).
# ----------------------------------------------------------------------------------------------------------


def constant_scorer(probs):
  probs = jnp.asarray(probs, jnp.float32)

  def score(params, xb):
    del params
    return jnp.broadcast_to(probs, (xb.shape[0], probs.shape[0])) + 0.0 * xb.reshape(xb.shape[0], -1)[:, :1]

  return score


def clipped_margin(p_a: float, p_b: float, kappa: float = 0.02) -> float:
  clip = lambda p: np.clip(p, kappa, 1 - kappa)
  return 0.5 * (stats.norm.ppf(clip(p_a)) - stats.norm.ppf(clip(p_b)))


def hand_ascent(sigma_0: float, step: float, num_steps: int, lo: float, hi: float) -> float:
  sigma = sigma_0
  for _ in range(num_steps):
    sigma = min(max(sigma + step, lo), hi)
  return sigma


@pytest.mark.parametrize(
    "target,p_b",
    [(1, 0.3),  # A = 1 (0.5): B must be class 2 (0.3), not class 0 (0.2)
     (2, 0.5),  # A = 2 (0.3): B = class 1 (0.5), negative margin, sigma shrinks
     (0, 0.5)])
def test_k3_constant_scorer_runner_up_and_steps(target, p_b):
  probs = [0.2, 0.5, 0.3]
  score = constant_scorer(probs)
  lo, hi, sigma_0, lr, num_steps = 0.1, 1.0, 0.5, 0.05, 6
  config = ss.SearchConfig(sigma_0=sigma_0, sigma_lo=lo, sigma_hi=hi, num_steps=num_steps, num_draws=2, lr=lr)
  x = np.full((3, 2, 2, 1), 0.5, np.float32)  # image-shaped inputs
  sigma = ss.search_sigma(score, None, x, np.full(3, target), np.arange(3), KEY, config, unroll=1)
  assert sigma.shape == (3,)
  step = lr * clipped_margin(probs[target], p_b)
  expected = hand_ascent(sigma_0, step, num_steps, lo, hi)
  np.testing.assert_allclose(np.asarray(sigma), expected, rtol=1e-5)
  # The runner-up really matters: with B = the weakest class the answer would differ.
  wrong = hand_ascent(sigma_0, lr * clipped_margin(probs[target], min(np.delete(probs, target))), num_steps,
                      lo, hi)
  assert abs(expected - wrong) > 1e-3


def test_saturated_scorer_grows_by_probit_of_kappa_and_clips_at_hi():
  # psi_A = 0.995 > 1 - kappa and psi_B = 0.005 < kappa: r = sigma * Phi^-1(0.98), gradient 2.054 per step.
  score = constant_scorer([0.005, 0.995])
  config = ss.SearchConfig(sigma_0=0.2, sigma_lo=0.1, sigma_hi=0.55, num_steps=5, num_draws=1, lr=0.02)
  sigma = ss.search_sigma(score, None, np.zeros((2, 1), np.float32), np.ones(2, np.int32), np.arange(2), KEY, config,
                          unroll=1)
  np.testing.assert_allclose(np.asarray(sigma), 0.2 + 5 * 0.02 * stats.norm.ppf(0.98), rtol=1e-5)
  sigma = ss.search_sigma(score, None, np.zeros((2, 1), np.float32), np.ones(2, np.int32), np.arange(2), KEY,
                          dataclasses.replace(config, num_steps=12), unroll=1)
  np.testing.assert_array_equal(np.asarray(sigma), np.float32(0.55))  # 0.2 + 12 * 0.041 > 0.55: clipped


def test_zero_steps_returns_sigma_0():
  config = ss.SearchConfig(sigma_0=0.3, sigma_lo=0.1, sigma_hi=1.0, num_steps=0)
  x, target, indices = slab_inputs(3, 0.0)
  np.testing.assert_array_equal(np.asarray(ss.search_sigma(slab_score, None, x, target, indices, KEY, config)),
                                np.float32(0.3))


# ----------------------------------------------------------------------------------------------------------
# The reparameterised gradient against a float64 finite-difference replica with the same draws (K = 3).
# The draws follow the documented layout: normal(fold_in(fold_in(key, j), t), (S, *input_shape), float32).
# ----------------------------------------------------------------------------------------------------------
W3 = np.array([[2.0, -1.0], [-1.5, 2.5], [0.5, 0.3]])  # (K, D) logits = W x + b
B3 = np.array([0.2, -0.1, 0.0])


def softmax_score(params, xb):
  w, b = params
  return jax.nn.softmax(xb @ w.T + b, axis=-1)  # (B, K)


def replica_draws(key, index: int, t: int, num_draws: int, shape) -> np.ndarray:
  k = jax.random.fold_in(jax.random.fold_in(key, index), t)
  return np.asarray(jax.random.normal(k, (num_draws, *shape), jnp.float32), np.float64)


def replica_psi(x: np.ndarray, sigma: float, z: np.ndarray) -> np.ndarray:
  logits = (x[None] + sigma * z) @ W3.T + B3  # (S, K)
  return special.softmax(logits, axis=-1).mean(axis=0)  # (K,)


def test_k3_reparam_steps_match_float64_finite_differences():
  num_draws, num_steps, lr, kappa, lo, hi = 16, 3, 0.1, 0.02, 0.05, 2.0
  x = np.array([[0.3, 0.6], [0.8, 0.1], [0.5, 0.5]], np.float32)
  target = np.array([1, 0, 2])
  indices = np.array([7, 11, 3])
  config = ss.SearchConfig(sigma_0=0.4, sigma_lo=lo, sigma_hi=hi, num_steps=num_steps, num_draws=num_draws,
                           lr=lr, kappa=kappa)
  params = (jnp.asarray(W3, jnp.float32), jnp.asarray(B3, jnp.float32))
  sigma = np.asarray(ss.search_sigma(softmax_score, params, x, target, indices, KEY, config))

  runner_ups = set()
  for i in range(len(x)):
    s = 0.4
    for t in range(num_steps):
      z = replica_draws(KEY, int(indices[i]), t, num_draws, (2,))
      psi = replica_psi(x[i].astype(np.float64), s, z)
      b = max((c for c in range(3) if c != target[i]), key=lambda c: psi[c])  # naive runner-up
      runner_ups.add((int(target[i]), b))

      def r(sig, b=b, z=z, i=i):
        p = np.clip(replica_psi(x[i].astype(np.float64), sig, z), kappa, 1 - kappa)
        return 0.5 * sig * (stats.norm.ppf(p[target[i]]) - stats.norm.ppf(p[b]))

      h = 1e-5
      grad = (r(s + h) - r(s - h)) / (2 * h)
      s = min(max(s + lr * grad, lo), hi)
    np.testing.assert_allclose(sigma[i], s, rtol=2e-5, atol=2e-6)
    assert abs(s - 0.4) > 1e-3  # the search really moved
  assert len(runner_ups) >= 2


# ----------------------------------------------------------------------------------------------------------
# The "reference" rule: detached scores, sigma += lr * |gap| / 2, never decreasing.
# ----------------------------------------------------------------------------------------------------------


def reference(**kwargs):
  rule = ss.RULES["reference"]
  return ss.SearchConfig(rule="reference", lr=rule.lr, num_draws=rule.num_draws, **kwargs)


def test_rule_defaults():
  assert (ss.RULES["reference"].lr, ss.RULES["reference"].num_draws) == (1e-4, 1)
  assert [ss.RULES["reference"].num_steps(t) for t in ("onepixel", "fourpixel", "blending")] == [850, 1100, 1100]
  assert (ss.RULES["reparam"].lr, ss.RULES["reparam"].num_draws, ss.RULES["reparam"].num_steps("onepixel")) == (
      0.05, 8, 10)


@pytest.mark.parametrize("trigger,increment", [("onepixel", 0.1746), ("fourpixel", 0.2259)])
def test_reference_rule_largest_increment_is_steps_lr_probit(trigger, increment):
  # A saturated scorer (p_A = 0.995 > 1 - kappa): every step adds lr * Phi^-1(0.98), the most the rule can add.
  # With the release's step counts this is the largest increment of the released sigmas.
  steps = ss.RULES["reference"].num_steps(trigger)
  config = reference(sigma_0=0.25, sigma_lo=0.25, sigma_hi=10.0, num_steps=steps)
  sigma = ss.search_sigma(constant_scorer([0.005, 0.995]), None, np.zeros((3, 2), np.float32), np.ones(3, np.int32),
                          np.arange(3), KEY, config, unroll=1)
  expected = steps * 1e-4 * stats.norm.ppf(0.98)
  np.testing.assert_allclose(np.asarray(sigma) - 0.25, expected, rtol=1e-4)
  assert ss.largest_increment(config) == pytest.approx(expected, rel=1e-9)
  assert expected == pytest.approx(increment, abs=5e-5)


def test_reference_rule_constant_scorer_by_hand():
  # p_A = 0.9: |gap| = 2 Phi^-1(0.9) whatever the class; each step adds lr * Phi^-1(0.9), also when A is the
  # weaker class (the rule uses |gap|, so sigma grows even for a misclassified sample).
  score = constant_scorer([0.1, 0.9])
  config = dataclasses.replace(reference(sigma_0=0.12, sigma_lo=0.12, sigma_hi=1.0, num_steps=7), lr=0.01)
  sigma = ss.search_sigma(score, None, np.zeros((2, 4), np.float32), np.array([1, 0]), np.arange(2), KEY,
                          config, unroll=1)
  np.testing.assert_allclose(np.asarray(sigma), 0.12 + 7 * 0.01 * stats.norm.ppf(0.9), rtol=1e-5)


def logistic_score(params, xb):
  w, b = params
  return ss.binary_probs(xb @ w + b)  # (B, 2)


def test_reference_rule_follows_hand_increments_and_never_decreases():
  w, b = np.array([3.0, -2.0]), 0.5
  params = (jnp.asarray(w, jnp.float32), jnp.float32(b))
  x = np.array([[0.2, 0.7], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]], np.float32)
  target = np.array([0, 1, 1, 1])
  indices = np.arange(10, 14)
  lo, hi, lr, kappa = 0.1, 5.0, 0.05, 0.02
  finals = []
  for num_steps in range(5):
    config = dataclasses.replace(reference(sigma_0=0.25, sigma_lo=lo, sigma_hi=hi, num_steps=num_steps), lr=lr)
    finals.append(np.asarray(ss.search_sigma(logistic_score, params, x, target, indices, KEY, config,
                                             unroll=1)))
  finals = np.stack(finals)  # (T + 1, N): sigma after 0..4 steps (prefixes of the same run)
  assert np.all(np.diff(finals, axis=0) >= 0)
  assert np.all(np.diff(finals, axis=0)[-1] > 0)

  for i in range(len(x)):
    s = 0.25
    for t in range(4):
      z = replica_draws(KEY, int(indices[i]), t, 1, (2,))[0]
      p = special.expit((x[i] + s * z) @ w + b)  # one draw, detached
      clip = lambda q: np.clip(q, kappa, 1 - kappa)
      gap = abs(stats.norm.ppf(clip(p)) - stats.norm.ppf(clip(1 - p)))
      s = min(max(s + lr * gap / 2, lo), hi)
      np.testing.assert_allclose(finals[t + 1, i], s, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Batching, compilation, unrolling.
# ----------------------------------------------------------------------------------------------------------
SMALL = ss.SearchConfig(sigma_0=0.3, sigma_lo=0.05, sigma_hi=2.0, num_steps=4, num_draws=8, lr=0.05)


def test_batching_invariance():
  x, target, indices = slab_inputs(5, 0.3)
  indices = np.array([40, 3, 17, 8, 25])
  full = np.asarray(ss.search_sigma(slab_score, None, x, target, indices, KEY, SMALL, unroll=1))
  alone = np.asarray(ss.search_sigma(slab_score, None, x[2:3], target[2:3], indices[2:3], KEY, SMALL, unroll=1))
  np.testing.assert_allclose(alone, full[2:3], rtol=1e-6)
  batched = ss.search_sigma_batched(slab_score, None, x, target, indices, KEY, SMALL, batch_size=2, unroll=1)
  assert isinstance(batched, np.ndarray) and batched.shape == (5,)
  np.testing.assert_allclose(batched, full, rtol=1e-6)
  # Same input, different global index: different draws, different sigma (the index is what keys a sample).
  other = np.asarray(ss.search_sigma(slab_score, None, x[2:3], target[2:3], np.array([41]), KEY, SMALL, unroll=1))
  assert abs(float(other[0]) - float(full[2])) > 1e-6


def test_unroll_does_not_change_result():
  x, target, indices = slab_inputs(3, 0.3)
  results = [np.asarray(ss.search_sigma(slab_score, None, x, target, indices, KEY, SMALL, unroll=u))
             for u in (1, 3, True)]
  for res in results[1:]:
    np.testing.assert_allclose(res, results[0], rtol=1e-6)


def test_batched_driver_compiles_once_and_reports_progress():
  traces = []

  def counting_score(params, xb):
    if xb.shape[0] == SMALL.num_draws:  # the search's own trace (shape checks use a batch of 1)
      traces.append(xb.shape)
    return slab_score(params, xb)

  x, target, indices = slab_inputs(7, 0.3)
  done = []
  out = ss.search_sigma_batched(counting_score, None, x, target, indices, KEY, SMALL, batch_size=3,
                                progress=done.append)
  assert done == [3, 6, 7]
  assert len(traces) == 1  # three batches, the last one padded: one trace
  again = ss.search_sigma_batched(counting_score, None, x, target, indices, KEY, SMALL, batch_size=3)
  assert len(traces) == 1
  np.testing.assert_array_equal(again, out)
  reference = np.asarray(ss.search_sigma(slab_score, None, x, target, indices, KEY, SMALL))
  np.testing.assert_allclose(out, reference, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Objectives: which class the search maximises the radius of.
# ----------------------------------------------------------------------------------------------------------


def test_objectives_pick_class_a():
  # Inside the slab (u0 = 0) the noise-free class is 1 (F = 0.9), but at sigma_hi = 3 most of the noise leaves
  # the slab: psi_1(3) = 0.31 by quadrature, so the class that survives the noise is 0.
  config = ss.SearchConfig(sigma_0=0.3, sigma_lo=0.1, sigma_hi=3.0, num_steps=2, num_draws=8, target_draws=512)
  assert slab_psi(0.0, 3.0) == pytest.approx(0.31, abs=0.01)
  x, _, indices = slab_inputs(6, 0.0)
  labels = np.array([0, 1, 0, 1, 1, 0])
  pick = lambda name, lab: np.asarray(ss.OBJECTIVES[name].target(slab_score, None, jnp.asarray(x), lab, indices,
                                                                  KEY, config))
  np.testing.assert_array_equal(pick("robust_prediction", labels), 0)
  np.testing.assert_array_equal(pick("prediction", labels), 1)
  np.testing.assert_array_equal(pick("label", labels), labels)
  np.testing.assert_array_equal(pick("label", None), 1)  # no labels (test inputs): the scorer's class
  assert [name for name, o in ss.OBJECTIVES.items() if o.reads_labels] == ["label"]


def test_find_sigmas_is_the_objective_then_the_search():
  config = ss.SearchConfig(sigma_0=0.3, sigma_lo=0.1, sigma_hi=3.0, num_steps=3, num_draws=8, target_draws=64)
  x, _, _ = slab_inputs(5, 0.0)
  x[:, 0] = [0.0, 0.5, 0.9, 1.5, -0.2]
  indices = np.array([4, 9, 2, 30, 7])
  done = []
  sigma, target = ss.find_sigmas(slab_score, None, x, None, indices, KEY, config, "robust_prediction",
                                 batch_size=2, unroll=1, progress=done.append)
  assert done == [2, 4, 5] and sigma.shape == target.shape == (5,)
  expected_target = ss.OBJECTIVES["robust_prediction"].target(slab_score, None, jnp.asarray(x), None, indices,
                                                              jax.random.fold_in(KEY, 0), config)
  np.testing.assert_array_equal(target, np.asarray(expected_target))
  expected = ss.search_sigma_batched(slab_score, None, x, target, indices, jax.random.fold_in(KEY, 1), config,
                                     batch_size=5, unroll=1)
  np.testing.assert_allclose(sigma, expected, rtol=1e-6)
  with pytest.raises(ValueError, match="objective"):
    ss.find_sigmas(slab_score, None, x, None, indices, KEY, config, "nosuch", batch_size=2)


def test_steps_split_into_programs_give_the_single_program_result(monkeypatch):
  x, target, indices = slab_inputs(3, 0.3)
  config = dataclasses.replace(SMALL, num_steps=7)
  whole = np.asarray(ss.search_sigma(slab_score, None, x, target, indices, KEY, config, unroll=1))
  monkeypatch.setattr(ss, "CPU_STEPS_PER_CALL", 3)  # 3 + 3 + 1 steps
  split = np.asarray(ss.search_sigma(slab_score, None, x, target, indices, KEY, config, unroll=1))
  np.testing.assert_allclose(split, whole, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Helpers and validation.
# ----------------------------------------------------------------------------------------------------------


def test_probit_matches_scipy():
  p = np.linspace(0.02, 0.98, 2001)
  np.testing.assert_allclose(np.asarray(ss.probit(jnp.asarray(p, jnp.float32))), stats.norm.ppf(p), atol=2e-6)


def test_binary_probs_and_runner_up():
  logits = np.array([-30.0, -3.0, 0.0, 2.5, 30.0], np.float32)
  probs = np.asarray(ss.binary_probs(logits))
  assert probs.shape == (5, 2)
  np.testing.assert_allclose(probs[:, 1], special.expit(logits), rtol=1e-6)
  np.testing.assert_allclose(probs[:, 0], special.expit(-logits), rtol=1e-6)  # also tiny 1 - p
  assert ss.binary_probs(jnp.zeros((4, 3))).shape == (4, 3, 2)

  psi = np.random.default_rng(0).dirichlet(np.ones(5), size=20)  # (20, 5)
  target = np.random.default_rng(1).integers(0, 5, size=20)
  got = np.asarray(ss.runner_up(jnp.asarray(psi), jnp.asarray(target)))
  for i in range(20):
    best = max((c for c in range(5) if c != target[i]), key=lambda c: psi[i, c])
    assert got[i] == best


@pytest.mark.parametrize("changes,match", [
    ({"sigma_0": 0.05}, "sigma_0"),
    ({"sigma_0": 1.5}, "sigma_0"),
    ({"sigma_lo": 0.0, "sigma_0": 0.1}, "sigma_lo"),
    ({"sigma_hi": 0.05}, "sigma_hi"),
    ({"num_steps": -1}, "num_steps"),
    ({"num_steps": 2.0}, "num_steps"),
    ({"num_draws": 0}, "num_draws"),
    ({"lr": 0.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"kappa": 0.0}, "kappa"),
    ({"kappa": 0.5}, "kappa"),
    ({"rule": "adam"}, "rule"),
    ({"target_draws": 0}, "target_draws"),
])
def test_config_validation(changes, match):
  config = dataclasses.replace(ss.SearchConfig(sigma_0=0.25, sigma_lo=0.1, sigma_hi=1.0), **changes)
  with pytest.raises(ValueError, match=match):
    config.validate()
  x, target, indices = slab_inputs(2, 0.0)
  with pytest.raises(ValueError, match=match):
    ss.search_sigma(slab_score, None, x, target, indices, KEY, config)


def test_input_validation():
  x, target, indices = slab_inputs(3, 0.0)
  run = lambda **kw: ss.search_sigma(**{"score_fn": slab_score, "params": None, "x": x, "target": target,
                                        "indices": indices, "key": KEY, "config": SMALL, **kw})
  with pytest.raises(ValueError, match="target"):
    run(target=target[:2])
  with pytest.raises(ValueError, match="target"):
    run(target=target.astype(np.float32))
  with pytest.raises(ValueError, match="target"):
    run(target=np.array([0, 1, 2]))  # K = 2
  with pytest.raises(ValueError, match="indices"):
    run(indices=np.array([0, -1, 2]))
  with pytest.raises(ValueError, match="key"):
    run(key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="K >= 2"):
    run(score_fn=lambda params, xb: jnp.ones((xb.shape[0], 1)))
  with pytest.raises(ValueError, match="batch_size"):
    ss.search_sigma_batched(slab_score, None, x, target, indices, KEY, SMALL, batch_size=0)
  with pytest.raises(ValueError, match="same length"):
    ss.search_sigma_batched(slab_score, None, x, target[:2], indices, KEY, SMALL, batch_size=2)
