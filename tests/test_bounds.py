"""Tests of certssb_jax.certify.bounds against independent truth (statsmodels, scipy.stats, closed forms, Monte Carlo)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from statsmodels.stats.proportion import proportion_confint

from certssb_jax.certify import bounds

# ----------------------------------------------------------------------------------------------------------
# Clopper-Pearson against statsmodels.


@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.2])
def test_clopper_pearson_matches_statsmodels(alpha):
  ks, ns = [], []
  for n in (1, 2, 7, 50, 200, 1000):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
      ks.append(k)
      ns.append(n)
  ks, ns = np.array(ks), np.array(ns)
  # The two-sided interval at 2 * alpha has one-sided alpha in each tail.
  want_lo, want_hi = proportion_confint(ks, ns, alpha=2 * alpha, method="beta")
  got_lo = bounds.clopper_pearson_lower(ks, ns, alpha)
  got_hi = bounds.clopper_pearson_upper(ks, ns, alpha)
  np.testing.assert_allclose(got_lo, want_lo, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(got_hi, want_hi, rtol=1e-10, atol=1e-14)
  assert np.all(got_lo[ks == 0] == 0.0)
  assert np.all(got_hi[ks == ns] == 1.0)
  assert got_lo.dtype == np.float64


def test_clopper_pearson_closed_forms():
  # k = n: the lower bound is alpha^(1/n); k = 0: the upper bound is 1 - alpha^(1/n).
  n = np.array([1, 10, 1000])
  np.testing.assert_allclose(bounds.clopper_pearson_lower(n, n, 0.001), 0.001 ** (1 / n), rtol=1e-12)
  np.testing.assert_allclose(bounds.clopper_pearson_upper(0, n, 0.001), 1 - 0.001 ** (1 / n), rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# Monte-Carlo coverage.

_DRAWS = 20_000


def _upper_limit(alpha: float, draws: int = _DRAWS) -> float:
  return alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws)


@pytest.mark.parametrize("p", [0.3, 0.45, 0.8, 0.95])
def test_clopper_pearson_coverage(p):
  alpha, n = 0.05, 50
  rng = np.random.default_rng(1234)
  k = rng.binomial(n, p, size=_DRAWS)
  miss = np.mean(bounds.clopper_pearson_lower(k, n, alpha) > p)
  assert miss <= _upper_limit(alpha)
  if p in (0.3, 0.45, 0.8):
    # At these p the exact miss probability of CP at n = 50 is 0.045 to 0.048: the bound is not loose.
    assert miss >= 0.6 * alpha


def test_clopper_pearson_upper_coverage():
  alpha, n, p = 0.05, 50, 0.2
  rng = np.random.default_rng(7)
  k = rng.binomial(n, p, size=_DRAWS)
  miss = np.mean(bounds.clopper_pearson_upper(k, n, alpha) < p)
  assert miss <= _upper_limit(alpha)
  assert miss >= 0.4 * alpha


@pytest.mark.parametrize("p", [(1 / 3, 1 / 3, 1 / 3), (0.4, 0.3, 0.3)])
def test_certify_bonferroni_coverage_multinomial(p):
  alpha, n = 0.05, 50
  p = np.asarray(p)
  rng = np.random.default_rng(99)
  votes = rng.multinomial(n, p, size=_DRAWS)  # (draws, 3)
  selected = np.argmax(votes, axis=1)

  cert = bounds.certify_counts(votes, alpha=alpha)
  miss = np.mean(p[selected] < cert.p_lower)
  assert miss <= _upper_limit(alpha)
  assert miss >= 0.01  # about 0.033 / 0.041: Bonferroni at K = 3 is not grossly loose here.

  # Without the selection correction the same bound misses far more often than alpha: the correction matters.
  naive = bounds.certify_counts(votes, alpha=alpha, correction=None)
  assert np.mean(p[selected] < naive.p_lower) > 2 * alpha


def test_certify_holdout_coverage_multinomial():
  alpha, p = 0.05, np.array([0.4, 0.3, 0.3])
  rng = np.random.default_rng(5)
  selection = rng.multinomial(20, p, size=_DRAWS)
  votes = rng.multinomial(50, p, size=_DRAWS)
  cert = bounds.certify_counts(votes, alpha=alpha, correction="holdout", selection_votes=selection)
  selected = np.argmax(selection, axis=1)
  miss = np.mean(p[selected] < cert.p_lower)
  assert miss <= _upper_limit(alpha)
  assert miss >= 0.02
  # The estimate uses the estimation votes only, at level alpha with no K factor.
  k = votes[np.arange(_DRAWS), selected]
  want = np.where(k == 0, 0.0, scipy.stats.beta.ppf(alpha, np.maximum(k, 1), 50 - k + 1))
  np.testing.assert_allclose(cert.p_lower, want, rtol=1e-12)
  np.testing.assert_array_equal(cert.votes_top, k)


def test_certify_hoeffding_coverage():
  # Each model's class-0 probability is a [0, 1] variable with known mean 0.6.
  alpha, m, draws = 0.05, 40, 5_000
  rng = np.random.default_rng(3)
  probs = rng.beta(6.0, 4.0, size=(draws, m))  # mean 0.6
  soft = np.stack([probs.sum(axis=1), (1 - probs).sum(axis=1)], axis=1)  # (draws, 2)
  cert = bounds.certify_counts(None, alpha=alpha, bound="hoeffding", soft_sums=soft, num_models=m,
                               correction=None)
  assert np.all(np.argmax(soft, axis=1) == 0)
  assert np.mean(cert.p_lower > 0.6) <= _upper_limit(alpha, draws)


# ----------------------------------------------------------------------------------------------------------
# Hoeffding.


def test_hoeffding_lower_formula_and_real_m():
  alpha = 0.001
  got_200 = bounds.hoeffding_lower(0.97, 200, alpha)
  got_1000 = bounds.hoeffding_lower(0.97, 1000, alpha)
  assert got_200 == pytest.approx(0.97 - math.sqrt(math.log(1000.0) / 400.0), abs=1e-15)
  assert got_1000 == pytest.approx(0.97 - math.sqrt(math.log(1000.0) / 2000.0), abs=1e-15)
  assert got_200 < got_1000 - 0.05
  assert bounds.hoeffding_lower(0.01, 10, alpha) == 0.0  # clipped at 0


def test_certify_hoeffding_uses_given_num_models():
  alpha, m = 0.001, 200
  soft = np.array([[190.0, 10.0], [30.0, 170.0], [101.0, 99.0]])  # (3, 2), rows sum to M
  votes = np.array([[195, 5], [20, 180], [100, 100]])
  cert = bounds.certify_counts(votes, alpha=alpha, bound="hoeffding", soft_sums=soft, num_models=m)
  h = math.sqrt(math.log(2 / alpha) / (2 * m))  # Bonferroni over K = 2 classes
  want = np.array([190 / m - h, 170 / m - h, 101 / m - h])
  np.testing.assert_allclose(cert.p_lower, want, rtol=1e-14)
  np.testing.assert_array_equal(cert.pred, [0, 1, -1])
  np.testing.assert_array_equal(cert.votes_top, [195, 180, 100])
  # Claiming M = 1000 for the same scores would give a different (tighter) bound.
  tight = bounds.hoeffding_lower(190 / m, 1000, alpha / 2)
  assert tight > cert.p_lower[0] + 0.05


# ----------------------------------------------------------------------------------------------------------
# Margin, radius, abstain.


def test_margin_and_radii_match_norm_ppf():
  alpha = 0.001
  votes = np.array([[1000, 0], [0, 1000], [900, 100], [520, 480], [500, 500], [300, 700]])  # (6, 2)
  sigma_x = np.array([0.12, 0.25, 0.5, 1.0, 0.3, 0.4])
  sigma_min = np.array([0.1, 0.25, 0.2, 0.5, 0.3, 0.35])
  cert = bounds.certify_counts(votes, alpha=alpha, sigma_x=sigma_x, sigma_min=sigma_min)

  top = np.argmax(votes, axis=1)
  k = votes[np.arange(6), top]
  p_low = np.where(k == 0, 0.0, scipy.stats.beta.ppf(alpha / 2, k, 1000 - k + 1))
  p_high = 1 - p_low
  certified = p_low > p_high
  want_margin = np.where(certified, 0.5 * (scipy.stats.norm.ppf(p_low) - scipy.stats.norm.ppf(p_high)), 0.0)
  np.testing.assert_allclose(cert.p_lower, p_low, rtol=1e-12)
  np.testing.assert_allclose(cert.p_upper_runner, p_high, rtol=1e-12)
  np.testing.assert_allclose(cert.margin, want_margin, rtol=1e-10, atol=0)
  np.testing.assert_allclose(cert.radius, sigma_min * want_margin, rtol=1e-10, atol=0)
  np.testing.assert_allclose(cert.radius_test, sigma_x * want_margin, rtol=1e-10, atol=0)
  np.testing.assert_array_equal(cert.pred, [0, 1, 0, -1, -1, 1])
  assert cert.pred.dtype == np.int64 and cert.votes_top.dtype == np.int64
  np.testing.assert_array_equal(cert.votes_top, [1000, 1000, 900, 520, 500, 700])
  # Abstained inputs: everything radius-like is exactly 0, and flagged.
  for field in (cert.margin, cert.radius, cert.radius_test):
    assert np.all(field[cert.abstained] == 0.0)
    assert np.all(field[~cert.abstained] > 0.0)


def test_ties_go_to_lowest_class_and_scalar_sigma():
  votes = np.array([[0, 500, 500], [400, 400, 200]])
  cert = bounds.certify_counts(votes, alpha=0.001, sigma_x=0.5)
  np.testing.assert_array_equal(cert.votes_top, [500, 400])
  np.testing.assert_array_equal(cert.pred, [-1, -1])  # below 1/2: abstain
  # Holdout selection tie between classes 1 and 2 goes to class 1, whose estimation votes certify.
  sel = np.array([[0, 10, 10]])
  cert = bounds.certify_counts(np.array([[0, 950, 50]]), alpha=0.001, correction="holdout",
                               selection_votes=sel, sigma_x=0.5)
  assert cert.pred[0] == 1
  assert cert.radius[0] == cert.radius_test[0] == pytest.approx(0.5 * cert.margin[0])


def test_reference_certificate_formulas():
  m, alpha = 200, 0.001
  soft = np.array([[190.0, 10.0], [80.0, 120.0], [100.0, 100.0]])  # (3, 2)
  sigma_search = np.array([0.3, 0.2, 0.25])
  cert = bounds.reference_certificate(soft, sigma_search, 0.12, alpha)
  h = math.sqrt(math.log(1 / alpha) / 2 / 1000)  # the reference's hard-coded 1000
  pa = np.array([0.95, 0.6, 0.5])
  pb = 1 - pa
  margin = 0.5 * (scipy.stats.norm.ppf(pa - h) - scipy.stats.norm.ppf(pb + h))
  margin = np.where(margin > 0, margin, 0.0)
  np.testing.assert_allclose(cert.margin, margin, rtol=1e-10)
  np.testing.assert_allclose(cert.radius, sigma_search * margin, rtol=1e-10)
  np.testing.assert_array_equal(cert.pred, [0, 1, -1])
  # It certifies more than the sound Hoeffding certificate at the real M.
  sound = bounds.certify_counts(None, alpha=alpha, bound="hoeffding", soft_sums=soft, num_models=m,
                                sigma_x=0.12)
  assert np.all(cert.radius[:2] > sound.radius_test[:2])


# ----------------------------------------------------------------------------------------------------------
# Ceiling.


def test_margin_ceiling_matches_method_section_7():
  hoeff = bounds.margin_ceiling(1000, 0.001, bound="hoeffding", correction=None)
  assert hoeff == pytest.approx(1.565, abs=5e-4)
  p = 1 - math.sqrt(math.log(1000) / 2000)
  assert hoeff == pytest.approx(scipy.stats.norm.ppf(p), rel=1e-12)
  assert hoeff * 0.12 == pytest.approx(0.188, abs=5e-4)
  cp = bounds.margin_ceiling(1000, 0.001, correction=None)
  assert cp == pytest.approx(2.46, abs=0.01)
  assert cp == pytest.approx(scipy.stats.norm.ppf(0.001 ** (1 / 1000)), rel=1e-10)
  cp_bonf = bounds.margin_ceiling(1000, 0.001)
  assert cp_bonf == pytest.approx(2.43, abs=0.01)
  assert cp_bonf == pytest.approx(scipy.stats.norm.ppf(0.0005 ** (1 / 1000)), rel=1e-10)
  assert bounds.margin_ceiling(1000, 0.001, correction="holdout") == pytest.approx(cp, rel=1e-12)
  assert bounds.margin_ceiling(1000, 0.001, num_classes=10) < cp_bonf
  # The ceiling is what a unanimous ensemble gets.
  cert = bounds.certify_counts(np.array([[1000, 0]]), alpha=0.001)
  assert cert.margin[0] == pytest.approx(cp_bonf, rel=1e-12)
  # Too few models certify nothing at all: alpha^(1/M) <= 1/2 when M <= 9 for alpha = 0.001.
  assert bounds.margin_ceiling(9, 0.001, correction=None) == 0.0
  assert bounds.margin_ceiling(10, 0.001, correction=None) > 0.0


# ----------------------------------------------------------------------------------------------------------
# Concrete attacks.


def test_whitened_norm_hand_case():
  sigma_train = np.array([0.5, 1.0, 2.0, 0.25])
  # Poison samples 0 and 2 with trigger norms 1 and 2; test trigger 0.3 at sigma_x 0.1.
  got = bounds.whitened_norm(sigma_train, [0, 2], [1.0, 2.0], 0.1, 0.3)
  assert isinstance(got, float)
  assert got == pytest.approx(math.sqrt(4.0 + 1.0 + 9.0), rel=1e-14)
  assert bounds.whitened_norm(sigma_train, [3], 1.0, 0.5, 0.0) == pytest.approx(4.0)  # scalar norm
  assert bounds.whitened_norm(sigma_train, [], [], 0.5, 1.0) == pytest.approx(2.0)  # clean training
  vec = bounds.whitened_norm(sigma_train, [1], 1.0, np.array([0.5, 1.0]), np.array([1.0, 0.0]))
  np.testing.assert_allclose(vec, [math.sqrt(5.0), 1.0])


def test_certified_against_boundary():
  sigma_train = np.array([1.0, 1.0])
  norm = bounds.whitened_norm(sigma_train, [0], 3.0, 1.0, 4.0)
  assert norm == pytest.approx(5.0)
  assert not bounds.certified_against(5.0, sigma_train, [0], 3.0, 1.0, 4.0)  # strict inequality
  assert bounds.certified_against(5.0 + 1e-9, sigma_train, [0], 3.0, 1.0, 4.0)
  assert not bounds.certified_against(0.0, sigma_train, [], [], 1.0, 0.0)  # abstained never certifies
  got = bounds.certified_against(np.array([4.9, 5.1, 0.0]), sigma_train, [0], 3.0, 1.0, 4.0)
  np.testing.assert_array_equal(got, [False, True, False])


# ----------------------------------------------------------------------------------------------------------
# Certified accuracy.


def test_certified_accuracy_hand_example():
  radius = np.array([0.0, 0.1, 0.25, 0.3, 1.0, 2.6])
  correct = np.array([False, True, True, False, True, True])
  cra = bounds.certified_accuracy(radius, correct)
  assert list(cra) == ["0.0", "0.25", "0.5", "0.75", "1.0", "1.25", "1.5", "1.75", "2.0", "2.25", "2.5"]
  assert cra["0.0"] == pytest.approx(4 / 6)  # radii 0.1, 0.25, 1.0, 2.6 among the correct ones
  assert cra["0.25"] == pytest.approx(2 / 6)  # 0.25 is not > 0.25
  assert cra["0.5"] == pytest.approx(2 / 6)
  assert cra["1.0"] == pytest.approx(1 / 6)
  assert cra["2.5"] == pytest.approx(1 / 6)
  assert bounds.certified_accuracy(radius, correct, grid=(0.05,)) == {"0.05": pytest.approx(4 / 6)}


def test_sigma_min_of():
  np.testing.assert_allclose(bounds.sigma_min_of(np.array([0.5, 0.1]), [0.3, 0.2, 0.4]), [0.2, 0.1])


# ----------------------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=0.01, bound="wilson"), "clopper_pearson"),
        (dict(alpha=0.01, correction="sidak"), "bonferroni"),
        (dict(alpha=0.01, correction="holdout"), "selection_votes"),
        (dict(alpha=0.01, bound="hoeffding"), "num_models"),
        (dict(alpha=0.01, sigma_x=0.1, sigma_min=0.2), "sigma_min"),
        (dict(alpha=0.01, sigma_x=-1.0), "sigma_x"),
        (dict(alpha=0.01, selection_votes=np.array([[1, 2], [2, 1]])), "holdout"),
    ],
)
def test_certify_counts_rejects_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bounds.certify_counts(np.array([[8, 2], [3, 7]]), **kwargs)


@pytest.mark.parametrize(
    "votes",
    [np.array([[1.5, 2.0]]), np.array([[-1, 3]]), np.array([[0, 0]]), np.array([1, 2]), np.array([[5]])],
)
def test_certify_counts_rejects_bad_votes(votes):
  with pytest.raises(ValueError, match="votes"):
    bounds.certify_counts(votes, alpha=0.01)


def test_hoeffding_rejects_inconsistent_counts():
  soft = np.array([[150.0, 50.0]])
  with pytest.raises(ValueError, match="num_models"):
    bounds.certify_counts(np.array([[150, 50]]), alpha=0.01, bound="hoeffding", soft_sums=soft,
                          num_models=1000)
  with pytest.raises(ValueError, match="sum"):
    bounds.certify_counts(None, alpha=0.01, bound="hoeffding", soft_sums=soft, num_models=100)


def test_bound_functions_reject_bad_inputs():
  with pytest.raises(ValueError, match="trials"):
    bounds.clopper_pearson_lower(0, 0, 0.05)
  with pytest.raises(ValueError, match="exceed"):
    bounds.clopper_pearson_upper(5, 4, 0.05)
  with pytest.raises(ValueError, match="alpha"):
    bounds.clopper_pearson_lower(1, 4, 1.5)
  with pytest.raises(ValueError, match="mean"):
    bounds.hoeffding_lower(1.2, 10, 0.05)
  with pytest.raises(ValueError, match="correction"):
    bounds.margin_ceiling(1000, 0.001, correction="sidak")
  with pytest.raises(ValueError, match="num_models"):
    bounds.margin_ceiling(0, 0.001)
  with pytest.raises(ValueError, match="distinct"):
    bounds.whitened_norm([1.0, 1.0], [0, 0], 1.0, 1.0, 1.0)
  with pytest.raises(ValueError, match="poisoned_indices"):
    bounds.whitened_norm([1.0, 1.0], [2], 1.0, 1.0, 1.0)
  with pytest.raises(ValueError, match="shape"):
    bounds.certified_accuracy(np.zeros(3), np.ones(2, bool))
