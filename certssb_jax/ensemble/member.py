"""One ensemble member: its state, initialisation, training step and logits. Nothing here knows of ensembles;
``ensemble`` maps these functions over the members of a chunk."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from certssb_jax import rng
from certssb_jax.models import weights, zoo as models_lib


class MemberState(NamedTuple):
  """Training state of one model (or, stacked with a leading axis M, of an ensemble chunk)."""

  params: Any
  batch_stats: Any  # {} for models without batch norm
  opt_state: Any  # None once training is over (only params and batch statistics are kept)


class Streams(NamedTuple):
  """The random streams of a group of models: model m uses ``fold_in(stream, m)`` of each."""

  init: jax.Array
  shuffle: jax.Array
  noise: jax.Array

  @classmethod
  def ensemble(cls, seed: int) -> Streams:
    """The smoothed ensemble's streams: INIT, SHUFFLE and TRAIN_NOISE of the run seed."""
    return cls(rng.stream(seed, rng.INIT), rng.stream(seed, rng.SHUFFLE), rng.stream(seed, rng.TRAIN_NOISE))

  @classmethod
  def auxiliary(cls, seed: int, tag: int) -> Streams:
    """Streams of an auxiliary model (pilot, undefended, surrogate: its own tag of ``rng``)."""
    root = rng.stream(seed, tag)
    return cls(*(jax.random.fold_in(root, t) for t in (rng.INIT, rng.SHUFFLE, rng.TRAIN_NOISE)))


def variables_of(params: Any, batch_stats: Any) -> dict[str, Any]:
  """Flax variables from params and (possibly empty) batch statistics."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def init_member(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                input_shape: Sequence[int], pretrained: Mapping[str, Any] | None = None) -> MemberState:
  """Initialises one model from its INIT key; ``pretrained`` ({"params/a/b": array, ...}, a saved Flax
  variables dict, see ``weights.save_params``) replaces every matching array except the head."""
  variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  if pretrained:
    variables = weights.merge_params(variables, pretrained)
  params = variables["params"]
  return MemberState(params, variables.get("batch_stats", {}), tx.init(params))


def member_step(model: nn.Module, tx: optax.GradientTransformation, state: MemberState, x: jax.Array,
                y: jax.Array) -> tuple[MemberState, jax.Array]:
  """One optimiser step of one model on an (already noised) batch. x (B, H, W, C), y (B,). Returns (state, loss)."""

  def loss(params):
    variables = variables_of(params, state.batch_stats)
    if state.batch_stats:
      logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return models_lib.loss_fn(logits, y), updates["batch_stats"]
    return models_lib.loss_fn(model.apply(variables, x, train=True), y), state.batch_stats

  (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return MemberState(optax.apply_updates(state.params, updates), batch_stats, opt_state), value


def member_logits(model: nn.Module, params: Any, batch_stats: Any, x: jax.Array) -> jax.Array:
  """Logits (B, L) of one model in inference mode."""
  return model.apply(variables_of(params, batch_stats), x, train=False)


def train_noise(key_m: jax.Array, indices: jax.Array, input_shape: Sequence[int]) -> jax.Array:
  """z_{m,j} for the given sample indices j: ``normal(fold_in(key_m, j))``. Returns (B, *input_shape)."""
  return jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key_m, j), tuple(input_shape)))(indices)
