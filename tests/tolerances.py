"""Tolerances for the float32 results of two programs that compute the same function in different ways.

Two convolution formulations, other compiler options or another batching add the same terms in other orders, so
their float32 results differ by rounding, and by how much depends on the CPU or GPU (its vector width, how it
blocks a product). The tolerances here follow from float32's precision and the size of the computation, not from
the differences one machine shows, so a comparison holds on any x86-64 CPU or GPU and still fails when the two
programs compute different functions (an O(1) relative difference).
"""

from __future__ import annotations

import jax
import numpy as np

EPS = float(np.finfo(np.float32).eps)  # 2^-23
# The largest difference among many results is a few times the typical one that the bounds below estimate.
HEADROOM = 4


def rounding_tol(terms: int, depth: int = 1) -> float:
  """Relative difference of two float32 programs that add ``terms`` terms per sum in other orders, ``depth`` sums deep.

  One sum of k terms rounded in two orders differs by about eps * sqrt(k) of the scale of its terms (independent
  roundings add as a random walk). Sums in sequence each add theirs: batch norm (or the initialisation's scaling)
  keeps every layer's scale near 1, so the relative differences add rather than multiply.
  """
  return HEADROOM * depth * EPS * float(np.sqrt(terms))


def kink_tol(units: int, flips: int = 2) -> float:
  """Relative 2-norm difference of two gradients when ``flips`` of a layer's ``units`` units change sides of a kink.

  A unit whose input is within rounding of a kink (0 for a ReLU, a tie for a max) can land on either side of it
  in the two programs: its derivative differs by 1, and so does its share of the signal propagated back below it,
  about 1/sqrt(units) of that layer's signal in 2-norm (units terms of similar size and random sign). With a
  few 1e5 units per step such a flip is likely in any step, so it cannot be ignored; the smallest layer moves a
  gradient most, and two flips there bound what the comparisons in the tests meet.
  """
  return flips / float(np.sqrt(units))


def model_sizes(model, variables, x) -> tuple[int, int, int]:
  """(terms, depth, units) of a training step of ``model`` on the batch ``x``, for the tolerances above.

  terms: the most terms one sum of the step adds: a kernel's fan-in, or the B * H * W positions over which batch
  norm's statistics and a convolution kernel's gradient sum. depth: the kernels (convolutions and dense layers),
  the most sums one result can pass through. units: the fewest outputs of one layer over the batch (the head's
  excepted: no kink follows it), where a unit at a kink moves the gradient most.
  """
  kernels = [a for p, a in jax.tree_util.tree_flatten_with_path(variables["params"])[0] if p[-1].key == "kernel"]
  fan_in = max(int(np.prod(k.shape[:-1])) for k in kernels)
  _, inter = jax.eval_shape(lambda: model.apply(variables, x, train=False, capture_intermediates=True))
  outputs = [a for p, a in jax.tree_util.tree_flatten_with_path(inter["intermediates"])[0]
             if len(p) > 2 and "head" not in jax.tree_util.keystr(p)]  # (module, "__call__", 0): a layer, not the model
  return max(fan_in, int(np.prod(x.shape[:3]))), len(kernels), min(int(np.prod(a.shape)) for a in outputs)


def assert_close(actual, desired, tol: float, err_msg: str = "") -> None:
  """Elementwise |actual - desired| <= tol * (|desired| + max |desired|).

  Relative, with an absolute floor at the largest compared value: a result near 0 is a sum of terms the size of
  the other results, and its rounding scales with those terms, not with the result.
  """
  desired = np.asarray(desired)
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=tol, atol=tol * float(np.abs(desired).max(initial=0)),
                             err_msg=err_msg)


def assert_norm_close(actual, desired, tol: float, err_msg: str = "") -> None:
  """||actual - desired||_2 <= tol * ||desired||_2: for gradients, where one unit at a kink (``kink_tol``) moves a
  few elements by far more than rounding but the whole by little."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  diff, norm = float(np.linalg.norm(actual - desired)), float(np.linalg.norm(desired))
  assert diff <= tol * norm, f"{err_msg}: relative 2-norm difference {diff / max(norm, 1e-300):.3g} > {tol:.3g}"


def assert_adam_first_step_close(params_a, params_b, grads_a, grads_b, lr: float, adam_eps: float = 1e-8) -> float:
  """Parameters after one Adam step from the same parameters, each program's step taken with its own gradients.

  Adam's first step moves a parameter by lr * g / (|g| + adam_eps), lr * sign(g) where |g| >> adam_eps. Where the
  two gradients g, h have the same sign the steps differ by lr * adam_eps * |g - h| / ((|g| + adam_eps) (|h| +
  adam_eps)), next to nothing, plus float32 rounding of the step and of p + step; a gradient within rounding of 0
  can have the other sign in one program, and there the steps differ by up to 2 lr. Returns the fraction of
  parameters held to a bound below lr / 100, for the caller to check that the comparison was not vacuous.
  """
  held = total = 0
  for a, b, ga, gb in zip(*(jax.tree.leaves(t) for t in (params_a, params_b, grads_a, grads_b)), strict=True):
    a, b, ga, gb = (np.asarray(v, np.float64) for v in (a, b, ga, gb))
    bound = (lr * adam_eps * np.abs(ga - gb) / ((np.abs(ga) + adam_eps) * (np.abs(gb) + adam_eps))
             + HEADROOM * EPS * (np.abs(a) + lr))
    same, diff = np.sign(ga) == np.sign(gb), np.abs(b - a)
    assert (diff[same] <= bound[same]).all(), f"steps differ where the gradients agree in sign: {diff[same].max()}"
    assert diff.max() <= 2 * lr * (1 + HEADROOM * EPS) + HEADROOM * EPS * np.abs(a).max(), diff.max()
    held += int((same & (bound < lr / 100)).sum())
    total += a.size
  return held / total
