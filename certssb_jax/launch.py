r"""Command-line entry point: ``python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/run``.

Thin on purpose: reads the config (``--config FILE[:variant]`` and ``--config.field=value`` overrides), sets up
logging, progress bars and (optionally) multi-host JAX, calls ``certssb_jax.experiment.pipeline.run`` and prints the
headline table. A workdir that already holds a run with the same config is resumed. A user mistake (config
file, field, value, data, workdir) ends with one line on stderr and exit code 2, before anything is computed;
so do a workdir another live run holds and, when the run reaches it, a damaged checkpoint (the line names its
models and how to retrain them; docs/outputs.md).

Multi-host (one process per host, or per GPU): ``--distributed`` calls ``jax.distributed.initialize()``, which
finds the coordinator, the process count and this process's id by itself on Cloud TPU pods, SLURM, Open MPI and
Kubernetes; elsewhere pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (which imply
``--distributed``). Process 0 writes the workdir, which must be on a filesystem all processes see. Start
scripts: ``launch/``.

Examples:
  python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/quickstart
  python -m certssb_jax.launch --config configs/fashion_mnist.py:trigger=fourpixel --workdir runs/fm_4px
  python -m certssb_jax.launch --config configs/quickstart.py --config.train.num_models=16 --workdir /tmp/q16
  python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/both --compare rab,cert_ssb
  # two processes on one machine (CPU, loopback), one per terminal:
  python -m certssb_jax.launch --config configs/quickstart.py:quick --workdir /tmp/q2 \
      --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=0   # and --process_id=1
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from absl import flags

from certssb_jax.experiment import cli

logger = logging.getLogger("certssb_jax.launch")

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; resumed when it holds a run with the same config.")
_FRESH = flags.DEFINE_bool("fresh", False, "Discard the results in --workdir if its config differs.")
_COMPARE = flags.DEFINE_list("compare", None,
                             "Defenses (defense.name values, e.g. rab,cert_ssb or dpa,dpa_roe) to run on the same data "
                             "and seeds into WORKDIR/<name> (models they share are trained once), with one table.")
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
    "JAX's persistent compilation cache: a later run of the same programs loads them instead of compiling. "
    "'' turns it off; JAX_COMPILATION_CACHE_DIR, if set, wins.")


class UsageError(ValueError):
  """A mistake on the command line."""


def split_config_args(argv: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
  """Takes ``--config FILE[:variant]`` and ``--config.a.b=value`` out of argv: (spec, overrides, the rest)."""
  spec, overrides, rest = None, {}, []
  args = iter(argv)
  for arg in args:
    if arg in ("--config", "-config"):
      spec = next(args, None)
      if spec is None:
        raise UsageError("--config needs a value: --config configs/FILE.py[:variant]")
    elif arg.startswith(("--config=", "-config=")):
      spec = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      field, sep, value = arg[len("--config."):].partition("=")
      if not sep:
        value = next(args, None)
        if value is None:
          raise UsageError(f"{arg} needs a value: {arg}=VALUE")
      overrides[field] = value
    else:
      rest.append(arg)
  return spec, overrides, rest


def load(spec: str | None, overrides: dict[str, str]):
  """The config of the command line: the file's ``get_config(variant)`` with the overrides applied."""
  from certssb_jax.experiment import config as config_lib  # pylint: disable=g-import-not-at-top

  if not spec:
    raise UsageError("--config is required: --config configs/FILE.py[:variant] (see configs/)")
  return config_lib.apply_overrides(config_lib.load_config(spec), overrides)


def _table(summaries: dict[str, dict], rows: list[tuple[str, Any]]) -> str:
  """Rows (label, summary -> value) by columns (runs); a row no run has stays out."""
  fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
  names = list(summaries)
  width = max(len(r[0]) for r in rows) + 2
  lines = [f"{'':<{width}}" + "".join(f"{n:>22}" for n in names)]
  for label, get in rows:
    vals = []
    for n in names:
      try:
        vals.append(fmt(get(summaries[n])))
      except (KeyError, TypeError):
        vals.append("-")
    if any(v != "-" for v in vals):  # rows of another family's certificate stay out
      lines.append(f"{label:<{width}}" + "".join(f"{v:>22}" for v in vals))
  return "\n".join(lines)


