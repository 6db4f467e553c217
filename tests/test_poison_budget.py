"""The certified poison budget at trigger norm t (bounds.poison_budget) against the concrete-attack check
(bounds.certified_against), closed forms and a run's outputs."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from certssb_jax import defenses
from certssb_jax.certify import bounds
from certssb_jax.experiment import config as config_lib
from certssb_jax.store import certified as store_lib


def _certified(margin, s_train, sigma_x, t, k, extra_sigmas=()):
  """certified_against for k poisoned images at sigma s_train (plus clean samples at `extra_sigmas`)."""
  sigma_train = np.concatenate([np.full(max(k, 1), s_train), np.asarray(extra_sigmas, np.float64)])
  return bounds.certified_against(margin, sigma_train, np.arange(k), t, sigma_x, t)


def _closed_form(margin, s_train, sigma_x, t):
  """The largest k >= 0 with t^2 (k / s^2 + 1 / sigma_x^2) < margin^2 by counting up, -1 if none."""
  k = -1
  while t * t * ((k + 1) / s_train ** 2 + 1 / sigma_x ** 2) < margin * margin:
    k += 1
  return k


# ----------------------------------------------------------------------------------------------------------
# Closed forms.


def test_closed_form_cases_at_the_margin_ceiling():
  ceiling = bounds.margin_ceiling(1000, 0.001, num_classes=2)  # Clopper-Pearson at alpha / 2, all votes agree
  assert ceiling == pytest.approx(2.43, abs=0.005)
  # sigma_0 = 1, t = 1: 4 + 1 < 2.43^2 = 5.9 < 5 + 1
  assert bounds.poison_budget(ceiling, 1.0, 1.0, 1.0) == 4
  # sigma_0 = 0.25: the test trigger alone has whitened norm 4 > 2.43
  assert bounds.poison_budget(ceiling, 0.25, 0.25, 1.0) == -1
  # the training sigmas and sigma_x enter separately: 4 k + 1 < 5.9 at s_train = 0.5, k / 4 + 1 < 5.9 at 2
  assert bounds.poison_budget(ceiling, 0.5, 1.0, 1.0) == 1
  assert bounds.poison_budget(ceiling, 2.0, 1.0, 1.0) == 19


def test_exact_ties_are_not_certified():
  # powers of two make every whitened norm exact: margin = the norm of k + 1 images certifies exactly k
  for s_train, sigma_x, t in ((0.5, 1.0, 1.0), (0.25, 0.5, 0.125), (1.0, 2.0, 0.5)):
    for k in (0, 1, 3, 10, 100):
      margin = bounds.whitened_norm(np.full(k + 1, s_train), np.arange(k + 1), t, sigma_x, t)
      assert bounds.poison_budget(margin, s_train, sigma_x, t) == k
      assert _certified(margin, s_train, sigma_x, t, k) and not _certified(margin, s_train, sigma_x, t, k + 1)
    # margin = t / sigma_x exactly: not even the test trigger is covered
    assert bounds.poison_budget(t / sigma_x, s_train, sigma_x, t) == -1


def test_abstentions_and_zero_margin_get_minus_one():
  got = bounds.poison_budget(np.zeros(5), 0.25, np.linspace(0.25, 1.0, 5), 1.0)
  np.testing.assert_array_equal(got, np.full(5, -1))
  assert bounds.poison_budget(0.0, 1.0, 1.0, 1e-3) == -1


def test_isotropic_radius_is_the_budget_with_unit_sigmas():
  # ||Delta|| < J with k + 1 triggers of norm t: t^2 (k + 1) < J^2
  for radius, t, want in ((1.0, 0.5, 2), (1.0, 1.0, -1), (2.0 + 1e-9, 1.0, 3), (2.0, 1.0, 2), (0.3, 0.1, 7)):
    assert bounds.poison_budget(radius, 1.0, 1.0, t) == want


# ----------------------------------------------------------------------------------------------------------
# The strict boundary against certified_against.


def test_random_cases_certify_every_k_up_to_the_budget_and_not_one_more():
  rng = np.random.default_rng(0)
  for _ in range(300):
    margin = rng.uniform(0.0, 4.0)
    s_train, sigma_x = rng.uniform(0.1, 1.5, size=2)
    t = rng.uniform(0.05, 2.0)
    k = int(bounds.poison_budget(margin, s_train, sigma_x, t))
    assert k == _closed_form(margin, s_train, sigma_x, t)
    assert not _certified(margin, s_train, sigma_x, t, k + 1)
    if k >= 0:
      assert _certified(margin, s_train, sigma_x, t, k)
      # fewer images, and the k images on samples of larger sigma_j, are covered as well
      j = int(rng.integers(0, k + 1))
      assert _certified(margin, s_train, sigma_x, t, j, extra_sigmas=rng.uniform(s_train, 2 * s_train, size=3))
      larger = rng.uniform(s_train, 2 * s_train, size=max(k, 1))
      assert bounds.certified_against(margin, larger, np.arange(k), t, sigma_x, t)


def test_random_ties_agree_with_certified_against():
  # margin = the whitened norm of exactly k + 1 images, in float64 as whitened_norm computes it
  rng = np.random.default_rng(1)
  for _ in range(300):
    s_train, sigma_x = rng.uniform(0.1, 1.5, size=2)
    t = rng.uniform(0.05, 2.0)
    k = int(rng.integers(0, 40))
    margin = bounds.whitened_norm(np.full(k + 1, s_train), np.arange(k + 1), t, sigma_x, t)
    got = int(bounds.poison_budget(margin, s_train, sigma_x, t))
    assert got == k, (s_train, sigma_x, t, k)
    assert _certified(margin, s_train, sigma_x, t, got) and not _certified(margin, s_train, sigma_x, t, got + 1)


# ----------------------------------------------------------------------------------------------------------
# Vectorisation and inputs.


def test_vectorised_over_broadcast_shapes_matches_scalar_calls():
  margin = np.array([[0.0], [0.5], [1.7], [2.43]])  # (4, 1)
  sigma_x = np.array([0.25, 0.5, 1.0])  # (3,)
  got = bounds.poison_budget(margin, 0.25, sigma_x, 0.1)
  assert got.shape == (4, 3) and got.dtype == np.int64
  for i in range(4):
    for j in range(3):
      assert got[i, j] == bounds.poison_budget(float(margin[i, 0]), 0.25, float(sigma_x[j]), 0.1)
      assert got[i, j] == _closed_form(float(margin[i, 0]), 0.25, float(sigma_x[j]), 0.1)
  assert np.all(np.diff(got, axis=0) >= 0) and np.all(np.diff(got, axis=1) >= 0)  # monotone in margin, sigma_x


@pytest.mark.parametrize("args", [
    (-0.1, 1.0, 1.0, 1.0), (np.nan, 1.0, 1.0, 1.0), (np.inf, 1.0, 1.0, 1.0), (1.0, 0.0, 1.0, 1.0),
    (1.0, -1.0, 1.0, 1.0), (1.0, 1.0, 0.0, 1.0), (1.0, 1.0, np.nan, 1.0), (1.0, 1.0, 1.0, 0.0),
    (1.0, 1.0, 1.0, -1.0), (1.0, 1.0, 1.0, np.inf), (2.0, 1.0, 1.0, 1e-9)])
def test_bad_inputs_raise(args):
  with pytest.raises(ValueError):
    bounds.poison_budget(*args)


def test_budget_grid_and_curve():
  assert bounds.budget_grid(-1) == (0,)
  assert bounds.budget_grid(0) == (0, 1)
  assert bounds.budget_grid(4) == (0, 1, 2, 4, 8)
  assert bounds.budget_grid(7) == (0, 1, 2, 4, 8)
  with pytest.raises(ValueError):
    bounds.budget_grid(-2)
  budget = np.array([-1, 0, 3, 9, 2])
  correct = np.array([True, True, True, True, False])
  curve = bounds.certified_accuracy_budget(budget, correct, bounds.budget_grid(int(budget.max())))
  assert curve == {"0": 0.6, "1": 0.4, "2": 0.4, "4": 0.2, "8": 0.2, "16": 0.0}
  with pytest.raises(ValueError):
    bounds.certified_accuracy_budget(budget.astype(float), correct, (0,))
  with pytest.raises(ValueError):
    bounds.certified_accuracy_budget(budget, correct[:3], (0,))


# ----------------------------------------------------------------------------------------------------------
# Storage-update answers.


def test_an_aligned_answer_uses_its_joint_radius():
  """A query inside the ball of a larger sigma_x takes its label; its margin_stored (at its own, smaller sigma_x)
  exceeds the source ball's margin, so only the joint radius gives a sound budget."""
  from certssb_jax.experiment import metrics  # pylint: disable=g-import-not-at-top

  st = store_lib.CertifiedStore((2,))
  s_train, t = 0.25, 0.2
  a = st.certify(np.zeros((1, 2)), np.array([1]), np.array([0.75]), 0.375, sigma_min=s_train)  # margin 2
  b = st.certify(np.array([[0.01, 0.0]]), np.array([0]), np.array([0.5]), 0.25, sigma_min=s_train)
  assert bool(b.aligned[0]) and b.margin_stored[0] > a.margin_stored[0]
  got = metrics.answer_poison_budget(b, np.array([0.25]), np.full(3, s_train), t)
  assert metrics.answer_poison_budget(b, np.array([0.25]), np.full(3, s_train), t, joint=False)[0] == 0
  # the truth: the attack on b is an attack on ball a's centre with the test trigger moved by 0.01
  truth = -1
  while bounds.whitened_norm(np.full(truth + 2, s_train), np.arange(truth + 1), t, 0.375, 0.01 + t) < 2.0:
    truth += 1
  assert 0 <= got[0] <= truth
  assert bounds.poison_budget(b.margin_stored[0], s_train, 0.25, t) > truth  # margin_stored would overclaim
  own = metrics.answer_poison_budget(a, np.array([0.375]), np.full(3, s_train), t)
  assert own[0] == bounds.poison_budget(2.0, s_train, 0.375, t)


