"""Deep Partition Aggregation (Levine and Feizi, ICLR 2021): k members, member i trained on the i-th part of a
deterministic partition of the training set, without noise; the plurality vote is certified against any r
insertions or deletions of training samples, labels included, with

    r = floor((n_c - max_{c' != c} (n_c' + [c' < c])) / 2)

(exact, no failure probability): each insertion or deletion lands in one part and so changes at most one vote.
A modified sample is a deletion and an insertion: r // 2 modifications are certified.

The part of a sample is a hash of its image bytes and its label, so it depends on that sample alone (inserting
or removing one sample moves no other); within a part the samples are put in hash order, so a member is a
function of its part's content only, not of the order of the training set.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from certssb_jax.defenses.base import CountCertificate, Defense, MemberViews, top_two


def sample_hashes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """(n,) uint64: the first 8 bytes of sha256(image bytes as float32, label) of each training sample."""
  x = np.ascontiguousarray(np.asarray(x, np.float32))
  y = np.asarray(y, np.int64)
  return np.array([int.from_bytes(hashlib.sha256(x[j].tobytes() + int(y[j]).to_bytes(8, "little")).digest()[:8],
                                  "little") for j in range(len(y))], np.uint64)


def partition(x: np.ndarray, y: np.ndarray, k: int) -> list[np.ndarray]:
  """The k parts of the training set: the indices of each part, in hash order."""
  h = sample_hashes(x, y)
  order = np.argsort(h, kind="stable")
  part = (h[order] % np.uint64(k)).astype(np.int64)
  return [order[part == i] for i in range(k)]


def views_of_parts(parts: list[np.ndarray]) -> MemberViews:
  """Member views over the parts: member m trains on part m mod k, cycled to the largest part's length so
  every member runs the same number of steps (a cycled view is still a function of its part alone)."""
  length = max(len(p) for p in parts)
  if min(len(p) for p in parts) == 0:
    raise ValueError(f"a partition of the training set into {len(parts)} parts has an empty part; use fewer "
                     "members (train.num_models)")
  padded = np.stack([np.resize(p, length) for p in parts])  # np.resize repeats the part

  def views(model_ids: np.ndarray) -> np.ndarray:
    return padded[np.asarray(model_ids) % len(parts)]

  return views


def member_views(cfg: Any, x: np.ndarray, y: np.ndarray) -> MemberViews:
  return views_of_parts(partition(x, y, cfg.train.num_models))


def certificate(votes: np.ndarray) -> CountCertificate:
  """The DPA certificate of each row of votes (N, K) (module docstring)."""
  c, n_c, _, n_runner = top_two(votes)
  votes = np.asarray(votes, np.int64)
  k = votes.shape[1]
  penalty = (np.arange(k)[None, :] < c[:, None]).astype(np.int64)  # a tie with a smaller class loses
  rival = np.where(np.arange(k)[None, :] == c[:, None], np.iinfo(np.int64).min, votes + penalty).max(1)
  insertions = (n_c - rival) // 2
  return CountCertificate(pred=c, votes_top=n_c, votes_runner=n_runner, certified=insertions // 2,
                          certified_insertions=insertions)


def certify_votes(cfg: Any, votes: np.ndarray, n_train: int) -> CountCertificate:
  del cfg, n_train
  return certificate(votes)


DPA = Defense(name="DPA", family="counting", member_views=member_views, certify_votes=certify_votes,
              describe=lambda cfg: {"partitions": cfg.train.num_models, "partition": "sha256(image, label) mod k"})
