"""Certified poisoning defenses of both families side by side, on the same data, attack and seed.

  python -m certssb_jax.families --config configs/fashion_mnist.py:num_models=32 --workdir runs/families \\
      --results_md docs/families.md

trains (or resumes) RAB and Cert-SSB (``launch --compare_modes`` into ``workdir/fixed`` and
``workdir/sample_specific``), DPA (``workdir/dpa``) and bagging (``workdir/bagging``), and writes one table and one
plot: clean accuracy, ERA and ASR (certified and majority vote), each family's own certificate, the certified
accuracy against the number of poisoned training images, and the training time per member.

The poison axis is not the same threat for both families: DPA and bagging certify k training samples modified
at will (image and label); RAB and Cert-SSB certify k training images carrying a trigger of the attack's l2 norm
with their labels unchanged, and the triggered test input (``docs/method.md`` section 3).
"""

from __future__ import annotations

import csv
import os
import shutil
from typing import Any

from absl import flags
import numpy as np

from certssb_jax import files
from certssb_jax.run import cli

ROWS = (("fixed", {}), ("sample_specific", {}), ("dpa", {"defense.name": "dpa"}),
        ("bagging", {"defense.name": "bagging"}))
POISON_GRID = (0, 1, 2, 4, 8, 16, 32)


def run_families(spec: str, workdir: str, counting: dict[str, str], progress: Any) -> list[dict[str, Any]]:
  """Runs (or resumes) the four rows; returns their summaries with the folder of each."""
  from certssb_jax.ensemble import trainer as ensemble  # pylint: disable=g-import-not-at-top
  from certssb_jax.run import config as config_lib, pipeline  # pylint: disable=g-import-not-at-top

  base, trainers = config_lib.load_config(spec), ensemble.Trainers()
  pipeline.compare_modes(base, workdir, progress=progress, trainers=trainers)  # RAB and Cert-SSB share models
  out = []
  for name, overrides in ROWS:
    d = os.path.join(workdir, name)
    if overrides:
      c = config_lib.apply_overrides(base.copy_and_resolve_references(), {**overrides, **counting})
      pipeline.run(c, d, progress=progress, trainers=trainers)
    out.append({"row": name, "workdir": d, "summary": files.load_json(os.path.join(d, "summary.json"))})
    out[-1]["budgets"] = clean_budgets(out[-1])
  return out


