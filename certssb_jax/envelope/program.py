"""The envelope study, ``python -m certssb_jax.studies envelope`` (what it writes: the package's docstring).

``run_envelope`` trains or reuses RAB at every sigma of the grid and the Cert-SSB designs asked for (one
``sweep`` folder), builds the grid selector's rows from RAB's votes, compares every design with RAB's envelope
and writes the section's plots, tables and JSON; ``main`` runs it for every ``--config`` and writes the results
page.
"""
from __future__ import annotations

import os
from typing import Any

from absl import flags

from certssb_jax import files, sweep
from certssb_jax.data.attacked import SPLITS
from certssb_jax.ensemble import trainer
from certssb_jax.envelope import answers, comparison, figures, pages
from certssb_jax.experiment import cli, config as config_lib

PAPER_SIGMAS = (0.12, 0.25, 0.5, 1.0)


def run_envelope(spec: str, workdir: str, sigmas: list[float], designs: list[str],
                 selector_models: list[int] | None = None, progress=None) -> dict[str, Any]:
  """Trains or reuses every row, compares, and writes ``envelope.md``, ``envelope.json`` and the plots.

  Args:
    spec: the config (``path.py[:variant]``); RAB runs at every sigma of ``sigmas`` on it.
    workdir: the folder of every row (a sweep folder: rows of earlier sweeps are reused).
    sigmas: RAB's grid.
    designs: variants of ``spec`` run as Cert-SSB rows (``sigma.sigma_hi=0.375``), each its own row.
    selector_models: M_s of the grid selector, one design per value; None: [M // 8] (at least 1); []: none.

  Returns:
    {"markdown": the section's text, "json": path, "plots": [paths], "result": the comparison (with its
    title, context and RAB's folders), "key": the section's name (pair, seed and M)}.
  """
  from certssb_jax.experiment import pipeline  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  trainers = trainer.Trainers()
  rab_runs = {r["sigma_0"]: r["workdir"] for r in sweep.run_grid([spec], workdir, None, sigmas, ["rab"], progress,
                                                                  trainers)}
  searched = []
  for variant in designs:
    base, _, arg = spec.partition(":")
    searched += sweep.run_grid([f"{base}:{arg},{variant}" if arg else f"{base}:{variant}"], workdir, None, None,
                               ["cert_ssb"], progress, trainers)
  rab = [answers.answers_of_run(d) for d in rab_runs.values()]
  rows = [answers.answers_of_run(r["workdir"]) for r in searched]
  cfg = config_lib.resolve(config_lib.load_config(spec))
  m = cfg.train.num_models
  selector_models = [max(1, m // 8)] if selector_models is None else selector_models
  same = []
  if selector_models:
    splits = pipeline.test_splits(cfg, pipeline.load_data(cfg))
    x = {s: splits[s].x for s in SPLITS}
    for m_s in selector_models:
      rows.append(answers.grid_selector(rab_runs, x, m_s))
      same += answers.same_voters(rab_runs, x, m_s)
  result = comparison.compare(rab, rows, cfg.attack.target_class, same=same)
  pair = "-".join(str(c) for c in cfg.data.classes)
  title = (f"{cfg.data.name} {tuple(cfg.data.classes)}, {cfg.attack.trigger} trigger, seed {cfg.seed}, M = {m}, "
           f"alpha = {cfg.certify.alpha:g}")
  context = (f"{cfg.data.name} classes {tuple(cfg.data.classes)} (target {cfg.attack.target_class}), "
             f"{cfg.attack.trigger} trigger of norm {cfg.attack.delta:g}, poison rate {cfg.attack.poison_rate:g}, "
             f"seed {cfg.seed}; RAB trained and tested at each sigma with M = {m} voting models; the grid selector "
             f"(M_s = {', '.join(map(str, selector_models)) or 'none'}) holds out M_s models of each ensemble to "
             f"choose sigma_x and votes with the other M - M_s; alpha = {cfg.certify.alpha:g}, {cfg.certify.bound}; "
             f"{len(rab[0].label['clean'])} clean and {len(rab[0].label['triggered'])} triggered test inputs.")
  result.update(title=title, context=context, pair=pair, rab_runs={f"{s:g}": d for s, d in rab_runs.items()})
  md = pages.markdown(title, result, context)
  # one name per pair, seed and M: the figures of another size of the same pair are other files
  name = f"{cfg.data.name}_{pair}_{cfg.attack.trigger}_seed{cfg.seed}_M{m}"
  paths = [os.path.join(workdir, f"envelope_{name}.png"), os.path.join(workdir, f"attack_{name}.png")]
  figures.plot_envelope(paths[0], title, result)
  figures.plot_attack(paths[1], title, result)
  files.atomic_write_bytes(os.path.join(workdir, f"envelope_{name}.md"), md.encode())
  files.save_json(os.path.join(workdir, f"envelope_{name}.json"), result)
  return {"markdown": md, "json": os.path.join(workdir, f"envelope_{name}.json"), "plots": paths, "result": result,
          "key": name}


# ---------------------------------------------------------------------------------------------- command line


def define_flags() -> None:
  """The study's own flags (``studies`` defines the common ones), defined only by the program that runs."""
  flags.DEFINE_multi_string("sigmas", [",".join(f"{s:g}" for s in PAPER_SIGMAS)],
                            "RAB's sigma grid, comma-separated; add every sigma a design tests at. Once for every "
                            "--config, or once per --config in the same order.")
  flags.DEFINE_multi_string("design", [], "A Cert-SSB design as a config variant (e.g. sigma.sigma_hi=0.375).")
  flags.DEFINE_list("selector_models", None, "Models of each RAB ensemble that choose the grid selector's "
                                             "sigma_x (never voting), one design per value; default M // 8; 0: none.")


def _grid(text: str) -> list[float]:
  try:
    grid = sorted({float(v) for v in text.split(",") if v.strip()})
  except ValueError:
    raise ValueError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
  if not grid or grid[0] <= 0:
    raise ValueError(f"--sigmas must be positive numbers, got {text!r}")
  return grid


def main() -> None:
  f = flags.FLAGS
  cli.require(config=f.config, workdir=f.workdir)
  if len(f.sigmas) not in (1, len(f.config)):
    raise ValueError(f"--sigmas is given {len(f.sigmas)} times for {len(f.config)} configs: give it once or once "
                     "per --config")
  grids = [_grid(text) for text in f.sigmas] * (len(f.config) if len(f.sigmas) == 1 else 1)
  selector = None if f.selector_models is None else [int(v) for v in f.selector_models if int(v) > 0]
  progress = cli.progress(f.progress)
  sections = [run_envelope(spec, f.workdir, grid, f.design, selector, progress) for spec, grid in zip(f.config, grids)]
  if f.results_md:
    command = "python -m certssb_jax.studies envelope " + " ".join(
        [f"--config {c}" for c in f.config] + [f"--workdir {f.workdir}"] + [f"--sigmas {g}" for g in f.sigmas]
        + [f"--design {d}" for d in f.design]
        + ([f"--selector_models {','.join(f.selector_models)}"] if f.selector_models is not None else [])
        + [f"--results_md {f.results_md}"])
    pages.write_results_page(f.results_md, sections, command)
  for sec in sections:
    print(sec["markdown"])
    print("\n".join(sec["plots"]))
