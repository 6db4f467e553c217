"""Sample-specific noise levels by stochastic gradient ascent on the certified radius (docs/method.md, section 4).

For one input x, a scorer F (class probabilities) and S Gaussian draws z_1..z_S, the search looks for the noise
level sigma that maximises the certified radius of a class A:

    psi(sigma) = mean_s F(x + sigma z_s)                                             # (K,)
    r(sigma)   = sigma / 2 * (Phi^-1(clip(psi_A)) - Phi^-1(clip(psi_B)))   clip to [kappa, 1 - kappa]
    sigma     <- clip(sigma + step, sigma_lo, sigma_hi)                    T times, from sigma_0

Two choices are separate extension points, each one registry entry:

* the objective (``OBJECTIVES``) picks class A. The default, ``robust_prediction``, is the scorer's smoothed
  prediction at ``sigma_hi``: the class that survives the most noise. It never reads the given label, and a
  small trigger is drowned at that noise level, so a triggered input is searched like its clean copy.
  ``prediction`` (the scorer's class on the noise-free input) and ``label`` (the given label of a training
  sample, the paper's choice) are kept for comparison: both let a trigger the scorer has learned steer the
  search (docs/soundness.md, "the noise level as a side channel").
* the update rule (``RULES``) turns r into a step. ``reparam`` differentiates r through F (the draws are
  reparameterised; B is an argmax, not differentiated) and adds ``lr * dr/dsigma``. ``reference`` is the
  reference release's rule: the scores are detached, so each step adds ``lr * |gap| / 2`` and sigma only grows.

B is the strongest class other than A under psi at the current sigma. The clip keeps Phi^-1 finite: once
psi_A >= 1 - kappa and psi_B <= kappa, r = sigma * Phi^-1(1 - kappa) and the ascent simply grows sigma.

A batch of samples is one jitted program: ``vmap`` over samples of the update, the steps in a ``lax.scan``.
Randomness: the key of sample j is ``fold_in(key, j)`` with j its GLOBAL index, and step t draws
``normal(fold_in(key_j, t), (S, *input_shape))`` (float32), so a sample's sigma does not depend on how samples
are batched or padded. The smoothed prediction of ``robust_prediction`` uses another key (``find_sigmas``
derives both from one).

XLA:CPU runs convolutions inside a while loop (a rolled ``lax.scan``) much slower than unrolled, and compile
time grows faster than linearly with the unrolled length, so on CPU the host calls a program of at most
``CPU_STEPS_PER_CALL`` unrolled steps repeatedly (BENCHMARKS.md); other backends run all T steps in one
rolled scan.

The search, its two registries and its batch drivers stay in one module (about 490 lines): they are one concept
and change together.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from certssb_jax import backend

ScoreFn = Callable[[Any, jax.Array], jax.Array]  # (params, xb (B, *input_shape)) -> probs (B, K)

CPU_STEPS_PER_CALL = 10  # steps per compiled program on CPU (unrolled); see the module docstring


# ---------------------------------------------------------------------------------------------- update rules


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Hyper-parameters of the sigma search. Frozen, hence hashable: a jit static argument.

  Attributes:
    sigma_0: base noise level, where the search starts unless ``start_at_hi``.
    sigma_lo: lower bound on sigma, > 0; sigma is clipped to [sigma_lo, sigma_hi] after every step.
    sigma_hi: upper bound on sigma; also the noise level of the ``robust_prediction`` objective.
    num_steps: T, the number of steps (0 returns sigma_0 for every sample).
    num_draws: S, Gaussian draws per step that estimate psi (and its gradient).
    lr: step size, in sigma units per unit of the rule's slope.
    kappa: psi is clipped to [kappa, 1 - kappa] before Phi^-1, in (0, 0.5).
    rule: the update rule, a key of ``RULES``.
    target_draws: draws of the smoothed prediction that picks class A (``robust_prediction``).
    start_at_hi: start at sigma_hi and let the steps bring sigma down where the radius gains from it (an input
      whose margin a small trigger props up at low noise then keeps the noise that drowns the trigger).
  """

  sigma_0: float
  sigma_lo: float
  sigma_hi: float
  num_steps: int = 10
  num_draws: int = 8
  lr: float = 0.05
  kappa: float = 0.02
  rule: str = "reparam"
  target_draws: int = 32
  start_at_hi: bool = False

  def validate(self) -> SearchConfig:
    """Raises ValueError naming the first bad field; returns self so calls can chain."""
    for name in ("sigma_0", "sigma_lo", "sigma_hi", "lr", "kappa"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise ValueError(f"SearchConfig.{name} must be a finite number, got {value!r}")
    for name in ("num_steps", "num_draws", "target_draws"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"SearchConfig.{name} must be an int, got {value!r}")
    if self.sigma_lo <= 0:
      raise ValueError(f"SearchConfig.sigma_lo must be > 0, got {self.sigma_lo}")
    if self.sigma_hi < self.sigma_lo:
      raise ValueError(f"SearchConfig.sigma_hi ({self.sigma_hi}) must be >= sigma_lo ({self.sigma_lo})")
    if not self.sigma_lo <= self.sigma_0 <= self.sigma_hi:
      raise ValueError(f"SearchConfig.sigma_0 ({self.sigma_0}) must lie in [sigma_lo, sigma_hi] = "
                       f"[{self.sigma_lo}, {self.sigma_hi}]")
    if self.num_steps < 0:
      raise ValueError(f"SearchConfig.num_steps (T) must be >= 0, got {self.num_steps}")
    if self.num_draws < 1 or self.target_draws < 1:
      raise ValueError(f"SearchConfig.num_draws (S) and target_draws must be >= 1, got {self.num_draws}, "
                       f"{self.target_draws}")
    if self.lr <= 0:
      raise ValueError(f"SearchConfig.lr must be > 0, got {self.lr}")
    if not 0 < self.kappa < 0.5:
      raise ValueError(f"SearchConfig.kappa must lie in (0, 0.5), got {self.kappa}")
    if self.rule not in RULES:
      raise ValueError(f"SearchConfig.rule must be one of {sorted(RULES)}, got {self.rule!r}")
    return self


def binary_probs(logit: jax.Array) -> jax.Array:
  """Class probabilities [1 - p, p], p = sigmoid(logit), of a one-logit binary model. (...,) -> (..., 2).

  Nothing is squeezed: pass a model's raw (B, 1) output as ``logits[:, 0]``.
  """
  logit = jnp.asarray(logit)
  # 1 - sigmoid(l) = sigmoid(-l), accurate in float32 also for large l.
  return jnp.stack([jax.nn.sigmoid(-logit), jax.nn.sigmoid(logit)], axis=-1)


def runner_up(psi: jax.Array, target: jax.Array) -> jax.Array:
  """Index of the strongest class other than ``target``. psi (..., K), target (...) -> (...) int."""
  num_classes = psi.shape[-1]
  is_target = jnp.arange(num_classes) == jnp.asarray(target)[..., None]  # (..., K)
  return jnp.argmax(jnp.where(is_target, -jnp.inf, psi), axis=-1)


def probit(p: jax.Array) -> jax.Array:
  """Phi^-1(p) as sqrt(2) * erfinv(2 p - 1), for p in [kappa, 1 - kappa].

  The same values as ``jax.scipy.special.ndtri`` to 6e-7 on [0.02, 0.98] in float32 (tested against scipy),
  but one XLA op: ndtri's piecewise rational approximation makes XLA:CPU compile times grow super-linearly
  with the number of unrolled steps. Away from the clip range erfinv(2 p - 1) loses precision, which is why
  psi is clipped first.
  """
  return jnp.sqrt(2.0).astype(p.dtype) * jax.lax.erf_inv(2.0 * p - 1.0)


def _noised_probs(score_fn: ScoreFn, params: Any, x: jax.Array, sigma: jax.Array, key: jax.Array,
                  num_draws: int) -> jax.Array:
  """Scores of S noised copies of ONE sample: F(x + sigma z_s). x (*input_shape) -> (S, K)."""
  z = jax.random.normal(key, (num_draws, *x.shape), jnp.float32)  # (S, *input_shape)
  return score_fn(params, x[None] + sigma * z).astype(jnp.float32)  # (S, K)


def _margin_terms(psi: jax.Array, target: jax.Array, kappa: float) -> jax.Array:
  """Phi^-1(clip(psi_A)) - Phi^-1(clip(psi_B)), B the strongest other class (not differentiated). psi (K,)."""
  b = runner_up(jax.lax.stop_gradient(psi), target)
  clipped = jnp.clip(psi, kappa, 1.0 - kappa)  # (K,)
  return probit(clipped[target]) - probit(clipped[b])


def radius_objective(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, sigma: jax.Array,
                     key_t: jax.Array, num_draws: int, kappa: float) -> jax.Array:
  """The Monte-Carlo radius r(sigma) of ONE sample, differentiable in sigma.

  Args:
    score_fn: (params, xb (B, *input_shape)) -> class probabilities (B, K).
    params: the scorer's parameters (any pytree).
    x: one input (*input_shape), pixel scale [0, 1].
    target: class A, scalar int.
    sigma: scalar noise level.
    key_t: key of the S draws.
    num_draws: S.
    kappa: clip level of psi.

  Returns:
    Scalar sigma / 2 * (Phi^-1(clip(psi_A)) - Phi^-1(clip(psi_B))).
  """
  psi = jnp.mean(_noised_probs(score_fn, params, x, sigma, key_t, num_draws), axis=0)  # (K,)
  return 0.5 * sigma * _margin_terms(psi, target, kappa)


def _reparam_step(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, sigma: jax.Array,
                  key_t: jax.Array, config: SearchConfig) -> jax.Array:
  """sigma + lr * dr/dsigma for ONE sample (before clipping)."""
  grad_r = jax.grad(radius_objective, argnums=4)(score_fn, params, x, target, sigma, key_t, config.num_draws,
                                                 config.kappa)
  return sigma + config.lr * grad_r


def _reference_step(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, sigma: jax.Array,
                    key_t: jax.Array, config: SearchConfig) -> jax.Array:
  """The reference release's update for ONE sample (before clipping).

  The reference (``get_sigma`` in NcepuQiaoTing/Cert-SSB) evaluates the model on x + sigma z with one draw,
  DETACHES the output, forms |gap| = |Phi^-1(clip(p_A)) - Phi^-1(clip(p_B))| (binary: p_B = 1 - p_A) and
  differentiates relu(sigma / 2 * |gap|) w.r.t. sigma, which is just |gap| / 2. Each step adds lr * |gap| / 2
  >= 0, at most lr * Phi^-1(1 - kappa): sigma never decreases and the model's sensitivity to the noise level
  never enters. Here psi averages ``num_draws`` draws (1 for the reference) and B is the strongest class other
  than A (the other class when K = 2).
  """
  probs = jax.lax.stop_gradient(_noised_probs(score_fn, params, x, sigma, key_t, config.num_draws))  # (S, K)
  gap = jnp.abs(_margin_terms(jnp.mean(probs, axis=0), target, config.kappa))
  return sigma + config.lr * 0.5 * gap


@dataclasses.dataclass(frozen=True)
class Rule:
  """An update rule and its defaults (what ``config.resolve`` fills in where the run config says None)."""

  step: Callable[..., jax.Array]  # (score_fn, params, x, target, sigma, key_t, config) -> sigma (unclipped)
  lr: float
  num_draws: int
  num_steps: Callable[[str], int]  # trigger name -> default T
  unbounded_above: bool  # the default sigma_hi is where the rule cannot reach (it never clips above)


# Steps of the reference release, read off its released sigmas: the largest increments, 0.1746 (one-pixel) and
# 0.2259 (four-pixel, blending), are steps x 1e-4 x Phi^-1(0.98) (docs/method.md, "the reference rule").
REFERENCE_STEPS = {"onepixel": 850, "fourpixel": 1100, "blending": 1100}

RULES: dict[str, Rule] = {
    "reparam": Rule(_reparam_step, lr=0.05, num_draws=8, num_steps=lambda trigger: 10, unbounded_above=False),
    "reference": Rule(_reference_step, lr=1e-4, num_draws=1,
                      num_steps=lambda trigger: REFERENCE_STEPS.get(trigger, 1100), unbounded_above=True),
}


def largest_increment(config: SearchConfig) -> float:
  """The most a ``reference`` search can add to sigma_0: T * lr * Phi^-1(1 - kappa) (every step saturated)."""
  return config.num_steps * config.lr * statistics.NormalDist().inv_cdf(1.0 - config.kappa)


# ---------------------------------------------------------------------------------------------- the search


def _steps_per_call(num_steps: int) -> int:
  return min(num_steps, CPU_STEPS_PER_CALL) if jax.default_backend() == "cpu" else num_steps


def _resolve_unroll(unroll: bool | int | None, steps: int) -> int:
  """The scan's unroll factor within one program: full on CPU by default, 1 elsewhere."""
  if unroll is None:
    unroll = jax.default_backend() == "cpu"
  if isinstance(unroll, bool):
    return max(steps, 1) if unroll else 1
  if isinstance(unroll, (int, np.integer)) and unroll >= 1:
    return int(unroll)
  raise ValueError(f"unroll must be a bool or an int >= 1, got {unroll!r}")


@backend.jit(static_argnums=(0,), static_argnames=("config", "num_steps", "unroll"))
def _search_steps_jit(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, indices: jax.Array,
                      key: jax.Array, sigma: jax.Array, first_step: jax.Array, *, config: SearchConfig,
                      num_steps: int, unroll: int) -> jax.Array:
  """Steps ``first_step .. first_step + num_steps - 1`` for one batch. x (N, ...), target, indices, sigma (N,)."""
  sample_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)  # (N,) keys
  batched_step = jax.vmap(RULES[config.rule].step, in_axes=(None, None, 0, 0, 0, 0, None))

  def body(sigma: jax.Array, t: jax.Array) -> tuple[jax.Array, None]:
    keys_t = jax.vmap(jax.random.fold_in, in_axes=(0, None))(sample_keys, t)  # (N,) keys
    sigma = batched_step(score_fn, params, x, target, sigma, keys_t, config)  # (N,)
    return jnp.clip(sigma, config.sigma_lo, config.sigma_hi), None

  sigma, _ = jax.lax.scan(body, sigma, first_step + jnp.arange(num_steps), unroll=unroll)
  return sigma


