r"""The comparison table: a grid of runs (config x trigger x sigma_0 x defense) in one folder.

Every row is an ordinary run in ``WORKDIR/<data set>_<classes>/<trigger>_sigma<sigma_0>_<defense>_<config hash>``
(the hash tells apart rows whose configs differ elsewhere, e.g. two Cert-SSB designs); a row whose
folder holds a finished run with the same config is reused, a partly finished one resumes, and a row that trains
the same models as a finished row in the folder (Cert-SSB with ``sigma.train = base`` and RAB, also across sweeps)
links them instead of training them again. The table puts
RAB and Cert-SSB side by side (clean accuracy, ERA, ASR, abstentions, CRA on the test-input and on the joint
radius, the side-channel probe, the aligned answers); it is written as ``table.md`` and ``table.csv``, with
one plot of step-shaped CRA curves per data set.

  python -m certssb_jax.studies sweep --config configs/fashion_mnist.py:num_models=16 \
      --triggers onepixel,fourpixel,blending --workdir runs/sweep_fm
  python -m certssb_jax.studies sweep --config configs/quickstart.py:quick,num_models=16 --triggers onepixel \
      --sigmas 0.25 --workdir /tmp/sweep_q
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
from typing import Any

from absl import flags
import numpy as np

from certssb_jax import files
from certssb_jax.ensemble import trainer
from certssb_jax.experiment import cli, config as config_lib, finished, identity, rundir

# Radii of the CRA columns, in units u = ceiling * sigma_0: half of RAB's largest certifiable radius, just below
# it (an input certified at the ceiling counts: CRA counts radius > r) and just below Cert-SSB's largest (at
# sigma_hi = 1.5 sigma_0). The joint radius of either method stops at u (every training sigma is sigma_0).
TABLE_UNITS = (0.5, 0.95, 1.45)


def row_dir(workdir: str, c: Any) -> str:
  """The folder of one row: data set and classes, then trigger, sigma_0, defense and a hash of the whole config; a
  folder of the same trigger and sigma_0 whose run has the same config (``identity.differences``, which reads
  configs of earlier versions too) is that row."""
  j = config_lib.to_json(c)
  for field in identity.RESULT_NEUTRAL:  # a field that changes no result does not tell rows apart
    section, name = field.split(".")
    j[section].pop(name)
  digest = hashlib.sha1(json.dumps(j, sort_keys=True).encode()).hexdigest()[:8]
  pair = "-".join(str(k) for k in c.data.classes)
  prefix = os.path.join(workdir, f"{c.data.name}_{pair}", f"{c.attack.trigger}_sigma{c.sigma.sigma_0:g}")
  for d in sorted(glob.glob(f"{prefix}_*")):
    path = os.path.join(d, "config.json")
    if os.path.exists(path) and not identity.differences(files.load_json(path), config_lib.to_json(c)):
      return d
  return f"{prefix}_{c.defense.name}_{digest}"


def run_grid(specs: list[str], workdir: str, triggers: list[str] | None, sigmas: list[float] | None,
             names: list[str], progress=None, trainers: trainer.Trainers | None = None,
             overrides: dict[str, str] | None = None) -> list[dict[str, Any]]:
  """Runs (or reuses) every row of the grid; returns one record per row. ``triggers`` / ``sigmas`` None: each
  config's own; ``overrides`` (field -> value) apply to every config. Every config is checked first, so a bad
  one stops the sweep before any training. The rows share ``trainers`` (default: new), so rows that agree on the
  training settings compile their programs once."""
  from certssb_jax.experiment import pipeline  # pylint: disable=g-import-not-at-top

  rows = []
  for spec in specs:
    base = config_lib.apply_overrides(config_lib.load_config(spec), overrides or {})
    for trigger in triggers or [base.attack.trigger]:
      for sigma_0 in sigmas or [base.sigma.sigma_0]:
        for name in names:
          c = base.copy_and_resolve_references()
          c.attack.trigger, c.sigma.sigma_0, c.defense.name = trigger, float(sigma_0), name
          resolved = config_lib.resolve(c)
          rows.append((spec, c, resolved, row_dir(workdir, resolved)))
  records, trained, trainers = [], _finished_rows(workdir), trainers or trainer.Trainers()
  for spec, c, resolved, d in rows:
    path = os.path.join(d, "summary.json")
    if os.path.exists(path):  # row_dir found the folder by its config, so a finished run there is this row's
      logging.info("reusing finished row %s", d)
      summary = files.load_json(path)
    else:
      donor = _donor(trained, config_lib.to_json(resolved))
      if donor is not None:
        rundir.link_trained(donor, d, resolved, any_size=True)
      logging.info("running row %s", d)
      summary = pipeline.run(c, d, progress=progress, trainers=trainers)
    trained.append((config_lib.to_json(resolved), d))
    records.append({"config": spec, "dataset": f"{resolved.data.name} {tuple(resolved.data.classes)}",
                    "trigger": resolved.attack.trigger, "sigma_0": resolved.sigma.sigma_0,
                    "defense": resolved.defense.name, "workdir": d, "summary": summary})
  return records


def _finished_rows(workdir: str) -> list[tuple[dict[str, Any], str]]:
  """(config, folder) of the finished rows already in ``workdir``, from earlier sweeps too."""
  return [(finished.FinishedRun(os.path.dirname(p)).config, os.path.dirname(p))
          for p in sorted(glob.glob(os.path.join(workdir, "*", "*", "summary.json")))]


def _chunk_size(j: dict[str, Any]) -> int:
  return trainer.auto_models_per_chunk(j["train"]["models_per_chunk"], j["train"]["num_models"])


def _donor(finished: list[tuple[dict[str, Any], str]], j: dict[str, Any]) -> str | None:
  """A finished row whose models a new row with config ``j`` can link: the same models (``identity.training_key``
  without the ensemble size) trained in chunks of the same size; the largest ensemble among them."""
  key = identity.training_key(j, num_models=False)
  same = [(c["train"]["num_models"], d) for c, d in finished
          if identity.training_key(c, num_models=False) == key and _chunk_size(c) == _chunk_size(j)]
  return max(same)[1] if same else None


def design(c: dict[str, Any]) -> str:
  """How a row chose its sigmas, from its config.json: "-" where it records no search (RAB), "no search" for a
  single-point range."""
  s = c["sigma"]
  if s["sigma_hi"] is None:
    return "-"
  if s["sigma_hi"] <= s["sigma_lo"]:
    return "no search (sigma_0)"
  return (f"{s['train']} / {s['objective']} / {s['rule']} / [{s['sigma_lo']:g}, {s['sigma_hi']:.3g}] / "
          f"{s['pilot_sigma']:g}")


def _fmt(v: Any) -> str:
  return "-" if v is None else f"{v:.3f}"


def _correct(run: finished.FinishedRun) -> np.ndarray:
  """Which clean answers of a row are right (an abstention is not)."""
  return run.column("clean", "pred_stored", int) == run.column("clean", "label", int)


def _cra_from_rows(workdir: str, radii: list[float]) -> dict[str, list[float]]:
  """CRA of a row's clean answers at the given radii, from its per_sample.csv (test-input and joint radius)."""
  run = finished.FinishedRun(workdir)
  correct = _correct(run)
  test, joint = run.column("clean", "radius_stored"), run.column("clean", "radius_joint_stored")
  return {"test": [float(np.mean(correct & (test > x))) for x in radii],
          "joint": [float(np.mean(correct & (joint > x))) for x in radii]}


