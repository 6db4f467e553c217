r"""Certified poisoning defenses of both families at equal ensemble sizes, each at its best setting.

  python -m certssb_jax.families --config configs/fashion_mnist.py --workdir runs/families --sizes 32,64,128 \
      --sigmas 0.25,0.5,1,2 --results_md docs/families.md

For every ensemble size M of ``--sizes`` it trains (or reuses) on the same data, attack and seed:

* RAB at every sigma of ``--sigmas`` (the rows of ``sweep``; a smaller M reuses the first M models of a larger);
* DPA with k = M parts, partitioned by sample (image and label: insertions and deletions) and by position (the
  training set's size fixed: modifications);
* bagging with M members at every bag size ``f * n / M`` for f in ``--bag_fractions``;

and writes one table and one figure: certified accuracy of the clean test inputs against k changed training
samples, each family at its best setting for each k (RAB: its envelope over sigma; DPA: over the partition;
bagging: over the bag size), at the attack's trigger norm and at a smaller one.

The axis is not one threat. DPA and bagging count training samples modified at will (image and label); RAB counts
training images that carry a trigger of l2 norm at most t with their labels kept, plus the triggered test input
(its poison budget, ``certify.bounds.poison_budget``), which depends on t. DPA's counts are exact; bagging's and
RAB's each hold with probability 1 - alpha.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

from absl import flags
import numpy as np

from certssb_jax import files
from certssb_jax.certify import bounds
from certssb_jax.run import cli

POISON_GRID = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
FAMILY_COLORS = {"RAB": "C0", "DPA": "C2", "bagging": "C3"}


@dataclasses.dataclass(frozen=True)
class Row:
  """One finished run of the study, read back from its folder.

  Attributes:
    method: "RAB", "DPA" or "bagging".
    setting: what was chosen within the family ("sigma=0.5", "by position", "s=375").
    num_models: M.
    workdir: the run folder.
    summary: its summary.json.
    correct: (N,) the certified answer on each clean test input is its label (an abstention is wrong).
    counts: (N,) modified training samples certified on each clean test input (-1: not certified), for a
      counting row; None for RAB.
    margin: (N,) RAB's margin (sigma units) and sigma: its sigma, for the poison budget at any trigger norm.
  """

  method: str
  setting: str
  num_models: int
  workdir: str
  summary: dict[str, Any]
  correct: np.ndarray
  counts: np.ndarray | None = None
  margin: np.ndarray | None = None
  sigma: float | None = None

  def budget(self, trigger_norm: float) -> np.ndarray:
    """(N,) the certified count of each clean answer; for RAB its poison budget at ``trigger_norm``."""
    if self.counts is not None:
      return self.counts
    return bounds.poison_budget(self.margin, self.sigma, self.sigma, trigger_norm)

  def accuracy(self, k: int, trigger_norm: float) -> float:
    return float(np.mean(self.correct & (self.budget(trigger_norm) >= k)))


def read_row(method: str, setting: str, workdir: str) -> Row:
  """A finished run as a Row, from its summary.json and per_sample.csv."""
  from certssb_jax import sweep  # pylint: disable=g-import-not-at-top

  summary = files.load_json(os.path.join(workdir, "summary.json"))
  clean = [r for r in sweep.read_rows(workdir) if r["split"] == "clean"]
  label = np.array([int(r["label"]) for r in clean])
  if summary.get("family") == "counting":
    counts = np.array([int(r["certified_modifications"]) for r in clean], np.int64)
    correct = (np.array([int(r["pred"]) for r in clean]) == label) & (counts >= 0)
    return Row(method, setting, summary["num_models"], workdir, summary, correct, counts=counts)
  pred = np.array([int(r["pred_stored"]) for r in clean])
  margin = np.array([float(r["margin_stored"]) for r in clean])
  return Row(method, setting, summary["num_models"], workdir, summary, pred == label, margin=margin,
             sigma=float(summary["sigma_0"]))


def run_rows(spec: str, workdir: str, sizes: list[int], sigmas: list[float], bag_fractions: list[float],
             counting: dict[str, str], progress: Any) -> list[Row]:
  """Runs (or reuses) every row of the study; returns them, read back from their folders."""
  from certssb_jax import sweep  # pylint: disable=g-import-not-at-top
  from certssb_jax.ensemble import trainer as ensemble  # pylint: disable=g-import-not-at-top
  from certssb_jax.run import config as config_lib, pipeline  # pylint: disable=g-import-not-at-top

  trainers = ensemble.Trainers()
  base = config_lib.load_config(spec)
  n_train = len(pipeline.load_data(config_lib.resolve(base)).y_train)
  rows = []
  for m in sorted(sizes, reverse=True):  # the largest first: the smaller RAB ensembles reuse its first models
    records = sweep.run_grid([spec], os.path.join(workdir, "rab"), None, sigmas, ["fixed"], progress,
                             trainers=trainers, overrides={"train.num_models": str(m)})
    rows += [read_row("RAB", f"sigma={r['sigma_0']:g}", r["workdir"]) for r in records]
    variants = [("DPA", f"by {key}", {"defense.name": "dpa", "defense.partition": key})
                for key in ("sample", "position")]
    variants += [("bagging", f"s={max(1, round(f * n_train / m))}",
                  {"defense.name": "bagging", "defense.bag_size": str(max(1, round(f * n_train / m)))})
                 for f in bag_fractions]
    for method, setting, overrides in variants:
      d = os.path.join(workdir, f"M{m}", f"{method}_{setting.replace(' ', '_').replace('=', '')}")
      c = config_lib.apply_overrides(config_lib.load_config(spec),
                                     {**counting, **overrides, "train.num_models": str(m)})
      if not os.path.exists(os.path.join(d, "summary.json")):
        pipeline.run(c, d, progress=progress, trainers=trainers)
      rows.append(read_row(method, setting, d))
  return rows


def best(rows: list[Row], method: str, m: int, k: int, trigger_norm: float) -> tuple[float, str]:
  """(certified accuracy, setting) of the family's best setting at k changes, ensemble size m."""
  cands = [(r.accuracy(k, trigger_norm), r.setting) for r in rows if r.method == method and r.num_models == m]
  return max(cands, key=lambda c: c[0]) if cands else (float("nan"), "-")


