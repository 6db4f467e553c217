"""One run, in order: data, attack, undefended model, training sigmas, ensemble, test sigmas, votes, bounds,
storage update, diagnostics, report.

``run(config, workdir)`` is what ``python -m certssb_jax.launch`` calls. Each stage below is a function with
explicit inputs and outputs that a notebook can call on its own; the run folder (``rundir.RunDir``) saves
what each stage computed, so a run started again with the same config reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from certssb_jax import defenses, multihost, rng
from certssb_jax.certify import kernel as certify_lib
from certssb_jax.data import readers, sources as data_lib, triggers
from certssb_jax.data.attacked import SPLITS, Attacked, Split
from certssb_jax.defenses import sigma_search, smoothing
from certssb_jax.ensemble import scorer as scorer_lib, trained
from certssb_jax.ensemble.member import MemberState, Streams, member_logits
from certssb_jax.ensemble.trainer import Trainers, auto_models_per_chunk, check_losses
from certssb_jax.ensemble.views import MemberViews
from certssb_jax.experiment import answering, config as config_lib, count_report, metrics, report, rundir
from certssb_jax.experiment.rundir import RunDir
from certssb_jax.models import zoo as models_lib
from certssb_jax.progress import Progress, default_progress, no_progress, tqdm_progress  # noqa: F401

logger = logging.getLogger(__name__)

Config = config_lib.Config


# ---------------------------------------------------------------------------------------------- the run


def run(config: ml_collections.ConfigDict, workdir: str, *, defense: defenses.Defense | None = None,
        progress: Progress | None = None, fresh: bool = False,
        trainers: Trainers | None = None) -> dict[str, Any]:
  """Runs (or resumes) the whole experiment and writes every output file into ``workdir``.

  Args:
    config: a run config (``config.base_config``, the files in ``configs/``, ``config.load_config``).
    workdir: output folder; a run already there with the same config is resumed.
    defense: a defense value (``defenses.dpa(50)``, ``defenses.rab(0.5)``) to run in place of the config's
      ``defense.name`` (``config.with_defense``; ``config.json`` records it).
    progress: progress-bar factory; default: tqdm bars when a person is watching (a terminal or a notebook).
    fresh: discard the results of a workdir whose config differs instead of refusing.
    trainers: the compiled training programs to use and add to (shared by the runs of a sweep); default: new.

  Returns:
    The summary (also written to ``summary.json``).
  """
  cfg = config_lib.resolve(config if defense is None else config_lib.with_defense(config, defense))
  progress = progress or default_progress(multihost.is_primary())
  ds = load_data(cfg)  # data problems, and fields that need the data's size, are refused before any work ...
  cfg = config_lib.resolve_for_data(cfg, len(ds.y_train))
  rundir.check_config(workdir, cfg, fresh=fresh)  # ... and so is a folder of another run
  rd = RunDir.open(workdir, cfg, fresh=fresh)
  try:
    return _run_stages(cfg, ds, rd, progress, trainers or Trainers())
  finally:
    rd.close()  # the folder's lock ends with the run, also when a stage fails


def run_arrays(config: ml_collections.ConfigDict, workdir: str, x_train: np.ndarray, y_train: np.ndarray,
               x_test: np.ndarray, y_test: np.ndarray, *, name: str = "arrays", **kwargs: Any) -> dict[str, Any]:
  """``run`` on a user's own arrays: images (N, H, W[, C]) in [0, 1] (or uint8 0..255), labels the original class
  ids, of which ``config.data.classes`` are kept (the first is the label the attacker targets by default).

  The arrays are written once to ``workdir/data_<content hash>.npz`` and the run reads that file (source ``npz``),
  so ``config.json`` names them and a run resumed with other arrays is refused. ``kwargs`` go to ``run``.
  """
  arrays = [np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test)]
  digest = hashlib.sha1(b"".join(a.tobytes() + str((a.shape, a.dtype)).encode() for a in arrays)).hexdigest()[:12]
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.path.abspath(workdir), f"data_{digest}.npz")
  if not os.path.exists(path):
    readers.save_npz_data(path + ".tmp.npz", *arrays)
    os.replace(path + ".tmp.npz", path)
  c = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  c.data.source, c.data.data_dir, c.data.name = "npz", path, name
  return run(c, workdir, **kwargs)


def _run_stages(cfg: Config, ds: data_lib.Dataset, rd: RunDir, progress: Progress,
                trainers: Trainers) -> dict[str, Any]:
  """The stages of ``run`` in the opened (and locked) run folder ``rd``: those of the defense's family."""
  defense = defenses.get(cfg)
  stages = {"smoothing": _smoothing_stages, "counting": _counting_stages}[defense.family]
  return stages(cfg, ds, rd, defense, progress, trainers)


