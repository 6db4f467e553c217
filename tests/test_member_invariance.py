"""Member invariance, what every count certificate rests on: change the training set as the threat allows and
every member whose view the change does not touch keeps bit-identical parameters and votes.

The members are trained by the engine itself (``EnsembleTrainer.train_chunk`` on the defense's ``member_views``)
and vote through ``predict_logits``, as a run does. The changes are the ones that broke DPA before views were
trained unpadded: an insertion into and a deletion from the LARGEST part (which changes the length every other
member used to be padded to), a modification that moves a sample across parts; bagging's modification of a
position some bags hold and others do not.
"""

import jax
import ml_collections
import numpy as np
import pytest

from certssb_jax.defenses import bootstrap, partition
from certssb_jax.ensemble import member, trained, trainer as ensemble
from certssb_jax.ensemble.views import Views
from certssb_jax.models import zoo as models

K = 4  # members
SHAPE = (16, 16, 1)  # the smallest input the paper's MNIST CNN takes


def _cfg(name, **defense):
  c = ml_collections.ConfigDict({"seed": 0, "train": {"num_models": K},
                                 "defense": {"partition": "sample", "bag_size": 9, **defense}})
  return c


def _data(n, seed=0):
  rs = np.random.RandomState(seed)
  return rs.rand(n, *SHAPE).astype(np.float32), (rs.rand(n) > 0.5).astype(np.int32)


@pytest.fixture(scope="module")
def trainer():
  return ensemble.EnsembleTrainer(models.get_model("mnist_cnn", 2), SHAPE,
                                  ensemble.TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2,
                                                       models_per_chunk=K))


@pytest.fixture(scope="module")
def queries():
  return np.random.RandomState(9).rand(32, *SHAPE).astype(np.float32)


def _members(trainer, queries, defense, cfg, x, y):
  """(per-member flat params, per-member votes on the queries, the views) of the K members."""
  views = defense.member_views(cfg, x, y)
  state = trainer.train_chunk(np.arange(K), member.Streams.ensemble(0), x, y, None, views=views)
  leaves = jax.tree.leaves(state.params)
  params = [np.concatenate([np.asarray(a[m]).ravel() for a in leaves]) for m in range(K)]
  votes = trained.predict_logits(trainer.model, state, queries)[..., 0] > 0  # (K, N)
  return params, votes, views(np.arange(K))


def _changed(a, b):
  """The members whose parameters or votes differ, bit for bit."""
  return {m for m in range(K) if not (np.array_equal(a[0][m], b[0][m]) and np.array_equal(a[1][m], b[1][m]))}


def _part_of(parts, x, y, sample):
  """The part a sample (image, label) lands in."""
  h = partition.sample_hashes(sample[0][None], np.array([sample[1]]))[0]
  return int(h % np.uint64(len(parts)))


def test_dpa_insertion_into_and_deletion_from_the_largest_part_changes_that_member_only(trainer, queries):
  x, y = _data(48)
  cfg = _cfg("dpa")
  parts = partition.partition(x, y, K)
  largest = int(np.argmax([len(p) for p in parts]))
  base = _members(trainer, queries, partition.DPA, cfg, x, y)
  # an inserted sample that hashes into the largest part (an attacker finds one in about K tries)
  rs = np.random.RandomState(5)
  new = next(s for s in ((rs.rand(*SHAPE).astype(np.float32), 1) for _ in range(200))
             if _part_of(parts, x, y, s) == largest)
  inserted = _members(trainer, queries, partition.DPA, cfg, np.concatenate([x, new[0][None]]), np.append(y, new[1]))
  assert inserted[2].lengths[largest] == base[2].lengths[largest] + 1  # the longest view got longer
  assert _changed(base, inserted) == {largest}
  # a deletion from the largest part
  gone = int(parts[largest][3])
  keep = np.arange(len(y)) != gone
  deleted = _members(trainer, queries, partition.DPA, cfg, x[keep], y[keep])
  assert _changed(base, deleted) == {largest}


def test_dpa_modification_changes_the_parts_it_leaves_and_enters_only(trainer, queries):
  x, y = _data(48, seed=1)
  for key in partition.PARTITION_KEYS:
    cfg = _cfg("dpa", partition=key)
    parts = partition.partition(x, y, K, key)
    base = _members(trainer, queries, partition.DPA, cfg, x, y)
    for j in (int(parts[0][0]), int(parts[3][-1])):
      x2, y2 = x.copy(), y.copy()
      x2[j], y2[j] = 1.0 - x2[j], 1 - y2[j]  # image and label
      parts2 = partition.partition(x2, y2, K, key)
      where = lambda ps, j=j: next(i for i, p in enumerate(ps) if j in p)
      touched = {where(parts), where(parts2)}
      assert len(touched) == 1 or key == "sample"  # by position a modified sample keeps its part
      assert _changed(base, _members(trainer, queries, partition.DPA, cfg, x2, y2)) == touched


def test_bagging_modification_changes_the_members_whose_bag_holds_it_only(trainer, queries):
  x, y = _data(40, seed=2)
  cfg = _cfg("bagging")
  base = _members(trainer, queries, bootstrap.BAGGING, cfg, x, y)
  bags = base[2].indices
  held = [int(j) for j in range(len(y)) if 0 < sum(j in b for b in bags) < K]  # in some bags, not all
  outside = [int(j) for j in range(len(y)) if not any(j in b for b in bags)]
  for j in (held[0], outside[0]):
    x2, y2 = x.copy(), y.copy()
    x2[j], y2[j] = 1.0 - x2[j], 1 - y2[j]
    holding = {m for m in range(K) if j in bags[m]}
    assert _changed(base, _members(trainer, queries, bootstrap.BAGGING, cfg, x2, y2)) == holding


def test_a_member_does_not_depend_on_the_other_views_lengths(trainer, queries):
  """The same view trains the same member beside a short or a long neighbour (the padded shape differs)."""
  x, y = _data(64, seed=3)
  view = np.arange(10)
  runs = []
  for other in (3, 60):
    views = lambda ids, other=other: Views.stack([view if m == 0 else np.arange(other) for m in ids])
    state = trainer.train_chunk(np.arange(K), member.Streams.ensemble(0), x, y, None, views=views)
    runs.append([np.asarray(a[0]) for a in jax.tree.leaves(state.params)])
  assert all(np.array_equal(a, b) for a, b in zip(*runs))
