"""DPA and bagging: certificates against naive references, partitions and bags, members that see only their
view, and the whole run on the built-in data."""

import csv
import itertools
import json
import os

from conftest import tiny_config  # pylint: disable=g-bad-import-order
import jax
import numpy as np
import pytest
import scipy.optimize

from certssb_jax import rng
from certssb_jax.certify import bounds
from certssb_jax.defenses import INSERTIONS_DELETIONS, MODIFICATIONS, bootstrap, partition
from certssb_jax.experiment import pipeline

# ---------------------------------------------------------------------------------------------- DPA


def _plurality(v):
  return int(np.argmax(v))  # ties to the smaller class, as the ensemble's vote


def _naive_dpa(votes):
  """The largest r such that every vote vector reachable by changing r members' votes keeps the plurality:
  each insertion or deletion of a training sample changes the model of one part, so one vote, arbitrarily."""
  votes = np.asarray(votes)
  m, k = int(votes.sum()), len(votes)
  c = _plurality(votes)
  reachable = [np.array(v) for v in itertools.product(range(m + 1), repeat=k) if sum(v) == m]
  r = 0
  while True:
    changed = [v for v in reachable if np.abs(v - votes).sum() // 2 <= r + 1]
    if any(_plurality(v) != c for v in changed):
      return r
    r += 1


def test_dpa_certificate_equals_the_naive_search_over_changed_votes():
  rs = np.random.RandomState(0)
  cases = [rs.multinomial(m, rs.dirichlet(np.ones(k))) for _ in range(40) for m, k in ((7, 2), (6, 3), (5, 4))]
  cases += [np.array(v) for v in ([4, 4], [3, 3, 0], [0, 3, 3], [2, 2, 2], [6, 0], [0, 6, 0])]
  for v in cases:
    cert = partition.certificate(v[None], "sample")
    assert cert.pred[0] == _plurality(v) and cert.exact
    # by (image, label): an insertion or deletion changes one member, a modification two
    assert cert.counts[INSERTIONS_DELETIONS][0] == _naive_dpa(v), v
    assert cert.counts[MODIFICATIONS][0] == _naive_dpa(v) // 2
    # by position: a modification changes one member; insertions are not certified at all
    by_position = partition.certificate(v[None], "position")
    assert by_position.counts == {MODIFICATIONS: np.array([_naive_dpa(v)])}


def test_dpa_certificate_by_hand():
  # floor((n_c - max_{c' != c}(n_c' + [c' < c])) / 2)
  votes = np.array([[5, 3, 0], [3, 3, 0], [3, 4, 0], [2, 5, 4], [1, 6, 3], [0, 0, 9], [3, 3, 3]])
  cert = partition.certificate(votes)
  np.testing.assert_array_equal(cert.pred, [0, 0, 1, 1, 1, 2, 0])
  np.testing.assert_array_equal(cert.counts[INSERTIONS_DELETIONS], [1, 0, 0, 0, 1, 4, 0])
  np.testing.assert_array_equal(cert.counts[MODIFICATIONS], [0, 0, 0, 0, 0, 2, 0])
  np.testing.assert_array_equal(cert.votes_runner, [3, 3, 3, 4, 3, 0, 3])


def test_a_sample_moves_no_other_sample_between_parts():
  rs = np.random.RandomState(1)
  x = rs.rand(60, 4, 4, 1).astype(np.float32)
  y = rs.randint(0, 3, 60)
  parts = partition.partition(x, y, 5)
  assert sorted(np.concatenate(parts).tolist()) == list(range(60))
  # permuting the training set changes no part's content or its order (hash order)
  perm = rs.permutation(60)
  parts_p = partition.partition(x[perm], y[perm], 5)
  for a, b in zip(parts, parts_p):
    np.testing.assert_array_equal(x[a], x[perm][b])
  # changing sample 7 (image and label) leaves every other sample in its part
  x2, y2 = x.copy(), y.copy()
  x2[7] += 0.5
  y2[7] = (y2[7] + 1) % 3
  where = lambda ps: {int(j): i for i, p in enumerate(ps) for j in p}
  before, after = where(parts), where(partition.partition(x2, y2, 5))
  assert all(before[j] == after[j] for j in range(60) if j != 7)
  # by position, every sample keeps its part whatever it becomes
  assert where(partition.partition(x, y, 5, "position")) == where(partition.partition(x2, y2, 5, "position"))
  views = partition.views_of_parts(parts)(np.arange(7))  # members 5 and 6 are padding: parts 0 and 1 again
  np.testing.assert_array_equal(views.lengths, [len(parts[m % 5]) for m in range(7)])  # unpadded
  for m in range(7):
    np.testing.assert_array_equal(views.indices[m, :views.lengths[m]], parts[m % 5])


# ---------------------------------------------------------------------------------------------- bagging


def _naive_bagging(gap, n, s, threat):
  """The largest r whose every attack passes, counted up from 0 with the paper's condition written out."""
  if gap <= 0:
    return -1
  shift = {MODIFICATIONS: lambda r: 1 + 1 - 2 * ((n - r) / n) ** s,  # n' = n, e = n - r
           INSERTIONS_DELETIONS: lambda r: max(1 + ((n + i - (r - i)) / n) ** s - 2 * ((n - (r - i)) / n) ** s
                                               for i in range(r + 1))}[threat]  # every mix of i + d = r
  r = 0
  while r + 1 <= (n if threat == MODIFICATIONS else 10 * n) and gap > shift(r + 1):
    r += 1
  return r


def test_bagging_counts_equal_the_naive_loop_over_every_mix():
  rs = np.random.RandomState(3)
  for n, s in ((50, 1), (100, 7), (1000, 30), (12000, 240)):
    gaps = np.concatenate([rs.uniform(-0.2, 1.0, 25), [0.0, 1e-9, 1.0]])
    for threat in bootstrap.COUNTS:
      got = bootstrap.certified_count(gaps, n, s, threat)
      np.testing.assert_array_equal(got, [_naive_bagging(g, n, s, threat) for g in gaps], err_msg=threat)


def _worst_gap(p_low, p_high, n, s, inserted, deleted, k):
  """The smallest P'(A) - P'(rival) the adversary can reach, by a linear program over every bag.

  D holds samples 0..n-1 of which the last ``deleted`` are gone from D'; D' adds ``inserted`` new ones. A bag is
  a sequence of s samples; a bag drawn from either set that holds only shared samples trains the same member, so
  its label distribution is one variable for both. The adversary sets every bag's label distribution subject
  to what the votes on D say (P(A) >= p_low, every rival <= p_high). Independent of the closed form: no
  grouping of bags, no coupling argument.
  """
  shared = n - deleted
  d_bags = list(itertools.product(range(n), repeat=s))
  new = list(range(n, n + inserted))
  p_bags = list(itertools.product(list(range(shared)) + new, repeat=s))
  bags = {b: i for i, b in enumerate(dict.fromkeys(d_bags + p_bags))}
  nv = len(bags) * k
  var = lambda b, l: bags[b] * k + l

  def mean_row(bag_list, label):
    row = np.zeros(nv)
    for b in bag_list:
      row[var(b, label)] += 1.0 / len(bag_list)
    return row

  a_eq = np.zeros((len(bags), nv))
  for b, i in bags.items():
    a_eq[i, [var(b, l) for l in range(k)]] = 1.0
  a_ub = [-mean_row(d_bags, 0)] + [mean_row(d_bags, l) for l in range(1, k)]
  b_ub = [-p_low] + [p_high] * (k - 1)
  worst = np.inf
  for rival in range(1, k):
    res = scipy.optimize.linprog(mean_row(p_bags, 0) - mean_row(p_bags, rival), A_ub=np.array(a_ub), b_ub=b_ub,
                                 A_eq=a_eq, b_eq=np.ones(len(bags)), bounds=(0, 1), method="highs")
    assert res.status == 0
    worst = min(worst, res.fun)
  return worst


def test_bagging_counts_equal_brute_force_over_bags_and_attacks():
  """Every r the certificate reports survives every attack of its threat (insertions, deletions, modifications
  on tiny sets, by linear programming over every bag), and r + 1 does not: the counts are exact."""
  rs = np.random.RandomState(4)
  for n, s, k in ((6, 2, 2), (5, 1, 3), (4, 3, 2)):
    for _ in range(6):
      p_low = rs.uniform(0.55, 1.0)
      # bounds that the votes can meet together (P(A) = p_low with a rival at p_high), where Theorem 1 is tight
      p_high = rs.uniform((1.0 - p_low) / (k - 1), 1.0 - p_low)
      attacks = {MODIFICATIONS: lambda r: [(r, r)],
                 INSERTIONS_DELETIONS: lambda r: [(i, r - i) for i in range(r + 1)]}
      for threat, mixes in attacks.items():
        got = int(bootstrap.certified_count(np.array([p_low - p_high]), n, s, threat)[0])
        holds = lambda r, mixes=mixes: all(_worst_gap(p_low, p_high, n, s, i, d, k) > 1e-9 for i, d in mixes(r))
        assert got >= 0 and holds(got), (n, s, k, p_low, p_high, threat, got)
        if threat == INSERTIONS_DELETIONS or got < n:
          assert not holds(got + 1), (n, s, k, p_low, p_high, threat, got)


def test_bagging_insertions_are_not_twice_the_modifications():
  """Unanimous votes, n = 12,000, s = n // M, alpha = 0.001: Theorem 1 allows 27 / 61 / 705 insertions and
  deletions at M = 50 / 100 / 1000, not 2 x 22 / 55 / 659."""
  for m, insertions, modifications in ((50, 27, 22), (100, 61, 55), (1000, 705, 659)):
    cert = bootstrap.certificate(np.array([[m, 0]]), alpha=0.001, n=12000, s=12000 // m)
    assert cert.counts == {MODIFICATIONS: np.array([modifications]), INSERTIONS_DELETIONS: np.array([insertions])}
    assert not cert.exact


def test_bagging_certificate_uses_clopper_pearson_with_bonferroni():
  for v in ([50, 0], [40, 10], [26, 24], [10, 40], [20, 15, 15]):
    v = np.asarray(v, np.int64)
    cert = bootstrap.certificate(v[None], alpha=0.001, n=12000, s=240)
    order = np.argsort(-v, kind="stable")
    a = 0.001 / len(v)
    gap = bounds.clopper_pearson_lower(v[order[0]], v.sum(), a) - bounds.clopper_pearson_upper(v[order[1]], v.sum(), a)
    assert cert.pred[0] == order[0]
    assert cert.modifications[0] == _naive_bagging(float(gap), 12000, 240, MODIFICATIONS)
  # 50 of 50 votes: pA_low = (alpha / 2)^(1/50), pB_high = 1 - pA_low
  p = (0.0005) ** (1 / 50)
  r_star = 12000 * (1 - (1 - (2 * p - 1) / 2) ** (1 / 240))
  assert bootstrap.certificate(np.array([[50, 0]]), alpha=0.001, n=12000, s=240).modifications[0] == int(np.ceil(r_star)) - 1


def test_bags_are_keyed_by_seed_and_member():
  views = bootstrap.bags(5, 100, 17)
  a = views(np.arange(6))
  assert a.indices.shape == (6, 17) and a.indices.min() >= 0 and a.indices.max() < 100
  assert (a.lengths == 17).all()
  np.testing.assert_array_equal(views(np.array([4, 2])).indices[0], a.indices[4])  # the chunk does not matter
  expect = jax.random.randint(rng.member_key(5, rng.BAG, 3), (17,), 0, 100)
  np.testing.assert_array_equal(a.indices[3], np.asarray(expect))
  assert not np.array_equal(bootstrap.bags(6, 100, 17)(np.arange(1)).indices[0], a.indices[0])


# ---------------------------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("name", ["dpa", "bagging"])
def test_counting_run_recounts_from_its_votes(tmp_path, name):
  c = tiny_config(**{"defense.name": name, "train.num_models": 6, "train.batch_size": 8, "train.epochs": 3,
                     "undefended.enabled": False})
  summary = pipeline.run(c, str(tmp_path))
  assert summary["method"] == {"dpa": "DPA", "bagging": "bagging"}[name]
  votes = np.load(tmp_path / "votes.npz")
  with open(tmp_path / "per_sample.csv") as f:
    rows = list(csv.DictReader(f))
  n = summary["n_train"]
  recorded = json.loads((tmp_path / "config.json").read_text())["defense"]
  if name == "bagging":  # the bag size is fixed once and recorded, so a changed training set keeps it
    assert recorded["bag_size"] == n // 6 and summary["defense"]["bag_size"] == n // 6
  for split in ("clean", "triggered"):
    v = votes[split]
    assert (v.sum(1) == 6).all()
    cert = (partition.certificate(v) if name == "dpa" else
            bootstrap.certificate(v, alpha=c.certify.alpha, n=n, s=n // 6))
    split_rows = [r for r in rows if r["split"] == split]
    for threat, counts in cert.counts.items():
      np.testing.assert_array_equal([int(r[f"certified_{threat}"]) for r in split_rows], counts)
    if split == "clean":
      correct = cert.pred == votes["clean_label"]
      for k, acc in summary["metrics"]["cra_poison_budget"].items():
        assert acc == pytest.approx(np.mean(correct & (cert.modifications >= int(k))))
  again = pipeline.run(c, str(tmp_path))  # resumes: nothing retrained, the same numbers
  assert json.dumps(again["metrics"]) == json.dumps(summary["metrics"])
  assert os.path.exists(tmp_path / "certified_accuracy.png")


@pytest.mark.slow
def test_families_study_counts_from_the_run_folders(tmp_path):
  from conftest import write_tiny_config  # pylint: disable=g-import-not-at-top,g-bad-import-order

  from certssb_jax import families  # pylint: disable=g-import-not-at-top
  from certssb_jax.defenses import smoothed_partition  # pylint: disable=g-import-not-at-top

  spec = write_tiny_config(str(tmp_path / "tiny.py"), **{"sigma.sigma_hi": None, "train.epochs": 1,
                                                         "certify.draws": 32})
  counting = {"train.epochs": "2", "defense.member_batch_size": "8", "undefended.enabled": "False"}
  rows = families.run_rows(spec, str(tmp_path / "w"), [4, 6], [0.25, 0.5], [1.0], [0.5], counting,
                           pipeline.no_progress)
  assert sorted({(r.method, r.num_models) for r in rows}) == [(m, k) for m in ("DPA", "DPA+smoothing", "RAB",
                                                                               "bagging") for k in (4, 6)]
  for r in rows:
    with open(os.path.join(r.workdir, "per_sample.csv")) as f:
      clean = [x for x in csv.DictReader(f) if x["split"] == "clean"]
    assert r.summary["num_models"] == r.num_models
    t = r.summary["delta"]
    if r.method == "RAB":  # its poison budget at the attack's norm is what its run reported; at t = 0 none
      budget = np.array([int(x["poison_budget"]) for x in clean])
      right = np.array([x["pred_stored"] == x["label"] for x in clean])
      assert r.accuracy(0, 0.0) is None
    elif r.method == "DPA+smoothing":  # recounted from the run's bounds at the attack's norm
      budget = smoothed_partition.largest_changes(np.array([float(x["p_lower"]) for x in clean]),
                                             np.array([float(x["p_upper_runner"]) for x in clean]), r.num_models,
                                             0.5, t, per_change=2)
      np.testing.assert_array_equal(budget, [int(x["certified_modifications"]) for x in clean])
      right = np.array([x["pred"] == x["label"] for x in clean])
    else:  # the clean test input only: nothing with a test trigger
      budget = np.array([int(x["certified_modifications"]) for x in clean])
      right = np.array([x["pred"] == x["label"] for x in clean])
      assert r.accuracy(0, t) is None and r.accuracy(1, 0.0) == pytest.approx(np.mean(right & (budget >= 1)))
      continue
    for k in families.POISON_GRID:
      assert r.accuracy(k, t) == pytest.approx(np.mean(right & (budget >= k)))
  page = tmp_path / "families.md"
  families.write_page(str(page), rows, (0.0, 0.1, 1.0), "python -m certssb_jax.families ...", str(tmp_path / "w"))
  text = page.read_text()
  assert "### M = 4" in text and "### M = 6" in text and "figures/families_mnist_0-1.png" in text
  assert (tmp_path / "figures" / "families_mnist_0-1.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--workdir", "W"], "--config is required"),
    (["--config", "configs/quickstart.py", "--workdir", "W", "--sizes", "0,32"], "must be >= 1"),
    (["--config", "configs/quickstart.py", "--workdir", "W", "--sigmas", "0.5,big"], "--sigmas takes numbers"),
    (["--config", "configs/quickstart.py", "--workdir", "W", "stray"], "unexpected arguments: stray"),
    (["--config", "configs/quickstart.py", "--workdir", "W", "--counting_model", "3"], "counting_model"),
    (["--config", "configs/quickstart.py", "--workdir", "W", "--counting", "train.epocs=3"],
     "unknown config field 'train.epocs' (did you mean 'train.epochs'?)"),
    (["--config", "configs/quickstart.py", "--config", "configs/mnist.py", "--workdir", "W"], "takes one --config"),
])
def test_families_command_stops_with_one_line_before_any_work(tmp_path, args, message):
  from helpers import run_module  # pylint: disable=g-import-not-at-top

  proc = run_module("certssb_jax.studies", "families", *[str(tmp_path / "w") if a == "W" else a for a in args])
  assert proc.returncode == 2 and message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not os.path.exists(tmp_path / "w")
