r"""RAB's envelope over sigma, and the sample-specific designs judged against it (docs/results.md).

RAB certifies at one noise level; which level is best depends on the radius asked for. The field's comparison
(Cohen et al.'s "vary noise" analysis) trains RAB at a grid of sigma and takes, at every radius, the best
certified accuracy over the grid: the envelope. A sample-specific design helps only where its curve rises above
the envelope. This program trains (or reuses) RAB at every sigma of the grid and the Cert-SSB runs asked for, on
the same data and seed, evaluates the grid selector (below) on RAB's trained models, and writes per class pair,
seed and M (``<key>``: ``fashion_mnist_0-1_onepixel_seed0_M64``, say):

* ``envelope_<key>.png``: certified accuracy against the joint radius and against the test-input radius; RAB's
  curves thin over their envelope (a pale band), the designs on top;
* ``attack_<key>.png``: clean accuracy, ERA and ASR against sigma, certified and by majority vote;
* ``envelope_<key>.md`` / ``.json``: every row's numbers, the radii where each design rises above or falls below
  the envelope (and by how much), and the spread of the designs' sigma_x.

The grid selector is the sample-specific design whose voting models are trained for the noise they are queried
at. For every test input it picks sigma_x from the trained grid: the first ``selector_models`` models of each
RAB ensemble (ids 0 .. M_s - 1) never vote; their votes at each sigma predict the certificate the voting models
(ids M_s .. M - 1) would give there, and the sigma with the largest expected certified test-input radius wins.
The voters of the ensemble trained at that sigma then vote, the run's bound certifies, and one store answers
every query (clean split first). The selector's models are trained on the poisoned training set, so a selected
sigma_x is a function of it: the answers certify their test-input radius only (joint radius 0,
docs/soundness.md).

  python -m certssb_jax.envelope --config configs/fashion_mnist.py:num_models=32 \
      --sigmas 0.12,0.25,0.375,0.5,1.0 --workdir runs/envelope --results_md docs/results.md
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from typing import Any

from absl import flags
import numpy as np

from certssb_jax import files, sweep
from certssb_jax.certify import bounds
from certssb_jax.data.attacked import SPLITS
from certssb_jax.defenses import grid_selector as grid_selector_lib
from certssb_jax.ensemble import trainer as ensemble
from certssb_jax.run import cli, config as config_lib, report
from certssb_jax.store import certified as store_lib

logger = logging.getLogger(__name__)

PAPER_SIGMAS = (0.12, 0.25, 0.5, 1.0)
RADII = ("joint", "test")
KINDS = RADII + ("budget",)  # the certified poison budget at the trigger norm: images k, not a radius
GRID_DESIGN = "Cert-SSB grid selector"


@dataclasses.dataclass(frozen=True)
class Answers:
  """One design's certified answers on the clean and triggered test splits (arrays (N,) per split).

  Attributes:
    name: how the row is labelled in plots and tables.
    sigma: the sigma RAB trained and tested at; None for a sample-specific design.
    voting: the number of voting models.
    pred, radius_test, radius_joint, sigma_x: per split, the answer (-1: abstain), its test-input and joint
      radius, and the sigma_x it was voted at.
    label: per split, the true labels.
    majority: per split, the plain majority vote of the voting models at sigma_x (uncertified).
    delta: the trigger norm t of the certified poison budget.
    sigma_range: the lowest and highest sigma_x the design can choose.
  """

  name: str
  sigma: float | None
  voting: int
  pred: dict[str, np.ndarray]
  radius_test: dict[str, np.ndarray]
  radius_joint: dict[str, np.ndarray]
  sigma_x: dict[str, np.ndarray]
  label: dict[str, np.ndarray]
  majority: dict[str, np.ndarray]
  delta: float
  sigma_range: tuple[float, float]

  def budget(self, split: str = "clean") -> np.ndarray:
    """The certified poison budget of every answer at trigger norm ``delta``, from its joint radius J: the most
    images k with t sqrt(k + 1) < J (exact when every sigma is one level, as in RAB; else a lower bound); 0, the
    test trigger alone on the training set as trained, where only the test-input radius exceeds t."""
    k = bounds.poison_budget(self.radius_joint[split], 1.0, 1.0, self.delta)
    return np.where((k < 0) & (self.radius_test[split] > self.delta), 0, k)

  def cra(self, kind: str, r: np.ndarray) -> np.ndarray:
    """Certified accuracy on the grid ``r``: the share of clean inputs answered correctly with a radius above r
    (``joint``, ``test``) or a poison budget of at least r images (``budget``)."""
    correct = self.pred["clean"] == self.label["clean"]
    r = np.asarray(r)[:, None]
    if kind == "budget":
      return (self.budget()[correct][None, :] >= r).sum(axis=1) / len(correct)
    radius = (self.radius_joint if kind == "joint" else self.radius_test)["clean"][correct]
    return (radius[None, :] > r).sum(axis=1) / len(correct)


# ---------------------------------------------------------------------------------------------- reading runs


def _majority(preds: np.ndarray, num_classes: int) -> np.ndarray:
  """Plain majority (ties to the lowest class) of (M, N) per-model classes."""
  counts = np.stack([(preds == c).sum(axis=0) for c in range(num_classes)], axis=1)  # (N, K)
  return counts.argmax(axis=1)


def answers_of_run(workdir: str, name: str | None = None) -> Answers:
  """A finished run's storage-update answers (its certificates), read from its folder."""
  cfg = files.load_json(os.path.join(workdir, "config.json"))
  summary = files.load_json(os.path.join(workdir, "summary.json"))
  votes = files.load_npz(os.path.join(workdir, "votes.npz"))
  rows = sweep.read_rows(workdir)
  voting = summary["models"]["voting"]
  k = len(cfg["data"]["classes"])
  col = lambda s, c, t: np.array([t(r[c]) for r in rows if r["split"] == s])
  fixed = cfg["sigma"]["mode"] == "fixed"
  return Answers(
      name=name or (f"RAB sigma={cfg['sigma']['sigma_0']:g}" if fixed else f"Cert-SSB {sweep.design(cfg)}"),
      sigma=cfg["sigma"]["sigma_0"] if fixed else None, voting=voting,
      pred={s: col(s, "pred_stored", int) for s in SPLITS},
      radius_test={s: col(s, "radius_stored", float) for s in SPLITS},
      radius_joint={s: col(s, "radius_joint_stored", float) for s in SPLITS},
      sigma_x={s: col(s, "sigma", float) for s in SPLITS},
      label={s: col(s, "label", int) for s in SPLITS},
      majority={s: _majority(votes[f"{s}_preds"][-voting:], k) for s in SPLITS}, delta=cfg["attack"]["delta"],
      sigma_range=((cfg["sigma"]["sigma_0"],) * 2 if fixed else (cfg["sigma"]["sigma_lo"], cfg["sigma"]["sigma_hi"])))


