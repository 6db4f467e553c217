"""How the models of a chunk are laid out over the devices of a 1-D mesh with axis ``ens``.

A chunk of C models is spread over the D devices (``jax.shard_map``); each device runs its own C / D models and
there is no communication between devices during training or certification. How a device runs its models
(``member_map``):

* ``"loop"`` (default on CPU): every model is its own program of ungrouped ops. The chunk is held as C / D
  *slots*, each an array with one model per device, so a device's program is the one-model program repeated:
  model m gets the same XLA ops, fusions and hence the same bits whether the chunk runs on 1 device or 8
  (``tests/test_multidevice.py``). It is also the fast way on XLA:CPU, where ``vmap`` of a convolution becomes
  a grouped convolution that runs several times slower per model (BENCHMARKS.md).
* ``"vmap"`` (default on GPU/TPU): one slot, ``vmap`` over the device's models (grouped convolutions), the
  efficient form on accelerators. The numerics of a grouped convolution depend on the group count, so results
  may differ in the last bits between device counts.

Bit-identity across device counts on CPU also needs the same XLA:CPU thread-pool size (``PJRT_NPROC``) in both
runs: the partitioning of the input-gradient convolution depends on it (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh
import numpy as np

ENS = "ens"  # name of the mesh axis the ensemble is sharded over
MEMBER_MAPS = ("loop", "vmap")


def default_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over the given devices (default: every process's devices) with the ensemble axis ``ens``."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (ENS,), axis_types=(AxisType.Auto,), devices=devices)


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= max(n, 1) (chunks are whole multiples of the devices)."""
  return int(math.ceil(max(n, 1) / multiple) * multiple)


def fold_keys(stream: jax.Array, ids: Any) -> jax.Array:
  """Per-model keys ``fold_in(stream, m)`` for every id m, (C,)."""
  return jax.vmap(lambda m: jax.random.fold_in(stream, m))(ids)


def default_member_map() -> str:
  """``"loop"`` on CPU (bit-identical across device counts, and faster there), ``"vmap"`` on accelerators."""
  return "loop" if jax.default_backend() == "cpu" else "vmap"


def check_member_map(member_map: str | None) -> str:
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
    """The layout of a chunk of ``chunk`` models (a multiple of ``num_devices``)."""
    if chunk % num_devices:
      raise ValueError(f"a chunk of {chunk} models cannot be split over {num_devices} devices")
    per_device = chunk // num_devices
    if check_member_map(member_map) == "loop":
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
