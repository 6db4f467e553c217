"""Training of the smoothed ensemble (docs/method.md section 2): chunks of models as one sharded program.

Model m trains on its own FIXED noised copy of the training set: the noise of sample j is
``normal(fold_in(fold_in(k_train_noise, m), j))``, drawn from keys once per chunk into the models' noised
training sets when they fit ``NOISE_CACHE_BYTES``, else regenerated inside every step (the same values, bit for
bit on CPU as tested; never written to disk, never re-drawn per batch or epoch). Init and batch order come
from keys of (seed, m) only, so model m is a deterministic function of its noised training set.

The one-model functions are in ``member``, the layout of a chunk over the devices in ``sharding``. The training
loop is a host loop over jitted steps (the state is donated); each step returns every model's loss, and a
chunk whose loss is not finite stops the run (``check_losses``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from certssb_jax import backend, rng
from certssb_jax.ensemble import views as views_lib
from certssb_jax.ensemble.member import MemberState, Streams, init_member, member_step, train_noise
from certssb_jax.ensemble.sharding import (
  ENS,
  ChunkLayout,
  check_member_map,
  default_mesh,
  fold_keys,
  per_device,
  round_up,
  to_host,
)
from certssb_jax.ensemble.views import MemberViews, Views
from certssb_jax.models import weights

logger = logging.getLogger(__name__)

# A chunk's models train on noised training sets materialised once per chunk when they take at most this many
# bytes per device, else on noise regenerated from keys in every step. Both give the same bits on CPU
# (tests/test_ensemble.py); the copy saves the noise generation of every step (BENCHMARKS.md).
NOISE_CACHE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What the training of a group of models needs (a subset of the run config).

  Attributes:
    epochs: passes over the training set.
    batch_size: per-model batch; each epoch has ``n // batch_size`` steps (the remainder of the shuffled
      order is dropped, a different remainder every epoch).
    learning_rate: Adam step size.
    models_per_chunk: models trained together in one program (memory is bounded by this, not by M).
      Rounded up to a multiple of the device count.
  """

  epochs: int
  batch_size: int
  learning_rate: float
  models_per_chunk: int


def _expand(sigma: jax.Array, ndim: int) -> jax.Array:
  return sigma.reshape((-1,) + (1,) * ndim)


# How a model's batch is made at a step, one function per source of the noise. Each takes the model's batch
# indices and its source (its noised training set, its noise key, or nothing) and returns (inputs, labels).
def _batch_noised_copy(idx, noised_m, x, y, sigma):
  del x, sigma
  return noised_m[idx], y[idx]


def _batch_noise_keys(idx, key_m, x, y, sigma):
  return x[idx] + _expand(sigma[idx], x.ndim - 1) * train_noise(key_m, idx, x.shape[1:]), y[idx]


def _batch_clean(idx, unused, x, y, sigma):
  del unused, sigma
  return x[idx], y[idx]


_NOISE_SOURCES = {"none": _batch_clean, "noised_copy": _batch_noised_copy, "noise_keys": _batch_noise_keys}


def _batch_indices(perm: jax.Array, step: jax.Array, batch_size: int) -> jax.Array:
  """The training-set indices (B,) of batch ``step`` of an epoch in the order ``perm``."""
  return jax.lax.dynamic_slice_in_dim(perm, step * batch_size, batch_size)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, batch_size: int, batch_fn: Callable,
                    layout: ChunkLayout, mesh: Mesh) -> Callable:
  """The jitted training step of every model of a chunk, sharded over ``ens``, its batches made by ``batch_fn``.

  Returns:
    ``step(states, perms, step, sources, x, y, sigma) -> (states, losses)``, one entry of states, perms, sources
    and losses per slot of ``layout``; the states are donated.
  """

  def one(state, perm, source_m, step, x, y, sigma):
    idx = _batch_indices(perm, step, batch_size)
    return member_step(model, tx, state, *batch_fn(idx, source_m, x, y, sigma))

  def local(states, perms, step, sources, x, y, sigma):  # inside shard_map: this device's models, slot by slot
    run = per_device(one, layout.per_slot)
    outs = [run((st, pm, src), step, x, y, sigma) for st, pm, src in zip(states, perms, sources)]
    return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

  step = jax.shard_map(local, mesh=mesh, in_specs=(P(ENS), P(ENS), P(), P(ENS), P(), P(), P()),
                       out_specs=(P(ENS), P(ENS)), check_vma=False)
  return backend.jit(step, donate_argnums=0)


