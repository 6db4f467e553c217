"""The run configuration: every field with its default, variant parsing, validation and resolution.

Experiment files in ``configs/`` start from ``base_config()`` and override fields. A field whose default is
``None`` is derived from others; ``resolve`` fills every such field once, checks the whole config (a bad
config stops with a one-line message before any data is loaded) and returns a frozen copy, which is what the
stages read and what ``config.json`` records. The derivations live here, and those of the defense's own fields
(the sigma search's, a partition's) in its ``Defense.resolve``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
from typing import Any

import ml_collections
from ml_collections import config_dict

from certssb_jax import defenses
from certssb_jax.certify import bounds
from certssb_jax.checks import check as _check, did_you_mean, one_of as _one_of
from certssb_jax.data import sources, triggers
from certssb_jax.models import layers, zoo

# A resolved run config (``resolve``): every field checked and derived, read-only.
Config = ml_collections.FrozenConfigDict

QUERY_ORDERS = ("clean_first", "triggered_first")
POISON_BASES = ("all", "non_target")
SELECTIONS = ("random", "least_confident")
COMPAT = ("none", "reference")
RANDOM_SEED = "random"  # the value of `seed=random`: a fresh seed, recorded in config.json

_int, _float = config_dict.placeholder(int), config_dict.placeholder(float)


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run, with the paper's MNIST protocol as defaults (docs/method.md section 7).

  One line per field, so the listing is long on purpose: it is the documentation of every field.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0  # the one seed every random stream derives from; `seed=random` draws one (keep it secret)

  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin"  # a key of certssb_jax.data.sources.SOURCES: builtin | idx | cifar_pickle | image_folder | tfds
  c.data.name = "mnist"  # the data set (tfds name, default folder of `python -m certssb_jax.data fetch NAME`)
  c.data.classes = (0, 1)  # original class ids; new label = position (paper: digit 1 -> y=1, digit 0 -> y=0)
  c.data.data_dir = ""  # folder of the files; "": the data set's default folder
  c.data.image_size = config_dict.placeholder(int)  # resize side (tfds, image folders); None: keep
  c.data.max_train = config_dict.placeholder(int)  # keep the first n training samples per class order; None: all
  c.data.max_test = config_dict.placeholder(int)  # the same for the test split
  c.data.test_fraction = 0.2  # builtin data: last fraction of each class (file order) is the test split

  c.attack = ml_collections.ConfigDict()
  c.attack.trigger = "onepixel"  # a key of certssb_jax.data.triggers.TRIGGERS (none: relabel only)
  c.attack.poison_rate = 0.02  # poisoned fraction of the training set (see poison_base)
  c.attack.poison_base = "all"  # all: of the whole training set (the paper's) | non_target: of the non-target samples
  c.attack.selection = "random"  # random | least_confident: the images a clean surrogate model is least sure of
  c.attack.delta = 1.0  # l2 norm of the trigger
  c.attack.target_class = 0  # the label the attacker wants (new label ids)
  c.attack.blend_alpha = 0.2  # weight of the fixed random image of the alpha_blend trigger

  c.model = ml_collections.ConfigDict()
  c.model.name = "mnist_cnn"  # a key of certssb_jax.models.zoo.MODELS
  c.model.pretrained = ""  # .npz of saved Flax variables (weights.save_params): every model starts from it, own head
  c.model.conv = "xla"  # xla | patches: how convolutions are computed (the same parameters and models to rounding)

  c.train = ml_collections.ConfigDict()
  c.train.num_models = 1000  # M, the models trained (search models included, see sigma.search_models)
  c.train.epochs = 20
  c.train.batch_size = 128
  c.train.learning_rate = 1e-3  # Adam
  c.train.models_per_chunk = config_dict.placeholder(int)  # models per vmapped program; None: 1 on CPU, <= 256 else
  c.train.checkpoint_every_s = 10.0  # save training at most this often: whole chunks, or a chunk's state mid-training

  c.defense = ml_collections.ConfigDict()
  c.defense.name = "cert_ssb"  # a key of defenses.REGISTRY: cert_ssb | rab | dpa | bagging | finite_aggregation | ...
  c.defense.partition = "sample"  # dpa & kin: sample (image, label: insertions, deletions) | position (modifications)
  c.defense.spread = 1  # finite_aggregation, fa_roe: d, the members each sample feeds (train.num_models = k x d)
  c.defense.bag_size = config_dict.placeholder(int)  # bagging: samples per member (with replacement); None: n // M
  c.defense.member_batch_size = config_dict.placeholder(int)  # counting: a member's batch; None: min(batch, view)

  c.sigma = ml_collections.ConfigDict()
  c.sigma.sigma_0 = 0.25  # base noise level (RAB, Cert-SSB; the augmentation and query noise of dpa_smoothing)
  c.sigma.train = "base"  # cert_ssb: base (every training sigma_j = sigma_0) | search (per sample, the paper's)
  c.sigma.objective = "robust_prediction"  # a key of sigma_search.OBJECTIVES: which class's radius is maximised
  c.sigma.rule = "reparam"  # a key of sigma_search.RULES: reparam | reference (the reference release's rule)
  c.sigma.sigma_lo = config_dict.placeholder(float)  # lower clip of the search; None: sigma_0
  c.sigma.sigma_hi = config_dict.placeholder(float)  # upper clip; None: sigma_0, no search (reference rule: unclipped)
  c.sigma.num_steps = config_dict.placeholder(int)  # T; None: the rule's default (reference: the release's)
  c.sigma.num_draws = config_dict.placeholder(int)  # S, draws per step; None: the rule's default
  c.sigma.lr = config_dict.placeholder(float)  # step size; None: the rule's default
  c.sigma.kappa = 0.02  # probabilities are clipped to [kappa, 1 - kappa] inside Phi^-1
  c.sigma.target_draws = 32  # draws of the smoothed prediction that picks class A (robust_prediction)
  c.sigma.start = config_dict.placeholder(str)  # sigma_hi (search down from the top) | sigma_0; None: sigma_hi
  # for the robust_prediction objective with the reparam rule, else sigma_0 (the paper's and reference's start)
  c.sigma.scorer = "pilot"  # scorer of the test-input search: pilot | ensemble (held-out search models)
  c.sigma.search_models = config_dict.placeholder(int)  # scorer=ensemble: models that score and never vote
  c.sigma.batch_size = 256  # samples per search program
  c.sigma.pilot_epochs = config_dict.placeholder(int)  # epochs of the pilot model; None: train.epochs
  c.sigma.pilot_sigma = config_dict.placeholder(float)  # Gaussian augmentation of the pilot; None: 2 sigma_0

  c.certify = ml_collections.ConfigDict()
  c.certify.alpha = 0.001  # failure probability of each certificate
  c.certify.bound = "clopper_pearson"  # a key of bounds.BOUNDS: clopper_pearson (votes) | hoeffding (soft scores)
  c.certify.correction = "bonferroni"  # bonferroni (alpha / K over classes) | holdout (first M0 voters select)
  c.certify.holdout_models = config_dict.placeholder(int)  # M0 of the holdout correction
  c.certify.batch_size = 512  # test inputs per kernel call
  c.certify.models_per_chunk = config_dict.placeholder(int)  # models per kernel call; None: train's chunk
  c.certify.query_order = "clean_first"  # order of the queries through the one store of the run
  c.certify.compat = "none"  # none | reference: also report the reference release's (unsound) numbers
  c.certify.draws = 1000  # dpa_smoothing: i.i.d. (member, noise) draws per query

  c.undefended = ml_collections.ConfigDict()
  c.undefended.enabled = True  # also train one model on the poisoned data without noise
  c.undefended.epochs = config_dict.placeholder(int)  # None: train.epochs
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
  c.sigma.target_draws = 4
  return c


# ---------------------------------------------------------------------------------------------- variants

# Short names accepted in variants, mapped to config fields.
ALIASES = {
    "trigger": "attack.trigger", "poison_rate": "attack.poison_rate", "poison_base": "attack.poison_base",
    "selection": "attack.selection", "delta": "attack.delta", "target_class": "attack.target_class",
    "sigma_0": "sigma.sigma_0", "defense": "defense.name", "train_sigma": "sigma.train",
    "objective": "sigma.objective", "rule": "sigma.rule", "scorer": "sigma.scorer", "start": "sigma.start",
    "num_models": "train.num_models", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate", "models_per_chunk": "train.models_per_chunk",
    "bound": "certify.bound", "alpha": "certify.alpha", "correction": "certify.correction",
    "query_order": "certify.query_order", "compat": "certify.compat", "seed": "seed", "source": "data.source",
    "data_dir": "data.data_dir", "max_train": "data.max_train", "max_test": "data.max_test",
    "classes": "data.classes", "model": "model.name",
}


# Fields of earlier versions that a command line may still name: what replaced them.
RETIRED = dict.fromkeys(("sigma_mode", "sigma.mode"), "defense.name picks RAB or Cert-SSB: use defense=rab (was "
                        "sigma_mode=fixed) or defense=cert_ssb (was sample_specific)")


def parse_variant(arg: str | None) -> dict[str, str]:
  """Parses ``"k=v,k2=v2"`` (the part after ``:`` in ``--config configs/x.py:...``); ``quick`` needs no value.

  A value may itself hold commas when the next part is not of the form ``key=value`` (``classes=0,1`` is
  ``classes`` = ``0,1``).
  """
  out: dict[str, str] = {}
  key = None
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      key, value = (s.strip() for s in part.split("=", 1))
      out[key] = value
    elif part == "quick":
      out["quick"] = "true"
      key = None
    elif key is not None:  # the continuation of a value with commas
      out[key] += "," + part
    else:
      raise ValueError(f"config variant {part!r} is not of the form key=value (or 'quick')")
  return out


def _known_fields(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in c.items():
    out += _known_fields(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [f"{prefix}{k}"]
  return out


def _section(c: ml_collections.ConfigDict, path: str) -> tuple[ml_collections.ConfigDict | None, str]:
  """(the section that holds the dotted field ``path``, the field's name); None where the config has no such field."""
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
  return (node if isinstance(node, ml_collections.ConfigDict) and leaf in node else None), leaf


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
  """Sets fields from ``key=value`` strings (aliases or dotted paths), converting to the field's type."""
  for key, raw in overrides.items():
    if key in RETIRED:
      raise ValueError(f"config field {key!r} is gone: {RETIRED[key]}")
    path = ALIASES.get(key, key)
    node, leaf = _section(c, path)
    if node is None:
      choices = _known_fields(c) + list(ALIASES)
      raise ValueError(f"unknown config field {key!r}{did_you_mean(key, choices)}")
    node[leaf] = convert(raw, node.get_ref(leaf).get_type(), path)
  return c


def convert(raw: str, kind: type, path: str) -> Any:
  """A variant's string as the field's type (``None``/``none`` clears a derived field)."""
  if path == "seed" and raw == RANDOM_SEED:
    return secrets.randbelow(2**31)
  if raw in ("None", "none") and kind in (int, float):
    return None
  try:
    if kind is bool:
      if raw.lower() in ("1", "true", "yes"):
        return True
      if raw.lower() in ("0", "false", "no"):
        return False
      raise ValueError(raw)
    if kind in (int, float):
      return kind(raw)
    if kind is tuple:
      return tuple(int(v) for v in raw.replace("+", " ").replace("/", " ").replace(",", " ").split())
  except ValueError:
    raise ValueError(f"config field {path}: cannot read {raw!r} as {kind.__name__}") from None
  return raw


# the clone this package sits in (certssb_jax/experiment/config.py -> the folder above certssb_jax/)
_CLONE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:variant]`` as ``--config`` does: imports the file, calls ``get_config(variant)``.

  A relative path that does not exist from the working directory is looked up in the repository's
  ``configs/`` folder too, so ``load_config("configs/quickstart.py")`` works from anywhere.
  """
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    here = os.path.join(_CLONE, path)
    if not os.path.isabs(path) and os.path.exists(here):
      path = here
    else:
      raise ValueError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_certssb_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


# ---------------------------------------------------------------------------------------------- resolution


def resolve(config: ml_collections.ConfigDict) -> Config:
  """Checks the config and fills every derived (``None``) field; returns a frozen copy.

  Raises:
    ValueError: the first problem, in one line naming the field (nothing has been computed yet).
  """
  c = ml_collections.ConfigDict(defenses.upgrade(config.to_dict()), type_safe=False)
  _check(isinstance(c.seed, int) and 0 <= c.seed < 2**31, f"seed must be an int in [0, 2^31) or 'random', got {c.seed!r}")
  _check_data_attack_training(c)
  _one_of(c.defense.name, defenses.REGISTRY, "defense.name")
  defenses.get(c).resolve(c)  # the defense's own fields: checked, filled, or cleared where it does not read them
  _resolve_certify(c, num_voters(c))
  return ml_collections.FrozenConfigDict(c)


def _check_data_attack_training(c: ml_collections.ConfigDict) -> None:
  d, a, t = c.data, c.attack, c.train
  _one_of(d.source, sources.SOURCES, "data.source")
  _check(bool(d.data_dir) or not sources.SOURCES[d.source].requires_data_dir(d.name),
         f"data.source {d.source!r} has no default folder for {d.name!r}: set data.data_dir")
  _check(len(d.classes) >= 2 and len(set(d.classes)) == len(d.classes),
         f"data.classes must list >= 2 distinct class ids, got {tuple(d.classes)}")
  _check(0.0 < d.test_fraction < 1.0, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
  for name in ("image_size", "max_train", "max_test"):
    _check(d[name] is None or d[name] >= 1, f"data.{name} must be >= 1 or None, got {d[name]}")
  _one_of(a.trigger, triggers.TRIGGERS, "attack.trigger")
  _one_of(a.poison_base, POISON_BASES, "attack.poison_base")
  _one_of(a.selection, SELECTIONS, "attack.selection")
  _check(0.0 <= a.poison_rate < 1.0, f"attack.poison_rate must be in [0, 1), got {a.poison_rate}")
  _check(0 < a.blend_alpha <= 1, f"attack.blend_alpha must be in (0, 1], got {a.blend_alpha}")
  _check(a.delta > 0 and math.isfinite(a.delta), f"attack.delta must be > 0, got {a.delta}")
  _check(0 <= a.target_class < len(d.classes),
         f"attack.target_class {a.target_class} is not a label in [0, {len(d.classes)})")
  _one_of(c.model.name, zoo.MODELS, "model.name")
  _one_of(c.model.conv, layers.CONV_FORMULATIONS, "model.conv")
  _check(not c.model.pretrained or os.path.isfile(c.model.pretrained),
         f"model.pretrained {c.model.pretrained!r} is not a file")
  _check(t.num_models >= 1, f"train.num_models must be >= 1, got {t.num_models}")
  _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
  _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
  _check(t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}")
  _check(t.checkpoint_every_s >= 0, f"train.checkpoint_every_s must be >= 0, got {t.checkpoint_every_s}")
  _check(t.models_per_chunk is None or t.models_per_chunk >= 1,
         f"train.models_per_chunk must be >= 1 or None, got {t.models_per_chunk}")
  c.undefended.epochs = c.undefended.epochs or t.epochs


def with_defense(config: ml_collections.ConfigDict, defense: defenses.Defense) -> ml_collections.ConfigDict:
  """``config`` running ``defense``, a value of ``certssb_jax.defenses`` (``dpa(50)``, ``rab(0.5)``): its
  ``defense.name`` and the fields its arguments set; ``resolve`` then checks them as any other."""
  c = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  for path, value in {"defense.name": defense.key, **defense.settings}.items():
    node, leaf = _section(c, path)
    node[leaf] = value
  return c


def resolve_for_data(cfg: Config, n_train: int) -> Config:
  """Fills and checks the fields that depend on the training set's size (a counting defense's bag size and
  member batch), once the data is loaded and before anything is computed; the run records the result.

  Raises:
    ValueError: one line naming the field and a value that works.
  """
  f, t = cfg.defense, cfg.train
  _check(t.batch_size <= n_train, f"train.batch_size {t.batch_size} is more than the {n_train} training samples; use "
                                  f"train.batch_size={n_train} or less")
  if defenses.get(cfg).view_size is None:  # every member sees the whole training set
    return cfg
  c = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
  view = defenses.get(c).view_size(c, n_train)
  c.defense.member_batch_size = f.member_batch_size or min(t.batch_size, view)
  b = c.defense.member_batch_size
  _check(b <= t.epochs * view, f"defense.member_batch_size {b} is more than train.epochs x the members' view "
                               f"({t.epochs} x {view}): a member would take no step; use "
                               f"defense.member_batch_size={min(t.batch_size, view)}")
  return ml_collections.FrozenConfigDict(c)


def _resolve_certify(c: ml_collections.ConfigDict, voters: int) -> None:
  cc, t, s = c.certify, c.train, c.sigma
  _check(0 < cc.alpha < 1, f"certify.alpha must be in (0, 1), got {cc.alpha}")
  _one_of(cc.bound, bounds.BOUNDS, "certify.bound")
  _one_of(cc.correction, bounds.CORRECTIONS, "certify.correction")
  _one_of(cc.query_order, QUERY_ORDERS, "certify.query_order")
  _one_of(cc.compat, COMPAT, "certify.compat")
  if cc.correction == "holdout":
    _check(bounds.BOUNDS[cc.bound].supports_holdout,
           f"certify.correction 'holdout' does not work with certify.bound {cc.bound!r} (it bounds soft scores "
           "of every model); use 'bonferroni'")
    cc.holdout_models = cc.holdout_models or max(1, voters // 10)
    _check(0 < cc.holdout_models < voters,
           f"certify.holdout_models must be in (0, {voters}) (the voting models), got {cc.holdout_models}")
  else:
    cc.holdout_models = 0
  _check(voters >= 1, f"no model is left to vote: train.num_models {t.num_models}, search models {s.search_models}")
  cc.models_per_chunk = cc.models_per_chunk or t.models_per_chunk
  _check(cc.batch_size >= 1, f"certify.batch_size must be >= 1, got {cc.batch_size}")


def num_voters(c: ml_collections.FrozenConfigDict) -> int:
  """The models whose votes give the certificate: all but the search models (ids 0 .. search_models - 1)."""
  return c.train.num_models - (c.sigma.search_models or 0)


def voting(c: ml_collections.FrozenConfigDict) -> slice:
  """The voting models' rows of every per-model array (M, ...): the search models come first and never vote."""
  return slice(c.train.num_models - num_voters(c), c.train.num_models)


def to_json(c: Any) -> dict[str, Any]:
  """The config as it reads back from ``config.json`` (tuples become lists)."""
  return json.loads(json.dumps(c.to_dict() if hasattr(c, "to_dict") else c, default=list))
