"""Convolution formulations and compute dtypes of the models (``layers.CONV_FORMULATIONS``, ``dtype``).

``conv="patches"`` must be the same model as ``conv="xla"`` (``nn.Conv``): the same parameter tree (names, shapes,
dtypes and initial values) and, from the same parameters, the same logits and the same training step, also
vmapped over the models of a chunk (where ``"xla"`` becomes a grouped convolution and ``"patches"`` a batched
matrix product). ``dtype=bfloat16`` computes in bfloat16 and keeps float32 parameters, statistics and logits.
The two formulations add their products in other orders, so they agree to float32 rounding: the tolerances come
from the sizes of the sums (tests/tolerances.py), so that they hold on any CPU or GPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances  # pylint: disable=g-bad-import-order

from certssb_jax.ensemble import member, trainer as ensemble
from certssb_jax.models import layers, zoo as models

# Small inputs and the shallow variants of the ResNets (the same layer kinds: 7x7/2 stem, 3x3 convolutions of
# stride 1 and 2, 1x1 projections of stride 2), which XLA:CPU compiles in seconds.
SHAPES = {"mnist_cnn": (28, 28, 1), "preact_resnet": (32, 32, 3), "resnet18": (32, 32, 3)}
SHALLOW = {"mnist_cnn": {}, "preact_resnet": {"blocks_per_stage": 1},
           "resnet18": {"stage_sizes": (1, 1, 1, 1), "widths": (16, 32, 64, 128)}}
LR = 1e-3


@pytest.fixture(autouse=True)
def _full_float32_products():
  """Float32 products at full precision, so the comparisons hold on backends whose default rounds them (TF32)."""
  with jax.default_matmul_precision("highest"):
    yield


def _model(name: str, conv: str = "xla", dtype=jnp.float32, num_classes: int = 2, **kwargs) -> nn.Module:
  return models.get_model(name, num_classes, conv=conv, dtype=dtype, **{**SHALLOW[name], **kwargs})


def _init(model: nn.Module, shape, seed: int = 0):
  return model.init(jax.random.key(seed), jnp.zeros((1, *shape), jnp.float32), train=False)


def _inputs(shape, n: int, seed: int = 1) -> np.ndarray:
  return np.random.RandomState(seed).rand(n, *shape).astype(np.float32)


def _assert_same_tree(a, b) -> None:
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_same_parameters_whatever_the_formulation_and_dtype(name):
  shape = SHAPES[name]
  ref = _init(_model(name), shape)
  for conv in layers.CONV_FORMULATIONS:
    for dtype in (jnp.float32, jnp.bfloat16):
      variables = _init(_model(name, conv, dtype), shape)
      _assert_same_tree(ref, variables)  # names, shapes, float32 dtypes and values
  # the full-depth default models too (shapes only: their init is slow to compile on CPU)
  full = {conv: jax.eval_shape(lambda c=conv: _init(models.get_model(name, 10, conv=c), shape))
          for conv in layers.CONV_FORMULATIONS}
  assert jax.tree.structure(full["xla"]) == jax.tree.structure(full["patches"])
  assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype,
                                      full["xla"], full["patches"])) == [True] * len(jax.tree.leaves(full["xla"]))


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("num_classes", [2, 10])
def test_same_logits_in_both_formulations(name, num_classes):
  shape = SHAPES[name]
  variables = _init(_model(name, num_classes=num_classes), shape, seed=3)
  x = jnp.asarray(_inputs(shape, 5))
  out = {}
  for conv in layers.CONV_FORMULATIONS:
    model = _model(name, conv, num_classes=num_classes)
    logits = model.apply(variables, x, train=False)
    if "batch_stats" in variables:  # train mode: batch statistics, and the updated running averages
      train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    else:
      train_logits, updates = model.apply(variables, x, train=True), {}
    out[conv] = (logits, train_logits, updates)
  # forward only: the two programs' rounding, through every layer (no kink moves a value by more than rounding)
  terms, depth, _ = tolerances.model_sizes(_model(name, num_classes=num_classes), variables, x)
  for a, b in zip(jax.tree.leaves(out["xla"]), jax.tree.leaves(out["patches"])):
    assert a.dtype == b.dtype == jnp.float32
    tolerances.assert_close(b, a, tolerances.rounding_tol(terms, depth))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_vmapped_three_model_step_is_the_same_in_both_formulations(name):
  """The ensemble's own vmapped program (``member_map="vmap"``): one Adam step of 3 models on their noised
  batches gives the same losses, gradients (Adam's first moment), batch statistics and parameters."""
  shape, b = SHAPES[name], 8
  x = _inputs(shape, b)
  y = (np.arange(b) % 2).astype(np.int32)
  sigma = np.full(b, 0.25, np.float32)
  states, losses = {}, {}
  for conv in layers.CONV_FORMULATIONS:
    trainer = ensemble.EnsembleTrainer(_model(name, conv), shape, ensemble.TrainConfig(
        epochs=1, batch_size=b, learning_rate=LR, models_per_chunk=3), member_map="vmap")
    states[conv], losses[conv] = trainer.train_chunk(np.arange(3), member.Streams.ensemble(0), x, y, sigma,
                                                     return_losses=True)
  model = _model(name)
  terms, depth, units = tolerances.model_sizes(model, _init(model, shape), jnp.asarray(x))
  # the losses and batch statistics are forward values: rounding only (a kink moves no value by more)
  forward = tolerances.rounding_tol(terms, depth)
  tolerances.assert_close(losses["patches"], losses["xla"], forward)
  for a, c in zip(jax.tree.leaves(states["xla"].batch_stats), jax.tree.leaves(states["patches"].batch_stats)):
    tolerances.assert_close(c, a, forward)
  # After one step Adam's first moment is 0.1 * the gradient of the step. The backward pass rounds as deep again;
  # and a unit within rounding of its ReLU's kink can take the other side in one formulation, which moves the
  # gradients below it by its share (tolerances.kink_tol), so each model's gradients are compared per leaf in
  # 2-norm (a real difference between the formulations moves them by O(1)).
  grads = {conv: jax.tree.map(lambda m: 10 * m, states[conv].opt_state[0].mu) for conv in states}
  backward = tolerances.rounding_tol(terms, 2 * depth) + tolerances.kink_tol(units)
  for (path, a), c in zip(jax.tree_util.tree_flatten_with_path(grads["xla"])[0], jax.tree.leaves(grads["patches"])):
    for m in range(3):
      tolerances.assert_norm_close(c[m], a[m], backward, f"model {m}'s gradient {jax.tree_util.keystr(path)}")
  for a, c in zip(jax.tree.leaves(states["xla"].params), jax.tree.leaves(states["patches"].params)):
    assert a.shape[0] == 3 and a.dtype == c.dtype == np.float32
  held = tolerances.assert_adam_first_step_close(states["xla"].params, states["patches"].params, grads["xla"],
                                                 grads["patches"], LR)
  assert held > 0.9  # nearly every parameter's step was held to rounding, not only to its size


def _dtypes_of_products(fn, *args) -> set[str]:
  """Input dtypes of every convolution and dot product in ``fn``'s jaxpr (sub-jaxprs included)."""
  found = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        found.update(str(v.aval.dtype) for v in eqn.invars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("conv", layers.CONV_FORMULATIONS)
def test_bfloat16_compute_keeps_float32_params_and_logits(name, conv):
  shape = SHAPES[name]
  variables = _init(_model(name), shape, seed=2)
  x = jnp.asarray(_inputs(shape, 4))
  ref = _model(name).apply(variables, x, train=False)
  model = _model(name, conv, jnp.bfloat16)
  logits = model.apply(variables, x, train=False)
  assert logits.dtype == jnp.float32
  assert _dtypes_of_products(lambda v, x: model.apply(v, x, train=False), variables, x) == {"bfloat16"}
  # bfloat16 keeps 8 significant bits: rounding a layer's inputs and weights moves its output by up to about 2^-8
  # of its scale (about 1 after a batch norm, and the logits' own), and the layers' differences add up. That
  # rounding, not the order of the sums, dominates, so this holds wherever the products accumulate in float32.
  depth = tolerances.model_sizes(_model(name), variables, x)[1]
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=0,
                             atol=depth * 2.0 ** -8 * (1 + float(jnp.abs(ref).max())))
  assert float(jnp.abs(logits - ref).max()) > 0  # the compute really ran in bfloat16

  tx = optax.adam(LR)
  state = member.init_member(model, tx, jax.random.key(0), shape)
  y = (np.arange(4) % 2).astype(np.int32)
  state, loss = jax.jit(lambda s, x, y: member.member_step(model, tx, s, x, y))(state, x, jnp.asarray(y))
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


# ---------------------------------------------------------------------------------------------- one layer


@pytest.mark.parametrize("kernel,strides,padding,hw", [
    ((5, 5), 1, "VALID", (12, 12)),
    ((3, 3), 1, ((1, 1), (1, 1)), (9, 9)),
    ((3, 3), 2, ((1, 1), (1, 1)), (9, 8)),
    ((7, 7), 2, ((3, 3), (3, 3)), (15, 16)),
    ((3, 5), (2, 1), "SAME", (7, 10)),
    ((3, 3), 2, "SAME", (8, 8)),
    ((1, 1), 2, "SAME", (9, 9)),  # the projections: no padding, a strided slice
    ((1, 1), 1, "VALID", (5, 5)),
    ((1, 1), 1, 1, (5, 5)),  # a padded 1x1 goes through the patches
    ((2, 2), 1, ((0, 1), (2, 0)), (6, 7)),
    ((3, 3), 3, 2, (10, 11)),
])
@pytest.mark.parametrize("use_bias", [True, False])
def test_patches_conv_equals_nn_conv(kernel, strides, padding, hw, use_bias):
  x = jnp.asarray(np.random.RandomState(0).randn(2, *hw, 3).astype(np.float32))
  ref_layer = nn.Conv(4, kernel, strides=strides, padding=padding, use_bias=use_bias)
  layer = layers.PatchesConv(4, kernel, strides=strides, padding=padding, use_bias=use_bias)
  variables = ref_layer.init(jax.random.key(0), x)
  _assert_same_tree(variables, layer.init(jax.random.key(0), x))
  if use_bias:  # a non-zero bias, so that its addition is checked too
    variables = {"params": {**variables["params"], "bias": jnp.arange(4.0)}}
  ref = ref_layer.apply(variables, x)
  out = layer.apply(variables, x)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  # one sum of C * kh * kw products per output (the bias adds one rounding more); the input gradient sums
  # F * kh * kw of them, after the forward sum (depth 2)
  fan_in, fan_out = x.shape[-1] * int(np.prod(kernel)), 4 * int(np.prod(kernel))
  tolerances.assert_close(out, ref, tolerances.rounding_tol(fan_in + 1))
  # vmapped over 3 layers' parameters and inputs (the ensemble's case), and the input gradient
  vs = jax.tree.map(lambda a: jnp.stack([a, 2 * a, -a]), variables)
  xs = jnp.stack([x, x + 1, 2 * x])
  tolerances.assert_close(jax.vmap(layer.apply)(vs, xs), jax.vmap(ref_layer.apply)(vs, xs),
                          tolerances.rounding_tol(fan_in + 1))
  g = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(variables, x))))(x)
  tolerances.assert_close(g(layer.apply), g(ref_layer.apply), tolerances.rounding_tol(max(fan_in, fan_out) + 1, 2))


def test_bad_formulations_raise():
  x = jnp.zeros((1, 28, 28, 1))
  with pytest.raises(ValueError, match="conv must be one of"):
    models.get_model("mnist_cnn", 2, conv="winograd").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="SAME, VALID or explicit"):
    layers.PatchesConv(2, (3, 3), padding="CIRCULAR").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="inputs"):
    layers.PatchesConv(2, (3, 3)).init(jax.random.key(0), jnp.zeros((28, 28, 1)))
  model = models.get_model("preact_resnet", 10, conv="patches", dtype=jnp.bfloat16)
  assert (model.conv, model.dtype, model.num_outputs) == ("patches", jnp.bfloat16, 10)
