r"""certssb-jax against the PyTorch baseline on the same data: stage times and agreement of certified accuracies.

Both sides do the same work (docs/method.md section 2, fixed sigma = RAB): train M smoothed models on the same
poisoned training set and certify the clean and triggered test splits. certssb-jax runs its whole pipeline
with ``defense.name=rab`` and ``undefended.enabled=False``; its storage update runs as in every run and changes
nothing here (RAB's certificates of one fixed sigma never contradict each other, so every stored answer is the
certificate itself). The baseline is ``benchmarks/torch_baseline.py``. Both sides' votes go through the SAME host-side
bounds (``certssb_jax.experiment.answering.bound_split`` -> ``bounds.certify_counts``, same alpha, bound and
correction), so the metrics differ only by the random draws (noise, init, batch order) and the frameworks. Agreement is
judged per metric with an exact McNemar test on the paired per-input outcomes (the same N test inputs on both
sides; a paired t-test for the mean certified radius), with a Bonferroni threshold over the metrics that are not
identical on both sides.

JAX timings include XLA compilation; the script also reports them without it, by timing every training step and
certification chunk through the pipeline's progress hook and replacing the first chunk of every stage (where
the compiles happen) by the mean of the later chunks.

  python benchmarks/compare_torch.py --config configs/quickstart.py --workdir /tmp/compare_torch
  python benchmarks/compare_torch.py --config configs/quickstart.py:seed=1 --workdir /tmp/c --num-models 8 --epochs 1
  python benchmarks/compare_torch.py --config configs/quickstart.py --workdir /tmp/compare_torch --skip-jax

Writes ``WORKDIR/compare.md`` (the printed tables) and ``WORKDIR/compare.json``; the JAX run is in
``WORKDIR/jax`` (deleted and re-run each time, so its timings are fresh) and the baseline's checkpoints in
``WORKDIR/torch``. With ``--skip-jax`` the JAX side is read back from ``WORKDIR/jax`` if a previous run left
it there (it must have the same config), else only the baseline is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: benchmarks.*

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from benchmarks import torch_baseline  # noqa: E402  pylint: disable=g-bad-import-order
from benchmarks.clock import StepClock  # noqa: E402  pylint: disable=g-bad-import-order
from certssb_jax.certify import bounds  # noqa: E402
from certssb_jax.ensemble import (
  member,  # noqa: E402
  trained,  # noqa: E402
  trainer as ensemble,  # noqa: E402
)
from certssb_jax.experiment import (
  answering,  # noqa: E402
  config as config_lib,  # noqa: E402
  metrics,  # noqa: E402
  pipeline,  # noqa: E402
  report,  # noqa: E402
  rundir,  # noqa: E402
)
from certssb_jax.models import zoo as models_lib  # noqa: E402

logger = logging.getLogger("compare_torch")
SPLITS = ("clean", "triggered")
AREA = "mean certified radius of correct inputs (area under CRA)"


# ---------------------------------------------------------------------------------------------- config


def benchmark_config(spec: str, num_models: int | None, epochs: int | None) -> ml_collections.ConfigDict:
  """The run config both sides use: ``spec`` (``path/to/config.py[:variant]``, as the launcher reads it) with
  fixed sigma (RAB) and no undefended model. Checked here (``config.resolve``), so a bad override stops before
  any work."""
  c = config_lib.load_config(spec)
  c.defense.name = "rab"
  c.undefended.enabled = False
  if num_models is not None:
    c.train.num_models = num_models
  if epochs is not None:
    c.train.epochs = epochs
  config_lib.resolve(c)
  return c


# ---------------------------------------------------------------------------------------------- JAX side


def steady_state(rec: list[tuple[float, int]], unit_count: int) -> dict[str, float] | None:
  """Splits one progress bar into its first chunk and the rest.

  Args:
    rec: (time, cumulative count) records of one bar (opening first, closing last).
    unit_count: the count of one chunk (steps per chunk of models, or models per certification chunk).

  Returns:
    {"bar": the bar's seconds, "first": seconds to the end of the first chunk (compiles happen there),
    "per_chunk": mean seconds of the later chunks, "chunks": number of chunks, "without_compile": the bar with
    its first chunk replaced by ``per_chunk``}, or None when there is a single chunk (nothing to compare with).
  """
  t_open, t_close, total = rec[0][0], rec[-1][0], rec[-1][1]
  chunks = total // unit_count
  if chunks < 2:
    return None
  t_first = next(t for t, c in rec if c >= unit_count)
  per_chunk = (t_close - t_first) / (chunks - 1)
  return {"bar": t_close - t_open, "first": t_first - t_open, "per_chunk": per_chunk, "chunks": chunks,
          "without_compile": t_close - t_open - (t_first - t_open) + per_chunk}


def run_jax(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the certssb-jax pipeline from scratch in ``workdir``; returns its summary and compile-free timings.

  Stage seconds come from the run's ``timings_s``: ``train_ensemble``, ``votes`` (the certification kernel over
  both splits) and ``bounds_store_diagnostics`` (bounds, the storage update and the diagnostics).
  """
  shutil.rmtree(workdir, ignore_errors=True)
  cfg = config_lib.resolve(config)
  clock = StepClock()
  t0 = time.perf_counter()
  summary = pipeline.run(config, workdir, progress=clock)
  wall = time.perf_counter() - t0
  t = summary["timings_s"]
  m = cfg.train.num_models
  chunk = ensemble.auto_models_per_chunk(cfg.train.models_per_chunk, m)
  n_train = summary["n_train"]
  steps_per_chunk = cfg.train.epochs * (n_train // cfg.train.batch_size)
  train = steady_state(clock.bar("train ensemble"), steps_per_chunk)
  # every certification bar (one for all requests); a chunk is what its first update counted
  cert = {name: steady_state(bar, bar[1][1] if len(bar) > 2 else chunk)
          for name, bar in clock.bars.items() if name.startswith("certify")}
  out = {"train": t["train_ensemble"], "certify": t["votes"], "bounds": t.get("bounds_store_diagnostics", 0.0),
         "pipeline_wall": round(wall, 3), "stage_timings": t, "models_per_chunk": chunk}
  out["train_plus_certify"] = round(out["train"] + out["certify"], 3)
  if train is not None and cert and all(cert.values()):
    out["train_without_compile"] = round(t["train_ensemble"] - train["bar"] + train["without_compile"], 3)
    out["certify_without_compile"] = round(
        t["votes"] - sum(c["bar"] for c in cert.values()) + sum(c["without_compile"] for c in cert.values()), 3)
    out["train_plus_certify_without_compile"] = round(
        out["train_without_compile"] + out["certify_without_compile"], 3)
    out["train_first_chunk"] = round(train["first"], 3)
    out["train_per_chunk"] = round(train["per_chunk"], 4)
    out["train_ms_per_model_step"] = round(1e3 * train["per_chunk"] / (chunk * steps_per_chunk), 3)
    out["certify_per_chunk"] = {name: round(c["per_chunk"], 4) for name, c in cert.items()}
    out["certify_first_chunk"] = {name: round(c["first"], 3) for name, c in cert.items()}
  ds = pipeline.load_data(cfg)
  out.update(checkpoint_io(cfg, workdir, ds.input_shape, ds.num_classes))
  return {"summary": summary, "timings": out}


def checkpoint_io(cfg: ml_collections.FrozenConfigDict, workdir: str, input_shape: tuple[int, ...],
                  num_classes: int) -> dict[str, float]:
  """Seconds certssb-jax's Orbax checkpoints cost: restoring every trained chunk (what certification pays when
  it reads the ensemble back from disk) and saving one chunk again (the fixed cost of one checkpoint; training
  saves its chunks together every ``train.checkpoint_every_s``).

  Args:
    cfg: the resolved config of the run in ``workdir``.
    workdir: the finished run's folder.
    input_shape: (H, W, C).
    num_classes: K.
  """
  t = cfg.train
  m = t.num_models
  trainer = ensemble.Trainers().get(models_lib.get_model(cfg.model.name, num_classes), input_shape, cfg,
                                    models_per_chunk=ensemble.auto_models_per_chunk(t.models_per_chunk, m))
  t0 = time.perf_counter()
  states = [s for _, s in trained.TrainedEnsemble(trainer, m, rundir.RunDir(workdir)).chunks()]
  restore = time.perf_counter() - t0
  probe = rundir.RunDir(os.path.join(os.path.abspath(workdir), "_io_probe"))
  t0 = time.perf_counter()
  probe.save_chunks(0, 0, {"params": states[0].params, "batch_stats": states[0].batch_stats})
  probe.wait()
  save = time.perf_counter() - t0
  shutil.rmtree(probe.path, ignore_errors=True)
  return {"restore_all_chunks": round(restore, 3), "save_one_chunk": round(save, 4), "num_chunks": len(states)}


def load_jax_votes(workdir: str) -> dict[str, dict[str, np.ndarray]]:
  """split -> {preds (M, N), probs_sum (N, K)} from the run's ``votes.npz``."""
  with np.load(os.path.join(workdir, "votes.npz")) as f:
    return {sp: {"preds": f[f"{sp}_preds"].astype(np.int64), "probs_sum": f[f"{sp}_probs_sum"]} for sp in SPLITS}


@dataclasses.dataclass(frozen=True)
class Setup:
  """What both sides train and certify on: the resolved config, the attacked data and RAB's sigmas."""

  cfg: ml_collections.FrozenConfigDict
  attacked: pipeline.Attacked
  sigma_train: np.ndarray  # (n,) sigma_0 everywhere
  sigma_test: dict[str, np.ndarray]  # split -> (N,) sigma_0 everywhere


def make_setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  """The data and poisoning of the pipeline (deterministic in the config) and the fixed sigmas of RAB.

  ``pipeline.poison`` records its poisoned indices in ``workdir`` (the certssb-jax run folder: the same file the
  run wrote, when there is one).
  """
  cfg = config_lib.resolve(config)
  attacked = pipeline.poison(cfg, pipeline.load_data(cfg), rundir.RunDir(workdir), pipeline.no_progress)
  s0 = cfg.sigma.sigma_0
  return Setup(cfg, attacked, np.full(len(attacked.y_train), s0, np.float32),
               {sp: np.full(len(attacked.splits[sp].y), s0, np.float32) for sp in SPLITS})


def step_benchmark(setup: Setup, repeats: int, torch_threads: int | None) -> dict[str, Any]:
  """Training throughput of both sides measured in the SAME time window, interleaved, to factor out load.

  Each repeat trains one more model for one epoch on each side, in turn: certssb-jax (``EnsembleTrainer.
  train_chunk`` of one chunk: init, batch order, noised steps; compiled in a warm-up round), the PyTorch baseline
  with ``torch_threads`` threads (default: every core) and with 1 thread (materialising the noised copy, init,
  the steps). Medians are robust to load spikes from other processes.

  Returns:
    {"jax", "torch", "torch_1_thread"}: median ms per model-step, plus the raw lists and the thread counts.
  """
  cfg, a = setup.cfg, setup.attacked
  t = cfg.train
  chunk = ensemble.auto_models_per_chunk(t.models_per_chunk, t.num_models)
  trainer = ensemble.EnsembleTrainer(a.model, a.data.input_shape, ensemble.TrainConfig(
      epochs=1, batch_size=t.batch_size, learning_rate=t.learning_rate, models_per_chunk=chunk))
  streams = member.Streams.ensemble(cfg.seed)
  steps = len(a.y_train) // t.batch_size
  x_t, y_t = torch_baseline.to_nchw(a.x_train), torch_baseline.torch.from_numpy(a.y_train.astype(np.int64))
  base = torch_baseline.BaselineConfig(num_models=1, epochs=1, batch_size=t.batch_size,
                                       learning_rate=t.learning_rate, sigma=cfg.sigma.sigma_0, seed=cfg.seed)
  threads = torch_baseline.set_threads(torch_threads)

  def jax_round(r):
    t0 = time.perf_counter()
    trainer.train_chunk(np.arange(r * trainer.chunk, (r + 1) * trainer.chunk), streams, a.x_train, a.y_train,
                        setup.sigma_train)
    return 1e3 * (time.perf_counter() - t0) / (steps * trainer.chunk)

  def torch_round(r, n_threads):
    torch_baseline.set_threads(n_threads)
    t0 = time.perf_counter()
    torch_baseline.train_member(torch_baseline.noised_training_set(x_t, base.sigma, base.seed, r), y_t, r,
                                a.data.num_classes, base)
    return 1e3 * (time.perf_counter() - t0) / steps

  jax_round(0), torch_round(0, threads), torch_round(0, 1)  # warm-up (compiles)
  out = {"jax": [], "torch": [], "torch_1_thread": []}
  for r in range(1, repeats + 1):
    out["jax"].append(jax_round(r))
    out["torch"].append(torch_round(r, threads))
    out["torch_1_thread"].append(torch_round(r, 1))
  torch_baseline.set_threads(threads)
  res = {k: round(float(np.median(v)), 3) for k, v in out.items()}
  res.update(raw={k: [round(x, 2) for x in v] for k, v in out.items()}, torch_threads=threads, repeats=repeats,
             steps_per_epoch=steps, models_per_chunk=trainer.chunk)
  return res


def step_table(sb: dict[str, Any]) -> str:
  j = sb["jax"]
  return "\n".join([
      "| training, ms per model-step (median of interleaved 1-epoch rounds) | ms | vs certssb-jax |",
      "|---|---:|---:|",
      f"| certssb-jax (chunk of {sb['models_per_chunk']} model(s)) | {j:.2f} | 1.00x |",
      f"| PyTorch baseline, {sb['torch_threads']} threads | {sb['torch']:.2f} | {sb['torch'] / j:.2f}x |",
      f"| PyTorch baseline, 1 thread | {sb['torch_1_thread']:.2f} | {sb['torch_1_thread'] / j:.2f}x |",
  ])


# ---------------------------------------------------------------------------------------------- metrics


def outcomes(setup: Setup, raw: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Per-input 0/1 outcomes of every reported metric, from votes through OUR bounds (docs/method.md sections 3, 7).

  Returns:
    metric name -> (N,) bool: ``clean accuracy`` (correct, abstain counts as wrong), ``ERA`` and ``ASR`` on the
    triggered split, ``abstain (clean)``, and ``CRA(r)`` on the grid (correct and joint radius > r).
  """
  cfg = setup.cfg
  certs = {sp: answering.bound_split(cfg, raw[sp]["preds"], raw[sp]["probs_sum"], setup.sigma_test[sp],
                                    bounds.sigma_min_of(setup.sigma_test[sp], setup.sigma_train)) for sp in SPLITS}
  y = {sp: setup.attacked.splits[sp].y for sp in SPLITS}
  correct = certs["clean"].pred == y["clean"]
  out = {"clean accuracy": correct,
         "abstain (clean)": certs["clean"].pred == -1,
         "ERA (triggered, true label)": certs["triggered"].pred == y["triggered"],
         "ASR (triggered -> target)": certs["triggered"].pred == cfg.attack.target_class}
  for r in bounds.CRA_GRID:
    out[f"CRA(r={r})"] = correct & (certs["clean"].radius > r)
  # continuous: radius where correct, 0 elsewhere; its mean is the area under the CRA(r) curve
  out[AREA] = np.where(correct, certs["clean"].radius, 0.0)
  # the same numbers as the report module computes them (a consistency check of the indicators above)
  ref = metrics.split_metrics(certs["clean"].pred, certs["clean"].radius, certs["clean"].radius_test, y["clean"],
                              cfg.attack.target_class, bounds.CRA_GRID)
  assert math.isclose(ref["accuracy"], float(out["clean accuracy"].mean()))
  assert all(math.isclose(ref["cra"][str(r)], float(out[f"CRA(r={r})"].mean())) for r in bounds.CRA_GRID)
  return out


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray], level: float = 0.05) -> dict[str, Any]:
  """Per-metric agreement of two runs on the same N inputs.

  For a 0/1 metric: the two proportions, their difference, the binomial standard error of the difference
  sqrt(p1 (1 - p1) / N + p2 (1 - p2) / N), and the exact two-sided McNemar p-value (binomial test of the
  discordant pairs: if both procedures have the same success probability on every input and their draws are
  independent, a discordant pair goes either way with probability 1/2). For a continuous metric (the mean
  certified radius): the means, the standard error of the mean paired difference and a paired t-test. A metric
  disagrees when its p-value is below ``level / R``, R = the number of metrics whose per-input values are not
  identical on both sides (Bonferroni).

  Caveat: the N inputs share the same M models, so their outcomes are not independent; both tests treat them as
  independent and are approximate.
  """
  rows = {}
  for name in a:
    x, y = np.asarray(a[name]), np.asarray(b[name])  # (N,)
    n = len(x)
    if x.dtype == np.bool_:
      p1, p2 = float(x.mean()), float(y.mean())
      only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
      differ = only_a + only_b > 0
      p = float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue) if differ else 1.0
      se = math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)
      test = "McNemar"
    else:
      d = y.astype(np.float64) - x.astype(np.float64)  # (N,)
      p1, p2 = float(x.mean()), float(y.mean())
      differ = bool(np.any(d != 0))
      se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
      p = float(stats.ttest_rel(y, x).pvalue) if differ and se > 0 else 1.0
      test = "paired t"
    rows[name] = {"jax": p1, "torch": p2, "diff": p2 - p1, "se": se, "n": n, "differ": differ, "p": p,
                  "test": test}
  tested = [k for k, r in rows.items() if r["differ"]]
  threshold = level / max(len(tested), 1)
  for r in rows.values():
    r["agree"] = r["p"] >= threshold
  return {"rows": rows, "threshold": threshold, "level": level, "num_tested": len(tested),
          "all_agree": all(r["agree"] for r in rows.values())}


# ---------------------------------------------------------------------------------------------- report


def _fmt_s(v) -> str:
  return "-" if v is None else f"{v:.2f}"


def _ratio(t, j) -> str:
  return "-" if t is None or j is None or j <= 0 else f"{t / j:.2f}x"


def timing_table(jt: dict[str, Any] | None, tt: dict[str, float]) -> str:
  """Markdown table of stage seconds and the torch / jax ratio (> 1: certssb-jax is faster)."""
  jt = jt or {}
  rows = [
      ("train (M models)", jt.get("train"), tt["train"]),
      ("train, JAX without first-chunk compile", jt.get("train_without_compile"), tt["train"]),
      ("certify (clean + triggered)", jt.get("certify"), tt["certify"]),
      ("certify, JAX without first-chunk compiles", jt.get("certify_without_compile"), tt["certify"]),
      ("total (train + certify)", jt.get("train_plus_certify"), tt["total"]),
      ("total, JAX without compiles", jt.get("train_plus_certify_without_compile"), tt["total"]),
  ]
  lines = ["| stage | certssb-jax (s) | PyTorch baseline (s) | torch / jax |", "|---|---:|---:|---:|"]
  for name, j, t in rows:
    lines.append(f"| {name} | {_fmt_s(j)} | {_fmt_s(t)} | {_ratio(t, j)} |")
  return "\n".join(lines)


def breakdown_table(jt: dict[str, Any] | None, tt: dict[str, float], steps: int, num_models: int) -> str:
  """Where the time goes, per side."""
  lines = ["| part | seconds |", "|---|---:|"]
  if jt:
    st = jt["stage_timings"]
    lines += [f"| jax: {k} stage | {v:.2f} |" for k, v in st.items()]
    lines.append(f"| jax: whole pipeline.run (wall) | {jt['pipeline_wall']:.2f} |")
    if "train_first_chunk" in jt:
      lines += [
          f"| jax: first training chunk ({jt['models_per_chunk']} model(s), incl. compile) | "
          f"{jt['train_first_chunk']:.2f} |",
          f"| jax: later training chunks, mean | {jt['train_per_chunk']:.3f} |",
          f"| jax: ms per model-step (steady state) | {jt['train_ms_per_model_step']:.2f} |",
      ]
      for name in jt["certify_first_chunk"]:
        lines.append(f"| jax: {name}: first chunk (incl. compile) / later chunks, mean | "
                     f"{jt['certify_first_chunk'][name]:.2f} / {jt['certify_per_chunk'][name]:.3f} |")
    if "restore_all_chunks" in jt:
      lines += [f"| jax: Orbax restore of all {jt['num_chunks']} chunks (measured after the run) | "
                f"{jt['restore_all_chunks']:.2f} |",
                f"| jax: Orbax save of one chunk (measured after the run) | {jt['save_one_chunk']:.3f} |"]
  if jt and "loadavg_before_after" in jt:
    lines.append(f"| jax: 1-min load average before / after | {jt['loadavg_before_after'][0]:.2f} / "
                 f"{jt['loadavg_before_after'][1]:.2f} |")
  lines.append(f"| torch: 1-min load average before / after | {tt['loadavg_before_after'][0]:.2f} / "
               f"{tt['loadavg_before_after'][1]:.2f} |")
  for k in ("train_noise", "train_steps", "train_save", "certify_load", "certify_forward"):
    lines.append(f"| torch: {k} | {tt[k]:.2f} |")
  lines.append(f"| torch: ms per model-step | {1e3 * tt['train_steps'] / (num_models * steps):.2f} |")
  return "\n".join(lines)


def agreement_table(agr: dict[str, Any]) -> str:
  lines = ["| metric (N inputs) | certssb-jax | PyTorch | torch - jax | SE of diff | test | p | agree |",
           "|---|---:|---:|---:|---:|---|---:|:---:|"]
  for name, r in agr["rows"].items():
    lines.append(f"| {name} (N={r['n']}) | {r['jax']:.4f} | {r['torch']:.4f} | {r['diff']:+.4f} | {r['se']:.4f} | "
                 f"{r['test']} | {r['p']:.3g} | {'yes' if r['agree'] else 'NO'} |")
  return "\n".join(lines)


def versions() -> dict[str, str]:
  import torch  # pylint: disable=g-import-not-at-top

  out = report.versions()
  out["torch"] = torch.__version__
  out["torch_threads"] = str(torch.get_num_threads())
  out["platform"] = platform.platform()
  out["cpu_count"] = str(os.cpu_count())
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="config file[:variant], as for certssb_jax.launch")
  parser.add_argument("--workdir", required=True, help="output folder (jax/ and torch/ runs, compare.md/json)")
  parser.add_argument("--skip-jax", action="store_true", help="do not run certssb-jax (reuse WORKDIR/jax if there)")
  parser.add_argument("--num-models", type=int, default=None, help="override train.num_models (M)")
  parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
  parser.add_argument("--torch-threads", type=int, default=None, help="PyTorch threads (default: os.cpu_count())")
  parser.add_argument("--step-repeats", type=int, default=10,
                      help="rounds of the interleaved per-step training benchmark (0: skip it)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
  logger.setLevel(logging.INFO)

  config = benchmark_config(args.config, args.num_models, args.epochs)
  os.makedirs(args.workdir, exist_ok=True)
  jax_dir = os.path.join(args.workdir, "jax")
  result: dict[str, Any] = {"config": args.config, "num_models": config.train.num_models,
                            "epochs": config.train.epochs, "sigma_0": config.sigma.sigma_0,
                            "alpha": config.certify.alpha, "bound": config.certify.bound,
                            "correction": config.certify.correction, "versions": versions()}

  jax_side = None
  if not args.skip_jax:
    logger.info("running certssb-jax (fixed sigma, %d models, %d epochs) in %s", config.train.num_models,
                config.train.epochs, jax_dir)
    load_before = os.getloadavg()
    jax_side = run_jax(config, jax_dir)
    jax_side["timings"]["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    with open(os.path.join(args.workdir, "jax_timings.json"), "w") as f:
      json.dump(jax_side["timings"], f, indent=1)
  elif os.path.exists(os.path.join(jax_dir, "votes.npz")):
    try:
      rundir.check_config(jax_dir, config_lib.resolve(config))  # refuses a run with another config
    except rundir.ConfigMismatchError as e:
      raise SystemExit(f"--skip-jax: {jax_dir} holds a certssb-jax run with another config ({e}); run without "
                       "--skip-jax to redo it") from e
    timings_path = os.path.join(args.workdir, "jax_timings.json")
    jax_side = {"summary": json.load(open(os.path.join(jax_dir, "summary.json"))),
                "timings": json.load(open(timings_path)) if os.path.exists(timings_path) else None}
    logger.info("reusing the certssb-jax run in %s", jax_dir)

  setup = make_setup(config, jax_dir)  # the same data and poisoning as the pipeline (deterministic in the config)
  a = setup.attacked
  n = len(a.y_train)
  t = config.train
  base = torch_baseline.BaselineConfig(num_models=t.num_models, epochs=t.epochs, batch_size=t.batch_size,
                                       learning_rate=t.learning_rate, sigma=config.sigma.sigma_0, seed=config.seed,
                                       certify_batch_size=config.certify.batch_size)
  torch_dir = os.path.join(args.workdir, "torch")
  shutil.rmtree(torch_dir, ignore_errors=True)
  logger.info("running the PyTorch baseline (%d models one by one) in %s", t.num_models, torch_dir)
  load_before = os.getloadavg()
  tb = torch_baseline.run_baseline(a.x_train, a.y_train, {sp: a.splits[sp].x for sp in SPLITS},
                                   a.data.num_classes, base, torch_dir, num_threads=args.torch_threads)
  tb.timings_s["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
  result["torch"] = {"timings": tb.timings_s}
  sb = None
  if args.step_repeats > 0:
    logger.info("interleaved per-step benchmark (%d rounds)", args.step_repeats)
    sb = step_benchmark(setup, args.step_repeats, args.torch_threads)
    result["step_benchmark"] = sb

  torch_out = outcomes(setup, {sp: {"preds": tb.preds[sp], "probs_sum": tb.probs_sum[sp]} for sp in SPLITS})
  steps = t.epochs * (n // t.batch_size)
  sections = [f"## certssb-jax vs PyTorch baseline: {args.config}, M = {t.num_models}, {t.epochs} epochs, "
              f"sigma = {config.sigma.sigma_0} (fixed), {n} train / {len(a.splits['clean'].y)} clean / "
              f"{len(a.splits['triggered'].y)} triggered test inputs",
              "",
              "### Stage times",
              "",
              timing_table(jax_side and jax_side["timings"], tb.timings_s),
              "",
              "### Where the time goes",
              "",
              breakdown_table(jax_side and jax_side["timings"], tb.timings_s, steps, t.num_models)]
  if sb is not None:
    sections += ["", step_table(sb)]
  if jax_side is not None:
    jax_out = outcomes(setup, load_jax_votes(jax_dir))
    s = jax_side["summary"]["metrics"]
    if not math.isclose(s["clean_accuracy"], float(jax_out["clean accuracy"].mean())):
      raise RuntimeError("recomputed JAX clean accuracy differs from the pipeline's summary")
    agr = agreement(jax_out, torch_out)
    result["jax"] = {"timings": jax_side["timings"]}
    result["agreement"] = agr
    sections += ["", f"### Certified accuracies from each side's votes (alpha = {config.certify.alpha}, "
                 f"{config.certify.bound}, {config.certify.correction}; CRA on the joint radius)", "",
                 agreement_table(agr), "",
                 ("**The two implementations agree within sampling error**" if agr["all_agree"] else
                  "**The two implementations DISAGREE beyond sampling error**") +
                 (": every metric is identical on every input. " if agr["num_tested"] == 0 else
                  f": exact McNemar test on the paired per-input 0/1 outcomes (paired t-test for the mean radius), "
                  f"two-sided, Bonferroni level {agr['level']} / {agr['num_tested']} metrics whose per-input "
                  f"values differ anywhere = {agr['threshold']:.3g} (metrics identical on every input agree "
                  "trivially). ") +
                 "The inputs share the M models, so their outcomes are correlated and the test is approximate; the "
                 "draws (noise, init, batch order) differ between the two sides, so exact equality is not expected."]
  else:
    sections += ["", "(certssb-jax was not run: --skip-jax and no earlier run in WORKDIR/jax)"]
    result["torch"]["metrics"] = {k: float(v.mean()) for k, v in torch_out.items()}
  v = result["versions"]
  sections += ["", f"python {v['python']}, jax {v['jax']}, flax {v['flax']}, torch {v['torch']} "
               f"({v['torch_threads']} threads), {v['cpu_count']} CPUs, {v['platform']}"]
  text = "\n".join(sections) + "\n"
  print(text)
  with open(os.path.join(args.workdir, "compare.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "compare.json"), "w") as f:
    json.dump(result, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
  return result


if __name__ == "__main__":
  main()