# ---------------------------------------------------------------------------------------------- the grid selector


def grid_selector(rab_runs: dict[float, str], x: dict[str, np.ndarray], selector_models: int) -> Answers:
  """The grid selector's answers (module docstring) from RAB's run folders at every sigma of the grid.

  Args:
    rab_runs: {sigma: folder of a finished RAB run}; every run has the same data, seed and M.
    x: {split: (N, *input_shape) the test inputs}, in the runs' order.
    selector_models: M_s, the models of each ensemble that select sigma_x and never vote.

  Returns:
    The store's answers; joint radius 0 (a selected sigma_x depends on the training set).
  """
  cfgs = {s: files.load_json(os.path.join(d, "config.json")) for s, d in rab_runs.items()}
  first = next(iter(cfgs.values()))
  m, k, alpha = first["train"]["num_models"], len(first["data"]["classes"]), first["certify"]["alpha"]
  if not 1 <= selector_models < m:
    raise ValueError(f"selector_models must be in [1, {m}) (the ensembles have {m} models), got {selector_models}")
  keys = {config_lib.training_key(dict(c, sigma=dict(c["sigma"], sigma_0=0.0))) for c in cfgs.values()}
  if len(keys) != 1 or any(c["sigma"]["mode"] != "fixed" for c in cfgs.values()):
    raise ValueError("the grid selector needs RAB runs that differ in sigma only")
  votes = {s: files.load_npz(os.path.join(d, "votes.npz")) for s, d in rab_runs.items()}
  choose = lambda split: grid_selector_lib.select_sigmas(
      {s: v[f"{split}_preds"][:selector_models] for s, v in votes.items()}, m - selector_models, alpha, k)
  return _voters_answers(f"{GRID_DESIGN} (M_s = {selector_models})", votes, x, choose, selector_models, alpha, k,
                         first["attack"]["delta"], joint=False)


