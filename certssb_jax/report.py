"""The outputs of a run: ``summary.json``, ``per_sample.csv``, ``votes.npz``, ``sigmas.npz`` and the plots.

The schema is documented in the README ("Outputs"); field names are stable.
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

from certssb_jax import bounds
from certssb_jax import certify as certify_lib
from certssb_jax import workdir as wd

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("split", "index", "label", "pred", "votes_top", "num_models", "p_lower", "sigma", "margin", "radius",
               "radius_test", "correct", "pred_stored", "radius_stored", "margin_stored", "aligned", "trimmed")
PACKAGES = ("certssb-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy")


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for p in PACKAGES:
    try:
      out[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      out[p] = "not installed"
  return out


def split_metrics(pred: np.ndarray, radius: np.ndarray, radius_test: np.ndarray, y: np.ndarray,
                  target_class: int) -> dict[str, Any]:
  """Accuracy (abstain counts as wrong), abstain rate, attack success rate and CRA on the grid of one split.

  ``cra`` uses the joint radius (training triggers and test trigger together, METHOD.md section 3);
  ``cra_test`` the test-input radius alone (clean training set), the quantity the paper's code reports.
  """
  correct = pred == y
  return {
      "accuracy": float(np.mean(correct)) if len(y) else float("nan"),
      "abstain_rate": float(np.mean(pred == -1)) if len(y) else float("nan"),
      "target_rate": float(np.mean(pred == target_class)) if len(y) else float("nan"),
      "cra": bounds.certified_accuracy(radius, correct),
      "cra_test": bounds.certified_accuracy(radius_test, correct),
  }


def reference_metrics(exp, raw: dict[str, dict[str, np.ndarray]], num_models: int) -> dict[str, Any]:
  """The reference release's numbers recomputed from the same votes (METHOD.md section 6). NOT sound.

  Its formulas: Hoeffding on the mean soft score with M hard-coded to 1000 and no class-selection correction,
  the radius multiplied by the optimised sigma_x, and a "triggered accuracy" that relabels every triggered input
  to the target class (so it is the attack success rate, reported as an accuracy). Labelled as the reference's.
  """
  c = exp.config
  out: dict[str, Any] = {"note": "the reference release's formulas (unsound: Hoeffding with M fixed at 1000, no "
                                 "selection correction, radius times the optimised sigma_x, triggered accuracy "
                                 "relabelled to the target); for comparison with the paper only"}
  for split in ("clean", "triggered"):
    sig = exp.sigma_test[split]
    cert = bounds.reference_certificate(raw[split]["probs_sum"], sig, sig, c.certify.alpha, num_models=num_models)
    y = exp.splits[split]["y"]
    if split == "clean":
      out["clean_accuracy"] = float(np.mean(cert.pred == y))
      out["cra"] = bounds.certified_accuracy(cert.radius, cert.pred == y)
    else:
      out["triggered_accuracy_relabelled"] = float(np.mean(cert.pred == c.attack.target_class))
  return out


def _headline(per: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The summary's metrics from the per-split metrics: clean split for accuracy and CRA, triggered for ERA/ASR."""
  clean, trig = per["clean"], per["triggered"]
  return {"clean_accuracy": clean["accuracy"], "era": trig["accuracy"], "asr": trig["target_rate"],
          "abstain_rate": clean["abstain_rate"], "cra": clean["cra"], "cra_test": clean["cra_test"],
          "cra_triggered": trig["cra"], "cra_test_triggered": trig["cra_test"]}


def stored_joint_radius(exp, split: str, answer) -> np.ndarray:
  """The joint radius after the storage update: sigma_min * (radius_stored / sigma_x) (METHOD.md section 5.4)."""
  return bounds.sigma_min_of(exp.sigma_test[split], exp.sigma_train) * answer.margin_stored


