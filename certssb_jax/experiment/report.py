"""The outputs of a run: ``summary.json``, ``per_sample.csv``, ``votes.npz`` and the plots.

The schema is documented in docs/outputs.md; field names are stable.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import logging
import os
import platform
from typing import Any

import jax
import numpy as np

from certssb_jax import defenses, files
from certssb_jax.certify import bounds, kernel as certify_lib
from certssb_jax.data.attacked import SPLITS, Attacked
from certssb_jax.experiment import config as config_lib, metrics, rundir
from certssb_jax.experiment.config import Config

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("split", "index", "label", "pred", "votes_top", "num_models", "p_lower", "sigma", "margin", "radius",
               "radius_test", "correct", "pred_stored", "radius_stored", "radius_joint_stored", "margin_stored",
               "aligned", "trimmed", "poison_budget")
PACKAGES = ("certssb-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy")


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for p in PACKAGES:
    try:
      out[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      out[p] = "not installed"
  return out


def warn_if_uncertifiable(cfg: Config) -> float:
  """Logs the margin ceiling of the run, or warns (before any work) when it certifies nothing; returns it."""
  c = cfg.certify
  m_est = config_lib.num_voters(cfg) - c.holdout_models
  ceiling = metrics.margin_ceiling(cfg)
  k = len(cfg.data.classes)
  if ceiling <= 0:
    need = next((m for m in range(m_est + 1, 100_000) if bounds.margin_ceiling(
        m, c.alpha, bound=c.bound, correction=c.correction, num_classes=k) > 0), None)
    logger.warning("%d estimating models cannot certify any radius at alpha = %g with %s; at least %s are needed",
                   m_est, c.alpha, c.bound, need)
  else:
    logger.info("margin ceiling for %d estimating models, alpha = %g (%s): %.4f sigma, radius <= %.4f at "
                "sigma_0 = %g", m_est, c.alpha, c.bound, ceiling, ceiling * cfg.sigma.sigma_0, cfg.sigma.sigma_0)
  return ceiling


def _stats(a: np.ndarray) -> dict[str, float]:
  a = np.asarray(a, np.float64)
  return {"min": float(a.min()), "mean": float(a.mean()), "max": float(a.max()), "std": float(a.std()),
          "count": int(a.size)} if a.size else {"count": 0}


def sigma_spread(a: np.ndarray, lo: float, hi: float) -> dict[str, Any]:
  """How much a searched sigma varies: ``_stats``, the quantiles, the interquartile range and the share of samples
  at each clip of the range [lo, hi] (a search whose optimum is a clip for nearly every input is one sigma)."""
  a = np.asarray(a, np.float64)
  if not a.size:
    return {"count": 0}
  q = {str(p): float(np.quantile(a, p)) for p in (0.05, 0.25, 0.5, 0.75, 0.95)}
  at = lambda x: float(np.mean(np.abs(a - x) <= 1e-6 * max(abs(x), 1e-12)))
  return {**_stats(a), "quantiles": q, "iqr": q["0.75"] - q["0.25"], "share_at_lo": at(lo), "share_at_hi": at(hi)}


def run_fields(cfg: Config, attacked: Attacked) -> dict[str, Any]:
  """What every run's ``summary.json`` starts with, whatever its defense: the data, the attack, the seed, the
  defense (its name and settings) and M."""
  defense = defenses.get(cfg)
  a = cfg.attack
  return {"dataset": attacked.data.name, "source": attacked.data.source, "classes": list(attacked.data.classes),
          "n_train": int(len(attacked.y_train)), "n_test": int(len(attacked.splits["clean"].y)),
          "n_triggered": int(len(attacked.splits["triggered"].y)), "n_poisoned": int(len(attacked.poison_indices)),
          "trigger": a.trigger, "delta": a.delta, "poison_rate": a.poison_rate, "poison_base": a.poison_base,
          "selection": a.selection, "target_class": a.target_class, "seed": cfg.seed, "method": defense.name,
          "family": defense.family, "defense": {"name": cfg.defense.name, **defense.describe(cfg)},
          "num_models": cfg.train.num_models}


def summarize(cfg: Config, attacked: Attacked, answers: dict, sigma_train: np.ndarray, sigma_test: dict[str, np.ndarray],
              undefended: dict[str, float] | None, diag: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
  """The content of ``summary.json`` (docs/outputs.md)."""
  c = cfg
  voters = config_lib.num_voters(c)
  trig_norm = attacked.splits["triggered"].trigger_norm
  summary: dict[str, Any] = {
      **run_fields(c, attacked), "sigma_0": c.sigma.sigma_0,
      "models": {"trained": c.train.num_models, "search": c.train.num_models - voters, "voting": voters,
                 "class_selection": c.certify.holdout_models, "estimating": voters - c.certify.holdout_models},
      "alpha": c.certify.alpha, "bound": c.certify.bound, "correction": c.certify.correction,
      "margin_ceiling": metrics.margin_ceiling(c), "radius_grid": list(metrics.radius_grid(c)),
      "poison_budget_grid": list(metrics.poison_budget_grid(c, sigma_train, sigma_test)),
      "query_order": c.certify.query_order,
      "certificates": "the storage-update answers: every query of the run went through one store in "
                      f"{c.certify.query_order.replace('_', ' ')} order; the answers depend on that order (whoever "
                      "queries first decides) and no two of them contradict each other",
      "metrics": metrics.answer_metrics(c, attacked, answers, sigma_train, sigma_test),
      **diag,
      "undefended": undefended,
      "sigma": {"train": _stats(sigma_train), **{s: sigma_spread(sigma_test[s], c.sigma.sigma_lo or c.sigma.sigma_0,
                                                                 c.sigma.sigma_hi or c.sigma.sigma_0)
                                                  for s in SPLITS}},
      "trigger_norm_test": _stats(trig_norm) if trig_norm is not None else {"count": 0},
      "trigger_norm_train": _stats(attacked.poison_norms),
      # The certificate is about the classifier the kernel computes, in the precision it computes in.
      "precision": {"parameters": "float32", "matmul_precision": jax.config.jax_default_matmul_precision or "backend default",
                    "backend": jax.default_backend(), "bounds": "float64"},
      "timings_s": timings,
      "versions": versions(),
      "devices": [str(d) for d in jax.devices()],
      "process_count": jax.process_count(),
  }
  if "sigma_search" in defenses.get(c).diagnostics:
    summary["sigma_search"] = {k: c.sigma[k] for k in ("train", "objective", "rule", "scorer", "sigma_lo", "sigma_hi",
                                                       "start", "pilot_sigma", "num_steps")}
  return summary


def write_outputs(cfg: Config, attacked: Attacked, certs: dict[str, bounds.Certificate], answers: dict,
                  votes: dict[str, np.ndarray], sigma_train: np.ndarray, sigma_test: dict[str, np.ndarray],
                  undefended: dict[str, float] | None, diag: dict[str, Any], rd: rundir.RunDir) -> dict[str, Any]:
  """Writes every output file of a run and returns the summary."""
  summary = summarize(cfg, attacked, answers, sigma_train, sigma_test, undefended, diag, rd.timings())
  k = len(cfg.data.classes)
  voters = config_lib.num_voters(cfg)
  budgets = metrics.poison_budgets(cfg, answers, sigma_train, sigma_test)
  _write_csv(rd.file("per_sample.csv"), attacked, certs, answers, sigma_test, budgets,
             voters - cfg.certify.holdout_models)
  files.save_npz(rd.file("votes.npz"),
                  **{s: certify_lib.votes_from_preds(votes[f"{s}_preds"][-voters:], k) for s in SPLITS},
                  **{f"{s}_preds": votes[f"{s}_preds"].astype(np.int16) for s in SPLITS},
                  **{f"{s}_probs_sum": votes[f"{s}_probs_sum"] for s in SPLITS},
                  **{f"{s}_label": attacked.splits[s].y for s in SPLITS})
  plot_certified_accuracy(rd.file("certified_accuracy.png"), cfg, attacked, certs, answers, summary, budgets)
  if "sigma_histogram" in defenses.get(cfg).diagnostics:
    plot_sigma_histogram(rd.file("sigma_histogram.png"), cfg, attacked, sigma_train, sigma_test)
  summary["files"] = sorted({f for f in os.listdir(rd.path) if not f.startswith(".")} | {"summary.json"})
  files.save_json(rd.file("summary.json"), summary)
  return summary


def _write_csv(path: str, attacked: Attacked, certs: dict, answers: dict, sigma_test: dict, budgets: dict,
               m_est: int) -> None:
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(CSV_COLUMNS)
  for split in SPLITS:
    s, cert, ans, sig, budget = (attacked.splits[split], certs[split], answers[split], sigma_test[split],
                                 budgets[split])
    for i in range(len(s.y)):
      w.writerow([split, int(s.index[i]), int(s.y[i]), int(cert.pred[i]), int(cert.votes_top[i]), m_est,
                  repr(float(cert.p_lower[i])), repr(float(sig[i])), repr(float(cert.margin[i])),
                  repr(float(cert.radius[i])), repr(float(cert.radius_test[i])), int(cert.pred[i] == s.y[i]),
                  int(ans.pred[i]), repr(float(ans.radius_stored[i])), repr(float(ans.radius_joint[i])),
                  repr(float(ans.margin_stored[i])), int(ans.aligned[i]), int(ans.trimmed[i]), int(budget[i])])
  files.atomic_write_bytes(path, buf.getvalue().encode())


# ---------------------------------------------------------------------------------------------- plots


def figure():
  """matplotlib's pyplot on the file-only backend (runs write figures, they never show them)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def cra_curve(radius: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The exact step curve of CRA(r) = mean(correct & radius > r): (r, CRA) pairs to draw with ``where="post"``."""
  r = np.sort(np.asarray(radius, np.float64)[np.asarray(correct, bool)])
  xs = np.concatenate([[0.0], r])
  ys = np.array([np.mean(correct & (radius > x)) for x in xs])
  return xs, ys


