"""DPA with test-time smoothing, the certificate for the whole backdoor (k changed training samples and a test
trigger of norm t together): against closed forms, brute force over the adversary's choices, a naive loop for the
draws, member invariance with noise, and a whole run that recounts its outputs."""

import csv
import itertools
import json

from conftest import tiny_config  # pylint: disable=g-bad-import-order
import jax
import numpy as np
from scipy import stats

from certssb_jax import rng
from certssb_jax.certify import bounds, draws
from certssb_jax.defenses import INSERTIONS_DELETIONS, MODIFICATIONS, partition, smoothed_partition
from certssb_jax.ensemble import member, trainer as ensemble
from certssb_jax.experiment import pipeline
from certssb_jax.models import zoo as models


def test_radius_of_one_linear_member_is_its_distance_to_the_boundary():
  """k = 1, f(x) = [w.x > b]: G(x) = Phi(d / sigma) for the signed distance d, and with exact probabilities the
  certificate's test radius at R = 0 is d itself (Cohen et al.'s tight case)."""
  for sigma in (0.25, 0.5, 1.0, 2.0):
    d = np.array([0.01, 0.1, 0.5, 1.0, 1.7])
    p = stats.norm.cdf(d / sigma)
    # float64 Phi^-1 near 1 (d / sigma up to 6.8) keeps ~7 digits; a 10% overstatement is far outside
    np.testing.assert_allclose(smoothed_partition.radius(p, stats.norm.sf(d / sigma), 0, 1, sigma), d, rtol=1e-6)
  assert smoothed_partition.radius(np.array([0.5]), np.array([0.5]), 0, 1, 1.0)[0] == -np.inf  # a tie certifies nothing


def _linear_members(rs, k):
  w = rs.normal(size=(k, 2))
  return w / np.linalg.norm(w, axis=1, keepdims=True), rs.normal(scale=0.3, size=k)


def _g(w, b, x, sigma):
  """(k,) each linear member's exact P(class 1) at x: Phi((w.x + b) / sigma) for unit w."""
  return stats.norm.cdf((w @ x + b) / sigma)


def test_certified_pairs_survive_every_choice_of_changed_members_and_test_shift():
  """Tiny ensembles of linear members with exact probabilities: wherever the certificate certifies (R members,
  test norm t), every subset of R members turned to the rival and every shift of norm < t (a fine grid on the
  circle) leave the smoothed class unchanged."""
  rs = np.random.RandomState(0)
  angles = np.linspace(0, 2 * np.pi, 361)[:-1]
  directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
  checked = 0
  for case in range(40):
    k, sigma = int(rs.randint(2, 6)), float(rs.choice([0.5, 1.0]))
    w, b = _linear_members(rs, k)
    if case % 2:  # identical members: at R = 0 the bound is tight (one linear classifier), so it has power
      w, b = np.repeat(w[:1], k, axis=0), np.repeat(b[:1], k)
    x = rs.normal(scale=0.3, size=2)
    p1 = _g(w, b, x, sigma).mean()
    c = int(p1 > 0.5)
    p_c = p1 if c else 1 - p1
    for big_r in range(k + 1):
      t = smoothed_partition.radius(np.array([p_c]), np.array([1 - p_c]), big_r, k, sigma)[0]
      if t == -np.inf:
        continue
      for changed in itertools.combinations(range(k), big_r):
        keep = np.setdiff1d(np.arange(k), changed)
        for scale in (0.5, 0.999):
          shifted = x[None] + scale * t * directions  # (D, 2)
          g1 = np.array([_g(w[keep], b[keep], z, sigma).sum() for z in shifted])  # members left, class 1
          g_c = (g1 if c else len(keep) - g1) / k  # the changed members vote for the rival
          g_rival = (len(keep) - g1 if c else g1) / k + big_r / k
          assert (g_c > g_rival).all(), (k, sigma, big_r, changed, t)
          checked += 1
  assert checked > 60


