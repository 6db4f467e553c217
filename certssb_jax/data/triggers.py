"""Backdoor triggers and deterministic poisoning (docs/method.md sections 1 and 7).

Triggers are written once for any image size and channel count. Every trigger has l2 norm ``delta`` before
clipping: a pixel trigger puts ``delta / sqrt(P * C)`` on each of its P pixels in every one of the C channels,
and pixel triggers are clipped at 1 (so the effective norm can be smaller; ``apply_trigger`` returns it).
The pixel positions are the paper's for 28x28, 32x32 and 224x224 inputs; other sizes use the image centre.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np

from certssb_jax import rng

# The paper's triggers have l2 norm delta; "badnets" (a checkerboard patch that replaces the bottom-right corner)
# and "alpha_blend" ((1 - a) x + a P with a fixed random image P) are for empirical robustness (ERA / ASR):
# their norm depends on the image and is reported per image. "none" leaves the image as it is: a relabel-only
# (label-flip) attack, which no feature-perturbation certificate covers.
NORM_DELTA_TRIGGERS = ("onepixel", "fourpixel", "blending")

# (row, col) of the one-pixel trigger, and the centre (row = col = c) of the four-pixel trigger
# (c-1, c+1), (c, c), (c+1, c-1), (c+1, c+1), by image height (docs/method.md section 7).
_ONE_PIXEL = {28: (23, 23), 32: (15, 15), 224: (112, 112)}
_FOUR_PIXEL_CENTRE = {28: 19, 32: 15, 224: 112}
BLEND_SEED = 20250430  # the fixed seed of the blending pattern


def trigger_pixels(name: str, height: int, width: int) -> list[tuple[int, int]]:
  """The (row, col) pixels a pixel trigger touches for an image of this size."""
  known = height == width and height in _ONE_PIXEL
  if name == "onepixel":
    return [_ONE_PIXEL[height] if known else (height // 2, width // 2)]
  if name == "fourpixel":
    r, c = (_FOUR_PIXEL_CENTRE[height],) * 2 if known else (height // 2, width // 2)
    return [(r - 1, c + 1), (r, c), (r + 1, c - 1), (r + 1, c + 1)]
  raise ValueError(f"{name!r} is not a pixel trigger; pixel triggers: onepixel, fourpixel")


def trigger_pattern(name: str, input_shape: tuple[int, int, int], delta: float) -> np.ndarray:
  """The additive pattern of a trigger, shape ``input_shape`` (H, W, C), with l2 norm ``delta``.

  Args:
    name: one of ``TRIGGERS``.
    input_shape: (H, W, C) of one image.
    delta: the trigger's l2 norm (before any clipping of the triggered image).

  Returns:
    float32 array (H, W, C).
  """
  if name not in NORM_DELTA_TRIGGERS:
    raise ValueError(f"unknown trigger {name!r} for a pattern of norm delta; known: {', '.join(NORM_DELTA_TRIGGERS)}")
  if not (delta > 0 and math.isfinite(delta)):
    raise ValueError(f"trigger norm delta must be a finite number > 0, got {delta}")
  h, w, c = input_shape
  pattern = np.zeros(input_shape, np.float32)
  if name == "blending":
    key = rng.stream(BLEND_SEED, rng.TRIGGER)
    z = np.asarray(jax.random.normal(key, input_shape, dtype=np.float32), np.float64)
    return (z * (delta / np.linalg.norm(z))).astype(np.float32)
  pixels = trigger_pixels(name, h, w)
  value = delta / math.sqrt(len(pixels) * c)
  for r, col in pixels:
    pattern[r, col, :] = value
  return pattern


def badnets_patch(input_shape: tuple[int, int, int]) -> tuple[slice, slice, np.ndarray]:
  """The BadNets-style patch: a black-and-white checkerboard of p x p pixels, p = max(3, round(3 H / 32)), one
  pixel from the bottom-right corner. Returns (row slice, col slice, patch (p, p, C))."""
  h, w, c = input_shape
  p = max(3, round(3 * h / 32))
  rows, cols = np.indices((p, p))
  cell = max(1, p // 3)
  board = ((rows // cell + cols // cell) % 2 == 0).astype(np.float32)
  return slice(h - 1 - p, h - 1), slice(w - 1 - p, w - 1), np.repeat(board[:, :, None], c, axis=2)


def blend_image(input_shape: tuple[int, int, int]) -> np.ndarray:
  """The fixed random image P of the alpha-blend trigger: uniform [0, 1] from the fixed BLEND_SEED."""
  key = jax.random.fold_in(rng.stream(BLEND_SEED, rng.TRIGGER), 1)
  return np.asarray(jax.random.uniform(key, input_shape, dtype=np.float32))


def _pattern_trigger(name: str) -> Callable[[np.ndarray, float, float], np.ndarray]:
  def apply(x, delta, blend_alpha):
    del blend_alpha
    out = x + trigger_pattern(name, x.shape[1:], delta)
    return out if name == "blending" else np.minimum(out, 1.0)  # pixel triggers are clipped at 1

  return apply


def _badnets(x, delta, blend_alpha):
  del delta, blend_alpha
  rows, cols, patch = badnets_patch(x.shape[1:])
  out = x.copy()
  out[:, rows, cols, :] = patch
  return out


def _alpha_blend(x, delta, blend_alpha):
  del delta
  if not 0 < blend_alpha <= 1:
    raise ValueError(f"blend_alpha must be in (0, 1], got {blend_alpha}")
  return (1 - blend_alpha) * x + blend_alpha * blend_image(x.shape[1:])


# name -> (x (N, H, W, C), delta, blend_alpha) -> triggered x. Adding a trigger is one entry here.
TRIGGERS: dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {
    **{name: _pattern_trigger(name) for name in NORM_DELTA_TRIGGERS},
    "badnets": _badnets,
    "alpha_blend": _alpha_blend,
    "none": lambda x, delta, blend_alpha: x.copy(),
}


def apply_trigger(x: np.ndarray, name: str, delta: float, blend_alpha: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
  """Adds a trigger to a batch of images.

  Pixel triggers are clipped at 1 (docs/method.md section 7); the blending trigger is added without clipping.
  The BadNets patch replaces its pixels; the alpha blend mixes in a fixed image with weight ``blend_alpha``.

  Args:
    x: (N, H, W, C) images in [0, 1].
    name: a key of ``TRIGGERS``.
    delta: trigger l2 norm (paper triggers only).
    blend_alpha: weight of the fixed image of the ``alpha_blend`` trigger, in (0, 1].

  Returns:
    (triggered images (N, H, W, C) float32, effective l2 norm of each image's change (N,) float64).
  """
  if name not in TRIGGERS:
    raise ValueError(f"unknown trigger {name!r}; known: {', '.join(TRIGGERS)}")
  x = np.asarray(x, np.float32)
  out = np.asarray(TRIGGERS[name](x, delta, blend_alpha), np.float32)
  norms = np.sqrt(((out.astype(np.float64) - x) ** 2).reshape(len(x), -1).sum(axis=1))
  return out, norms


def poison_count(y: np.ndarray, poison_rate: float, target_class: int, base: str = "all") -> int:
  """How many training samples the attacker poisons: ``round(poison_rate * n)`` with n the whole training set
  (``base="all"``, the paper's reading: 253 of MNIST's 12,665 0/1 images) or its non-target samples
  (``base="non_target"``)."""
  if not 0.0 <= poison_rate <= 1.0:
    raise ValueError(f"poison_rate must be in [0, 1], got {poison_rate}")
  y = np.asarray(y)
  candidates = int(np.sum(y != target_class))
  n = {"all": len(y), "non_target": candidates}.get(base)
  if n is None:
    raise ValueError(f"poison base must be 'all' or 'non_target', got {base!r}")
  count = int(round(poison_rate * n))
  if poison_rate > 0 and count == 0:
    raise ValueError(f"poison_rate {poison_rate} selects no sample out of {n}; use a rate >= {0.5 / max(n, 1):.4g} "
                     "or 0 for a clean run")
  if count > candidates:
    raise ValueError(f"poison_rate {poison_rate} asks for {count} poisoned samples but only {candidates} are not "
                     "of the target class")
  return count


def choose_poison_indices(y: np.ndarray, poison_rate: float, target_class: int, seed: int, *, base: str = "all",
                          scores: np.ndarray | None = None) -> np.ndarray:
  """Picks the poisoned training indices among the non-target samples (``poison_count`` of them).

  Without ``scores`` the choice is a uniform draw without replacement from the POISON stream (it depends on the
  seed and the labels only). With ``scores`` (n,) the attacker takes the non-target samples with the LOWEST
  scores (an adaptive attacker: e.g. a surrogate model's confidence in the true class), ties by index.

  Returns:
    sorted int64 indices into the training set.
  """
  count = poison_count(y, poison_rate, target_class, base)
  candidates = np.flatnonzero(np.asarray(y) != target_class)
  if count == 0:
    return np.zeros((0,), np.int64)
  if scores is not None:
    order = np.argsort(np.asarray(scores)[candidates], kind="stable")
  else:
    order = np.asarray(jax.random.permutation(rng.stream(seed, rng.POISON), len(candidates)))
  return np.sort(candidates[order[:count]]).astype(np.int64)


def poison_training_set(x: np.ndarray, y: np.ndarray, indices: np.ndarray, trigger: str, delta: float,
                        target_class: int, blend_alpha: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Adds the trigger to ``x[indices]`` and relabels them to ``target_class``.

  Returns:
    (poisoned x (n, H, W, C), poisoned y (n,), trigger norms of the poisoned samples (len(indices),)).
  """
  x = np.array(x, np.float32, copy=True)
  y = np.array(y, np.int32, copy=True)
  norms = np.zeros((0,), np.float64)
  if len(indices):
    x[indices], norms = apply_trigger(x[indices], trigger, delta, blend_alpha)
    y[indices] = target_class
  return x, y, norms