def table(records: list[dict[str, Any]]) -> tuple[str, str]:
  """(markdown, csv): one line per row of the grid, RAB and Cert-SSB next to each other."""

  joint_units = [u for u in TABLE_UNITS if u <= 1.0]
  header = ["data set", "trigger", "sigma_0", "method", "search: training sigmas / class A / rule / [lo, hi] / pilot",
            "M",
            "clean acc", "ERA", "ASR", "abstain (clean / trig.)", "majority vote: clean / ERA / ASR"]
  header += [f"CRA test r={u:g}u" for u in TABLE_UNITS] + [f"CRA joint r={u:g}u" for u in joint_units]
  header += ["u = ceiling x sigma_0", "mean sigma_x clean / trig.", "aligned", "AUC(sigma_j) poisoned", "channel"]
  lines = []
  for r in records:
    s = r["summary"]
    m, probe = s["metrics"], s.get("probe", {})
    unit = s["margin_ceiling"] * s["sigma_0"]
    cra = _cra_from_rows(r["workdir"], [u * unit for u in TABLE_UNITS])
    design_ = design(finished.FinishedRun(r["workdir"]).config)
    lines.append([r["dataset"], r["trigger"], f"{r['sigma_0']:g}", s["method"], design_,
                  str(s["models"]["voting"]), _fmt(m["clean_accuracy"]), _fmt(m["era"]), _fmt(m["asr"]),
                  f"{_fmt(m['abstain_rate'])} / {_fmt(m['abstain_rate_triggered'])}",
                  " / ".join(_fmt(s["majority"][k]) for k in ("clean_accuracy", "era", "asr"))]
                 + [_fmt(v) for v in cra["test"]] + [_fmt(v) for v in cra["joint"][:len(joint_units)]]
                 + [f"{unit:.4f}",
                    f"{s['sigma']['clean']['mean']:.3f} / {s['sigma']['triggered']['mean']:.3f}",
                    str(m["aligned_clean"] + m["aligned_triggered"]), _fmt(probe.get("auc_poisoned")),
                    str(probe.get("channel", "-"))])
  md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(l) + " |" for l in lines]
  note = ("\nclean acc, ERA, ASR, abstain and CRA: the storage-update answers (the certificates); an abstention "
          "counts as an error. Majority vote: the smoothed classifier's plain majority, uncertified. CRA at radius "
          "r in units u = margin ceiling x sigma_0 (the largest radius RAB can certify with these M and alpha); "
          "'test' is the radius in the test input alone, 'joint' over training and test triggers together. M "
          "counts the voting models.\n")
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(header)
  w.writerows(lines)
  return "\n".join(md) + "\n" + note, buf.getvalue()


