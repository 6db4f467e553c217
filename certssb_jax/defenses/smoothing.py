"""RAB and Cert-SSB as plug-ins: randomized smoothing of the training and the test inputs.

Every member trains on the whole training set with its own fixed Gaussian noise (sigma_j per sample) and votes
on noised copies of each query at sigma_x; the votes bound an l2 radius. RAB holds every sigma at sigma_0;
Cert-SSB may search sigma_x per input (``sigma_search``) and answers through the store. The stages that do this
are the run's (``run.pipeline``): they need the pilot, the search and the store, which sit on floors of their own.
"""

from __future__ import annotations

from typing import Any

from certssb_jax.defenses.base import Defense


def _describe(cfg: Any) -> dict[str, Any]:
  s = cfg.sigma
  return {"sigma_mode": s.mode, "sigma_0": s.sigma_0, "sigma_lo": s.sigma_lo, "sigma_hi": s.sigma_hi,
          "sigma_train": s.train}


RAB = Defense(name="RAB", family="smoothing", member_views=None, certify_votes=None, describe=_describe)
CERT_SSB = Defense(name="Cert-SSB", family="smoothing", member_views=None, certify_votes=None, describe=_describe,
                   diagnostics=("sigma_search", "sigma_histogram", "side_channel_probe"))
