r"""Every figure of the GPU issue in one command: the MNIST protocol's stage times, training and certification
throughput, the storage update, and PyTorch on the same GPU.

  python benchmarks/bench_gpu.py --out bench_gpu.json                        # one GPU, Fashion-MNIST (< 8 min)
  python benchmarks/bench_gpu.py --config configs/mnist.py --data_dir /data/mnist --out bench_gpu.json
  python benchmarks/bench_gpu.py --tiny --out /tmp/bench_gpu_tiny.json       # toy sizes: a dry run on a CPU

Sections, in the order they run (the JSON is rewritten after each, so a run cut short keeps what it measured):

* ``train_step``: the vmapped ensemble step (``--step_models`` models of the config's CNN, batch
  ``--step_batch``, one Adam step each, donated state; the batches are given, so data movement is left out) for
  each convolution formulation (``xla``: grouped convolutions under vmap; ``patches``: batched matrix products,
  ``layers.PatchesConv``) and compute dtype (float32, bfloat16). Steps/s, model-steps/s, achieved TFLOP/s and
  the share of the device's dense peak (bfloat16 peak for bfloat16; TF32 peak for float32, which JAX's default
  precision computes with TF32 on NVIDIA GPUs). Useful FLOPs are XLA's count for ONE model's step with
  ``nn.Conv`` (``compile().cost_analysis()``) times the models; XLA's count of each vmapped program is also
  given (the patches' extraction adds FLOPs that are not the model's). Each row is projected to the
  protocol's ``--num_models`` x ``--epochs`` x ``--protocol_n_train // batch`` model-steps.
* ``certify``: ``certify.certify_inputs`` of ``--cert_inputs`` inputs by ``--cert_models`` models (randomly
  initialised; ``--cert_models_per_chunk`` per kernel call), timed twice (the first includes compilation):
  inputs x models per second.
* ``store``: ms per query of the storage update with ``--store_size`` certified balls in the store
  (``benchmarks/bench_store.py``'s measurement at the input size of the config's data).
* ``torch``: PyTorch on the same GPU: the sequential baseline (``torch_baseline.train_member``, the paper
  code's way: one model after the other, one epoch of ``--protocol_n_train`` inputs per timed model) and a
  ``torch.func`` ensemble (``torch_baseline.FuncEnsemble``: ``stack_module_state`` + ``vmap(grad)`` + foreach
  Adam, ``--torch_models`` models per step), both timed per step and projected to the protocol. Skipped with a
  note when torch is missing or has no CUDA (in ``--tiny`` the same code then runs on the CPU, as a check of
  the code, not as a figure). ``torch.set_float32_matmul_precision(--torch_matmul_precision)`` (default
  ``high``: TF32, as JAX's default).
* ``pipeline``: ``pipeline.run`` of the config (default ``configs/fashion_mnist.py``: the paper's MNIST
  protocol on Fashion-MNIST's T-shirt vs Trouser, whose IDX files Debian ships; sample-specific sigma, M =
  ``--num_models``, ``--epochs``), from an empty run folder, compilation included (no persistent cache): its
  ``timings_s``, wall time, the first and later training chunks, and the headline metrics.

Every section records its sizes; the JSON also records the device kind, the driver (``nvidia-smi``) and the
versions. ``--tiny`` runs every section at toy sizes (``configs/fashion_mnist.py:quick`` for the pipeline) in
about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: benchmarks.*

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.clock import StepClock  # noqa: E402  pylint: disable=g-bad-import-order
from certssb_jax.certify import kernel as certify_lib  # noqa: E402
from certssb_jax.ensemble import (
  member,  # noqa: E402
  trainer as ensemble,  # noqa: E402
)
from certssb_jax.experiment import (
  config as config_lib,  # noqa: E402
  pipeline,  # noqa: E402
  report,  # noqa: E402
)
from certssb_jax.models import (
  layers,  # noqa: E402
  zoo as models_lib,  # noqa: E402
)

# Dense (no sparsity) peak TFLOP/s of NVIDIA's data sheets, by a substring of ``jax.devices()[0].device_kind``,
# most specific first: {"bfloat16": tensor-core bf16, "float32": TF32 tensor cores}. NVL parts differ from the
# SXM ones and are not listed: pass --peak_tflops.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {}),
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("H100 NVL", {}),
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SHAPES = {"mnist_cnn": (28, 28, 1), "preact_resnet": (32, 32, 3), "resnet18": (224, 224, 3)}


def peak_tflops(device_kind: str, bf16_override: float | None = None) -> dict[str, float | None]:
  """{"bfloat16", "float32"} dense peak TFLOP/s of a device kind (None where unknown). ``bf16_override``
  replaces the table: float32 (TF32) is then taken as half of it, as on every listed GPU."""
  if bf16_override:
    return {"bfloat16": bf16_override, "float32": bf16_override / 2}
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return {"bfloat16": peaks.get("bfloat16"), "float32": peaks.get("float32")}
  return {"bfloat16": None, "float32": None}


def flops_of(compiled: Any) -> float | None:
  """XLA's FLOP count of a compiled program (``cost_analysis()``), or None when the backend gives none."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  value = (ca or {}).get("flops")
  return float(value) if value is not None and value > 0 else None