def run_title(cfg: Config, attacked: Attacked) -> str:
  return (f"{attacked.data.name} {tuple(attacked.data.classes)}, {cfg.attack.trigger} trigger, "
          f"{defenses.get(cfg).name} sigma_0={cfg.sigma.sigma_0:g}, M={cfg.train.num_models}, "
          f"alpha={cfg.certify.alpha:g} ({cfg.certify.bound})")


def plot_certified_accuracy(path: str, cfg: Config, attacked: Attacked, certs: dict, answers: dict,
                            summary: dict[str, Any], budgets: dict[str, np.ndarray] | None = None) -> None:
  """CRA(r) against r, exact step curves: left the joint radius, middle the test-input radius; with `budgets`
  (``metrics.poison_budgets``) a third panel, certified accuracy against the number k of poisoned training
  images at the run's trigger norm.

  Thin solid lines: the certificates (storage-update answers); wide pale lines: the certificates before the
  store (uncertified in Cert-SSB runs). Clean split blue, triggered split red. Dotted: the largest radius the
  margin ceiling allows at sigma_0 (and at the largest sigma_x); dash-dotted: the test trigger's l2 norm.
  """
  plt = figure()
  fig, axes = plt.subplots(1, 2 if budgets is None else 3, figsize=(11 if budgets is None else 15.5, 4.2),
                           sharey=True)
  ceiling = summary["margin_ceiling"]
  sigma_max = max(summary["sigma"][s]["max"] for s in SPLITS)
  trig_norm = summary["trigger_norm_test"].get("mean")
  for ax, kind in zip(axes, ("joint", "test")):
    for split, color in (("clean", "C0"), ("triggered", "C3")):
      y = attacked.splits[split].y
      cert, ans = certs[split], answers[split]
      before = cert.radius if kind == "joint" else cert.radius_test
      after = ans.radius_joint if kind == "joint" else ans.radius_stored
      ax.step(*cra_curve(before, cert.pred == y), where="post", color=color, lw=5, alpha=0.25,
              label=f"{split}, before the store")
      ax.step(*cra_curve(after, ans.pred == y), where="post", color=color, lw=1.4, label=f"{split} (certificates)")
    marks = [(ceiling * cfg.sigma.sigma_0, "ceiling x sigma_0")]
    if kind == "test" and sigma_max > cfg.sigma.sigma_0 * 1.001:  # the joint radius uses min(sigma_x, sigma_j)
      marks.append((ceiling * sigma_max, "ceiling x largest sigma_x"))
    for x, label in marks:
      ax.axvline(x, color="0.4", ls=":", lw=1)
      ax.text(x, 1.0, f" {label}", rotation=90, va="top", ha="right", fontsize=7, color="0.3",
              bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})  # legible over a curve
    if trig_norm and kind == "test":
      ax.axvline(trig_norm, color="k", ls="-.", lw=1)
      ax.text(trig_norm, 0.02, f" trigger norm {trig_norm:.2f}", rotation=90, va="bottom", ha="right", fontsize=7)
    if kind == "joint" and not metrics.certifies_training_perturbations(cfg):
      ax.text(0.5, 0.5, "searched sigma_x: the answers certify their test-input radius only\n"
                        "(sigma_x depends on the training set), so every joint radius is 0", ha="center",
              va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("joint l2 radius (training and test triggers)" if kind == "joint"
                  else "test-input l2 radius (clean training set)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
  if budgets is not None:
    _plot_budget_panel(axes[2], attacked, answers, budgets, cfg.attack.delta, ceiling, sigma_max,
                       metrics.certifies_training_perturbations(cfg))
  axes[0].set_ylabel("certified robust accuracy")
  axes[0].set_ylim(0, 1.02)
  axes[1].legend(fontsize=7, loc="lower left")
  fig.suptitle(run_title(cfg, attacked), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def budget_curve(budget: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The exact step curve of mean(correct & budget >= k) over k >= 0: (k, value) at k = 0 and wherever it drops
  (one past each budget of a correct answer), to draw with ``where="post"``."""
  counted = np.sort(np.asarray(budget, np.int64)[np.asarray(correct, bool)])  # budgets of the correct answers
  ks = np.unique(np.concatenate([[0], counted[counted >= 0] + 1]))
  return ks, (counted.size - np.searchsorted(counted, ks, side="left")) / len(budget)


def budget_note(attacked: Attacked, answers: dict, budgets: dict[str, np.ndarray], delta: float, ceiling: float,
                sigma_max: float, joint: bool) -> str | None:
  """Why the poison-budget panel is flat, in a sentence for the panel (None where a curve shows something).

  A correct answer certifies k = 0 (a trigger of norm t on the test input, none on training images) only if its
  test-input radius exceeds t, and no radius exceeds the margin ceiling times sigma_x; a run that searched its
  sigmas certifies the test input alone (``metrics.certifies_training_perturbations``).
  """
  correct = {s: answers[s].pred == attacked.splits[s].y for s in SPLITS}
  if not any((budgets[s][correct[s]] >= 0).any() for s in SPLITS):
    if ceiling * sigma_max <= delta:
      return (f"no answer certifies a trigger of norm t = {delta:g}, not even on the test input alone:\n"
              f"the margin ceiling x sigma_x, {ceiling:.2f} x {sigma_max:.3g} = {ceiling * sigma_max:.3g}, is below t\n"
              "(the ceiling grows with the number of models)")
    best = max(float(answers[s].radius_stored[correct[s]].max(initial=0.0)) for s in SPLITS)
    return (f"no correct answer certifies a trigger of norm t = {delta:g}, not even on the test input alone:\n"
            f"the largest certified test-input radius, {best:.3g}, is below t")
  if not joint:
    return ("searched sigma_x: the answers certify the test input alone,\n"
            "no poisoned training image (k = 0 only)")
  return None


def _plot_budget_panel(ax: Any, attacked: Attacked, answers: dict, budgets: dict[str, np.ndarray], delta: float,
                       ceiling: float, sigma_max: float, joint: bool) -> None:
  """Certified accuracy of the answers against k poisoned training images (``bounds.poison_budget``), with a
  sentence on the panel where it is flat (``budget_note``)."""
  curves = {s: budget_curve(budgets[s], answers[s].pred == attacked.splits[s].y) for s in SPLITS}
  right = max(1, *(int(ks[-1]) for ks, _ in curves.values()))
  for split, color in (("clean", "C0"), ("triggered", "C3")):
    ks, acc = curves[split]
    # carried on to the common right end, so that a curve that is 0 from k = 0 still shows
    ax.step(np.append(ks, right), np.append(acc, acc[-1]), where="post", color=color, lw=1.4,
            label=f"{split} (certificates)")
  ax.set_xscale("symlog", linthresh=1.0)  # budgets span 0 to thousands
  ax.set_xlim(0, right)
  ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")  # image counts, not powers of ten
  ax.set_xlabel(f"poisoned training images k (trigger norm {delta:g} on each and on the test input)", fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower left")
  note = budget_note(attacked, answers, budgets, delta, ceiling, sigma_max, joint)
  if note:
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=8)


def plot_sigma_histogram(path: str, cfg: Config, attacked: Attacked, sigma_train: np.ndarray,
                         sigma_test: dict[str, np.ndarray]) -> None:
  """Counts of the sample-specific sigmas on a log scale: training samples (poisoned ones highlighted) and
  test inputs (clean and triggered), with the search's clip bounds marked; the legend below each panel, off the
  bars. A panel whose sigmas are all one value (every sample at sigma_0, Cert-SSB's default) says so in a
  sentence instead of drawing a single bar."""
  plt = figure()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True)
  lo, hi = cfg.sigma.sigma_lo, cfg.sigma.sigma_hi
  everything = np.concatenate([sigma_train, *sigma_test.values()])
  bins = np.linspace(min(lo, everything.min()), max(min(hi, everything.max() * 1.05), lo * 1.01), 41)
  poisoned = np.zeros(len(sigma_train), bool)
  poisoned[attacked.poison_indices] = True
  groups = ((axes[0], "training samples", (("clean", sigma_train[~poisoned], "C0"),
                                           ("poisoned", sigma_train[poisoned], "C3"))),
            (axes[1], "test inputs", (("clean", sigma_test["clean"], "C0"),
                                      ("triggered", sigma_test["triggered"], "C3"))))
  for ax, title, parts in groups:
    group = np.concatenate([v for _, v, _ in parts])
    if group.size and group.min() == group.max():
      at, where = next(((name, where) for name, v, where in (
          ("sigma_0", cfg.sigma.sigma_0, ""), ("sigma_hi", hi, "the top of the search range; "),
          ("sigma_lo", lo, "the bottom of the search range; ")) if v == group[0]), ("sigma", ""))
      counts = ", ".join(f"{len(v)} {name}" for name, v, _ in parts)
      ax.text(0.5, 0.5, f"every one of the {title} at {at} = {group[0]:g}\n({where}{counts})", ha="center",
              va="center", transform=ax.transAxes, fontsize=9)
      ax.set_yticks([])
      ax.tick_params(axis="x", bottom=False, labelbottom=False)  # per panel: the x axis is shared
      ax.set_title(title, fontsize=9)
      continue
    for name, values, color in parts:
      sp = sigma_spread(values, lo, hi)
      label = (f"{name} (n={len(values)}, median {sp['quantiles']['0.5']:.3f}, IQR {sp['iqr']:.3f}, "
               f"{sp['share_at_lo']:.0%} at sigma_lo, {sp['share_at_hi']:.0%} at sigma_hi)") if len(values) else \
          f"{name} (n=0)"
      ax.hist(values, bins=bins, color=color, alpha=0.55, label=label)
    marks: dict[float, list[str]] = {}
    for x, label in ((lo, "sigma_lo"), (cfg.sigma.sigma_0, "sigma_0"), (hi, "sigma_hi")):
      marks.setdefault(x, []).append(label)
    for x, labels in marks.items():
      ax.axvline(x, color="k", ls=":", lw=1)
      ax.text(x, 0.98, f" {' = '.join(labels)}", transform=ax.get_xaxis_transform(), rotation=90, va="top",
              fontsize=7, bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
    ax.set_yscale("log")
    ax.set_ylabel("count (log scale)")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("sigma")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below the axis, off the bars
  fig.suptitle(run_title(cfg, attacked), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
