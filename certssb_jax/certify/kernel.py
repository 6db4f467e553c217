"""The certification kernel: votes and soft scores of the smoothed ensemble (docs/method.md section 2).

Model m sees ``x + sigma_x * u_m`` with ``u_m = normal(member_key(seed, TEST_NOISE, m), input_shape)``, one fixed
vector per model shared by all queries, so the smoothed prediction is a deterministic function of x. The
kernel is a pure jitted function of (stacked params, per-model keys, inputs, sigmas): the models of a chunk are
sharded over the mesh axis ``ens`` (``jax.shard_map``; every device runs its own models on the replicated
inputs, with the same slot layout as training, ``ChunkLayout``), and u_m is regenerated on the device
from its key. The host loops over chunks of models and batches of inputs, so memory is bounded by the chunk
sizes (``models_per_chunk`` x ``batch_size``), not by M or the test-set size (``tests/test_memory.py``).

The kernel returns each model's predicted class, so votes can be counted for any subset of models (the
hold-out correction uses the first M0), and each model's class probabilities, which the host adds up in
float64 in model-id order: the sums are the same bits however the models are chunked or sharded (a sum inside
the kernel would add per-device partial sums, whose rounding depends on the device count).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from certssb_jax import backend, rng
from certssb_jax.ensemble.member import MemberState, member_logits
from certssb_jax.ensemble.sharding import ENS, ChunkLayout, default_mesh, fold_keys, per_device, round_up, to_host
from certssb_jax.models import zoo as models_lib


@functools.lru_cache(maxsize=None)
def _keys_fn(mesh: Mesh) -> Callable[[jax.Array, np.ndarray], jax.Array]:
  """Jitted ``ids -> fold_in(stream, m)`` with the keys sharded over ``ens``."""
  return jax.jit(fold_keys, out_shardings=NamedSharding(mesh, P(ENS)))


@backend.jit(static_argnames=("model", "mesh", "per_slot"))
def certify_kernel(params: tuple[Any, ...], batch_stats: tuple[Any, ...], keys: tuple[jax.Array, ...],
                   x: jax.Array, sigma: jax.Array, *, model: nn.Module, mesh: Mesh,
                   per_slot: int) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """Predictions and probabilities of a chunk of models on noised inputs.

  Args:
    params, batch_stats: one stacked tree per slot of the chunk's ``ChunkLayout``, leading axis
      ``num_devices * per_slot``, sharded over ``ens``.
    keys: one (num_devices * per_slot,) array of test-noise keys ``member_key(seed, TEST_NOISE, m)`` per slot.
    x: (N, H, W, C) clean inputs in [0, 1] (replicated).
    sigma: (N,) the sigma_x each input is sampled with (replicated).
    model: the Flax model.
    mesh: the 1-D mesh with axis ``ens``.
    per_slot: models per device in each slot (1 for ``member_map="loop"``).

  Returns:
    (preds, probs), one entry per slot: preds (D * per_slot, N) int32, each model's class; probs
    (D * per_slot, N, K) float32, its class probabilities.
  """

  def one(p, bs, key, xb, sig):
    u = jax.random.normal(key, xb.shape[1:])  # (H, W, C): the model's fixed test noise u_m
    logits = member_logits(model, p, bs, xb + sig.reshape((-1,) + (1,) * (xb.ndim - 1)) * u)
    return models_lib.logits_to_pred(logits), models_lib.logits_to_probs(logits).astype(jnp.float32)

  def local(params, batch_stats, keys, xb, sig):
    run = per_device(one, per_slot)
    outs = [run((p, bs, k), xb, sig) for p, bs, k in zip(params, batch_stats, keys)]
    return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

  spec = P(ENS)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(), P()), out_specs=(spec, spec),
                       check_vma=False)(params, batch_stats, keys, x, sigma)


def kernel_layout(models_per_chunk: int, mesh: Mesh, member_map: str | None = None) -> ChunkLayout:
  """The layout of one kernel call: ``models_per_chunk`` rounded up to a multiple of the device count."""
  num_devices = mesh.devices.size
  return ChunkLayout.make(round_up(models_per_chunk, num_devices), num_devices, member_map)


def kernel_batch_size(batch_size: int, num_inputs: int) -> int:
  """Inputs per kernel call: ``batch_size``, or all inputs when there are fewer (the last batch is padded)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return min(batch_size, max(num_inputs, 1))


