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

from certssb_jax import rng
from certssb_jax.certify import bounds
from certssb_jax.defenses import bagging, dpa
from certssb_jax.ensemble import member, trainer as ensemble
from certssb_jax.models import zoo as models
from certssb_jax.run import pipeline

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
    cert = dpa.certificate(v[None])
    assert cert.pred[0] == _plurality(v)
    assert cert.certified_insertions[0] == _naive_dpa(v), v
    assert cert.certified[0] == _naive_dpa(v) // 2  # a modified sample is a deletion and an insertion


def test_dpa_certificate_by_hand():
  # floor((n_c - max_{c' != c}(n_c' + [c' < c])) / 2)
  votes = np.array([[5, 3, 0], [3, 3, 0], [3, 4, 0], [2, 5, 4], [1, 6, 3], [0, 0, 9], [3, 3, 3]])
  cert = dpa.certificate(votes)
  np.testing.assert_array_equal(cert.pred, [0, 0, 1, 1, 1, 2, 0])
  np.testing.assert_array_equal(cert.certified_insertions, [1, 0, 0, 0, 1, 4, 0])
  np.testing.assert_array_equal(cert.certified, [0, 0, 0, 0, 0, 2, 0])
  np.testing.assert_array_equal(cert.votes_runner, [3, 3, 3, 4, 3, 0, 3])


def test_a_sample_moves_no_other_sample_between_parts():
  rs = np.random.RandomState(1)
  x = rs.rand(60, 4, 4, 1).astype(np.float32)
  y = rs.randint(0, 3, 60)
  parts = dpa.partition(x, y, 5)
  assert sorted(np.concatenate(parts).tolist()) == list(range(60))
  # permuting the training set changes no part's content or its order (hash order)
  perm = rs.permutation(60)
  parts_p = dpa.partition(x[perm], y[perm], 5)
  for a, b in zip(parts, parts_p):
    np.testing.assert_array_equal(x[a], x[perm][b])
  # changing sample 7 (image and label) leaves every other sample in its part
  x2, y2 = x.copy(), y.copy()
  x2[7] += 0.5
  y2[7] = (y2[7] + 1) % 3
  where = lambda ps: {int(j): i for i, p in enumerate(ps) for j in p}
  before, after = where(parts), where(dpa.partition(x2, y2, 5))
  assert all(before[j] == after[j] for j in range(60) if j != 7)
  views = dpa.views_of_parts(parts)(np.arange(7))  # members 5 and 6 are padding: parts 0 and 1 again
  assert views.shape == (7, max(len(p) for p in parts))
  for m in range(7):
    part = parts[m % 5]
    np.testing.assert_array_equal(views[m], np.resize(part, views.shape[1]))


