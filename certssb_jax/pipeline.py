"""The whole experiment as stages: data, poisoning, undefended baseline, sigmas, ensemble, certification, report.

``run(config, workdir)`` is what ``python -m certssb_jax.launch`` calls; each stage is also a public function a
notebook can call on its own. Finished stages are saved atomically in the workdir and reused when the run is
started again with the same config (``config.json`` must match; see ``prepare_workdir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import time
from typing import Any, Callable, ContextManager, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from certssb_jax import backend
from certssb_jax import bounds
from certssb_jax import certify as certify_lib
from certssb_jax import config as config_lib
from certssb_jax import data as data_lib
from certssb_jax import ensemble
from certssb_jax import models as models_lib
from certssb_jax import report
from certssb_jax import rng
from certssb_jax import sigma_search
from certssb_jax import store as store_lib
from certssb_jax import triggers
from certssb_jax import workdir as wd

logger = logging.getLogger(__name__)

# progress(description, total, unit) -> context manager yielding update(n)
Progress = Callable[[str, int, str], ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(desc: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
  del desc, total, unit
  yield lambda n: None


@contextlib.contextmanager
def tqdm_progress(desc: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
  """A tqdm bar with rate and ETA on stderr (the CLI's progress)."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True) as bar:
    yield bar.update


class ConfigMismatchError(ValueError):
  """The workdir holds a run with a different config."""


@dataclasses.dataclass
class Experiment:
  """Everything a run computed, in memory (the same arrays the workdir files hold)."""

  config: ml_collections.ConfigDict
  data: data_lib.Dataset
  x_train: np.ndarray  # (n, H, W, C) poisoned training inputs
  y_train: np.ndarray  # (n,) poisoned training labels
  poison_indices: np.ndarray  # (n_poisoned,)
  poison_norms: np.ndarray  # (n_poisoned,) effective trigger norms
  splits: dict[str, dict[str, np.ndarray]]  # split -> {x, y, index}
  model: Any = None
  sigma_train: np.ndarray | None = None  # (n,)
  sigma_test: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # split -> (N,)
  chunk_states: dict[int, Any] = dataclasses.field(default_factory=dict)  # trained chunks kept in memory


# ---------------------------------------------------------------------------------------------- workdir


# Config fields that change how a run is saved, not what it computes: a resumed run may change them.
RESULT_NEUTRAL = ("train.checkpoint_every_s:",)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False) -> None:
  """Creates the workdir or checks that the run it holds has the same config.

  Raises:
    ConfigMismatchError: the workdir's ``config.json`` differs (names the fields); pass ``fresh=True`` to
      delete the old stages and start over.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  new = config.to_dict()
  if os.path.exists(path):
    old = wd.load_json(path)
    diff = [d for d in _diff(old, jsonable(new)) if not d.startswith(RESULT_NEUTRAL)]
    if diff and not fresh:
      raise ConfigMismatchError(
          f"workdir {workdir} holds a run with a different config ({'; '.join(diff[:8])}); use another "
          "--workdir, or --fresh to discard its results and start over")
    if diff and fresh:
      import shutil  # pylint: disable=g-import-not-at-top

      for name in ("stages", "ensemble"):
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  wd.save_json(path, new)


def jsonable(obj: Any) -> Any:
  """The value as it reads back from JSON (tuples become lists)."""
  import json  # pylint: disable=g-import-not-at-top

  return json.loads(json.dumps(obj, default=wd._json_default))  # pylint: disable=protected-access


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _stage_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, "stages", f"{name}.npz")


def _cached(workdir: str, name: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  path = _stage_path(workdir, name)
  if _agree(os.path.exists(path)):
    logger.info("reusing stage %s from %s", name, path)
    return wd.load_npz(path)
  out = _broadcast_exact(compute())
  if _is_primary():
    wd.save_npz(path, **out)
  return out


# ---------------------------------------------------------------------------------------------- multi-host
# With several JAX processes (launch --distributed) every process runs ``run``; the workdir must be on a
# filesystem they all see. Process 0 alone writes it and decides what is reused (the others follow its
# decision, so a file appearing mid-run cannot make them diverge); results computed by every process are
# replaced by process 0's bits. With one process these helpers do nothing.


def _is_primary() -> bool:
  return jax.process_index() == 0


def _agree(flag: bool) -> bool:
  """Process 0's answer, on every process."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def _broadcast_exact(tree: Any) -> Any:
  """Process 0's arrays on every process, bit for bit (sent as bytes, so float64 survives x32 mode). Nothing
  is sent when every process already holds the same bits (results of collective stages): digests are compared
  first."""
  if jax.process_count() == 1:
    return tree
  import hashlib  # pylint: disable=g-import-not-at-top

  digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in jax.tree.leaves(tree))).digest()
  digests = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest[:16], np.int32)))  # (P, 4)
  if (digests == digests[0]).all():
    return tree

  def send(a):
    a = np.asarray(a)
    raw = np.ascontiguousarray(a).view(np.uint8).astype(np.int32)  # int32: psum of one nonzero term is exact
    return np.asarray(multihost_utils.broadcast_one_to_all(raw)).astype(np.uint8).view(a.dtype).reshape(a.shape)

  return jax.tree.map(send, tree)


