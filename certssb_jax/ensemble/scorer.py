"""The smoothed ensemble's mean class probabilities as a sigma-search scorer, sharded over the mesh axis ``ens``."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from certssb_jax.ensemble.member import member_logits
from certssb_jax.ensemble.sharding import ENS, round_up
from certssb_jax.models import zoo as models_lib


def ordered_sum(local: jax.Array, valid: jax.Array, num_devices: int) -> jax.Array:
  """Sum over the models of the whole mesh in model-id order, the same bits on any number of devices.

  Inside ``shard_map`` over ``ens``: ``local`` (n, ...) holds this device's n models in id order (device d holds
  ids ``d * n ... d * n + n - 1``), ``valid`` (n,) masks padding models. The sum is the left fold
  ``((0 + v_0) + v_1) + ...`` over ids: each device folds its models into the running sum it receives from the
  previous device (``ppermute``), so no partial sums of different groupings are ever added (a ``psum`` would
  add per-device partial sums, whose rounding depends on the device count). The total is then broadcast.

  Returns:
    The sum (...) on every device.
  """

  def fold(acc):
    def body(a, item):
      v, ok = item
      return a + jnp.where(ok, v, jnp.zeros_like(v)), None

    return jax.lax.scan(body, acc, (local, valid))[0]

  acc = jnp.zeros(local.shape[1:], local.dtype)
  if num_devices == 1:
    return fold(acc)
  d = jax.lax.axis_index(ENS)
  shift = [(i, (i + 1) % num_devices) for i in range(num_devices)]

  def turn(k, acc):  # device k folds its models in, then hands the running sum to device k + 1
    acc = jax.lax.cond(d == k, fold, lambda a: a, acc)
    return jnp.where(d == k + 1, jax.lax.ppermute(acc, ENS, shift), acc)

  acc = jax.lax.fori_loop(0, num_devices - 1, turn, acc)  # rolled: compile time does not grow with D
  acc = jax.lax.cond(d == num_devices - 1, fold, lambda a: a, acc)
  return jax.lax.psum(jnp.where(d == num_devices - 1, acc, jnp.zeros_like(acc)), ENS)


class EnsembleScorer:
  """The smoothed ensemble's mean class probabilities as a sigma-search scorer, sharded over ``ens``.

  ``scorer(state, xb) = (1 / M) sum_m probs_m(xb)`` (B, K) for the test-input sigma search with
  ``sigma.scorer = "ensemble"`` (the held-out search models, docs/method.md section 4). The models are sharded
  over the mesh; each device evaluates its own (a ``lax.map`` over them), and both the forward sum and the
  backward sum of the per-model input gradients are ``ordered_sum``s (a ``custom_vjp``), so the searched
  sigmas are the same bits on any number of devices. Memory per device: its max(M / D, 2) models plus, in the
  backward pass, their per-model input gradients (max(M / D, 2), batch, ...).

  Args:
    model: the Flax model.
    mesh: a 1-D mesh with axis ``ens``.
    num_models: M, the real ensemble size (padding models are left out of the mean).
  """

  def __init__(self, model: nn.Module, mesh: Mesh, num_models: int):
    if num_models < 1:
      raise ValueError(f"num_models must be >= 1, got {num_models}")
    self.model, self.mesh, self.num_models = model, mesh, num_models
    self.num_devices = mesh.devices.size
    # at least two models per device: XLA removes a loop of one iteration and fuses its body differently, so a
    # device holding one model would round differently from a device holding several
    self.padded = round_up(max(num_models, 2 * self.num_devices), self.num_devices)
    d_count, m_real = self.num_devices, num_models

    def probs_one(p, bs, xb):
      return models_lib.logits_to_probs(member_logits(model, p, bs, xb)).astype(jnp.float32)

    def local_valid(n):
      first = jax.lax.axis_index(ENS) * n if d_count > 1 else 0
      return first + jnp.arange(n) < m_real

    def local_forward(params, batch_stats, xb):
      n = jax.tree.leaves(params)[0].shape[0]
      per_model = jax.lax.map(lambda pb: probs_one(pb[0], pb[1], xb), (params, batch_stats))  # (n, B, K)
      return ordered_sum(per_model, local_valid(n), d_count) / m_real

    def local_backward(params, batch_stats, xb, g):
      n = jax.tree.leaves(params)[0].shape[0]

      def input_grad(pb):
        _, vjp = jax.vjp(lambda x: probs_one(pb[0], pb[1], x), xb)
        return vjp(g / m_real)[0]

      per_model = jax.lax.map(input_grad, (params, batch_stats))  # (n, B, ...)
      return ordered_sum(per_model, local_valid(n), d_count)

    sm = functools.partial(jax.shard_map, mesh=mesh, out_specs=P(), check_vma=False)
    forward = sm(local_forward, in_specs=(P(ENS), P(ENS), P()))
    backward = sm(local_backward, in_specs=(P(ENS), P(ENS), P(), P()))

    @jax.custom_vjp
    def mean_probs(state, xb):
      return forward(state[0], state[1], xb)

    def fwd(state, xb):
      return forward(state[0], state[1], xb), (state, xb)

    def bwd(res, g):
      state, xb = res
      return jax.tree.map(jnp.zeros_like, state), backward(state[0], state[1], xb, g)

    mean_probs.defvjp(fwd, bwd)
    self._mean_probs = mean_probs

  def place(self, params: Any, batch_stats: Any) -> tuple[Any, Any]:
    """Pads the stacked (M, ...) ensemble to a multiple of the device count and shards it over ``ens``."""
    pad = self.padded - self.num_models

    def put(a):
      a = np.asarray(a)
      if a.shape[0] != self.num_models:
        raise ValueError(f"expected a stacked ensemble of {self.num_models} models, got a leading axis of "
                         f"{a.shape[0]}")
      a = np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) if pad else a
      return jax.device_put(a, NamedSharding(self.mesh, P(ENS)))

    return jax.tree.map(put, (params, batch_stats))

  def __call__(self, state: tuple[Any, Any], xb: jax.Array) -> jax.Array:
    """Mean class probabilities (B, K) of the ensemble on xb (B, H, W, C); ``state`` from ``place``."""
    return self._mean_probs(state, xb)
