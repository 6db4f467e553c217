"""Defenses: how each member's training view is made, at which noise it trains and votes, and how votes become a
certificate (``base.Defense``). ``get`` is the one place a run's defense is looked up; adding a defense is its
module and one line in ``COUNTING``."""

from typing import Any

from certssb_jax.defenses.bagging import BAGGING
from certssb_jax.defenses.base import INSERTIONS_DELETIONS, MODIFICATIONS, CountCertificate, Defense
from certssb_jax.defenses.dpa import DPA
from certssb_jax.defenses.dpa_smoothing import DPA_SMOOTHING
from certssb_jax.defenses.finite_aggregation import FINITE_AGGREGATION
from certssb_jax.defenses.run_off_election import run_off
from certssb_jax.defenses.smoothing import CERT_SSB, RAB

# defense.name -> a defense that counts poisoned training samples
COUNTING = {"dpa": DPA, "bagging": BAGGING, "dpa_smoothing": DPA_SMOOTHING, "finite_aggregation": FINITE_AGGREGATION,
            "dpa_roe": run_off(DPA, "dpa"), "fa_roe": run_off(FINITE_AGGREGATION, "finite_aggregation")}
# every defense.name; "smoothing" is RAB or Cert-SSB by sigma.mode
NAMES = ("smoothing", *COUNTING)


def get(cfg: Any) -> Defense:
  """The defense a (resolved) config runs."""
  name = cfg.defense.name
  if name == "smoothing":
    return RAB if cfg.sigma.mode == "fixed" else CERT_SSB
  return COUNTING[name]


__all__ = ["BAGGING", "CERT_SSB", "COUNTING", "CountCertificate", "DPA", "DPA_SMOOTHING", "Defense",
           "INSERTIONS_DELETIONS", "MODIFICATIONS", "NAMES", "RAB", "get", "run_off"]
