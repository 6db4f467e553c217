r"""Certified poisoning defenses at equal ensemble sizes, each at its best setting, against the whole backdoor.

  python -m certssb_jax.studies families --config configs/fashion_mnist.py --workdir runs/families --sizes 32,64,128 \
      --sigmas 0.25,0.5,1,2 --results_md docs/families.md

For every ensemble size M of ``--sizes`` it trains (or reuses) on the same data, attack and seed:

* RAB at every sigma of ``--sigmas`` (the rows of ``sweep``; a smaller M reuses the first M models of a larger);
* DPA with k = M parts, partitioned by sample (image and label: insertions and deletions) and by position (the
  training set's size fixed: modifications);
* bagging with M members at every bag size ``f * n / M`` for f in ``--bag_fractions``;
* DPA with test-time smoothing, k = M parts trained with Gaussian augmentation at each sigma of
  ``--partition_sigmas``, voting on ``certify.draws`` noised draws per query;

and writes one table per M and one figure: certified accuracy of the clean test inputs against k modified
training samples together with a trigger of l2 norm below t on the test input, each family at its best setting
for each k (RAB: its envelope over sigma; DPA: over the partition; bagging: over the bag size; DPA with smoothing:
over sigma), at t = 0 (the test input as given), at a small t and at the attack's norm.

What each family certifies differs. DPA and bagging certify k training samples modified at will (image and label)
and nothing about the test input: at t > 0 they certify nothing. RAB certifies k training images carrying a
trigger of l2 norm at most t with their labels kept, plus the test input's trigger (its poison budget,
``certify.bounds.poison_budget``); at t = 0 its count is not defined (a trigger of norm 0 changes nothing). DPA
with smoothing certifies k samples modified at will plus the test input's trigger. DPA's counts are exact; the
others' each hold with probability 1 - alpha.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from absl import flags
import numpy as np

from certssb_jax import files
from certssb_jax.certify import bounds
from certssb_jax.experiment import cli, config as config_lib, finished

POISON_GRID = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
FAMILY_COLORS = {"RAB": "C0", "DPA": "C2", "bagging": "C3", "DPA+smoothing": "C1"}
_WIDTHS = {"RAB": 3.2, "DPA": 2.4, "bagging": 1.7, "DPA+smoothing": 1.1}  # later curves thinner: none hides another


@dataclasses.dataclass(frozen=True)
class Row:
  """One finished run of the study, read back from its folder.

  Attributes:
    method: "RAB", "DPA", "bagging" or "DPA+smoothing".
    setting: what was chosen within the family ("sigma=0.5", "by position", "s=375").
    num_models: M.
    workdir: the run folder.
    summary: its summary.json.
    correct: (N,) the answer on each clean test input is its label (the plain or smoothed vote).
    counts: trigger norm t -> (N,) modified training samples certified together with a test trigger of norm
      below t (-1: none); None where the family's certificate says nothing at that t (DPA and bagging at t > 0:
      the test input as given; RAB at t = 0: a trigger of norm 0 is no attack).
  """

  method: str
  setting: str
  num_models: int
  workdir: str
  summary: dict[str, Any]
  correct: np.ndarray
  counts: Callable[[float], np.ndarray | None]

  def accuracy(self, k: int, trigger_norm: float) -> float | None:
    """Certified accuracy against k modifications and a test trigger below ``trigger_norm`` (None: undefined)."""
    counts = self.counts(trigger_norm)
    return None if counts is None else float(np.mean(self.correct & (counts >= k)))


def read_row(method: str, setting: str, workdir: str) -> Row:
  """A finished run as a Row, from its summary.json and per_sample.csv."""
  from certssb_jax.defenses import smoothed_partition  # pylint: disable=g-import-not-at-top

  run = finished.FinishedRun(workdir)
  summary, label = run.summary, run.column("clean", "label", int)
  if "threats" not in summary:  # an l2 certificate (RAB): its poison budget at t, from the margins of its answers
    correct = run.column("clean", "pred_stored", int) == label
    margin = run.column("clean", "margin_stored")
    sigma = float(summary["sigma_0"])
    rab = lambda t: None if t <= 0 else bounds.poison_budget(margin, sigma, sigma, t)
    return Row(method, setting, summary["num_models"], workdir, summary, correct, rab)
  correct = run.column("clean", "pred", int) == label
  if summary.get("trigger_norm") is None:  # DPA, bagging: the test input as given, nothing said about a trigger
    counts = run.column("clean", "certified_modifications", int).astype(np.int64)
    plain = lambda t: counts if t <= 0 else None
    return Row(method, setting, summary["num_models"], workdir, summary, correct, plain)
  p_low, p_high = run.column("clean", "p_lower"), run.column("clean", "p_upper_runner")
  d = summary["defense"]
  per = smoothed_partition.members_per_change(d["key"])["modifications"]
  smoothed = lambda t: smoothed_partition.largest_changes(p_low, p_high, d["partitions"], d["sigma"], t, per)
  return Row(method, setting, summary["num_models"], workdir, summary, correct, smoothed)


def counting_variants(m: int, n_train: int, bag_fractions: list[float],
                      partition_sigmas: list[float]) -> list[tuple[str, str, dict[str, str]]]:
  """(method, setting, config overrides) of every counting row at ensemble size m."""
  out = [("DPA", f"by {key}", {"defense.name": "dpa", "defense.partition": key}) for key in ("sample", "position")]
  for f in bag_fractions:
    s = max(1, round(f * n_train / m))
    out.append(("bagging", f"s={s}", {"defense.name": "bagging", "defense.bag_size": str(s)}))
  for sigma in partition_sigmas:
    out.append(("DPA+smoothing", f"sigma={sigma:g}", {"defense.name": "dpa_smoothing", "sigma.sigma_0": str(sigma)}))
  return out


def run_rows(spec: str, workdir: str, sizes: list[int], sigmas: list[float], bag_fractions: list[float],
             partition_sigmas: list[float], counting: dict[str, str], progress: Any,
             smoothing_sizes: list[int] | None = None) -> list[Row]:
  """Runs (or reuses) every row of the study; returns them, read back from their folders. RAB runs at the
  sizes ``smoothing_sizes`` (default: every size), the counting defenses at every size."""
  from certssb_jax import sweep  # pylint: disable=g-import-not-at-top
  from certssb_jax.ensemble import trainer  # pylint: disable=g-import-not-at-top
  from certssb_jax.experiment import pipeline  # pylint: disable=g-import-not-at-top

  trainers = trainer.Trainers()
  n_train = len(pipeline.load_data(config_lib.resolve(config_lib.load_config(spec))).y_train)
  rows = []
  for m in sorted(sizes, reverse=True):  # the largest first: the smaller RAB ensembles reuse its first models
    if sigmas and (smoothing_sizes is None or m in smoothing_sizes):
      records = sweep.run_grid([spec], os.path.join(workdir, "rab"), None, sigmas, ["rab"], progress,
                               trainers=trainers, overrides={"train.num_models": str(m)})
      rows += [read_row("RAB", f"sigma={r['sigma_0']:g}", r["workdir"]) for r in records]
    for method, setting, overrides in counting_variants(m, n_train, bag_fractions, partition_sigmas):
      d = os.path.join(workdir, f"M{m}", f"{method.replace('+', '_')}_{setting.replace(' ', '_').replace('=', '')}")
      if not os.path.exists(os.path.join(d, "summary.json")):
        c = config_lib.apply_overrides(config_lib.load_config(spec), {**counting, **overrides,
                                                                      "train.num_models": str(m)})
        pipeline.run(c, d, progress=progress, trainers=trainers)
      rows.append(read_row(method, setting, d))
  return rows


def best(rows: list[Row], method: str, m: int, k: int, trigger_norm: float) -> tuple[float | None, str]:
  """(certified accuracy, setting) of the family's best setting at k changes and test trigger norm t, size m."""
  cands = [(a, r.setting) for r in rows if r.method == method and r.num_models == m
           for a in [r.accuracy(k, trigger_norm)] if a is not None]
  return max(cands, key=lambda c: c[0]) if cands else (None, "-")


