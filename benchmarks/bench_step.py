"""One training step of a paper model under XLA's default CPU options and under certssb-jax's (backend.py).

  python benchmarks/bench_step.py                     # MNIST CNN, batch 64
  python benchmarks/bench_step.py --model preact_resnet --batch 32

Prints the best-of-3 mean ms per step (200 donated steps each) for each set of compiler options.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from certssb_jax import backend
from certssb_jax import ensemble
from certssb_jax import member
from certssb_jax import models

SHAPES = {"mnist_cnn": (28, 28, 1), "preact_resnet": (32, 32, 3), "resnet18": (224, 224, 3)}


def time_step(model, shape, batch, options, steps):
  tx = optax.adam(1e-3)
  step = jax.jit(lambda s, x, y: member.member_step(model, tx, s, x, y), donate_argnums=0,
                 compiler_options=options)
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.rand(batch, *shape).astype(np.float32))
  y = jnp.asarray(rs.randint(0, 2, batch).astype(np.int32))
  state = member.init_member(model, tx, jax.random.key(0), shape)
  state, _ = step(state, x, y)
  jax.block_until_ready(state)
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(steps):
      state, _ = step(state, x, y)
    jax.block_until_ready(state)
    best = min(best, (time.perf_counter() - t) / steps * 1e3)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="mnist_cnn", choices=sorted(SHAPES))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
  model = models.get_model(args.model, 2)
  print(f"{args.model}, batch {args.batch}, {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"jax {jax.__version__}")
  for name, options in (("XLA defaults", None),
                        ("certssb-jax (backend.compiler_options())", backend.compiler_options())):
    print(f"  {name:45s} {time_step(model, SHAPES[args.model], args.batch, options, args.steps):7.2f} ms/step"
          f"   options={options}")


if __name__ == "__main__":
  main()