def protocol_model_steps(args: argparse.Namespace) -> int:
  """Model-steps of the protocol's ensemble: M x epochs x (n_train // batch)."""
  return args.num_models * args.epochs * (args.protocol_n_train // args.step_batch)


# ---------------------------------------------------------------------------------------------- training step


def _stacked_init(model: Any, tx: optax.GradientTransformation, num: int, shape: tuple[int, ...]):
  keys = jax.random.split(jax.random.key(0), num)
  return jax.jit(jax.vmap(lambda k: member.init_member(model, tx, k, shape)))(keys)


def time_steps(step: Callable, state: Any, batch: tuple[jax.Array, ...], steps: int,
               rounds: int) -> tuple[float, Any]:
  """Best-of-``rounds`` seconds per call of ``state = step(state, *batch)[0]`` over ``steps`` calls."""
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      state = step(state, *batch)[0]
    jax.block_until_ready(state)
    best = min(best, (time.perf_counter() - t0) / steps)
  return best, state


def bench_train_step(args: argparse.Namespace, model_name: str, peaks: dict[str, float | None]) -> dict[str, Any]:
  """Throughput of the vmapped ensemble step for every (formulation, dtype); see the module docstring."""
  shape, c, b = SHAPES[model_name], args.step_models, args.step_batch
  tx = optax.adam(1e-3)
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.rand(c, b, *shape).astype(np.float32))  # (C, B, H, W, C_in): every model's batch
  y = jnp.asarray(rs.randint(0, 2, (c, b)).astype(np.int32))
  one = models_lib.get_model(model_name, 2)
  one_state = jax.eval_shape(lambda: member.init_member(one, tx, jax.random.key(0), shape))
  one_step = jax.jit(lambda s, xb, yb: member.member_step(one, tx, s, xb, yb))
  model_flops = flops_of(one_step.lower(one_state, jax.ShapeDtypeStruct((b, *shape), jnp.float32),
                                        jax.ShapeDtypeStruct((b,), jnp.int32)).compile())
  rows = []
  for conv in layers.CONV_FORMULATIONS:
    for dtype_name in args.dtypes:
      model = models_lib.get_model(model_name, 2, conv=conv, dtype=DTYPES[dtype_name])
      step = jax.jit(jax.vmap(lambda s, xb, yb, m=model: member.member_step(m, tx, s, xb, yb)), donate_argnums=0)
      state = _stacked_init(model, tx, c, shape)
      t0 = time.perf_counter()
      compiled = step.lower(state, x, y).compile()
      compile_s = time.perf_counter() - t0
      state = jax.block_until_ready(compiled(state, x, y)[0])  # warm-up
      sec, state = time_steps(compiled, state, (x, y), args.step_repeats, args.step_rounds)
      del state
      row = {"conv": conv, "dtype": dtype_name, "compile_s": round(compile_s, 3), "ms_per_step": round(1e3 * sec, 4),
             "steps_per_s": round(1 / sec, 2), "model_steps_per_s": round(c / sec, 1),
             "xla_flops_per_step": flops_of(compiled)}
      peak = peaks.get(dtype_name)
      if model_flops:
        row["achieved_tflops"] = round(model_flops * c / sec / 1e12, 3)
        row["share_of_peak"] = round(row["achieved_tflops"] / peak, 4) if peak else None
      row["peak_tflops"] = peak
      row["projected_protocol_train_s"] = round(protocol_model_steps(args) / (c / sec), 2)
      rows.append(row)
      print(f"  train step {conv:8s} {dtype_name:9s} {row['ms_per_step']:9.3f} ms/step  "
            f"{row['model_steps_per_s']:10.1f} model-steps/s  {row.get('achieved_tflops', '-')} TFLOP/s  "
            f"share of peak {row.get('share_of_peak')}  compile {compile_s:.1f} s", flush=True)
  return {"model": model_name, "models_per_step": c, "batch": b, "input_shape": list(shape),
          "useful_flops_per_model_step": model_flops, "protocol_model_steps": protocol_model_steps(args),
          "rounds": args.step_rounds, "steps_per_round": args.step_repeats, "rows": rows}


