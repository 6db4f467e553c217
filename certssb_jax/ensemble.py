"""Training of the smoothed ensemble (METHOD.md section 2) as one sharded program per chunk of models.

``init_member`` and ``member_step`` know nothing of ensembles. A chunk of C models is spread over the devices of
a 1-D mesh with axis ``ens`` (``jax.shard_map``): each device runs the step of its own C / D models and there is
no communication between devices during training. Model m trains on its own FIXED noised copy of the training
set: the noise of sample j is ``normal(fold_in(fold_in(k_train_noise, m), j))``, drawn from keys once per chunk
into the models' noised training sets when they fit ``NOISE_CACHE_BYTES``, else regenerated inside every step
(the same values, bit for bit on CPU as tested; never written to disk, never re-drawn per batch or epoch). Init
and batch order come from keys of (seed, m) only, so model m is a deterministic function of its noised
training set.

How a device runs its models (``member_map``):

* ``"loop"`` (default on CPU): every model is its own program of ungrouped ops. The chunk is held as C / D
  *slots*, each an array with one model per device, so a device's program is the one-model program repeated:
  model m gets the same XLA ops, fusions and hence the same bits whether the chunk runs on 1 device or 8
  (checked by ``tests/test_multidevice.py``). It is also the fast way on XLA:CPU, where ``vmap`` of a
  convolution becomes a grouped convolution that runs ~3.5x slower per model (33 ms against 9 ms per
  model-step for the MNIST CNN). Compile time grows with the models per device: keep CPU chunks small.
* ``"vmap"`` (default on GPU/TPU): one slot, ``vmap`` over the device's models (grouped convolutions), the
  efficient form on accelerators. The numerics of a grouped convolution depend on the group count, so results
  may differ in the last bits between device counts (measured on XLA:CPU: up to 6e-7 in the weights).

What was found making 1 device and 8 agree bit for bit on CPU (jax 0.10.2): (1) vmapped (grouped) convolutions
round differently for different group counts; (2) with one model per device XLA simplifies the size-1 model
axis away, fuses the Adam update differently and LLVM contracts a different multiply-add into an FMA (last-ulp
changes in one leaf), which the slot layout avoids by making every model's program the one-model program;
(3) XLA:CPU's intra-op thread pool has max(#cores, #devices) threads and the partitioning of the
input-gradient convolution depends on it, so two processes agree only with the same pool size (set
``PJRT_NPROC``; the tests do).

The training loop is a host loop over jitted steps (the state is donated). A ``lax.scan`` over steps would
save the dispatch, but on XLA:CPU convolutions inside a while loop run ~14x slower (measured, jax 0.10.2),
and the dispatch cost is negligible next to a step over a chunk of models on an accelerator.

Multi-host: the mesh spans every process's devices (``jax.devices()``); inputs are replicated, each process
feeds its own devices, and ``to_host`` gathers a sharded result with ``multihost_utils.process_allgather``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from certssb_jax import backend
from certssb_jax import models as models_lib
from certssb_jax import rng

ENS = "ens"  # name of the mesh axis the ensemble is sharded over
MEMBER_MAPS = ("loop", "vmap")


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
                input_shape: Sequence[int], pretrained: Mapping[str, Any] | None = None) -> MemberState:
  """Initialises one model from its INIT key; ``pretrained`` ({"params/a/b": array, ...}, a saved Flax
  variables dict, see ``models.save_params``) replaces every matching array except the head."""
  variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  if pretrained:
    variables = models_lib.merge_params(variables, pretrained)
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


def default_member_map() -> str:
  """``"loop"`` on CPU (bit-identical across device counts, and faster there), ``"vmap"`` on accelerators."""
  return "loop" if jax.default_backend() == "cpu" else "vmap"


def _check_member_map(member_map: str | None) -> str:
  member_map = default_member_map() if member_map is None else member_map
  if member_map not in MEMBER_MAPS:
    raise ValueError(f"member_map must be one of {MEMBER_MAPS}, got {member_map!r}")
  return member_map


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
  """Where each model of a chunk lives: ``num_slots`` arrays of ``num_devices * per_slot`` models each.

  Slot i is an array with leading axis ``num_devices * per_slot`` sharded over ``ens``: device d holds the
  models at positions ``d * num_slots * per_slot + i * per_slot + j`` (j < per_slot) of the chunk, so every
  device holds a contiguous run of model ids, as ``P("ens")`` on the stacked chunk would.
  ``member_map="loop"``: per_slot = 1, one slot per model of a device; ``"vmap"``: one slot.
  """

  num_devices: int
  num_slots: int
  per_slot: int

  @classmethod
  def make(cls, chunk: int, num_devices: int, member_map: str | None = None) -> ChunkLayout:
    if chunk % num_devices:
      raise ValueError(f"a chunk of {chunk} models cannot be split over {num_devices} devices")
    per_device = chunk // num_devices
    if _check_member_map(member_map) == "loop":
      return cls(num_devices, per_device, 1)
    return cls(num_devices, 1, per_device)

  @property
  def chunk(self) -> int:
    return self.num_devices * self.num_slots * self.per_slot

  def split(self, tree: Any) -> tuple[Any, ...]:
    """Stacked chunk (C, ...) -> ``num_slots`` trees (D * per_slot, ...); numpy or jax leaves."""
    d, s, k = self.num_devices, self.num_slots, self.per_slot

    def part(a, i):
      return a.reshape((d, s, k) + a.shape[1:])[:, i].reshape((d * k,) + a.shape[1:])

    return tuple(jax.tree.map(lambda a, i=i: part(a, i), tree) for i in range(s))

  def merge(self, slots: Sequence[Any]) -> Any:
    """Inverse of ``split``: ``num_slots`` trees (D * per_slot, ...) -> stacked chunk (C, ...), numpy."""
    d, k = self.num_devices, self.per_slot

    def join(*parts):
      parts = [np.asarray(p).reshape((d, k) + p.shape[1:]) for p in parts]
      out = np.stack(parts, axis=1)  # (D, S, k, ...)
      return out.reshape((self.chunk,) + out.shape[3:])

    return jax.tree.map(join, *slots)


def per_device(fn: Callable[..., Any], per_slot: int) -> Callable[..., Any]:
  """Applies a one-model function to the ``per_slot`` models of one slot on one device (inside shard_map).

  Arguments with a leading model axis come first, then ``*shared`` (not mapped). With one model per slot the
  model axis is indexed away, so the device runs exactly the one-model program.
  """

  def apply(mapped: tuple[Any, ...], *shared: Any) -> Any:
    if per_slot == 1:
      out = fn(*jax.tree.map(lambda a: a[0], mapped), *shared)
      return jax.tree.map(lambda a: a[None], out)
    return jax.vmap(lambda *m: fn(*m, *shared))(*mapped)

  return apply


def to_host(tree: Any) -> Any:
  """Numpy copies of (possibly sharded, possibly multi-host) arrays: every process gets the whole array."""
  leaves = jax.tree.leaves(tree)
  if all(not isinstance(a, jax.Array) or a.is_fully_addressable for a in leaves):
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


class EnsembleTrainer:
  """Trains groups of models as one program over a chunk axis sharded on the mesh axis ``ens``.

  Args:
    model: the Flax model (shared architecture).
    input_shape: (H, W, C).
    config: epochs, batch size, learning rate, chunk size.
    mesh: a 1-D mesh with axis ``ens``; default: all (global) devices.
    member_map: how a device runs its models, ``"loop"`` or ``"vmap"`` (module docstring); default
      ``default_member_map()``.
  """

  def __init__(self, model: nn.Module, input_shape: Sequence[int], config: TrainConfig, mesh: Mesh | None = None,
               member_map: str | None = None, pretrained: Mapping[str, np.ndarray] | None = None):
    self.model = model
    self.pretrained = dict(pretrained) if pretrained else None
    self.input_shape = tuple(input_shape)
    self.config = config
    self.mesh = mesh if mesh is not None else default_mesh()
    self.member_map = _check_member_map(member_map)
    num_devices = self.mesh.devices.size
    self.chunk = int(math.ceil(max(config.models_per_chunk, 1) / num_devices) * num_devices)
    self.layout = ChunkLayout.make(self.chunk, num_devices, self.member_map)
    self.tx = optax.adam(config.learning_rate)
    self._ens = NamedSharding(self.mesh, P(ENS))
    self._rep = NamedSharding(self.mesh, P())
    model_, tx = self.model, self.tx
    shape = self.input_shape
    b = config.batch_size
    per_slot = self.layout.per_slot

    def init_chunk(keys, pretrained=None):
      return jax.vmap(lambda k: init_member(model_, tx, k, shape, pretrained))(keys)

    def perms_chunk(keys, n):
      return jax.vmap(lambda k: jax.random.permutation(k, n))(keys)

    def member_keys(stream, model_ids):
      return jax.vmap(lambda m: jax.random.fold_in(stream, m))(model_ids)

    def epoch_keys(stream, model_ids, epoch):
      return jax.vmap(lambda k: jax.random.fold_in(k, epoch))(member_keys(stream, model_ids))

    def noised(key_m, x, sigma):
      """Model m's whole noised training set x_j + sigma_j z_{m,j} (the ``"cached"`` noise source)."""
      return x + sigma.reshape((-1,) + (1,) * len(shape)) * train_noise(key_m, jnp.arange(len(x)), shape)

    def batch_of(perm, step, source_m, x, y, sigma, noise):
      """The (noised inputs, labels, indices) one model trains on at this step. ``source_m`` is the model's noise
      key (noise ``"keys"`` or ``"none"``) or its noised training set (``"cached"``), the same bits."""
      idx = jax.lax.dynamic_slice_in_dim(perm, step * b, b)  # (B,)
      if noise == "cached":
        return source_m[idx], y[idx], idx
      xb = x[idx]
      if noise == "keys":
        xb = xb + sigma[idx].reshape((-1,) + (1,) * len(shape)) * train_noise(source_m, idx, shape)
      return xb, y[idx], idx

    def one_step(st, perm, source_m, step, x, y, sigma, noise):
      xb, yb, _ = batch_of(perm, step, source_m, x, y, sigma, noise)
      return member_step(model_, tx, st, xb, yb)

    def step_slots(states, perms, step, sources, x, y, sigma, noise):
      """Inside shard_map: one step of every model of this device, slot by slot."""
      run = per_device(functools.partial(one_step, noise=noise), per_slot)
      outs = [run((st, pm, k), step, x, y, sigma) for st, pm, k in zip(states, perms, sources)]
      return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

    def step_chunk(states, perms, step, sources, x, y, sigma, noise):
      return jax.shard_map(functools.partial(step_slots, noise=noise), mesh=self.mesh,
                           in_specs=(P(ENS), P(ENS), P(), P(ENS), P(), P(), P()), out_specs=(P(ENS), P(ENS)),
                           check_vma=False)(states, perms, step, sources, x, y, sigma)

    def batches_chunk(perms, step, keys, x, y, sigma, noise):
      return jax.vmap(lambda perm, key_m: batch_of(perm, step, key_m, x, y, sigma, noise))(perms, keys)

    self._init = backend.jit(init_chunk, run_once=True, out_shardings=self._ens)
    self._perms = backend.jit(perms_chunk, run_once=True, static_argnums=1, out_shardings=self._ens)
    self._member_keys = jax.jit(member_keys, out_shardings=self._ens)
    self._epoch_keys = jax.jit(epoch_keys, out_shardings=self._ens)
    self._step = backend.jit(step_chunk, static_argnums=7, donate_argnums=0)
    self._batches = jax.jit(batches_chunk, static_argnums=6)
    self._noised = backend.jit(jax.vmap(noised, in_axes=(0, None, None)), out_shardings=self._ens)

  def chunks(self, num_models: int) -> list[np.ndarray]:
    """Model ids of each chunk; the last chunk is padded with ids >= num_models (trained, then dropped)."""
    num_chunks = int(math.ceil(num_models / self.chunk))
    return [np.arange(c * self.chunk, (c + 1) * self.chunk) for c in range(num_chunks)]

  def train_chunk(self, model_ids: np.ndarray, streams: Streams, x: np.ndarray, y: np.ndarray,
                  sigma: np.ndarray | None, *, fresh_noise: bool = False, epochs: int | None = None,
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
      epochs: passes over the data (default ``config.epochs``; the compiled step does not depend on it).
      on_step: called with the number of steps done after each step (progress reporting).

    Returns:
      The trained MemberState with a leading axis C, as numpy arrays (on every process).
    """
    cfg = self.config
    n = len(x)
    if n < cfg.batch_size:
      raise ValueError(f"training set has {n} samples, fewer than batch_size {cfg.batch_size}")
    model_ids = np.asarray(model_ids)
    if len(model_ids) != self.chunk:
      raise ValueError(f"expected {self.chunk} model ids in a chunk, got {len(model_ids)}")
    slot_ids = self.layout.split(model_ids)
    pretrained = jax.device_put(self.pretrained, self._rep) if self.pretrained else None
    state = tuple(self._init(self._keys(ids, streams.init), pretrained) for ids in slot_ids)
    data = self._data(x, y, sigma)
    noise = "none" if sigma is None else "keys"
    if noise == "keys" and not fresh_noise and self._noise_cache_bytes(x) <= NOISE_CACHE_BYTES:
      noise = "cached"
      sources = tuple(self._noised(self._keys(ids, streams.noise), data[0], data[2]) for ids in slot_ids)
    for epoch in range(cfg.epochs if epochs is None else epochs):
      per_slot = [self._epoch(ids, streams, epoch, n, fresh_noise) for ids in slot_ids]
      perms = tuple(e[0] for e in per_slot)
      if noise != "cached":
        sources = tuple(e[1] for e in per_slot)
      for s in range(n // cfg.batch_size):
        state, _ = self._step(state, perms, s, sources, *data, noise)
        if on_step is not None:
          on_step(1)
    return self.layout.merge(to_host(state))

  def _noise_cache_bytes(self, x: np.ndarray) -> int:
    """Bytes per device of the noised training sets of a chunk's models (the ``"cached"`` noise source)."""
    return self.chunk // self.layout.num_devices * int(np.prod(np.shape(x))) * 4

  def _keys(self, model_ids: np.ndarray, stream: jax.Array, epoch: int | None = None) -> jax.Array:
    """Per-model keys ``fold_in(stream, m)`` (then ``fold_in(., epoch)`` if given), (C,), sharded over ``ens``."""
    if epoch is None:
      return self._member_keys(stream, np.asarray(model_ids))
    return self._epoch_keys(stream, np.asarray(model_ids), epoch)

  def _data(self, x: np.ndarray, y: np.ndarray, sigma: np.ndarray | None) -> tuple[jax.Array, ...]:
    """Training inputs, labels and sigmas on every device (replicated)."""
    sigma = np.zeros(len(x)) if sigma is None else sigma
    return jax.device_put((np.asarray(x, np.float32), np.asarray(y, np.int32), np.asarray(sigma, np.float32)),
                          self._rep)

  def _epoch(self, model_ids: np.ndarray, streams: Streams, epoch: int, n: int,
             fresh_noise: bool) -> tuple[jax.Array, jax.Array]:
    """(batch order (C, n), noise keys (C,)) of one epoch: the noise keys do not depend on the epoch unless
    ``fresh_noise``."""
    perms = self._perms(self._keys(model_ids, streams.shuffle, epoch), n)
    return perms, self._keys(model_ids, streams.noise, epoch if fresh_noise else None)

  def training_batch(self, model_ids: np.ndarray, streams: Streams, x: np.ndarray, y: np.ndarray,
                     sigma: np.ndarray | None, epoch: int, step: int,
                     fresh_noise: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each model of a chunk trains on at (epoch, step): the same function the step calls.

    Returns:
      (noised inputs (C, B, H, W, C), labels (C, B), sample indices (C, B)), for inspection and tests.
    """
    perms, keys = self._epoch(model_ids, streams, epoch, len(x), fresh_noise)
    out = self._batches(perms, step, keys, *self._data(x, y, sigma), "none" if sigma is None else "keys")
    return tuple(to_host(out))

  def abstract_state(self) -> MemberState:
    """Shapes and dtypes of one chunk's stacked state (a template for checkpoint restore)."""
    keys = jax.vmap(lambda m: rng.member_key(0, rng.INIT, m))(jnp.arange(self.chunk))
    return jax.eval_shape(jax.vmap(lambda k: init_member(self.model, self.tx, k, self.input_shape, self.pretrained)),
                          keys)


# A chunk's models train on noised training sets materialised once per chunk (``"cached"``) when they take at
# most this many bytes per device, else on noise regenerated from keys in every step (``"keys"``). Both give
# the same bits on CPU (tests/test_ensemble.py); the copy saves the ~0.25 ms per step the MNIST CNN spends on
# generating its batch's noise on a 2-core CPU (6% of the step), as the paper's code saves it by storing noised
# copies.
NOISE_CACHE_BYTES = 1 << 30


def default_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (global, every process's) devices with the ensemble axis ``ens``."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), (ENS,))


def auto_models_per_chunk(requested: int, num_models: int) -> int:
  """Chunk size: ``requested`` if > 0, else 1 on CPU (one model per device and step keeps the compiled program
  small; see ``member_map``) and all models elsewhere (capped at 256 to bound memory)."""
  if requested > 0:
    return min(requested, num_models)
  if jax.default_backend() == "cpu":
    return 1
  return min(num_models, 256)


@backend.jit(static_argnums=0)
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


# ---------------------------------------------------------------------------------------------- ensemble scorer


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

  ``scorer(state, xb) = (1 / M) sum_m probs_m(xb)`` (B, K) for the test-sample sigma search with
  ``sigma.test_scorer = "ensemble"`` (METHOD.md section 4). The models are sharded over the mesh; each device
  evaluates its own (a ``lax.map`` over them), and both the forward sum and the backward sum of the per-model
  input gradients are ``ordered_sum``s (a ``custom_vjp``), so the searched sigmas are the same bits on any
  number of devices. Memory per device: its M / D models plus, in the backward pass, their per-model input
  gradients (M / D, batch, ...).

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
    self.padded = int(math.ceil(num_models / self.num_devices) * self.num_devices)
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
