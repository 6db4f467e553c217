"""The backend-specific compiler options (certssb_jax/backend.py) reach the compiled programs and keep results."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances  # pylint: disable=g-bad-import-order

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
  """One Adam step under our options and XLA's defaults: other convolution kernels, the same step up to the
  rounding of sums added in other orders (tolerances from their sizes: tests/tolerances.py)."""
  step, (state, x, y) = _step_and_inputs()
  (a, loss_a), (b, loss_b) = backend.jit(step)(state, x, y), jax.jit(step)(state, x, y)
  model = models.MnistCNN(1)
  terms, depth, units = tolerances.model_sizes(model, member.variables_of(state.params, state.batch_stats), x)
  tolerances.assert_close(loss_a, loss_b, tolerances.rounding_tol(terms, depth))
  # Adam's moments after one step: mu = 0.1 g and sqrt(nu) = sqrt(0.001) |g|, g as deep again and moved by a
  # unit at a ReLU's kink (tolerances.kink_tol); the parameters moved by lr * sign(g)
  backward = tolerances.rounding_tol(terms, 2 * depth) + tolerances.kink_tol(units)
  adam_a, adam_b = a.opt_state[0], b.opt_state[0]
  assert int(adam_a.count) == int(adam_b.count) == 1
  for (path, mu_a), mu_b, nu_a, nu_b in zip(jax.tree_util.tree_flatten_with_path(adam_a.mu)[0],
                                            *(jax.tree.leaves(t) for t in (adam_b.mu, adam_a.nu, adam_b.nu))):
    tolerances.assert_norm_close(mu_a, mu_b, backward, f"first moment {jax.tree_util.keystr(path)}")
    tolerances.assert_norm_close(np.sqrt(nu_a), np.sqrt(nu_b), backward, f"second moment {jax.tree_util.keystr(path)}")
  grads = [jax.tree.map(lambda m: 10 * m, adam.mu) for adam in (adam_a, adam_b)]
  held = tolerances.assert_adam_first_step_close(a.params, b.params, *grads, 1e-3)
  assert held > 0.9


def test_jit_works_as_a_decorator_with_static_arguments():
  @backend.jit(static_argnames=("power",))
  def f(x, *, power):
    """Raises x to a power."""
    return x ** power

  assert float(f(jnp.float32(3.0), power=2)) == 9.0
  assert f.__doc__ == "Raises x to a power." and f.__name__ == "f"
  assert f.lower(jnp.float32(3.0), power=3).compile() is not None  # attributes of the jitted function forward