def same_voters(rab_runs: dict[float, str], x: dict[str, np.ndarray], selector_models: int) -> list[Answers]:
  """RAB at every sigma of the grid with the grid selector's voters only (the models from M_s on), from the same
  votes: the baseline that tells the selector's choice of sigma apart from its smaller number of voters."""
  out = []
  for sigma, d in sorted(rab_runs.items()):
    c = files.load_json(os.path.join(d, "config.json"))
    votes = {sigma: files.load_npz(os.path.join(d, "votes.npz"))}
    m, k = c["train"]["num_models"], len(c["data"]["classes"])
    choose = lambda split, sigma=sigma: np.full(len(x[split]), sigma)
    out.append(_voters_answers(f"RAB sigma={sigma:g}, {m - selector_models} voters", votes, x, choose,
                               selector_models, c["certify"]["alpha"], k, c["attack"]["delta"], joint=True,
                               sigma=sigma))
  return out


def _voters_answers(name: str, votes: dict[float, dict[str, np.ndarray]], x: dict[str, np.ndarray],
                    choose: Any, first_voter: int, alpha: float, k: int, delta: float, *, joint: bool,
                    sigma: float | None = None) -> Answers:
  """The store's answers (clean split first) when each input votes with the models from ``first_voter`` on at the
  sigma ``choose(split)`` picks for it; ``joint``: whether a joint radius is certified (sigma fixed, not chosen)."""
  st = store_lib.CertifiedStore(x["clean"].shape[1:])
  out: dict[str, dict[str, np.ndarray]] = {f: {} for f in ("pred", "test", "joint", "sigma", "label", "majority")}
  for split in SPLITS:  # clean first: the order of every run's store
    chosen = choose(split)
    voters = np.empty((len(next(iter(votes.values()))[f"{split}_preds"]) - first_voter, len(chosen)), np.int64)
    for s, v in votes.items():
      at = chosen == s
      voters[:, at] = v[f"{split}_preds"][first_voter:, at]
    counts = np.stack([(voters == c).sum(axis=0) for c in range(k)], axis=1)  # (N, K)
    cert = bounds.certify_counts(counts, alpha=alpha, sigma_x=chosen, sigma_min=chosen)
    ans = st.certify(x[split], cert.pred, cert.radius_test, chosen, sigma_min=chosen if joint else 0.0)
    out["pred"][split], out["test"][split], out["joint"][split] = ans.pred, ans.radius_stored, ans.radius_joint
    out["sigma"][split], out["majority"][split] = chosen, counts.argmax(axis=1)
    out["label"][split] = next(iter(votes.values()))[f"{split}_label"]
  grid = sorted(votes)
  return Answers(name, sigma, len(voters), out["pred"], out["test"], out["joint"], out["sigma"], out["label"],
                 out["majority"], delta, (grid[0], grid[-1]))


# ---------------------------------------------------------------------------------------------- the comparison