# ---------------------------------------------------------------------------------------------- certification


def bench_certify(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
  """Inputs x models per second of ``certify.certify_inputs`` (randomly initialised models)."""
  shape, m, n, c = SHAPES[model_name], args.cert_models, args.cert_inputs, min(args.cert_models_per_chunk,
                                                                              args.cert_models)
  model = models_lib.get_model(model_name, 2)
  state = _stacked_init(model, optax.adam(1e-3), c, shape)
  state = member.MemberState(*jax.tree.map(np.asarray, (state.params, state.batch_stats)), None)
  x = np.random.RandomState(1).rand(n, *shape).astype(np.float32)
  sigma = np.full(n, 0.25, np.float32)

  def run() -> float:
    chunks = ((np.arange(i * c, (i + 1) * c), state) for i in range(-(-m // c)))
    t0 = time.perf_counter()
    certify_lib.certify_inputs(model, chunks, x, sigma, seed=0, num_models=m, batch_size=args.cert_batch,
                               models_per_chunk=c)
    return time.perf_counter() - t0

  first, second = run(), run()
  out = {"inputs": n, "models": m, "models_per_chunk": c, "batch_size": args.cert_batch,
         "first_s_incl_compile": round(first, 3), "s": round(second, 3),
         "inputs_x_models_per_s": round(n * m / second, 1)}
  print(f"  certify {n} inputs x {m} models: {second:.3f} s ({out['inputs_x_models_per_s']:.4g} inputs x models/s; "
        f"first call {first:.2f} s)", flush=True)
  return out


def bench_store_update(args: argparse.Namespace, dim: int) -> dict[str, Any]:
  """ms per query of the storage update at ``--store_size`` balls (``bench_store.bench_one``)."""
  from benchmarks import bench_store  # pylint: disable=g-import-not-at-top

  ns = argparse.Namespace(dim=dim, batch=args.store_batch, chunk_size=4096, repeats=args.store_repeats,
                          near_fraction=0.5, device_cache_mb=1024.0)
  r = bench_store.bench_one(args.store_size, ns)
  out = {"store_size": args.store_size, "dim": dim, "batch": args.store_batch, "repeats": args.store_repeats,
         **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}}
  print(f"  storage update at {args.store_size} balls: {r['wall_ms']:.3f} ms/query (device {r['device_ms']:.3f}, "
        f"host {r['host_ms']:.3f})", flush=True)
  return out


# ---------------------------------------------------------------------------------------------- PyTorch


def bench_torch(args: argparse.Namespace) -> dict[str, Any]:
  """The sequential baseline and the torch.func ensemble on CUDA, per step and projected to the protocol."""
  try:
    import torch  # pylint: disable=g-import-not-at-top

    from benchmarks import torch_baseline as tb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"  NOTE: torch is not installed ({e}): PyTorch timings skipped", flush=True)
    return {"skipped": f"torch not installed: {e}"}
  out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
  if torch.cuda.is_available():
    dev = torch.device("cuda")
    out["device"] = torch.cuda.get_device_name(0)
  elif args.tiny:
    print("  NOTE: torch has no CUDA: CUDA timings skipped; the same code runs on the CPU at toy size as a check of "
          "the code (not a figure)", flush=True)
    dev = torch.device("cpu")
    torch.set_num_threads(1)  # toy sizes: threads would only contend
    out["device"] = "cpu (dry run, not a figure)"
  else:
    print("  NOTE: torch has no CUDA: PyTorch timings skipped", flush=True)
    return {**out, "skipped": "torch has no CUDA"}
  torch.set_float32_matmul_precision(args.torch_matmul_precision)
  out.update(matmul_precision=args.torch_matmul_precision, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  h, w, ch = SHAPES["mnist_cnn"]
  n, b = args.protocol_n_train, args.step_batch
  steps = n // b
  gen = torch.Generator().manual_seed(0)
  x = torch.rand((n, ch, h, w), generator=gen).to(dev)
  y = (torch.rand(n, generator=gen) < 0.5).long().to(dev)
  x_noised = x + 0.25 * torch.randn(x.shape, generator=gen).to(dev)
  config = tb.BaselineConfig(num_models=1, epochs=1, batch_size=b, learning_rate=1e-3, sigma=0.25)

  # sequential: each timed model = init, transfer, one epoch of steps (the paper code's loop)
  tb.train_member(x_noised, y, 0, 2, config)  # warm-up (cuDNN autotuning, allocator)
  sync()
  t0 = time.perf_counter()
  for m in range(1, args.torch_seq_models + 1):
    tb.train_member(x_noised, y, m, 2, config)
  sync()
  per_step = (time.perf_counter() - t0) / (args.torch_seq_models * steps)
  out["sequential"] = {"models_timed": args.torch_seq_models, "steps_per_model": steps,
                       "ms_per_model_step": round(1e3 * per_step, 4),
                       "projected_protocol_train_s": round(per_step * protocol_model_steps(args), 1)}
  print(f"  torch sequential ({dev.type}): {1e3 * per_step:.3f} ms per model-step -> protocol training "
        f"{out['sequential']['projected_protocol_train_s']:.0f} s", flush=True)

  # torch.func: C models per step on their own batches
  c = args.torch_models
  ens = tb.FuncEnsemble((h, w, ch), 2, list(range(c)), 0, 1e-3, dev)
  xb = torch.rand((c, b, ch, h, w), generator=gen).to(dev)
  yb = (torch.rand((c, b), generator=gen) < 0.5).long().to(dev)
  for _ in range(2):  # warm-up
    ens.step(xb, yb)
  sync()
  best = float("inf")
  for _ in range(args.step_rounds):
    t0 = time.perf_counter()
    for _ in range(args.torch_func_steps):
      ens.step(xb, yb)
    sync()
    best = min(best, (time.perf_counter() - t0) / args.torch_func_steps)
  out["func_ensemble"] = {"models_per_step": c, "batch": b, "ms_per_step": round(1e3 * best, 4),
                          "ms_per_model_step": round(1e3 * best / c, 5), "model_steps_per_s": round(c / best, 1),
                          "projected_protocol_train_s": round(best / c * protocol_model_steps(args), 2)}
  print(f"  torch.func ensemble ({dev.type}, {c} models/step): {1e3 * best:.3f} ms/step, {c / best:.1f} "
        f"model-steps/s -> protocol training {out['func_ensemble']['projected_protocol_train_s']:.1f} s", flush=True)
  del ens, xb, yb, x, y, x_noised
  if dev.type == "cuda":  # hand PyTorch's cached blocks back (JAX keeps its own preallocated pool)
    torch.cuda.empty_cache()
  return out


# ---------------------------------------------------------------------------------------------- the pipeline


def pipeline_config(args: argparse.Namespace):
  """The config of the pipeline section: ``--config`` (``:quick`` in ``--tiny``) with the size flags."""
  spec = args.config + (":quick" if args.tiny and ":" not in args.config else "")
  c = config_lib.load_config(spec)
  if args.data_dir:
    c.data.data_dir = args.data_dir
  if not args.tiny:
    c.train.num_models, c.train.epochs = args.num_models, args.epochs
  if args.defense:
    c.defense.name = args.defense
  return spec, c


def bench_pipeline(args: argparse.Namespace) -> dict[str, Any]:
  """``pipeline.run`` from an empty folder: stage times, wall time, training chunks, headline metrics."""
  spec, c = pipeline_config(args)
  if args.pipeline_conv != "xla" or args.pipeline_dtype != "float32":
    # The run config has no field for these: register the config's model with them, in this process only.
    base = models_lib.MODELS[c.model.name]
    models_lib.MODELS[c.model.name] = lambda **kw: base(conv=args.pipeline_conv, dtype=DTYPES[args.pipeline_dtype],
                                                        **kw)
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_gpu_run_")
  shutil.rmtree(workdir, ignore_errors=True)  # fresh timings: nothing is reused
  clock = StepClock()
  t0 = time.perf_counter()
  summary = pipeline.run(c, workdir, progress=clock)
  wall = time.perf_counter() - t0
  cfg = config_lib.resolve(c)
  out = {"config": spec, "data_dir": args.data_dir or "(the config's default)", "dataset": summary["dataset"],
         "n_train": summary["n_train"], "n_test": summary["n_test"], "n_triggered": summary["n_triggered"],
         "defense": cfg.defense.name, "num_models": cfg.train.num_models, "epochs": cfg.train.epochs,
         "batch_size": cfg.train.batch_size, "conv": args.pipeline_conv, "dtype": args.pipeline_dtype,
         "models_per_chunk": ensemble.auto_models_per_chunk(cfg.train.models_per_chunk, cfg.train.num_models),
         "wall_s": round(wall, 2), "timings_s": summary["timings_s"],
         "workdir": workdir if args.workdir else "(a temporary folder, removed)",
         "metrics": {k: summary["metrics"].get(k) for k in ("clean_accuracy", "era", "asr", "abstain_rate")},
         "compilation": "included (cold: no persistent compilation cache)"}
  bars = {}
  for desc, rec in clock.bars.items():
    if len(rec) > 2:
      bars[desc] = {"s": round(rec[-1][0] - rec[0][0], 3), "first_update_s": round(rec[1][0] - rec[0][0], 3),
                    "count": rec[-1][1]}
  out["progress_bars"] = bars
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  print(f"  pipeline {spec}: {cfg.defense.name}, M = {cfg.train.num_models}, {cfg.train.epochs} epochs, "
        f"{summary['n_train']} train: wall {wall:.1f} s", flush=True)
  for k, v in summary["timings_s"].items():
    print(f"    {k:28s} {v:9.2f} s", flush=True)
  return out


# ---------------------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
  """Device kind, driver (``nvidia-smi``), versions, load."""
  dev = jax.devices()[0]
  out: dict[str, Any] = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
                         "num_devices": jax.device_count(), "versions": report.versions(),
                         "python": platform.python_version(), "platform": platform.platform(),
                         "cpu_count": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2)}
  try:
    out["platform_version"] = dev.client.platform_version
  except Exception:  # pylint: disable=broad-except
    pass
  if shutil.which("nvidia-smi"):
    try:
      out["nvidia_smi"] = subprocess.run(
          ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
           "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
      out["nvidia_smi"] = f"failed: {e}"
  else:
    out["nvidia_smi"] = None
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="", help="JSON file written after every section")
  parser.add_argument("--tiny", action="store_true", help="toy sizes everywhere: a dry run on a CPU (~1 min)")
  parser.add_argument("--sections", default="train_step,certify,store,torch,pipeline",
                      help="comma-separated sections to run, in this order")
  parser.add_argument("--config", default="configs/fashion_mnist.py", help="pipeline config file[:variant]")
  parser.add_argument("--data_dir", default="", help="folder of the MNIST or Fashion-MNIST IDX files")
  parser.add_argument("--workdir", default="", help="pipeline run folder (emptied first; default a temp folder)")
  parser.add_argument("--num_models", type=int, default=1000, help="M of the protocol (pipeline, projections)")
  parser.add_argument("--epochs", type=int, default=20, help="epochs of the protocol (pipeline, projections)")
  parser.add_argument("--defense", default="", help="override defense.name, e.g. rab (default: the config's)")
  parser.add_argument("--pipeline_conv", default="xla", choices=layers.CONV_FORMULATIONS)
  parser.add_argument("--pipeline_dtype", default="float32", choices=sorted(DTYPES))
  parser.add_argument("--protocol_n_train", type=int, default=12665,
                      help="training-set size of the projections and the torch runs (MNIST 0/1: 12665)")
  parser.add_argument("--model", default="mnist_cnn", choices=sorted(SHAPES), help="model of train_step/certify")
  parser.add_argument("--step_models", type=int, default=256, help="models per vmapped step")
  parser.add_argument("--step_batch", type=int, default=128, help="batch per model")
  parser.add_argument("--step_repeats", type=int, default=50, help="timed steps per round")
  parser.add_argument("--step_rounds", type=int, default=3, help="rounds (the best is kept)")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes of train_step")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="dense bf16 peak TFLOP/s of the device (default: the table, by device kind)")
  parser.add_argument("--cert_inputs", type=int, default=10000)
  parser.add_argument("--cert_models", type=int, default=1000)
  parser.add_argument("--cert_models_per_chunk", type=int, default=256)
  parser.add_argument("--cert_batch", type=int, default=512)
  parser.add_argument("--store_size", type=int, default=10000)
  parser.add_argument("--store_batch", type=int, default=256)
  parser.add_argument("--store_repeats", type=int, default=2)
  parser.add_argument("--torch_models", type=int, default=256, help="models per torch.func ensemble step")
  parser.add_argument("--torch_func_steps", type=int, default=20, help="timed torch.func steps per round")
  parser.add_argument("--torch_seq_models", type=int, default=2, help="timed models of the sequential baseline")
  parser.add_argument("--torch_matmul_precision", default="high", choices=("highest", "high", "medium"))
  args = parser.parse_args(argv)
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  if args.tiny:
    args.step_models, args.step_batch, args.step_repeats, args.step_rounds = 3, 16, 3, 2
    args.cert_inputs, args.cert_models, args.cert_models_per_chunk, args.cert_batch = 64, 8, 4, 32
    args.store_size, args.store_batch, args.store_repeats = 500, 32, 1
    args.torch_models, args.torch_func_steps, args.torch_seq_models = 3, 3, 1
    args.protocol_n_train = 256
  sections = [s for s in args.sections.split(",") if s]
  result: dict[str, Any] = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
                            "tiny": args.tiny, "machine": machine(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  kind = result["machine"]["device_kind"]
  peaks = peak_tflops(kind, args.peak_tflops)
  result["peak_tflops"] = {**peaks, "source": "--peak_tflops" if args.peak_tflops else f"table ({kind})"}
  print(f"bench_gpu: {jax.default_backend()} ({kind}), jax {jax.__version__}, peaks {peaks}"
        + (" [--tiny: toy sizes, not figures]" if args.tiny else ""), flush=True)

  def save() -> None:
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))

  run = {"train_step": lambda: bench_train_step(args, args.model, peaks),
         "certify": lambda: bench_certify(args, args.model),
         "store": lambda: bench_store_update(args, int(np.prod(SHAPES[args.model]))),
         "torch": lambda: bench_torch(args),
         "pipeline": lambda: bench_pipeline(args)}
  t_all = time.perf_counter()
  for name in sections:
    if name not in run:
      raise SystemExit(f"unknown section {name!r}; known: {sorted(run)}")
    print(f"[{name}]", flush=True)
    t0 = time.perf_counter()
    result[name] = run[name]()
    result[name]["section_s"] = round(time.perf_counter() - t0, 2)
    save()
  result["total_s"] = round(time.perf_counter() - t_all, 2)
  result["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
  save()
  print(f"bench_gpu: done in {result['total_s']:.1f} s" + (f", written to {args.out}" if args.out else ""))
  return result


if __name__ == "__main__":
  main()
