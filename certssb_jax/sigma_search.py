"""Sample-specific noise levels by stochastic gradient ascent on the certified radius (METHOD.md section 4).

For one input x, a scorer F (class probabilities) and S Gaussian draws z_1..z_S, Cert-SSB picks the noise level
sigma that maximises the sample's certified radius

    psi(sigma) = mean_s F(x + sigma z_s)                                             # (K,)
    r(sigma)   = sigma / 2 * (Phi^-1(clip(psi_A)) - Phi^-1(clip(psi_B)))   clip to [kappa, 1 - kappa]
    sigma     <- clip(sigma + lr * dr/dsigma, sigma_lo, sigma_hi)          T times, from sigma_0

with A the label (training samples) or the predicted class (test samples) and B the strongest other class
under psi at the current sigma. The draws are reparameterised, so dr/dsigma flows through F; the choice of B is
not differentiated (it is an argmax), its value is. The clip keeps Phi^-1 finite: once psi_A >= 1 - kappa and
psi_B <= kappa, r = sigma * Phi^-1(1 - kappa) and the ascent simply grows sigma (a confidently classified sample
can afford more noise).

The whole batch is one jitted program: ``vmap`` over samples of ``grad`` w.r.t. the sample's scalar sigma, the
T steps in a ``lax.scan``. Randomness: the key of sample j is ``fold_in(key, j)`` with j its GLOBAL index, and
step t draws ``normal(fold_in(key_j, t), (S, *input_shape))`` (float32), so a sample's sigma does not depend on
how samples are batched or padded. ``key`` is the SIGMA_SEARCH stream of ``rng`` (the caller folds in train or
test).

``method = "paper"`` reproduces the reference code's rule instead (see ``_paper_step``); it is kept only for
comparison.

XLA:CPU note: convolutions inside a while loop (a rolled ``lax.scan``) run ~14x slower than the same ops
unrolled (measured, jax 0.10.2), so the scan is fully unrolled by default on CPU and rolled elsewhere. The
price is compile time, which grows faster than linearly in T when unrolled (MNIST CNN, 32 samples, S = 8,
2 cores: T = 20 compiles in ~10 s and runs in 0.55 s, against ~1 s and 2.5 s rolled); for large T pass
``unroll=k`` or ``unroll=1``. Scorers without convolutions or matmuls (toy scorers in tests) are worse: XLA
fuses straight across the unrolled steps and compile time grows ~T^2 (~40 s at T = 20), so pass ``unroll=1``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from certssb_jax import backend

ScoreFn = Callable[[Any, jax.Array], jax.Array]  # (params, xb (B, *input_shape)) -> probs (B, K)

METHODS = ("reparam", "paper")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Hyper-parameters of the sigma search (METHOD.md section 4). Frozen, hence hashable: a jit static arg.

  Attributes:
    sigma_0: base noise level; every search starts there (and ``sigma_mode = "fixed"`` stops there).
    sigma_lo: lower bound on sigma, > 0; sigma is clipped to [sigma_lo, sigma_hi] after every step.
    sigma_hi: upper bound on sigma.
    num_steps: T, the number of ascent steps (0 returns sigma_0 for every sample).
    num_draws: S, Gaussian draws per step that estimate psi (and its gradient).
    lr: step size of the ascent, in sigma units per unit of dr/dsigma. Default 0.05 for "reparam": in the
      saturated regime (psi_A >= 1 - kappa, psi_B <= kappa) dr/dsigma = Phi^-1(1 - kappa) = 2.05 at
      kappa = 0.02, so a confident sample moves by ~0.1 per step and T = 20 steps can cross ~2 sigma units,
      which spans [sigma_0 / 2, 2 sigma_0] for every base level of the paper (0.12 to 1.0); near an interior maximum
      the ascent contracts by 1 - lr |r''| per step, stable for |r''| < 40, i.e. for psi curves that change
      on sigma scales above ~0.1 (r'' ~ 4 / scale). The "paper" rule uses 1e-4 (``SearchConfig.paper``).
    kappa: psi is clipped to [kappa, 1 - kappa] before Phi^-1, in (0, 0.5).
    method: "reparam" (the rule above) or "paper" (the reference code's rule, for comparison).
  """

  sigma_0: float
  sigma_lo: float
  sigma_hi: float
  num_steps: int = 20
  num_draws: int = 8
  lr: float = 0.05
  kappa: float = 0.02
  method: str = "reparam"

  @classmethod
  def reparam(cls, sigma_0: float, sigma_lo: float, sigma_hi: float, **kwargs: Any) -> SearchConfig:
    """The default rule of METHOD.md section 4 with its defaults (T = 20, S = 8, lr = 0.05, kappa = 0.02)."""
    return cls(sigma_0=sigma_0, sigma_lo=sigma_lo, sigma_hi=sigma_hi, method="reparam", **kwargs)

  @classmethod
  def paper(cls, sigma_0: float, sigma_lo: float, sigma_hi: float, **kwargs: Any) -> SearchConfig:
    """The reference code's rule with its defaults: one draw, lr = 1e-4, kappa = 0.02 (T = 20 unless given)."""
    kwargs = {"num_draws": 1, "lr": 1e-4, "kappa": 0.02, **kwargs}
    return cls(sigma_0=sigma_0, sigma_lo=sigma_lo, sigma_hi=sigma_hi, method="paper", **kwargs)

  def validate(self) -> SearchConfig:
    """Raises ValueError naming the first bad field; returns self so calls can chain."""
    for name in ("sigma_0", "sigma_lo", "sigma_hi", "lr", "kappa"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise ValueError(f"SearchConfig.{name} must be a finite number, got {value!r}")
    for name in ("num_steps", "num_draws"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"SearchConfig.{name} must be an int, got {value!r}")
    if self.sigma_lo <= 0:
      raise ValueError(f"SearchConfig.sigma_lo must be > 0, got {self.sigma_lo}")
    if self.sigma_hi < self.sigma_lo:
      raise ValueError(f"SearchConfig.sigma_hi ({self.sigma_hi}) must be >= sigma_lo ({self.sigma_lo})")
    if not self.sigma_lo <= self.sigma_0 <= self.sigma_hi:
      raise ValueError(
          f"SearchConfig.sigma_0 ({self.sigma_0}) must lie in [sigma_lo, sigma_hi] = "
          f"[{self.sigma_lo}, {self.sigma_hi}]")
    if self.num_steps < 0:
      raise ValueError(f"SearchConfig.num_steps (T) must be >= 0, got {self.num_steps}")
    if self.num_draws < 1:
      raise ValueError(f"SearchConfig.num_draws (S) must be >= 1, got {self.num_draws}")
    if self.lr <= 0:
      raise ValueError(f"SearchConfig.lr must be > 0, got {self.lr}")
    if not 0 < self.kappa < 0.5:
      raise ValueError(f"SearchConfig.kappa must lie in (0, 0.5), got {self.kappa}")
    if self.method not in METHODS:
      raise ValueError(f"SearchConfig.method must be one of {METHODS}, got {self.method!r}")
    return self


def binary_probs(logit: jax.Array) -> jax.Array:
  """Class probabilities [1 - p, p], p = sigmoid(logit), of a one-logit binary model. (...,) -> (..., 2).

  Nothing is squeezed: pass a model's raw (B, 1) output as ``logits[:, 0]`` (a (B, 1) input would give
  (B, 1, 2), which ``search_sigma`` rejects).
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

  Same values as ``jax.scipy.special.ndtri`` to 6e-7 on [0.02, 0.98] in float32 (checked against scipy in the
  tests), but one XLA op: ndtri's piecewise rational approximation makes XLA:CPU compile times grow
  super-linearly with the number of unrolled steps (measured, jax 0.10.2: 16 chained ndtri-gradient steps
  8.4 s to compile against 0.17 s with erfinv; 60 unrolled search steps over 600 s). Away from the clip range
  (p near 0) erfinv(2 p - 1) loses precision, which is why psi is clipped first.
  """
  return jnp.sqrt(2.0).astype(p.dtype) * jax.lax.erf_inv(2.0 * p - 1.0)


def _noised_probs(score_fn: ScoreFn, params: Any, x: jax.Array, sigma: jax.Array, key_t: jax.Array,
                  num_draws: int) -> jax.Array:
  """Scores of S noised copies of ONE sample: F(x + sigma z_s). x (*input_shape) -> (S, K)."""
  z = jax.random.normal(key_t, (num_draws, *x.shape), jnp.float32)  # (S, *input_shape)
  probs = score_fn(params, x[None] + sigma * z)  # (S, K)
  return probs.astype(jnp.float32)


def _margin_terms(psi: jax.Array, target: jax.Array, kappa: float) -> jax.Array:
  """Phi^-1(clip(psi_A)) - Phi^-1(clip(psi_B)), B the strongest other class (not differentiated). psi (K,)."""
  b = runner_up(jax.lax.stop_gradient(psi), target)
  clipped = jnp.clip(psi, kappa, 1.0 - kappa)  # (K,)
  return probit(clipped[target]) - probit(clipped[b])


def radius_objective(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, sigma: jax.Array,
                     key_t: jax.Array, num_draws: int, kappa: float) -> jax.Array:
  """The Monte-Carlo radius r(sigma) of ONE sample (METHOD.md section 4), differentiable in sigma.

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


def _paper_step(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, sigma: jax.Array,
                key_t: jax.Array, config: SearchConfig) -> jax.Array:
  """The reference code's update for ONE sample (before clipping); kept for comparison only.

  The reference (``get_sigma`` in NcepuQiaoTing/Cert-SSB) evaluates the model on x + sigma z with one draw,
  DETACHES the output, forms |gap| = |Phi^-1(clip(p_A)) - Phi^-1(clip(p_B))| (binary: p_B = 1 - p_A) and
  differentiates relu(sigma / 2 * |gap|) w.r.t. sigma, which is just |gap| / 2. Each step therefore adds
  lr * |gap| / 2 >= 0: sigma never decreases and the model's sensitivity to the noise level never enters.
  Here psi averages ``num_draws`` draws (1 in ``SearchConfig.paper``, which is the reference exactly), B is
  the strongest class other than A (the other class when K = 2), and sigma is then clipped to
  [sigma_lo, sigma_hi] like the reparam rule (the reference does not clip; with lr = 1e-4 it barely moves).
  """
  probs = jax.lax.stop_gradient(_noised_probs(score_fn, params, x, sigma, key_t, config.num_draws))  # (S, K)
  psi = jnp.mean(probs, axis=0)  # (K,)
  gap = jnp.abs(_margin_terms(psi, target, config.kappa))
  return sigma + config.lr * 0.5 * gap


def _resolve_unroll(unroll: bool | int | None, num_steps: int) -> int:
  """The scan's unroll factor: full on CPU by default (see the module docstring), 1 elsewhere."""
  if unroll is None:
    unroll = jax.default_backend() == "cpu"
  if isinstance(unroll, bool):
    return max(num_steps, 1) if unroll else 1
  if isinstance(unroll, (int, np.integer)) and unroll >= 1:
    return int(unroll)
  raise ValueError(f"unroll must be a bool or an int >= 1, got {unroll!r}")


@backend.jit(static_argnums=(0,), static_argnames=("config", "unroll"))
def _search_sigma_jit(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, indices: jax.Array,
                      key: jax.Array, *, config: SearchConfig, unroll: int) -> jax.Array:
  """The whole search for one batch as one program. x (N, *input_shape), target (N,), indices (N,) -> (N,)."""
  num_samples = x.shape[0]
  sample_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)  # (N,) keys
  step_fn = {"reparam": _reparam_step, "paper": _paper_step}[config.method]
  batched_step = jax.vmap(step_fn, in_axes=(None, None, 0, 0, 0, 0, None))

  def body(sigma: jax.Array, t: jax.Array) -> tuple[jax.Array, None]:
    keys_t = jax.vmap(jax.random.fold_in, in_axes=(0, None))(sample_keys, t)  # (N,) keys
    sigma = batched_step(score_fn, params, x, target, sigma, keys_t, config)  # (N,)
    return jnp.clip(sigma, config.sigma_lo, config.sigma_hi), None

  sigma_init = jnp.full((num_samples,), config.sigma_0, jnp.float32)  # (N,)
  if config.num_steps == 0:
    return sigma_init
  sigma, _ = jax.lax.scan(body, sigma_init, jnp.arange(config.num_steps), unroll=unroll)
  return sigma