def largest(row: Row, trigger_norm: float) -> str:
  """The most any answer of the row could certify at this M (unanimous votes), at test trigger norm t."""
  s = row.summary
  if row.method == "RAB":
    if trigger_norm <= 0:
      return "-"
    ceiling = float(s["margin_ceiling"])
    sigma = float(s["sigma_0"])
    return str(int(bounds.poison_budget(np.array([ceiling]), sigma, sigma, trigger_norm)[0]))
  if s.get("trigger_norm") is None:
    return str(int(s["largest_certificate"]["modifications"])) if trigger_norm <= 0 else "-"
  from certssb_jax.defenses import smoothed_partition  # pylint: disable=g-import-not-at-top

  d = s["defense"]
  p = bounds.clopper_pearson_lower(d["draws"], d["draws"], d["alpha"] / len(s["classes"]))
  per = smoothed_partition.members_per_change(d["key"])["modifications"]
  return str(int(smoothed_partition.largest_changes(np.array([p]), np.array([1 - p]), d["partitions"], d["sigma"],
                                               trigger_norm, per)[0]))


def _fmt(v: float | None) -> str:
  return "-" if v is None or v != v else f"{v:.3f}"


def _kind(row: Row) -> str:
  s = row.summary
  if row.method == "RAB":
    return f"k images with a trigger <= t (labels kept) + test trigger < t; p >= 1 - {s['alpha']:g}"
  if s.get("trigger_norm") is None:
    what = "k modified samples, clean test input"
    return f"{what}; exact" if s["exact"] else f"{what}; p >= 1 - {s['defense']['alpha']:g}"
  return f"k modified samples + test trigger < t; p >= 1 - {s['defense']['alpha']:g}"


