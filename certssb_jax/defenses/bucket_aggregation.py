"""Finite Aggregation (Wang, Levine, Feizi, ICML 2022): DPA with every training sample in d members.

The training set is hashed into kd buckets (``partition.partition`` with kd parts: by sample, image and label, or by
position); d shifts s_1..s_d, a fixed function of the seed, put bucket b into the members (b + s_l) mod kd, so
member i trains on the union of the d buckets (i - s_l) mod kd and every bucket feeds exactly d members. A
changed training sample changes one bucket (by sample: an insertion or a deletion; a modification is two) and
so at most d members, all known from its bucket.

Certificate (the paper's Theorem 2): with the members' votes and the plurality c (ties to the smaller class), for
a rival c' the gap n_c - n_c' - [c' < c] falls, when the adversary takes bucket b, by at most
sum over b's members of (1 + [votes c] - [votes c']): 2 for a member that votes c, 1 for one that votes neither,
0 for one that votes c'. Taking the buckets with the largest falls first, the count is the number of buckets the
adversary can take while the gap stays >= 0; the certificate is the smallest count over the rivals (exact, no
failure probability). With d = 1 it is DPA's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from certssb_jax.defenses import partition
from certssb_jax.defenses.base import CountCertificate, Defense, counting, top_two
from certssb_jax.ensemble.views import MemberViews, Views


def shifts(seed: int, d: int, num_buckets: int) -> np.ndarray:
  """(d,) distinct shifts in [0, kd), a fixed function of the seed (and of nothing in the data)."""
  return np.random.default_rng([seed, 11, d, num_buckets]).choice(num_buckets, d, replace=False)


def members_of_buckets(offsets: np.ndarray, num_buckets: int) -> np.ndarray:
  """(kd, d): the members every bucket feeds, ``(b + s_l) mod kd``."""
  return (np.arange(num_buckets)[:, None] + np.asarray(offsets)[None, :]) % num_buckets


def views_of_buckets(buckets: list[np.ndarray], offsets: np.ndarray) -> MemberViews:
  """Member i's view: its d buckets ``(i - s_l) mod kd`` in shift order, each in hash order."""
  num = len(buckets)

  def views(model_ids: np.ndarray) -> Views:
    return Views.stack([np.concatenate([buckets[(int(i) - s) % num] for s in offsets])
                        for i in np.asarray(model_ids) % num])

  return views


def member_views(cfg: Any, x: np.ndarray, y: np.ndarray) -> MemberViews:
  m = cfg.train.num_models
  return views_of_buckets(partition.partition(x, y, m, cfg.defense.partition), shifts(cfg.seed, cfg.defense.spread, m))


def certified_buckets(preds: np.ndarray, offsets: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
  """(c, n_c, n_runner, the number of buckets the adversary can take) of every query from the members' votes.

  Args:
    preds: (kd, N) every member's class on every query.
    offsets: (d,) the shifts.
    num_classes: K.
  """
  preds = np.asarray(preds, np.int64)
  num, n = preds.shape
  votes = np.zeros((n, num_classes), np.int64)
  np.add.at(votes, (np.broadcast_to(np.arange(n), preds.shape), preds), 1)
  c, n_c, _, n_runner = top_two(votes)
  feeds = members_of_buckets(offsets, num)  # (kd, d)
  by_bucket = preds[feeds]  # (kd, d, N): the votes of each bucket's members
  out = np.full(n, num, np.int64)
  for rival in range(num_classes):
    gap = votes[np.arange(n), c] - votes[:, rival] - (rival < c)  # (N,)
    fall = (1 + (by_bucket == c[None, None]) - (by_bucket == rival)).sum(axis=1)  # (kd, N)
    fall = -np.sort(-fall, axis=0)  # the largest falls first
    taken = (np.cumsum(fall, axis=0) <= gap[None]).sum(axis=0)  # buckets taken with the gap still >= 0
    out = np.where(rival == c, out, np.minimum(out, taken))
  return c, n_c, n_runner, out


def certificate(preds: np.ndarray, offsets: np.ndarray, num_classes: int, key: str = "sample") -> CountCertificate:
  """The Finite Aggregation certificate per threat of the partition ``key`` (``partition.THREATS``)."""
  c, n_c, n_runner, buckets = certified_buckets(preds, offsets, num_classes)
  return CountCertificate(pred=c, votes_top=n_c, votes_runner=n_runner, counts=partition.counts_of_parts(buckets, key),
                          exact=True)


def certify_votes(cfg: Any, votes: np.ndarray, n_train: int, preds: np.ndarray) -> CountCertificate:
  del votes, n_train
  m = cfg.train.num_models
  return certificate(preds, shifts(cfg.seed, cfg.defense.spread, m), len(cfg.data.classes), cfg.defense.partition)


def bucket_members(cfg: Any) -> np.ndarray:
  """(kd, d): the members every bucket feeds."""
  m = cfg.train.num_models
  return members_of_buckets(shifts(cfg.seed, cfg.defense.spread, m), m)


def largest_certificate(cfg: Any, n: int) -> dict[str, int]:
  """Unanimous votes: every bucket's members vote c (a fall of 2d each), so floor(kd / 2d) = floor(k / 2) buckets."""
  del n
  return partition.counts_of_parts(cfg.train.num_models // (2 * cfg.defense.spread), cfg.defense.partition)


def view_size(c: Any, n: int) -> int:
  """kd members, each on d of the kd buckets: about d n / kd samples."""
  m, d = c.train.num_models, c.defense.spread
  if m % d:
    raise ValueError(f"invalid config: defense finite_aggregation: train.num_models {m} (k x d members) is not a "
                     f"multiple of defense.spread {d}; use train.num_models={max(d, m - m % d)}")
  return d * partition.view_size(c, n)


FINITE_AGGREGATION = counting(
    name="FA", key="finite_aggregation", member_views=member_views, certify_votes=certify_votes,
    describe=lambda cfg: {**partition.describe(cfg), "spread": cfg.defense.spread,
                          "k": cfg.train.num_models // cfg.defense.spread},
    largest_certificate=largest_certificate, view_size=view_size, buckets=bucket_members)


def finite_aggregation(k: int, d: int, partition: str = "sample") -> Defense:
  """Finite Aggregation with k x d members, each trained on d of the k x d buckets (``partition`` as DPA's)."""
  return FINITE_AGGREGATION._replace(settings={"train.num_models": int(k) * int(d), "defense.spread": int(d),
                                               "defense.partition": partition})
