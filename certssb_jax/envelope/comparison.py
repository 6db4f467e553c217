"""Every row against RAB's envelope: the envelope itself (the best RAB certified accuracy over sigma at each radius),
where each design rises above or falls below it, every row's accuracy, ERA and ASR, and the designs' sigma_x."""

from __future__ import annotations

from typing import Any

import numpy as np

from certssb_jax.data.attacked import SPLITS
from certssb_jax.envelope.answers import KINDS, RADII, Answers
from certssb_jax.experiment import metrics


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
  return {**metrics.attack_metrics(a.pred, a.label, target_class),
          "abstain_clean": float(np.mean(a.pred[clean] == -1)), "abstain_triggered": float(np.mean(a.pred[trig] == -1)),
          "majority": metrics.attack_metrics(a.majority, a.label, target_class)}


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