def _check_inputs(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, indices: jax.Array) -> None:
  """Shape, dtype and (when concrete) value checks, with messages that name the problem."""
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
  probs = jax.eval_shape(score_fn, params, jax.ShapeDtypeStruct((1, *x.shape[1:]), jnp.float32))
  if len(probs.shape) != 2 or probs.shape[0] != 1 or probs.shape[1] < 2:
    raise ValueError(
        f"score_fn must map a batch (B, *input_shape) to probabilities (B, K) with K >= 2, got {probs.shape} "
        "for B = 1 (wrap a one-logit model with binary_probs)")
  num_classes = probs.shape[1]
  if not isinstance(target, jax.core.Tracer):
    target_np = np.asarray(target)
    if target_np.min() < 0 or target_np.max() >= num_classes:
      raise ValueError(f"target must lie in [0, K) = [0, {num_classes}), got range "
                       f"[{target_np.min()}, {target_np.max()}]")
  if not isinstance(indices, jax.core.Tracer) and np.asarray(indices).min() < 0:
    raise ValueError("indices must be >= 0 (global sample indices)")


def search_sigma(score_fn: ScoreFn, params: Any, x: jax.Array, target: jax.Array, indices: jax.Array,
                 key: jax.Array, config: SearchConfig, *, unroll: bool | int | None = None) -> jax.Array:
  """Sample-specific sigma of every sample of a batch by T steps of gradient ascent (METHOD.md section 4).

  Compiles once per (score_fn, config, unroll, batch shape); keep ``score_fn`` the same Python object across
  calls (not a fresh lambda) to hit the cache.

  Args:
    score_fn: (params, xb (B, *input_shape)) -> class probabilities (B, K), K >= 2; per-sample (no batch
      coupling such as train-mode batch norm). Wrap a one-logit model with ``binary_probs``; for an ensemble
      pass stacked params and a score_fn that averages the members' probabilities.
    params: the scorer's parameters (any pytree).
    x: (N, *input_shape) inputs on the [0, 1] pixel scale.
    target: (N,) int, class A: the label for training samples, the predicted class for test samples.
    indices: (N,) int, the samples' global indices; sample j's draws come from fold_in(key, j).
    key: typed key of the SIGMA_SEARCH stream (train or test folded in by the caller).
    config: the search's hyper-parameters (validated here).
    unroll: unroll factor of the scan over steps (True = full); default full on CPU, 1 elsewhere.

  Returns:
    (N,) float32 sigma in [sigma_lo, sigma_hi].
  """
  config.validate()
  x = jnp.asarray(x, jnp.float32)
  target = jnp.asarray(target)
  indices = jnp.asarray(indices)
  _check_inputs(score_fn, params, x, target, indices)
  if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
    raise ValueError("key must be a typed key from jax.random.key (see certssb_jax.rng)")
  return _search_sigma_jit(score_fn, params, x, target, indices, key, config=config,
                           unroll=_resolve_unroll(unroll, config.num_steps))


