"""The outputs of a run of a defense that counts poisoned samples (DPA, Finite Aggregation, bagging, DPA with
test-time smoothing): ``summary.json``, ``per_sample.csv``, ``votes.npz`` and ``certified_accuracy.png``
(docs/outputs.md); the shared pieces (versions, figures, curves) are ``report``'s."""

from __future__ import annotations

import csv
import io
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from certssb_jax import files
from certssb_jax.certify import bounds
from certssb_jax.data.attacked import SPLITS, Attacked
from certssb_jax.defenses.base import INSERTIONS_DELETIONS, MODIFICATIONS, THREAT_TEXT, Defense
from certssb_jax.experiment import metrics, rundir
from certssb_jax.experiment.config import Config
from certssb_jax.experiment.report import budget_curve, figure, run_fields, versions

logger = logging.getLogger(__name__)


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
  attack = metrics.attack_metrics(pred, y, target)
  m = {"clean_accuracy": attack["clean_accuracy"], "abstain_rate": float(np.mean(pred["clean"] == -1)),
       "era": attack["era"], "asr": attack["asr"], "abstain_rate_triggered": float(np.mean(pred["triggered"] == -1))}
  grids = {}
  for threat in certs["clean"].counts:
    grids[threat] = bounds.budget_grid(int(max(certs[s].counts[threat].max(initial=-1) for s in SPLITS)))
    m[f"cra_{threat}"] = bounds.certified_accuracy_budget(certs["clean"].counts[threat],
                                                          certs["clean"].pred == y["clean"], grids[threat])
  for s, key in (("clean", "cra_poison_budget"), ("triggered", "cra_poison_budget_triggered")):
    m[key] = bounds.certified_accuracy_budget(certs[s].modifications, certs[s].pred == y[s], grids[MODIFICATIONS])
  majority = metrics.attack_metrics({s: certs[s].pred for s in SPLITS}, y, target)
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
      **run_fields(cfg, attacked),
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
      vote on the clean query; their ranks of the classes, ``<split>_ranks``, where the defense asks for them).
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
                 **{f"{s}_ranks": votes[f"{s}_ranks"] for s in SPLITS if f"{s}_ranks" in votes},
                 **{f"{s}_label": attacked.splits[s].y for s in SPLITS})
  plot_count_certificates(rd.file("certified_accuracy.png"), cfg, defense, attacked, certs)
  summary["files"] = sorted({f for f in os.listdir(rd.path) if not f.startswith(".")} | {"summary.json"})
  files.save_json(rd.file("summary.json"), summary)
  return summary


def plot_count_certificates(path: str, cfg: Config, defense: Defense, attacked: Attacked, certs: dict) -> None:
  """Certified accuracy (clean split) and certified ERA (triggered split) against the number of modified
  training samples, exact step curves; for counts that hold with a test trigger, the clean split at several
  trigger norms too."""
  plt = figure()
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
