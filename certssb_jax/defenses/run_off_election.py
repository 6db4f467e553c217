"""Run-off Election (Rezaei, Banihashem, Chegini, Feizi, ICML 2023): two rounds of voting by the members of a
partition ensemble (DPA, Finite Aggregation), which train as they do for that defense.

A member ranks the classes by its probabilities (ties to the smaller class). Round 1: every member votes its top
class; the two classes with the most votes go on (ties to the smaller class). Round 2: every member votes for the
finalist it ranks higher; the finalist with more votes wins (a tie to the smaller class).

Certificate (the paper's, stated in buckets: a DPA part feeds one member, a Finite Aggregation bucket d). The
adversary takes buckets and sets the rankings of the members they feed at will. The prediction c changes only if
(R1) two rivals c1, c2 both overtake c in round 1, or (R2) c stays a finalist and loses round 2 to a rival c',
which must then also overtake the other finalist c_sec in round 1 (unless it is c_sec). A gap g must reach <= 0,
and each bucket taken closes it by at most the sum, over the members it feeds, of

* c' overtaking a in round 1, g = n_a - n_c' + [c' > a]: 1 + [votes a] - [votes c'];
* c1 and c2 both overtaking c, the sum of their two gaps: 1 + 2 [votes c] - [votes c1] - [votes c2];
* c' winning round 2, g = 2 #(members ranking c above c') - M + [c' > c]: 2 [ranks c above c'].

Taking the largest closings first gives a number of buckets each event needs; an event needs the largest of its
parts' numbers (R1: c1's, c2's and the sum's; R2: c' over c_sec and c' over c in round 2). The certificate is the
least over the events, minus one: the buckets the adversary can take without changing c. It holds with certainty
and may be below the true number (it is a bound on what each event needs). With two classes round 2 repeats
round 1 and the certificate is the base defense's.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from certssb_jax.defenses import partition
from certssb_jax.defenses.base import CountCertificate, Defense


def run_off_votes(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(winner c, other finalist c_sec, round-1 votes (N, K), round-2 margins (N, K)) of every query.

  Args:
    ranks: (M, N, K) every member's rank of every class (0 its top class).

  The round-2 margin of c' is 2 #(members ranking c above c') - M (0 at c' = c).
  """
  ranks = np.asarray(ranks)
  m, n, k = ranks.shape
  votes = np.zeros((n, k), np.int64)
  np.add.at(votes, (np.broadcast_to(np.arange(n), (m, n)), ranks.argmin(-1)), 1)
  order = np.argsort(-votes, axis=1, kind="stable")  # most votes first, ties to the smaller class
  f1, f2 = order[:, 0], order[:, 1]
  rows = np.arange(n)
  prefers_f1 = (ranks[:, rows, f1] < ranks[:, rows, f2]).sum(0)
  f1_wins = (2 * prefers_f1 > m) | ((2 * prefers_f1 == m) & (f1 < f2))
  c, c_sec = np.where(f1_wins, f1, f2), np.where(f1_wins, f2, f1)
  margins = 2 * (ranks[:, rows, c][:, :, None] < ranks).sum(0) - m
  margins[rows, c] = 0
  return c, c_sec, votes, margins


def _needed(gap: np.ndarray, closings: np.ndarray) -> np.ndarray:
  """(N,) the fewest buckets whose closings (B, N) sum to >= gap (N,), the largest first (B + 1: never)."""
  taken = np.concatenate([np.zeros((1, gap.shape[0]), np.int64),
                          np.cumsum(-np.sort(-closings, axis=0), axis=0)])
  return (taken < gap[None]).sum(0)


def certified_buckets(ranks: np.ndarray, feeds: np.ndarray) -> tuple[np.ndarray, ...]:
  """(c, its round-1 votes, the strongest rival's round-1 votes, the buckets the adversary can take) per query.

  Args:
    ranks: (M, N, K) every member's rank of every class.
    feeds: (B, d) the members every bucket feeds (``Defense.buckets``).
  """
  ranks, feeds = np.asarray(ranks), np.asarray(feeds)
  n, k = ranks.shape[1:]
  c, c_sec, votes, margins = run_off_votes(ranks)
  rows = np.arange(n)
  top = ranks.argmin(-1)[feeds]  # (B, d, N): the round-1 votes of each bucket's members
  voting = [(top == a).sum(1) for a in range(k)]  # (B, N) each: a bucket's members voting class a
  voting_c = (top == c[None, None]).sum(1)
  never = np.full(n, len(feeds) + 1, np.int64)

  def overtake(a: np.ndarray, voting_a: np.ndarray, rival: int) -> tuple[np.ndarray, np.ndarray]:
    """(gap, closings) of ``rival`` overtaking class a in round 1."""
    return votes[rows, a] - votes[:, rival] + (rival > a), feeds.shape[1] + voting_a - voting[rival]

  over_c = [overtake(c, voting_c, a) for a in range(k)]
  r1 = never.copy()
  for c1, c2 in itertools.combinations(range(k), 2):
    (gap1, close1), (gap2, close2) = over_c[c1], over_c[c2]
    both = np.maximum(_needed(gap1, close1), _needed(gap2, close2))
    both = np.maximum(both, _needed(gap1 + gap2, close1 + close2 - feeds.shape[1]))
    r1 = np.where((c == c1) | (c == c2), r1, np.minimum(r1, both))
  r2 = never.copy()
  rank_c = ranks[:, rows, c]  # (M, N)
  voting_sec = (top == c_sec[None, None]).sum(1)
  for rival in range(k):
    reach = _needed(*overtake(c_sec, voting_sec, rival))  # 0 when the rival is c_sec
    win = _needed(margins[:, rival] + (rival > c), 2 * (rank_c < ranks[:, :, rival])[feeds].sum(1))
    r2 = np.where(c == rival, r2, np.minimum(r2, np.maximum(reach, win)))
  runner = np.where(np.arange(k)[None] == c[:, None], -1, votes).max(1)
  return c, votes[rows, c], runner, np.minimum(r1, r2) - 1


def certificate(ranks: np.ndarray, feeds: np.ndarray, key: str = "sample") -> CountCertificate:
  """The run-off certificate per threat of the partition ``key`` (``partition.THREATS``)."""
  c, n_c, n_runner, buckets = certified_buckets(ranks, feeds)
  return CountCertificate(pred=c, votes_top=n_c, votes_runner=n_runner, counts=partition.counts_of_parts(buckets, key),
                          exact=True)


# the key of the run-off on each base's members
KEYS = {"dpa": "dpa_roe", "finite_aggregation": "fa_roe"}


def run_off(base: Defense) -> Defense:
  """``base`` (DPA or Finite Aggregation, or a value of theirs such as ``dpa(50)``) with a run-off election for its
  vote; its members are the base's (the two share trained models)."""
  if base.buckets is None or base.key not in KEYS:
    raise ValueError(f"a run-off election runs on the members of {sorted(KEYS)}, not {base.key}")

  def certify_votes(cfg: Any, votes: np.ndarray, n_train: int, ranks: np.ndarray) -> CountCertificate:
    del votes, n_train
    return certificate(ranks, base.buckets(cfg), cfg.defense.partition)

  return base._replace(name=f"{base.name}+ROE", key=KEYS[base.key], certify_votes=certify_votes,
                       member_ranks=True, trains=base.trains or base.key,
                       describe=lambda cfg: {**base.describe(cfg), "vote": "run-off election"})
