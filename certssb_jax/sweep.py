r"""The paper's comparison table: a grid of runs (config x trigger x sigma_0 x sigma_mode) into one folder.

Every row is an ordinary run in ``WORKDIR/<dataset>/<trigger>_sigma<sigma_0>_<mode>``; rows already finished
(their ``summary.json`` exists) are reused and a partly finished row resumes like any run. The table has RAB
(fixed sigma) and Cert-SSB (sample-specific sigma) side by side: clean accuracy, CRA at each radius of the grid,
ERA and ASR; it is written as ``table.md`` and ``table.csv``, with one plot per data set.

  python -m certssb_jax.sweep --configs configs/mnist.py --workdir runs/sweep_mnist
  python -m certssb_jax.sweep --configs configs/mnist.py:quick,configs/cifar10.py:quick --triggers onepixel \
      --sigma_0 0.25 --workdir /tmp/sweep_quick
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
from typing import Any

from absl import app
from absl import flags

from certssb_jax import bounds
from certssb_jax import config as config_lib
from certssb_jax import workdir as wd

PAPER_SIGMAS = {"mnist": (0.12, 0.25, 0.5, 1.0), "cifar10": (0.12, 0.25, 0.5, 1.0), "imagenette": (0.25, 0.5, 1.0)}
MODE_NAMES = {"fixed": "RAB", "sample_specific": "Cert-SSB"}


def row_dir(workdir: str, dataset: str, trigger: str, sigma_0: float, mode: str) -> str:
  return os.path.join(workdir, dataset, f"{trigger}_sigma{sigma_0:g}_{mode}")


def run_grid(configs: list[str], workdir: str, triggers: list[str], sigmas: list[float] | None, modes: list[str],
             progress=None) -> list[dict[str, Any]]:
  """Runs (or reuses) every row of the grid; returns one record per row."""
  from certssb_jax import pipeline  # pylint: disable=g-import-not-at-top

  progress = progress or pipeline.no_progress
  records = []
  for spec in configs:
    base = config_lib.load_config(spec)
    dataset = base.data.name
    for trigger in triggers:
      for sigma_0 in (sigmas or PAPER_SIGMAS.get(dataset, (base.sigma.sigma_0,))):
        for mode in modes:
          c = base.copy_and_resolve_references()
          c.attack.trigger = trigger
          c.sigma.sigma_0 = float(sigma_0)
          c.sigma.mode = mode
          config_lib.validate_config(c)
          d = row_dir(workdir, dataset, trigger, float(sigma_0), mode)
          path = os.path.join(d, "summary.json")
          if os.path.exists(path) and wd.load_json(os.path.join(d, "config.json")) == pipeline.jsonable(c.to_dict()):
            logging.info("reusing finished row %s", d)
            summary = wd.load_json(path)
          else:
            logging.info("running row %s", d)
            summary = pipeline.run(c, d, progress=progress)
          records.append({"config": spec, "dataset": dataset, "trigger": trigger, "sigma_0": float(sigma_0),
                          "mode": mode, "workdir": d, "summary": summary})
  return records


def table(records: list[dict[str, Any]]) -> tuple[str, str]:
  """(markdown, csv) of the grid: one line per (dataset, trigger, sigma_0), RAB and Cert-SSB side by side."""
  radii = [str(float(r)) for r in bounds.CRA_GRID]
  modes = [m for m in MODE_NAMES if any(r["mode"] == m for r in records)]
  cols = ["clean_acc"] + [f"CRA@{r}" for r in radii] + ["ERA", "ASR"]
  header = ["dataset", "trigger", "sigma_0"] + [f"{MODE_NAMES[m]} {col}" for m in modes for col in cols]
  keyed = {(r["dataset"], r["trigger"], r["sigma_0"], r["mode"]): r["summary"] for r in records}
  lines = []
  for ds, trig, sig in dict.fromkeys((r["dataset"], r["trigger"], r["sigma_0"]) for r in records):
    row = [ds, trig, f"{sig:g}"]
    for m in modes:
      s = keyed.get((ds, trig, sig, m))
      if s is None:
        row += ["-"] * len(cols)
        continue
      met = s["metrics"]
      row += [f"{met['clean_accuracy']:.3f}"] + [f"{met['cra'][r]:.3f}" for r in radii] + \
             [f"{met['era']:.3f}", f"{met['asr']:.3f}"]
    lines.append(row)
  md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(l) + " |" for l in lines]
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(header)
  w.writerows(lines)
  return "\n".join(md) + "\n", buf.getvalue()


def plot(records: list[dict[str, Any]], workdir: str) -> list[str]:
  """One figure per data set: CRA(r) of every row (solid RAB, dashed Cert-SSB)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  paths = []
  for ds in dict.fromkeys(r["dataset"] for r in records):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in records if r["dataset"] == ds]
    keys = list(dict.fromkeys((r["trigger"], r["sigma_0"]) for r in rows))
    for i, r in enumerate(rows):
      cra = r["summary"]["metrics"]["cra"]
      color = f"C{keys.index((r['trigger'], r['sigma_0'])) % 10}"
      ax.plot([float(k) for k in cra], list(cra.values()), color=color, ls="-" if r["mode"] == "fixed" else "--",
              marker=".", label=f"{MODE_NAMES[r['mode']]} {r['trigger']} sigma_0={r['sigma_0']:g}")
    ax.set_xlabel("joint l2 radius r")
    ax.set_ylabel("certified robust accuracy")
    ax.set_title(ds)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, f"cra_{ds}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def sweep(configs: list[str], workdir: str, triggers: list[str], sigmas: list[float] | None, modes: list[str],
          progress=None) -> dict[str, str]:
  """Runs the grid and writes ``table.md``, ``table.csv`` and the plots. Returns the paths."""
  os.makedirs(workdir, exist_ok=True)
  records = run_grid(configs, workdir, triggers, sigmas, modes, progress)
  md, csv_text = table(records)
  wd.atomic_write_bytes(os.path.join(workdir, "table.md"), md.encode())
  wd.atomic_write_bytes(os.path.join(workdir, "table.csv"), csv_text.encode())
  plots = plot(records, workdir)
  return {"table_md": os.path.join(workdir, "table.md"), "table_csv": os.path.join(workdir, "table.csv"),
          "plots": ", ".join(plots)}


def _define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so importing this module next to
  ``certssb_jax.launch``, which has flags of the same names, is fine)."""
  flags.DEFINE_list("configs", None, "Config files (with optional :variant), comma-separated.")
  flags.DEFINE_string("workdir", None, "Folder of the whole sweep.")
  flags.DEFINE_list("triggers", ["onepixel", "fourpixel", "blending"], "Triggers of the grid.")
  flags.DEFINE_list("sigma_0", None, "Base sigmas of the grid (default: the paper's for each data set).")
  flags.DEFINE_list("sigma_modes", ["fixed", "sample_specific"], "sigma modes of the grid.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not f.configs or not f.workdir:
    raise app.UsageError("--configs and --workdir are required")
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("certssb_jax").setLevel(logging.INFO)
  from certssb_jax import pipeline  # pylint: disable=g-import-not-at-top

  sigmas = [float(s) for s in f.sigma_0] if f.sigma_0 else None
  try:
    paths = sweep(f.configs, f.workdir, f.triggers, sigmas, f.sigma_modes,
                  pipeline.tqdm_progress if f.progress else None)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(open(paths["table_md"]).read())
  for k, v in paths.items():
    print(f"{k}: {v}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