def largest(row: Row, trigger_norm: float) -> int:
  """The most any answer of the row can certify at this M (unanimous votes)."""
  s = row.summary
  if row.counts is not None:
    return int(s["largest_certificate"]["modifications"])
  ceiling = float(s["margin_ceiling"])
  return int(bounds.poison_budget(np.array([ceiling]), row.sigma, row.sigma, trigger_norm)[0])


def _fmt(v: float | None) -> str:
  return "-" if v is None or v != v else f"{v:.3f}"


def _kind(row: Row) -> str:
  if row.counts is None:
    return f"l2 trigger <= t on k images (labels kept) + test input; p >= 1 - {row.summary['alpha']:g}"
  what = "k modified samples (any image, label)"
  return f"{what}; exact" if row.summary["exact"] else f"{what}; p >= 1 - {row.summary['defense']['alpha']:g}"


def markdown(rows: list[Row], norms: tuple[float, float], command: str) -> str:
  """The page's tables: every row at every M, then each family's best setting for each k."""
  s0 = rows[0].summary
  grid = POISON_GRID[1:]
  lines = [f"## {s0['dataset']} classes {tuple(s0['classes'])}: every family at equal M", "",
           f"{s0['trigger']} trigger of norm {s0['delta']:g}; the attack poisons {s0['n_poisoned']} of "
           f"{s0['n_train']} training images (labels set to the target {s0['target_class']}), seed {s0['seed']}; "
           f"{s0['n_test']} clean and {s0['n_triggered']} triggered test inputs. Written by", "", "```", command,
           "```", ""]
  for m in sorted({r.num_models for r in rows}):
    at_m = [r for r in rows if r.num_models == m]
    lines += [f"### M = {m}", "",
              "| method | setting | certificate | largest k (t = " + f"{norms[0]:g} / {norms[1]:g})"
              + " | clean acc (majority) | clean acc | ERA / ASR | majority ASR | "
              + " | ".join(f"k={k}" for k in grid) + " | k=1, t=" + f"{norms[1]:g} | s / member |",
              "|" + "---|" * (10 + len(grid))]
    for r in at_m:
      s, met = r.summary, r.summary["metrics"]
      t = s["timings_s"].get("train_ensemble")
      per_member = "-" if not t else f"{t / s['num_models']:.1f}"
      lines.append(
          f"| {r.method} | {r.setting} | {_kind(r)} | {largest(r, norms[0])} / {largest(r, norms[1])} | "
          f"{_fmt(s['majority']['clean_accuracy'])} | {_fmt(met['clean_accuracy'])} | {_fmt(met['era'])} / "
          f"{_fmt(met['asr'])} | {_fmt(s['majority']['asr'])} | "
          + " | ".join(_fmt(r.accuracy(k, norms[0])) for k in grid)
          + f" | {_fmt(r.accuracy(1, norms[1]))} | {per_member} |")
    lines += ["", f"Each family at its best setting for each k (t = {norms[0]:g} for RAB; the setting that wins in "
                  "brackets):", "",
              "| family | " + " | ".join(f"k={k}" for k in grid) + " |", "|" + "---|" * (1 + len(grid))]
    for method in FAMILY_COLORS:
      cells = [best(rows, method, m, k, norms[0]) for k in grid]
      lines.append(f"| {method} | " + " | ".join(f"{_fmt(a)} ({s})" for a, s in cells) + " |")
    lines.append("")
  lines += [
      "k=...: certified accuracy of the clean test inputs against k changed training samples. For DPA and "
      "bagging a change is any modification of a sample's image and label (the training set's size fixed); "
      f"for RAB it is a training image carrying a trigger of l2 norm at most t = {norms[0]:g} (the attack's) with "
      "its label kept, the test input triggered too (its poison budget). Largest k: what unanimous votes certify "
      "at this M (DPA with k parts: k / 2 by position, k / 4 by sample; RAB: its margin ceiling's budget). clean acc, "
      "ERA and ASR: the certified answers (an abstention is an error); majority: the plain vote. DPA's counts are "
      "exact; bagging's and RAB's hold with probability 1 - alpha each. s / member: training time of one member on "
      f"{s0['devices'][0]}, jax {s0['versions'].get('jax')}.", ""]
  return "\n".join(lines)


