"""The backend-specific compiler options (certssb_jax/backend.py) reach the compiled programs and keep results."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from certssb_jax import backend
from certssb_jax.ensemble import member
from certssb_jax.models import zoo as models

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are for XLA:CPU")


def _step_and_inputs():
  model, tx = models.MnistCNN(1), optax.adam(1e-3)
  state = member.init_member(model, tx, jax.random.key(0), (28, 28, 1))
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.rand(16, 28, 28, 1).astype(np.float32))
  y = jnp.asarray((rs.rand(16) > 0.5).astype(np.int32))
  return (lambda s, x, y: member.member_step(model, tx, s, x, y)), (state, x, y)


def _ynn_convolutions(compiled_text: str) -> int:
  """Convolutions inside YNNPACK fusions of an optimised HLO module."""
  bodies = re.findall(r"\n(%?[\w.]+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", compiled_text, re.S)
  ynn = {m for m in re.findall(r"calls=(%?[\w.]+), [^\n]*__ynn_fusion", compiled_text)}
  return sum(body.count(" convolution(") for name, body in bodies if name in ynn)


def test_cpu_options_take_every_convolution_away_from_ynnpack():
  if backend.compiler_options() is None:
    pytest.skip("this jaxlib does not know the option; XLA's defaults are used")
  step, args = _step_and_inputs()
  ours = backend.jit(step).lower(*args).compile().as_text()
  assert _ynn_convolutions(ours) == 0
  default = jax.jit(step).lower(*args).compile().as_text()
  if "__ynn_fusion" in default:  # this jaxlib hands convolutions to YNNPACK by default: the option changed that
    assert _ynn_convolutions(default) > 0


def test_the_options_do_not_change_the_step_beyond_rounding():
  step, args = _step_and_inputs()
  (a, loss_a), (b, loss_b) = backend.jit(step)(*args), jax.jit(step)(*args)
  assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
  for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-6)


def test_jit_works_as_a_decorator_with_static_arguments():
  @backend.jit(static_argnames=("power",))
  def f(x, *, power):
    """Raises x to a power."""
    return x ** power

  assert float(f(jnp.float32(3.0), power=2)) == 9.0
  assert f.__doc__ == "Raises x to a power." and f.__name__ == "f"
  assert f.lower(jnp.float32(3.0), power=3).compile() is not None  # attributes of the jitted function forward
