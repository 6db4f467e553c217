"""Partitions that vote on noised queries: a certificate for the whole backdoor, k poisoned training samples and a
trigger of l2 norm t on the test input together.

k members, member i trained (with Gaussian augmentation at sigma, so that it answers noised inputs well) on part i
of DPA's partition (``dpa``: by sample, insertions and deletions; by position, modifications), vote on noised
queries. Let G_c(x) = (1 / k) sum_i P_e(f_i(x + e) = c), e ~ N(0, sigma^2 I). G_c is the Gaussian convolution of a
[0, 1]-valued function, so sigma Phi^-1(G_c) is 1-Lipschitz in x (Salman et al. 2019) for this ensemble and any
other. A change of the training set that changes R members (R = r insertions or deletions by sample, r
modifications by position, 2r modifications by sample) moves each G_c by at most R / k. So with simultaneous
bounds p_low <= G_c(x) and p_high >= G_c'(x) for every rival c', the class c of the smoothed ensemble cannot change
under those R members and any test perturbation of norm below t when

    Phi^-1(p_low - R / k) - Phi^-1(p_high + R / k) > 2 t / sigma,

that is, the largest t certified with R changed members is ``radius(R) = sigma / 2 (Phi^-1(p_low - R / k) -
Phi^-1(p_high + R / k))`` (not certified at all where p_low - R / k <= p_high + R / k). The bounds are
Clopper-Pearson at alpha / K on the counts of ``certify.draws`` i.i.d. draws of (a uniform member, a fresh noise)
per query (``certify.draws``), which are binomial with parameter G_c(x): the certificate holds with probability
>= 1 - alpha over those draws, for any trained ensemble. At t = 0 it certifies at most what DPA's exact count
does from the members' clean votes of the same k parts (and less, for its statistical bounds and the noise).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from certssb_jax.certify import bounds, draws
from certssb_jax.defenses import partition
from certssb_jax.defenses.base import INSERTIONS_DELETIONS, MODIFICATIONS, CountCertificate, Defense, counting, top_two

TIE_MARGIN = 1e-12  # p_low - R / k must exceed p_high + R / k by more than float64 rounding


def members_per_change(partition: str) -> dict[str, int]:
  """Members one changed training sample can change, per threat the partition certifies."""
  return {"sample": {INSERTIONS_DELETIONS: 1, MODIFICATIONS: 2}, "position": {MODIFICATIONS: 1}}[partition]


def radius(p_low: np.ndarray, p_high: np.ndarray, changed: np.ndarray | int, k: int, sigma: float) -> np.ndarray:
  """The largest certified test-trigger norm t with ``changed`` members changed: sigma / 2 (Phi^-1(p_low - R / k) -
  Phi^-1(p_high + R / k)), -inf where nothing is certified (p_low - R / k <= p_high + R / k, with a margin of
  1e-12 so that rounding never certifies a tie). Float64, broadcasting."""
  shift = np.asarray(changed, np.float64) / k
  lo, hi = np.asarray(p_low, np.float64) - shift, np.asarray(p_high, np.float64) + shift
  with np.errstate(divide="ignore", invalid="ignore"):
    t = sigma / 2.0 * (special.ndtri(np.clip(lo, 0.0, 1.0)) - special.ndtri(np.clip(hi, 0.0, 1.0)))
  return np.where(lo > hi + TIE_MARGIN, t, -np.inf)


def largest_changes(p_low: np.ndarray, p_high: np.ndarray, k: int, sigma: float, trigger_norm: float,
                    per_change: int = 1) -> np.ndarray:
  """(N,) the largest number r of changed training samples (each changing ``per_change`` members) certified
  together with a test trigger of norm ``trigger_norm`` (radius(r * per_change) > t); -1 where not even r = 0."""
  p_low, p_high = np.asarray(p_low, np.float64), np.asarray(p_high, np.float64)
  r = np.arange(k // per_change + 1)  # R = r * per_change <= k members
  ok = radius(p_low[:, None], p_high[:, None], r[None, :] * per_change, k, sigma) > trigger_norm  # (N, r)
  # radius falls with r, so the certified r are a prefix: count them
  return ok.sum(axis=1).astype(np.int64) - 1


def bounds_of(votes: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(class c, its count, p_low of G_c, p_high of the strongest rival) from draw counts (N, K): Clopper-Pearson at
  alpha / K each, so the K bounds hold together (the class is picked from the same counts)."""
  votes = np.asarray(votes, np.int64)
  n, k = int(votes[0].sum()) if len(votes) else 1, votes.shape[1]
  c, n_c, _, n_runner = top_two(votes)
  a = alpha / k
  return c, n_c, bounds.clopper_pearson_lower(n_c, n, a), bounds.clopper_pearson_upper(n_runner, n, a)


