"""Random streams of certssb-jax: one stream per purpose, derived from one seed.

Every random quantity of a run comes from ``jax.random.key(seed)`` folded with a purpose tag
(``stream(seed, TAG)``), then with the model index ``m`` and, for per-sample quantities, the sample index
``j``. Nothing random depends on data values, so model ``m`` is a deterministic function of its noised
training set, and the same seed gives bit-identical results however the work is chunked or sharded.
"""

from __future__ import annotations

import jax

# Purpose tags. Never reuse a stream for two purposes.
INIT = 0  # parameter initialisation of ensemble member m
SHUFFLE = 1  # per-epoch batch order of member m
TRAIN_NOISE = 2  # z_{m,j}: the fixed training noise of member m on sample j
TEST_NOISE = 3  # u_m: the fixed test noise of member m
SIGMA_SEARCH = 4  # noise draws of the sample-specific sigma search
POISON = 5  # choice of the poisoned training indices
PILOT = 6  # the pilot model (init, shuffle, augmentation noise)
UNDEFENDED = 7  # the undefended baseline model
DROPOUT = 8  # dropout of member m (models that use it)
TRIGGER = 9  # fixed random trigger patterns (blending)
SURROGATE = 10  # the adaptive attacker's surrogate model
BAG = 11  # the bag (training indices drawn with replacement) of bagging member m
DRAW_MEMBERS = 12  # the member of each i.i.d. draw of a test-time smoothed partition ensemble
DRAW_NOISE = 13  # the noise of draw j on query q of that ensemble


def stream(seed: int | jax.Array, tag: int) -> jax.Array:
  """Returns the key of one purpose: ``fold_in(key(seed), tag)``."""
  root = jax.random.key(seed) if not isinstance(seed, jax.Array) else seed
  return jax.random.fold_in(root, tag)


def member_key(seed: int | jax.Array, tag: int, m: int | jax.Array) -> jax.Array:
  """Returns the key of ensemble member ``m`` for one purpose: ``fold_in(stream(seed, tag), m)``."""
  return jax.random.fold_in(stream(seed, tag), m)