def _pad_rows(arr: Any, size: int) -> jax.Array:
  """Pads axis 0 to ``size`` by repeating the last row (valid inputs; their results are discarded)."""
  arr = jnp.asarray(arr)
  missing = size - arr.shape[0]
  if missing == 0:
    return arr
  return jnp.concatenate([arr, jnp.repeat(arr[-1:], missing, axis=0)], axis=0)


def search_sigma_batched(score_fn: ScoreFn, params: Any, x: Any, target: Any, indices: Any, key: jax.Array,
                         config: SearchConfig, batch_size: int, *, unroll: bool | int | None = None,
                         progress: Callable[[int], None] | None = None) -> np.ndarray:
  """``search_sigma`` over a whole data set in fixed-shape batches (host loop; one compile).

  The last batch is padded to ``batch_size`` by repeating its last sample, so every batch has the same shape
  and the jitted search is traced once. Results do not depend on ``batch_size`` (keys come from ``indices``).

  Args:
    score_fn, params, key, config, unroll: as in ``search_sigma``.
    x: (N, *input_shape) inputs, numpy or jax (sliced per batch, so a host array stays on the host).
    target: (N,) int class A per sample.
    indices: (N,) int global sample indices.
    batch_size: samples per compiled batch, >= 1 (capped at N).
    progress: optional callback(num_done) after each batch, e.g. a CLI progress bar.

  Returns:
    (N,) float32 numpy array of sigma.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  num_samples = len(x)
  if len(target) != num_samples or len(indices) != num_samples:
    raise ValueError(f"x, target and indices must have the same length, got {num_samples}, {len(target)}, "
                     f"{len(indices)}")
  if num_samples == 0:
    return np.zeros((0,), np.float32)
  batch_size = int(batch_size)  # not capped at N: every call of a run shares one compiled shape
  out = []
  for start in range(0, num_samples, batch_size):
    stop = min(start + batch_size, num_samples)
    sigma = search_sigma(score_fn, params, _pad_rows(x[start:stop], batch_size),
                         _pad_rows(target[start:stop], batch_size), _pad_rows(indices[start:stop], batch_size),
                         key, config, unroll=unroll)  # (batch_size,)
    out.append(np.asarray(sigma)[:stop - start])
    logging.debug("sigma search: %d / %d samples", stop, num_samples)
    if progress is not None:
      progress(stop)
  return np.concatenate(out)
