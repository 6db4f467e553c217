"""Votes of independent draws (a uniformly chosen member, a fresh Gaussian noise): an unbiased, binomial estimate of

    G_c(x) = (1 / k) sum_i P_e(f_i(x + e) = c),    e ~ N(0, sigma^2 I),

the class probabilities of an ensemble smoothed at test time (``defenses.smoothed_partition``). Draw j of every query
uses member ``m_j`` (drawn once per run, uniformly from the k members) and noise ``normal(fold_in(fold_in(key, j),
q))`` for query q, so for each query the N draws are i.i.d. and its count of class c is Binomial(N, G_c(x)):
Clopper-Pearson bounds apply as they are. (The kernel of the smoothing ensemble, ``kernel``, gives each member
one fixed noise instead; its votes are not draws of this kind.)

The host loops over members and batches of queries; each call evaluates one member on (its draws x a batch of
queries) noised inputs, its draws padded to a power of two so that few programs are compiled.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certssb_jax import backend, rng
from certssb_jax.ensemble.member import MemberState, member_logits
from certssb_jax.models import zoo as models_lib


def draw_members(seed: int, num_draws: int, num_members: int) -> np.ndarray:
  """(N,) the member of every draw, uniform and independent, keyed by the run's seed."""
  return np.asarray(jax.random.randint(rng.stream(seed, rng.DRAW_MEMBERS), (num_draws,), 0, num_members))


@functools.partial(backend.jit, static_argnums=0)
def _member_preds(model: nn.Module, params: Any, batch_stats: Any, x: jax.Array, draws: jax.Array,
                  queries: jax.Array, sigma: jax.Array, key: jax.Array) -> jax.Array:
  """(D, B) one member's class on every (draw, query) pair: x (B, H, W, C), draws (D,), queries (B,) ids."""
  def noise(j, q):
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, j), q), x.shape[1:])

  e = jax.vmap(lambda j: jax.vmap(lambda q: noise(j, q))(queries))(draws)  # (D, B, H, W, C)
  inputs = (x[None] + sigma * e).reshape((-1, *x.shape[1:]))
  return models_lib.logits_to_pred(member_logits(model, params, batch_stats, inputs)).reshape(e.shape[:2])


def draw_votes(model: nn.Module, chunks: Iterable[tuple[np.ndarray, MemberState]], x: np.ndarray, sigma: float, *,
               seed: int, num_members: int, num_draws: int, num_classes: int, batch_size: int = 1024,
               on_member: Callable[[int], None] | None = None) -> np.ndarray:
  """Counts (Q, K) int64 of ``num_draws`` i.i.d. (member, noise) draws on every query (module docstring).

  Args:
    model: the Flax model.
    chunks: (model ids, stacked params and batch statistics) of the members, any chunking; ids >= num_members
      (training padding) are skipped.
    x: (Q, H, W, C) queries.
    sigma: the noise level of the draws.
    seed: the run's seed (the DRAW_MEMBERS and DRAW_NOISE streams).
    num_members: k.
    num_draws: N per query.
    num_classes: K.
    batch_size: noised inputs per call (draws x queries), a memory bound.
    on_member: progress, called with 1 after each member.
  """
  x = np.asarray(x, np.float32)
  members = draw_members(seed, num_draws, num_members)
  key = rng.stream(seed, rng.DRAW_NOISE)
  counts = np.zeros((len(x), num_classes), np.int64)
  for ids, state in chunks:
    for c, m in enumerate(np.asarray(ids)):
      if m >= num_members:
        continue
      draws = np.flatnonzero(members == m).astype(np.int32)
      if len(draws):
        params, batch_stats = jax.tree.map(lambda a, c=c: jnp.asarray(np.asarray(a)[c]), (state.params,
                                                                                          state.batch_stats))
        bucket = 1 << max(0, (len(draws) - 1).bit_length())  # padded draws are counted nowhere
        padded = np.concatenate([draws, np.full(bucket - len(draws), draws[0], np.int32)])
        queries_per_call = max(1, batch_size // bucket)
        for start in range(0, len(x), queries_per_call):
          q = np.arange(start, min(start + queries_per_call, len(x)), dtype=np.int32)
          qp = np.concatenate([q, np.full(queries_per_call - len(q), q[-1], np.int32)])
          preds = np.asarray(_member_preds(model, params, batch_stats, x[qp], padded, qp, np.float32(sigma),
                                           key))[:len(draws), :len(q)]  # (D, B)
          np.add.at(counts, (np.broadcast_to(q, preds.shape), preds), 1)
      if on_member is not None:
        on_member(1)
  return counts