def _smoothing_stages(cfg: Config, ds: data_lib.Dataset, rd: RunDir, defense: defenses.Defense,
                      progress: Progress, trainers: Trainers) -> dict[str, Any]:
  """RAB and Cert-SSB: training sigmas, the noised ensemble, test sigmas, votes, bounds, the store."""
  report.warn_if_uncertifiable(cfg)

  attacked = poison(cfg, ds, rd, progress)
  undefended = train_undefended(cfg, attacked, rd, progress, trainers) if cfg.undefended.enabled else None
  pilot = train_pilot(cfg, attacked, rd, progress, trainers) if defense.noise(cfg).pilot else None
  sigma_train, disagree = training_sigmas(cfg, attacked, pilot, rd, progress)
  members = train_ensemble(cfg, attacked, sigma_train, rd, progress, trainers=trainers)
  sigma_test = test_sigmas(cfg, attacked, pilot, members, rd, progress)
  rd.save_npz("sigmas.npz", train=sigma_train, **{f"test_{s}": sigma_test[s] for s in SPLITS},
              **{f"test_{s}_index": attacked.splits[s].index for s in SPLITS})

  requests = answering.kernel_requests(cfg, attacked, sigma_test)
  votes = rd.stage("votes", lambda: answering.run_kernel(cfg, members, requests, progress))
  t0 = time.perf_counter()
  certs, sigma_min = answering.certificates(cfg, votes, sigma_test, sigma_train)
  answers = answering.storage_update(cfg, attacked, certs, sigma_test, sigma_min, cfg.certify.query_order, rd)
  other = "triggered_first" if cfg.certify.query_order == "clean_first" else "clean_first"
  other_answers = answering.storage_update(cfg, attacked, certs, sigma_test, sigma_min, other)
  diag = metrics.collect(cfg, attacked, certs, answers, other_answers, other, votes, sigma_train, disagree,
                         sigma_test)
  rd.record_time("bounds_store_diagnostics", time.perf_counter() - t0, accumulate=False)
  if not multihost.is_primary():  # the other processes computed with process 0; it alone writes the outputs
    return {"process_index": jax.process_index(), "files": []}
  return report.write_outputs(cfg, attacked, certs, answers, votes, sigma_train, sigma_test, undefended, diag, rd)


def _counting_stages(cfg: Config, ds: data_lib.Dataset, rd: RunDir, defense: defenses.Defense,
                     progress: Progress, trainers: Trainers) -> dict[str, Any]:
  """The defenses that count poisoned samples (DPA, Finite Aggregation, bagging, DPA with test-time smoothing):
  members trained on their views (parts, unions of buckets, bags), with the defense's augmentation if any; votes
  on the queries (every member on the clean query, or the defense's own draws); certificates that count changed
  training samples. The draws of a test-time smoothed ensemble run on every process alike (not sharded)."""
  count_report.warn_if_count_uncertifiable(cfg, defense, len(ds.y_train))
  attacked = poison(cfg, ds, rd, progress)
  undefended = train_undefended(cfg, attacked, rd, progress, trainers) if cfg.undefended.enabled else None
  views = defense.member_views(cfg, attacked.x_train, attacked.y_train)
  noise = defense.train_sigma(cfg)
  sigma = None if noise is None else np.full(len(attacked.y_train), noise, np.float32)
  members = train_ensemble(cfg, attacked, sigma, rd, progress, views=views, trainers=trainers)
  k = len(cfg.data.classes)
  if defense.query_votes is None:  # every member's vote on the clean query
    clean_queries = {s: (attacked.splits[s].x, np.zeros(len(attacked.splits[s].y), np.float32)) for s in SPLITS}
    votes = rd.stage("votes", lambda: answering.run_kernel(cfg, members, clean_queries, progress,
                                                           defense.member_ranks))
    counts = {s: certify_lib.votes_from_preds(votes[f"{s}_preds"], k) for s in SPLITS}
    preds = {s: votes[f"{s}_ranks" if defense.member_ranks else f"{s}_preds"] for s in SPLITS}
  else:
    votes = rd.stage("draws", lambda: {f"{s}_votes": defense.query_votes(cfg, members, attacked.splits[s].x, progress)
                                       for s in SPLITS})
    counts, preds = {s: votes[f"{s}_votes"] for s in SPLITS}, dict.fromkeys(SPLITS)
  certs = {s: defense.certify_votes(cfg, counts[s], len(attacked.y_train), preds[s]) for s in SPLITS}
  if not multihost.is_primary():
    return {"process_index": jax.process_index(), "files": []}
  return count_report.write_count_outputs(cfg, defense, attacked, certs, counts, votes, undefended, rd)