def make_view_step(model: nn.Module, tx: optax.GradientTransformation, batch_size: int, noised: bool,
                   layout: ChunkLayout, mesh: Mesh) -> Callable:
  """The jitted training step of members on views (``views``): step s of a member trains on positions
  [s B, (s + 1) B) of its own stream and leaves its state untouched once s reaches its own step count.

  With ``noised``, the batch gets Gaussian augmentation ``sigma_j * normal(fold_in(key_m, p))`` at stream position
  p: fresh at every epoch, and keyed by the member and its own stream, never by a training-set index (which an
  insertion elsewhere would shift).

  Returns:
    ``step(states, streams, steps, keys, step, x, y, sigma) -> (states, losses)``, one entry of states, streams,
    steps, keys and losses per slot of ``layout``; a member's loss is 0 after its last step; states donated.
  """

  def one(state, stream, steps_m, key_m, step, x, y, sigma):
    idx = _batch_indices(stream, step, batch_size)
    xb = x[idx]
    if noised:
      xb = xb + _expand(sigma[idx], x.ndim - 1) * train_noise(key_m, step * batch_size + jnp.arange(batch_size),
                                                               x.shape[1:])
    new, loss = member_step(model, tx, state, xb, y[idx])
    active = step < steps_m
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state), jnp.where(active, loss, 0.0)

  def local(states, streams, steps, keys, step, x, y, sigma):
    run = per_device(one, layout.per_slot)
    outs = [run(args, step, x, y, sigma) for args in zip(states, streams, steps, keys)]
    return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

  step = jax.shard_map(local, mesh=mesh, in_specs=(P(ENS), P(ENS), P(ENS), P(ENS), P(), P(), P(), P()),
                       out_specs=(P(ENS), P(ENS)), check_vma=False)
  return backend.jit(step, donate_argnums=0)


def make_batches(batch_size: int, batch_fn: Callable) -> Callable:
  """``batches(perms, step, sources, x, y, sigma) -> (inputs, labels, indices)`` of every model of a chunk at a
  step: what ``make_train_step``'s step trains on, for inspection."""

  def batches(perms, step, sources, x, y, sigma):
    def one(perm, source_m):
      idx = _batch_indices(perm, step, batch_size)
      return (*batch_fn(idx, source_m, x, y, sigma), idx)

    return jax.vmap(one)(perms, sources)

  return jax.jit(batches)


# After every training step of a chunk: (steps done, a function returning the chunk's training state on the host).
Checkpoint = Callable[[int, Callable[[], MemberState]], None]