def plot(rows: list[Row], norms: tuple[float, float], path: str) -> None:
  """One column per M, one row per trigger norm: each family's best certified accuracy at each k (the envelope
  over its settings), the attack's own poison count marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  sizes = sorted({r.num_models for r in rows})
  s0 = rows[0].summary
  ks = np.unique(np.round(np.logspace(0, np.log10(4 * s0["n_poisoned"]), 160)).astype(int))
  ks = np.concatenate([[0], ks])
  fig, axes = plt.subplots(2, len(sizes), figsize=(4.2 * len(sizes), 7.2), sharex=True, sharey=True, squeeze=False)
  for j, m in enumerate(sizes):
    for i, t in enumerate(norms):
      ax = axes[i, j]
      for method, color in FAMILY_COLORS.items():
        acc = [best(rows, method, m, int(k), t)[0] for k in ks]
        ax.step(ks, acc, where="post", color=color, lw=1.6, label=method)
      ax.axvline(s0["n_poisoned"], color="k", ls=":", lw=1.2, label=f"the attack: {s0['n_poisoned']} poisoned")
      ax.set_xscale("symlog", linthresh=1.0)
      ax.set_xlim(0, ks[-1])
      ax.set_ylim(-0.02, 1.02)
      ax.grid(alpha=0.3)
      ax.set_title(f"M = {m}, RAB's trigger norm t = {t:g}", fontsize=9)
      if j == 0:
        ax.set_ylabel("certified accuracy (clean test inputs)")
      if i == 1:
        ax.set_xlabel("changed training samples k")
  axes[0, 0].legend(fontsize=8, loc="lower left")
  fig.suptitle(f"{s0['dataset']} {tuple(s0['classes'])}, {s0['trigger']} trigger of norm {s0['delta']:g}: each "
               "family at its best setting for each k (DPA, bagging: any modification; RAB: a trigger of norm t, "
               "labels kept)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_page(path: str, rows: list[Row], norms: tuple[float, float], command: str, workdir: str) -> None:
  """The page (e.g. docs/families.md) with its figure under figures/ beside it."""
  s0 = rows[0].summary
  name = f"families_{s0['dataset']}_{'-'.join(str(c) for c in s0['classes'])}.png"
  plot(rows, norms, os.path.join(workdir, name))
  folder = os.path.join(os.path.dirname(os.path.abspath(path)), "figures")
  os.makedirs(folder, exist_ok=True)
  shutil.copyfile(os.path.join(workdir, name), os.path.join(folder, name))
  page = ["# Certified poisoning defenses side by side", "",
          "Written by the command below from the run folders; do not edit by hand. Every family runs on the same "
          "data, attack and seed with the same number of members M, each at its best setting for each k. The "
          "count axis is not one threat: DPA and bagging certify k training samples modified at will (image "
          "and label); RAB certifies k training images carrying a trigger of l2 norm at most t with their labels "
          "kept, with the test input triggered too (docs/method.md), so its count depends on t and is shown at "
          "the attack's norm and at a smaller one.", "",
          markdown(rows, norms, command), f"![{name}](figures/{name})", ""]
  files.atomic_write_bytes(path, "\n".join(page).encode())


def _define_flags() -> None:
  flags.DEFINE_string("config", None, "Config file with optional :variant (data, attack, seed, RAB's training).")
  flags.DEFINE_string("workdir", None, "Folder of every row.")
  flags.DEFINE_list("sizes", ["32", "64", "128"], "Ensemble sizes M (members of every family).")
  flags.DEFINE_list("sigmas", ["0.25", "0.5", "1", "2"], "RAB's sigmas (its envelope).")
  flags.DEFINE_list("bag_fractions", ["0.5", "1", "2"], "bagging's bag sizes, as fractions of n / M.")
  flags.DEFINE_integer("counting_epochs", 50, "Epochs of a DPA or bagging member (it sees about n / M samples).")
  flags.DEFINE_integer("counting_batch_size", 32, "Batch of a DPA or bagging member.")
  flags.DEFINE_float("small_norm", 0.1, "The smaller trigger norm t of RAB's second panel (the attack's is the first).")
  flags.DEFINE_string("results_md", None, "Also write this page (e.g. docs/families.md).")
  flags.DEFINE_bool("progress", True, "Show progress bars.")


def main() -> None:
  f = flags.FLAGS
  cli.require(config=f.config, workdir=f.workdir)
  try:
    sizes = [int(v) for v in f.sizes]
    sigmas = [float(v) for v in f.sigmas]
    fractions = [float(v) for v in f.bag_fractions]
  except ValueError as e:
    raise ValueError(f"--sizes, --sigmas and --bag_fractions take numbers (e.g. --sizes 32,64): {e}") from None
  if min(sizes + [f.counting_epochs, f.counting_batch_size]) < 1 or min(sigmas + fractions + [f.small_norm]) <= 0:
    raise ValueError("--sizes, --counting_epochs and --counting_batch_size must be >= 1, --sigmas, "
                     "--bag_fractions and --small_norm > 0 (e.g. --sizes 32,64)")
  counting = {"train.epochs": str(f.counting_epochs), "defense.member_batch_size": str(f.counting_batch_size),
              "undefended.enabled": "False"}
  rows = run_rows(f.config, f.workdir, sizes, sigmas, fractions, counting, cli.progress(f.progress))
  norms = (float(rows[0].summary["delta"]), f.small_norm)
  command = (f"python -m certssb_jax.families --config {f.config} --workdir {f.workdir} --sizes {','.join(f.sizes)} "
             f"--sigmas {','.join(f.sigmas)} --bag_fractions {','.join(f.bag_fractions)} --counting_epochs "
             f"{f.counting_epochs} --counting_batch_size {f.counting_batch_size} --small_norm {f.small_norm:g}"
             + (f" --results_md {f.results_md}" if f.results_md else ""))
  if f.results_md:
    write_page(f.results_md, rows, norms, command, f.workdir)
  print(markdown(rows, norms, command))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
