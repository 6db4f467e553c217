"""The envelope comparison as markdown: one pair's section (its tables), docs/results.md (one section per class
pair and ensemble size, a command rewriting only the sections of the pairs it ran) and the README's block."""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from certssb_jax import files
from certssb_jax.envelope.answers import KINDS, RADII


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
    "on the main pair: [families.md](families.md) (written by `python -m certssb_jax.studies families`).", ""]
SECTION_START, SECTION_END = "<!-- section {} -->", "<!-- end of section {} -->"


def page_sections(text: str) -> dict[str, str]:
  """The sections of a results page, by key, in page order."""
  found = re.findall(r"<!-- section (\S+) -->\n(.*?)<!-- end of section \1 -->", text, flags=re.S)
  return {key: body for key, body in found}


def write_results_page(path: str, sections: list[dict[str, Any]], command: str) -> None:
  """docs/results.md from the outputs of ``run_envelope`` (plots copied next to it, under ``figures/``): the
  sections of this command's pairs replace their earlier versions; other sections stay as written."""
  merged = page_sections(open(path).read()) if os.path.exists(path) else {}
  for sec in sections:
    parts = [sec["markdown"]]
    for line in files.copy_figures(path, sec["plots"]):
      parts += [line, ""]
    merged[sec["key"]] = "\n".join(parts + ["Written by", "", "```", command, "```", ""])
  page = list(RESULTS_HEADER)
  for key, body in merged.items():
    page += [SECTION_START.format(key), body.rstrip("\n"), SECTION_END.format(key), ""]
  files.atomic_write_bytes(path, "\n".join(page).encode())
