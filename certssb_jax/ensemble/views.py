"""Members that train on views of the training set (a part of a partition, a bag): their data and schedule.

A count certificate ("a changed training sample changes at most d members") holds only if every member is a
function of its own view alone. So a member's schedule here depends on nothing but the config, its id and its
own view: its number of steps is ``epochs * L // batch_size`` for its view length L, its order in epoch e is a
permutation of its own L positions keyed by (member, e) and drawn so that it does not depend on how long the
other members' views are, and its batches cut that stream into consecutive runs of ``batch_size`` positions
(a batch may span two epochs; at most ``batch_size - 1`` positions at the very end go unused). Views of one
chunk are padded to a common length only to stack them; no member ever reads another's padding.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Views(NamedTuple):
  """The training views of a chunk's members: member i trains on ``x[indices[i, :lengths[i]]]``.

  Attributes:
    indices: (C, L) int, indices into the training set, padded past each member's length (the padding is never
      read).
    lengths: (C,) int, each member's view length (0 allowed: such a member keeps its initialisation).
  """

  indices: np.ndarray
  lengths: np.ndarray

  @classmethod
  def stack(cls, views: list[np.ndarray]) -> Views:
    """Views from one index array per member (of any lengths)."""
    lengths = np.array([len(v) for v in views], np.int64)
    indices = np.zeros((len(views), max(1, int(lengths.max(initial=0)))), np.int64)
    for i, v in enumerate(views):
      indices[i, :len(v)] = v
    return cls(indices, lengths)


# A defense's training views: model ids (C,) -> the views of those members.
MemberViews = Callable[[np.ndarray], Views]


def num_steps(lengths: np.ndarray, epochs: int, batch_size: int) -> np.ndarray:
  """(C,) each member's number of training steps: ``epochs * L // batch_size`` for its view length L."""
  return np.asarray(lengths, np.int64) * epochs // batch_size


def pad_to_bucket(indices: np.ndarray) -> np.ndarray:
  """Views padded to the next power of two of their length: the programs compiled for a chunk depend on that
  length, so views of many lengths share a few programs (the padding is never read)."""
  length = indices.shape[1]
  bucket = 1 << max(0, (length - 1).bit_length())
  return np.pad(indices, ((0, 0), (0, bucket - length)))


def _epoch_order(key: jax.Array, length: jax.Array, capacity: int) -> jax.Array:
  """A uniform permutation of [0, length) (the first ``length`` entries; the rest are padding). Position q's sort
  key is ``bits(fold_in(key, q))``, a function of q alone, so the permutation does not depend on ``capacity``."""
  q = jnp.arange(capacity)
  bits = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i), dtype=jnp.uint32))(q)
  bits = jnp.where(q < length, bits, jnp.uint32(0xFFFFFFFF))  # a stable sort keeps ties in index order
  return jnp.argsort(bits, stable=True)


def _member_stream(key: jax.Array, view: jax.Array, length: jax.Array, epochs: int) -> jax.Array:
  """(epochs * capacity,) the training-set indices of one member's whole training, in order: position p is
  sample ``view[order_e[p % L]]`` of epoch e = p // L (positions past ``epochs * L`` are padding)."""
  capacity = view.shape[0]
  orders = jax.vmap(lambda e: _epoch_order(jax.random.fold_in(key, e), length, capacity))(jnp.arange(epochs))
  p = jnp.arange(epochs * capacity)
  safe = jnp.maximum(length, 1)
  return view[orders[jnp.minimum(p // safe, epochs - 1), p % safe]]


@functools.partial(jax.jit, static_argnums=3)
def streams(keys: jax.Array, indices: jax.Array, lengths: jax.Array, epochs: int) -> jax.Array:
  """(C, epochs * L) int32: each member's training stream (``_member_stream``) from its shuffle key, for the
  views ``indices`` (C, L) of ``lengths`` (C,)."""
  return jax.vmap(lambda k, v, n: _member_stream(k, v.astype(jnp.int32), n, epochs))(keys, indices, lengths)