def clean_partial_writes(workdir: str) -> list[str]:
  """Removes what a killed run left half-written (Orbax ``*.orbax-checkpoint-tmp*`` folders, ``.tmp_*`` files of
  atomic writes): never reused, they would only accumulate. Returns the removed paths (process 0 only)."""
  import shutil  # pylint: disable=g-import-not-at-top

  removed = []
  if not _is_primary():
    return removed
  for folder in (workdir, os.path.join(workdir, "stages"), os.path.join(workdir, "ensemble")):
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      path = os.path.join(folder, name)
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
      elif name.startswith(".tmp_") and os.path.isfile(path):
        os.remove(path)
        removed.append(path)
  for path in removed:
    logger.info("removed %s, left half-written by an interrupted run", path)
  return removed


# ---------------------------------------------------------------------------------------------- stages


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """Loads and validates the configured data set (raises DataError naming the problem)."""
  d = config.data
  return data_lib.load_dataset(
      d.source, name=d.name, classes=tuple(d.classes), data_dir=d.data_dir or None,
      image_size=d.image_size or None, max_train=d.max_train or None, max_test=d.max_test or None,
      test_fraction=d.test_fraction)


def poison(config: ml_collections.ConfigDict, ds: data_lib.Dataset) -> Experiment:
  """Poisons the training set (deterministic indices) and builds the clean and triggered test splits.

  The triggered split holds the test inputs of every non-target class with the trigger added and their TRUE
  labels (METHOD.md section 7: ERA counts them correct when the true label is kept, ASR when the target is
  predicted).
  """
  a = config.attack
  idx = triggers.choose_poison_indices(ds.y_train, a.poison_rate, a.target_class, config.seed)
  x_train, y_train, norms = triggers.poison_training_set(ds.x_train, ds.y_train, idx, a.trigger, a.delta,
                                                         a.target_class, a.blend_alpha)
  keep = np.flatnonzero(ds.y_test != a.target_class)
  x_trig, trig_norms = triggers.apply_trigger(ds.x_test[keep], a.trigger, a.delta, a.blend_alpha)
  splits = {
      "clean": {"x": ds.x_test, "y": ds.y_test, "index": np.arange(len(ds.y_test))},
      "triggered": {"x": x_trig, "y": ds.y_test[keep], "index": keep, "trigger_norm": trig_norms},
  }
  return Experiment(config, ds, x_train, y_train, idx, norms, splits,
                    model=models_lib.get_model(config.model.name, ds.num_classes))


def _trainer(exp: Experiment, *, chunk: int, mesh=None) -> ensemble.EnsembleTrainer:
  """The trainer of a group of models. Trainers, and so their compiled programs, are shared by the undefended,
  pilot and ensemble models when they agree on everything but the epochs (which every caller passes to
  ``train_chunk``)."""
  t = exp.config.train
  cfg = ensemble.TrainConfig(epochs=t.epochs, batch_size=t.batch_size, learning_rate=t.learning_rate,
                             models_per_chunk=chunk)
  return _trainer_of(exp.model, tuple(exp.data.input_shape), cfg, mesh or ensemble.default_mesh(),
                     exp.config.model.pretrained)


@functools.lru_cache(maxsize=16)
def _trainer_of(model, input_shape, cfg: ensemble.TrainConfig, mesh, pretrained: str) -> ensemble.EnsembleTrainer:
  weights = models_lib.read_params(pretrained) if pretrained else None
  return ensemble.EnsembleTrainer(model, input_shape, cfg, mesh=mesh, pretrained=weights)


