"""What makes two runs the same: the fields a resumed run may change, the differences between two JSON configs
(``differences``, what a run folder checks before it reuses its stages) and the training identity of a config
(``training_key``, what lets two runs share trained models)."""

from __future__ import annotations

import json
from typing import Any

from certssb_jax import defenses
from certssb_jax.experiment.config import base_config, to_json

# Fields that change how a run is saved or shown, not what it computes: a resumed run may change them.
RESULT_NEUTRAL = ("train.checkpoint_every_s",)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """``field: old -> new`` for every field where two JSON configs differ in what they compute.

  A field one side lacks (a config written before the field existed) counts as having its default value.
  """
  return _differences(with_defaults(old), with_defaults(new), "")


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    path = f"{prefix}{k}"
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f"{path}.")
    elif a != b and path not in RESULT_NEUTRAL:
      out.append(f"{path}: {a!r} -> {b!r}")
  return out


def with_defaults(j: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
  """A JSON config with every field it lacks (one written before the field existed) set to its default, and the
  values earlier versions wrote for "derive it" in today's spelling."""
  top = defaults is None
  defaults = to_json(base_config()) if defaults is None else defaults
  out = defenses.upgrade(dict(j)) if top else dict(j)
  if top and (out.get("defense") or {}).get("bag_size") == 0:  # 0 meant n // M before the size was recorded
    out["defense"] = {**out["defense"], "bag_size": None}
  for k, v in defaults.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = with_defaults(out[k], v)
  return out


# Sections that decide the trained ensemble and the undefended model (with the seed and the training sigmas).
_TRAINING_SECTIONS = ("data", "attack", "model", "train", "undefended")


def training_key(j: dict[str, Any], *, num_models: bool = True) -> str:
  """A string equal for two resolved configs (as JSON, ``to_json``) exactly when they train the same models: same
  data, attack, model, training and seed, and the same defense's training identity
  (``Defense.training_identity``: RAB's, Cert-SSB's with ``sigma.train = base``, DPA's and its run-off's agree).

  With ``num_models=False`` the ensemble size is left out: model m depends on the seed and m only, so two runs of
  equal key that train in chunks of the same size share their first models (a larger run's first M models are
  the M-model run's)."""
  j = with_defaults(j)
  key = {k: dict(j[k]) for k in _TRAINING_SECTIONS}
  key["train"].pop("checkpoint_every_s", None)
  if not num_models:
    key["train"].pop("num_models")
  key.update(seed=j["seed"], **defenses.REGISTRY[j["defense"]["name"]].training_identity(j))
  return json.dumps(key, sort_keys=True)