def _check_inputs(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, indices: jax.Array) -> None:
  """Shape, dtype and value checks, with messages that name the problem."""
  if not callable(score_fn):
    raise ValueError(f"score_fn must be callable, got {type(score_fn).__name__}")
  if x.ndim < 1 or x.shape[0] < 1:
    raise ValueError(f"x must have shape (N, *input_shape) with N >= 1, got {x.shape}")
  num_samples = x.shape[0]
  for name, arr in (("target", target), ("indices", indices)):
    if arr.shape != (num_samples,):
      raise ValueError(f"{name} must have shape (N,) = ({num_samples},) like x, got {arr.shape}")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
      raise ValueError(f"{name} must be integer, got dtype {arr.dtype}")
  num_classes = _num_classes(score_fn, params, x.shape[1:])
  target_np = np.asarray(target)
  if target_np.min() < 0 or target_np.max() >= num_classes:
    raise ValueError(f"target must lie in [0, K) = [0, {num_classes}), got range "
                     f"[{target_np.min()}, {target_np.max()}]")
  if np.asarray(indices).min() < 0:
    raise ValueError("indices must be >= 0 (global sample indices)")


def _num_classes(score_fn: ScoreFn, params: Any, input_shape: tuple[int, ...]) -> int:
  probs = jax.eval_shape(score_fn, params, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  if len(probs.shape) != 2 or probs.shape[0] != 1 or probs.shape[1] < 2:
    raise ValueError(
        f"score_fn must map a batch (B, *input_shape) to probabilities (B, K) with K >= 2, got {probs.shape} "
        "for B = 1 (wrap a one-logit model with binary_probs)")
  return probs.shape[1]


def _check_key(key: Any) -> None:
  if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
    raise ValueError("key must be a typed key from jax.random.key (see certssb_jax.rng)")


def search_sigma(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, indices: jax.Array,
                 key: jax.Array, config: SearchConfig, *, unroll: bool | int | None = None) -> jax.Array:
  """Sample-specific sigma of every sample of a batch by T steps of the configured rule.

  Compiles once per (score_fn, config, unroll, batch shape); keep ``score_fn`` the same Python object across
  calls (not a fresh lambda) to hit the cache.

  Args:
    score_fn: (params, xb (B, *input_shape)) -> class probabilities (B, K), K >= 2; per-sample (no batch
      coupling such as train-mode batch norm). Wrap a one-logit model with ``binary_probs``; for an ensemble
      pass stacked params and a score_fn that averages the members' probabilities.
    params: the scorer's parameters (any pytree).
    x: (N, *input_shape) inputs on the [0, 1] pixel scale.
    target: (N,) int, class A (see ``OBJECTIVES``).
    indices: (N,) int, the samples' global indices; sample j's draws come from fold_in(key, j).
    key: typed key of the search's draws.
    config: the search's hyper-parameters (validated here).
    unroll: unroll factor of the scan within one program (True = full); default full on CPU, 1 elsewhere.

  Returns:
    (N,) float32 sigma in [sigma_lo, sigma_hi].
  """
  config.validate()
  x = jnp.asarray(x, jnp.float32)
  target = jnp.asarray(target)
  indices = jnp.asarray(indices)
  _check_inputs(score_fn, params, x, target, indices)
  _check_key(key)
  start = config.sigma_hi if config.start_at_hi else config.sigma_0
  sigma = jnp.full((x.shape[0],), start, jnp.float32)  # (N,)
  per_call = _steps_per_call(config.num_steps)
  for first in range(0, config.num_steps, max(per_call, 1)):
    steps = min(per_call, config.num_steps - first)
    sigma = _search_steps_jit(score_fn, params, x, target, indices, key, sigma, jnp.int32(first), config=config,
                              num_steps=steps, unroll=_resolve_unroll(unroll, steps))
  return sigma


@backend.jit(static_argnums=(0,), static_argnames=("num_draws",))
def _smoothed_top_jit(score_fn: ScoreFn, params: Any, x: jax.Array, indices: jax.Array, key: jax.Array,
                      sigma: jax.Array, *, num_draws: int) -> jax.Array:
  """argmax of psi(sigma) per sample, from ``num_draws`` draws keyed by fold_in(key, j). x (N, ...) -> (N,)."""
  sample_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)

  def one(xi, k):
    return jnp.argmax(jnp.mean(_noised_probs(score_fn, params, xi, sigma, k, num_draws), axis=0))

  return jax.vmap(one)(x, sample_keys).astype(jnp.int32)


