"""Bagging (Jia, Cao, Gong, AAAI 2021): M members, member m trained without noise on s training samples drawn
with replacement (the draw keyed by the seed and m). If r of the n training samples are modified, a bag avoids
all of them with probability (1 - r / n)^s, so each class's vote probability moves by at most
delta(r) = 1 - (1 - r / n)^s. With Clopper-Pearson bounds pA_low and pB_high on the top class's and the
strongest other class's vote probabilities (Bonferroni, alpha / K each), the vote is certified against r
modifications when

    pA_low - delta(r) > pB_high + delta(r),

and the certificate is the largest such r (-1 when not even r = 0 holds, pA_low <= pB_high). This is the sound
condition of the paper's Theorem 1 without its tightening over the discrete vote probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from certssb_jax import rng
from certssb_jax.certify import bounds
from certssb_jax.defenses.base import CountCertificate, Defense, MemberViews, top_two


def bag_size(cfg: Any, n: int) -> int:
  """s: ``defense.bag_size``, or n // M when it is 0 (each member sees as many samples as a DPA part)."""
  return int(cfg.defense.bag_size) or max(1, n // cfg.train.num_models)


def bags(seed: int, n: int, s: int) -> MemberViews:
  """Member m's bag: s indices in [0, n) drawn uniformly with replacement from the key (seed, BAG, m)."""
  draw = jax.jit(jax.vmap(lambda m: jax.random.randint(rng.member_key(seed, rng.BAG, m), (s,), 0, n)))

  def views(model_ids: np.ndarray) -> np.ndarray:
    return np.asarray(draw(np.asarray(model_ids)))

  return views


def member_views(cfg: Any, x: np.ndarray, y: np.ndarray) -> MemberViews:
  del x
  return bags(cfg.seed, len(y), bag_size(cfg, len(y)))


def certified_modifications(gap: np.ndarray, n: int, s: int) -> np.ndarray:
  """The largest integer r in [0, n] with gap > 2 (1 - (1 - r / n)^s), -1 where gap <= 0 (gap = pA_low -
  pB_high). The boundary r* = n (1 - (1 - gap / 2)^(1/s)) is computed in float64 and the integer below it is
  checked exactly against the condition (rounding never certifies an r the condition rejects)."""
  gap = np.asarray(gap, np.float64)
  out = np.full(gap.shape, -1, np.int64)
  for i in np.flatnonzero(gap > 0):
    holds = lambda r, g=gap[i]: g > 2.0 * (1.0 - (1.0 - r / n) ** s)
    r = min(n, max(0, math.ceil(n * (1.0 - (1.0 - min(gap[i], 2.0) / 2.0) ** (1.0 / s))) - 1))
    while r > 0 and not holds(r):
      r -= 1
    while r < n and holds(r + 1):
      r += 1
    out[i] = r if holds(r) else -1
  return out


def certificate(votes: np.ndarray, *, alpha: float, n: int, s: int) -> CountCertificate:
  """The bagging certificate of each row of votes (N, K) of M members trained on bags of s of n samples."""
  votes = np.asarray(votes, np.int64)
  m, k = int(votes[0].sum()) if len(votes) else 1, votes.shape[1]
  c, n_c, _, n_runner = top_two(votes)
  a = alpha / k  # Bonferroni over the classes, as the smoothing bounds
  p_low = bounds.clopper_pearson_lower(n_c, m, a)
  p_high = bounds.clopper_pearson_upper(n_runner, m, a)
  r = certified_modifications(p_low - p_high, n, s)
  return CountCertificate(pred=c, votes_top=n_c, votes_runner=n_runner, certified=r,
                          certified_insertions=np.where(r >= 0, 2 * r, -1))


def certify_votes(cfg: Any, votes: np.ndarray, n_train: int) -> CountCertificate:
  return certificate(votes, alpha=cfg.certify.alpha, n=n_train, s=bag_size(cfg, n_train))


BAGGING = Defense(name="bagging", family="counting", member_views=member_views, certify_votes=certify_votes,
                  describe=lambda cfg: {"bag_size": int(cfg.defense.bag_size) or "n // M", "with_replacement": True,
                                        "alpha": cfg.certify.alpha, "correction": "bonferroni"})
