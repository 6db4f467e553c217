"""Deep Partition Aggregation (Levine and Feizi, ICLR 2021): k members, member i trained on the i-th part of a
deterministic partition of the training set, without noise; the plurality vote (ties to the smaller class) is
certified against every change of the training set that changes at most

    R = floor((n_c - max_{c' != c} (n_c' + [c' < c])) / 2)

members (exact, no failure probability): each changed member moves one vote away from c and onto a rival.
How many training samples that is depends on what decides a sample's part (``PARTITION_KEYS``):

* ``"sample"`` (the paper's): a hash of the sample's image bytes and label. Inserting or deleting a sample
  changes the one part it hashes into, so R insertions and deletions in total are certified; a modified sample
  is a deletion and an insertion (two parts), so R // 2 modifications.
* ``"position"``: a hash of the sample's position in the training set, under the modification threat (the
  training set's size n fixed, any image and label of r positions changed at will, as bagging's). A modified
  sample stays in its part, so R modifications are certified; an insertion shifts positions and is not covered.

Within a part the samples are put in hash order, so member i is a function of its part's content (and the
config and i) alone: the engine trains it on that view only (``ensemble.views``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from certssb_jax.defenses.base import (
  INSERTIONS_DELETIONS,
  MODIFICATIONS,
  PARTITION_KEYS,
  CountCertificate,
  Defense,
  counting,
  top_two,
)
from certssb_jax.ensemble.views import MemberViews, Views

THREATS = {"sample": (INSERTIONS_DELETIONS, MODIFICATIONS), "position": (MODIFICATIONS,)}


def _digest(data: bytes) -> int:
  return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def sample_hashes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """(n,) uint64: the first 8 bytes of sha256(image bytes as float32, label) of each training sample."""
  x = np.ascontiguousarray(np.asarray(x, np.float32))
  y = np.asarray(y, np.int64)
  return np.array([_digest(x[j].tobytes() + int(y[j]).to_bytes(8, "little")) for j in range(len(y))], np.uint64)


def position_hashes(n: int) -> np.ndarray:
  """(n,) uint64: the first 8 bytes of sha256(position) of each position of a training set of size n."""
  return np.array([_digest(j.to_bytes(8, "little")) for j in range(n)], np.uint64)


def partition(x: np.ndarray, y: np.ndarray, k: int, key: str = "sample") -> list[np.ndarray]:
  """The k parts of the training set: the indices of each part, in hash order (module docstring)."""
  if key not in PARTITION_KEYS:
    raise ValueError(f"partition key must be one of {PARTITION_KEYS}, got {key!r}")
  h = sample_hashes(x, y) if key == "sample" else position_hashes(len(y))
  order = np.argsort(h, kind="stable")
  part = (h[order] % np.uint64(k)).astype(np.int64)
  return [order[part == i] for i in range(k)]


def views_of_parts(parts: list[np.ndarray]) -> MemberViews:
  """Member views over the parts: member m trains on part m mod k, as it is (no padding, no cycling)."""
  def views(model_ids: np.ndarray) -> Views:
    return Views.stack([parts[int(m) % len(parts)] for m in np.asarray(model_ids)])

  return views


def member_views(cfg: Any, x: np.ndarray, y: np.ndarray) -> MemberViews:
  return views_of_parts(partition(x, y, cfg.train.num_models, cfg.defense.partition))


def certified_members(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(c, n_c, n_runner, R) of each row of votes (N, K): the plurality, its votes, the strongest rival's and the
  number R of members that can change without changing c (module docstring)."""
  c, n_c, _, n_runner = top_two(votes)
  votes = np.asarray(votes, np.int64)
  k = votes.shape[1]
  penalty = (np.arange(k)[None, :] < c[:, None]).astype(np.int64)  # a tie with a smaller class loses
  rival = np.where(np.arange(k)[None, :] == c[:, None], np.iinfo(np.int64).min, votes + penalty).max(1)
  return c, n_c, n_runner, (n_c - rival) // 2


def counts_of_parts(r: Any, key: str) -> dict[str, Any]:
  """The threats' counts when r parts (buckets) may change: an insertion or a deletion changes one part and a
  modification two under a hash of the sample; a modification changes one under a hash of its position."""
  return {INSERTIONS_DELETIONS: r, MODIFICATIONS: r // 2} if key == "sample" else {MODIFICATIONS: r}


def certificate(votes: np.ndarray, key: str = "sample") -> CountCertificate:
  """The DPA certificate of each row of votes (N, K) under the partition ``key`` (module docstring)."""
  c, n_c, n_runner, r = certified_members(votes)
  return CountCertificate(pred=c, votes_top=n_c, votes_runner=n_runner, counts=counts_of_parts(r, key), exact=True)


def certify_votes(cfg: Any, votes: np.ndarray, n_train: int, preds: np.ndarray | None) -> CountCertificate:
  del n_train, preds
  return certificate(votes, cfg.defense.partition)


def largest_certificate(cfg: Any, n: int) -> dict[str, int]:
  """The most any answer can certify with k = M members: unanimous votes give R = floor(k / 2) members."""
  del n
  return counts_of_parts(cfg.train.num_models // 2, cfg.defense.partition)


def view_size(c: Any, n: int) -> int:
  """k <= n (no part empty by construction of the count); the typical part holds n // k samples."""
  k = c.train.num_models
  if k > n:
    raise ValueError(f"invalid config: defense {c.defense.name}: train.num_models {k} partitions of {n} training "
                     f"samples leave parts empty; use train.num_models={max(1, n // 10)} or fewer")
  return n // k


def describe(cfg: Any) -> dict[str, Any]:
  hashed = {"sample": "sha256(image, label) mod k", "position": "sha256(position) mod k"}[cfg.defense.partition]
  return {"partitions": cfg.train.num_models, "key": cfg.defense.partition, "partition": hashed,
          "threats": list(THREATS[cfg.defense.partition])}


def bucket_members(cfg: Any) -> np.ndarray:
  """(k, 1): part i feeds member i alone."""
  return np.arange(cfg.train.num_models)[:, None]


DPA = counting(name="DPA", key="dpa", member_views=member_views, certify_votes=certify_votes, describe=describe,
               largest_certificate=largest_certificate, view_size=view_size, buckets=bucket_members)


def dpa(k: int, partition: str = "sample") -> Defense:
  """DPA with k parts, a sample's part decided by ``partition`` ("sample" or "position", module docstring)."""
  return DPA._replace(settings={"train.num_models": int(k), "defense.partition": partition})
