"""RAB and Cert-SSB: randomized smoothing of the training and the test inputs.

Every member trains on the whole training set with its own fixed Gaussian noise (sigma_j per sample) and votes
on noised copies of each query at sigma_x; the votes bound an l2 radius (``certify.bounds``), and answers go
through the store. RAB holds every sigma at sigma_0. Cert-SSB may search sigma_x per test input in
[sigma.sigma_lo, sigma.sigma_hi] (``sigma_search``) and, with ``sigma.train = search``, sigma_j per training
sample, as the paper does; at its default range [sigma_0, sigma_0] it answers at sigma_0 like RAB. The stages
that train the pilot, search and store are the run's (``experiment.pipeline``); they ask ``Defense.noise`` what to do.
"""

from __future__ import annotations

import math
from typing import Any

from certssb_jax import checks
from certssb_jax.defenses import sigma_search
from certssb_jax.defenses.base import Defense, NoisePlan, resolve_fixed_noise

TRAIN_SIGMAS = ("base", "search")  # Cert-SSB's training sigmas: sigma_0 for all | searched per sample (the paper)
SCORERS = ("pilot", "ensemble")  # what scores a test input's search: the pilot | held-out search models
STARTS = ("sigma_hi", "sigma_0")  # where the search starts


def search_config_of(s: Any) -> sigma_search.SearchConfig:
  """The sigma search's settings from a (resolved) ``sigma`` section."""
  return sigma_search.SearchConfig(sigma_0=s.sigma_0, sigma_lo=s.sigma_lo, sigma_hi=s.sigma_hi or 2 * s.sigma_0,
                                   num_steps=s.num_steps, num_draws=s.num_draws, lr=s.lr, kappa=s.kappa,
                                   rule=s.rule, target_draws=s.target_draws, start_at_hi=s.start == "sigma_hi")


def _resolve_smoothing_section(c: Any) -> None:
  f = c.defense
  f.partition, f.bag_size, f.member_batch_size = "sample", None, None  # counting fields: not used, not recorded


def _resolve_rab(c: Any) -> None:
  """RAB searches nothing: its config records no search settings (and so does not differ from another RAB run's
  by settings it never used)."""
  _resolve_smoothing_section(c)
  resolve_fixed_noise(c)


def _resolve_cert_ssb(c: Any) -> None:
  """Checks and derives the whole ``sigma`` section."""
  _resolve_smoothing_section(c)
  s, t = c.sigma, c.train
  checks.one_of(s.train, TRAIN_SIGMAS, "sigma.train")
  checks.one_of(s.objective, sigma_search.OBJECTIVES, "sigma.objective")
  checks.one_of(s.rule, sigma_search.RULES, "sigma.rule")
  checks.one_of(s.scorer, SCORERS, "sigma.scorer")
  s.start = s.start or ("sigma_hi" if s.objective == "robust_prediction" and s.rule == "reparam" else "sigma_0")
  checks.one_of(s.start, STARTS, "sigma.start")
  checks.check(s.sigma_0 > 0 and math.isfinite(s.sigma_0), f"sigma.sigma_0 must be > 0, got {s.sigma_0}")
  rule = sigma_search.RULES[s.rule]
  s.num_steps = rule.num_steps(c.attack.trigger) if s.num_steps is None else s.num_steps
  s.num_draws = s.num_draws or rule.num_draws
  s.lr = s.lr or rule.lr
  s.sigma_lo = s.sigma_lo or s.sigma_0
  if s.sigma_hi is None:
    # sigma_0: measured on full-size data, every test-noise level above sigma_0 that a search chose cost accuracy
    # on some class pair (and gave the attacker more) or, with a few dozen models, certified accuracy through
    # abstentions (README, docs/soundness.md); searching is a choice the user makes with sigma.sigma_hi.
    s.sigma_hi = s.sigma_0
    if rule.unbounded_above:  # twice what the rule can reach: the reference does not clip
      s.sigma_hi = s.sigma_0 + 2 * sigma_search.largest_increment(search_config_of(s))
  s.pilot_epochs = s.pilot_epochs or t.epochs
  # The pilot trains at twice the base level, above the search's top: a small trigger it would otherwise learn
  # is drowned, so the pilot cannot steer the search by it (docs/soundness.md).
  s.pilot_sigma = s.pilot_sigma or 2 * s.sigma_0
  checks.check(s.pilot_sigma > 0, f"sigma.pilot_sigma must be > 0, got {s.pilot_sigma}")
  checks.check(s.batch_size >= 1, f"sigma.batch_size must be >= 1, got {s.batch_size}")
  search_config_of(s).validate()
  s.search_models = (s.search_models if s.search_models is not None else
                     (max(1, t.num_models // 20) if s.scorer == "ensemble" else 0))
  if s.scorer == "ensemble":
    checks.check(s.search_models >= 1, "sigma.scorer 'ensemble' needs sigma.search_models >= 1: a sigma_x chosen "
                                       "by the models that then vote breaks the bound's coverage")
  else:
    checks.check(s.search_models == 0, "sigma.search_models is for sigma.scorer 'ensemble' (the pilot never votes)")


def _cert_ssb_noise(cfg: Any) -> NoisePlan:
  s = cfg.sigma
  search = s.sigma_hi > s.sigma_lo  # a range of one point is sigma_0 everywhere
  return NoisePlan(search_train=search and s.train == "search", search_test=search,
                   pilot=search and (s.scorer == "pilot" or s.train == "search"))


def _training_identity(j: dict[str, Any]) -> dict[str, Any]:
  """Every training sigma is sigma_0 (RAB, or Cert-SSB with ``sigma.train = base``): the models are RAB's, whichever
  of the two runs; searched training sigmas make models of their own."""
  s = j["sigma"]
  return {"sigma_0": s["sigma_0"], "sigma": None if s["train"] in (None, "base") else s}


def _describe(cfg: Any) -> dict[str, Any]:
  s = cfg.sigma
  return {"sigma_0": s.sigma_0, "sigma_lo": s.sigma_lo, "sigma_hi": s.sigma_hi, "sigma_train": s.train}


RAB = Defense(name="RAB", key="rab", family="smoothing", member_views=None, certify_votes=None, describe=_describe,
              resolve=_resolve_rab, training_identity=_training_identity)
CERT_SSB = Defense(name="Cert-SSB", key="cert_ssb", family="smoothing", member_views=None, certify_votes=None,
                   describe=_describe, diagnostics=("sigma_search", "sigma_histogram", "side_channel_probe"),
                   resolve=_resolve_cert_ssb, noise=_cert_ssb_noise, training_identity=_training_identity)


def rab(sigma: float = 0.25) -> Defense:
  """RAB: every member trains and votes at noise level ``sigma``."""
  return RAB._replace(settings={"sigma.sigma_0": float(sigma)})


def cert_ssb(sigma: float = 0.25, *, sigma_hi: float | None = None, train: str = "base",
             scorer: str = "pilot") -> Defense:
  """Cert-SSB at base level ``sigma``: each test input's sigma_x searched in [sigma, sigma_hi] (None: sigma, no
  search), training sigmas ``train`` ("base": sigma for all; "search": per sample), the test search scored by
  ``scorer`` ("pilot" or "ensemble", held-out members that never vote)."""
  return CERT_SSB._replace(settings={"sigma.sigma_0": float(sigma), "sigma.sigma_hi": sigma_hi,
                                     "sigma.train": train, "sigma.scorer": scorer})