def test_members_trained_on_parts_depend_on_their_part_only():
  """Changing one training sample changes the member of its part and no other, bit for bit."""
  rs = np.random.RandomState(2)
  x = rs.rand(48, 28, 28, 1).astype(np.float32)
  y = (rs.rand(48) > 0.5).astype(np.int32)
  tr = ensemble.EnsembleTrainer(models.get_model("mnist_cnn", 2), (28, 28, 1),
                                ensemble.TrainConfig(epochs=2, batch_size=4, learning_rate=1e-3, models_per_chunk=4))
  streams = member.Streams.ensemble(0)
  ids = np.arange(4)

  def train(xs, ys):
    parts = dpa.partition(xs, ys, 4)
    return parts, tr.train_chunk(ids, streams, xs, ys, None, views=dpa.views_of_parts(parts))

  parts, a = train(x, y)
  j = int(parts[2][0])
  x2 = x.copy()
  x2[j] = 1.0 - x2[j]  # the sample may move to another part
  parts2, b = train(x2, y)
  moved_to = next(i for i, p in enumerate(parts2) if j in p)
  for m in range(4):
    same = all(np.array_equal(u[m], v[m]) for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    assert same == (m not in (2, moved_to)), m


# ---------------------------------------------------------------------------------------------- bagging


def _naive_bagging(gap, n, s):
  if gap <= 0:
    return -1
  r = 0
  while r + 1 <= n and gap > 2 * (1 - (1 - (r + 1) / n) ** s):
    r += 1
  return r


def test_bagging_radius_equals_the_naive_loop():
  rs = np.random.RandomState(3)
  for n, s in ((50, 1), (100, 7), (1000, 30), (12000, 240)):
    gaps = np.concatenate([rs.uniform(-0.2, 1.0, 60), [0.0, 1e-9, 1.0, 2.0]])
    got = bagging.certified_modifications(gaps, n, s)
    np.testing.assert_array_equal(got, [_naive_bagging(g, n, s) for g in gaps])


def test_bagging_certificate_uses_clopper_pearson_with_bonferroni():
  for v in ([50, 0], [40, 10], [26, 24], [10, 40], [20, 15, 15]):
    v = np.asarray(v, np.int64)
    cert = bagging.certificate(v[None], alpha=0.001, n=12000, s=240)
    order = np.argsort(-v, kind="stable")
    a = 0.001 / len(v)
    gap = bounds.clopper_pearson_lower(v[order[0]], v.sum(), a) - bounds.clopper_pearson_upper(v[order[1]], v.sum(), a)
    assert cert.pred[0] == order[0]
    assert cert.certified[0] == _naive_bagging(float(gap), 12000, 240)
  # 50 of 50 votes: pA_low = (alpha / 2)^(1/50), pB_high = 1 - pA_low
  p = (0.0005) ** (1 / 50)
  r_star = 12000 * (1 - (1 - (2 * p - 1) / 2) ** (1 / 240))
  assert bagging.certificate(np.array([[50, 0]]), alpha=0.001, n=12000, s=240).certified[0] == int(np.ceil(r_star)) - 1


def test_bags_are_keyed_by_seed_and_member():
  views = bagging.bags(5, 100, 17)
  a = views(np.arange(6))
  assert a.shape == (6, 17) and a.min() >= 0 and a.max() < 100
  np.testing.assert_array_equal(views(np.array([4, 2]))[0], a[4])  # the chunk does not matter
  expect = jax.random.randint(rng.member_key(5, rng.BAG, 3), (17,), 0, 100)
  np.testing.assert_array_equal(a[3], np.asarray(expect))
  assert not np.array_equal(bagging.bags(6, 100, 17)(np.arange(1))[0], a[0])


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
  for split in ("clean", "triggered"):
    v = votes[split]
    assert (v.sum(1) == 6).all()
    cert = (dpa.certificate(v) if name == "dpa" else
            bagging.certificate(v, alpha=c.certify.alpha, n=n, s=n // 6))
    got = np.array([int(r["certified_poisons"]) for r in rows if r["split"] == split])
    np.testing.assert_array_equal(got, cert.certified)
    if split == "clean":
      correct = cert.pred == votes["clean_label"]
      for k, acc in summary["metrics"]["cra_poison_budget"].items():
        assert acc == pytest.approx(np.mean(correct & (cert.certified >= int(k))))
  again = pipeline.run(c, str(tmp_path))  # resumes: nothing retrained, the same numbers
  assert json.dumps(again["metrics"]) == json.dumps(summary["metrics"])
  assert os.path.exists(tmp_path / "certified_accuracy.png")


@pytest.mark.slow
def test_families_table_counts_from_the_run_folders(tmp_path):
  from certssb_jax import families  # pylint: disable=g-import-not-at-top

  spec = str(tmp_path / "tiny.py")
  from conftest import write_tiny_config  # pylint: disable=g-import-not-at-top,g-bad-import-order

  write_tiny_config(spec, **{"sigma.sigma_hi": None, "train.num_models": 4, "train.epochs": 1})
  counting = {"train.num_models": "6", "train.epochs": "2", "train.batch_size": "8", "undefended.enabled": "False"}
  rows = families.run_families(spec, str(tmp_path / "w"), counting, pipeline.no_progress)
  assert [r["summary"]["method"] for r in rows] == ["RAB", "Cert-SSB", "DPA", "bagging"]
  for r in rows:
    with open(os.path.join(r["workdir"], "per_sample.csv")) as f:
      clean = [x for x in csv.DictReader(f) if x["split"] == "clean"]
    counting_row = r["summary"].get("family") == "counting"
    budget = np.array([int(x["certified_poisons" if counting_row else "poison_budget"]) for x in clean])
    right = np.array([x["pred" if counting_row else "pred_stored"] == x["label"] for x in clean])
    for k in families.POISON_GRID:
      assert families._budget_at(r, k) == pytest.approx(np.mean(right & (budget >= k)))  # pylint: disable=protected-access
  page = tmp_path / "families.md"
  families.write_page(str(page), rows, "python -m certssb_jax.families ...", str(tmp_path / "w"))
  text = page.read_text()
  assert text.count("\n| ") == 5  # the header and four rows and "figures/families_mnist_0-1.png" in text


@pytest.mark.parametrize("args,message", [
    (["--workdir", "W"], "--config is required"),
    (["--config", "configs/quickstart.py", "--workdir", "W", "--counting_models", "0"], "must be >= 1"),
    (["--config", "configs/quickstart.py", "--workdir", "W", "stray"], "unexpected arguments: stray"),
    (["--config", "configs/quickstart.py", "--workdir", "W", "--counting_model", "3"], "counting_model"),
])
def test_families_command_stops_with_one_line_before_any_work(tmp_path, args, message):
  from helpers import run_module  # pylint: disable=g-import-not-at-top

  proc = run_module("certssb_jax.families", *[str(tmp_path / "w") if a == "W" else a for a in args])
  assert proc.returncode == 2 and message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not os.path.exists(tmp_path / "w")
