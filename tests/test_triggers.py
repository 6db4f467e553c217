"""Triggers put the documented values at the documented pixels (docs/method.md section 7); poisoning is deterministic."""

import math

import numpy as np
import pytest

from certssb_jax.data import triggers

DOCUMENTED = [
    # (trigger, input shape, pixels, value per channel)
    ("onepixel", (28, 28, 1), [(23, 23)], 1.0),
    ("onepixel", (32, 32, 3), [(15, 15)], 1 / math.sqrt(3)),
    ("onepixel", (224, 224, 3), [(112, 112)], 1 / math.sqrt(3)),
    ("fourpixel", (28, 28, 1), [(18, 20), (19, 19), (20, 18), (20, 20)], 0.5),
    ("fourpixel", (32, 32, 3), [(14, 16), (15, 15), (16, 14), (16, 16)], 1 / math.sqrt(12)),
    ("fourpixel", (224, 224, 3), [(112, 112), (111, 113), (113, 111), (113, 113)], 1 / math.sqrt(12)),
]


@pytest.mark.parametrize("name,shape,pixels,value", DOCUMENTED)
def test_pixel_triggers_match_the_paper(name, shape, pixels, value):
  x = np.zeros((2, *shape), np.float32)
  out, norms = triggers.apply_trigger(x, name, 1.0)
  expected = np.zeros(shape, np.float32)
  for r, c in pixels:
    expected[r, c, :] = value
  np.testing.assert_allclose(out[0], expected, rtol=1e-6)
  np.testing.assert_allclose(out[1], expected, rtol=1e-6)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-6)


def test_pixel_triggers_clip_at_one_and_report_the_effective_norm():
  x = np.full((1, 28, 28, 1), 0.75, np.float32)
  out, norms = triggers.apply_trigger(x, "onepixel", 1.0)
  assert out[0, 23, 23, 0] == 1.0
  assert out.max() == 1.0
  np.testing.assert_allclose(norms, [0.25], rtol=1e-6)


def test_blending_is_fixed_unclipped_and_has_norm_delta():
  x = np.full((3, 32, 32, 3), 0.5, np.float32)
  out1, norms = triggers.apply_trigger(x, "blending", 2.0)
  out2, _ = triggers.apply_trigger(x, "blending", 2.0)
  np.testing.assert_array_equal(out1, out2)
  np.testing.assert_allclose(norms, 2.0, rtol=1e-5)
  diff = out1[0] - x[0]
  assert np.all(diff == out1[1] - x[1])  # the same pattern on every image
  assert (out1 > 1).any() or (out1 < 0).any() or np.abs(diff).max() < 0.5  # no clipping applied
  np.testing.assert_allclose(np.linalg.norm(diff), 2.0, rtol=1e-5)


def test_bad_trigger_arguments():
  with pytest.raises(ValueError, match="unknown trigger 'star'"):
    triggers.apply_trigger(np.zeros((1, 28, 28, 1)), "star", 1.0)
  with pytest.raises(ValueError, match="delta"):
    triggers.trigger_pattern("onepixel", (28, 28, 1), 0.0)


def test_poison_indices_are_deterministic_non_target_and_sized():
  y = np.array([0] * 50 + [1] * 150)
  a = triggers.choose_poison_indices(y, 0.02, target_class=0, seed=3)
  b = triggers.choose_poison_indices(y, 0.02, target_class=0, seed=3)
  c = triggers.choose_poison_indices(y, 0.02, target_class=0, seed=4)
  np.testing.assert_array_equal(a, b)
  assert len(a) == 4 and np.all(y[a] == 1)  # 2% of all 200 samples, all of them non-target
  assert not np.array_equal(a, c)
  old = triggers.choose_poison_indices(y, 0.02, target_class=0, seed=3, base="non_target")
  assert len(old) == 3  # 2% of the 150 non-target samples
  with pytest.raises(ValueError, match="selects no sample"):
    triggers.choose_poison_indices(y, 0.001, target_class=0, seed=0)
  with pytest.raises(ValueError, match="only 150"):
    triggers.choose_poison_indices(y, 0.9, target_class=0, seed=0)


