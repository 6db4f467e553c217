"""Backend-specific compiler settings: ``jit`` is ``jax.jit`` with the XLA options that make this package's
programs fast on the backend in use.

On XLA:CPU (jax 0.10.2), convolutions are by default handed to YNNPACK, whose weight-gradient convolution is
slow for the paper's small CNNs: in the MNIST CNN's training step at batch 64 the ``Conv_1`` weight gradient
alone took 1.9 of 5.1 ms (``jax.profiler`` trace, 2-core AMD EPYC). Restricting YNNPACK to dot products
(``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT``) lets XLA's own convolutions run instead: the
step takes 3.9-4.1 ms, the PreAct ResNet's step (batch 32) 108 instead of 118 ms and its inference (batch 256)
159 instead of 196 ms; the MNIST CNN's inference is unchanged (``BENCHMARKS.md``). Other backends get no
options. On a jaxlib that does not know the option, the probe compile fails and the defaults are used.

The option is passed per function (``jax.jit(..., compiler_options=...)``), not through ``XLA_FLAGS``, so it
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


@functools.lru_cache(maxsize=None)
def compiler_options() -> dict[str, str] | None:
  """The compiler options of this package's jitted programs on the default backend (None: XLA's defaults)."""
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda a: a + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(jnp.zeros(())).compile()
  except Exception:  # an XLA without this option: keep its defaults  # pylint: disable=broad-except
    return None
  return dict(CPU_COMPILER_OPTIONS)


class _LazyJit:
  """``jax.jit(fn, compiler_options=compiler_options(), **kwargs)``, built at the first call or attribute use."""

  def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any]):
    functools.update_wrapper(self, fn)
    self._fn, self._kwargs, self._jitted = fn, kwargs, None

  def _get(self) -> Any:
    if self._jitted is None:
      self._jitted = jax.jit(self._fn, compiler_options=compiler_options(), **self._kwargs)
    return self._jitted

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self._get()(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:  # lower, eval_shape, trace, _cache_size, ...
    if name.startswith("__") or name in ("_fn", "_kwargs", "_jitted"):  # not set yet (copy, pickle)
      raise AttributeError(name)
    return getattr(self._get(), name)


def jit(fn: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
  """``jax.jit`` with ``compiler_options()``; usable as ``@jit``, ``@jit(static_argnums=...)`` or ``jit(f, ...)``."""
  if fn is None:
    return functools.partial(jit, **kwargs)
  return _LazyJit(fn, kwargs)
