"""Soundness of the certificates against closed-form truth, and the contradiction the storage update removes.

A linear base classifier f(x) = 1[w.x + b > 0] has the smoothed class probability Phi(|w.x + b| / (sigma ||w||))
at every noise level, so the smoothed classifier's decision boundary is the hyperplane itself and the true
distance of x to it is |w.x + b| / ||w||, whatever sigma_x. Every certificate (class and radius) can be checked
exactly; at most an alpha fraction may be wrong.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from certssb_jax import bounds
from certssb_jax import certify
from certssb_jax import models
from certssb_jax import rng
from certssb_jax import sigma_search
from certssb_jax import store as store_lib
from certssb_jax.member import MemberState

W = np.array([0.6, -0.8, 1.2, 0.5], np.float32)
B = np.float32(0.1)
SHAPE = (2, 2, 1)


class Linear(nn.Module):
  """One logit w.x + b of the flattened input (the train flag is the model interface's)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(1, name="head")(x.reshape(x.shape[0], -1))


PARAMS = {"head": {"kernel": jnp.asarray(W)[:, None], "bias": jnp.asarray([B])}}


def linear_inputs(rng_np, n, sigma_scale):
  """n inputs at signed distances uniform in [-3, 3] * sigma_scale from the hyperplane, random elsewhere."""
  x = rng_np.normal(size=(n, W.size))
  x -= np.outer((x @ W + B) / (W @ W), W)  # onto the hyperplane
  d = rng_np.uniform(-3, 3, n) * sigma_scale
  x += np.outer(d, W / np.linalg.norm(W))
  return x.reshape(n, *SHAPE).astype(np.float32), d


def check(pred, radius, d):
  """Violations: a certified class that is not the smoothed classifier's, or a radius beyond the boundary."""
  true_class = (d > 0).astype(int)
  return (pred != -1) & ((pred != true_class) | (radius > np.abs(d)))


def certify_linear(x, sigma, seed, num_models, alpha, plug_in=False):
  model = Linear()
  stacked = jax.tree.map(lambda a: np.repeat(np.asarray(a)[None], num_models, axis=0), PARAMS)
  preds, _ = certify.certify_inputs(model, [(np.arange(num_models), MemberState(stacked, {}, None))], x, sigma,
                                    seed=seed, num_models=num_models)
  votes = certify.votes_from_preds(preds, 2)
  if plug_in:  # the point estimate instead of a confidence bound: unsound, the harness must catch it
    p = votes.max(axis=1) / num_models
    margin = np.where(p > 0.5, stats.norm.ppf(np.clip(p, 0, 1 - 1e-12)), 0.0)
    return bounds.Certificate(np.where(p > 0.5, votes.argmax(1), -1), p, 1 - p, margin, sigma * margin,
                              sigma * margin, votes.max(1))
  return bounds.certify_counts(votes, alpha=alpha, sigma_x=sigma, sigma_min=sigma)


def linear_score(params, xb):
  del params
  return models.logits_to_probs((xb.reshape(xb.shape[0], -1) @ W + B)[:, None])


@pytest.mark.parametrize("mode", ["fixed", "sample_specific"])
def test_certificates_hold_at_the_rate_alpha_allows(mode):
  """Over 40 seeds x 100 inputs: every certified radius is checked against the exact distance to the smoothed
  classifier's boundary, before and after the storage update; the violation rate is within alpha (its 99.9%
  Clopper-Pearson lower bound does not exceed alpha). The same check flags a plug-in estimate as unsound."""
  alpha, num_models, n, seeds = 0.1, 24, 100, 40
  rs = np.random.default_rng(0)
  total = violations = violations_stored = plug_in_violations = 0
  search = sigma_search.SearchConfig(sigma_0=0.5, sigma_lo=0.25, sigma_hi=0.75, num_steps=3, num_draws=4,
                                     target_draws=8)
  for seed in range(seeds):
    x, d = linear_inputs(rs, n, 0.5)
    if mode == "fixed":
      sigma = np.full(n, 0.5, np.float32)
    else:
      sigma, _ = sigma_search.find_sigmas(linear_score, None, x, None, np.arange(n, dtype=np.int32),
                                          rng.stream(seed, rng.SIGMA_SEARCH), search, "robust_prediction", n,
                                          unroll=1)
      assert sigma.std() > 0
    cert = certify_linear(x, sigma, seed, num_models, alpha)
    ans = store_lib.CertifiedStore(SHAPE).certify(x, cert.pred, cert.radius_test, sigma)
    violations += check(cert.pred, cert.radius_test, d).sum()
    violations_stored += check(ans.pred, ans.radius_stored, d).sum()
    plug = certify_linear(x, sigma, seed, num_models, alpha, plug_in=True)
    plug_in_violations += check(plug.pred, plug.radius_test, d).sum()
    total += n
  lower = lambda k: stats.beta.ppf(0.001, k, total - k + 1) if k else 0.0
  assert lower(violations) <= alpha, (violations, total)
  assert violations_stored <= violations  # aligning and trimming never create a wrong certificate here
  assert lower(plug_in_violations) > alpha, (plug_in_violations, total)  # the check has teeth


def test_the_store_removes_a_contradiction_in_either_order():
  """A clean query certified 1 at sigma_x 0.5 and its triggered copy, at distance 1 from it, certified 0 at
  sigma_x 0.17: their balls overlap with different labels (one of the two certificates is false). One store
  for both queries answers consistently, whichever comes first, with the exact aligned / trimmed radii."""
  m, alpha = 1000, 0.001
  votes = np.array([[0, 1000], [1000, 0]])  # unanimous for 1 (clean), for 0 (triggered)
  sigma = np.array([0.5, 0.17])
  cert = bounds.certify_counts(votes, alpha=alpha, sigma_x=sigma)
  r_clean, r_trig = cert.radius_test
  assert r_clean == pytest.approx(0.5 * stats.norm.ppf(stats.beta.ppf(alpha / 2, m, 1)), rel=1e-12)
  x = np.zeros((2, 4), np.float64)
  x[1, 0] = 1.0  # the triggered copy: l2 distance 1, inside the clean ball (r_clean ~ 1.21)
  assert 1.0 < r_clean and 1.0 < r_clean + r_trig
  assert store_lib.audit(x, cert.pred, cert.radius_test)[0] == 1

  clean_first = store_lib.CertifiedStore((4,), dtype=np.float64).certify(x, cert.pred, cert.radius_test, sigma)
  assert list(clean_first.pred) == [1, 1] and list(clean_first.aligned) == [False, True]  # the attack fails
  assert clean_first.radius_stored[1] == pytest.approx(r_clean - 1.0, rel=1e-8)
  assert store_lib.audit(x, clean_first.pred, clean_first.radius_stored)[0] == 0

  order = [1, 0]
  trig_first = store_lib.CertifiedStore((4,), dtype=np.float64).certify(x[order], cert.pred[order],
                                                                        cert.radius_test[order], sigma[order])
  assert list(trig_first.pred) == [0, 1] and list(trig_first.trimmed) == [False, True]  # the attacker keeps 0
  assert trig_first.radius_stored[1] == pytest.approx(1.0 - r_trig, rel=1e-8)
  assert store_lib.audit(x[order], trig_first.pred, trig_first.radius_stored)[0] == 0
