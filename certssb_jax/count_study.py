r"""The count family on a many-class task: DPA, Finite Aggregation and a run-off election over each, at several k.

  python -m certssb_jax.studies counts --config configs/fashion_mnist10.py --workdir runs/count10 --ks 50,250 \
      --spread 2 --fa_ks 50,250 --results_md docs/count_family.md

For every k of ``--ks`` it trains (or reuses) DPA's k members and, for every k of ``--fa_ks``, Finite
Aggregation's k x d members (d = ``--spread``), each as the run-off election's run (``dpa_roe``, ``fa_roe``),
which keeps every member's ranking of the classes. Both votes are read from that one run: the plurality's
certificate (DPA's, Finite Aggregation's) from its members' classes and the run-off's from their rankings, so
the two compare on the very same members. With two classes the run-off is the plurality; it differs from ten.

The page reports, per k, the clean accuracy, the certified accuracy of the clean test inputs against r inserted or
deleted training samples (the papers' poisoned samples; r // 2 modifications) and the median certificate (the
largest r still certifying half the test inputs).
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags
import numpy as np

from certssb_jax import files
from certssb_jax.experiment import cli

POISONS = (1, 2, 5, 10, 20, 50, 100)
COLORS = {"DPA": "C2", "DPA+ROE": "C1", "FA": "C0", "FA+ROE": "C3"}


@dataclasses.dataclass(frozen=True)
class Row:
  """One vote over one trained ensemble.

  Attributes:
    method: "DPA", "DPA+ROE", "FA" or "FA+ROE".
    k: partitions (FA: k x d members).
    workdir: the run folder the members and their votes come from.
    summary: its summary.json.
    correct: (N,) the vote's class on each clean test input is its label.
    certified: (N,) inserted or deleted training samples certified on each clean test input.
  """

  method: str
  k: int
  workdir: str
  summary: dict
  correct: np.ndarray
  certified: np.ndarray

  def accuracy(self, r: int) -> float:
    """Certified accuracy against r insertions and deletions (r = 0: the clean accuracy)."""
    return float(np.mean(self.correct & (self.certified >= r)))

  def median(self) -> int:
    """The largest r at which at least half the clean test inputs are certified and correct (-1: none)."""
    counts = np.where(self.correct, self.certified, -1)
    return int(np.sort(counts)[::-1][(len(counts) - 1) // 2])


def read_rows(workdir: str) -> list[Row]:
  """The plurality's and the run-off's rows of one finished run-off run, from its config and votes."""
  from certssb_jax import defenses  # pylint: disable=g-import-not-at-top
  from certssb_jax.defenses import INSERTIONS_DELETIONS  # pylint: disable=g-import-not-at-top
  from certssb_jax.experiment import finished  # pylint: disable=g-import-not-at-top

  run = finished.FinishedRun(workdir)
  cfg, summary, votes, run_off = run.resolved, run.summary, run.votes, run.defense
  plurality = defenses.REGISTRY[run_off.trains]
  label, k = votes["clean_label"], cfg.train.num_models // cfg.defense.spread
  rows = []
  for defense, members in ((plurality, votes["clean_preds"].astype(np.int64)), (run_off, votes["clean_ranks"])):
    cert = defense.certify_votes(cfg, votes["clean"], summary["n_train"], members)
    rows.append(Row(defense.name, k, workdir, summary, cert.pred == label, cert.counts[INSERTIONS_DELETIONS]))
  return rows


def run_rows(spec: str, workdir: str, ks: list[int], fa_ks: list[int], spread: int, progress) -> list[Row]:
  """Runs (or reuses) every run-off run of the study; returns the plurality's and the run-off's rows of each."""
  from certssb_jax.ensemble import trainer  # pylint: disable=g-import-not-at-top
  from certssb_jax.experiment import config as config_lib, pipeline  # pylint: disable=g-import-not-at-top

  trainers = trainer.Trainers()
  runs = [(k, "dpa_roe", 1) for k in ks] + [(k, "fa_roe", spread) for k in fa_ks]
  rows = []
  for k, name, d in runs:
    folder = os.path.join(workdir, f"k{k}", name if d == 1 else f"{name}_d{d}")
    if not os.path.exists(os.path.join(folder, "summary.json")):
      c = config_lib.apply_overrides(config_lib.load_config(spec), {
          "defense.name": name, "defense.spread": str(d), "train.num_models": str(k * d)})
      pipeline.run(c, folder, progress=progress, trainers=trainers)
    rows += read_rows(folder)
  return rows


def markdown(rows: list[Row], command: str) -> str:
  """One table of every vote at every k."""
  s0 = rows[0].summary
  lines = [f"## {s0['dataset']}, {len(s0['classes'])} classes: the count family at several k", "",
           f"{s0['n_train']} training images ({s0['n_poisoned']} poisoned), {s0['n_test']} clean test inputs, seed "
           f"{s0['seed']}. Written by", "", "```", command, "```", "",
           "| method | k | members | clean acc | " + " | ".join(f"r={r}" for r in POISONS)
           + " | median r | s / member |", "|" + "---|" * (6 + len(POISONS))]
  for row in sorted(rows, key=lambda r: (r.k, list(COLORS).index(r.method))):
    s = row.summary
    t = s["timings_s"].get("train_ensemble")
    per_member = "-" if not t else f"{t / s['num_models']:.2f}"
    lines.append(f"| {row.method} | {row.k} | {s['num_models']} | {row.accuracy(0):.3f} | "
                 + " | ".join(f"{row.accuracy(r):.3f}" for r in POISONS) + f" | {row.median()} | {per_member} |")
  lines += ["", "r=...: certified accuracy of the clean test inputs against r training samples inserted or deleted "
            "in total (a sample's part is a hash of its image and label; r // 2 modifications). Median r: the "
            "largest r certifying at least half of them. A vote and its run-off share their members (one run); "
            "every count is exact. s / member: training time of one member (the run-off's run) on "
            f"{s0['devices'][0]}, jax {s0['versions'].get('jax')}.", ""]
  return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
  """One column per k: certified accuracy against r insertions and deletions for every vote (top) and what the
  run-off election adds to the plurality vote over the same members, in points (bottom: the curves above lie
  within a point of each other)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ks = sorted({r.k for r in rows})
  fig, axes = plt.subplots(2, len(ks), figsize=(4.6 * len(ks), 6.4), sharex="col", squeeze=False,
                           gridspec_kw={"height_ratios": [2, 1]})
  for j, k in enumerate(ks):
    top, bottom = axes[0, j], axes[1, j]
    at_k = {r.method: r for r in rows if r.k == k}
    rs = np.arange(0, int(max(r.certified.max(initial=0) for r in at_k.values())) + 2)
    for row in at_k.values():
      top.step(rs, [row.accuracy(int(r)) for r in rs], where="post", color=COLORS[row.method],
               ls="--" if row.method.endswith("ROE") else "-",
               label=f"{row.method} ({row.summary['num_models']} members)")
    for base in ("DPA", "FA"):
      if base in at_k and f"{base}+ROE" in at_k:
        gain = [100 * (at_k[f"{base}+ROE"].accuracy(int(r)) - at_k[base].accuracy(int(r))) for r in rs]
        bottom.step(rs, gain, where="post", color=COLORS[f"{base}+ROE"], label=f"{base}+ROE - {base}")
    bottom.axhline(0.0, color="k", lw=0.8)
    top.set_title(f"k = {k}", fontsize=9)
    top.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("inserted or deleted training samples r")
    for ax in (top, bottom):
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  axes[0, 0].set_ylabel("certified accuracy (clean test inputs)")
  axes[1, 0].set_ylabel("run-off gain (points)")
  s0 = rows[0].summary
  fig.suptitle(f"{s0['dataset']}, {len(s0['classes'])} classes: plurality vote against run-off election on the "
               "same members", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_page(path: str, rows: list[Row], command: str, workdir: str) -> None:
  """The page (e.g. docs/count_family.md) with its figure under figures/ beside it."""
  name = f"count_family_{rows[0].summary['dataset']}.png"
  plot(rows, os.path.join(workdir, name))
  image = files.copy_figures(path, [os.path.join(workdir, name)])
  s0 = rows[0].summary
  page = [f"# The count family on {len(s0['classes'])} classes", "",
          "Written by the command below from the run folders; do not edit by hand. DPA, Finite Aggregation (FA) and "
          "a run-off election (ROE) over each, trained once per k on the training set as the config gives it "
          f"({s0['n_poisoned']} samples poisoned), every certificate against training samples inserted or deleted. "
          "The papers report their own numbers on MNIST, CIFAR-10 and GTSRB with a Network-in-Network; the run-off "
          "paper's abstract (arXiv 2302.02300v1) states gains in certified accuracy of up to 4.73, 3.63 and 3.54 "
          "points there. This page is a "
          "different task, network and training budget: for scale, not a like-for-like comparison.", "",
          markdown(rows, command), *image, ""]
  files.atomic_write_bytes(path, "\n".join(page).encode())


def define_flags() -> None:
  """The study's own flags (``studies`` defines the common ones), defined only by the program that runs."""
  flags.DEFINE_list("ks", ["50", "250"], "DPA's partitions k (a run-off election over the same members each).")
  flags.DEFINE_list("fa_ks", ["50"], "Finite Aggregation's k (k x spread members each); empty: none.")
  flags.DEFINE_integer("spread", 2, "Finite Aggregation's d: the members every training sample feeds.")


def main() -> None:
  f = flags.FLAGS
  spec = cli.one_config(f.config)
  cli.require(workdir=f.workdir)
  ks, fa_ks = cli.numbers(f.ks, int, "ks"), cli.numbers(f.fa_ks, int, "fa_ks")
  if not ks + fa_ks or min(ks + fa_ks + [f.spread]) < 1:
    raise ValueError("--ks, --fa_ks and --spread must be >= 1 (e.g. --ks 50,250 --spread 2)")
  rows = run_rows(spec, f.workdir, ks, fa_ks, f.spread, cli.progress(f.progress))
  command = (f"python -m certssb_jax.studies counts --config {spec} --workdir {f.workdir} --ks {','.join(f.ks)} "
             f"--spread {f.spread} --fa_ks {','.join(f.fa_ks)}"
             + (f" --results_md {f.results_md}" if f.results_md else ""))
  if f.results_md:
    write_page(f.results_md, rows, command, f.workdir)
  print(markdown(rows, command))