class EnsembleTrainer:
  """Trains groups of models as one program over a chunk axis sharded on the mesh axis ``ens``.

  Args:
    model: the Flax model (shared architecture).
    input_shape: (H, W, C).
    config: epochs, batch size, learning rate, chunk size.
    mesh: a 1-D mesh with axis ``ens``; default: all (global) devices.
    member_map: how a device runs its models, ``"loop"`` or ``"vmap"`` (``sharding``); default per backend.
    pretrained: flat {"params/a/b": array} weights every model starts from (all but the head).
  """

  def __init__(self, model: nn.Module, input_shape: Sequence[int], config: TrainConfig, mesh: Mesh | None = None,
               member_map: str | None = None, pretrained: Mapping[str, np.ndarray] | None = None):
    self.model = model
    self.pretrained = dict(pretrained) if pretrained else None
    self.input_shape = tuple(input_shape)
    self.config = config
    self.mesh = mesh if mesh is not None else default_mesh()
    self.member_map = check_member_map(member_map)
    num_devices = self.mesh.devices.size
    self.chunk = round_up(config.models_per_chunk, num_devices)
    self.layout = ChunkLayout.make(self.chunk, num_devices, self.member_map)
    self.tx = optax.adam(config.learning_rate)
    self._ens = NamedSharding(self.mesh, P(ENS))
    self._rep = NamedSharding(self.mesh, P())
    init = lambda keys, pretrained=None: jax.vmap(
        lambda k: init_member(model, self.tx, k, self.input_shape, pretrained))(keys)
    self._init = backend.jit(init, run_once=True, out_shardings=self._ens)
    self._perms = backend.jit(lambda keys, n: jax.vmap(lambda k: jax.random.permutation(k, n))(keys),
                              run_once=True, static_argnums=1, out_shardings=self._ens)
    self._fold = jax.jit(fold_keys, out_shardings=self._ens)
    self._fold_epoch = jax.jit(lambda stream, ids, epoch: jax.vmap(lambda k: jax.random.fold_in(k, epoch))(
        fold_keys(stream, ids)), out_shardings=self._ens)
    noised = lambda key_m, x, sigma: x + _expand(sigma, x.ndim - 1) * train_noise(key_m, jnp.arange(len(x)),
                                                                                    x.shape[1:])
    self._noised = backend.jit(jax.vmap(noised, in_axes=(0, None, None)), out_shardings=self._ens)
    self._steps = {fn: make_train_step(model, self.tx, config.batch_size, fn, self.layout, self.mesh)
                   for fn in _NOISE_SOURCES.values()}
    self._batches = {fn: make_batches(config.batch_size, fn) for fn in (_batch_noise_keys, _batch_clean)}
    self._view_steps = {noised: make_view_step(model, self.tx, config.batch_size, noised, self.layout, self.mesh)
                        for noised in (False, True)}

  def chunks(self, num_models: int) -> list[np.ndarray]:
    """Model ids of each chunk; the last chunk is padded with ids >= num_models (trained, then dropped)."""
    return [np.arange(c * self.chunk, (c + 1) * self.chunk) for c in range(-(-num_models // self.chunk))]

  def train_chunk(self, model_ids: np.ndarray, streams: Streams, x: np.ndarray, y: np.ndarray,
                  sigma: np.ndarray | None, *, views: MemberViews | None = None, fresh_noise: bool = False,
                  epochs: int | None = None, on_step: Callable[[int], None] | None = None,
                  return_losses: bool = False, start: tuple[int, MemberState] | None = None,
                  checkpoint: Checkpoint | None = None) -> Any:
    """Trains the models ``model_ids`` (one chunk) and returns their stacked state on the host.

    Args:
      model_ids: (C,) model indices m; C must equal ``self.chunk``.
      streams: the init / shuffle / noise keys; model m uses ``fold_in(key, m)`` of each.
      x: (n, H, W, C) training inputs in [0, 1] (possibly poisoned).
      y: (n,) labels.
      sigma: (n,) per-sample noise levels sigma_j, or None to train without noise (undefended model).
      views: each model's training view (a part, a bag): then every member is a function of its own view
        alone (``views`` module: its own step count, order and batches; noise, with ``sigma``, is augmentation
        keyed by its stream position). None: every model sees all of x, ``epochs * (n // batch_size)`` steps.
      fresh_noise: draw new noise every epoch (Gaussian augmentation of the pilot model). False for the
        ensemble: its noise is fixed per (model, sample) across epochs, as the certificate requires.
      epochs: passes over the data (default ``config.epochs``; the compiled step does not depend on it).
      on_step: called with the number of steps done after each step (progress reporting).
      return_losses: also return the losses (of the steps this call ran).
      start: (steps done, the chunk's whole training state then, stacked, opt_state included) to resume from, as
        ``checkpoint`` saved it; the rest of the training is the same, bit for bit, as without the break.
      checkpoint: called after every step with (steps done, a function returning the chunk's training state on
        the host); it decides whether to save (the state is gathered only when it calls the function).

    Returns:
      The trained MemberState with a leading axis C, as numpy arrays (on every process); with
      ``return_losses``, (state, losses (C, steps) float32: every model's training loss at every step).
    """
    cfg = self.config
    model_ids = np.asarray(model_ids)
    if len(model_ids) != self.chunk:
      raise ValueError(f"expected {self.chunk} model ids in a chunk, got {len(model_ids)}")
    epochs = cfg.epochs if epochs is None else epochs
    slot_ids = self.layout.split(model_ids)
    if start is None:
      first, state = 0, self._init_slots(slot_ids, streams)
    else:
      first, state = start[0], tuple(jax.device_put(s, self._ens) for s in self.layout.split(start[1]))
    data = self._data(x, y, sigma)
    after_step = self._after_step(on_step, checkpoint)
    if views is not None:
      state, losses = self._train_views(state, model_ids, streams, views(model_ids), sigma is not None, epochs,
                                        data, first, after_step)
    else:
      state, losses = self._train_whole(state, slot_ids, streams, x, sigma, fresh_noise, epochs, data, first,
                                        after_step)
    state = self.layout.merge(to_host(state))
    if not return_losses:
      return state
    per_step = [self.layout.merge(to_host(l)) for l in losses]  # each (C,)
    return state, np.stack(per_step, axis=1) if per_step else np.zeros((self.chunk, 0), np.float32)

  def _after_step(self, on_step, checkpoint):
    """What runs after step g (1-based count of steps done) of a chunk: progress, then the checkpoint's choice."""
    def after(g: int, state: Any) -> None:
      if on_step is not None:
        on_step(1)
      if checkpoint is not None:
        checkpoint(g, lambda: self.layout.merge(to_host(state)))
    return after

  def _train_whole(self, state, slot_ids, streams, x, sigma, fresh_noise, epochs, data, first, after_step):
    """Every model on the whole training set: ``epochs`` passes of ``n // batch_size`` steps, each in the model's
    own order (the remainder of the order dropped), from step ``first`` on."""
    n, batch = len(x), self.config.batch_size
    if n < batch:
      raise ValueError(f"training set has {n} samples, fewer than train.batch_size {batch}; use "
                       f"train.batch_size={max(1, n)} or less")
    per_epoch = n // batch
    batch_fn = _NOISE_SOURCES[self.noise_source(x, sigma, fresh_noise)]
    if batch_fn is _batch_noised_copy:
      sources = tuple(self._noised(self._fold(streams.noise, ids), data[0], data[2]) for ids in slot_ids)
    losses = []
    for epoch in range(first // per_epoch, epochs):
      per_slot = [self._epoch(ids, streams, epoch, n, fresh_noise) for ids in slot_ids]
      perms = tuple(e[0] for e in per_slot)
      if batch_fn is not _batch_noised_copy:
        sources = tuple(e[1] for e in per_slot)
      for s in range(first - epoch * per_epoch if epoch == first // per_epoch else 0, per_epoch):
        state, loss = self._steps[batch_fn](state, perms, s, sources, *data)
        losses.append(loss)
        after_step(epoch * per_epoch + s + 1, state)
    return state, losses

  def _train_views(self, state, model_ids, streams, views: Views, noised, epochs, data, first, after_step):
    """Every member on its own view (``views`` module), for the largest step count of the chunk, from step
    ``first`` on; a member whose own count is reached is left as it is."""
    ids = np.asarray(model_ids)
    steps = views_lib.num_steps(views.lengths, epochs, self.config.batch_size)
    indices = views_lib.pad_to_bucket(views.indices)  # few shapes, so few compiled programs
    orders = views_lib.streams(fold_keys(streams.shuffle, ids), indices, views.lengths, epochs)
    slots = self.layout.split((np.asarray(orders), steps.astype(np.int32)))
    placed = [jax.device_put(slot, self._ens) for slot in slots]
    orders, steps_slots = tuple(p[0] for p in placed), tuple(p[1] for p in placed)
    keys = tuple(self._fold(streams.noise, slot) for slot in self.layout.split(ids))
    run = self._view_steps[noised]
    losses = []
    for s in range(first, int(steps.max(initial=0))):
      state, loss = run(state, orders, steps_slots, keys, s, *data)
      losses.append(loss)
      after_step(s + 1, state)
    return state, losses

  def steps(self, model_ids: np.ndarray, n: int, views: MemberViews | None = None,
            epochs: int | None = None) -> int:
    """The number of steps ``train_chunk`` runs for the chunk ``model_ids`` (progress reporting)."""
    epochs = self.config.epochs if epochs is None else epochs
    if views is None:
      return epochs * (n // self.config.batch_size)
    return int(views_lib.num_steps(views(np.asarray(model_ids)).lengths, epochs, self.config.batch_size).max())

  def init_chunk(self, model_ids: np.ndarray, streams: Streams) -> MemberState:
    """The initial state of the models ``model_ids`` (one chunk), stacked, on the host: what ``train_chunk``
    starts from (the pretrained weights, if any, and each model's own init key)."""
    model_ids = np.asarray(model_ids)
    if len(model_ids) != self.chunk:
      raise ValueError(f"expected {self.chunk} model ids in a chunk, got {len(model_ids)}")
    return self.layout.merge(to_host(self._init_slots(self.layout.split(model_ids), streams)))

  def _init_slots(self, slot_ids: list[np.ndarray], streams: Streams) -> tuple[MemberState, ...]:
    pretrained = jax.device_put(self.pretrained, self._rep) if self.pretrained else None
    return tuple(self._init(self._fold(streams.init, ids), pretrained) for ids in slot_ids)

  def noise_source(self, x: np.ndarray, sigma: np.ndarray | None, fresh_noise: bool = False) -> str:
    """Where ``train_chunk``'s noise comes from: ``"none"`` (no sigma), ``"noised_copy"`` (each model's noised
    training set made once per chunk, when they fit ``NOISE_CACHE_BYTES`` per device) or ``"noise_keys"``
    (regenerated from the keys in every step: fresh noise every epoch, or sets too large to copy)."""
    if sigma is None:
      return "none"
    copy_bytes = self.chunk // self.layout.num_devices * int(np.prod(np.shape(x))) * 4
    return "noised_copy" if not fresh_noise and copy_bytes <= NOISE_CACHE_BYTES else "noise_keys"

  def _data(self, x: np.ndarray, y: np.ndarray, sigma: np.ndarray | None) -> tuple[jax.Array, ...]:
    """Training inputs, labels and sigmas on every device (replicated)."""
    sigma = np.zeros(len(x)) if sigma is None else sigma
    return jax.device_put((np.asarray(x, np.float32), np.asarray(y, np.int32), np.asarray(sigma, np.float32)),
                          self._rep)

  def _epoch(self, model_ids: np.ndarray, streams: Streams, epoch: int, n: int,
             fresh_noise: bool) -> tuple[jax.Array, jax.Array]:
    """(batch order (C, n), noise keys (C,)) of one epoch: the noise keys do not depend on the epoch unless
    ``fresh_noise``."""
    perms = self._perms(self._fold_epoch(streams.shuffle, np.asarray(model_ids), epoch), n)
    keys = (self._fold_epoch(streams.noise, np.asarray(model_ids), epoch) if fresh_noise
            else self._fold(streams.noise, np.asarray(model_ids)))
    return perms, keys

  def training_batch(self, model_ids: np.ndarray, streams: Streams, x: np.ndarray, y: np.ndarray,
                     sigma: np.ndarray | None, epoch: int, step: int,
                     fresh_noise: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each model of a chunk trains on at (epoch, step): the same batch functions the step calls.

    Returns:
      (noised inputs (C, B, H, W, C), labels (C, B), sample indices (C, B)), for inspection and tests.
    """
    perms, keys = self._epoch(model_ids, streams, epoch, len(x), fresh_noise)
    batch_fn = _batch_clean if sigma is None else _batch_noise_keys  # the keys give the copy's values too
    return tuple(to_host(self._batches[batch_fn](perms, step, keys, *self._data(x, y, sigma))))

  def abstract_state(self) -> MemberState:
    """Shapes and dtypes of one chunk's stacked state (a template for checkpoint restore)."""
    keys = jax.vmap(lambda m: rng.member_key(0, rng.INIT, m))(jnp.arange(self.chunk))
    return jax.eval_shape(jax.vmap(lambda k: init_member(self.model, self.tx, k, self.input_shape,
                                                         self.pretrained)), keys)


def check_losses(losses: np.ndarray, model_ids: np.ndarray) -> None:
  """Stops the run when a model's training loss is not finite (logs the chunk's last losses otherwise).

  Raises:
    FloatingPointError: naming the models and the first bad step.
  """
  bad = ~np.isfinite(losses)
  if bad.any():
    models, steps = np.nonzero(bad)
    raise FloatingPointError(f"training loss is not finite for model(s) {sorted(set(model_ids[models].tolist()))[:8]}"
                             f" from step {int(steps.min())} on (lower train.learning_rate or check the data)")
  if losses.size:
    logger.debug("models %d..%d: last loss %.4f (mean over the chunk)", model_ids[0], model_ids[-1],
                 float(losses[:, -1].mean()))


def auto_models_per_chunk(requested: int | None, num_models: int) -> int:
  """Chunk size: ``requested`` if given, else 1 on CPU (one model per device and step keeps the compiled program
  small; see ``sharding``) and all models elsewhere (capped at 256 to bound memory)."""
  if requested:
    return min(requested, num_models)
  return 1 if jax.default_backend() == "cpu" else min(num_models, 256)


class Trainers:
  """The trainers a run builds, one per (model, shapes, training settings, chunk, devices), so the undefended,
  pilot and ensemble models share compiled programs where they agree; a sweep passes one ``Trainers`` to all its
  rows. The epochs are not part of the key: every caller passes them to ``train_chunk``."""

  def __init__(self):
    self._built: dict[Any, EnsembleTrainer] = {}

  def get(self, model: nn.Module, input_shape: Sequence[int], cfg: Any, *, models_per_chunk: int,
          devices: Sequence[jax.Device] | None = None, batch_size: int | None = None) -> EnsembleTrainer:
    """The trainer of ``model`` under the run config ``cfg`` (its ``train`` and ``model.pretrained``), with
    ``batch_size`` in place of ``train.batch_size`` when given (members on views)."""
    t = cfg.train
    batch_size = batch_size or t.batch_size
    key = (model, tuple(input_shape), batch_size, t.learning_rate, models_per_chunk, cfg.model.pretrained,
           tuple(devices) if devices is not None else None)
    if key not in self._built:
      pretrained = weights.read_params(cfg.model.pretrained) if cfg.model.pretrained else None
      train_config = TrainConfig(epochs=t.epochs, batch_size=batch_size, learning_rate=t.learning_rate,
                                 models_per_chunk=models_per_chunk)
      self._built[key] = EnsembleTrainer(model, input_shape, train_config, mesh=default_mesh(devices),
                                         pretrained=pretrained)
    return self._built[key]
