"""Backend-specific compiler settings: ``jit`` is ``jax.jit`` with the XLA options that make this package's
programs fast on the backend in use.

On XLA:CPU (jax 0.10.2), convolutions are by default handed to YNNPACK, whose weight-gradient convolution is
slow for the paper's small CNNs: in the MNIST CNN's training step at batch 64 the ``Conv_1`` weight gradient
alone took 1.9 of 5.1 ms (``jax.profiler`` trace, 2-core AMD EPYC). Restricting YNNPACK to dot products
(``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT``) lets XLA's own convolutions run instead: the
step takes 3.9-4.1 ms, the PreAct ResNet's step (batch 32) 108 instead of 118 ms and its inference (batch 256)
159 instead of 196 ms; the MNIST CNN's inference is unchanged (``BENCHMARKS.md``). Other backends get no
options. On a jaxlib that does not know the option, the probe compile fails and the defaults are used.

Programs that run once per chunk of models (initialisation, batch orders) are compiled with LLVM's lighter
optimisation (``xla_backend_optimization_level=1``, ``jit(..., run_once=True)``): the MNIST CNN's init compiles
in 0.38 instead of 0.67 s and runs in ~2 instead of ~1.5 ms, once per chunk.

The options are passed per function (``jax.jit(..., compiler_options=...)``), not through ``XLA_FLAGS``, so it
applies to this package's programs only and needs nothing set before JAX starts. The backend is looked up
lazily, at a function's first call, so importing this package initialises no backend (``jax.distributed``
must be initialised before that).
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