def test_run_outputs_recompute_from_the_closed_form(tiny_run):
  """per_sample.csv's poison_budget from each row's margin_stored (or, aligned, radius_joint_stored), sigma and
  the run's smallest sigma_j at t = delta; summary's curves from the column."""
  c, workdir, summary = tiny_run
  with open(os.path.join(workdir, "per_sample.csv")) as f:
    rows = list(csv.DictReader(f))
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  s_train = float(np.load(os.path.join(workdir, "sigmas.npz"))["train"].min())
  t = on_disk["delta"]
  assert t == c.attack.delta
  searched = defenses.noise_plan(config_lib.resolve(c)).search_test  # the tiny run searches sigma_x
  for r in rows:
    want = _closed_form(float(r["margin_stored"]), s_train, float(r["sigma"]), t)
    if int(r["aligned"]):
      want = max(_closed_form(float(r["radius_joint_stored"]), 1.0, 1.0, t), min(want, 0))
    if searched:  # searched sigmas certify the test input alone
      want = min(want, 0)
    assert int(r["poison_budget"]) == want, r
    if int(r["pred_stored"]) == -1:
      assert want == -1
  grid = on_disk["poison_budget_grid"]
  assert grid[0] == 0 and all(b == 2 * a for a, b in zip(grid[1:], grid[2:]))
  for split, key in (("clean", "cra_poison_budget"), ("triggered", "cra_poison_budget_triggered")):
    sub = [r for r in rows if r["split"] == split]
    budget = np.array([int(r["poison_budget"]) for r in sub])
    correct = np.array([r["pred_stored"] == r["label"] for r in sub])
    want = {str(k): float(np.mean(correct & (budget >= k))) for k in grid}
    assert on_disk["metrics"][key] == want
    assert want[str(grid[-1])] == 0.0  # the grid runs to where nothing is certified
    assert key in on_disk["other_order"]