def markdown(rows: list[Row], norms: tuple[float, ...], command: str) -> str:
  """The page's tables: every row at every M, then each family's best setting for each k and t."""
  s0 = rows[0].summary
  grid = POISON_GRID[1:8]
  norm_text = " / ".join(f"{t:g}" for t in norms)
  lines = [f"## {s0['dataset']} classes {tuple(s0['classes'])}: every family at equal M", "",
           f"{s0['trigger']} trigger of norm {s0['delta']:g}; the attack poisons {s0['n_poisoned']} of "
           f"{s0['n_train']} training images (labels set to the target {s0['target_class']}), seed {s0['seed']}; "
           f"{s0['n_test']} clean and {s0['n_triggered']} triggered test inputs. Written by", "", "```", command,
           "```", ""]
  for m in sorted({r.num_models for r in rows}):
    lines += [f"### M = {m}", "",
              f"| method | setting | certificate | largest k (t = {norm_text}) | clean acc (majority) | clean acc | "
              "ERA / ASR | majority ASR | " + " | ".join(f"k={k}, t={t:g}" for t in norms[1:] for k in (0, 1, 4))
              + " | s / member |",
              "|" + "---|" * (9 + 3 * (len(norms) - 1))]
    for r in (r for r in rows if r.num_models == m):
      s, met = r.summary, r.summary["metrics"]
      t = s["timings_s"].get("train_ensemble")
      per_member = "-" if not t else f"{t / s['num_models']:.1f}"
      lines.append(f"| {r.method} | {r.setting} | {_kind(r)} | {' / '.join(largest(r, t) for t in norms)} | "
                   f"{_fmt(s['majority']['clean_accuracy'])} | {_fmt(met['clean_accuracy'])} | {_fmt(met['era'])} / "
                   f"{_fmt(met['asr'])} | {_fmt(s['majority']['asr'])} | "
                   + " | ".join(_fmt(r.accuracy(k, t)) for t in norms[1:] for k in (0, 1, 4))
                   + f" | {per_member} |")
    lines.append("")
    for t in norms:
      lines += [f"Each family at its best setting for each k, test trigger norm t = {t:g} (the winning setting in "
                "brackets; -: the family's certificate does not say anything there):", "",
                "| family | " + " | ".join(f"k={k}" for k in (0, *grid)) + " |", "|" + "---|" * (2 + len(grid))]
      for method in FAMILY_COLORS:
        if not any(r.method == method and r.num_models == m for r in rows):
          lines.append(f"| {method} | not run at this M |" + " |" * len(grid))
          continue
        cells = [best(rows, method, m, k, t) for k in (0, *grid)]
        lines.append(f"| {method} | " + " | ".join("-" if a is None else f"{_fmt(a)} ({s})" for a, s in cells) + " |")
      lines.append("")
  lines += [
      "k=..., t=...: certified accuracy of the clean test inputs against k modified training samples together "
      "with a trigger of l2 norm below t on the test input. DPA and bagging certify the test input as given, so "
      f"nothing at t > 0; RAB's k counts training images carrying a trigger of norm at most t with their labels "
      "kept (its poison budget), undefined at t = 0. Largest k: what unanimous votes certify at this M. clean "
      "acc, ERA and ASR: the certified answers (an abstention is an error); majority: the plain vote. DPA's "
      "counts are exact; the others' hold with probability 1 - alpha each. s / member: training time of one "
      f"member on {s0['devices'][0]}, jax {s0['versions'].get('jax')}.", ""]
  return "\n".join(lines)