def abstract_kernel_args(model: nn.Module, input_shape: Sequence[int], models_per_chunk: int, batch_size: int,
                         mesh: Mesh | None = None, member_map: str | None = None,
                         num_inputs: int | None = None) -> tuple[tuple, dict]:
  """(args, kwargs) of ``certify_kernel`` as ``jax.ShapeDtypeStruct``s with their shardings: what
  ``certify_inputs`` passes for kernel chunks of ``models_per_chunk`` models and batches of ``batch_size``
  inputs (of ``num_inputs`` in all, if given). Neither M nor the test-set size enters (beyond a test set smaller
  than one batch): that is what bounds the memory.

  For ahead-of-time compilation without data: ``certify_kernel.lower(*args, **kwargs).compile()``.
  """
  mesh = mesh if mesh is not None else default_mesh()
  layout = kernel_layout(models_per_chunk, mesh, member_map)
  if num_inputs is not None:
    batch_size = kernel_batch_size(batch_size, num_inputs)
  ens = NamedSharding(mesh, P(ENS))
  rep = NamedSharding(mesh, P())
  variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *input_shape), jnp.float32), train=False),
                             jax.random.key(0))
  n_slot = layout.num_devices * layout.per_slot

  def stacked(a):
    return jax.ShapeDtypeStruct((n_slot,) + tuple(a.shape), a.dtype, sharding=ens)

  params = tuple(jax.tree.map(stacked, variables["params"]) for _ in range(layout.num_slots))
  batch_stats = tuple(jax.tree.map(stacked, variables.get("batch_stats", {})) for _ in range(layout.num_slots))
  key = jax.eval_shape(lambda: jax.random.key(0))
  keys = tuple(jax.ShapeDtypeStruct((n_slot,), key.dtype, sharding=ens) for _ in range(layout.num_slots))
  x = jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32, sharding=rep)
  sigma = jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=rep)
  return (params, batch_stats, keys, x, sigma), dict(model=model, mesh=mesh, per_slot=layout.per_slot)


def rechunk(chunks: Iterable[tuple[np.ndarray, MemberState]], size: int,
            num_models: int) -> Iterator[tuple[np.ndarray, MemberState]]:
  """Regroups a stream of (model ids, stacked state) into chunks of exactly ``size`` models, in id order.

  Models with ids >= num_models (training padding) are dropped; the last chunk is padded with copies of its
  last model under ids >= num_models (run, then ignored). Memory: at most two chunks on the host.
  """
  buf_ids: list[np.ndarray] = []
  buf_states: list[Any] = []
  held = 0
  for ids, state in chunks:
    ids = np.asarray(ids)
    keep = ids < num_models
    if not keep.any():
      continue
    buf_ids.append(ids[keep])
    buf_states.append(jax.tree.map(lambda a, k=keep: np.asarray(a)[k], state))
    held += int(keep.sum())
    while held >= size:
      all_ids = np.concatenate(buf_ids)
      all_state = jax.tree.map(lambda *a: np.concatenate(a), *buf_states)
      yield all_ids[:size], jax.tree.map(lambda a: a[:size], all_state)
      buf_ids, buf_states = [all_ids[size:]], [jax.tree.map(lambda a: a[size:], all_state)]
      held -= size
  if held:
    all_ids = np.concatenate(buf_ids)
    all_state = jax.tree.map(lambda *a: np.concatenate(a), *buf_states)
    pad = size - held
    ids = np.concatenate([all_ids, num_models + np.arange(pad)])
    yield ids, jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]), all_state)


