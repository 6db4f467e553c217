"""A run's trained ensemble (the chunks kept in memory or read back from their checkpoints) and the logits of a
stacked chunk of models on clean inputs."""

from __future__ import annotations

import functools
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certssb_jax import backend
from certssb_jax.ensemble.member import MemberState, member_logits
from certssb_jax.ensemble.trainer import EnsembleTrainer
from certssb_jax.models import zoo as models_lib

# The whole trained ensemble (params and batch statistics) is also kept in host memory, so certification reads
# no checkpoint back, when it takes at most this many bytes.
KEEP_IN_MEMORY_BYTES = 2 << 30


class TrainedEnsemble:
  """The trained models of a run: chunks kept in memory when small, else read back from their checkpoints."""

  def __init__(self, trainer: EnsembleTrainer, num_models: int, rd: Any):
    self.trainer, self.num_models, self.rd = trainer, num_models, rd
    self.model = trainer.model
    abstract = trainer.abstract_state()
    self._template = {"params": abstract.params, "batch_stats": abstract.batch_stats}
    chunk_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self._template))
    self._keep = chunk_bytes * len(trainer.chunks(num_models)) <= KEEP_IN_MEMORY_BYTES
    self._memory: dict[int, MemberState] = {}

  def keep(self, c: int, state: MemberState) -> MemberState:
    """Records trained chunk ``c`` (params and batch statistics only); returns what is kept."""
    state = MemberState(state.params, state.batch_stats, None)
    if self._keep:
      self._memory[c] = state
    return state

  def save(self, pending: list[tuple[int, MemberState]]) -> None:
    """Saves consecutive trained chunks as one checkpoint, in the background (process 0 writes)."""
    stacked = jax.tree.map(lambda *a: np.concatenate(a), *[s for _, s in pending])
    self.rd.save_chunks(pending[0][0], pending[-1][0], {"params": stacked.params, "batch_stats": stacked.batch_stats})

  def chunks(self) -> Iterator[tuple[np.ndarray, MemberState]]:
    """(model ids, stacked params and batch statistics) of every chunk, in order.

    Raises:
      FileNotFoundError: a chunk is neither in memory nor in a checkpoint of the run folder.
      rundir.DamagedCheckpointError: a checkpoint cannot be read back (names its models and the remedy).
    """
    where = {c: (first, last) for first, last in self.rd.saved_chunks() for c in range(first, last + 1)}
    restored: tuple[tuple[int, int], Any] | None = None
    k = self.trainer.chunk
    for c, ids in enumerate(self.trainer.chunks(self.num_models)):
      if c in self._memory:
        yield ids, self._memory[c]
        continue
      if c not in where:
        raise FileNotFoundError(f"chunk {c} of the ensemble is in no checkpoint of {self.rd.path}/ensemble")
      first, last = where[c]
      if restored is None or restored[0] != (first, last):
        template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(((last - first + 1) * a.shape[0],) + a.shape[1:],
                                                               a.dtype), self._template)
        held = np.arange(first * k, min((last + 1) * k, self.num_models))  # the padding ids are no models
        restored = ((first, last), self.rd.restore_chunks(first, last, template, model_ids=held))
      part = jax.tree.map(lambda a: np.asarray(a)[(c - first) * k:(c - first + 1) * k], restored[1])
      yield ids, MemberState(part["params"], part["batch_stats"], None)

  def stacked(self, model_ids: np.ndarray) -> MemberState:
    """The given models' params and batch statistics, stacked (leading axis len(model_ids)), on the host."""
    want = set(int(m) for m in model_ids)
    parts = []
    for ids, state in self.chunks():
      sel = np.isin(ids, list(want))
      if sel.any():
        parts.append(jax.tree.map(lambda a, s=sel: np.asarray(a)[s], state))
      if ids[-1] >= max(want):
        break
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


@functools.partial(backend.jit, static_argnums=0)
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


def predict_probs(model: nn.Module, state: MemberState, x: np.ndarray) -> np.ndarray:
  """Class probabilities (N, K) of the FIRST model of a stacked state on clean inputs x (an auxiliary model)."""
  return np.asarray(models_lib.logits_to_probs(jnp.asarray(predict_logits(model, state, x)[0])))
