"""Backend-specific compiler settings: ``jit`` is ``jax.jit`` with the XLA options that make this package's
programs fast on the backend in use.

On XLA:CPU, convolutions are kept away from YNNPACK (``xla_cpu_experimental_ynn_fusion_type``), whose
weight-gradient convolution is slow for the paper's small CNNs, and programs that run once per chunk of models
(initialisation, batch orders) get LLVM's lighter optimisation (``jit(..., run_once=True)``): both measured in
docs/design.md and BENCHMARKS.md. Other backends get no options; a jaxlib that does not know an option keeps its
defaults (a probe compile decides).

The options are passed per function (``jax.jit(..., compiler_options=...)``), not through ``XLA_FLAGS``, so they
apply to this package's programs only and need nothing set before JAX starts. The backend is looked up lazily,
at a function's first call, so importing this package initialises no backend (``jax.distributed`` must be
initialised before that).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
CPU_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 1}


@functools.lru_cache(maxsize=None)
def compiler_options(run_once: bool = False) -> dict[str, Any] | None:
  """The compiler options of this package's jitted programs on the default backend (None: XLA's defaults)."""
  if jax.default_backend() != "cpu":
    return None
  options = dict(CPU_COMPILER_OPTIONS, **(CPU_RUN_ONCE_OPTIONS if run_once else {}))
  try:
    jax.jit(lambda a: a + 1, compiler_options=options).lower(jnp.zeros(())).compile()
  except Exception:  # an XLA without these options: keep its defaults  # pylint: disable=broad-except
    return None
  return options


class _LazyJit:
  """``jax.jit(fn, compiler_options=compiler_options(run_once), **kwargs)``, built at the first call or attribute
  use."""

  def __init__(self, fn: Callable[..., Any], run_once: bool, kwargs: dict[str, Any]):
    functools.update_wrapper(self, fn)
    self._fn, self._run_once, self._kwargs, self._jitted = fn, run_once, kwargs, None

  def _get(self) -> Any:
    if self._jitted is None:
      self._jitted = jax.jit(self._fn, compiler_options=compiler_options(self._run_once), **self._kwargs)
    return self._jitted

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self._get()(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:  # lower, eval_shape, trace, _cache_size, ...
    if name.startswith("__") or name in ("_fn", "_run_once", "_kwargs", "_jitted"):  # not set yet (copy, pickle)
      raise AttributeError(name)
    return getattr(self._get(), name)


def jit(fn: Callable[..., Any] | None = None, *, run_once: bool = False, **kwargs: Any) -> Any:
  """``jax.jit`` with ``compiler_options(run_once)``; usable as ``@jit``, ``@jit(static_argnums=...)`` or
  ``jit(f, ...)``. ``run_once``: a program that runs once per chunk, where compile time matters more."""
  if fn is None:
    return functools.partial(jit, run_once=run_once, **kwargs)
  return _LazyJit(fn, run_once, kwargs)