def test_poison_count_matches_the_paper_on_mnist_sizes():
  # MNIST 0 vs 1: 5,923 zeros (the target) and 6,742 ones; the reference poisons 2% of all 12,665: 253.
  y = np.array([0] * 5923 + [1] * 6742)
  assert triggers.poison_count(y, 0.02, target_class=0) == 253
  assert triggers.poison_count(y, 0.02, target_class=0, base="non_target") == 135  # the old reading
  assert triggers.poison_count(np.array([0] * 5000 + [1] * 5000), 0.02, target_class=0) == 200  # CIFAR-10 pair


def test_adaptive_selection_takes_the_lowest_scores():
  y = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1, 1] * 10)
  scores = np.arange(100.0)[::-1]  # the last samples score lowest
  idx = triggers.choose_poison_indices(y, 0.05, target_class=0, seed=0, scores=scores)
  expected = np.flatnonzero(y != 0)[::-1][:5]
  np.testing.assert_array_equal(idx, np.sort(expected))


def test_relabel_only_trigger_leaves_the_images():
  x = np.random.RandomState(1).rand(3, 28, 28, 1).astype(np.float32)
  out, norms = triggers.apply_trigger(x, "none", 1.0)
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(norms, 0.0)


def test_poison_training_set_relabels_and_triggers_only_the_chosen():
  rs = np.random.RandomState(0)
  x = rs.rand(20, 28, 28, 1).astype(np.float32) * 0.5
  y = np.array([1] * 10 + [0] * 10, np.int32)
  idx = np.array([2, 5])
  xp, yp, norms = triggers.poison_training_set(x, y, idx, "onepixel", 1.0, target_class=0)
  assert list(yp[idx]) == [0, 0] and np.array_equal(np.delete(yp, idx), np.delete(y, idx))
  np.testing.assert_array_equal(np.delete(xp, idx, axis=0), np.delete(x, idx, axis=0))
  assert np.all(xp[idx, 23, 23, 0] == 1.0)
  np.testing.assert_allclose(norms, 1.0 - x[idx, 23, 23, 0], rtol=1e-6)
  assert x[2, 23, 23, 0] != 1.0  # input not modified in place


def test_badnets_patch_replaces_a_checkerboard_in_the_corner():
  x = np.full((2, 28, 28, 1), 0.5, np.float32)
  out, norms = triggers.apply_trigger(x, "badnets", 1.0)
  changed = np.argwhere(out[0, ..., 0] != 0.5)
  assert changed[:, 0].min() == 28 - 1 - 3 and changed[:, 0].max() == 28 - 2  # rows 24..26
  assert changed[:, 1].min() == 28 - 1 - 3 and changed[:, 1].max() == 28 - 2
  np.testing.assert_array_equal(out[0, 24:27, 24:27, 0], [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
  np.testing.assert_allclose(norms, np.sqrt(9 * 0.25), rtol=1e-6)  # every patch pixel moves by 0.5
  out3, _ = triggers.apply_trigger(np.zeros((1, 32, 32, 3), np.float32), "badnets", 1.0)
  assert np.all(out3[0, 28:31, 28:31, :] == out3[0, 28:31, 28:31, :1])  # the same in every channel


def test_alpha_blend_mixes_a_fixed_image():
  x = np.random.RandomState(0).rand(3, 32, 32, 3).astype(np.float32)
  out, norms = triggers.apply_trigger(x, "alpha_blend", 1.0, blend_alpha=0.25)
  p = triggers.blend_image((32, 32, 3))
  np.testing.assert_allclose(out, 0.75 * x + 0.25 * p, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(norms, np.linalg.norm((out - x).reshape(3, -1), axis=1), rtol=1e-5)
  assert 0.0 <= out.min() and out.max() <= 1.0
  with pytest.raises(ValueError, match="blend_alpha"):
    triggers.apply_trigger(x, "alpha_blend", 1.0, blend_alpha=0.0)
