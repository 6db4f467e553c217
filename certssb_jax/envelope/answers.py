"""The rows of the envelope comparison as certified answers: ``Answers``, read from a finished run's folder, and
the grid selector's (and RAB's with the selector's voters) built from the votes RAB's runs saved.

The grid selector is the sample-specific design whose voting models are trained for the noise they are queried
at. For every test input it picks sigma_x from the trained grid: the first ``selector_models`` models of each
RAB ensemble (ids 0 .. M_s - 1) never vote; their votes at each sigma predict the certificate the voting models
(ids M_s .. M - 1) would give there, and the sigma with the largest expected certified test-input radius wins.
The voters of the ensemble trained at that sigma then vote, the run's bound certifies, and one store answers
every query (clean split first). The selector's models are trained on the poisoned training set, so a selected
sigma_x is a function of it: the answers certify their test-input radius only (joint radius 0,
docs/soundness.md).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from certssb_jax import defenses, files, sweep
from certssb_jax.certify import bounds
from certssb_jax.data.attacked import SPLITS
from certssb_jax.defenses import grid_selector as grid_selector_lib
from certssb_jax.experiment import finished, identity, metrics
from certssb_jax.store.certified import CertifiedStore

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


def answers_of_run(workdir: str, name: str | None = None) -> Answers:
  """A finished run's storage-update answers (its certificates), read from its folder."""
  run = finished.FinishedRun(workdir)
  cfg, voting, col = run.config, run.summary["models"]["voting"], run.column
  k = len(cfg["data"]["classes"])
  fixed = cfg["sigma"]["sigma_hi"] is None  # RAB records no search range
  return Answers(
      name=name or (f"RAB sigma={cfg['sigma']['sigma_0']:g}" if fixed else f"Cert-SSB {sweep.design(cfg)}"),
      sigma=cfg["sigma"]["sigma_0"] if fixed else None, voting=voting,
      pred={s: col(s, "pred_stored", int) for s in SPLITS},
      radius_test={s: col(s, "radius_stored", float) for s in SPLITS},
      radius_joint={s: col(s, "radius_joint_stored", float) for s in SPLITS},
      sigma_x={s: col(s, "sigma", float) for s in SPLITS},
      label={s: col(s, "label", int) for s in SPLITS},
      majority={s: metrics.majority(run.votes[f"{s}_preds"][-voting:], k) for s in SPLITS},
      delta=cfg["attack"]["delta"],
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
  keys = {identity.training_key(dict(c, sigma=dict(c["sigma"], sigma_0=0.0))) for c in cfgs.values()}
  if len(keys) != 1 or any(defenses.upgrade(c)["defense"]["name"] != defenses.RAB.key for c in cfgs.values()):
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
  st = CertifiedStore(x["clean"].shape[1:])
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