def _stats(a: np.ndarray) -> dict[str, float]:
  a = np.asarray(a, np.float64)
  return {"min": float(a.min()), "mean": float(a.mean()), "max": float(a.max()), "std": float(a.std()),
          "count": int(a.size)} if a.size else {"count": 0}


def write_outputs(exp, certs: dict[str, bounds.Certificate], raw: dict[str, dict[str, np.ndarray]], stored: dict,
                  undefended: dict[str, float] | None, workdir: str, timings: dict[str, float]) -> dict[str, Any]:
  """Writes every output file of a run and returns the summary."""
  c = exp.config
  m = c.train.num_models
  m_est = m - (c.certify.holdout_models if c.certify.correction == "holdout" else 0)
  per, stored_per = {}, {}
  for split, cert in certs.items():
    y = exp.splits[split]["y"]
    per[split] = split_metrics(cert.pred, cert.radius, cert.radius_test, y, c.attack.target_class)
    if split in stored:
      ans = stored[split]
      stored_per[split] = split_metrics(ans.pred, stored_joint_radius(exp, split, ans), ans.radius_stored, y,
                                        c.attack.target_class)
      stored_per[split].update(aligned=int(ans.aligned.sum()), trimmed=int(ans.trimmed.sum()),
                               stored=int(ans.stored.sum()))

  ceiling = bounds.margin_ceiling(m_est, c.certify.alpha, bound=c.certify.bound, correction=c.certify.correction,
                                  num_classes=exp.data.num_classes)
  if ceiling <= 0:
    logger.warning("M = %d models cannot certify any radius at alpha = %g (margin ceiling 0)", m_est, c.certify.alpha)
  sigma_all = {"train": exp.sigma_train, **exp.sigma_test}
  summary: dict[str, Any] = {
      "dataset": exp.data.name,
      "source": exp.data.source,
      "classes": list(exp.data.classes),
      "n_train": int(len(exp.y_train)),
      "n_test": int(len(exp.splits["clean"]["y"])),
      "n_triggered": int(len(exp.splits["triggered"]["y"])),
      "n_poisoned": int(len(exp.poison_indices)),
      "trigger": c.attack.trigger,
      "delta": c.attack.delta,
      "poison_rate": c.attack.poison_rate,
      "target_class": c.attack.target_class,
      "num_models": m,
      "alpha": c.certify.alpha,
      "bound": c.certify.bound,
      "correction": c.certify.correction,
      "sigma_mode": c.sigma.mode,
      "sigma_0": c.sigma.sigma_0,
      "margin_ceiling": ceiling,
      "metrics": _headline(per),
      "undefended": undefended,
      "sigma": {k: _stats(v) for k, v in sigma_all.items()},
  }
  if stored_per:
    summary["storage_update"] = {
        "order": "dataset order" + (", clean split then triggered split in one store" if c.certify.shared_store
                                    else ", one store per split"),
        **_headline(stored_per),
        **{f"{k}_{split}": stored_per[split][k] for split in stored_per for k in ("aligned", "trimmed", "stored")},
    }
  if c.certify.compat == "reference":
    summary["reference_compat"] = reference_metrics(exp, raw, m)
  trig_norm = exp.splits["triggered"].get("trigger_norm")
  if trig_norm is not None and len(trig_norm):
    summary["trigger_norm_test"] = _stats(trig_norm)
    summary["trigger_norm_train"] = _stats(exp.poison_norms)
  summary["timings_s"] = timings
  summary["versions"] = versions()
  summary["devices"] = [str(d) for d in jax.devices()]
  summary["process_count"] = jax.process_count()

  _write_csv(os.path.join(workdir, "per_sample.csv"), exp, certs, stored, m_est)
  k = exp.data.num_classes
  wd.save_npz(os.path.join(workdir, "votes.npz"),
              **{split: certify_lib.votes_from_preds(raw[split]["preds"], k) for split in certs},
              **{f"{split}_preds": raw[split]["preds"].astype(np.int16) for split in certs},
              **{f"{split}_probs_sum": raw[split]["probs_sum"] for split in certs},
              **{f"{split}_label": exp.splits[split]["y"] for split in certs})
  plot_certified_accuracy(os.path.join(workdir, "certified_accuracy.png"), certs, stored, exp)
  if c.sigma.mode == "sample_specific":
    plot_sigma_histogram(os.path.join(workdir, "sigma_histogram.png"), sigma_all, c.sigma.sigma_0)
  summary["files"] = sorted({f for f in os.listdir(workdir) if not f.startswith(".")} | {"summary.json"})
  wd.save_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def _write_csv(path: str, exp, certs, stored, m_est: int) -> None:
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(CSV_COLUMNS)
  for split, cert in certs.items():
    s = exp.splits[split]
    sig = exp.sigma_test[split]
    ans = stored.get(split)
    for i in range(len(s["y"])):
      row = [split, int(s["index"][i]), int(s["y"][i]), int(cert.pred[i]), int(cert.votes_top[i]), m_est,
             repr(float(cert.p_lower[i])), repr(float(sig[i])), repr(float(cert.margin[i])),
             repr(float(cert.radius[i])), repr(float(cert.radius_test[i])), int(cert.pred[i] == s["y"][i])]
      if ans is not None:
        row += [int(ans.pred[i]), repr(float(ans.radius_stored[i])), repr(float(ans.margin_stored[i])),
                int(ans.aligned[i]), int(ans.trimmed[i])]
      else:
        row += [int(cert.pred[i]), repr(float(cert.radius_test[i])), repr(float(cert.margin[i])), 0, 0]
      w.writerow(row)
  wd.atomic_write_bytes(path, buf.getvalue().encode())


