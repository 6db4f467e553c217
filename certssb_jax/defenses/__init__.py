"""Defenses: how each member's training view is made, at which noise it trains and votes, how votes become a
certificate, and the config section each reads (``base.Defense``). A defense is a value: ``rab(0.5)``,
``dpa(50)``, ``run_off(finite_aggregation(50, 2))``; ``REGISTRY`` names the ones a config's ``defense.name``
picks. Adding a defense is its module and one line in ``REGISTRY``."""

from typing import Any

from certssb_jax.defenses.base import INSERTIONS_DELETIONS, MODIFICATIONS, CountCertificate, Defense, NoisePlan
from certssb_jax.defenses.bootstrap import BAGGING, bagging
from certssb_jax.defenses.bucket_aggregation import FINITE_AGGREGATION, finite_aggregation
from certssb_jax.defenses.partition import DPA, dpa
from certssb_jax.defenses.run_off_election import run_off
from certssb_jax.defenses.smoothed_partition import DPA_SMOOTHING, dpa_smoothing
from certssb_jax.defenses.smoothing import CERT_SSB, RAB, cert_ssb, rab

# defense.name -> the defense
REGISTRY = {d.key: d for d in (RAB, CERT_SSB, DPA, BAGGING, DPA_SMOOTHING, FINITE_AGGREGATION, run_off(DPA),
                               run_off(FINITE_AGGREGATION))}
NAMES = tuple(REGISTRY)


def get(cfg: Any) -> Defense:
  """The defense a (resolved) config runs."""
  return REGISTRY[cfg.defense.name]


def noise_plan(cfg: Any) -> NoisePlan:
  """Where the (resolved) config's noise levels come from (``Defense.noise``)."""
  return get(cfg).noise(cfg)


def upgrade(j: dict[str, Any]) -> dict[str, Any]:
  """A config (as a dict) written by an earlier version, in today's spelling: RAB and Cert-SSB were the defense
  "smoothing" with ``sigma.mode`` "fixed" or "sample_specific"."""
  sigma = dict(j.get("sigma") or {})
  defense = dict(j.get("defense") or {})
  if "mode" not in sigma and defense.get("name") != "smoothing":
    return j
  mode = sigma.pop("mode", "sample_specific")
  if defense.get("name", "smoothing") == "smoothing":
    defense["name"] = "rab" if mode == "fixed" else "cert_ssb"
  return {**j, "sigma": sigma, "defense": defense}


__all__ = ["BAGGING", "CERT_SSB", "CountCertificate", "DPA", "DPA_SMOOTHING", "Defense", "FINITE_AGGREGATION",
           "INSERTIONS_DELETIONS", "MODIFICATIONS", "NAMES", "NoisePlan", "RAB", "REGISTRY", "bagging", "cert_ssb",
           "dpa", "dpa_smoothing", "finite_aggregation", "get", "noise_plan", "rab", "run_off", "upgrade"]
