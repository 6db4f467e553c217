"""One training step of a paper model under XLA's default CPU options and under certssb-jax's (backend.py).

  python benchmarks/bench_step.py                     # MNIST CNN, batch 64
  python benchmarks/bench_step.py --model preact_resnet --batch 32
  python benchmarks/bench_step.py --conv patches --dtype bfloat16          # another formulation / compute dtype
  python benchmarks/bench_step.py --models 8 --conv xla,patches            # 8 models vmapped in one step

Prints the best-of-3 mean ms per step (``--steps`` donated steps each) for each set of compiler options and
each convolution formulation (``layers.CONV_FORMULATIONS``) and compute dtype asked for. With ``--models`` > 1
the step is ``vmap``ped over that many models (the ensemble's ``member_map="vmap"`` program; under vmap the
``xla`` formulation's convolutions become grouped convolutions), and ms per model-step is printed too.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from certssb_jax import backend
from certssb_jax.ensemble import member
from certssb_jax.models import layers, zoo as models

SHAPES = {"mnist_cnn": (28, 28, 1), "preact_resnet": (32, 32, 3), "resnet18": (224, 224, 3)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def time_step(model, shape, batch, options, steps, num_models=1):
  """Best-of-3 mean ms per step of ``num_models`` models (vmapped when > 1)."""
  tx = optax.adam(1e-3)
  one = lambda s, x, y: member.member_step(model, tx, s, x, y)
  step = jax.jit(one if num_models == 1 else jax.vmap(one), donate_argnums=0, compiler_options=options)
  rs = np.random.RandomState(0)
  lead = () if num_models == 1 else (num_models,)
  x = jnp.asarray(rs.rand(*lead, batch, *shape).astype(np.float32))
  y = jnp.asarray(rs.randint(0, 2, (*lead, batch)).astype(np.int32))
  init = lambda k: member.init_member(model, tx, k, shape)
  state = init(jax.random.key(0)) if num_models == 1 else jax.vmap(init)(jax.random.split(jax.random.key(0),
                                                                                          num_models))
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
  parser.add_argument("--conv", default="xla", help="comma-separated formulations: xla, patches")
  parser.add_argument("--dtype", default="float32", help="comma-separated compute dtypes: float32, bfloat16")
  parser.add_argument("--models", type=int, default=1, help="models per step (vmapped when > 1)")
  parser.add_argument("--options", default="both", choices=("both", "defaults", "certssb"),
                      help="compiler options to time: XLA's defaults, certssb-jax's, or both")
  args = parser.parse_args()
  convs = [c for c in args.conv.split(",") if c]
  dtypes = [d for d in args.dtype.split(",") if d]
  for c in convs:
    layers.check_conv(c, args.model)
  for d in dtypes:
    if d not in DTYPES:
      parser.error(f"--dtype {d!r} is not one of {sorted(DTYPES)}")
  print(f"{args.model}, batch {args.batch}, {args.models} model(s) per step, {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), jax {jax.__version__}")
  option_sets = [("XLA defaults", None), ("certssb-jax (backend.compiler_options())", backend.compiler_options())]
  option_sets = option_sets[:1] if args.options == "defaults" else option_sets[1:] if args.options == "certssb" \
      else option_sets
  for conv in convs:
    for dtype in dtypes:
      model = models.get_model(args.model, 2, conv=conv, dtype=DTYPES[dtype])
      for name, options in option_sets:
        ms = time_step(model, SHAPES[args.model], args.batch, options, args.steps, args.models)
        per_model = f"  {ms / args.models:7.2f} ms/model-step" if args.models > 1 else ""
        print(f"  conv={conv:8s} dtype={dtype:9s} {name:45s} {ms:8.2f} ms/step{per_model}   options={options}",
              flush=True)


if __name__ == "__main__":
  main()