def test_the_count_at_t_0_is_exact_for_members_that_always_agree():
  """Members whose smoothed votes are deterministic (probability 0 or 1): R members moved to the rival change
  each G by exactly 1 / k, so the count is DPA's exact count from the same votes (R + 1 flips the vote)."""
  for k in range(2, 12):
    for n_c in range((k + 1) // 2 + 1, k + 1):
      p = np.array([n_c / k])
      got = smoothed_partition.largest_changes(p, 1 - p, k, 1.0, 0.0)[0]
      brute = max(r for r in range(k + 1) if n_c - r > k - n_c + r or r == 0) if n_c > k - n_c else -1
      assert got == brute, (k, n_c, got, brute)
      # at most DPA's count on the same votes (whose tie rule certifies one more where a tie goes its way)
      assert got <= partition.certified_members(np.array([[n_c, k - n_c]]))[3][0]


def test_counts_equal_brute_force_over_r_and_match_the_partition_threats():
  rs = np.random.RandomState(1)
  for _ in range(200):
    k, sigma, t = int(rs.randint(2, 60)), float(rs.choice([0.25, 1.0, 2.0])), float(rs.choice([0.0, 0.5, 1.0]))
    p_low = rs.uniform(0.3, 1.0)
    p_high = rs.uniform(0.0, 1.0 - p_low)
    brute = -1
    for big_r in range(k + 1):
      lo, hi = p_low - big_r / k, p_high + big_r / k
      if lo > hi and sigma / 2 * (stats.norm.ppf(lo) - stats.norm.ppf(hi)) > t:
        brute = big_r
      else:
        break
    cert = smoothed_partition.largest_changes(np.array([p_low]), np.array([p_high]), k, sigma, t)[0]
    assert cert == brute
    # by sample a modification changes two members, by position one
    by_sample = smoothed_partition.largest_changes(np.array([p_low]), np.array([p_high]), k, sigma, t, per_change=2)[0]
    assert by_sample == (brute // 2 if brute >= 0 else -1)


def test_draw_votes_equal_a_naive_loop_over_draws():
  """Every draw j of query q: member m_j (uniform, keyed by the seed) on x_q + sigma * normal(fold_in(fold_in(key,
  j), q)); the kernel's counts are those of the loop, exactly."""
  model = models.get_model("mnist_cnn", 2)
  tr = ensemble.EnsembleTrainer(model, (16, 16, 1), ensemble.TrainConfig(1, 4, 1e-2, models_per_chunk=3))
  rs = np.random.RandomState(2)
  x, y = rs.rand(12, 16, 16, 1).astype(np.float32), (rs.rand(12) > 0.5).astype(np.int32)
  state = tr.train_chunk(np.arange(3), member.Streams.ensemble(0), x, y, None)
  q = rs.rand(3, 16, 16, 1).astype(np.float32)
  counts = draws.draw_votes(model, [(np.arange(3), state)], q, 0.5, seed=7, num_members=3, num_draws=13,
                            num_classes=2, batch_size=16)  # several calls per member, draws padded
  members_of = draws.draw_members(7, 13, 3)
  assert np.bincount(members_of, minlength=3).min() > 0 and counts.sum(axis=1).tolist() == [13] * 3
  key = rng.stream(7, rng.DRAW_NOISE)
  naive = np.zeros((3, 2), np.int64)
  for j, m in enumerate(members_of):
    params = jax.tree.map(lambda a, m=m: a[m], state.params)
    for i in range(3):
      e = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, j), i), (16, 16, 1))
      logits = member.member_logits(model, params, {}, q[i:i + 1] + 0.5 * e)
      naive[i, int(models.logits_to_pred(logits)[0])] += 1
  np.testing.assert_array_equal(counts, naive)


def test_bounds_are_clopper_pearson_over_the_draws_at_alpha_over_k():
  votes = np.array([[990, 10], [600, 400], [500, 300, 200]], dtype=object)
  for v in votes:
    v = np.asarray(v, np.int64)
    c, n_c, p_low, p_high = smoothed_partition.bounds_of(v[None], 0.001)
    a = 0.001 / len(v)
    assert p_low[0] == bounds.clopper_pearson_lower(v.max(), v.sum(), a)
    assert p_high[0] == bounds.clopper_pearson_upper(np.sort(v)[-2], v.sum(), a)


def test_members_with_noise_depend_on_their_part_only():
  """Gaussian augmentation keyed by the member's own stream: an insertion into the largest part changes that
  member only, bit for bit."""
  model = models.get_model("mnist_cnn", 2)
  tr = ensemble.EnsembleTrainer(model, (16, 16, 1), ensemble.TrainConfig(2, 4, 1e-2, models_per_chunk=4))
  rs = np.random.RandomState(3)
  x, y = rs.rand(40, 16, 16, 1).astype(np.float32), (rs.rand(40) > 0.5).astype(np.int32)

  def train(xs, ys):
    parts = partition.partition(xs, ys, 4)
    st = tr.train_chunk(np.arange(4), member.Streams.ensemble(0), xs, ys, np.full(len(ys), 0.5, np.float32),
                        views=partition.views_of_parts(parts))
    return parts, [np.concatenate([np.asarray(a[m]).ravel() for a in jax.tree.leaves(st.params)]) for m in range(4)]

  parts, before = train(x, y)
  largest = int(np.argmax([len(p) for p in parts]))
  new = next(s for s in (rs.rand(1, 16, 16, 1).astype(np.float32) for _ in range(200))
             if int(partition.sample_hashes(s, np.array([1]))[0] % np.uint64(4)) == largest)
  _, after = train(np.concatenate([x, new]), np.append(y, 1))
  assert [m for m in range(4) if not np.array_equal(before[m], after[m])] == [largest]


def test_a_run_recounts_from_its_draws(tmp_path):
  c = tiny_config(**{"defense.name": "dpa_smoothing", "train.num_models": 6, "train.epochs": 3,
                     "sigma.sigma_0": 0.5, "sigma.sigma_hi": None, "certify.draws": 64, "undefended.enabled": False})
  summary = pipeline.run(c, str(tmp_path))
  assert summary["method"] == "DPA+smoothing" and summary["trigger_norm"] == c.attack.delta
  votes = np.load(tmp_path / "votes.npz")
  rows = list(csv.DictReader(open(tmp_path / "per_sample.csv")))
  for split in ("clean", "triggered"):
    assert (votes[split].sum(axis=1) == 64).all()
    cert = smoothed_partition.certificate(votes[split], alpha=c.certify.alpha, k=6, sigma=0.5, trigger_norm=c.attack.delta)
    got = [r for r in rows if r["split"] == split]
    np.testing.assert_array_equal([int(r["certified_insertions_deletions"]) for r in got],
                                  cert.counts[INSERTIONS_DELETIONS])
    np.testing.assert_array_equal([float(r["p_lower"]) for r in got], cert.bounds[0])
  assert set(summary["metrics"]["cra_at_norm"]) == {f"{v:g}" for v in np.array([0, .25, .5, .75, 1, 1.5, 2]) *
                                                     c.attack.delta}
  assert json.loads((tmp_path / "config.json").read_text())["defense"]["name"] == "dpa_smoothing"
  assert summary["metrics"]["cra_at_norm"]["0"][MODIFICATIONS]["0"] >= summary["metrics"]["cra_poison_budget"]["0"]