def compare(config: ml_collections.ConfigDict, workdir: str, names: tuple[str, ...] = ("rab", "cert_ssb"), *,
            progress: Progress | None = None, fresh: bool = False,
            trainers: Trainers | None = None) -> dict[str, dict[str, Any]]:
  """Several defenses (``defenses.REGISTRY`` names) on the same data and seeds, each into ``workdir/<name>``; the
  models two of them both train (``identity.training_key``: RAB and Cert-SSB at ``sigma.train = base``, DPA and
  DPA+ROE) are trained once. Returns {name: summary}."""
  configs, resolved = {}, {}
  for name in names:  # every config is checked before anything runs
    configs[name] = config.copy_and_resolve_references()
    configs[name].defense.name = name
    resolved[name] = config_lib.resolve(configs[name])
  # the training identity holds the fields the data's size fills in (a member's batch, a bag's size)
  n_train = len(load_data(next(iter(resolved.values()))).y_train)
  resolved = {name: config_lib.resolve_for_data(cfg, n_train) for name, cfg in resolved.items()}
  runs, trainers = {}, trainers or Trainers()
  for name, c in configs.items():
    d = os.path.join(workdir, name)
    for done in runs:
      rundir.link_trained(os.path.join(workdir, done), d, resolved[name])
    runs[name] = run(c, d, progress=progress, fresh=fresh, trainers=trainers)
  return runs


# ---------------------------------------------------------------------------------------------- data and attack


def load_data(cfg: Config) -> data_lib.Dataset:
  """Loads and validates the configured data set (raises DataError naming the problem)."""
  d = cfg.data
  return data_lib.load_dataset(d.source, name=d.name, classes=tuple(d.classes), data_dir=d.data_dir or None,
                               image_size=d.image_size, max_train=d.max_train, max_test=d.max_test,
                               test_fraction=d.test_fraction)


def poison(cfg: Config, ds: data_lib.Dataset, rd: RunDir, progress: Progress) -> Attacked:
  """Poisons the training set and builds the clean and triggered test splits.

  The triggered split holds the test inputs of every non-target class with the trigger added and their TRUE
  labels: ERA counts them correct when the true label is kept, ASR when the target is predicted. An adaptive
  attacker (``attack.selection = least_confident``) poisons the images a surrogate model, trained on the clean
  data without noise, is least sure of.
  """
  a = cfg.attack
  model = models_lib.get_model(cfg.model.name, ds.num_classes, conv=cfg.model.conv)
  scores = None
  if a.selection == "least_confident":
    clean = Attacked(ds, ds.x_train, ds.y_train, np.zeros(0, np.int64), np.zeros(0), {}, model)
    state = single_model(cfg, clean, rd, "surrogate", epochs=cfg.train.epochs, sigma=None, progress=progress)
    probs = trained.predict_probs(model, state, ds.x_train)
    scores = probs[np.arange(len(ds.y_train)), ds.y_train]  # the surrogate's probability of the true label
  idx = triggers.choose_poison_indices(ds.y_train, a.poison_rate, a.target_class, cfg.seed, base=a.poison_base,
                                       scores=scores)
  x_train, y_train, norms = triggers.poison_training_set(ds.x_train, ds.y_train, idx, a.trigger, a.delta,
                                                         a.target_class, a.blend_alpha)
  splits = test_splits(cfg, ds)
  rd.save_npz("poison.npz", indices=idx, trigger_norms=norms)
  logger.info("data %s: %d train (%d poisoned), %d clean test, %d triggered test inputs", ds.name, len(y_train),
              len(idx), len(ds.y_test), len(splits["triggered"].y))
  return Attacked(ds, x_train, y_train, idx, norms, splits, model)


