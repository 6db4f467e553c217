"""Finite Aggregation: its certificate against brute force over the adversary's buckets and votes, equal to DPA's
at d = 1; members that depend on their own d buckets only; a whole run that recounts from its votes."""

import csv
import itertools

from conftest import tiny_config  # pylint: disable=g-bad-import-order
import jax
import numpy as np

from certssb_jax.defenses import INSERTIONS_DELETIONS, MODIFICATIONS, bucket_aggregation as fa, partition
from certssb_jax.ensemble import member, trainer as ensemble
from certssb_jax.experiment import pipeline
from certssb_jax.models import zoo as models


def _plurality(preds_column, k):
  return int(np.bincount(preds_column, minlength=k).argmax())  # ties to the smaller class


def _brute(preds, offsets, k):
  """The largest r such that no choice of r buckets, with every vote of their members set at will, changes the
  plurality of one query's members' votes (preds (kd,))."""
  num = len(preds)
  feeds = fa.members_of_buckets(offsets, num)
  c = _plurality(preds, k)
  r = 0
  while r < num:
    for buckets in itertools.combinations(range(num), r + 1):
      hit = sorted(set(feeds[list(buckets)].ravel()))
      for votes in itertools.product(range(k), repeat=len(hit)):
        changed = preds.copy()
        changed[hit] = votes
        if _plurality(changed, k) != c:
          return r
    r += 1
  return r


def test_fa_certificate_is_sound_and_equals_brute_force_at_d_1():
  rs = np.random.RandomState(0)
  exact = 0
  for trial in range(60):
    d = 1 + trial % 3
    kd = d * int(rs.randint(2, 4))
    k_classes = 2 + trial % 2
    offsets = fa.shifts(trial, d, kd)
    p = rs.dirichlet(np.ones(k_classes) * 0.5)
    preds = rs.choice(k_classes, size=(kd, 1), p=p)
    cert = fa.certified_buckets(preds, offsets, k_classes)[3][0]
    truth = _brute(preds[:, 0], offsets, k_classes)
    assert cert <= truth, (d, kd, preds[:, 0], offsets, cert, truth)
    if d == 1:
      assert cert == truth
    exact += cert == truth
  assert exact > 40  # mostly tight, not just sound


def test_fa_at_d_1_is_dpa():
  rs = np.random.RandomState(1)
  preds = rs.randint(0, 3, size=(12, 50))
  for key in ("sample", "position"):
    got = fa.certificate(preds, fa.shifts(0, 1, 12), 3, key)
    votes = np.stack([np.bincount(preds[:, i], minlength=3) for i in range(50)])
    want = partition.certificate(votes, key)
    np.testing.assert_array_equal(got.pred, want.pred)
    assert got.counts.keys() == want.counts.keys()
    for threat in got.counts:
      np.testing.assert_array_equal(got.counts[threat], want.counts[threat])


def test_every_bucket_feeds_d_members_and_every_member_d_buckets():
  offsets = fa.shifts(3, 4, 20)
  assert len(set(offsets.tolist())) == 4
  feeds = fa.members_of_buckets(offsets, 20)
  assert (np.bincount(feeds.ravel(), minlength=20) == 4).all()
  buckets = [np.array([b]) for b in range(20)]
  views = fa.views_of_buckets(buckets, offsets)(np.arange(20))
  for i in range(20):
    assert sorted(views.indices[i, :views.lengths[i]].tolist()) == sorted(np.flatnonzero((feeds == i).any(1)))


def test_an_insertion_changes_the_d_members_of_its_bucket_only():
  model = models.get_model("mnist_cnn", 2)
  tr = ensemble.EnsembleTrainer(model, (16, 16, 1), ensemble.TrainConfig(2, 4, 1e-2, models_per_chunk=6))
  rs = np.random.RandomState(2)
  x, y = rs.rand(36, 16, 16, 1).astype(np.float32), (rs.rand(36) > 0.5).astype(np.int32)
  offsets = fa.shifts(0, 2, 6)

  def train(xs, ys):
    views = fa.views_of_buckets(partition.partition(xs, ys, 6), offsets)
    st = tr.train_chunk(np.arange(6), member.Streams.ensemble(0), xs, ys, None, views=views)
    return [np.concatenate([np.asarray(a[m]).ravel() for a in jax.tree.leaves(st.params)]) for m in range(6)]

  before = train(x, y)
  new = rs.rand(1, 16, 16, 1).astype(np.float32)
  bucket = int(partition.sample_hashes(new, np.array([1]))[0] % np.uint64(6))
  after = train(np.concatenate([x, new]), np.append(y, 1))
  changed = {m for m in range(6) if not np.array_equal(before[m], after[m])}
  assert changed == set(fa.members_of_buckets(offsets, 6)[bucket].tolist())


def test_a_run_recounts_from_its_votes(tmp_path):
  c = tiny_config(**{"defense.name": "finite_aggregation", "defense.spread": 2, "train.num_models": 8,
                     "train.epochs": 2, "undefended.enabled": False})
  summary = pipeline.run(c, str(tmp_path))
  assert summary["method"] == "FA" and summary["defense"]["spread"] == 2 and summary["defense"]["k"] == 4
  votes = np.load(tmp_path / "votes.npz")
  rows = list(csv.DictReader(open(tmp_path / "per_sample.csv")))
  for split in ("clean", "triggered"):
    cert = fa.certificate(votes[f"{split}_preds"], fa.shifts(c.seed, 2, 8), 2)
    got = [r for r in rows if r["split"] == split]
    np.testing.assert_array_equal([int(r["certified_insertions_deletions"]) for r in got],
                                  cert.counts[INSERTIONS_DELETIONS])
    np.testing.assert_array_equal([int(r["certified_modifications"]) for r in got], cert.counts[MODIFICATIONS])
  assert summary["largest_certificate"] == {INSERTIONS_DELETIONS: 2, MODIFICATIONS: 1}