def train_single(exp: Experiment, trainer: ensemble.EnsembleTrainer, *, tag: int, epochs: int,
                 sigma: float | None, progress: Progress, desc: str) -> ensemble.MemberState:
  """Trains one auxiliary model on the poisoned training set (pilot: Gaussian augmentation at ``sigma``
  re-drawn every epoch; undefended: ``sigma=None``). Returns its state with a leading axis of 1."""
  n = len(exp.y_train)
  steps = epochs * (n // exp.config.train.batch_size)
  with progress(desc, steps, "step") as update:
    return trainer.train_chunk(
        np.zeros(1, np.int64), ensemble.Streams.auxiliary(exp.config.seed, tag), exp.x_train, exp.y_train,
        None if sigma is None else np.full(n, sigma, np.float32), fresh_noise=True, epochs=epochs,
        on_step=update)


def evaluate_single(exp: Experiment, state: ensemble.MemberState) -> dict[str, float]:
  """Clean accuracy, ERA and ASR of one (undefended) model on the clean and triggered test splits."""
  out = {}
  for split in ("clean", "triggered"):
    s = exp.splits[split]
    pred = np.asarray(models_lib.logits_to_pred(jnp.asarray(ensemble.predict_logits(exp.model, state, s["x"])[0])))
    out[split] = pred
  clean_acc = float(np.mean(out["clean"] == exp.splits["clean"]["y"]))
  trig = out["triggered"]
  return {"clean_accuracy": clean_acc, "era": float(np.mean(trig == exp.splits["triggered"]["y"])),
          "asr": float(np.mean(trig == exp.config.attack.target_class))}


@functools.lru_cache(maxsize=None)
def _score_fn(model):
  def score(state, xb):
    params, batch_stats = state
    return models_lib.logits_to_probs(ensemble.member_logits(model, params, batch_stats, xb))

  return score


@functools.lru_cache(maxsize=None)
def _ensemble_score_fn(model, mesh, num_models):
  """The mean probabilities of the whole ensemble, sharded over the mesh (one object per run: one compile)."""
  return ensemble.EnsembleScorer(model, mesh, num_models)


SPLIT_IDS = {"train": 0, "clean": 1, "triggered": 2}


def search_sigmas(exp: Experiment, scorer_state: tuple[Any, Any], score_fn, split: str, x: np.ndarray,
                  target: np.ndarray, progress: Progress) -> np.ndarray:
  """Sample-specific sigma of every input of a split (METHOD.md section 4), one compiled program per batch."""
  key = jax.random.fold_in(rng.stream(exp.config.seed, rng.SIGMA_SEARCH), SPLIT_IDS[split])
  with progress(f"sigma search ({split})", len(x), "sample") as update:
    done = [0]

    def on_batch(num_done):
      update(num_done - done[0])
      done[0] = num_done

    return sigma_search.search_sigma_batched(
        score_fn, scorer_state, x, np.asarray(target, np.int32), np.arange(len(x), dtype=np.int32), key,
        config_lib.search_config(exp.config), exp.config.sigma.batch_size, progress=on_batch)


@functools.lru_cache(maxsize=None)
def _jitted(fn):
  return backend.jit(fn)


def _predict_with(score_fn, state, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
  f = _jitted(score_fn)
  return np.concatenate([np.asarray(jnp.argmax(f(state, jnp.asarray(x[i:i + batch_size])), -1))
                         for i in range(0, len(x), batch_size)]).astype(np.int32)


ENSEMBLE_CHECKPOINT = re.compile(r"^chunks_(\d{5})-(\d{5})$")  # chunks first..last (inclusive) of the ensemble


def ensemble_checkpoint_dir(workdir: str, first: int, last: int) -> str:
  """The Orbax checkpoint of the trained chunks ``first..last`` (inclusive), stacked along the model axis."""
  return os.path.join(os.path.abspath(workdir), "ensemble", f"chunks_{first:05d}-{last:05d}")


def saved_checkpoints(workdir: str) -> list[tuple[int, int]]:
  """(first, last) chunk of every complete ensemble checkpoint in the workdir (Orbax writes a checkpoint under a
  temporary name and renames it when complete, so a listed one is whole)."""
  folder = os.path.join(workdir, "ensemble")
  names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  return [(int(m.group(1)), int(m.group(2))) for m in map(ENSEMBLE_CHECKPOINT.match, names) if m]


def trained_part(state: ensemble.MemberState) -> ensemble.MemberState:
  """What a trained model is kept and saved with: params and batch statistics (the optimiser state is only
  needed while a chunk trains, and chunks are never resumed mid-training)."""
  return ensemble.MemberState(state.params, state.batch_stats, None)


def train_ensemble(exp: Experiment, workdir: str, progress: Progress) -> ensemble.EnsembleTrainer:
  """Trains the M smoothed models chunk by chunk and saves them as Orbax checkpoints (resumable).

  Trained chunks are saved together once ``train.checkpoint_every_s`` seconds have passed since the last save
  (0: every chunk) and at the end, so many small chunks (one model per chunk on CPU) do not each pay Orbax's
  fixed cost (~20 ms of CPU per save, ~85 ms of training time per one-model chunk on 2 cores); an interrupted
  run loses at most that many seconds of training. Each save runs in the background while the next chunk trains.
  """
  t = exp.config.train
  chunk = ensemble.auto_models_per_chunk(t.models_per_chunk, t.num_models)
  trainer = _trainer(exp, chunk=chunk)
  chunks = trainer.chunks(t.num_models)
  steps_per_model = t.epochs * (len(exp.y_train) // t.batch_size)
  saved = [tuple(int(v) for v in g) for g in _broadcast_exact(np.asarray(saved_checkpoints(workdir), np.int64)
                                                                .reshape(-1, 2))]  # process 0 decides
  done = {c for first, last in saved for c in range(first, last + 1)}
  if done:
    logger.info("ensemble: reusing %d of %d trained chunks from %s", len(done), len(chunks), workdir)
  checkpointer = ocp.StandardCheckpointer()
  streams = ensemble.Streams.ensemble(exp.config.seed)
  keep = _state_bytes(trainer) * len(chunks) <= KEEP_ENSEMBLE_IN_MEMORY_BYTES
  pending: list[tuple[int, ensemble.MemberState]] = []
  last_save = time.monotonic()

  def save_pending():
    checkpointer.wait_until_finished()  # the previous save ran while these chunks trained
    first, last = pending[0][0], pending[-1][0]
    stacked = jax.tree.map(lambda *a: np.concatenate(a), *[s for _, s in pending])
    checkpointer.save(ensemble_checkpoint_dir(workdir, first, last),
                      {"params": stacked.params, "batch_stats": stacked.batch_stats})
    pending.clear()

  with progress(f"train ensemble ({t.num_models} models)", len(chunks) * steps_per_model, "step") as update:
    update(len(done) * steps_per_model)
    for c, ids in enumerate(chunks):
      if c in done:
        continue
      state = trained_part(trainer.train_chunk(ids, streams, exp.x_train, exp.y_train, exp.sigma_train,
                                               epochs=t.epochs, on_step=update))
      if keep:
        exp.chunk_states[c] = state
      pending.append((c, state))
      due = time.monotonic() - last_save >= t.checkpoint_every_s
      if c + 1 == len(chunks) or c + 1 in done or _agree(due):  # a checkpoint holds consecutive chunks
        save_pending()
        last_save = time.monotonic()
    checkpointer.wait_until_finished()
  return trainer


# Trained chunks are also kept in host memory (certification then reads no checkpoint back) when the whole
# ensemble's params and batch statistics take at most this many bytes.
KEEP_ENSEMBLE_IN_MEMORY_BYTES = 2 << 30


def _trained_template(trainer: ensemble.EnsembleTrainer, num_chunks: int) -> dict[str, Any]:
  """Shapes and dtypes of the saved part of ``num_chunks`` stacked chunks (an Orbax restore template)."""
  state = trainer.abstract_state()
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((num_chunks * a.shape[0],) + a.shape[1:], a.dtype),
                      {"params": state.params, "batch_stats": state.batch_stats})


def _state_bytes(trainer: ensemble.EnsembleTrainer) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(_trained_template(trainer, 1)))


def iter_ensemble(trainer: ensemble.EnsembleTrainer, workdir: str, num_models: int,
                  in_memory: dict[int, ensemble.MemberState] | None = None
                  ) -> Iterator[tuple[np.ndarray, ensemble.MemberState]]:
  """Yields (model ids, stacked params and batch statistics) of every trained chunk, in order: from
  ``in_memory`` when it holds the chunk, else read back from the checkpoint that holds it.

  Raises:
    FileNotFoundError: a chunk is neither in memory nor in a checkpoint of the workdir.
  """
  where = {c: (first, last) for first, last in saved_checkpoints(workdir) for c in range(first, last + 1)}
  checkpointer = ocp.StandardCheckpointer()
  restored: tuple[tuple[int, int], Any] | None = None
  for c, ids in enumerate(trainer.chunks(num_models)):
    if in_memory and c in in_memory:
      yield ids, in_memory[c]
      continue
    if c not in where:
      raise FileNotFoundError(f"chunk {c} of the ensemble is in no checkpoint of {workdir}/ensemble")
    first, last = where[c]
    if restored is None or restored[0] != (first, last):
      tree = checkpointer.restore(ensemble_checkpoint_dir(workdir, first, last),
                                  _trained_template(trainer, last - first + 1))
      restored = ((first, last), tree)
    k = trainer.chunk
    part = jax.tree.map(lambda a: np.asarray(a)[(c - first) * k:(c - first + 1) * k], restored[1])
    yield ids, ensemble.MemberState(part["params"], part["batch_stats"], None)


def load_ensemble(trainer: ensemble.EnsembleTrainer, workdir: str, num_models: int,
                  in_memory: dict[int, ensemble.MemberState] | None = None) -> ensemble.MemberState:
  """The whole ensemble's state (leading axis M) in host memory (for the ensemble scorer of the sigma search)."""
  parts = [jax.tree.map(lambda a, k=ids < num_models: np.asarray(a)[k], s)
           for ids, s in iter_ensemble(trainer, workdir, num_models, in_memory)]
  return jax.tree.map(lambda *a: np.concatenate(a), *parts)


def certify_splits(exp: Experiment, trainer: ensemble.EnsembleTrainer, workdir: str,
                   progress: Progress) -> dict[str, np.ndarray]:
  """Runs the certification kernel of every model over both test splits in one pass over the ensemble.

  Returns:
    {"<split>_preds": (M, N_split) int32, "<split>_probs_sum": (N_split, K) float64} for clean and triggered.
  """
  c = exp.config
  names = ("clean", "triggered")
  x = np.concatenate([exp.splits[n]["x"] for n in names])
  sigma = np.concatenate([exp.sigma_test[n] for n in names])
  with progress(f"certify ({len(x)} inputs)", c.train.num_models, "model") as update:
    preds, probs_sum = certify_lib.certify_inputs(
        exp.model, iter_ensemble(trainer, workdir, c.train.num_models, exp.chunk_states), x, sigma,
        seed=c.seed, num_models=c.train.num_models, batch_size=c.certify.batch_size, on_chunk=update,
        mesh=trainer.mesh, member_map=trainer.member_map, models_per_chunk=c.certify.models_per_chunk or None)
  out, start = {}, 0
  for n in names:
    stop = start + len(exp.splits[n]["y"])
    out[f"{n}_preds"], out[f"{n}_probs_sum"] = preds[:, start:stop], probs_sum[start:stop]
    start = stop
  return out


def bound_split(exp: Experiment, split: str, preds: np.ndarray, probs_sum: np.ndarray) -> bounds.Certificate:
  """Host-side float64 bounds of one split from the integer votes (METHOD.md section 3)."""
  c = exp.config.certify
  k = exp.data.num_classes
  m = preds.shape[0]
  sigma_x = exp.sigma_test[split]
  sigma_min = bounds.sigma_min_of(sigma_x, exp.sigma_train)
  kwargs = dict(alpha=c.alpha, bound=c.bound, correction=c.correction, sigma_x=sigma_x, sigma_min=sigma_min)
  if c.correction == "holdout":
    m0 = c.holdout_models
    return bounds.certify_counts(certify_lib.votes_from_preds(preds[m0:], k),
                                 selection_votes=certify_lib.votes_from_preds(preds[:m0], k), **kwargs)
  return bounds.certify_counts(certify_lib.votes_from_preds(preds, k), soft_sums=probs_sum, num_models=m, **kwargs)


# ---------------------------------------------------------------------------------------------- run


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: Progress = no_progress,
        fresh: bool = False) -> dict[str, Any]:
  """Runs (or resumes) the whole experiment and writes every output file into ``workdir``.

  Args:
    config: a run config (``certssb_jax.config.base_config`` and the files in ``configs/``).
    workdir: output folder; a run already there with the same config is resumed.
    progress: progress-bar factory (the CLI passes tqdm bars); default: none.
    fresh: discard a workdir whose config differs instead of refusing.

  Returns:
    The summary (also written to ``summary.json``).
  """
  config_lib.validate_config(config)
  warn_if_uncertifiable(config)
  timings: dict[str, float] = {}

  @contextlib.contextmanager
  def timed(name):
    t0 = time.perf_counter()
    yield
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 3)

  with timed("data"):
    ds = load_data(config)
  refused = None
  if _is_primary():
    try:
      prepare_workdir(config, workdir, fresh=fresh)
      clean_partial_writes(workdir)
    except ConfigMismatchError as e:
      refused = e
  if not _agree(refused is None):
    raise refused or ConfigMismatchError(f"process 0 refused workdir {workdir} (see its log)")
  with timed("poison"):
    exp = poison(config, ds)
    if _is_primary():
      wd.save_npz(os.path.join(workdir, "poison.npz"), indices=exp.poison_indices, trigger_norms=exp.poison_norms)
  logger.info("data %s: %d train (%d poisoned), %d clean test, %d triggered test inputs", ds.name,
              len(exp.y_train), len(exp.poison_indices), len(exp.splits["clean"]["y"]),
              len(exp.splits["triggered"]["y"]))

  undefended = None
  if config.undefended.enabled:
    with timed("undefended"):
      state = single_model(exp, workdir, "undefended", epochs=config.undefended.epochs or config.train.epochs,
                           sigma=None, progress=progress)
      undefended = evaluate_single(exp, state)

  s = config.sigma
  with timed("sigma_train"):
    if s.mode == "fixed":
      exp.sigma_train = np.full(len(exp.y_train), s.sigma_0, np.float32)
    else:
      exp.sigma_train = _cached(workdir, "sigma_train", lambda: {"sigma": search_sigmas(
          exp, _unstack(_pilot(exp, workdir, progress)), _score_fn(exp.model), "train", exp.x_train,
          exp.y_train, progress)})["sigma"]

  with timed("train_ensemble"):
    trainer = train_ensemble(exp, workdir, progress)

  with timed("sigma_test"):
    for split in ("clean", "triggered"):
      if s.mode == "fixed":
        exp.sigma_test[split] = np.full(len(exp.splits[split]["y"]), s.sigma_0, np.float32)
      else:
        exp.sigma_test[split] = _cached(workdir, f"sigma_{split}",
                                        lambda sp=split: _test_sigmas(exp, trainer, workdir, sp, progress))["sigma"]
  if _is_primary():
    wd.save_npz(os.path.join(workdir, "sigmas.npz"), train=exp.sigma_train,
                train_index=np.arange(len(exp.y_train)), **{f"test_{sp}": exp.sigma_test[sp] for sp in exp.sigma_test},
                **{f"test_{sp}_index": exp.splits[sp]["index"] for sp in exp.sigma_test})

  certs = {}
  with timed("certify"):
    votes = _cached(workdir, "votes", lambda: certify_splits(exp, trainer, workdir, progress))
    raw = {sp: {"preds": votes[f"{sp}_preds"], "probs_sum": votes[f"{sp}_probs_sum"]} for sp in ("clean", "triggered")}
  with timed("bounds"):
    for split in ("clean", "triggered"):
      certs[split] = bound_split(exp, split, raw[split]["preds"], raw[split]["probs_sum"])
  stored = {}
  with timed("storage_update"):
    if config.certify.storage_update:
      stored = storage_update(exp, certs, workdir if _is_primary() else None)
  if not _is_primary():  # the other processes computed with process 0; it alone writes the outputs
    return {"process_index": jax.process_index(), "files": []}
  with timed("report"):
    summary = report.write_outputs(exp, certs, raw, stored, undefended, workdir, timings)
  return summary


