"""The envelope comparison's figures, drawn from ``comparison.compare``'s result: certified accuracy against the
radii with RAB's envelope behind the curves (``plot_envelope``), and clean accuracy, ERA and ASR against sigma
(``plot_attack``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from certssb_jax.envelope.answers import KINDS
from certssb_jax.experiment import report


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