def certificate(votes: np.ndarray, *, alpha: float, k: int, sigma: float, trigger_norm: float,
                partition: str = "sample") -> CountCertificate:
  """Counts certified together with a test trigger of norm ``trigger_norm``, per threat (module docstring)."""
  c, n_c, p_low, p_high = bounds_of(votes, alpha)
  n_runner = top_two(votes)[3]

  def at_norm(t: float) -> dict[str, np.ndarray]:
    return {threat: largest_changes(p_low, p_high, k, sigma, t, per)
            for threat, per in members_per_change(partition).items()}

  return CountCertificate(pred=c, votes_top=n_c, votes_runner=n_runner, counts=at_norm(trigger_norm), exact=False,
                          bounds=(p_low, p_high), trigger_norm=trigger_norm, at_norm=at_norm)


def member_views(cfg: Any, x: np.ndarray, y: np.ndarray):
  return partition.member_views(cfg, x, y)


def query_votes(cfg: Any, members: Any, x: np.ndarray, progress: Any) -> np.ndarray:
  """Draw counts (N, K) on the queries x: ``certify.draws`` i.i.d. (member, noise) draws each."""
  with progress(f"draws ({cfg.certify.draws} per query, {len(x)} queries)", cfg.train.num_models, "member") as update:
    return draws.draw_votes(members.model, members.chunks(), x, cfg.sigma.sigma_0, seed=cfg.seed,
                            num_members=cfg.train.num_models, num_draws=cfg.certify.draws,
                            num_classes=len(cfg.data.classes), batch_size=cfg.certify.batch_size, on_member=update)


def certify_votes(cfg: Any, votes: np.ndarray, n_train: int, preds: np.ndarray | None) -> CountCertificate:
  del n_train, preds
  return certificate(votes, alpha=cfg.certify.alpha, k=cfg.train.num_models, sigma=cfg.sigma.sigma_0,
                     trigger_norm=cfg.attack.delta, partition=cfg.defense.partition)


def largest_certificate(cfg: Any, n: int) -> dict[str, int]:
  """What unanimous draws certify at the attack's trigger norm."""
  del n
  m, k = cfg.certify.draws, len(cfg.data.classes)
  unanimous = certificate(np.array([[m] + [0] * (k - 1)]), alpha=cfg.certify.alpha, k=cfg.train.num_models,
                          sigma=cfg.sigma.sigma_0, trigger_norm=cfg.attack.delta, partition=cfg.defense.partition)
  return {threat: int(v[0]) for threat, v in unanimous.counts.items()}


def _describe(cfg: Any) -> dict[str, Any]:
  return {**partition.describe(cfg), "sigma": cfg.sigma.sigma_0, "draws": cfg.certify.draws, "alpha": cfg.certify.alpha,
          "trigger_norm": cfg.attack.delta}


DPA_SMOOTHING = counting(name="DPA+smoothing", key="dpa_smoothing", member_views=member_views,
                         certify_votes=certify_votes, describe=_describe, largest_certificate=largest_certificate,
                         view_size=partition.view_size, train_sigma=lambda cfg: cfg.sigma.sigma_0,
                         query_votes=query_votes)


def dpa_smoothing(k: int, sigma: float, draws: int = 1000, partition: str = "sample") -> Defense:
  """DPA's k parts trained with Gaussian augmentation at ``sigma``, each query answered by ``draws`` noised
  (member, noise) draws at ``sigma``."""
  return DPA_SMOOTHING._replace(settings={"train.num_models": int(k), "sigma.sigma_0": float(sigma),
                                          "certify.draws": int(draws), "defense.partition": partition})