def warn_if_uncertifiable(config: ml_collections.ConfigDict) -> float:
  """Warns (before any work) when M and alpha cannot certify any radius; returns the margin ceiling."""
  c = config.certify
  k = len(config.data.classes)
  m_est = config.train.num_models - (c.holdout_models if c.correction == "holdout" else 0)
  ceiling = bounds.margin_ceiling(m_est, c.alpha, bound=c.bound, correction=c.correction, num_classes=k)
  if ceiling <= 0:
    need = next((m for m in range(m_est + 1, 100_000) if bounds.margin_ceiling(
        m, c.alpha, bound=c.bound, correction=c.correction, num_classes=k) > 0), None)
    logger.warning("%d models cannot certify any radius at alpha = %g with %s (the largest certifiable margin is 0); "
                   "at least %s models are needed", m_est, c.alpha, c.bound, need)
  else:
    logger.info("margin ceiling for M = %d, alpha = %g (%s): %.4f sigma, i.e. radius <= %.4f at sigma_0 = %g",
                m_est, c.alpha, c.bound, ceiling, ceiling * config.sigma.sigma_0, config.sigma.sigma_0)
  return ceiling


def _unstack(state: ensemble.MemberState) -> tuple[Any, Any]:
  """(params, batch_stats) of the single model of a stacked state with a leading axis of 1."""
  return jax.tree.map(lambda a: a[0], (state.params, state.batch_stats))