def test_answer_metrics_report_the_budget_curves_of_a_run_without_a_search():
  """The curves and their grid from synthetic answers of a RAB config (sigma_0 = 0.25, t = 0.02): every budget
  is the closed form at s_train = sigma_x = sigma_0, and the grid runs to where the curves are 0."""
  import types  # pylint: disable=g-import-not-at-top

  from conftest import tiny_config  # pylint: disable=g-import-not-at-top

  from certssb_jax.experiment import metrics  # pylint: disable=g-import-not-at-top

  cfg = config_lib.resolve(tiny_config(**{"defense.name": "rab", "attack.delta": 0.02}))
  ceiling, t, sigma = metrics.margin_ceiling(cfg), 0.02, 0.25
  margin = np.array([0.0, 0.01, ceiling / 2, 0.3, ceiling])  # (5,)
  labels = np.array([1, 0, 0, 1, 0])
  pred = np.where(margin > 0, np.array([1, 0, 1, 1, 0]), -1)  # the third answer is wrong, the second uncertified
  answer = store_lib.StoreAnswer(pred=pred, radius_stored=sigma * margin, radius_joint=sigma * margin,
                                 margin_stored=margin, aligned=np.zeros(5, bool), trimmed=np.zeros(5, bool),
                                 stored=pred != -1, align_source=np.full(5, -1))
  answers = {"clean": answer, "triggered": answer}
  attacked = types.SimpleNamespace(splits={s: types.SimpleNamespace(y=labels) for s in ("clean", "triggered")})
  sigma_train, sigma_test = np.full(7, sigma, np.float32), {s: np.full(5, sigma, np.float32) for s in answers}
  budgets = metrics.poison_budgets(cfg, answers, sigma_train, sigma_test)["clean"]
  want = [_closed_form(float(m), sigma, sigma, t) for m in margin]
  assert list(budgets) == want and want[0] == -1 and want[-1] > 8
  out = metrics.answer_metrics(cfg, attacked, answers, sigma_train, sigma_test)
  grid = metrics.poison_budget_grid(cfg, sigma_train, sigma_test)
  assert grid[-1] > want[-1] >= grid[-2]  # the ceiling's budget is the run's largest
  correct = pred == labels
  assert out["cra_poison_budget"] == {str(k): float(np.mean(correct & (budgets >= k))) for k in grid}
  assert out["cra_poison_budget"][str(grid[-1])] == 0.0 and out["cra_poison_budget"]["0"] == 0.4
  assert out["cra_poison_budget_triggered"] == out["cra_poison_budget"]
  assert "cra_poison_budget" not in metrics.answer_metrics(cfg, attacked, answers)  # without the sigmas
