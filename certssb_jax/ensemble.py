"""Training of the smoothed ensemble (METHOD.md section 2) as one vmapped, sharded program.

``init_member`` and ``member_step`` know nothing of ensembles. The ensemble is ``vmap`` of them over a chunk
of models whose leading axis is sharded over the mesh axis ``ens``. Model m trains on its own FIXED noised
copy of the training set: the noise of sample j is ``normal(fold_in(fold_in(k_train_noise, m), j))``,
regenerated inside the step from keys (never stored, never re-drawn per batch or epoch). Init and batch order
come from keys of (seed, m) only, so model m is a deterministic function of its noised training set.

The training loop is a host loop over jitted steps (the state is donated). A ``lax.scan`` over steps would
save the dispatch, but on XLA:CPU convolutions inside a while loop run ~14x slower (measured, jax 0.10.2),
and the dispatch cost is negligible next to a step over a chunk of models on an accelerator.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from certssb_jax import models as models_lib
from certssb_jax import rng

ENS = "ens"  # name of the mesh axis the ensemble is sharded over


class MemberState(NamedTuple):
  """Training state of one model (or, stacked with a leading axis M, of an ensemble chunk)."""

  params: Any
  batch_stats: Any  # {} for models without batch norm
  opt_state: Any


class Streams(NamedTuple):
  """The random streams of a group of models: model m uses ``fold_in(stream, m)`` of each."""

  init: jax.Array
  shuffle: jax.Array
  noise: jax.Array

  @classmethod
  def ensemble(cls, seed: int) -> "Streams":
    """The smoothed ensemble's streams: INIT, SHUFFLE and TRAIN_NOISE of the run seed."""
    return cls(rng.stream(seed, rng.INIT), rng.stream(seed, rng.SHUFFLE), rng.stream(seed, rng.TRAIN_NOISE))

  @classmethod
  def auxiliary(cls, seed: int, tag: int) -> "Streams":
    """Streams of an auxiliary model (the pilot: tag PILOT; the undefended model: tag UNDEFENDED)."""
    root = rng.stream(seed, tag)
    return cls(*(jax.random.fold_in(root, t) for t in (rng.INIT, rng.SHUFFLE, rng.TRAIN_NOISE)))


def variables_of(params: Any, batch_stats: Any) -> dict[str, Any]:
  """Flax variables from params and (possibly empty) batch statistics."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def init_member(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                input_shape: Sequence[int]) -> MemberState:
  """Initialises one model from its INIT key."""
  variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What the training of a group of models needs (a subset of the run config).

  Attributes:
    epochs: passes over the training set.
    batch_size: per-model batch; each epoch has ``n // batch_size`` steps (the remainder of the shuffled
      order is dropped, a different remainder every epoch).
    learning_rate: Adam step size.
    models_per_chunk: models trained together in one vmapped program (memory is bounded by this, not by M).
      Rounded up to a multiple of the device count.
  """

  epochs: int
  batch_size: int
  learning_rate: float
  models_per_chunk: int