def _pilot(exp: Experiment, workdir: str, progress: Progress) -> ensemble.MemberState:
  c = exp.config
  return single_model(exp, workdir, "pilot", epochs=c.sigma.pilot_epochs or c.train.epochs, sigma=c.sigma.sigma_0,
                      progress=progress)


def _test_sigmas(exp: Experiment, trainer: ensemble.EnsembleTrainer, workdir: str, split: str,
                 progress: Progress) -> dict[str, np.ndarray]:
  """sigma_x of every input of a test split; class A is the scorer's prediction on the clean input."""
  c = exp.config
  if c.sigma.test_scorer == "pilot":
    state, score_fn = _unstack(_pilot(exp, workdir, progress)), _score_fn(exp.model)
  else:
    full = load_ensemble(trainer, workdir, c.train.num_models, exp.chunk_states)
    score_fn = _ensemble_score_fn(exp.model, trainer.mesh, c.train.num_models)  # sharded over ens
    state = score_fn.place(full.params, full.batch_stats)
  x = exp.splits[split]["x"]
  target = _predict_with(score_fn, state, x)
  return {"sigma": search_sigmas(exp, state, score_fn, split, x, target, progress), "target": target}


def single_model(exp: Experiment, workdir: str, name: str, *, epochs: int, sigma: float | None,
                 progress: Progress) -> ensemble.MemberState:
  """Loads the auxiliary model ``name`` (``pilot`` or ``undefended``) from its checkpoint, or trains and saves it."""
  tag = {"pilot": rng.PILOT, "undefended": rng.UNDEFENDED}[name]
  path = os.path.join(os.path.abspath(workdir), name)
  trainer = _trainer(exp, chunk=1, mesh=ensemble.default_mesh(jax.local_devices()[:1]))
  checkpointer = ocp.StandardCheckpointer()
  if _agree(os.path.exists(path)):
    logger.info("reusing the %s model from %s", name, path)
    return ensemble.MemberState(*checkpointer.restore(path, trainer.abstract_state()))
  state = train_single(exp, trainer, tag=tag, epochs=epochs, sigma=sigma, progress=progress,
                       desc=f"train {name} model")
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  return state


def storage_update(exp: Experiment, certs: dict[str, bounds.Certificate],
                   workdir: str | None = None) -> dict[str, store_lib.StoreAnswer]:
  """Answers each split through the store of certified balls, in dataset order (METHOD.md section 5).

  One store per split (``store.npz`` holds the clean split's, ``store_triggered.npz`` the triggered split's),
  or, with ``certify.shared_store``, one store that sees the clean split and then the triggered split
  (``store.npz``).
  """
  shared = exp.config.certify.shared_store
  answers, store = {}, None
  for split in ("clean", "triggered"):
    if store is None or not shared:
      store = store_lib.CertifiedStore(exp.data.input_shape)
    cert = certs[split]
    answers[split] = store.certify(exp.splits[split]["x"], cert.pred, cert.radius_test, exp.sigma_test[split])
    if workdir is not None and (not shared or split == "triggered"):
      store.save(os.path.join(workdir, "store.npz" if shared or split == "clean" else f"store_{split}.npz"))
  return answers
