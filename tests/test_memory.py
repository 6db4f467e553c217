"""Certification memory is bounded by the configuration (models per kernel call x inputs per call), not by M or
the test-set size: the kernel is compiled at paper scale without running it and its memory read from
``jax.jit(...).lower(...).compile().memory_analysis()`` (XLA:CPU reports it; abstract ``jax.ShapeDtypeStruct``
inputs, nothing allocated).

Paper scale: M = 1000 models certified in kernel chunks of 100, CIFAR-10-sized inputs (32 x 32 x 3, K = 10), 512
inputs per call, the pre-activation ResNet of ``models.MODELS`` (the MNIST CNN if it is missing), ``vmap`` form
(how accelerators run the kernel; the ``loop`` form is checked at small chunks).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certssb_jax.certify import kernel as certify
from certssb_jax.ensemble import sharding, trainer as ensemble
from certssb_jax.ensemble.member import Streams
from certssb_jax.models import zoo as models

SHAPE = (32, 32, 3)
K = 10
NAME = "preact_resnet" if "preact_resnet" in models.MODELS else "mnist_cnn"


def _model():
  return models.get_model(NAME, K)


def _variables(model):
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *SHAPE), jnp.float32), train=False),
                        jax.random.key(0))


def _bytes(tree) -> int:
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _activation_bytes_per_sample(model) -> int:
  """Sum of the sizes of every intermediate value of one forward pass of ONE input (the jaxpr's equation
  outputs, nested jaxprs included): what a forward pass could at most hold at once, per input and model."""
  variables = _variables(model)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
      variables, jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32))

  def walk(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      total += sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize for v in eqn.outvars
                   if hasattr(v.aval, "shape"))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            total += walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            total += walk(sub)
    return total

  return walk(closed.jaxpr)


def _memory(models_per_chunk: int, batch_size: int, member_map: str = "vmap", num_inputs: int | None = None):
  model = _model()
  mesh = sharding.default_mesh(jax.devices()[:1])
  args, kwargs = certify.abstract_kernel_args(model, SHAPE, models_per_chunk, batch_size, mesh=mesh,
                                              member_map=member_map, num_inputs=num_inputs)
  stats = certify.certify_kernel.lower(*args, **kwargs).compile().memory_analysis()
  assert stats is not None, "memory_analysis() gave nothing on this backend"
  return stats


@pytest.fixture(scope="module")
def paper():
  return _memory(100, 512)


def test_paper_scale_kernel_memory_is_within_a_bound_computed_from_the_chunk_sizes(paper):
  c, b = 100, 512
  model = _model()
  param_bytes = _bytes(_variables(model)["params"]) + _bytes(_variables(model).get("batch_stats", {}))
  key_bytes = 8  # a threefry key: two uint32
  input_bytes = int(np.prod(SHAPE)) * 4
  # arguments: exactly the chunk's weights and keys plus one batch of inputs and sigmas
  assert paper.argument_size_in_bytes == c * (param_bytes + key_bytes) + b * (input_bytes + 4)
  # outputs: each model's class (int32) and K probabilities (float32) per input, plus a tuple header
  assert c * b * (4 + 4 * K) <= paper.output_size_in_bytes <= c * b * (4 + 4 * K) + 1024
  # scratch: at most every intermediate of every (model, input) forward pass at once
  per_sample = _activation_bytes_per_sample(model)
  assert paper.temp_size_in_bytes <= c * b * per_sample
  total = paper.temp_size_in_bytes + paper.argument_size_in_bytes + paper.output_size_in_bytes
  assert total <= c * (param_bytes + key_bytes) + c * b * (per_sample + 4 + 4 * K) + b * (input_bytes + 4) + 1024


def test_kernel_memory_is_the_same_for_any_M_and_test_set_size(paper):
  # M = 1000 or 2000 models, 10,000 or 50,000 test inputs: the same kernel calls, the same compiled program.
  for num_models, num_inputs in ((1000, 10_000), (2000, 50_000)):
    del num_models  # the kernel chunk is models_per_chunk whatever M is (the host loops over ceil(M / 100))
    other = _memory(100, 512, num_inputs=num_inputs)
    assert other.temp_size_in_bytes == paper.temp_size_in_bytes
    assert other.argument_size_in_bytes == paper.argument_size_in_bytes
    assert other.output_size_in_bytes == paper.output_size_in_bytes


@pytest.mark.slow
def test_kernel_memory_scales_with_models_per_chunk_and_batch_size(paper):
  half_chunk, half_batch = _memory(50, 512), _memory(100, 256)
  assert half_chunk.temp_size_in_bytes == pytest.approx(paper.temp_size_in_bytes / 2, rel=0.05)
  assert half_batch.temp_size_in_bytes == pytest.approx(paper.temp_size_in_bytes / 2, rel=0.05)
  # the loop form (CPU default) is also linear in the chunk
  four, eight = _memory(4, 512, "loop"), _memory(8, 512, "loop")
  assert eight.temp_size_in_bytes <= 2 * four.temp_size_in_bytes * 1.05
  assert eight.temp_size_in_bytes <= 8 * 512 * _activation_bytes_per_sample(_model())


def test_the_host_loop_only_makes_the_planned_kernel_calls(monkeypatch):
  """certify_inputs over (M, N) = (5, 9) and (11, 30) with chunks of 4 and batches of 8: every kernel call has
  the planned shapes (so the compiled program, and its memory, is the one measured above), one compile in all,
  ceil(M / 4) * ceil(N / 8) calls."""
  model = models.get_model("mnist_cnn", 2)
  mesh = sharding.default_mesh(jax.devices()[:1])
  real = certify.certify_kernel
  calls = []

  def spy(*args, **kwargs):
    calls.append(jax.tree.map(lambda a: (a.shape, str(a.dtype)), args))
    return real(*args, **kwargs)

  monkeypatch.setattr(certify, "certify_kernel", spy)
  planned, _ = certify.abstract_kernel_args(model, (28, 28, 1), 4, 8, mesh=mesh, member_map="loop")
  planned = jax.tree.map(lambda a: (a.shape, str(a.dtype)), planned)
  trainer = ensemble.EnsembleTrainer(model, (28, 28, 1), ensemble.TrainConfig(1, 8, 1e-3, 12), mesh=mesh)
  state = trainer.init_chunk(np.arange(12), Streams.ensemble(0))
  rs = np.random.RandomState(0)
  traces = []  # member_logits runs once per slot (4 here) each time the kernel is traced, never when it runs
  real_logits = certify.member_logits
  monkeypatch.setattr(certify, "member_logits", lambda *a: traces.append(1) or real_logits(*a))
  for num_models, n in ((5, 9), (11, 30)):
    calls.clear()
    x = rs.rand(n, 28, 28, 1).astype(np.float32)
    preds, _ = certify.certify_inputs(model, [(np.arange(12), state)], x, np.full(n, 0.5, np.float32), seed=0,
                                      num_models=num_models, batch_size=8, mesh=mesh, member_map="loop",
                                      models_per_chunk=4)
    assert preds.shape == (num_models, n)
    assert len(calls) == math.ceil(num_models / 4) * math.ceil(n / 8)
    for call in calls:
      assert call == planned
  assert len(traces) <= 4  # one program (4 slots) for every call; none if an earlier test compiled it already