def plot(rows: list[Row], norms: tuple[float, ...], path: str) -> None:
  """One column per M, one row per test trigger norm t: each family's best certified accuracy at each k (the
  envelope over its settings), where its certificate says anything; the attack's own poison count marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  sizes = sorted({r.num_models for r in rows})
  s0 = rows[0].summary
  ks = np.concatenate([[0], np.unique(np.round(np.logspace(0, np.log10(4 * s0["n_poisoned"]), 160)).astype(int))])
  fig, axes = plt.subplots(len(norms), len(sizes), figsize=(max(4.2 * len(sizes), 9.0), 3.3 * len(norms)),
                           sharex=True, sharey=True, squeeze=False)
  for j, m in enumerate(sizes):
    for i, t in enumerate(norms):
      ax = axes[i, j]
      absent, not_run = [], []
      for method, color in FAMILY_COLORS.items():
        if not any(r.method == method and r.num_models == m for r in rows):
          not_run.append(method)
          continue
        acc = [best(rows, method, m, int(k), t)[0] for k in ks]
        if acc[0] is None or not any(a for a in acc):  # nothing to draw: say why instead of a line at zero
          absent.append(method)
          continue
        ax.step(ks, acc, where="post", color=color, lw=_WIDTHS[method], label=method)
      ax.axvline(s0["n_poisoned"], color="k", ls=":", lw=1.2, label=f"the attack: {s0['n_poisoned']} poisoned")
      notes = ([f"no certificate here: {', '.join(absent)}"] if absent else []) + \
          ([f"not run at this M: {', '.join(not_run)}"] if not_run else [])
      if notes:
        ax.text(0.98, 0.97, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=7,
                color="0.3")
      ax.set_xscale("symlog", linthresh=1.0)
      ax.set_xlim(0, ks[-1])
      ax.set_ylim(-0.02, 1.02)
      ax.grid(alpha=0.3)
      ax.set_title(f"M = {m}, test trigger norm t = {t:g}", fontsize=9)
      if j == 0:
        ax.set_ylabel("certified accuracy (clean test inputs)")
      if i == len(norms) - 1:
        ax.set_xlabel("modified training samples k")
      ax.legend(fontsize=7, loc="lower left")
  fig.suptitle(f"{s0['dataset']} {tuple(s0['classes'])}, {s0['trigger']} trigger of norm {s0['delta']:g}: each "
               "family at its best setting for each k\n(DPA, bagging: clean test input only; RAB: k images with a "
               "trigger <= t, labels kept; DPA+smoothing: k samples changed at will)", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_whole_backdoor(rows: list[Row], path: str) -> bool:
  """Heat maps of DPA with test-time smoothing, one per M (its best sigma at each cell): certified accuracy against
  k modified training samples (x) and a test trigger of norm below t (y). False when there is no such row."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  sizes = sorted({r.num_models for r in rows if r.method == "DPA+smoothing"})
  if not sizes:
    return False
  s0 = rows[0].summary
  ks, ts = np.arange(0, 65), np.linspace(0.0, 2.0 * s0["delta"], 41)
  fig, axes = plt.subplots(1, len(sizes), figsize=(max(4.4 * len(sizes), 6.0), 3.8), squeeze=False)
  for ax, m in zip(axes[0], sizes):
    acc = np.array([[best(rows, "DPA+smoothing", m, int(k), float(t))[0] for k in ks] for t in ts])  # (T, K)
    im = ax.imshow(acc, origin="lower", aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis",
                   extent=(ks[0] - 0.5, ks[-1] + 0.5, ts[0], ts[-1]))
    ax.axhline(s0["delta"], color="w", ls=":", lw=1.0)
    ax.text(ks[-1], s0["delta"], " the attack's norm", color="w", ha="right", va="bottom", fontsize=7)
    ax.set_title(f"M = {m} parts", fontsize=9)
    ax.set_xlabel("modified training samples k")
  axes[0, 0].set_ylabel("test trigger norm t")
  fig.colorbar(im, ax=axes[0].tolist(), label="certified accuracy (clean test inputs)")
  fig.suptitle(f"{s0['dataset']} {tuple(s0['classes'])}: DPA with test-time smoothing, the whole backdoor (its best "
               "sigma at each cell)", fontsize=9)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return True