def _figure():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def plot_certified_accuracy(path: str, certs, stored, exp) -> None:
  """CRA(r) against r, clean and triggered splits: left the joint radius, right the test-input radius.

  Solid lines: the certificates; dashed: the answers after the storage update.
  """
  plt = _figure()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, kind in zip(axes, ("joint", "test")):
    curves = []
    for split, color in (("clean", "C0"), ("triggered", "C3")):
      cert, y = certs[split], exp.splits[split]["y"]
      radius = cert.radius if kind == "joint" else cert.radius_test
      curves.append((f"{split}", color, "-", cert.pred == y, radius))
      if split in stored:
        ans = stored[split]
        r_st = stored_joint_radius(exp, split, ans) if kind == "joint" else ans.radius_stored
        curves.append((f"{split}, after storage update", color, "--", ans.pred == y, r_st))
    top = max([float(np.max(c[4])) for c in curves if len(c[4])] + [0.25]) * 1.1
    grid = np.linspace(0, top, 300)
    for label, color, ls, correct, radius in curves:
      ax.plot(grid, [np.mean(correct & (radius > r)) for r in grid], color=color, ls=ls, label=label)
    ax.set_xlabel("joint l2 radius (all triggers)" if kind == "joint" else "test-input l2 radius (clean training)")
    ax.grid(alpha=0.3)
  c = exp.config
  axes[0].set_ylabel("certified robust accuracy")
  axes[0].set_ylim(0, 1.02)
  axes[1].legend(fontsize=8)
  fig.suptitle(f"{exp.data.name} {c.attack.trigger}, sigma_0={c.sigma.sigma_0} ({c.sigma.mode}), "
               f"M={c.train.num_models}, {c.certify.bound}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sigma_histogram(path: str, sigmas: dict[str, np.ndarray], sigma_0: float) -> None:
  """Histogram of the sample-specific sigmas of the training set and the test splits."""
  plt = _figure()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, v in sigmas.items():
    ax.hist(np.asarray(v), bins=40, alpha=0.5, label=f"{name} (n={len(v)})", density=True)
  ax.axvline(sigma_0, color="k", ls=":", label="sigma_0")
  ax.set_xlabel("sigma")
  ax.set_ylabel("density")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
