"""Child process on 8 CPU devices: the sharded pieces against independent references; prints a JSON of checks.

(a) ``ordered_sum`` over 8 devices equals a sequential float32 left fold in id order (numpy); (b) certification
of M = 12 models on an 8-device mesh equals a 1-device mesh of the same process; (c) the ensemble scorer's value
and sigma-gradient on 8 devices equal 1 device's bit for bit and a naive loop to rounding.
"""

import json

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from certssb_jax.certify import kernel as certify
from certssb_jax.ensemble import scorer, sharding, trainer as ensemble
from certssb_jax.ensemble.member import Streams
from certssb_jax.models import zoo as models


def main() -> None:
  assert len(jax.devices()) == 8
  out = {}
  mesh8 = sharding.default_mesh()
  rs = np.random.RandomState(0)
  vals = (rs.randn(16, 5, 3) * 10.0 ** rs.randint(-6, 6, (16, 5, 3))).astype(np.float32)
  valid = np.arange(16) < 13  # M = 13 of 16 slots
  f = jax.jit(jax.shard_map(lambda v, ok: scorer.ordered_sum(v, ok, 8), mesh=mesh8,
                            in_specs=(P("ens"), P("ens")), out_specs=P(), check_vma=False))
  acc = np.zeros((5, 3), np.float32)
  for m in range(13):
    acc = (acc + vals[m]).astype(np.float32)
  out["ordered_sum_equal"] = bool(np.array_equal(np.asarray(f(vals, valid)), acc))
  grouped = np.zeros((5, 3), np.float32)  # what a psum of per-device partial sums (2 models each) would give
  for d in range(8):
    part = np.zeros((5, 3), np.float32)
    for m in range(2 * d, min(2 * d + 2, 13)):
      part = (part + vals[m]).astype(np.float32)
    grouped = (grouped + part).astype(np.float32)
  out["pairwise_differs"] = bool(not np.array_equal(grouped, acc))  # the order matters for these values

  model = models.get_model("mnist_cnn", 2)
  tr = ensemble.EnsembleTrainer(model, (28, 28, 1), ensemble.TrainConfig(1, 8, 1e-3, 12), mesh=mesh8)
  x = rs.rand(10, 28, 28, 1).astype(np.float32)
  state = tr.init_chunk(np.arange(16), Streams.ensemble(3))
  sigma = rs.uniform(0.2, 0.8, 10).astype(np.float32)
  chunks = [(np.arange(16), state)]
  mesh1 = sharding.default_mesh(jax.devices()[:1])
  p8, s8 = certify.certify_inputs(model, chunks, x, sigma, seed=1, num_models=12, batch_size=4, mesh=mesh8)
  p1, s1 = certify.certify_inputs(model, chunks, x, sigma, seed=1, num_models=12, batch_size=4, mesh=mesh1,
                                  models_per_chunk=5)
  out["certify_equal"] = bool(np.array_equal(p8, p1) and np.array_equal(s8, s1))
  out["certify_shape"] = list(p8.shape)

  params = jax.tree.map(lambda a: a[:12], state.params)
  xb = jnp.asarray(x[:3])

  def radius_like(score_fn, st, s):
    return jnp.sum(score_fn(st, xb + s * jnp.ones_like(xb))[:, 1] ** 2)

  res = {}
  for name, mesh in (("8", mesh8), ("1", mesh1)):
    sc = scorer.EnsembleScorer(model, mesh, 12)
    st = sc.place(params, {})
    val, grad = jax.jit(jax.value_and_grad(lambda s, sc=sc, st=st: radius_like(sc, st, s)))(0.3)
    res[name] = (np.asarray(val), np.asarray(grad))

  def naive(s):
    probs = [models.logits_to_probs(model.apply({"params": jax.tree.map(lambda a: a[m], params)},
                                                xb + s * jnp.ones_like(xb))) for m in range(12)]
    return jnp.sum((sum(probs) / 12)[:, 1] ** 2)

  nv, ng = jax.value_and_grad(naive)(0.3)
  out["scorer_equal"] = bool(np.array_equal(res["8"][0], res["1"][0]) and np.array_equal(res["8"][1], res["1"][1]))
  out["scorer_close"] = bool(np.allclose(res["8"][0], nv, rtol=1e-5) and
                             np.allclose(res["8"][1], ng, rtol=1e-4, atol=1e-6))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
