"""What a run's answers mean: accuracies, ASR and CRA, the consistency audit, the side-channel probe and the
reference release's numbers (docs/method.md sections 3, 5-7). Host-side numpy; ``report`` writes the results.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.stats

from certssb_jax import defenses
from certssb_jax.certify import bounds, kernel as certify_lib
from certssb_jax.data.attacked import SPLITS, Attacked
from certssb_jax.experiment import config as config_lib
from certssb_jax.experiment.config import Config
from certssb_jax.store.certified import StoreAnswer, audit

logger = logging.getLogger(__name__)

# Radii of the CRA curves, in units of ceiling * sigma_0: RAB's largest certifiable test-input radius is 1 on
# this scale, a sample-specific run's sigma_hi / sigma_0 (1.5 by default). CRA counts radius > r, so the grid
# stops just below those ends (an input certified at the ceiling counts at 0.95 and 1.45).
GRID_UNITS = (0.0, 0.25, 0.5, 0.75, 0.95, 1.25, 1.45, 1.75, 1.95)
# The side-channel probe warns when sigma_j ranks the suspicious training samples this well (AUC) ...
CHANNEL_AUC = 0.7
# ... or when triggered inputs get less noise than their clean copies and the attack is this much stronger at
# the smallest sigma_x than at the largest.
CHANNEL_ASR_GAP = 0.1


def margin_ceiling(cfg: Config) -> float:
  """The largest margin the run's estimation models and alpha allow at all (sigma units)."""
  c = cfg.certify
  m_est = config_lib.num_voters(cfg) - c.holdout_models
  return bounds.margin_ceiling(m_est, c.alpha, bound=c.bound, correction=c.correction,
                               num_classes=len(cfg.data.classes))


def radius_grid(cfg: Config) -> tuple[float, ...]:
  """The radii CRA is reported at: ``GRID_UNITS`` times ceiling * sigma_0 (the same grid for RAB and Cert-SSB
  runs of one M, alpha and sigma_0, so their curves compare point by point)."""
  unit = margin_ceiling(cfg) * cfg.sigma.sigma_0
  return tuple(round(u * unit, 4) for u in GRID_UNITS)


def split_metrics(pred: np.ndarray, radius_joint: np.ndarray, radius_test: np.ndarray, y: np.ndarray,
                  target_class: int, grid: tuple[float, ...]) -> dict[str, Any]:
  """Accuracy (abstain counts as wrong), abstain rate, rate of the target class and CRA of one split.

  ``cra`` uses the joint radius (training triggers and test trigger together, docs/method.md section 3);
  ``cra_test`` the test-input radius alone (clean training set), the quantity the paper reports.
  """
  correct = pred == y
  answered = pred != -1
  return {
      "accuracy": float(np.mean(correct)),
      "abstain_rate": float(np.mean(~answered)),
      # Of all inputs (an abstention is no success of the attack); None when every input abstained, which
      # says nothing about the attack (a 0 there would read as a perfect defense).
      "target_rate": float(np.mean(pred == target_class)) if answered.any() else None,
      "cra": bounds.certified_accuracy(radius_joint, correct, grid),
      "cra_test": bounds.certified_accuracy(radius_test, correct, grid),
  }