def clean_budgets(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(certified number of poisoned training images, whether the answer is right) of every clean test input of a
  row, from its per_sample.csv: a smoothing run's store answers and poison budget, a counting run's vote and
  certified count (-1: not certified)."""
  with open(os.path.join(row["workdir"], "per_sample.csv")) as f:
    rows = [r for r in csv.DictReader(f) if r["split"] == "clean"]
  counting = row["summary"].get("family") == "counting"
  budget = np.array([int(r["certified_poisons" if counting else "poison_budget"]) for r in rows], np.int64)
  pred = np.array([int(r["pred" if counting else "pred_stored"]) for r in rows])
  return budget, pred == np.array([int(r["label"]) for r in rows])


def _budget_at(row: dict[str, Any], k: int) -> float:
  budget, correct = row["budgets"]
  return float(np.mean(correct & (budget >= k)))


def _certificate(summary: dict[str, Any]) -> str:
  if summary.get("family") == "counting":
    return "modified samples (any image, any label)"
  return f"l2 radius; poisons: trigger of norm {summary['delta']:g}, labels kept"


def _member_time(summary: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
  t = summary["timings_s"].get("train_ensemble")
  if not t and summary["method"] == "Cert-SSB":  # its models are RAB's, linked
    t = next(r["summary"]["timings_s"].get("train_ensemble") for r in rows if r["row"] == "fixed")
  return t / summary["num_models"] if t else None


def markdown(rows: list[dict[str, Any]], command: str) -> str:
  s0 = rows[0]["summary"]
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  lines = [f"## {s0['dataset']} classes {tuple(s0['classes'])}: every family", "",
           f"{s0['trigger']} trigger of norm {s0['delta']:g}, {s0['n_poisoned']} of {s0['n_train']} training images "
           f"poisoned (labels set to the target {s0['target_class']}), seed {s0['seed']}; {s0['n_test']} clean and "
           f"{s0['n_triggered']} triggered test inputs. Written by", "", "```", command, "```", "",
           "| method | members | certificate | clean acc | ERA / ASR | majority ASR | "
           + " | ".join(f"k={k}" for k in POISON_GRID[1:]) + " | s / member |",
           "|" + "---|" * (7 + len(POISON_GRID) - 1)]
  for r in rows:
    s, m = r["summary"], r["summary"]["metrics"]
    t = _member_time(s, rows)
    setting = (f" sigma={s['sigma_0']:g}" if s.get("family", "smoothing") == "smoothing" else
               f" bags of {s['n_train'] // s['num_models']}" if s["method"] == "bagging" else "")
    lines.append(f"| {s['method']}{setting} | {s['num_models']} | {_certificate(s)} | {fmt(m['clean_accuracy'])} | "
                 f"{fmt(m['era'])} / {fmt(m['asr'])} | {fmt(s['majority']['asr'])} | "
                 + " | ".join(f"{_budget_at(r, k):.3f}" for k in POISON_GRID[1:])
                 + f" | {'-' if t is None else f'{t:.1f}'} |")
  lines += ["", "k: certified accuracy of the clean test inputs against k poisoned training images. clean acc, ERA "
                "and ASR are the certified answers (an abstention counts as an error); the majority vote is the "
                "ensemble's plain vote. Cert-SSB's row is its default, which answers at sigma_0 (RAB's numbers). "
                f"s / member: training time of one member on {s0['devices'][0]} ({len(s0['devices'])} device(s)), "
                f"jax {s0['versions'].get('jax')}, flax {s0['versions'].get('flax')}.", ""]
  return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  from certssb_jax.run import report  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  curves = [report.budget_curve(*r["budgets"]) for r in rows]
  right = max(POISON_GRID[-1], *(int(ks[-1]) for ks, _ in curves))
  for r, (ks, acc), color in zip(rows, curves, ("C0", "C1", "C2", "C3")):
    s = r["summary"]
    ax.step(np.append(ks, right), np.append(acc, acc[-1]), where="post", color=color, lw=1.6,
            ls="--" if s["method"] == "Cert-SSB" else "-", label=f"{s['method']} (M={s['num_models']})")
  ax.set_xscale("symlog", linthresh=1.0)
  ax.set_xlim(0, right)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("poisoned training images k")
  ax.set_ylabel("certified accuracy (clean test inputs)")
  s0 = rows[0]["summary"]
  ax.set_title(f"{s0['dataset']} {tuple(s0['classes'])}: certified accuracy against k poisons", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_page(path: str, rows: list[dict[str, Any]], command: str, workdir: str) -> None:
  """The page (e.g. docs/families.md) with its figure under figures/ beside it."""
  s0 = rows[0]["summary"]
  name = f"families_{s0['dataset']}_{'-'.join(str(c) for c in s0['classes'])}.png"
  plot(rows, os.path.join(workdir, name))
  folder = os.path.join(os.path.dirname(os.path.abspath(path)), "figures")
  os.makedirs(folder, exist_ok=True)
  shutil.copyfile(os.path.join(workdir, name), os.path.join(folder, name))
  page = ["# Certified poisoning defenses side by side", "",
          "Written by the command below from the run folders; do not edit by hand. The poison axis is not the "
          "same threat for both families: DPA and bagging certify k training samples modified at will (image and "
          "label); RAB and Cert-SSB certify k training images carrying a trigger of the attack's norm with their "
          "labels unchanged, with the test input triggered too (docs/method.md section 3).", "",
          markdown(rows, command), f"![{name}](figures/{name})", ""]
  files.atomic_write_bytes(path, "\n".join(page).encode())


def _define_flags() -> None:
  flags.DEFINE_string("config", None, "Config file with optional :variant (the smoothing rows' settings).")
  flags.DEFINE_string("workdir", None, "Folder of the four rows.")
  flags.DEFINE_integer("counting_models", 50, "DPA's partitions and bagging's members.")
  flags.DEFINE_integer("counting_epochs", 50, "Epochs of a DPA or bagging member (it sees n / members samples).")
  flags.DEFINE_integer("counting_batch_size", 32, "Batch of a DPA or bagging member.")
  flags.DEFINE_string("results_md", None, "Also write this page (e.g. docs/families.md).")
  flags.DEFINE_bool("progress", True, "Show progress bars.")


def main() -> None:
  f = flags.FLAGS
  cli.require(config=f.config, workdir=f.workdir)
  if min(f.counting_models, f.counting_epochs, f.counting_batch_size) < 1:
    raise ValueError("--counting_models, --counting_epochs and --counting_batch_size must be >= 1")
  counting = {"train.num_models": str(f.counting_models), "train.epochs": str(f.counting_epochs),
              "train.batch_size": str(f.counting_batch_size), "undefended.enabled": "False"}
  rows = run_families(f.config, f.workdir, counting, cli.progress(f.progress))
  command = (f"python -m certssb_jax.families --config {f.config} --workdir {f.workdir} --counting_models "
             f"{f.counting_models} --counting_epochs {f.counting_epochs} --counting_batch_size "
             f"{f.counting_batch_size}" + (f" --results_md {f.results_md}" if f.results_md else ""))
  if f.results_md:
    write_page(f.results_md, rows, command, f.workdir)
  print(markdown(rows, command))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