def _headline_rows() -> list[tuple[str, Any]]:
  return [("clean accuracy", lambda s: s["metrics"]["clean_accuracy"]),
          ("abstain rate (clean)", lambda s: s["metrics"]["abstain_rate"]),
          ("ERA (triggered, true label)", lambda s: s["metrics"]["era"]),
          ("ASR (triggered -> target)", lambda s: s["metrics"]["asr"]),
          ("abstain rate (triggered)", lambda s: s["metrics"]["abstain_rate_triggered"]),
          # the ensemble's plain majority: with few models most certificates abstain
          ("majority vote: clean / ERA / ASR", lambda s: " / ".join(
              f"{s['majority'][k]:.3f}" for k in ("clean_accuracy", "era", "asr")))]


def _undefended_rows(first: dict) -> list[tuple[str, Any]]:
  if not first.get("undefended"):
    return []
  return [("undefended clean accuracy", lambda s: s["undefended"]["clean_accuracy"]),
          ("undefended ASR", lambda s: s["undefended"]["asr"])]


def count_table(summaries: dict[str, dict]) -> str:
  """The headline numbers of counting runs (DPA, bagging): certified accuracy against a few numbers of changed
  training samples under each threat the defense certifies, the most it can certify at this M, whether the
  counts are exact, and the time per member."""
  first = next(iter(summaries.values()))
  rows = _headline_rows()
  for threat in first["threats"]:
    largest = first["largest_certificate"][threat]
    name = threat.replace("_", "/")
    powers = [2**i for i in range(max(1, largest).bit_length())]  # the summary's grid: 1, 2, 4, ... <= largest
    for k in sorted({powers[0], powers[len(powers) // 3], powers[2 * len(powers) // 3], powers[-1]}):
      # past the grid's end no answer is certified
      rows.append((f"certified accuracy, {k} {name}",
                   lambda s, k=k, t=threat: s["metrics"][f"cra_{t}"].get(str(k), 0.0)))
    rows.append((f"largest possible, {name}", lambda s, t=threat: s["largest_certificate"][t]))
  if first.get("trigger_norm") is not None:  # counts that hold together with a test trigger of that norm
    rows.append((f"largest modifications r with a test trigger < {first['trigger_norm']:g}: median / max",
                 lambda s: "{} / {}".format(*s["metrics"]["largest_at_trigger_norm"].values())))
    for t in ("0", f"{first['trigger_norm']:g}"):
      rows.append(("certified accuracy, 0 changes, " + ("no test trigger" if t == "0" else f"test trigger < {t}"),
                   lambda s, t=t: s["metrics"]["cra_at_norm"][t]["modifications"].get("0", 0.0)))
  rows += [("certificates", lambda s: "exact" if s["exact"] else f"each p >= 1 - {s['defense']['alpha']:g}"),
           ("time per member (s)", lambda s: s["time_per_member_s"])]
  return _table(summaries, rows + _undefended_rows(first))


def summary_table(summaries: dict[str, dict]) -> str:
  """A one-screen table of the headline numbers of one or more runs (columns = runs)."""
  first = next(iter(summaries.values()))
  if "threats" in first:  # a count certificate
    return count_table(summaries)
  rows = _headline_rows()
  # three radii of the grid that some run can certify: below the margin ceiling times its largest sigma_x
  reach = max(s["margin_ceiling"] * ((s.get("sigma_search") or {}).get("sigma_hi") or s["sigma_0"])
              for s in summaries.values())
  grid = [r for r in first.get("radius_grid", [])[1:] if r < reach]
  for kind, label in (("cra_test", "test-input"), ("cra", "joint")):
    for r in sorted({grid[0], grid[len(grid) // 2], grid[-1]}) if grid else []:
      rows.append((f"CRA({label} radius > {r:g})", lambda s, r=r, kind=kind: s["metrics"][kind].get(str(float(r)))))
  for k in first.get("poison_budget_grid", [])[1:4]:  # certified against k poisoned training images
    rows.append((f"certified accuracy, {k} poisons", lambda s, k=k: s["metrics"]["cra_poison_budget"].get(str(k))))
  rows += [("aligned / trimmed answers", lambda s: "{} / {}".format(
               s["metrics"]["aligned_clean"] + s["metrics"]["aligned_triggered"],
               s["metrics"]["trimmed_clean"] + s["metrics"]["trimmed_triggered"])),
           ("contradictions (after / before the store)", lambda s: "{} / {}".format(
               s["consistency"]["contradictions"], s["consistency"]["contradictions_pre_store"])),
           ("margin ceiling (sigma units)", lambda s: s["margin_ceiling"]),
           ("mean sigma_x (clean / triggered)", lambda s: f"{s['sigma']['clean']['mean']:.3f} / "
                                                          f"{s['sigma']['triggered']['mean']:.3f}"),
           ("side channel flagged", lambda s: s["probe"]["channel"] if "probe" in s else "-")]
  return _table(summaries, rows + _undefended_rows(first))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> None:
  """Joins a multi-process JAX job (before anything else touches jax's backends).

  With all three arguments None the cluster is auto-detected (Cloud TPU, SLURM, Open MPI, Kubernetes). CPU
  processes exchange data through gloo collectives. Raises UsageError for a half-given or inconsistent set.
  """
  import jax  # pylint: disable=g-import-not-at-top

  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise UsageError("--coordinator_address, --num_processes and --process_id go together (or give none of "
                     "them and --distributed to auto-detect the cluster)")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise UsageError(f"--process_id must be in [0, {num_processes}), got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s)
  logger.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
              jax.local_device_count(), jax.device_count())


def main(spec: str | None, overrides: dict[str, str]) -> None:
  cli.require(workdir=_WORKDIR.value)
  config = load(spec, overrides)
  import jax  # pylint: disable=g-import-not-at-top

  if _CACHE.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # CPU programs compile in < 1 s
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if _DISTRIBUTED.value or any(v is not None for v in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)):
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _INIT_TIMEOUT.value)
  primary = jax.process_index() == 0
  if not primary:  # the other processes compute; process 0 reports
    logging.getLogger("certssb_jax").setLevel(logging.WARNING)
  from certssb_jax.experiment import pipeline  # pylint: disable=g-import-not-at-top

  progress = cli.progress(_PROGRESS.value and primary)
  workdir = _WORKDIR.value
  runs = {}
  if _COMPARE.value:
    runs = pipeline.compare(config, workdir, tuple(_COMPARE.value), progress=progress, fresh=_FRESH.value)
  else:
    summary = pipeline.run(config, workdir, progress=progress, fresh=_FRESH.value)
    runs[summary.get("method", "run")] = summary  # a process other than 0 reports no method
  if not primary:
    return
  print()
  print(summary_table(runs))
  print()
  for name, s in runs.items():
    d = workdir if not _COMPARE.value else os.path.join(workdir, name)
    print(f"{name}: wrote {len(s['files'])} files to {d} (summary.json, per_sample.csv, ...)")


def run_cli(argv: list[str] | None = None) -> None:
  """Parses the command line and runs ``main``; user mistakes exit with code 2 and one line on stderr."""
  argv = list(sys.argv if argv is None else argv)
  try:
    spec, overrides, rest = split_config_args(argv[1:])
  except UsageError as e:
    cli.fail(e)

  cli.run(lambda: main(spec, overrides), argv=[argv[0], *rest])


if __name__ == "__main__":
  run_cli()
