r"""Command-line entry point: ``python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/run``.

Thin on purpose: parses the config, sets up logging, progress bars and (optionally) multi-host JAX, and calls
``certssb_jax.pipeline.run``. A workdir that already holds a run with the same config is resumed.

Examples:
  python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/quickstart
  python -m certssb_jax.launch --config configs/mnist.py:trigger=fourpixel,sigma_0=0.5 --workdir runs/mnist
  python -m certssb_jax.launch --config configs/quickstart.py --config.train.num_models=16 --workdir /tmp/q16
  python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/both --compare_modes
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Callable, Iterator

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; resumed when it holds a run with the same config.")
_FRESH = flags.DEFINE_bool("fresh", False, "Discard the results in --workdir if its config differs.")
_COMPARE = flags.DEFINE_bool("compare_modes", False,
                             "Run sigma_mode=fixed (RAB) and sample_specific (Cert-SSB) on the same data and seeds "
                             "into WORKDIR/fixed and WORKDIR/sample_specific, and print one table.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host: TPU pods, SLURM, multi-node GPU).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


@contextlib.contextmanager
def tqdm_progress(desc: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
  """A tqdm bar with rate and ETA, on stderr."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True) as bar:
    yield bar.update


def summary_table(summaries: dict[str, dict]) -> str:
  """A one-screen table of the headline numbers of one or more runs (columns = runs)."""
  rows = [("clean accuracy", lambda s: s["metrics"]["clean_accuracy"]),
          ("abstain rate", lambda s: s["metrics"]["abstain_rate"]),
          ("ERA (triggered, true label)", lambda s: s["metrics"]["era"]),
          ("ASR (triggered -> target)", lambda s: s["metrics"]["asr"])]
  first = next(iter(summaries.values()))
  for r in first["metrics"]["cra"]:
    if float(r) <= 1.0:
      rows.append((f"CRA(r={r})", lambda s, r=r: s["metrics"]["cra"][r]))
  if "storage_update" in first:
    rows.append(("CRA(0) after storage update", lambda s: s.get("storage_update", {}).get("cra", {}).get("0.0")))
    rows.append(("aligned / trimmed (clean)", lambda s: "{} / {}".format(
        s["storage_update"]["aligned_clean"], s["storage_update"]["trimmed_clean"]) if "storage_update" in s else "-"))
  rows.append(("margin ceiling", lambda s: s["margin_ceiling"]))
  if first.get("undefended"):
    rows += [("undefended clean accuracy", lambda s: s["undefended"]["clean_accuracy"]),
             ("undefended ASR", lambda s: s["undefended"]["asr"])]
  names = list(summaries)
  width = max(len(r[0]) for r in rows) + 2
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = [" " * width + "".join(f"{n:>18}" for n in names)]
  for label, get in rows:
    vals = []
    for n in names:
      try:
        vals.append(fmt(get(summaries[n])))
      except (KeyError, TypeError):
        vals.append("-")
    lines.append(f"{label:<{width}}" + "".join(f"{v:>18}" for v in vals))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("both --config and --workdir are required")
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top

    jax.distributed.initialize()
  logging.getLogger().setLevel(logging.WARNING)  # quiet the libraries (orbax logs every checkpoint at INFO)
  logging.getLogger("certssb_jax").setLevel(logging.INFO)
  from certssb_jax import pipeline  # pylint: disable=g-import-not-at-top

  progress = tqdm_progress if _PROGRESS.value else pipeline.no_progress
  config = _CONFIG.value
  workdir = _WORKDIR.value
  runs = {}
  try:
    if _COMPARE.value:
      for mode in ("fixed", "sample_specific"):
        c = config.copy_and_resolve_references()
        c.sigma.mode = mode
        logging.info("=== sigma_mode=%s ===", mode)
        runs["RAB (fixed)" if mode == "fixed" else "Cert-SSB"] = pipeline.run(
            c, os.path.join(workdir, mode), progress=progress, fresh=_FRESH.value)
    else:
      runs[config.sigma.mode] = pipeline.run(config, workdir, progress=progress, fresh=_FRESH.value)
  except (ValueError, FileNotFoundError) as e:  # DataError and config errors are ValueErrors
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print()
  print(summary_table(runs))
  print()
  for name, s in runs.items():
    d = workdir if not _COMPARE.value else os.path.join(workdir, "fixed" if "RAB" in name else "sample_specific")
    print(f"{name}: wrote " + ", ".join(os.path.join(d, f) for f in s["files"]))


if __name__ == "__main__":
  app.run(main)