def certify_inputs(model: nn.Module, chunks: Iterable[tuple[np.ndarray, MemberState]], x: np.ndarray,
                   sigma: np.ndarray, *, seed: int, num_models: int, batch_size: int = 512,
                   on_chunk: Callable[[int], None] | None = None, mesh: Mesh | None = None,
                   member_map: str | None = None, models_per_chunk: int | None = None,
                   return_ranks: bool = False) -> tuple[np.ndarray, ...]:
  """Runs every model of the ensemble on every input with its fixed test noise.

  Args:
    model: the Flax model.
    chunks: iterable of (model_ids (C,), stacked state), in increasing id order — ids >= num_models
      (padding) are ignored.
    x: (N, H, W, C) inputs.
    sigma: (N,) per-input sigma_x (the sigma actually used to sample; 0 votes on the input itself).
    seed: run seed (test noise stream).
    num_models: M.
    batch_size: inputs per kernel call (the last batch is padded so the kernel compiles once).
    on_chunk: progress callback, called with the number of models done after each chunk.
    mesh: 1-D mesh with axis ``ens`` the models are sharded over; default all devices.
    member_map: ``"loop"`` or ``"vmap"`` (see ``sharding``); default per backend.
    models_per_chunk: models per kernel call (memory bound); default the size of the first incoming chunk.
      Rounded up to a multiple of the device count.
    return_ranks: also return every model's ranking of the classes (a run-off election needs more than the
      top class).

  Returns:
    (preds (M, N) int32 — model m's class on input n, probs_sum (N, K) float64 — the sum over models, in
    model-id order, of their class probabilities); with ``return_ranks`` also ranks (M, N, K) uint8, model m's
    rank of class j on input n (``class_ranks`` of its probabilities).
  """
  x = np.asarray(x, np.float32)
  sigma = np.asarray(sigma, np.float32)
  n = len(x)
  if sigma.shape != (n,):
    raise ValueError(f"sigma must have shape ({n},), got {sigma.shape}")
  if n and not np.all(sigma >= 0):  # 0: the clean query (a counting defense's members vote without noise)
    raise ValueError("every test sigma must be >= 0")
  if num_models < 1:
    raise ValueError(f"num_models must be >= 1, got {num_models}")
  mesh = mesh if mesh is not None else default_mesh()
  rep = NamedSharding(mesh, P())
  bsz = kernel_batch_size(batch_size, n)
  pad = (-n) % bsz
  xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)]) if pad else x
  sp = np.concatenate([sigma, np.ones(pad, np.float32)]) if pad else sigma
  batches = [jax.device_put((xp[i:i + bsz], sp[i:i + bsz]), rep) for i in range(0, len(xp), bsz)]
  stream = rng.stream(seed, rng.TEST_NOISE)
  preds = np.full((num_models, n), -1, np.int32)
  probs_sum = None
  ranks = np.zeros((num_models, n, 0), np.uint8) if return_ranks else None
  chunks = iter(chunks)
  first = next(chunks, None)
  if first is None:
    raise ValueError("no chunks of models were given")
  layout = kernel_layout(models_per_chunk or len(first[0]), mesh, member_map)
  for ids, state in rechunk(itertools.chain([first], chunks), layout.chunk, num_models):
    keep = ids < num_models
    chunk_preds, chunk_probs = _run_chunk(model, ids, state, batches, stream, layout, mesh)
    chunk_preds, chunk_probs = chunk_preds[:, :n], chunk_probs[:, :n].astype(np.float64)
    preds[ids[keep]] = chunk_preds[keep]
    if probs_sum is None:
      probs_sum = np.zeros(chunk_probs.shape[1:], np.float64)
      ranks = None if ranks is None else np.zeros((num_models, *chunk_probs.shape[1:]), np.uint8)
    if ranks is not None:
      ranks[ids[keep]] = class_ranks(chunk_probs[keep])
    for c in np.flatnonzero(keep)[np.argsort(ids[keep], kind="stable")]:
      probs_sum += chunk_probs[c]  # model-id order: the same bits for any chunking or sharding
    if on_chunk is not None:
      on_chunk(int(keep.sum()))
  if (preds < 0).any():
    raise ValueError("some models were not run: the chunks do not cover all num_models models")
  return (preds, probs_sum) if ranks is None else (preds, probs_sum, ranks)


def class_ranks(probs: np.ndarray) -> np.ndarray:
  """(..., K) uint8: each class's rank in ``probs`` (..., K), 0 the most probable, ties to the smaller class."""
  order = np.argsort(-np.asarray(probs), axis=-1, kind="stable")
  return np.argsort(order, axis=-1, kind="stable").astype(np.uint8)


def _run_chunk(model: nn.Module, ids: np.ndarray, state: MemberState, batches: list[tuple[jax.Array, jax.Array]],
               stream: jax.Array, layout: ChunkLayout, mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
  """The kernel over every input batch for one chunk of models: (preds (C, N_padded), probs (C, N_padded, K))."""
  ens = NamedSharding(mesh, P(ENS))
  slots = [jax.device_put(s, ens) for s in layout.split((state.params, state.batch_stats))]
  params, batch_stats = tuple(s[0] for s in slots), tuple(s[1] for s in slots)
  keys = tuple(_keys_fn(mesh)(stream, slot_ids) for slot_ids in layout.split(ids))
  preds, probs = [], []
  for xb, sb in batches:
    p, s = certify_kernel(params, batch_stats, keys, xb, sb, model=model, mesh=mesh, per_slot=layout.per_slot)
    preds.append(layout.merge(to_host(p)))  # (C, B)
    probs.append(layout.merge(to_host(s)))  # (C, B, K)
  return np.concatenate(preds, axis=1), np.concatenate(probs, axis=1)


def votes_from_preds(preds: np.ndarray, num_classes: int) -> np.ndarray:
  """Vote counts (N, K) int64 from per-model predictions (M, N)."""
  m, n = preds.shape
  votes = np.zeros((n, num_classes), np.int64)
  np.add.at(votes, (np.broadcast_to(np.arange(n), (m, n)), preds), 1)
  return votes
