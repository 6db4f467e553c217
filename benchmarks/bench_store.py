"""Cost per query of storage-update certification as the store grows (docs/method.md section 5).

For each store size S the store is filled with S random balls (``CertifiedStore.from_arrays``: random inputs in
[0, 1]^D, labels 0/1, radii in [0.05, 0.5], pairwise disjoint at these distances), then ``--repeats`` batches
of ``--batch`` fresh queries (a fraction ``--near-fraction`` moved 0.3 away from a stored point, so that
aligns, trims and exact recomputes happen; the rest uniform, abstentions included) are certified after one
warm-up batch (which compiles the kernel). The table splits the time per query into the device part (kernel
dispatch, host-to-device transfers of streamed chunks, waiting for and fetching results) and the host part
(exact float64 recomputes and the sequential align/trim logic), as accumulated by ``CertifiedStore.stats()``.

    python benchmarks/bench_store.py --dim 784 --store-size 1000 10000 100000 --batch 256 --chunk-size 4096
    python benchmarks/bench_store.py --dim 150528 --store-size 1000 10000 --batch 64 --chunk-size 512
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from certssb_jax.store.certified import CertifiedStore


def random_inputs(rng: np.random.Generator, n: int, dim: int, piece: int = 1024) -> np.ndarray:
  """(n, dim) float32 uniform inputs, drawn piecewise to keep temporaries small."""
  x = np.empty((n, dim), np.float32)
  for start in range(0, n, piece):
    stop = min(n, start + piece)
    x[start:stop] = rng.random((stop - start, dim), dtype=np.float32)
  return x


def bench_one(store_size: int, args: argparse.Namespace) -> dict[str, float]:
  """Fills a store of ``store_size`` balls and times ``args.repeats`` batches of queries."""
  rng = np.random.default_rng(store_size)
  t0 = time.perf_counter()
  x_store = random_inputs(rng, store_size, args.dim)  # (S, D); kept to place queries next to stored points
  store = CertifiedStore.from_arrays(x_store, rng.integers(0, 2, store_size),
                                     rng.uniform(0.05, 0.5, store_size), chunk_size=args.chunk_size,
                                     query_batch=args.batch,
                                     device_cache_bytes=int(args.device_cache_mb * 2**20))
  fill_s = time.perf_counter() - t0

  def make_batch() -> tuple[np.ndarray, ...]:
    q = random_inputs(rng, args.batch, args.dim)  # (B, D)
    near = rng.uniform(size=args.batch) < args.near_fraction
    if near.any():  # a stored point moved by l2 norm 0.3: inside or next to its ball, so align/trim happen
      x_near = x_store[rng.integers(0, store_size, int(near.sum()))].astype(np.float64)  # (n, D)
      step = rng.normal(size=x_near.shape)
      step *= 0.3 / np.linalg.norm(step, axis=1, keepdims=True)
      q[near] = (x_near + step).astype(np.float32)
    return q, rng.integers(-1, 2, args.batch), rng.uniform(0.05, 0.5, args.batch), 0.25

  store.certify(*make_batch())  # warm-up: compiles the kernel shapes (and fills the device cache)
  batches = [make_batch() for _ in range(args.repeats)]
  before = store.stats()
  t0 = time.perf_counter()
  for batch in batches:
    store.certify(*batch)
  wall = time.perf_counter() - t0
  after = store.stats()
  num = args.batch * args.repeats
  return dict(store=store_size, device_ms=1e3 * (after["seconds_device"] - before["seconds_device"]) / num,
              host_ms=1e3 * (after["seconds_host"] - before["seconds_host"]) / num, wall_ms=1e3 * wall / num,
              exact=(after["num_exact_pairs"] - before["num_exact_pairs"]) / num, fill_s=fill_s,
              aligned=(after["num_aligned"] - before["num_aligned"]) / num,
              trimmed=(after["num_trimmed"] - before["num_trimmed"]) / num)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dim", type=int, default=784, help="input dimension D (784 MNIST, 150528 = 224x224x3)")
  parser.add_argument("--store-size", type=int, nargs="+", default=[1000, 10000, 100000],
                      help="store sizes to measure")
  parser.add_argument("--batch", type=int, default=256, help="queries per certify call (= query_batch)")
  parser.add_argument("--chunk-size", type=int, default=4096, help="store rows per device chunk")
  parser.add_argument("--repeats", type=int, default=2, help="timed batches per store size")
  parser.add_argument("--near-fraction", type=float, default=0.5,
                      help="fraction of queries placed next to a stored point (the rest are uniform)")
  parser.add_argument("--device-cache-mb", type=float, default=1024.0,
                      help="device memory for cached chunks (0: stream every chunk every call)")
  args = parser.parse_args()
  print(f"# store benchmark: dim={args.dim} batch={args.batch} chunk_size={args.chunk_size} "
        f"repeats={args.repeats} near_fraction={args.near_fraction:g} device_cache_mb={args.device_cache_mb:g} "
        f"device={jax.devices()[0].device_kind}")
  print()
  print("| store size | ms/query total | device kernel | host logic | exact pairs/query | aligned | trimmed |"
        " fill (s) |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for size in args.store_size:
    r = bench_one(size, args)
    print(f"| {r['store']:,} | {r['wall_ms']:.3f} | {r['device_ms']:.3f} | {r['host_ms']:.3f} | "
          f"{r['exact']:.2f} | {r['aligned']:.0%} | {r['trimmed']:.0%} | {r['fill_s']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
