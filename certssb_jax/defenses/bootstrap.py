"""Bagging (Jia, Cao, Gong, AAAI 2021): M members, member m trained without noise on a bag of s training samples
drawn uniformly with replacement (the draw keyed by the seed and m; s fixed by the config, not by n).

The certificate is the paper's Theorem 1 without its rounding to multiples of n^-s. Let D' be the training set
after the attack, n' = |D'|, and e = |D n D'| the samples both share. A bag drawn from D holds only shared samples
with probability (e / n)^s, one drawn from D' with probability (e / n')^s, and given that, both bags have the same
distribution, so both ensembles give the same member. A class whose vote probability under D lies in
[p_low, p_high] therefore has, under D', a probability of at least (n / n')^s (p_low - 1 + (e / n)^s) and at most
(n / n')^s p_high + 1 - (e / n')^s, and the vote cannot change when (Bonferroni bounds pA_low, pB_high of the top
class and the strongest other class, alpha / K each)

    pA_low - pB_high > 1 + (n' / n)^s - 2 (e / n)^s.

Two threats (``COUNTS``), each certificate the largest r whose every attack passes:

* modifications (n' = n, e = n - r: any image and label of r samples changed): 2 (1 - (1 - r / n)^s);
* insertions and deletions, r in total (i inserted, d deleted, n' = n + i - d, e = n - d): the right side is
  convex in d for i + d = r, so the worst mix is an endpoint, and pure insertion (i = r) is the larger one:
  (1 + r / n)^s - 1. Twice the modification count is NOT a valid count of insertions and deletions.

Both hold with probability >= 1 - alpha over the members' training randomness (unlike DPA's); -1 where not even the
unchanged training set is certified (pA_low <= pB_high), and the run then abstains.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from certssb_jax import rng
from certssb_jax.certify import bounds
from certssb_jax.defenses.base import INSERTIONS_DELETIONS, MODIFICATIONS, CountCertificate, Defense, counting, top_two
from certssb_jax.ensemble.views import MemberViews, Views


def bags(seed: int, n: int, s: int) -> MemberViews:
  """Member m's bag: s indices in [0, n) drawn uniformly with replacement from the key (seed, BAG, m)."""
  draw = jax.jit(jax.vmap(lambda m: jax.random.randint(rng.member_key(seed, rng.BAG, m), (s,), 0, n)))

  def views(model_ids: np.ndarray) -> Views:
    ids = np.asarray(model_ids)
    return Views(np.asarray(draw(ids)), np.full(len(ids), s, np.int64))

  return views


def member_views(cfg: Any, x: np.ndarray, y: np.ndarray) -> MemberViews:
  del x
  return bags(cfg.seed, len(y), cfg.defense.bag_size)


def modification_shift(r: np.ndarray | float, n: int, s: int) -> np.ndarray:
  """2 (1 - (1 - r / n)^s): how far r modified samples can move pA - pB."""
  return -2.0 * np.expm1(s * np.log1p(-np.asarray(r, np.float64) / n))


def insertion_shift(r: np.ndarray | float, n: int, s: int) -> np.ndarray:
  """(1 + r / n)^s - 1: how far r insertions and deletions (the worst mix: r insertions) can move pA - pB."""
  return np.expm1(s * np.log1p(np.asarray(r, np.float64) / n))


# threat -> (how far r changes move pA - pB, the largest r the threat allows)
COUNTS: dict[str, tuple[Callable[..., np.ndarray], Callable[[int], float]]] = {
    MODIFICATIONS: (modification_shift, lambda n: n),
    INSERTIONS_DELETIONS: (insertion_shift, lambda n: math.inf),
}


def certified_count(gap: np.ndarray, n: int, s: int, threat: str = MODIFICATIONS) -> np.ndarray:
  """The largest integer r with ``gap > shift(r)`` for the threat's shift (``COUNTS``), -1 where gap <= 0
  (gap = pA_low - pB_high). The shift grows with r, so r is found by bisection on the exact float64 condition
  (rounding never certifies an r the condition rejects)."""
  shift, most = COUNTS[threat]
  gap = np.asarray(gap, np.float64)
  out = np.full(gap.shape, -1, np.int64)
  for i in np.flatnonzero(gap > 0):
    holds = lambda r, g=gap[i]: g > shift(r, n, s)
    lo, hi = 0, 1  # holds(lo); find hi with not holds(hi) (or the threat's limit)
    while hi <= most(n) and holds(hi):
      lo, hi = hi, 2 * hi
    hi = min(hi, int(most(n)) + 1) if math.isfinite(most(n)) else hi
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if holds(mid) else (lo, mid)
    out[i] = lo
  return out


def certificate(votes: np.ndarray, *, alpha: float, n: int, s: int) -> CountCertificate:
  """The bagging certificate of each row of votes (N, K) of M members trained on bags of s of n samples."""
  votes = np.asarray(votes, np.int64)
  m, k = int(votes[0].sum()) if len(votes) else 1, votes.shape[1]
  c, n_c, _, n_runner = top_two(votes)
  a = alpha / k  # Bonferroni over the classes, as the smoothing bounds
  gap = bounds.clopper_pearson_lower(n_c, m, a) - bounds.clopper_pearson_upper(n_runner, m, a)
  counts = {threat: certified_count(gap, n, s, threat) for threat in COUNTS}
  return CountCertificate(pred=c, votes_top=n_c, votes_runner=n_runner, counts=counts, exact=False)


def certify_votes(cfg: Any, votes: np.ndarray, n_train: int, preds: np.ndarray | None) -> CountCertificate:
  del preds
  return certificate(votes, alpha=cfg.certify.alpha, n=n_train, s=cfg.defense.bag_size)


def largest_certificate(cfg: Any, n: int) -> dict[str, int]:
  """The most any answer can certify: unanimous votes of the M members."""
  m = cfg.train.num_models
  unanimous = certificate(np.array([[m] + [0] * (len(cfg.data.classes) - 1)]), alpha=cfg.certify.alpha, n=n,
                          s=cfg.defense.bag_size)
  return {threat: int(v[0]) for threat, v in unanimous.counts.items()}


def view_size(c: Any, n: int) -> int:
  """The bag size s, fixed once: ``defense.bag_size`` or n // M, recorded in the config."""
  c.defense.bag_size = c.defense.bag_size or max(1, n // c.train.num_models)
  return c.defense.bag_size


BAGGING = counting(name="bagging", key="bagging", member_views=member_views, certify_votes=certify_votes,
                   describe=lambda cfg: {"bag_size": cfg.defense.bag_size, "with_replacement": True,
                                         "alpha": cfg.certify.alpha, "correction": "bonferroni",
                                         "threats": list(COUNTS)},
                   largest_certificate=largest_certificate, view_size=view_size)


def bagging(num_models: int, bag_size: int | None = None) -> Defense:
  """Bagging with ``num_models`` members, each on ``bag_size`` samples drawn with replacement (None: n // M)."""
  return BAGGING._replace(settings={"train.num_models": int(num_models), "defense.bag_size": bag_size})