def plot(records: list[dict[str, Any]], workdir: str) -> list[str]:
  """One figure per data set: CRA of the certificates against the test-input radius (left) and the joint radius
  (right), exact step curves from each row's per_sample.csv; one colour per method, one line style per (trigger,
  sigma_0)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from certssb_jax.experiment import report  # pylint: disable=g-import-not-at-top

  colors = {"RAB": "C0", "Cert-SSB": "C1"}
  styles = ("-", "--", ":", "-.")
  paths = []
  for ds in dict.fromkeys(r["dataset"] for r in records):
    rows = [r for r in records if r["dataset"] == ds]
    keys = list(dict.fromkeys((r["trigger"], r["sigma_0"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in rows:
      run = finished.FinishedRun(r["workdir"])
      correct = _correct(run)
      ls = styles[keys.index((r["trigger"], r["sigma_0"])) % len(styles)]
      label = f"{r['summary']['method']} {r['trigger']} sigma_0={r['sigma_0']:g}"
      for ax, column in ((axes[0], "radius_stored"), (axes[1], "radius_joint_stored")):
        radius = run.column("clean", column)
        color = colors.get(r["summary"]["method"], "C2")
        ax.step(*report.cra_curve(radius, correct), where="post", color=color, ls=ls, label=label)
    for ax, name in zip(axes, ("test-input radius r", "joint radius r")):
      ax.set_xlabel(name)
      ax.set_xlim(left=0)
      ax.grid(alpha=0.3)
    axes[0].set_ylabel("certified robust accuracy")
    axes[0].set_ylim(0, 1.02)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{ds}: RAB (blue) and Cert-SSB (orange), CRA of the certificates", fontsize=9)
    fig.tight_layout()
    path = os.path.join(workdir, f"cra_{ds.split()[0]}_{'-'.join(re.findall(r'[0-9]+', ds))}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def sweep(specs: list[str], workdir: str, triggers: list[str], sigmas: list[float] | None, names: list[str],
          progress=None) -> dict[str, str]:
  """Runs the grid and writes ``table.md``, ``table.csv`` and the plots. Returns the paths."""
  os.makedirs(workdir, exist_ok=True)
  records = run_grid(specs, workdir, triggers, sigmas, names, progress)
  md, csv_text = table(records)
  files.atomic_write_bytes(os.path.join(workdir, "table.md"), md.encode())
  files.atomic_write_bytes(os.path.join(workdir, "table.csv"), csv_text.encode())
  plots = plot(records, workdir)
  return {"table_md": os.path.join(workdir, "table.md"), "table_csv": os.path.join(workdir, "table.csv"),
          "plots": ", ".join(plots)}


def define_flags() -> None:
  """The study's own flags (``studies`` defines the common ones), defined only by the program that runs."""
  flags.DEFINE_list("triggers", None, "Triggers of the grid (default: each config's own); the paper's: "
                                      "onepixel,fourpixel,blending.")
  flags.DEFINE_list("sigmas", None, "Base sigmas sigma_0 of the grid (default: each config's own); the paper's: "
                                    "0.12,0.25,0.5,1.0 (0.25,0.5,1.0 at 224 pixels).")
  flags.DEFINE_list("defenses", ["rab", "cert_ssb"], "Smoothing defenses of the grid (defense.name values).")


def main() -> None:
  f = flags.FLAGS
  cli.require(config=f.config, workdir=f.workdir)
  sigmas = cli.numbers(f.sigmas, float, "sigmas") if f.sigmas else None
  paths = sweep(f.config, f.workdir, f.triggers, sigmas, f.defenses, cli.progress(f.progress))
  if f.results_md:
    images = files.copy_figures(f.results_md, paths["plots"].split(", "))
    files.atomic_write_bytes(f.results_md, "\n".join([open(paths["table_md"]).read(), *images, ""]).encode())
  print(open(paths["table_md"]).read())
  for k, v in paths.items():
    print(f"{k}: {v}")