def envelope(rab: list[Answers], kind: str, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(best CRA over RAB's sigmas at each radius, the sigma that attains it)."""
  curves = np.stack([a.cra(kind, r) for a in rab])  # (G, R)
  best = curves.argmax(axis=0)
  return curves.max(axis=0), np.array([rab[i].sigma for i in best])


def crossings(diff: np.ndarray, r: np.ndarray) -> list[dict[str, float]]:
  """The radius intervals where ``diff`` (design minus envelope) is positive or negative: [start, end), sign,
  the largest |diff| and where."""
  out, sign = [], np.sign(np.round(diff, 12))
  start = 0
  for i in range(1, len(r) + 1):
    if i == len(r) or sign[i] != sign[start]:
      if sign[start] != 0:
        j = start + int(np.argmax(np.abs(diff[start:i])))
        out.append({"from": float(r[start]), "to": float(r[i - 1]), "sign": int(sign[start]),
                    "largest": float(diff[j]), "at": float(r[j])})
      start = i
  return out


def metrics_of(a: Answers, target_class: int) -> dict[str, Any]:
  """Clean accuracy, ERA, ASR and abstentions of the answers, certified and by majority vote."""
  clean, trig = SPLITS
  answered = a.pred[trig] != -1
  return {
      "clean_accuracy": float(np.mean(a.pred[clean] == a.label[clean])),
      "era": float(np.mean(a.pred[trig] == a.label[trig])),
      "asr": float(np.mean(a.pred[trig] == target_class)) if answered.any() else None,
      "abstain_clean": float(np.mean(a.pred[clean] == -1)), "abstain_triggered": float(np.mean(~answered)),
      "majority": {"clean_accuracy": float(np.mean(a.majority[clean] == a.label[clean])),
                   "era": float(np.mean(a.majority[trig] == a.label[trig])),
                   "asr": float(np.mean(a.majority[trig] == target_class))},
  }


def spread(a: Answers, grid: list[float]) -> dict[str, Any]:
  """Quantiles of a design's clean sigma_x, the share at each end of its range and at each sigma of the grid."""
  s = a.sigma_x["clean"]
  lo, hi = a.sigma_range
  return {"quantiles": {str(q): float(np.quantile(s, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
          "iqr": float(np.quantile(s, 0.75) - np.quantile(s, 0.25)),
          "share_at_lowest": float(np.mean(np.isclose(s, lo))), "share_at_highest": float(np.mean(np.isclose(s, hi))),
          "share_per_sigma": {f"{g:g}": float(np.mean(np.isclose(s, g))) for g in grid}}


def compare(rab: list[Answers], designs: list[Answers], target_class: int, steps: int = 400,
            same: list[Answers] = ()) -> dict[str, Any]:
  """Every row's metrics, and each design against RAB's envelope on both radii; ``same``: RAB with fewer voters
  (``same_voters``), whose envelope a design with that many voters is compared with too."""
  rab = sorted(rab, key=lambda a: a.sigma)
  everyone = rab + designs + list(same)
  top = max(float(max(a.radius_test["clean"].max(), a.radius_joint["clean"].max())) for a in everyone)
  r = np.linspace(0.0, top * 1.02 + 1e-9, steps + 1)
  grids = {"joint": r, "test": r, "budget": np.arange(max(int(a.budget().max()) for a in everyone) + 2)}
  grid = [a.sigma for a in rab]
  out: dict[str, Any] = {"radii": {k: g.tolist() for k, g in grids.items()}, "rows": [], "designs": [],
                         "delta": rab[0].delta}
  for a in everyone:
    out["rows"].append({"name": a.name, "sigma": a.sigma, "voting": a.voting, **metrics_of(a, target_class),
                        "cra": {kind: a.cra(kind, grids[kind]).tolist() for kind in KINDS},
                        "same_voters": any(a is b for b in same)})
  out["envelope"] = {}
  for kind in KINDS:
    best, arg = envelope(rab, kind, grids[kind])
    out["envelope"][kind] = {"cra": best.tolist(), "sigma": arg.tolist()}
  for a in designs:
    entry = {"name": a.name, "spread": spread(a, grid)}
    for kind in KINDS:
      diff = a.cra(kind, grids[kind]) - np.asarray(out["envelope"][kind]["cra"])
      entry[kind] = crossings(diff, grids[kind])
    peers = [b for b in same if b.voting == a.voting]
    if peers:  # the envelope of RAB with the design's own voters
      entry["same_voters"] = {"voting": a.voting, **{kind: crossings(
          a.cra(kind, grids[kind]) - envelope(peers, kind, grids[kind])[0], grids[kind]) for kind in RADII}}
    out["designs"].append(entry)
  return out


# ---------------------------------------------------------------------------------------------- outputs


def _fmt(v: Any) -> str:
  return "-" if v is None else f"{v:.3f}"


def markdown(title: str, result: dict[str, Any], context: str) -> str:
  """The comparison as markdown: rows, the design against the envelope, the designs' sigma_x."""
  lines = [f"### {title}", "", context, "",
           "| method | sigma | voting M | clean acc | ERA | ASR | abstain clean / trig. | majority: clean / ERA / "
           "ASR | largest test radius | largest joint radius | largest poison budget |", "|" + "---|" * 11]
  for row in result["rows"]:
    cra = {k: np.asarray(row["cra"][k]) for k in KINDS}
    reach = {k: result["radii"][k][int(np.flatnonzero(cra[k] > 0).max())] if (cra[k] > 0).any() else None
             for k in KINDS}
    m = row["majority"]
    sigma = "per input" if row["sigma"] is None else f"{row['sigma']:g}"
    lines.append(f"| {row['name']} | {sigma} | "
                 f"{row['voting']} | {_fmt(row['clean_accuracy'])} | {_fmt(row['era'])} | {_fmt(row['asr'])} | "
                 f"{_fmt(row['abstain_clean'])} / {_fmt(row['abstain_triggered'])} | {_fmt(m['clean_accuracy'])} / "
                 f"{_fmt(m['era'])} / {_fmt(m['asr'])} | {reach['test'] or 0:.3f} | {reach['joint'] or 0:.3f} | "
                 f"{'none' if reach['budget'] is None else int(reach['budget'])} |")
  lines += ["", "Against RAB's envelope (the best RAB certified accuracy over sigma at each radius; + above it, "
                "- below it; the largest difference and the radius where it occurs):", "",
            "| design | axis | intervals of r where the design differs from the envelope |", "|---|---|---|"]
  for d in result["designs"]:
    for kind in KINDS:
      parts = [f"{'+' if c['sign'] > 0 else '-'} [{c['from']:.3f}, {c['to']:.3f}]: {c['largest']:+.3f} at "
               f"{c['at']:.3f}" for c in d[kind]]
      axis = f"poison budget k (trigger norm {result['delta']:g})" if kind == "budget" else f"{kind} radius"
      lines.append(f"| {d['name']} | {axis} | {'; '.join(parts) or 'equal everywhere'} |")
  same = [d for d in result["designs"] if "same_voters" in d]
  if same:
    lines += ["", "Against the envelope of RAB with the design's own voters (the same votes without the models that "
                  "choose sigma_x): what remains of a difference once the number of voters is equal:", "",
              "| design | voters | axis | intervals of r where the design differs from that envelope |",
              "|---|---|---|---|"]
    for d in same:
      for kind in RADII:
        parts = [f"{'+' if c['sign'] > 0 else '-'} [{c['from']:.3f}, {c['to']:.3f}]: {c['largest']:+.3f} at "
                 f"{c['at']:.3f}" for c in d["same_voters"][kind]]
        lines.append(f"| {d['name']} | {d['same_voters']['voting']} | {kind} radius | "
                     f"{'; '.join(parts) or 'equal everywhere'} |")
  lines += ["", "sigma_x of the designs' clean test inputs:", "",
            "| design | 5% | 25% | median | 75% | 95% | IQR | at lowest | at highest | share per grid sigma |",
            "|" + "---|" * 10]
  for d in result["designs"]:
    s = d["spread"]
    q = s["quantiles"]
    per = ", ".join(f"{k}: {v:.2f}" for k, v in s["share_per_sigma"].items())
    lines.append(f"| {d['name']} | " + " | ".join(f"{q[k]:.3g}" for k in ("0.05", "0.25", "0.5", "0.75", "0.95"))
                 + f" | {s['iqr']:.3g} | {s['share_at_lowest']:.2f} | {s['share_at_highest']:.2f} | {per} |")
  return "\n".join(lines) + "\n"


def plot_envelope(path: str, title: str, result: dict[str, Any]) -> None:
  """Certified accuracy against the joint radius, the test-input radius and the certified poison budget: RAB's
  curves thin, their envelope a wide pale band behind them (so that a RAB curve on the envelope stays in sight),
  the designs on top; one legend below the panels, off the curves."""
  plt = report.figure()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
  rab = [row for row in result["rows"] if row["sigma"] is not None and not row.get("same_voters")]
  designs = [row for row in result["rows"] if row["sigma"] is None]
  same = [row for row in result["rows"] if row.get("same_voters")]
  cmap = plt.get_cmap("viridis")
  labels = {"joint": "joint l2 radius (training and test triggers)",
            "test": "test-input l2 radius (training set fixed)",
            "budget": f"poisoned training images k (trigger norm {result['delta']:g} on each and on the test input)"}
  for ax, kind in zip(axes, KINDS):
    r = np.asarray(result["radii"][kind])
    ax.step(r, result["envelope"][kind]["cra"], where="post", lw=9, color="0.5", alpha=0.3, zorder=1,
            solid_capstyle="butt", label="RAB envelope (the best RAB at each radius)")
    for i, row in enumerate(rab):  # viridis up to 0.85: its yellow end is hard to see on white
      ax.step(r, row["cra"][kind], where="post", lw=1.2, color=cmap(0.85 * i / max(len(rab) - 1, 1)), zorder=2,
              label=row["name"])
    for i, row in enumerate(designs):
      ax.step(r, row["cra"][kind], where="post", lw=1.8, color=f"C{3 + i}", zorder=3, label=row["name"])
    if same:  # RAB with the selector's voters: its envelope, to tell the choice of sigma from the voter count
      ax.step(r, np.max([row["cra"][kind] for row in same], axis=0), where="post", lw=1.2, ls="--", color="0.2",
              zorder=3, label=f"RAB envelope with {same[0]['voting']} voters (the selector's)")
    reach = max((r[np.flatnonzero(np.asarray(row["cra"][kind]) > 0).max()] for row in result["rows"]
                 if (np.asarray(row["cra"][kind]) > 0).any()), default=r[-1])
    ax.set_xlim(0, reach * 1.05 + (1 if kind == "budget" else 1e-9))
    if kind == "budget" and not any(np.asarray(row["cra"][kind]).any() for row in result["rows"]):
      ax.text(0.5, 0.5, f"no answer is certified against a trigger of norm {result['delta']:g}\n"
                        "even with a clean training set", ha="center", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel(labels[kind], fontsize=8)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("certified accuracy (clean test inputs)")
  axes[0].set_ylim(0, 1.02)
  handles, names = axes[1].get_legend_handles_labels()
  fig.legend(handles, names, fontsize=7, loc="lower center", ncol=min(len(names), 4), frameon=False)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout(rect=(0, 0.04 * (1 + (len(names) - 1) // 4) + 0.02, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_attack(path: str, title: str, result: dict[str, Any]) -> None:
  """Clean accuracy, ERA and ASR against sigma: the colour is the metric; RAB's certified answers solid with dots,
  its majority vote dashed; each design a marker shape at its median sigma_x, filled for its certified answers
  and hollow for its majority vote. The legend, beside the axes, names every colour, line and marker."""
  plt = report.figure()
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(10, 4.2))
  rab = sorted((row for row in result["rows"] if row["sigma"] is not None and not row.get("same_voters")),
               key=lambda row: row["sigma"])
  designs = list(zip((row for row in result["rows"] if row["sigma"] is None), result["designs"]))
  shapes = "*DPs^v"
  sig = [row["sigma"] for row in rab]
  values = (("clean_accuracy", "clean accuracy (clean test inputs)", "C0"),
            ("era", "ERA: triggered inputs answered with their label", "C2"),
            ("asr", "ASR: triggered inputs answered as the target", "C3"))
  for key, _, color in values:
    ax.plot(sig, [np.nan if row[key] is None else row[key] for row in rab], "-o", color=color)
    ax.plot(sig, [row["majority"][key] for row in rab], "--", color=color, alpha=0.7)
    for j, (d, entry) in enumerate(designs):
      at, shape = entry["spread"]["quantiles"]["0.5"], shapes[j % len(shapes)]
      ax.plot([at], [np.nan if d[key] is None else d[key]], shape, ms=10, color=color)
      ax.plot([at], [d["majority"][key]], shape, ms=10, mfc="none", mew=1.4, color=color)
  handles = [Line2D([], [], color=color, lw=2, label=name) for _, name, color in values]
  handles += [Line2D([], [], color="0.35", marker="o", label="RAB at each sigma, certified answers"),
              Line2D([], [], color="0.35", ls="--", label="RAB, majority vote (uncertified)")]
  for j, (d, _) in enumerate(designs):
    shape = shapes[j % len(shapes)]
    handles += [Line2D([], [], color="0.35", ls="none", marker=shape, ms=9, label=f"{d['name']}, certified"),
                Line2D([], [], color="0.35", ls="none", marker=shape, ms=9, mfc="none", mew=1.4,
                       label=f"{d['name']}, majority vote")]
  ax.set_xscale("log")
  ax.set_xticks(sig)
  ax.set_xticklabels([f"{s:g}" for s in sig])
  ax.xaxis.set_minor_formatter(plt.NullFormatter())
  ax.set_xlabel("sigma (RAB's noise level; a design's markers at its median sigma_x)")
  ax.set_ylabel("share of the test inputs")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend beside the axes included
  plt.close(fig)


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
    {"markdown": text, "json": path, "plots": [paths]}.
  """
  from certssb_jax.run import pipeline  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  trainers = ensemble.Trainers()
  records = sweep.run_grid([spec], workdir, None, sigmas, ["fixed"], progress, trainers)
  for variant in designs:
    base, _, arg = spec.partition(":")
    records += sweep.run_grid([f"{base}:{arg},{variant}" if arg else f"{base}:{variant}"], workdir, None, None,
                              ["sample_specific"], progress, trainers)
  rab_runs = {r["sigma_0"]: r["workdir"] for r in records if r["mode"] == "fixed"}
  rab = [answers_of_run(d) for d in rab_runs.values()]
  rows = [answers_of_run(r["workdir"]) for r in records if r["mode"] != "fixed"]
  cfg = config_lib.resolve(config_lib.load_config(spec))
  m = cfg.train.num_models
  selector_models = [max(1, m // 8)] if selector_models is None else selector_models
  same = []
  if selector_models:
    splits = pipeline.test_splits(cfg, pipeline.load_data(cfg))
    x = {s: splits[s].x for s in SPLITS}
    for m_s in selector_models:
      rows.append(grid_selector(rab_runs, x, m_s))
      same += same_voters(rab_runs, x, m_s)
  result = compare(rab, rows, cfg.attack.target_class, same=same)
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
  md = markdown(title, result, context)
  # one name per pair, seed and M: the figures of another size of the same pair are other files
  name = f"{cfg.data.name}_{pair}_{cfg.attack.trigger}_seed{cfg.seed}_M{m}"
  paths = [os.path.join(workdir, f"envelope_{name}.png"), os.path.join(workdir, f"attack_{name}.png")]
  plot_envelope(paths[0], title, result)
  plot_attack(paths[1], title, result)
  files.atomic_write_bytes(os.path.join(workdir, f"envelope_{name}.md"), md.encode())
  files.save_json(os.path.join(workdir, f"envelope_{name}.json"), result)
  return {"markdown": md, "json": os.path.join(workdir, f"envelope_{name}.json"), "plots": paths, "result": result,
          "key": name}


RESULTS_HEADER = [
    "# Results on full-size real data", "",
    "One section per class pair and ensemble size, each written by the command shown at its end from its run "
    "folders (a command rewrites the sections of the pairs it runs and keeps the others); do not edit by hand.", "",
    "How to read the tables. clean acc, ERA, ASR and the abstentions are the certified answers (the store's; an "
    "abstention counts as an error); the majority vote is the smoothed classifier's plain majority, uncertified. "
    "The largest radius is the largest at which any clean input is certified; the poison budget is the most "
    "training images a trigger of the attack's norm may poison with the test input triggered too (docs/method.md "
    "section 3). A Cert-SSB search is named training sigmas / class A / update rule / [sigma_lo, sigma_hi] / pilot "
    "sigma (docs/method.md section 4). A searched sigma_x depends on the poisoned training set, so a searched design "
    "certifies no joint radius (docs/soundness.md). The counting defenses (DPA, bagging) beside RAB and Cert-SSB "
    "on the main pair: [families.md](families.md) (written by `python -m certssb_jax.families`).", ""]
SECTION_START, SECTION_END = "<!-- section {} -->", "<!-- end of section {} -->"


def page_sections(text: str) -> dict[str, str]:
  """The sections of a results page, by key, in page order."""
  found = re.findall(r"<!-- section (\S+) -->\n(.*?)<!-- end of section \1 -->", text, flags=re.S)
  return {key: body for key, body in found}


def write_results_page(path: str, sections: list[dict[str, Any]], command: str) -> None:
  """docs/results.md from the outputs of ``run_envelope`` (plots copied next to it, under ``figures/``): the
  sections of this command's pairs replace their earlier versions; other sections stay as written."""
  folder = os.path.join(os.path.dirname(os.path.abspath(path)), "figures")
  os.makedirs(folder, exist_ok=True)
  merged = page_sections(open(path).read()) if os.path.exists(path) else {}
  for sec in sections:
    parts = [sec["markdown"]]
    for plot in sec["plots"]:
      shutil.copyfile(plot, os.path.join(folder, os.path.basename(plot)))
      parts += [f"![{os.path.basename(plot)}](figures/{os.path.basename(plot)})", ""]
    merged[sec["key"]] = "\n".join(parts + ["Written by", "", "```", command, "```", ""])
  page = list(RESULTS_HEADER)
  for key, body in merged.items():
    page += [SECTION_START.format(key), body.rstrip("\n"), SECTION_END.format(key), ""]
  files.atomic_write_bytes(path, "\n".join(page).encode())


README_START, README_END = "<!-- envelope:start -->", "<!-- envelope:end -->"


def readme_block(sec: dict[str, Any], figure: str) -> str:
  """The README's small table for one class pair: every row's certified and majority-vote numbers and its
  certified accuracy at two radii (a quarter and half of the largest radius RAB certifies), with the figure."""
  res = sec["result"]
  r = np.asarray(res["radii"]["test"])
  env = np.asarray(res["envelope"]["test"]["cra"])
  top = r[np.flatnonzero(env > 0).max()] if (env > 0).any() else r[-1]
  at = [float(r[np.searchsorted(r, f * top)]) for f in (0.25, 0.5)]
  cra = lambda row, kind, x: row["cra"][kind][int(np.searchsorted(r, x))]
  lines = [f"![{res['title']}]({figure})", "", res["context"], "",
           "| method | sigma | M voting | clean acc | ERA / ASR | majority ASR | "
           + " | ".join(f"CRA {k} r={x:.4f}" for k in ("test", "joint") for x in at) + " |", "|" + "---|" * 10]
  for row in res["rows"]:
    sigma = "per input" if row["sigma"] is None else f"{row['sigma']:g}"
    lines.append(f"| {row['name']} | {sigma} | {row['voting']} | {_fmt(row['clean_accuracy'])} | "
                 f"{_fmt(row['era'])} / {_fmt(row['asr'])} | {_fmt(row['majority']['asr'])} | "
                 + " | ".join(f"{cra(row, k, x):.3f}" for k in ("test", "joint") for x in at) + " |")
  return "\n".join(lines) + "\n"


def update_readme(path: str, block: str) -> None:
  """Replaces the README's text between ``README_START`` and ``README_END`` with ``block``."""
  text = open(path).read()
  if README_START not in text or README_END not in text:
    raise ValueError(f"{path} has no {README_START} ... {README_END} block to write the results into")
  head, rest = text.split(README_START, 1)
  _, tail = rest.split(README_END, 1)
  files.atomic_write_bytes(path, f"{head}{README_START}\n{block}{README_END}{tail}".encode())


# ---------------------------------------------------------------------------------------------- command line


def _define_flags() -> None:
  flags.DEFINE_multi_string("config", None, "Config file with optional :variant; repeat for more class pairs.")
  flags.DEFINE_string("workdir", None, "Folder of every row (a sweep folder).")
  flags.DEFINE_multi_string("sigmas", [",".join(f"{s:g}" for s in PAPER_SIGMAS)],
                            "RAB's sigma grid, comma-separated; add every sigma a design tests at. Once for every "
                            "--config, or once per --config in the same order.")
  flags.DEFINE_multi_string("design", [], "A Cert-SSB design as a config variant (e.g. sigma.sigma_hi=0.375).")
  flags.DEFINE_list("selector_models", None, "Models of each RAB ensemble that choose the grid selector's "
                                             "sigma_x (never voting), one design per value; default M // 8; 0: none.")
  flags.DEFINE_string("results_md", None, "Also write this results page (e.g. docs/results.md).")
  flags.DEFINE_string("readme", None, "Also write the first config's table and figure into this README's "
                                      "envelope block (needs --results_md: the figure is linked from there).")
  flags.DEFINE_bool("progress", True, "Show progress bars.")


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
  if f.readme and not f.results_md:
    raise ValueError("--readme needs --results_md (the README links the figure the results page keeps)")
  grids = [_grid(text) for text in f.sigmas] * (len(f.config) if len(f.sigmas) == 1 else 1)
  selector = None if f.selector_models is None else [int(v) for v in f.selector_models if int(v) > 0]
  progress = cli.progress(f.progress)
  sections = [run_envelope(spec, f.workdir, grid, f.design, selector, progress) for spec, grid in zip(f.config, grids)]
  if f.results_md:
    command = "python -m certssb_jax.envelope " + " ".join(
        [f"--config {c}" for c in f.config] + [f"--workdir {f.workdir}"] + [f"--sigmas {g}" for g in f.sigmas]
        + [f"--design {d}" for d in f.design]
        + ([f"--selector_models {','.join(f.selector_models)}"] if f.selector_models is not None else [])
        + [f"--results_md {f.results_md}"] + ([f"--readme {f.readme}"] if f.readme else []))
    write_results_page(f.results_md, sections, command)
    if f.readme:
      figure = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(f.results_md)), "figures",
                                            os.path.basename(sections[0]["plots"][0])),
                               os.path.dirname(os.path.abspath(f.readme)))
      update_readme(f.readme, readme_block(sections[0], figure))
  for sec in sections:
    print(sec["markdown"])
    print("\n".join(sec["plots"]))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
