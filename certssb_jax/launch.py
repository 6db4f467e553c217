r"""Command-line entry point: ``python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/run``.

Thin on purpose: parses the config, sets up logging, progress bars and (optionally) multi-host JAX, and calls
``certssb_jax.pipeline.run``. A workdir that already holds a run with the same config is resumed: finished
stages and trained ensemble chunks are reused (logged at start and as each is reused); what a killed run left
half-written is removed.

Multi-host (one process per host, or per GPU): ``--distributed`` calls ``jax.distributed.initialize()``, which
finds the coordinator, the process count and this process's id by itself on Cloud TPU pods, SLURM, Open MPI and
Kubernetes; elsewhere pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (which imply
``--distributed``). The mesh then spans every process's devices; process 0 writes the workdir, which must be on a
filesystem all processes see. On CPU the processes talk through gloo. Start scripts: ``launch/``.

Examples:
  python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/quickstart
  python -m certssb_jax.launch --config configs/mnist.py:trigger=fourpixel,sigma_0=0.5 --workdir runs/mnist
  python -m certssb_jax.launch --config configs/quickstart.py --config.train.num_models=16 --workdir /tmp/q16
  python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/both --compare_modes
  # two processes on one machine (CPU, loopback), one per terminal:
  python -m certssb_jax.launch --config configs/quickstart.py:quick --workdir /tmp/q2 \
      --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=0   # and --process_id=1
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

logger = logging.getLogger("certssb_jax.launch")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; resumed when it holds a run with the same config.")
_FRESH = flags.DEFINE_bool("fresh", False, "Discard the results in --workdir if its config differs.")
_COMPARE = flags.DEFINE_bool("compare_modes", False,
                             "Run sigma_mode=fixed (RAB) and sample_specific (Cert-SSB) on the same data and seeds "
                             "into WORKDIR/fixed and WORKDIR/sample_specific, and print one table.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host: TPU pods, SLURM, multi-node GPU); "
                                 "without the three flags below the cluster is auto-detected.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator service (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (implies --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) "
                                   "(implies --distributed).")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_timeout_s", 300,
                                     "Seconds to wait for every process to join (jax.distributed.initialize).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "certssb_jax", "xla"),
    "JAX's persistent compilation cache: a later run of the same programs loads them instead of compiling "
    "(~2 s of the quickstart on a 2-core CPU). '' turns it off; JAX_COMPILATION_CACHE_DIR, if set, wins.")


def summary_table(summaries: dict[str, dict]) -> str:
  """A one-screen table of the headline numbers of one or more runs (columns = runs)."""
  rows = [("clean accuracy", lambda s: s["metrics"]["clean_accuracy"]),
          ("abstain rate", lambda s: s["metrics"]["abstain_rate"]),
          ("ERA (triggered, true label)", lambda s: s["metrics"]["era"]),
          ("ASR (triggered -> target)", lambda s: s["metrics"]["asr"])]
  first = next(iter(summaries.values()))
  for kind, label in (("cra", "joint radius"), ("cra_test", "test-input radius")):
    for r in first["metrics"][kind]:
      if float(r) <= 1.0:
        rows.append((f"CRA({label} > {r})", lambda s, r=r, kind=kind: s["metrics"][kind][r]))
  if "storage_update" in first:
    rows.append(("CRA(0) after storage update", lambda s: s.get("storage_update", {}).get("cra", {}).get("0.0")))
    rows.append(("aligned / trimmed (clean)", lambda s: "{} / {}".format(
        s["storage_update"]["aligned_clean"], s["storage_update"]["trimmed_clean"]) if "storage_update" in s else "-"))
  rows.append(("margin ceiling (sigma units)", lambda s: s["margin_ceiling"]))
  rows.append(("sigma_x mean (clean)", lambda s: s["sigma"]["clean"]["mean"]))
  rows.append(("min training sigma", lambda s: s["sigma"]["train"]["min"]))
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


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> None:
  """Joins a multi-process JAX job (before anything else touches jax's backends).

  With all three arguments None the cluster is auto-detected (Cloud TPU, SLURM, Open MPI, Kubernetes). CPU
  processes exchange data through gloo collectives. Raises ValueError for a half-given or inconsistent set.
  """
  import jax  # pylint: disable=g-import-not-at-top

  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together (or give none of "
                     "them and --distributed to auto-detect the cluster)")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s)
  logger.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def describe_workdir(workdir: str) -> str | None:
  """One line on what a workdir already holds (what a resumed run will reuse), or None for a new workdir."""
  from certssb_jax import pipeline  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return None
  stages_dir = os.path.join(workdir, "stages")
  stages = sorted(f[:-4] for f in os.listdir(stages_dir) if f.endswith(".npz")) if os.path.isdir(stages_dir) else []
  ens_dir = os.path.join(workdir, "ensemble")
  names = sorted(os.listdir(ens_dir)) if os.path.isdir(ens_dir) else []
  chunks = [c for first, last in pipeline.saved_checkpoints(workdir) for c in range(first, last + 1)]
  partial = [n for n in names if ".orbax-checkpoint-tmp" in n]
  models = [n for n in ("pilot", "undefended") if os.path.isdir(os.path.join(workdir, n))]
  return (f"resuming {workdir}: stages {stages or 'none'}; {len(chunks)} trained ensemble chunks"
          + (f"; auxiliary models {models}" if models else "")
          + (f"; {len(partial)} half-written checkpoints to discard" if partial else ""))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("both --config and --workdir are required")
  logging.getLogger().setLevel(logging.WARNING)  # quiet the libraries (orbax logs every checkpoint at INFO)
  logging.getLogger("certssb_jax").setLevel(logging.INFO)
  import jax  # pylint: disable=g-import-not-at-top

  if _CACHE.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # CPU programs compile in < 1 s
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if _DISTRIBUTED.value or any(v is not None for v in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)):
    try:
      initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _INIT_TIMEOUT.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  primary = jax.process_index() == 0
  if not primary:  # the other processes compute; process 0 reports
    logging.getLogger("certssb_jax").setLevel(logging.WARNING)
  from certssb_jax import pipeline  # pylint: disable=g-import-not-at-top

  if primary:
    for d in ([os.path.join(_WORKDIR.value, m) for m in ("fixed", "sample_specific")] if _COMPARE.value
              else [_WORKDIR.value]):
      note = describe_workdir(d)
      if note:
        logger.info("%s", note)
  progress = pipeline.tqdm_progress if _PROGRESS.value and primary else pipeline.no_progress
  config = _CONFIG.value
  workdir = _WORKDIR.value
  runs = {}
  try:
    if _COMPARE.value:
      for mode in ("fixed", "sample_specific"):
        c = config.copy_and_resolve_references()
        c.sigma.mode = mode
        logger.info("=== sigma_mode=%s ===", mode)
        runs["RAB (fixed)" if mode == "fixed" else "Cert-SSB"] = pipeline.run(
            c, os.path.join(workdir, mode), progress=progress, fresh=_FRESH.value)
    else:
      runs[config.sigma.mode] = pipeline.run(config, workdir, progress=progress, fresh=_FRESH.value)
  except (ValueError, FileNotFoundError) as e:  # DataError and config errors are ValueErrors
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not primary:
    return
  print()
  print(summary_table(runs))
  print()
  for name, s in runs.items():
    d = workdir if not _COMPARE.value else os.path.join(workdir, "fixed" if "RAB" in name else "sample_specific")
    print(f"{name}: wrote " + ", ".join(os.path.join(d, f) for f in s["files"]))


if __name__ == "__main__":
  app.run(main)
