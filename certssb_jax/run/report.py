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
import ml_collections
import numpy as np

from certssb_jax import defenses, files
from certssb_jax.certify import bounds, kernel as certify_lib
from certssb_jax.data.attacked import SPLITS, Attacked
from certssb_jax.defenses.base import INSERTIONS_DELETIONS, MODIFICATIONS, THREAT_TEXT, Defense
from certssb_jax.run import config as config_lib, metrics, rundir
from certssb_jax.run.config import Config

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


def warn_if_count_uncertifiable(cfg: Config, defense: Defense, n_train: int) -> None:
  """Warns (before any work) when even unanimous votes certify nothing, with the number of members that would
  (bagging's Clopper-Pearson bounds need enough members at alpha / K), if some number up to 2^17 would."""
  largest = defense.largest_certificate(cfg, n_train)
  if min(largest.values()) >= 0:
    logger.info("%s with %d members certifies at most %s", defense.name, cfg.train.num_models,
                ", ".join(f"{v} {THREAT_TEXT[t]}" for t, v in largest.items()))
    return

  def certifies(m: int) -> bool:
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.train.num_models = m
    return min(defense.largest_certificate(c, n_train).values()) >= 0

  need = next((m for m in (2**i for i in range(1, 18)) if m > cfg.train.num_models and certifies(m)), None)
  if need is not None:  # the smallest that does, between need / 2 and need
    need = next(m for m in range(max(cfg.train.num_models + 1, need // 2), need + 1) if certifies(m))
  logger.warning("%s with %d members abstains on every input: unanimous votes certify nothing at alpha = %g; %s",
                 defense.name, cfg.train.num_models, cfg.certify.alpha,
                 f"use train.num_models={need} or more" if need else "more members do not change that (see the "
                 "defense's docs for what its certificate needs)")


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


def summarize(cfg: Config, attacked: Attacked, answers: dict, sigma_train: np.ndarray, sigma_test: dict[str, np.ndarray],
              undefended: dict[str, float] | None, diag: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
  """The content of ``summary.json`` (docs/outputs.md)."""
  c = cfg
  voters = config_lib.num_voters(c)
  trig_norm = attacked.splits["triggered"].trigger_norm
  summary: dict[str, Any] = {
      "dataset": attacked.data.name, "source": attacked.data.source, "classes": list(attacked.data.classes),
      "n_train": int(len(attacked.y_train)), "n_test": int(len(attacked.splits["clean"].y)),
      "n_triggered": int(len(attacked.splits["triggered"].y)), "n_poisoned": int(len(attacked.poison_indices)),
      "trigger": c.attack.trigger, "delta": c.attack.delta, "poison_rate": c.attack.poison_rate,
      "poison_base": c.attack.poison_base, "selection": c.attack.selection, "target_class": c.attack.target_class,
      "seed": c.seed, "method": defenses.get(c).name, "sigma_mode": c.sigma.mode, "sigma_0": c.sigma.sigma_0,
      "num_models": c.train.num_models,
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


def _figure():
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
  plt = _figure()
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
  plt = _figure()
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


# ---------------------------------------------------------------------------------------------- counting defenses

# trigger norms, in units of the attack's, at which a test-time smoothed count is also reported
NORM_GRID = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])

COUNT_CSV_COLUMNS = ("split", "index", "label", "pred", "votes_top", "votes_runner", "votes_total",
                     "certified_modifications", "certified_insertions_deletions", "correct")


def summarize_counts(cfg: Config, defense: Defense, attacked: Attacked, certs: dict, votes: dict[str, np.ndarray],
                     undefended: dict[str, float] | None, timings: dict[str, float]) -> dict[str, Any]:
  """``summary.json`` of a counting defense (DPA, bagging; docs/outputs.md).

  ``metrics`` counts a prediction as given where it is certified against 0 changes of the training set and of the
  test input (bagging abstains where its bound certifies nothing, a test-time smoothed ensemble where its bounds
  do not separate the classes; DPA always answers); ``majority`` is the plain vote. ``cra_poison_budget`` is the
  certified accuracy against k modified training samples (the threat every counting defense here covers, the
  same key as a smoothing run's budget; with a test-time smoothed ensemble, together with a test trigger of the
  attack's norm); ``cra_<threat>`` the same for each threat the defense certifies; ``cra_at_norm`` the same at
  other test-trigger norms, where the defense certifies them.
  """
  y = {s: attacked.splits[s].y for s in SPLITS}
  given = {s: (c.at_norm(0.0) if c.at_norm is not None else c.counts)[MODIFICATIONS] >= 0 for s, c in certs.items()}
  pred = {s: np.where(given[s], certs[s].pred, -1) for s in SPLITS}
  target = cfg.attack.target_class
  answered = pred["triggered"] != -1
  m = {"clean_accuracy": float(np.mean(pred["clean"] == y["clean"])),
       "abstain_rate": float(np.mean(pred["clean"] == -1)),
       "era": float(np.mean(pred["triggered"] == y["triggered"])),
       "asr": float(np.mean(pred["triggered"] == target)) if answered.any() else None,
       "abstain_rate_triggered": float(np.mean(~answered))}
  grids = {}
  for threat in certs["clean"].counts:
    grids[threat] = bounds.budget_grid(int(max(certs[s].counts[threat].max(initial=-1) for s in SPLITS)))
    m[f"cra_{threat}"] = bounds.certified_accuracy_budget(certs["clean"].counts[threat],
                                                          certs["clean"].pred == y["clean"], grids[threat])
  for s, key in (("clean", "cra_poison_budget"), ("triggered", "cra_poison_budget_triggered")):
    m[key] = bounds.certified_accuracy_budget(certs[s].modifications, certs[s].pred == y[s], grids[MODIFICATIONS])
  majority = {"clean_accuracy": float(np.mean(certs["clean"].pred == y["clean"])),
              "era": float(np.mean(certs["triggered"].pred == y["triggered"])),
              "asr": float(np.mean(certs["triggered"].pred == target))}
  train_s = timings.get("train_ensemble")
  exact = certs["clean"].exact
  joint = "" if certs["clean"].trigger_norm is None else \
      f", together with any change of the test input of l2 norm below {certs['clean'].trigger_norm:g}"
  if certs["clean"].at_norm is not None:  # certified accuracy against (r, t): r changed samples, test trigger t
    correct = certs["clean"].pred == y["clean"]
    widest = {threat: bounds.budget_grid(int(c.max(initial=-1))) for threat, c in certs["clean"].at_norm(0.0).items()}
    m["cra_at_norm"] = {f"{t:g}": {threat: bounds.certified_accuracy_budget(c, correct, widest[threat])
                                   for threat, c in certs["clean"].at_norm(t).items()}
                        for t in NORM_GRID * cfg.attack.delta}
    largest = certs["clean"].modifications[correct]
    m["largest_at_trigger_norm"] = {"median": float(np.median(largest)) if largest.size else None,
                                    "max": int(largest.max(initial=-1))}
  return {
      "dataset": attacked.data.name, "source": attacked.data.source, "classes": list(attacked.data.classes),
      "n_train": int(len(attacked.y_train)), "n_test": int(len(y["clean"])), "n_triggered": int(len(y["triggered"])),
      "n_poisoned": int(len(attacked.poison_indices)), "trigger": cfg.attack.trigger, "delta": cfg.attack.delta,
      "poison_rate": cfg.attack.poison_rate, "poison_base": cfg.attack.poison_base,
      "selection": cfg.attack.selection, "target_class": target, "seed": cfg.seed,
      "method": defense.name, "family": defense.family, "defense": defense.describe(cfg),
      "num_models": cfg.train.num_models,
      "threats": {threat: THREAT_TEXT[threat] + joint for threat in certs["clean"].counts},
      "trigger_norm": certs["clean"].trigger_norm,
      "exact": exact,
      "certificates": ("exact counts (no failure probability)" if exact else
                       f"counts that each hold with probability >= 1 - {cfg.certify.alpha:g}"),
      "largest_certificate": defense.largest_certificate(cfg, int(len(attacked.y_train))),
      "poison_budget_grid": list(grids[MODIFICATIONS]),
      "metrics": m, "majority": majority, "undefended": undefended,
      "time_per_member_s": train_s / cfg.train.num_models if train_s else None,
      "timings_s": timings, "versions": versions(), "devices": [str(d) for d in jax.devices()],
      "process_count": jax.process_count(),
  }


def write_count_outputs(cfg: Config, defense: Defense, attacked: Attacked, certs: dict, counts: dict[str, np.ndarray],
                        votes: dict[str, np.ndarray], undefended: dict[str, float] | None,
                        rd: rundir.RunDir) -> dict[str, Any]:
  """Writes the output files of a counting defense's run and returns its summary.

  Args:
    counts: split -> the vote counts (N, K) the certificates come from.
    votes: what the run's voting stage saved (every member's vote per split, ``<split>_preds``, where members
      vote on the clean query).
  """
  summary = summarize_counts(cfg, defense, attacked, certs, votes, undefended, rd.timings())
  with_bounds = certs["clean"].bounds is not None
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(COUNT_CSV_COLUMNS + (("p_lower", "p_upper_runner") if with_bounds else ()))
  for split in SPLITS:
    s, c = attacked.splits[split], certs[split]
    for i in range(len(s.y)):
      insdel = c.counts.get(INSERTIONS_DELETIONS)  # blank where the defense does not certify that threat
      w.writerow([split, int(s.index[i]), int(s.y[i]), int(c.pred[i]), int(c.votes_top[i]), int(c.votes_runner[i]),
                  int(counts[split][i].sum()), int(c.modifications[i]), "" if insdel is None else int(insdel[i]),
                  int(c.pred[i] == s.y[i])] + ([repr(float(b[i])) for b in c.bounds] if with_bounds else []))
  files.atomic_write_bytes(rd.file("per_sample.csv"), buf.getvalue().encode())
  files.save_npz(rd.file("votes.npz"), **{s: counts[s] for s in SPLITS},
                 **{f"{s}_preds": votes[f"{s}_preds"].astype(np.int16) for s in SPLITS if f"{s}_preds" in votes},
                 **{f"{s}_label": attacked.splits[s].y for s in SPLITS})
  plot_count_certificates(rd.file("certified_accuracy.png"), cfg, defense, attacked, certs)
  summary["files"] = sorted({f for f in os.listdir(rd.path) if not f.startswith(".")} | {"summary.json"})
  files.save_json(rd.file("summary.json"), summary)
  return summary


def plot_count_certificates(path: str, cfg: Config, defense: Defense, attacked: Attacked, certs: dict) -> None:
  """Certified accuracy (clean split) and certified ERA (triggered split) against the number of modified
  training samples, exact step curves; for counts that hold with a test trigger, the clean split at several
  trigger norms too."""
  plt = _figure()
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  correct = {s: certs[s].pred == attacked.splits[s].y for s in SPLITS}
  t = certs["clean"].trigger_norm
  at = "" if t is None else f", test trigger < {t:g}"
  curves = [(budget_curve(certs["clean"].modifications, correct["clean"]), "C0", "-", f"clean: certified accuracy{at}"),
            (budget_curve(certs["triggered"].modifications, correct["triggered"]), "C3", "-",
             f"triggered: certified ERA{at}")]
  if certs["clean"].at_norm is not None:
    for norm, style in ((0.0, ":"), (t / 2, "--")):
      curves.append((budget_curve(certs["clean"].at_norm(norm)[MODIFICATIONS], correct["clean"]), "C0", style,
                     "clean: certified accuracy, " + (f"test trigger < {norm:g}" if norm else "no test trigger")))
  right = max(1, *(int(ks[-1]) for (ks, _), *_ in curves))
  for (ks, acc), color, style, label in curves:
    ax.step(np.append(ks, right), np.append(acc, acc[-1]), where="post", color=color, ls=style, lw=1.4, label=label)
  ax.set_xlim(0, right)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel(THREAT_TEXT[MODIFICATIONS])
  ax.set_ylabel("certified accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  ax.set_title(f"{attacked.data.name} {tuple(attacked.data.classes)}, {cfg.attack.trigger} trigger, {defense.name} "
               f"M={cfg.train.num_models}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
