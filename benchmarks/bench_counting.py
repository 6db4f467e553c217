r"""DPA's members trained by certssb-jax against the reference's one-member-at-a-time PyTorch loop, same CPU.

Both sides train the same members: the paper's MNIST CNN, Adam, the config's learning rate, epochs and member
batch, each member on its own part of the training set (``defenses.partition.partition``, k parts). certssb-jax trains
them through its view path (``EnsembleTrainer.train_chunk(views=...)``), ``--chunk`` members per vmapped program;
PyTorch trains one after another as the DPA and Finite Aggregation reference code does
(``benchmarks/torch_baseline.train_member``, every core). Each side trains ``--members`` of the k members twice;
the second pass is reported (XLA's compilation and PyTorch's first-call costs fall in the first).

  python benchmarks/bench_counting.py --config configs/fashion_mnist10.py --k 50 --members 10 --chunk 1,10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: benchmarks.*

import numpy as np  # noqa: E402

from benchmarks import torch_baseline  # noqa: E402  pylint: disable=g-bad-import-order
from certssb_jax.defenses import partition  # noqa: E402
from certssb_jax.ensemble import trainer as ensemble  # noqa: E402
from certssb_jax.ensemble.member import Streams  # noqa: E402
from certssb_jax.experiment import config as config_lib, pipeline  # noqa: E402
from certssb_jax.models import zoo as models  # noqa: E402


def time_jax(cfg, x, y, parts, members: int, chunk: int) -> float:
  """Seconds of the second pass over ``members`` members, ``chunk`` per program."""
  model = models.get_model(cfg.model.name, len(cfg.data.classes))
  batch = cfg.defense.member_batch_size or cfg.train.batch_size
  trainer = ensemble.EnsembleTrainer(model, x.shape[1:], ensemble.TrainConfig(
      cfg.train.epochs, batch, cfg.train.learning_rate, models_per_chunk=chunk))
  views = partition.views_of_parts(parts)
  elapsed = 0.0
  for _ in range(2):
    t0 = time.perf_counter()
    for start in range(0, members, chunk):
      ids = np.arange(start, start + chunk)
      trainer.train_chunk(ids, Streams.ensemble(cfg.seed), x, y, None, views=views)
    elapsed = time.perf_counter() - t0
  return elapsed


def time_torch(cfg, x, y, parts, members: int, threads: int | None) -> float:
  """Seconds of the second pass over ``members`` members, one after another."""
  torch_baseline.set_threads(threads)
  import torch  # pylint: disable=g-import-not-at-top

  xt, yt = torch_baseline.to_nchw(x), torch.from_numpy(np.asarray(y, np.int64))
  batch = cfg.defense.member_batch_size or cfg.train.batch_size
  bc = torch_baseline.BaselineConfig(num_models=members, epochs=cfg.train.epochs, batch_size=batch,
                                     learning_rate=cfg.train.learning_rate, sigma=1.0, seed=cfg.seed)
  elapsed = 0.0
  for _ in range(2):
    t0 = time.perf_counter()
    for m in range(members):
      idx = torch.from_numpy(parts[m])
      torch_baseline.train_member(xt[idx], yt[idx], m, len(cfg.data.classes), bc)
    elapsed = time.perf_counter() - t0
  return elapsed


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="config file[:variant], as for certssb_jax.launch")
  parser.add_argument("--k", type=int, default=50, help="DPA's partitions")
  parser.add_argument("--members", type=int, default=10, help="members timed (the first of the k)")
  parser.add_argument("--chunk", default="1,10", help="certssb-jax members per program, comma-separated")
  parser.add_argument("--torch-threads", type=int, default=None, help="PyTorch threads (default: every core)")
  parser.add_argument("--out", default=None, help="also write the results here (JSON)")
  args = parser.parse_args(argv)
  chunks = [int(c) for c in args.chunk.split(",")]
  if args.k < 1 or not 1 <= args.members <= args.k or min(chunks) < 1 or any(args.members % c for c in chunks):
    parser.error(f"need 1 <= --members <= --k and every --chunk dividing --members; e.g. --k 50 --members 10 "
                 f"--chunk 1,10 (got --k {args.k} --members {args.members} --chunk {args.chunk})")
  cfg = config_lib.resolve(config_lib.load_config(args.config))
  data = pipeline.load_data(cfg)
  x, y = data.x_train, data.y_train
  parts = partition.partition(x, y, args.k, cfg.defense.partition)
  out = {"config": args.config, "k": args.k, "members": args.members, "view_mean": float(np.mean([len(p) for p in
         parts[:args.members]])), "epochs": cfg.train.epochs,
         "batch": cfg.defense.member_batch_size or cfg.train.batch_size,
         "torch_s": time_torch(cfg, x, y, parts, args.members, args.torch_threads),
         "jax_s": {c: time_jax(cfg, x, y, parts, args.members, c) for c in chunks},
         "machine": f"{_cpu_name()}, {os.cpu_count()} cores", "versions": _versions()}
  per = lambda s: s / args.members
  print(f"{out['members']} of k = {args.k} DPA members, {out['view_mean']:.0f} samples each, {out['epochs']} epochs, "
        f"batch {out['batch']}; {out['machine']}; {out['versions']}")
  print(f"| side | s / member | PyTorch / side |\n|---|---|---|\n| PyTorch, one after another | "
        f"{per(out['torch_s']):.3f} | 1.00 |")
  for c, s in out["jax_s"].items():
    print(f"| certssb-jax, {c} per program | {per(s):.3f} | {out['torch_s'] / s:.2f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  return out


def _versions() -> dict[str, str]:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  return {"jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.machine()


if __name__ == "__main__":
  main()