def headline(per: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The summary's metrics from the per-split metrics: clean split for accuracy and CRA, triggered for ERA/ASR."""
  clean, trig = per["clean"], per["triggered"]
  return {"clean_accuracy": clean["accuracy"], "abstain_rate": clean["abstain_rate"], "era": trig["accuracy"],
          "asr": trig["target_rate"], "abstain_rate_triggered": trig["abstain_rate"], "cra": clean["cra"],
          "cra_test": clean["cra_test"], "cra_triggered": trig["cra"], "cra_test_triggered": trig["cra_test"]}


def answer_poison_budget(answer: StoreAnswer, sigma_x: np.ndarray, sigma_train: np.ndarray,
                         trigger_norm: float, *, joint: bool = True) -> np.ndarray:
  """(N,) int64 certified poison budget of storage-update answers at trigger norm t (``bounds.poison_budget``).

  An answer from its own (possibly trimmed) ball keeps a whitened certificate at its sigma_x and the training
  sigmas: margin_stored, at s_train = min_j sigma_j. An aligned answer took its label from a ball certified at
  another sigma_x, so its margin_stored is no whitened margin of its own (it can exceed the source ball's); it
  keeps its test-input radius radius_stored (budget 0 when t < radius_stored) and its joint radius J, an
  isotropic certificate whose budget is the largest k with t^2 (k + 1) < J^2. Abstentions get -1.

  Args:
    answer: the answers of one split.
    sigma_x: (N,) the sigma_x each query was certified at.
    sigma_train: (n,) the training samples' sigma_j.
    trigger_norm: t > 0.
    joint: whether the answers certify training perturbations at all; False (a run that searched its sigmas
      from the poisoned training set) caps every budget at 0, the test trigger alone.
  """
  own = bounds.poison_budget(answer.margin_stored, float(np.min(sigma_train)), sigma_x, trigger_norm)  # (N,)
  isotropic = bounds.poison_budget(answer.radius_joint, 1.0, 1.0, trigger_norm)  # (N,)
  # k = 0 of the whitened form is t < radius_stored, the test-input certificate every answer keeps
  budget = np.where(answer.aligned, np.maximum(isotropic, np.minimum(own, 0)), own)
  return (budget if joint else np.minimum(budget, 0)).astype(np.int64)


def certifies_training_perturbations(cfg: Config) -> bool:
  """Whether the answers' joint certificates hold: not when the sigmas were searched, since a searched sigma
  (chosen by models trained on the poisoned training set) moves with the training set the certificate holds
  fixed; such a run certifies the test input alone."""
  return not defenses.noise_plan(cfg).search_test


def poison_budgets(cfg: Config, answers: dict[str, StoreAnswer], sigma_train: np.ndarray,
                   sigma_test: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The poison budget of every answer of each split, at the run's trigger norm t = ``attack.delta``."""
  joint = certifies_training_perturbations(cfg)
  return {s: answer_poison_budget(answers[s], sigma_test[s], sigma_train, cfg.attack.delta, joint=joint)
          for s in SPLITS}


def poison_budget_grid(cfg: Config, sigma_train: np.ndarray, sigma_test: dict[str, np.ndarray]) -> tuple[int, ...]:
  """The budgets k certified accuracy is reported at: 0, 1, 2, 4, ... up to the first power of 2 that no answer
  of the run can reach (at the margin ceiling and the largest sigma_x), the same for both query orders."""
  ceiling, t = margin_ceiling(cfg), cfg.attack.delta
  s_train = float(np.min(sigma_train))
  sigma_max = max(float(np.max(sigma_test[s])) for s in SPLITS)
  # an aligned answer's joint radius is at most min(sigma_x, s_train) * ceiling
  k_max = max(int(bounds.poison_budget(ceiling, s_train, sigma_max, t)),
              int(bounds.poison_budget(min(s_train, sigma_max) * ceiling, 1.0, 1.0, t)))
  return bounds.budget_grid(k_max if certifies_training_perturbations(cfg) else min(k_max, 0))


def answer_metrics(cfg: Config, attacked: Attacked, answers: dict[str, StoreAnswer],
                   sigma_train: np.ndarray | None = None,
                   sigma_test: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """Headline metrics of the storage-update answers (the certificates), with aligned / trimmed counts; given the
  sigmas, also the certified accuracy against the number of poisoned training images (``cra_poison_budget``)."""
  grid = radius_grid(cfg)
  per = {s: split_metrics(answers[s].pred, answers[s].radius_joint, answers[s].radius_stored,
                          attacked.splits[s].y, cfg.attack.target_class, grid) for s in SPLITS}
  out = headline(per)
  if sigma_train is not None and sigma_test is not None:
    budgets = poison_budgets(cfg, answers, sigma_train, sigma_test)
    k_grid = poison_budget_grid(cfg, sigma_train, sigma_test)
    for s, key in (("clean", "cra_poison_budget"), ("triggered", "cra_poison_budget_triggered")):
      out[key] = bounds.certified_accuracy_budget(budgets[s], answers[s].pred == attacked.splits[s].y, k_grid)
  for s in SPLITS:
    out[f"aligned_{s}"] = int(answers[s].aligned.sum())
    out[f"trimmed_{s}"] = int(answers[s].trimmed.sum())
  return out


def attack_metrics(pred: dict[str, np.ndarray], label: dict[str, np.ndarray], target: int) -> dict[str, Any]:
  """Clean accuracy, ERA and ASR of predictions on the clean and the triggered split (-1: abstained).

  ERA counts the triggered inputs answered with their true label, ASR those answered with the attack's target; an
  abstention counts as an error and as no success of the attack. ASR is None when every triggered input abstained,
  which says nothing about the attack (a 0 there would read as a perfect defense).
  """
  answered = pred["triggered"] != -1
  return {"clean_accuracy": float(np.mean(pred["clean"] == label["clean"])),
          "era": float(np.mean(pred["triggered"] == label["triggered"])),
          "asr": float(np.mean(pred["triggered"] == target)) if answered.any() else None}


def majority(preds: np.ndarray, num_classes: int) -> np.ndarray:
  """The plain majority vote (ties to the smaller class) of per-model predictions (M, N) -> (N,)."""
  return certify_lib.votes_from_preds(np.asarray(preds), num_classes).argmax(axis=1)


def majority_metrics(cfg: Config, attacked: Attacked, votes: dict[str, np.ndarray],
                     key: str = "{}_preds") -> dict[str, float]:
  """Clean accuracy, ERA and ASR of the plain majority vote of the voting models on the requests ``key`` (of
  each split): the smoothed classifier's prediction without abstentions (uncertified). With a few dozen models
  the certificates abstain unless the vote is nearly unanimous; the majority vote shows what the smoothed
  classifier itself does."""
  k = len(cfg.data.classes)
  pred = {s: majority(votes[key.format(s)][config_lib.voting(cfg)], k) for s in SPLITS}
  return attack_metrics(pred, {s: attacked.splits[s].y for s in SPLITS}, cfg.attack.target_class)


def certificate_metrics(cfg: Config, attacked: Attacked, certs: dict[str, bounds.Certificate]) -> dict[str, Any]:
  """Headline metrics of the certificates before the storage update."""
  grid = radius_grid(cfg)
  return headline({s: split_metrics(certs[s].pred, certs[s].radius, certs[s].radius_test, attacked.splits[s].y,
                                    cfg.attack.target_class, grid) for s in SPLITS})


def _ranked_auc(low: np.ndarray, high: np.ndarray) -> float | None:
  """P(a value of ``low`` < a value of ``high``) + P(tie) / 2: the AUC of -value for telling ``low`` apart."""
  if len(low) == 0 or len(high) == 0:
    return None
  u = scipy.stats.mannwhitneyu(high, low, alternative="two-sided").statistic
  return float(u / (len(low) * len(high)))


def side_channel_probe(cfg: Config, attacked: Attacked, votes: dict[str, np.ndarray], sigma_train: np.ndarray,
                       disagree: np.ndarray | None, sigma_test: dict[str, np.ndarray]) -> dict[str, Any]:
  """Does the noise level carry the attack? (docs/soundness.md, "the noise level as a side channel").

  * ``auc_label_disagreement``: how well a small sigma_j picks out the training samples whose label the pilot
    disagrees with (what a relabelled image looks like), as an AUC; 0.5 is no signal.
  * ``auc_poisoned``: the same for the poisoned samples against the clean samples of the target class (the
    experiment knows which were poisoned).
  * triggered inputs against their clean copies: the mean difference of sigma_x and the fraction that got
    less noise than their copy (by more than 1%).
  * the ensemble's clean accuracy, ERA and ASR re-evaluated with every input at the smallest and at the largest
    sigma_x the run used: how strongly the noise level moves the attack.

  ``channel`` is set, and a warning logged, when an AUC reaches ``CHANNEL_AUC``, or when most triggered inputs
  got less noise than their copies while the ASR at the smallest sigma_x exceeds the ASR at the largest by
  ``CHANNEL_ASR_GAP``.
  """
  y, target = attacked.y_train, cfg.attack.target_class
  poisoned = np.zeros(len(y), bool)
  poisoned[attacked.poison_indices] = True
  same_label = (y == target) & ~poisoned
  out: dict[str, Any] = {
      "auc_label_disagreement": (_ranked_auc(sigma_train[disagree], sigma_train[~disagree])
                                 if disagree is not None else 0.5),
      "auc_poisoned": _ranked_auc(sigma_train[poisoned], sigma_train[same_label]),
  }
  trig = attacked.splits["triggered"]
  diff = sigma_test["triggered"] - sigma_test["clean"][trig.index]
  out["sigma_x_triggered_minus_clean_copy"] = float(diff.mean())
  out["triggered_below_clean_copy"] = float(np.mean(diff < -0.01 * sigma_test["clean"][trig.index]))
  used = np.concatenate([sigma_test[s] for s in SPLITS])
  for name, level in (("at_min", used.min()), ("at_max", used.max())):
    # without a search every input was voted on at sigma_0 already, so the kernel ran no probe requests
    key = f"{name}_{{}}_preds" if defenses.noise_plan(cfg).search_test else "{}_preds"
    out[name] = {"sigma_x": float(level), **majority_metrics(cfg, attacked, votes, key)}
  reasons = [f"{k} = {out[k]:.3f}" for k in ("auc_label_disagreement", "auc_poisoned")
             if out[k] is not None and out[k] >= CHANNEL_AUC]
  gap = out["at_min"]["asr"] - out["at_max"]["asr"]
  if out["triggered_below_clean_copy"] > 0.5 and gap >= CHANNEL_ASR_GAP:
    reasons.append(f"{out['triggered_below_clean_copy']:.0%} of triggered inputs got less noise than their clean "
                   f"copy and the ASR is {gap:.2f} higher at the smallest sigma_x")
  out["channel"] = bool(reasons)
  if reasons:
    logger.warning("side channel: the noise level carries the attack (%s); see docs/soundness.md",
                   "; ".join(reasons))
  return out


def reference_numbers(cfg: Config, attacked: Attacked, votes: dict[str, np.ndarray],
                      sigma_test: dict[str, np.ndarray]) -> dict[str, Any]:
  """The reference release's numbers (docs/method.md section 6), recomputed by re-running the ensemble as it
  does: test noise sampled at sigma_0, Hoeffding with M fixed at 1000 and no selection correction, the margin
  multiplied by the searched sigma_x, and a "triggered accuracy" that relabels every triggered test input
  (target class included) to the target. UNSOUND; for comparison with the paper only."""
  m = cfg.train.num_models
  sigma_0 = cfg.sigma.sigma_0
  ref = bounds.reference_certificate(votes["ref_clean_probs_sum"], sigma_test["clean"], sigma_0, cfg.certify.alpha,
                                     num_models=m)
  y = attacked.splits["clean"].y
  grid = radius_grid(cfg)
  sound = bounds.certify_counts(None, alpha=cfg.certify.alpha, bound="hoeffding", correction=None,
                                soft_sums=votes["ref_clean_probs_sum"], num_models=m, sigma_x=sigma_0)
  certified = ref.pred != -1
  inflation = ref.radius[certified] / (sigma_0 * ref.margin[certified]) if certified.any() else np.ones(1)
  ref_trig = bounds.reference_certificate(votes["ref_triggered_all_probs_sum"], sigma_0, sigma_0,
                                          cfg.certify.alpha, num_models=m)
  return {
      "note": "the reference release's formulas: test noise at sigma_0, Hoeffding with M fixed at 1000, no "
              "selection correction, radius = searched sigma_x * margin (inflated by sigma_x / sigma_0), "
              "triggered accuracy = every triggered test input relabelled to the target; UNSOUND",
      "clean_accuracy": float(np.mean(ref.pred == y)),
      "cra": bounds.certified_accuracy(ref.radius, ref.pred == y, grid),
      "cra_paper_grid": bounds.certified_accuracy(ref.radius, ref.pred == y),
      "cra_at_sigma_0_without_inflation": bounds.certified_accuracy(sigma_0 * ref.margin, ref.pred == y, grid),
      "cra_hoeffding_real_m_at_sigma_0": bounds.certified_accuracy(sound.radius_test, sound.pred == y, grid),
      "inflation_factor": {"min": float(inflation.min()), "mean": float(inflation.mean()),
                           "max": float(inflation.max())},
      "triggered_accuracy_relabelled": float(np.mean(ref_trig.pred == cfg.attack.target_class)),
  }


def collect(cfg: Config, attacked: Attacked, certs: dict[str, bounds.Certificate],
            answers: dict[str, StoreAnswer], other_answers: dict[str, StoreAnswer],
            other_order: str, votes: dict[str, np.ndarray], sigma_train: np.ndarray, disagree: np.ndarray | None,
            sigma_test: dict[str, np.ndarray]) -> dict[str, Any]:
  """Everything the summary reports besides the headline answers: the pre-store certificates (uncertified),
  the consistency audit, the other query order, the probe and the reference's numbers."""
  x = np.concatenate([attacked.splits[s].x for s in SPLITS])
  cat = lambda arrays: np.concatenate([arrays[s] for s in SPLITS])
  pre, _ = audit(x, cat({s: certs[s].pred for s in SPLITS}), cat({s: certs[s].radius_test for s in SPLITS}))
  post, pairs = audit(x, cat({s: answers[s].pred for s in SPLITS}),
                                cat({s: answers[s].radius_stored for s in SPLITS}))
  if post:
    logger.error("consistency audit: %d contradicting answers after the storage update (first %s)", post, pairs[:3])
  out = {
      "majority": majority_metrics(cfg, attacked, votes),
      "pre_store": certificate_metrics(cfg, attacked, certs),
      "consistency": {"contradictions": post, "contradictions_pre_store": pre, "queries": int(len(x))},
      "other_order": {"query_order": other_order, **answer_metrics(cfg, attacked, other_answers, sigma_train,
                                                                   sigma_test)},
  }
  if "side_channel_probe" in defenses.get(cfg).diagnostics:
    out["probe"] = side_channel_probe(cfg, attacked, votes, sigma_train, disagree, sigma_test)
  if cfg.certify.compat == "reference":
    out["reference_compat"] = reference_numbers(cfg, attacked, votes, sigma_test)
  return out