def write_page(path: str, rows: list[Row], norms: tuple[float, ...], command: str, workdir: str) -> None:
  """The page (e.g. docs/families.md) with its figure under figures/ beside it."""
  s0 = rows[0].summary
  name = f"families_{s0['dataset']}_{'-'.join(str(c) for c in s0['classes'])}.png"
  heat = name.replace("families_", "whole_backdoor_")
  plot(rows, norms, os.path.join(workdir, name))
  figures = [name] + ([heat] if plot_whole_backdoor(rows, os.path.join(workdir, heat)) else [])
  images = files.copy_figures(path, [os.path.join(workdir, f) for f in figures])
  page = ["# Certified poisoning defenses side by side", "",
          "Written by the command below from the run folders; do not edit by hand. Every family runs on the same "
          "data, attack and seed with the same number of members M, each at its best setting for each number k "
          "of modified training samples and each norm t of a trigger on the test input. A backdoor has both "
          "halves: DPA and bagging certify the training half only (t = 0), RAB both halves with labels kept "
          "(docs/method.md, section 3), DPA with test-time smoothing both halves with labels changed at will "
          "(docs/method.md, section 9). The counting family on ten classes (DPA, Finite Aggregation and their "
          "run-off elections, at k = 50 and 250) is on its own page, [count_family.md](count_family.md).", "",
          markdown(rows, norms, command)] + [f"{line}\n" for line in images]
  files.atomic_write_bytes(path, "\n".join(page).encode())


def define_flags() -> None:
  """The study's own flags (``studies`` defines the common ones), defined only by the program that runs."""
  flags.DEFINE_list("sizes", ["32", "64", "128"], "Ensemble sizes M (members of every family).")
  flags.DEFINE_list("sigmas", ["0.25", "0.5", "1", "2"], "RAB's sigmas (its envelope); empty: no RAB rows.")
  flags.DEFINE_list("smoothing_sizes", None, "The sizes of --sizes at which RAB runs (it trains on the whole set at "
                                             "every sigma, the costly rows); default: all.")
  flags.DEFINE_list("bag_fractions", ["0.5", "1", "2"], "bagging's bag sizes, as fractions of n / M.")
  flags.DEFINE_list("partition_sigmas", ["0.5", "1"], "DPA with smoothing: its sigmas; empty: no such rows.")
  flags.DEFINE_string("counting", "train.epochs=50,defense.member_batch_size=32",
                      "Config fields of the counting members, as a config variant (a member sees about n / M "
                      "samples, so it trains for more epochs on smaller batches).")
  flags.DEFINE_float("small_norm", 0.1, "The smaller test trigger norm t of the middle panels (the attack's is the "
                     "last, t = 0 the first).")


def main() -> None:
  f = flags.FLAGS
  spec = cli.one_config(f.config)
  cli.require(workdir=f.workdir)
  sizes = cli.numbers(f.sizes, int, "sizes")
  sigmas, fractions = cli.numbers(f.sigmas, float, "sigmas"), cli.numbers(f.bag_fractions, float, "bag_fractions")
  partition_sigmas = cli.numbers(f.partition_sigmas, float, "partition_sigmas")
  smoothing_sizes = None if f.smoothing_sizes is None else cli.numbers(f.smoothing_sizes, int, "smoothing_sizes")
  if smoothing_sizes is not None and not set(smoothing_sizes) <= set(sizes):
    raise ValueError(f"--smoothing_sizes must be among --sizes {','.join(f.sizes)}, got {','.join(f.smoothing_sizes)}")
  if not sizes or min(sizes) < 1:
    raise ValueError("--sizes must be >= 1 (e.g. --sizes 32,64)")
  if min(sigmas + fractions + partition_sigmas + [f.small_norm]) <= 0:
    raise ValueError("--sigmas, --bag_fractions, --partition_sigmas and --small_norm must be > 0")
  counting = {**config_lib.parse_variant(f.counting), "undefended.enabled": "False"}
  config_lib.apply_overrides(config_lib.load_config(spec), counting)  # a bad field stops here, before any work
  rows = run_rows(spec, f.workdir, sizes, sigmas, fractions, partition_sigmas, counting, cli.progress(f.progress),
                  smoothing_sizes)
  norms = (0.0, f.small_norm, float(rows[0].summary["delta"]))
  command = (f"python -m certssb_jax.studies families --config {spec} --workdir {f.workdir} "
             f"--sizes {','.join(f.sizes)} --sigmas {','.join(f.sigmas)}"
             + (f" --smoothing_sizes {','.join(f.smoothing_sizes)}" if f.smoothing_sizes is not None else "")
             + f" --bag_fractions {','.join(f.bag_fractions)} --partition_sigmas {','.join(f.partition_sigmas)}"
             f" --counting {f.counting} --small_norm {f.small_norm:g}"
             + (f" --results_md {f.results_md}" if f.results_md else ""))
  if f.results_md:
    write_page(f.results_md, rows, norms, command, f.workdir)
  print(markdown(rows, norms, command))