def test_splits(cfg: Config, ds: data_lib.Dataset) -> dict[str, Split]:
  """The clean test split and the triggered one: the test inputs of every non-target class with the trigger added
  and their TRUE labels."""
  a = cfg.attack
  keep = np.flatnonzero(ds.y_test != a.target_class)
  x_trig, trig_norms = triggers.apply_trigger(ds.x_test[keep], a.trigger, a.delta, a.blend_alpha)
  return {"clean": Split(ds.x_test, ds.y_test, np.arange(len(ds.y_test))),
          "triggered": Split(x_trig, ds.y_test[keep], keep, trig_norms)}


# ---------------------------------------------------------------------------------------------- single models


def single_model(cfg: Config, attacked: Attacked, rd: RunDir, name: str, *, epochs: int, sigma: float | None,
                 progress: Progress, trainers: Trainers | None = None) -> MemberState:
  """The auxiliary model ``name`` (``undefended``, ``pilot`` or ``surrogate``), restored or trained and saved.

  It trains on ``attacked``'s training set, with Gaussian augmentation at ``sigma`` re-drawn every epoch
  (pilot) or without noise (``sigma=None``). Returns its state with a leading axis of 1.
  """
  trainer = (trainers or Trainers()).get(attacked.model, attacked.data.input_shape, cfg,
                                                  models_per_chunk=1, devices=jax.local_devices()[:1])
  if rd.has_model(name):
    return MemberState(*rd.restore_model(name, trainer.abstract_state()))
  n = len(attacked.y_train)
  tag = {"pilot": rng.PILOT, "undefended": rng.UNDEFENDED, "surrogate": rng.SURROGATE}[name]
  t0 = time.perf_counter()
  with progress(f"train {name} model", epochs * (n // cfg.train.batch_size), "step") as update:
    state = trainer.train_chunk(np.zeros(1, np.int64), Streams.auxiliary(cfg.seed, tag), attacked.x_train,
                                attacked.y_train, None if sigma is None else np.full(n, sigma, np.float32),
                                fresh_noise=True, epochs=epochs, on_step=update)
  rd.record_time(name, time.perf_counter() - t0)
  rd.save_model(name, state)
  return state


def train_undefended(cfg: Config, attacked: Attacked, rd: RunDir, progress: Progress,
                     trainers: Trainers | None = None) -> dict[str, float]:
  """Clean accuracy, ERA and ASR of one model trained on the poisoned data without noise: what the attack does."""
  state = single_model(cfg, attacked, rd, "undefended", epochs=cfg.undefended.epochs, sigma=None,
                       progress=progress, trainers=trainers)
  pred = {s: trained.predict_probs(attacked.model, state, attacked.splits[s].x).argmax(-1) for s in SPLITS}
  return metrics.attack_metrics(pred, {s: attacked.splits[s].y for s in SPLITS}, cfg.attack.target_class)


def train_pilot(cfg: Config, attacked: Attacked, rd: RunDir, progress: Progress,
                trainers: Trainers | None = None) -> tuple[Any, Any]:
  """The pilot model, the default sigma-search scorer: trained on the poisoned data with Gaussian augmentation at
  ``sigma.pilot_sigma`` (2 sigma_0 by default) redrawn every epoch. Returns its (params, batch_stats)."""
  state = single_model(cfg, attacked, rd, "pilot", epochs=cfg.sigma.pilot_epochs, sigma=cfg.sigma.pilot_sigma,
                       progress=progress, trainers=trainers)
  return jax.tree.map(lambda a: a[0], (state.params, state.batch_stats))


# ---------------------------------------------------------------------------------------------- sigmas

_SPLIT_IDS = {"train": 0, "clean": 1, "triggered": 2}  # folded into the SIGMA_SEARCH stream


def find_sigmas(cfg: Config, scorer: tuple[Callable, Any], split: str, x: np.ndarray, labels: np.ndarray | None,
                progress: Progress) -> tuple[np.ndarray, np.ndarray]:
  """Sample-specific sigma (and class A) of every input of a split: the objective, then the search."""
  score_fn, params = scorer
  key = jax.random.fold_in(rng.stream(cfg.seed, rng.SIGMA_SEARCH), _SPLIT_IDS[split])
  with progress(f"sigma search ({split})", len(x), "sample") as update:
    done = [0]

    def on_batch(num_done):
      update(num_done - done[0])
      done[0] = num_done

    return sigma_search.find_sigmas(score_fn, params, x, labels, np.arange(len(x), dtype=np.int32), key,
                                    smoothing.search_config_of(cfg.sigma), cfg.sigma.objective,
                                    cfg.sigma.batch_size, progress=on_batch)


def training_sigmas(cfg: Config, attacked: Attacked, pilot: Any, rd: RunDir,
                    progress: Progress) -> tuple[np.ndarray, np.ndarray | None]:
  """sigma_j of every training sample, and where the pilot disagrees with the given label (None without a search).

  sigma_0 for every sample in RAB and in Cert-SSB's default (``sigma.train = base``): data-independent noise
  gives the attacker's relabelled images no noise level of their own. ``sigma.train = search`` searches each
  sample with the pilot, as the paper does.
  """
  n = len(attacked.y_train)
  if not defenses.noise_plan(cfg).search_train:
    return np.full(n, cfg.sigma.sigma_0, np.float32), None

  def search():
    sigma, _ = find_sigmas(cfg, (pilot_score_fn(attacked.model), pilot), "train", attacked.x_train,
                           attacked.y_train, progress)
    stacked = MemberState(*jax.tree.map(lambda a: np.asarray(a)[None], pilot), None)
    pred = trained.predict_probs(attacked.model, stacked, attacked.x_train).argmax(-1)
    return {"sigma": sigma, "pilot_disagrees": pred != attacked.y_train}

  out = rd.stage("sigma_train", search)
  return out["sigma"], out["pilot_disagrees"]


def test_sigmas(cfg: Config, attacked: Attacked, pilot: Any, members: trained.TrainedEnsemble, rd: RunDir,
                progress: Progress) -> dict[str, np.ndarray]:
  """sigma_x of every test input: sigma_0 (RAB, and Cert-SSB's default) or the search with the pilot or the
  held-out search models.

  The scorer never votes: the pilot is a separate model, and the search models (ids below
  ``sigma.search_models``) are left out of the votes, so sigma_x is chosen independently of the noise that
  then bounds the prediction.
  """
  if not defenses.noise_plan(cfg).search_test:  # RAB, or Cert-SSB with its default range [sigma_0, sigma_0]
    return {s: np.full(len(attacked.splits[s].y), cfg.sigma.sigma_0, np.float32) for s in SPLITS}
  if cfg.sigma.scorer == "pilot":
    scorer = (pilot_score_fn(attacked.model), pilot)
  else:
    held_out = members.stacked(np.arange(cfg.sigma.search_models))
    score_fn = scorer_lib.EnsembleScorer(attacked.model, members.trainer.mesh, cfg.sigma.search_models)
    scorer = (score_fn, score_fn.place(held_out.params, held_out.batch_stats))
  return {s: rd.stage(f"sigma_{s}", lambda s=s: dict(zip(("sigma", "target"), find_sigmas(
      cfg, scorer, s, attacked.splits[s].x, None, progress))))["sigma"] for s in SPLITS}


_PILOT_SCORERS: dict[Any, Callable] = {}


def pilot_score_fn(model) -> Callable[[Any, jax.Array], jax.Array]:
  """(params, batch_stats), x -> class probabilities of one model; one function object per model, so the
  search's compiled programs are reused."""
  if model not in _PILOT_SCORERS:
    _PILOT_SCORERS[model] = lambda state, xb: models_lib.logits_to_probs(
        member_logits(model, state[0], state[1], xb))
  return _PILOT_SCORERS[model]


# ---------------------------------------------------------------------------------------------- the ensemble


def train_ensemble(cfg: Config, attacked: Attacked, sigma_train: np.ndarray | None, rd: RunDir,
                   progress: Progress, views: MemberViews | None = None,
                   trainers: Trainers | None = None) -> trained.TrainedEnsemble:
  """Trains the M models chunk by chunk: model m on its own fixed noised copy of the training set (smoothing,
  ``sigma_train`` per sample) or without noise on its view of it (``views``: a part, a bag).

  Trained chunks are saved together once ``train.checkpoint_every_s`` seconds have passed since the last save
  (0: every chunk), after the first chunk and at the end; each save runs in the background while the next chunk
  trains. A chunk still training saves its whole training state at a step once that time has passed, so a kill
  loses at most about ``checkpoint_every_s`` of training however long a chunk is. A resumed run trains only what
  no checkpoint holds, from the last saved step, with the same results bit for bit.
  """
  t = cfg.train
  trainer = (trainers or Trainers()).get(
      attacked.model, attacked.data.input_shape, cfg,
      models_per_chunk=auto_models_per_chunk(t.models_per_chunk, t.num_models),
      batch_size=cfg.defense.member_batch_size if views is not None else None)
  members = trained.TrainedEnsemble(trainer, t.num_models, rd)
  chunks = trainer.chunks(t.num_models)
  done = {c for first, last in rd.saved_chunks() for c in range(first, last + 1)}
  if done:
    logger.info("ensemble: reusing %d of %d trained chunks", len(done), len(chunks))
  steps = [trainer.steps(ids, len(attacked.y_train), views, t.epochs) for ids in chunks]
  streams = Streams.ensemble(cfg.seed)
  pending: list[tuple[int, MemberState]] = []
  last_save, t0 = time.monotonic(), time.perf_counter()
  template = trainer.abstract_state()._asdict()
  if all(c in done for c in range(len(chunks))):
    return members
  with progress(f"train ensemble ({t.num_models} models)", sum(steps), "step") as update:
    update(sum(steps[c] for c in done if c < len(chunks)))  # a linked larger ensemble holds more chunks
    for c, ids in enumerate(chunks):
      if c in done:
        continue
      start = rd.restore_partial(c, template)
      if start is not None:
        start = (start[0], MemberState(**start[1]))
        update(start[0])

      def checkpoint(steps_done: int, host_state: Callable[[], MemberState], c: int = c,
                     began: float = time.monotonic()) -> None:
        """Mid-chunk, in a chunk that has trained for ``checkpoint_every_s`` (short chunks are saved whole, below):
        its whole training state once that time has passed since the last save; the finished chunks waiting for a
        save go first, so the saved chunks stay consecutive."""
        nonlocal pending, last_save
        now, every = time.monotonic(), t.checkpoint_every_s
        due = every > 0 and now - last_save >= every and now - began >= every  # 0: whole chunks only
        if steps_done == steps[c] or not multihost.agree(due):
          return
        if pending:
          members.save(pending)
          pending = []
        rd.save_partial(c, steps_done, host_state()._asdict())
        last_save = time.monotonic()

      # the epochs are passed: the shared trainer may have been built by a run with other epochs
      state, losses = trainer.train_chunk(ids, streams, attacked.x_train, attacked.y_train, sigma_train,
                                          views=views, epochs=t.epochs, on_step=update, return_losses=True,
                                          start=start, checkpoint=checkpoint)
      check_losses(losses, ids)
      pending.append((c, members.keep(c, state)))
      due = time.monotonic() - last_save >= t.checkpoint_every_s or c == 0
      if c + 1 == len(chunks) or c + 1 in done or multihost.agree(due):  # a checkpoint holds consecutive chunks
        members.save(pending)
        pending, last_save = [], time.monotonic()
    rd.wait()
    rd.drop_partials()
  rd.record_time("train_ensemble", time.perf_counter() - t0)
  return members
