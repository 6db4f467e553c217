"""The certification kernel: votes and soft scores of the smoothed ensemble (METHOD.md section 2).

Model m sees ``x + sigma_x * u_m`` with ``u_m = normal(member_key(seed, TEST_NOISE, m), input_shape)``, one fixed
vector per model shared by all queries, so the smoothed prediction is a deterministic function of x. The
kernel is a pure jitted function of (stacked params, inputs, sigmas, per-model noise); the host loops over
chunks of models and of inputs, so memory is bounded by the chunk sizes, not by M or the test-set size.
The kernel returns each model's predicted class, so votes can be counted for any subset of models (the
hold-out correction uses the first M0), and the sum of class probabilities for Hoeffding bounds.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certssb_jax import ensemble
from certssb_jax import models as models_lib
from certssb_jax import rng


def test_noise(seed: int, model_ids: np.ndarray, input_shape: Sequence[int]) -> jax.Array:
  """u_m for the given models: ``normal(member_key(seed, TEST_NOISE, m))``. Returns (C, *input_shape)."""
  return jax.vmap(lambda m: jax.random.normal(rng.member_key(seed, rng.TEST_NOISE, m), tuple(input_shape)))(
      jnp.asarray(model_ids))


@functools.partial(jax.jit, static_argnums=0)
def certify_kernel(model: nn.Module, params: Any, batch_stats: Any, x: jax.Array, sigma: jax.Array,
                   noise: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Predictions and probabilities of a chunk of models on noised inputs.

  Args:
    model: the Flax model.
    params, batch_stats: stacked variables of C models (leading axis C).
    x: (N, H, W, C) clean inputs in [0, 1].
    sigma: (N,) the sigma_x each input is sampled with.
    noise: (C, H, W, C) the fixed test noise u_m of each model.
    valid: (C,) bool, False for padding models (their probabilities are left out of the sum).

  Returns:
    (preds (C, N) int32: each model's class, probs_sum (N, K) float32: sum over the valid models of the chunk
    of class probabilities).
  """

  def one(p, bs, u):
    logits = ensemble.member_logits(model, p, bs, x + sigma.reshape((-1,) + (1,) * (x.ndim - 1)) * u)
    return models_lib.logits_to_pred(logits), models_lib.logits_to_probs(logits)

  preds, probs = jax.vmap(one)(params, batch_stats, noise)  # (C, N), (C, N, K)
  return preds, jnp.einsum("c,cnk->nk", valid.astype(probs.dtype), probs)


def certify_inputs(model: nn.Module, chunks: Iterable[tuple[np.ndarray, ensemble.MemberState]], x: np.ndarray,
                   sigma: np.ndarray, *, seed: int, num_models: int, batch_size: int = 512,
                   on_chunk: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Runs every model of the ensemble on every input with its fixed test noise.

  Args:
    model: the Flax model.
    chunks: iterable of (model_ids (C,), stacked state) — ids >= num_models (padding) are ignored.
    x: (N, H, W, C) inputs.
    sigma: (N,) per-input sigma_x (the sigma actually used to sample).
    seed: run seed (test noise stream).
    num_models: M.
    batch_size: inputs per kernel call (the last batch is padded so the kernel compiles once).
    on_chunk: progress callback, called with the number of models done after each chunk.

  Returns:
    (preds (M, N) int32 — model m's class on input n, probs_sum (N, K) float64).
  """
  x = np.asarray(x, np.float32)
  sigma = np.asarray(sigma, np.float32)
  n = len(x)
  if sigma.shape != (n,):
    raise ValueError(f"sigma must have shape ({n},), got {sigma.shape}")
  if n and not np.all(sigma > 0):
    raise ValueError("every test sigma must be > 0")
  bsz = min(batch_size, max(n, 1))
  pad = (-n) % bsz
  xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)]) if pad else x
  sp = np.concatenate([sigma, np.ones(pad, np.float32)]) if pad else sigma
  preds = np.full((num_models, n), -1, np.int32)
  probs_sum = None
  for ids, state in chunks:
    keep = ids < num_models
    noise = test_noise(seed, ids, x.shape[1:])
    chunk_preds, chunk_probs = [], []
    for i in range(0, len(xp), bsz):
      p, s = certify_kernel(model, state.params, state.batch_stats, jnp.asarray(xp[i:i + bsz]),
                            jnp.asarray(sp[i:i + bsz]), noise, jnp.asarray(keep))
      chunk_preds.append(np.asarray(p))
      chunk_probs.append(np.asarray(s, np.float64))
    preds[ids[keep]] = np.concatenate(chunk_preds, axis=1)[keep, :n]
    s = np.concatenate(chunk_probs, axis=0)[:n]
    probs_sum = s if probs_sum is None else probs_sum + s
    if on_chunk is not None:
      on_chunk(int(keep.sum()))
  if (preds < 0).any():
    raise ValueError("some models were not run: the chunks do not cover all num_models models")
  return preds, probs_sum


def votes_from_preds(preds: np.ndarray, num_classes: int) -> np.ndarray:
  """Vote counts (N, K) int64 from per-model predictions (M, N)."""
  m, n = preds.shape
  votes = np.zeros((n, num_classes), np.int64)
  np.add.at(votes, (np.broadcast_to(np.arange(n), (m, n)), preds), 1)
  return votes