class EnsembleTrainer:
  """Trains groups of models as one vmapped program over a chunk axis sharded on the mesh axis ``ens``.

  Args:
    model: the Flax model (shared architecture).
    input_shape: (H, W, C).
    config: epochs, batch size, learning rate, chunk size.
    mesh: a 1-D mesh with axis ``ens``; default: all devices.
  """

  def __init__(self, model: nn.Module, input_shape: Sequence[int], config: TrainConfig, mesh: Mesh | None = None):
    self.model = model
    self.input_shape = tuple(input_shape)
    self.config = config
    self.mesh = mesh if mesh is not None else default_mesh()
    num_devices = self.mesh.devices.size
    self.chunk = int(math.ceil(max(config.models_per_chunk, 1) / num_devices) * num_devices)
    self.tx = optax.adam(config.learning_rate)
    self._ens = NamedSharding(self.mesh, P(ENS))
    self._rep = NamedSharding(self.mesh, P())
    model_, tx = self.model, self.tx
    shape = self.input_shape
    b = config.batch_size

    def init_chunk(keys):
      return jax.vmap(lambda k: init_member(model_, tx, k, shape))(keys)

    def perms_chunk(keys, n):
      return jax.vmap(lambda k: jax.random.permutation(k, n))(keys)

    def batch_of(perm, step, key_m, x, y, sigma, use_noise):
      """The (noised inputs, labels, indices) one model trains on at this step."""
      idx = jax.lax.dynamic_slice_in_dim(perm, step * b, b)  # (B,)
      xb = x[idx]
      if use_noise:
        xb = xb + sigma[idx].reshape((-1,) + (1,) * len(shape)) * train_noise(key_m, idx, shape)
      return xb, y[idx], idx

    def step_chunk(state, perms, step, keys, x, y, sigma, use_noise):
      def one(st, perm, key_m):
        xb, yb, _ = batch_of(perm, step, key_m, x, y, sigma, use_noise)
        return member_step(model_, tx, st, xb, yb)

      return jax.vmap(one)(state, perms, keys)

    def batches_chunk(perms, step, keys, x, y, sigma, use_noise):
      return jax.vmap(lambda perm, key_m: batch_of(perm, step, key_m, x, y, sigma, use_noise))(perms, keys)

    self._init = jax.jit(init_chunk, out_shardings=self._ens)
    self._perms = jax.jit(perms_chunk, static_argnums=1, out_shardings=self._ens)
    self._step = jax.jit(step_chunk, static_argnums=7, donate_argnums=0)
    self._batches = jax.jit(batches_chunk, static_argnums=6)

  def chunks(self, num_models: int) -> list[np.ndarray]:
    """Model ids of each chunk; the last chunk is padded with ids >= num_models (trained, then dropped)."""
    num_chunks = int(math.ceil(num_models / self.chunk))
    return [np.arange(c * self.chunk, (c + 1) * self.chunk) for c in range(num_chunks)]

  def train_chunk(self, model_ids: np.ndarray, streams: Streams, x: np.ndarray, y: np.ndarray,
                  sigma: np.ndarray | None, *, fresh_noise: bool = False,
                  on_step: Callable[[int], None] | None = None) -> MemberState:
    """Trains the models ``model_ids`` (one chunk) and returns their stacked state on the host.

    Args:
      model_ids: (C,) model indices m; C must equal ``self.chunk``.
      streams: the init / shuffle / noise keys; model m uses ``fold_in(key, m)`` of each.
      x: (n, H, W, C) training inputs in [0, 1] (possibly poisoned).
      y: (n,) labels.
      sigma: (n,) per-sample noise levels sigma_j, or None to train without noise (undefended model).
      fresh_noise: draw new noise every epoch (Gaussian augmentation of the pilot model). False for the
        ensemble: its noise is fixed per (model, sample) across epochs, as the certificate requires.
      on_step: called with the number of steps done after each step (progress reporting).

    Returns:
      The trained MemberState with a leading axis C, as numpy arrays.
    """
    cfg = self.config
    n = len(x)
    if n < cfg.batch_size:
      raise ValueError(f"training set has {n} samples, fewer than batch_size {cfg.batch_size}")
    if len(model_ids) != self.chunk:
      raise ValueError(f"expected {self.chunk} model ids in a chunk, got {len(model_ids)}")
    state = self._init(self._keys(model_ids, streams.init))
    data = self._data(x, y, sigma)
    for epoch in range(cfg.epochs):
      perms, keys = self._epoch(model_ids, streams, epoch, n, fresh_noise)
      for s in range(n // cfg.batch_size):
        state, _ = self._step(state, perms, s, keys, *data, sigma is not None)
        if on_step is not None:
          on_step(1)
    return jax.tree.map(np.asarray, state)

  def _keys(self, model_ids: np.ndarray, stream: jax.Array) -> jax.Array:
    """Per-model keys ``fold_in(stream, m)`` (C,), sharded over ``ens``."""
    return jax.device_put(jax.vmap(lambda m: jax.random.fold_in(stream, m))(jnp.asarray(model_ids)), self._ens)

  def _data(self, x: np.ndarray, y: np.ndarray, sigma: np.ndarray | None) -> tuple[jax.Array, ...]:
    """Training inputs, labels and sigmas on the devices (replicated)."""
    sigma = np.zeros(len(x)) if sigma is None else sigma
    return jax.device_put((jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32), jnp.asarray(sigma, jnp.float32)),
                          self._rep)

  def _epoch(self, model_ids: np.ndarray, streams: Streams, epoch: int, n: int,
             fresh_noise: bool) -> tuple[jax.Array, jax.Array]:
    """(batch order (C, n), noise keys (C,)) of one epoch: the noise keys do not depend on the epoch unless
    ``fresh_noise``."""
    fold = jax.vmap(lambda k: jax.random.fold_in(k, epoch))
    perms = self._perms(fold(self._keys(model_ids, streams.shuffle)), n)
    noise_keys = self._keys(model_ids, streams.noise)
    return perms, fold(noise_keys) if fresh_noise else noise_keys

  def training_batch(self, model_ids: np.ndarray, streams: Streams, x: np.ndarray, y: np.ndarray,
                     sigma: np.ndarray | None, epoch: int, step: int,
                     fresh_noise: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each model of a chunk trains on at (epoch, step): the same function the step calls.

    Returns:
      (noised inputs (C, B, H, W, C), labels (C, B), sample indices (C, B)), for inspection and tests.
    """
    perms, keys = self._epoch(model_ids, streams, epoch, len(x), fresh_noise)
    out = self._batches(perms, step, keys, *self._data(x, y, sigma), sigma is not None)
    return tuple(np.asarray(a) for a in out)

  def abstract_state(self) -> MemberState:
    """Shapes and dtypes of one chunk's stacked state (a template for checkpoint restore)."""
    keys = jax.vmap(lambda m: rng.member_key(0, rng.INIT, m))(jnp.arange(self.chunk))
    return jax.eval_shape(jax.vmap(lambda k: init_member(self.model, self.tx, k, self.input_shape)), keys)


def default_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (global) devices with the ensemble axis ``ens``."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), (ENS,))


def auto_models_per_chunk(requested: int, num_models: int) -> int:
  """Chunk size: ``requested`` if > 0, else 1 on CPU (XLA:CPU lowers a vmapped conv to a slow grouped
  convolution: measured 33 ms vs 9 ms per model-step for the MNIST CNN) and all models elsewhere (capped at
  256 to bound memory)."""
  if requested > 0:
    return min(requested, num_models)
  if jax.default_backend() == "cpu":
    return 1
  return min(num_models, 256)


@functools.partial(jax.jit, static_argnums=0)
def _predict_chunk(model: nn.Module, params: Any, batch_stats: Any, x: jax.Array) -> jax.Array:
  return jax.vmap(lambda p, bs: member_logits(model, p, bs, x))(params, batch_stats)


def predict_logits(model: nn.Module, state: MemberState, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
  """Logits (C, N, L) of a stacked chunk of models on clean inputs x (N, H, W, C), batched over inputs."""
  outs = []
  for i in range(0, len(x), batch_size):
    xb = x[i:i + batch_size]
    pad = batch_size - len(xb) if len(x) > batch_size else 0
    xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)]) if pad else xb
    outs.append(np.asarray(_predict_chunk(model, state.params, state.batch_stats, jnp.asarray(xb)))[:, :len(xb) - pad])
  return np.concatenate(outs, axis=1)