@backend.jit(static_argnums=(0,))
def _top_jit(score_fn: ScoreFn, params: Any, x: jax.Array) -> jax.Array:
  return jnp.argmax(score_fn(params, x), axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class Objective:
  """How class A, whose radius the search maximises, is chosen for each sample."""

  # (score_fn, params, x (B, ...), labels (B,) or None, indices (B,), key, config) -> (B,) int32 class A
  target: Callable[..., jax.Array]
  reads_labels: bool  # whether the given label can steer the search (a poisoned label can then steer it)


def _robust_prediction(score_fn, params, x, labels, indices, key, config):
  del labels
  return _smoothed_top_jit(score_fn, params, x, indices, key, jnp.float32(config.sigma_hi),
                           num_draws=config.target_draws)


def _prediction(score_fn, params, x, labels, indices, key, config):
  del labels, indices, key, config
  return _top_jit(score_fn, params, x)


def _label(score_fn, params, x, labels, indices, key, config):
  if labels is None:  # test inputs have no label: the scorer's class, as the paper does
    return _prediction(score_fn, params, x, labels, indices, key, config)
  return jnp.asarray(labels, jnp.int32)


OBJECTIVES: dict[str, Objective] = {
    "robust_prediction": Objective(_robust_prediction, reads_labels=False),  # smoothed class at sigma_hi
    "prediction": Objective(_prediction, reads_labels=False),  # the scorer's class on the noise-free input
    "label": Objective(_label, reads_labels=True),  # the given label (training samples), the paper's
}


# ---------------------------------------------------------------------------------------------- batch drivers


def _pad_rows(arr: Any, size: int) -> jax.Array:
  """Pads axis 0 to ``size`` by repeating the last row (valid inputs; their results are discarded)."""
  arr = jnp.asarray(arr)
  missing = size - arr.shape[0]
  if missing == 0:
    return arr
  return jnp.concatenate([arr, jnp.repeat(arr[-1:], missing, axis=0)], axis=0)


def _check_batch_size(batch_size: Any) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  return int(batch_size)


def search_sigma_batched(score_fn: ScoreFn, params: Any, x: Any, target: Any, indices: Any, key: jax.Array,
                         config: SearchConfig, batch_size: int, *, unroll: bool | int | None = None,
                         progress: Callable[[int], None] | None = None) -> np.ndarray:
  """``search_sigma`` over a whole data set in fixed-shape batches (host loop; one compile).

  The last batch is padded to ``batch_size`` by repeating its last sample, so every batch has the same shape.
  Results do not depend on ``batch_size`` (keys come from ``indices``).

  Args:
    score_fn, params, key, config, unroll: as in ``search_sigma``.
    x: (N, *input_shape) inputs, numpy or jax (sliced per batch, so a host array stays on the host).
    target: (N,) int class A per sample.
    indices: (N,) int global sample indices.
    batch_size: samples per compiled batch, >= 1 (not capped at N: every call of a run shares one shape).
    progress: optional callback(num_done) after each batch.

  Returns:
    (N,) float32 numpy array of sigma.
  """
  batch_size = _check_batch_size(batch_size)
  if len(target) != len(x) or len(indices) != len(x):
    raise ValueError(f"x, target and indices must have the same length, got {len(x)}, {len(target)}, "
                     f"{len(indices)}")
  return _per_batch(lambda xb, tb, ib: search_sigma(score_fn, params, xb, tb, ib, key, config, unroll=unroll),
                    (x, target, indices), batch_size, progress)


def find_sigmas(score_fn: ScoreFn, params: Any, x: Any, labels: Any | None, indices: Any, key: jax.Array,
                config: SearchConfig, objective: str, batch_size: int, *, unroll: bool | int | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Class A by the objective, then the search, for a whole data set in fixed-shape batches.

  Args:
    score_fn, params, config, unroll: as in ``search_sigma``.
    x: (N, *input_shape) inputs.
    labels: (N,) given labels (training samples), or None (test inputs).
    indices: (N,) int global sample indices.
    key: typed key; the objective's draws use ``fold_in(key, 0)``, the search's ``fold_in(key, 1)``.
    objective: a key of ``OBJECTIVES``.
    batch_size, progress: as in ``search_sigma_batched``.

  Returns:
    ((N,) float32 sigma, (N,) int32 class A).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
  batch_size = _check_batch_size(batch_size)
  config.validate()
  _check_key(key)
  pick = OBJECTIVES[objective].target
  key_target, key_steps = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
  have_labels = labels is not None
  arrays = (x, np.asarray(labels if have_labels else np.zeros(len(x)), np.int32), indices)

  def one(xb, lb, ib):
    target = pick(score_fn, params, xb, lb if have_labels else None, ib, key_target, config)
    return np.stack([np.asarray(search_sigma(score_fn, params, xb, target, ib, key_steps, config, unroll=unroll)),
                     np.asarray(target, np.float32)])

  out = _per_batch(one, arrays, batch_size, progress, axis=1)
  return out[0].astype(np.float32), out[1].astype(np.int32)


def _per_batch(fn: Callable[..., Any], arrays: tuple[Any, ...], batch_size: int,
               progress: Callable[[int], None] | None, axis: int = 0) -> np.ndarray:
  """fn over fixed-size batches of ``arrays`` (the last padded), results concatenated along ``axis``."""
  num = len(arrays[0])
  if num == 0:
    return np.zeros((2, 0) if axis else (0,), np.float32)
  out = []
  for start in range(0, num, batch_size):
    stop = min(start + batch_size, num)
    res = np.asarray(fn(*(_pad_rows(a[start:stop], batch_size) for a in arrays)))
    out.append(res[..., :stop - start] if axis else res[:stop - start])
    if progress is not None:
      progress(stop)
  return np.concatenate(out, axis=axis)
