"""Soundness of the certificates against closed-form truth, with tests that have power.

Linear base classifier. f(x) = 1[w.x + b > 0], the same in every model. Model m votes 1 on x exactly when
g_m = w.u_m / ||w|| > -d / sigma_x, with d = (w.x + b) / ||w|| the signed distance of x to the hyperplane, so the
smoothed probability of the true class is p = Phi(|d| / sigma_x) at every noise level and the vote count is
k ~ Bin(M, p). A certificate is wrong (wrong class, or radius_test > |d|) exactly when, for the selected class c,
CP_low(k_c; M, alpha / K) > p_c. Every input of one seed reads the same M projections g_m (one fixed u_m per
model), so the certificates of one seed are strongly dependent, and a confidence interval that treats them as
independent is the wrong test. The seed is the unit here: the number of wrong certificates of one seed has an
exact distribution (the counts k_i = #{m : g_m > -d_i / sigma_i} are cumulative counts of a multinomial over the
sorted thresholds), the seeds are independent, and the observed total over the seeds is compared with the exact
distribution of the total.

Ball base classifier. f(x) = 1[||x - c|| < rho]: P[x + sigma z in ball] is a noncentral chi-square probability
that depends on sigma, so the smoothed boundary moves with sigma and certificates of nearby queries answered at
different sigma_x can contradict each other: the case the storage update exists for.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

from certssb_jax.certify import bounds, kernel as certify
from certssb_jax.ensemble.member import MemberState
from certssb_jax.store import certified as store_lib

W = np.array([0.6, -0.8, 1.2, 0.5], np.float32)
B = np.float32(0.1)
SHAPE = (2, 2, 1)
W_UNIT = W.astype(np.float64) / np.linalg.norm(W.astype(np.float64))

# The linear design: M models, alpha / 2 per class (Bonferroni over K = 2), S seeds of N inputs each.
LIN_M, LIN_ALPHA, LIN_N, LIN_SEEDS = 32, 0.1, 100, 60
# Each tail of the exact distribution of the total is cut at this probability: a sound kernel and bound fail the
# test with probability at most 2 * FALSE_FAILURE over the test noise (the seeds are fixed, so it is
# deterministic: it passes or fails every time).
FALSE_FAILURE = 1e-6


class Linear(nn.Module):
  """One logit w.x + b of the flattened input (the train flag is the model interface's)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(1, name="head")(x.reshape(x.shape[0], -1))


PARAMS = {"head": {"kernel": jnp.asarray(W)[:, None], "bias": jnp.asarray([B])}}


def signed_distance(x):
  """(w.x + b) / ||w|| in float64 of the (float32) inputs the kernel sees."""
  return (np.asarray(x, np.float64).reshape(len(x), -1) @ W_UNIT) + float(B) / np.linalg.norm(W.astype(np.float64))


def linear_inputs_at(rs, z_signed, sigma):
  """Inputs whose signed distance to the hyperplane is z_signed * sigma, random along it; and that distance."""
  n = len(z_signed)
  x = rs.normal(size=(n, W.size))
  x -= np.outer((x @ W + B) / (W @ W), W)  # onto the hyperplane
  x += np.outer(z_signed * sigma, W_UNIT)
  x = x.reshape(n, *SHAPE).astype(np.float32)
  return x, signed_distance(x)


def check(pred, radius, d):
  """Violations: a certified class that is not the smoothed classifier's, or a radius beyond the boundary."""
  true_class = (d > 0).astype(int)
  return (pred != -1) & ((pred != true_class) | (radius > np.abs(d)))


def selected_class_tail(votes_top, num_models, radius, sigma):
  """P[K >= k] for K ~ Bin(M, Phi(radius / sigma)), k the selected class's votes: the probability that the
  selected class gets as many votes at the position where a linear classifier's boundary lies exactly `radius` away
  (p = Phi(|d| / sigma), module docstring). A certificate of radius r at k votes is wrong for every position with
  Phi(|d| / sigma) < Phi(r / sigma), so the supremum over positions of the probability that the selected class's
  certificate is wrong is this tail at the certificate's own radius, and the Bonferroni bound promises at most
  alpha / K. Computed with the binomial survival function (scipy.stats.binom), not the Beta quantile the bound
  inverts."""
  return stats.binom.sf(np.asarray(votes_top) - 1, num_models, stats.norm.cdf(np.asarray(radius) / sigma))


def stacked_params(params, num_models):
  return jax.tree.map(lambda a: np.repeat(np.asarray(a)[None], num_models, axis=0), params)


def kernel_votes(model, params, x, sigma, seed, num_models):
  """Votes (N, 2) of num_models copies of one model through the real kernel (certify.certify_inputs), in kernel
  calls of 8 models (a small program compiles fast)."""
  chunks = [(np.arange(num_models), MemberState(stacked_params(params, num_models), {}, None))]
  preds, _ = certify.certify_inputs(model, chunks, x, sigma, seed=seed, num_models=num_models, models_per_chunk=8)
  return certify.votes_from_preds(preds, 2)


def plug_in_certificate(votes, sigma):
  """The point estimate instead of a confidence bound: unsound, the harness must catch it."""
  num_models = votes.sum(axis=1)
  p = votes.max(axis=1) / num_models
  margin = np.where(p > 0.5, stats.norm.ppf(np.clip(p, 0, 1 - 1e-12)), 0.0)
  return bounds.Certificate(np.where(p > 0.5, votes.argmax(1), -1), p, 1 - p, margin, sigma * margin,
                            sigma * margin, votes.max(1))


def wrong_certificate_table(z_signed, num_models, alpha, inflate=1.0):
  """(N, M + 1) bool: does input i, with k votes for class 1, get a wrong certificate?

  Written from the definition, independently of ``bounds``: the top class (ties to class 0) is certified when its
  Clopper-Pearson bound at alpha / 2 exceeds 1/2, with radius sigma * Phi^-1(bound) (times ``inflate``, to size
  the test against inflated radii); it is wrong when the class is not the side of the hyperplane x lies on, or
  the radius exceeds |d| = |z| sigma.
  """
  k1 = np.arange(num_models + 1)
  top = (k1 > num_models - k1).astype(int)
  k_top = np.where(top == 1, k1, num_models - k1)
  low = np.where(k_top > 0, stats.beta.ppf(alpha / 2, np.maximum(k_top, 1), num_models - k_top + 1), 0.0)
  certified = low > 0.5
  margin = stats.norm.ppf(np.clip(low, 1e-300, 1.0))
  true_class = (np.asarray(z_signed) > 0).astype(int)
  wrong = (top[None] != true_class[:, None]) | (inflate * margin[None] > np.abs(z_signed)[:, None])
  return certified[None] & wrong


def violation_count_pmf(thresholds, table):
  """Exact pmf (N + 1,) of the number of wrong certificates of one seed.

  Input i gets k_i = #{m : g_m > t_i} votes for class 1, with g_1..g_M i.i.d. N(0, 1) shared by every input.
  Going through the thresholds in decreasing order, the models above t_(j) are those above t_(j-1) plus a
  Bin(M - a, q_j) number of the others, q_j = (Phi(t_(j-1)) - Phi(t_(j))) / Phi(t_(j-1)); the dynamic program
  carries the joint law of (models above, wrong certificates so far).

  Args:
    thresholds: (N,) t_i = -d_i / sigma_i.
    table: (N, M + 1) ``wrong_certificate_table`` of the same inputs.
  """
  num_inputs, m1 = table.shape
  order = np.argsort(-np.asarray(thresholds), kind="stable")
  joint = np.zeros((m1, num_inputs + 1))  # P[a models above the current threshold, v wrong certificates]
  joint[0, 0] = 1.0
  above, below = np.arange(m1)[:, None], np.arange(m1)[None, :]
  prev_cdf = 1.0
  for i in order:
    cdf = stats.norm.cdf(thresholds[i])
    q = (prev_cdf - cdf) / prev_cdf if prev_cdf > 0 else 0.0
    move = stats.binom.pmf(below - above, m1 - 1 - above, q)  # (a, a'): a' - a of the M - a others cross
    joint = move.T @ joint
    prev_cdf = cdf
    wrong = table[i]
    joint[wrong] = np.concatenate([np.zeros((int(wrong.sum()), 1)), joint[wrong, :-1]], axis=1)
  return joint.sum(axis=0)


def total_pmf(pmf, num_seeds):
  """pmf of the sum of num_seeds independent counts with the given pmf."""
  out = np.ones(1)
  for _ in range(num_seeds):
    out = np.convolve(out, pmf)
  return np.clip(out, 0.0, None)


def acceptance_interval(pmf, tail):
  """[lo, hi] with P[count < lo] <= tail and P[count > hi] <= tail."""
  cdf = np.cumsum(pmf)
  lo = int(np.searchsorted(cdf, tail, side="right"))  # P[< lo] = cdf[lo - 1] <= tail
  hi = int(np.searchsorted(cdf, 1.0 - tail, side="left"))  # P[> hi] = 1 - cdf[hi] <= tail
  return lo, hi


def linear_design(mode):
  """(z_signed, sigma) of the N inputs shared by every seed: |d| / sigma uniform on (0, 1.5 * the largest margin
  M and alpha allow), where the sound code's violation rate is high, either sign; sigma 0.5 (fixed) or drawn
  uniform on [0.25, 0.75] per input, independently of the votes (sample_specific)."""
  rs = np.random.default_rng(7 if mode == "fixed" else 8)  # two independent designs
  z_max = stats.norm.ppf((LIN_ALPHA / 2) ** (1 / LIN_M))  # the margin ceiling: all M votes on one class
  z = rs.uniform(0.0, 1.5 * z_max, LIN_N) * rs.choice([-1.0, 1.0], LIN_N)
  if mode == "fixed":
    sigma = np.full(LIN_N, 0.5, np.float32)
  else:
    sigma = rs.uniform(0.25, 0.75, LIN_N).astype(np.float32)
  x, d = linear_inputs_at(rs, z, sigma.astype(np.float64))
  return x, d, sigma


@pytest.mark.parametrize("mode", ["fixed", "sample_specific"])
def test_wrong_certificates_follow_their_exact_distribution(mode):
  """The number of wrong certificates over S seeds (the kernel, then ``bounds.certify_counts``) lies inside the
  central 1 - 2e-6 of its exact distribution, computed with the seed as the unit (module docstring).

  The design has power: at these inputs the exact probability that radii inflated 1.5x pass is below 1e-12
  (asserted), the plug-in point estimate fails on the same votes (asserted), and the reference release's bug
  (sampling at sigma_0 while reporting sigma_x * margin) fails the sample-specific case. The count alone is weak
  against small inflations: radii inflated 1.1x pass it with probability 0.9988 (fixed) and 0.9983
  (sample-specific), computed exactly with these functions. So every certificate of every seed is also held to
  the exact binomial tail at its own radius (``selected_class_tail`` at most alpha / 2), which no inflation above
  rounding passes. The storage update can only be wrong where a certificate was: its answers on a seed without a
  wrong certificate are all right.
  """
  x, d, sigma = linear_design(mode)
  t = -d / sigma.astype(np.float64)
  table = wrong_certificate_table(-t, LIN_M, LIN_ALPHA)
  lo, hi = acceptance_interval(total_pmf(violation_count_pmf(t, table), LIN_SEEDS), FALSE_FAILURE)
  inflated = total_pmf(violation_count_pmf(t, wrong_certificate_table(-t, LIN_M, LIN_ALPHA, 1.5)), LIN_SEEDS)
  assert inflated[:hi + 1].sum() < 1e-12, (hi, inflated[:hi + 1].sum())
  wrong = wrong_stored = wrong_plug_in = 0
  for seed in range(LIN_SEEDS):
    votes = kernel_votes(Linear(), PARAMS, x, sigma, seed, LIN_M)
    cert = bounds.certify_counts(votes, alpha=LIN_ALPHA, sigma_x=sigma, sigma_min=sigma)
    bad = check(cert.pred, cert.radius_test, d)
    got = cert.pred >= 0
    for radius, scale in ((cert.margin, 1.0), (cert.radius_test, sigma), (cert.radius, sigma)):
      tail = selected_class_tail(cert.votes_top, LIN_M, radius, scale)[got]
      assert (tail <= LIN_ALPHA / 2 * (1 + 1e-9)).all(), (seed, tail.max())  # the worst position: alpha / 2
    ans = store_lib.CertifiedStore(SHAPE).certify(x, cert.pred, cert.radius_test, sigma)
    bad_stored = check(ans.pred, ans.radius_stored, d)
    assert bad.any() or not bad_stored.any(), f"seed {seed}: the store made a right certificate wrong"
    plug = plug_in_certificate(votes, sigma)
    wrong, wrong_stored = wrong + int(bad.sum()), wrong_stored + int(bad_stored.sum())
    wrong_plug_in += int(check(plug.pred, plug.radius_test, d).sum())
  expected = float(np.sum(table * stats.binom.pmf(np.arange(LIN_M + 1)[None], LIN_M, stats.norm.sf(t)[:, None])))
  assert lo <= wrong <= hi, (f"{wrong} wrong certificates over {LIN_SEEDS} seeds; exact mean "
                             f"{LIN_SEEDS * expected:.1f}, acceptance interval [{lo}, {hi}]")
  assert wrong_plug_in > hi, (wrong_plug_in, hi)  # the same check flags the plug-in estimate


@pytest.mark.parametrize("num_models,alpha", [(LIN_M, LIN_ALPHA), (1000, 0.001)])
def test_the_worst_position_of_a_linear_classifier_is_wrong_with_probability_alpha_over_k(num_models, alpha):
  """Every vote count through ``bounds.certify_counts``, no sampling: for each certified count k, the exact
  probability that a linear classifier's input at the worst position gets a wrong certificate from the selected
  class (``selected_class_tail``) at its margin, its test-input radius (sigma_x) and its joint radius (sigma_min)
  is alpha / 2 to 1e-9: never above (sound), and reached (the radius is no smaller than Clopper-Pearson allows). A
  margin or radius inflated 1.1x puts the tail above alpha / 2 at every certified count: by 6.6% (the smallest) to
  99% (k = M) at M = 32, alpha = 0.1, and by 1.2% to 298 times at M = 1000, alpha = 0.001."""
  k = np.arange(num_models + 1)
  votes = np.stack([num_models - k, k], axis=1)  # (M + 1, 2): every split of the votes, either class on top
  sigma_x = np.linspace(0.25, 1.0, num_models + 1)
  sigma_min = 0.5 * sigma_x
  cert = bounds.certify_counts(votes, alpha=alpha, sigma_x=sigma_x, sigma_min=sigma_min)
  ok = cert.pred >= 0
  assert ok.sum() >= 10 and (cert.votes_top[ok] == np.maximum(k, num_models - k)[ok]).all()
  for radius, sigma in ((cert.margin, 1.0), (cert.radius_test, sigma_x), (cert.radius, sigma_min)):
    tail = selected_class_tail(cert.votes_top, num_models, radius, sigma)[ok]
    np.testing.assert_allclose(tail, alpha / 2, rtol=1e-9)
  # the abstention rule: k is certified exactly when an input on the boundary (p = 1/2) reaches k votes with
  # probability below alpha / 2
  first = int(k[ok & (k > num_models // 2)].min())
  assert stats.binom.sf(first - 1, num_models, 0.5) < alpha / 2 <= stats.binom.sf(first - 2, num_models, 0.5)


# The ball design: class 1 inside the ball ||x - c|| < rho in D = 4 dimensions; queries along a line through c,
# neighbours answered at sigma_x 0.15 and 0.4, where the smoothed boundary (radius r*(sigma)) lies at 0.97 and
# 0.71: between the two, neighbours are right to disagree, each at its own sigma.
BALL_CENTER = np.full(4, 0.5, np.float32)
BALL_RHO = 1.0
BALL_SIGMAS = (0.15, 0.4)
BALL_M, BALL_ALPHA, BALL_SEEDS = 64, 0.1, 30
BALL_S = np.linspace(-1.2, 1.2, 61)  # position along the line, in units of distance from c


class Ball(nn.Module):
  """One logit rho^2 - ||x - c||^2 of the flattened input: class 1 inside the ball."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    center = self.param("center", nn.initializers.zeros, (BALL_CENTER.size,))
    rho2 = self.param("rho2", nn.initializers.ones, (1,))
    return rho2 - jnp.sum((x.reshape(x.shape[0], -1) - center) ** 2, axis=-1, keepdims=True)


BALL_PARAMS = {"center": jnp.asarray(BALL_CENTER), "rho2": jnp.asarray([BALL_RHO**2], jnp.float32)}


def ball_p_in(dist, sigma):
  """P[x + sigma z in the ball] for ||x - c|| = dist: ncx2.cdf(rho^2 / sigma^2, df=D, nc=dist^2 / sigma^2)."""
  return stats.ncx2.cdf(BALL_RHO**2 / sigma**2, BALL_CENTER.size, dist**2 / sigma**2)


def ball_boundary(sigma):
  """r*(sigma): the distance from c where the smoothed classifier at sigma changes class (P = 1/2)."""
  return optimize.brentq(lambda r: ball_p_in(r, sigma) - 0.5, 1e-9, 3.0 * BALL_RHO)


def ball_queries():
  """The queries (N, *SHAPE) float32 along a line through c, their exact distance to c, and sigma_x of each:
  alternating between the two BALL_SIGMAS (sample_specific), or one of them for every query."""
  direction = np.array([0.6, -0.8, 0.0, 0.0])
  x = (BALL_CENTER[None] + BALL_S[:, None] * direction[None]).reshape(-1, *SHAPE).astype(np.float32)
  dist = np.linalg.norm(x.reshape(len(x), -1).astype(np.float64) - BALL_CENTER.astype(np.float64), axis=1)
  alternating = np.where(np.arange(len(x)) % 2 == 0, *BALL_SIGMAS).astype(np.float32)
  return x, dist, {"sample_specific": alternating,
                   **{f"sigma={s}": np.full(len(x), s, np.float32) for s in BALL_SIGMAS}}


def bound_failed_table(p_in, num_models, alpha):
  """(N, M + 1) bool: with k votes for class 1, the Clopper-Pearson bound (alpha / 2) of the selected class
  (ties to 0) exceeds that class's true probability: the event every guarantee is conditioned on."""
  k1 = np.arange(num_models + 1)
  top = (k1 > num_models - k1).astype(int)
  k_top = np.where(top == 1, k1, num_models - k1)
  low = np.where(k_top > 0, stats.beta.ppf(alpha / 2, np.maximum(k_top, 1), num_models - k_top + 1), 0.0)
  p_top = np.where(top[None] == 1, p_in[:, None], 1.0 - p_in[:, None])
  return low[None] > p_top


def contradicting_pairs(x, pred, radius):
  """Pairs i < k with labels (not abstentions) that differ and balls that meet, d < R_i + R_k, in float64."""
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  d = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1))
  bad = (pred[:, None] >= 0) & (pred[None] >= 0) & (pred[:, None] != pred[None])
  bad &= d < radius[:, None] + radius[None]
  return int(np.triu(bad, 1).sum())


def test_ball_certificates_hold_at_their_own_sigma_and_the_store_removes_their_contradictions():
  """A ball base classifier, whose smoothed boundary moves with sigma (module docstring), through the kernel.

  (a) Every certificate agrees with the closed-form truth at its own sigma_x, except where its confidence bound
  failed (Cohen's theorem: a wrong class or radius implies that event); and for each query the number of seeds
  whose bound failed is Bin(S, e_i) exactly, e_i computed from the noncentral chi-square, so every count stays
  below its 1 - 1e-6 / N quantile unless the code is wrong (false failure <= 1e-6 by the union bound, however
  the queries depend on each other).
  (b) Without the store, neighbours answered at different sigma_x get overlapping balls with different labels in
  almost every seed, also where every certificate is right at its own sigma; with one sigma for every query a
  contradiction needs a wrong certificate, and there is none.
  (c) One CertifiedStore for the stream: no two answers with different labels have balls that meet.
  """
  x, dist, designs = ball_queries()
  names = list(designs)
  sigma_all = np.concatenate([designs[k] for k in names])
  x_all = np.concatenate([x] * len(names))
  n = len(x)
  tail = 1e-6 / (n * len(names))
  # the closed-form truth of each design at its own sigma: P[class 1], the class, the distance to the boundary
  p_in = {k: ball_p_in(dist, designs[k].astype(np.float64)) for k in names}  # at the float32 sigma used
  boundary = {s: ball_boundary(float(s)) for s in np.unique(sigma_all)}
  to_boundary = {k: np.abs(dist - np.array([boundary[s] for s in designs[k]])) for k in names}
  failed_table = {k: bound_failed_table(p_in[k], BALL_M, BALL_ALPHA) for k in names}
  failed_counts = {k: np.zeros(n, int) for k in names}
  contradictions = {k: [] for k in names}
  all_right = {k: [] for k in names}
  aligned_or_trimmed = 0
  for seed in range(BALL_SEEDS):
    votes = kernel_votes(Ball(), BALL_PARAMS, x_all, sigma_all, seed, BALL_M)
    for j, name in enumerate(names):
      v, sigma = votes[j * n:(j + 1) * n], designs[name]
      cert = bounds.certify_counts(v, alpha=BALL_ALPHA, sigma_x=sigma)
      failed = failed_table[name][np.arange(n), v[:, 1]]
      wrong = (cert.pred != -1) & ((cert.pred != (p_in[name] > 0.5)) | (cert.radius_test > to_boundary[name]))
      assert not (wrong & ~failed).any(), (name, seed, np.flatnonzero(wrong & ~failed))  # (a)
      failed_counts[name] += failed
      pairs = contradicting_pairs(x, cert.pred, cert.radius_test)
      assert store_lib.audit(x, cert.pred, cert.radius_test)[0] == pairs
      contradictions[name].append(pairs)
      all_right[name].append(not wrong.any())
      if name == "sample_specific":  # (c)
        ans = store_lib.CertifiedStore(SHAPE).certify(x, cert.pred, cert.radius_test, sigma)
        assert contradicting_pairs(x, ans.pred, ans.radius_stored) == 0, f"seed {seed}: stored answers contradict"
        assert store_lib.audit(x, ans.pred, ans.radius_stored)[0] == 0, f"seed {seed}: the audit disagrees"
        aligned_or_trimmed += int(ans.aligned.sum() + ans.trimmed.sum())
  for name in names:  # (a): the rate of failed bounds, query by query
    e = (failed_table[name] * stats.binom.pmf(np.arange(BALL_M + 1)[None], BALL_M, p_in[name][:, None])).sum(1)
    assert (e <= BALL_ALPHA).all()
    limit = stats.binom.ppf(1.0 - tail, BALL_SEEDS, e)
    assert (failed_counts[name] <= limit).all(), (name, np.flatnonzero(failed_counts[name] > limit))
  ss, right = np.array(contradictions["sample_specific"]), np.array(all_right["sample_specific"])
  assert (ss > 0).mean() >= 0.9, ss  # (b)
  assert (ss[right] > 0).any(), (ss, right)  # a contradiction of certificates that are all right
  for name in names[1:]:  # one sigma: correct certificates never contradict each other
    single, single_right = np.array(contradictions[name]), np.array(all_right[name])
    assert (single[single_right] == 0).all(), (name, single)
    assert single.sum() * 10 <= ss.sum(), (name, single.sum(), ss.sum())
  assert aligned_or_trimmed > 0  # the store had contradictions to remove


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
