"""RAB's envelope and the grid selector against independent truth: a naive loop over the beta-binomial, hand-made
curves, and an end-to-end run on the built-in digits."""

import json
import os

from conftest import tiny_config, write_tiny_config  # pylint: disable=g-bad-import-order
import numpy as np
import pytest
from scipy import stats

from certssb_jax.data.attacked import SPLITS
from certssb_jax.defenses import grid_selector
from certssb_jax.envelope import answers, comparison, pages, program
from certssb_jax.store import certified as store_lib


def test_expected_radius_equals_a_naive_sum_over_the_posterior():
  """E[sigma * Phi^-1(CP_low(K))+] with K beta-binomial from the Jeffreys posterior, summed term by term."""
  m_s, m_v, alpha, sigma = 6, 20, 0.01, 0.5
  got = grid_selector.expected_radius(np.arange(m_s + 1), m_s, m_v, sigma, alpha, 2)
  for k_s in range(m_s + 1):
    total = 0.0
    for k in range(m_v + 1):
      p_low = stats.beta.ppf(alpha / 2, k, m_v - k + 1) if k else 0.0
      weight = stats.betabinom.pmf(k, m_v, k_s + 0.5, m_s - k_s + 0.5)
      total += weight * (sigma * stats.norm.ppf(p_low) if p_low > 0.5 else 0.0)
    assert got[k_s] == pytest.approx(total, rel=1e-10, abs=1e-14)
  assert np.all(np.diff(got) > 0)  # more selector votes, larger expected radius


def test_the_selector_trades_noise_for_agreement():
  """Equal votes at every sigma choose the largest sigma (the radius scales with it); a split vote at the large
  sigma keeps the small one; inputs are decided one by one."""
  ones = np.ones((8, 1), np.int64)
  split = np.array([[1], [1], [1], [1], [0], [0], [0], [1]])
  assert grid_selector.select_sigmas({0.25: ones, 0.5: ones}, 56, 0.001, 2)[0] == 0.5
  assert grid_selector.select_sigmas({0.25: split, 0.5: split}, 56, 0.001, 2)[0] == 0.5
  assert grid_selector.select_sigmas({0.25: ones, 0.5: split}, 56, 0.001, 2)[0] == 0.25
  both = grid_selector.select_sigmas({0.25: np.hstack([ones, ones]), 0.5: np.hstack([ones, split])}, 56, 0.001, 2)
  np.testing.assert_array_equal(both, [0.5, 0.25])


def _rab_folder(path, sigma, preds, labels, num_models):
  """A finished RAB run as the grid selector reads it: config.json (a tiny config at this sigma, trigger norm
  0.05) and votes.npz with every model's class on each split; ``preds[split]`` is (M, N)."""
  from certssb_jax import files  # pylint: disable=g-import-not-at-top
  from certssb_jax.experiment import config as config_lib  # pylint: disable=g-import-not-at-top

  cfg = tiny_config(**{"defense.name": "rab", "sigma.sigma_0": sigma, "train.num_models": num_models,
                       "attack.delta": 0.05})
  os.makedirs(path)
  files.save_json(os.path.join(path, "config.json"), config_lib.to_json(config_lib.resolve(cfg)))
  files.save_npz(os.path.join(path, "votes.npz"), **{f"{s}_preds": preds[s] for s in SPLITS},
                 **{f"{s}_label": labels for s in SPLITS})
  return str(path)


def test_the_grid_selector_certifies_the_test_input_radius_and_no_joint_radius(tmp_path):
  """The grid selector from two hand-made RAB folders (M = 16, M_s = 4, alpha = 0.1 of the tiny config).

  Its sigma_x is chosen by models trained on the (possibly poisoned) training set, so its answers certify no joint
  radius: exactly 0 (docs/soundness.md), whatever their test-input radius. The test-input radii are the
  Clopper-Pearson certificates of the 12 voters at the chosen sigma, recomputed with scipy: inputs 10 apart, so
  the store trims nothing. Unanimous selectors at both sigmas choose 0.5 (the radius scales with sigma); a split
  at 0.5 keeps 0.25. The poison budget at trigger norm 0.05 is the test trigger alone (0 images) for every answer,
  where a joint radius equal to the test-input radius would certify dozens of poisoned images."""
  m, m_s, alpha, n = 16, 4, 0.1, 4
  labels = np.array([0, 1, 1, 0])
  voters_for_label = np.array([12, 11, 12, 10])  # voters (ids 4..15) for the label, at either sigma
  at = {}
  for sigma in (0.25, 0.5):
    preds = np.tile(labels, (m, 1))  # (M, N): everyone votes the label ...
    for i in range(n):
      preds[m_s + voters_for_label[i]:, i] = 1 - labels[i]  # ... but the last voters of input i
    if sigma == 0.5:
      preds[:2, 1] = 1 - labels[1]  # the selectors split on input 1 at 0.5: it keeps 0.25
    at[sigma] = _rab_folder(tmp_path / str(sigma), sigma, {s: preds for s in SPLITS}, labels, m)
  x = {s: np.arange(n)[:, None] * np.full((1, 3), 10.0) + (100.0 if s == "triggered" else 0.0)
       for s in SPLITS}
  ans = answers.grid_selector(at, x, m_s)
  chosen = np.array([0.5, 0.25, 0.5, 0.5])
  p_low = stats.beta.ppf(alpha / 2, voters_for_label, 12 - voters_for_label + 1)
  want = np.where(p_low > 0.5, chosen * stats.norm.ppf(p_low), 0.0)
  assert (want > 0).all()
  for split in SPLITS:
    np.testing.assert_array_equal(ans.sigma_x[split], chosen)
    np.testing.assert_array_equal(ans.pred[split], labels)
    np.testing.assert_allclose(ans.radius_test[split], want, rtol=1e-8)
    np.testing.assert_array_equal(ans.radius_joint[split], np.zeros(n))
  assert ans.voting == 12
  assert ans.delta == 0.05 and (want > ans.delta).all()
  np.testing.assert_array_equal(ans.budget("clean"), np.zeros(n))


def test_crossings_find_the_intervals_and_the_largest_difference():
  r = np.linspace(0, 1, 11)
  diff = np.array([0, 0.1, 0.3, 0.2, 0, -0.1, -0.4, 0, 0, 0.05, 0])
  got = comparison.crossings(diff, r)
  got_intervals = [(c["sign"], round(c["from"], 9), round(c["to"], 9)) for c in got]
  assert got_intervals == [(1, 0.1, 0.3), (-1, 0.5, 0.6), (1, 0.9, 0.9)]
  assert got[0]["largest"] == pytest.approx(0.3) and got[0]["at"] == pytest.approx(0.2)
  assert got[1]["largest"] == pytest.approx(-0.4) and got[1]["at"] == pytest.approx(0.6)


def _answers(name, sigma, pred, radius, label):
  arrays = {"clean": np.asarray(pred), "triggered": np.asarray(pred)}
  rad = {"clean": np.asarray(radius, float), "triggered": np.asarray(radius, float)}
  lab = {"clean": np.asarray(label), "triggered": np.asarray(label)}
  sig = {s: np.full(len(pred), sigma or 0.3) for s in SPLITS}
  return answers.Answers(name, sigma, 8, arrays, rad, rad, sig, lab, arrays, 0.1, (0.3, 0.3))


def test_the_envelope_is_the_best_rab_at_each_radius():
  label = [1, 1, 1, 1]
  small = _answers("RAB 0.25", 0.25, [1, 1, 1, 1], [0.1, 0.1, 0.1, 0.1], label)  # all correct, small radii
  large = _answers("RAB 0.5", 0.5, [1, 1, -1, -1], [0.4, 0.4, 0, 0], label)  # half abstain, large radii
  design = _answers("design", None, [1, 1, 1, -1], [0.4, 0.4, 0.3, 0], label)
  out = comparison.compare([large, small], [design], target_class=0, steps=100)
  r = np.asarray(out["radii"]["test"])
  env = np.asarray(out["envelope"]["test"]["cra"])
  np.testing.assert_allclose(env, np.maximum(small.cra("test", r), large.cra("test", r)))
  assert env[0] == 1.0 and out["envelope"]["test"]["sigma"][0] == 0.25
  above = [c for c in out["designs"][0]["test"] if c["sign"] > 0]
  below = [c for c in out["designs"][0]["test"] if c["sign"] < 0]
  assert below and below[0]["from"] == 0.0 and below[0]["largest"] == pytest.approx(-0.25)  # r < 0.1
  assert above and above[0]["largest"] == pytest.approx(0.25)  # 0.1 <= r < 0.3: 3 of 4 against 2 of 4
  # poison budget at t = 0.1: t sqrt(k + 1) < J (strict) gives k* = 14 at J = 0.4, 7 at 0.3, -1 at 0.1
  k = np.asarray(out["radii"]["budget"])
  np.testing.assert_allclose(design.cra("budget", k), np.where(k <= 7, 0.75, np.where(k <= 14, 0.5, 0.0)))
  np.testing.assert_allclose(out["envelope"]["budget"]["cra"], np.where(k <= 14, 0.5, 0.0))


@pytest.mark.slow
def test_the_envelope_command_on_real_digits(tmp_path):
  """RAB at two sigmas and the grid selector on their models: the table, the plots, a selector whose sigma_x
  take both values, answers consistent through one store, and a joint radius of 0 for selected answers."""
  from certssb_jax.experiment import config as config_lib, pipeline  # pylint: disable=g-import-not-at-top

  spec = write_tiny_config(tmp_path / "tiny.py", num_models=16, alpha=0.2)
  result = program.run_envelope(spec, str(tmp_path / "env"), [0.25, 0.5], [], [4])
  for path in result["plots"] + [result["json"]]:
    assert os.path.exists(path)
    assert result["key"].endswith("_M16") and result["key"] in os.path.basename(path)  # another M: other files
  out = json.load(open(result["json"]))
  names = [row["name"] for row in out["rows"]]
  assert names == ["RAB sigma=0.25", "RAB sigma=0.5", f"{answers.GRID_DESIGN} (M_s = 4)",
                   "RAB sigma=0.25, 12 voters", "RAB sigma=0.5, 12 voters"]  # the same voters as the selector
  grid = out["rows"][2]
  assert grid["voting"] == 12 and max(grid["cra"]["joint"]) == 0.0
  assert out["designs"][0]["same_voters"]["voting"] == 12
  assert "Against RAB's envelope" in result["markdown"] and "with the design's own voters" in result["markdown"]
  rab_runs = {float(k): v for k, v in out["rab_runs"].items()}
  cfg = config_lib.resolve(config_lib.load_config(spec))
  splits = pipeline.test_splits(cfg, pipeline.load_data(cfg))
  ans = answers.grid_selector(rab_runs, {s: splits[s].x for s in SPLITS}, 4)
  x = np.concatenate([splits[s].x for s in SPLITS])
  pred = np.concatenate([ans.pred[s] for s in SPLITS])
  radius = np.concatenate([ans.radius_test[s] for s in SPLITS])
  assert store_lib.audit(x, pred, radius)[0] == 0
  assert set(np.unique(ans.sigma_x["clean"])) <= {0.25, 0.5}
  # the answers are the certificates of the voters (ids 4..15) at the selected sigma, recounted from the votes
  from certssb_jax.certify import bounds  # pylint: disable=g-import-not-at-top
  votes = {s: np.load(os.path.join(d, "votes.npz")) for s, d in rab_runs.items()}
  for split in SPLITS:
    chosen = ans.sigma_x[split]
    preds = np.stack([votes[s][f"{split}_preds"][4:, i] for i, s in enumerate(chosen)], axis=1)
    counts = np.stack([(preds == c).sum(axis=0) for c in range(2)], axis=1)
    cert = bounds.certify_counts(counts, alpha=0.2, sigma_x=chosen)
    np.testing.assert_array_equal(cert.pred, ans.pred[split])
    np.testing.assert_allclose(cert.radius_test, ans.radius_test[split], rtol=1e-6, atol=1e-9)
  # RAB with the selector's voters: the same votes from model 4 on, at one sigma, with its joint radius
  for same in answers.same_voters(rab_runs, {s: splits[s].x for s in SPLITS}, 4):
    preds = votes[same.sigma]["clean_preds"][4:]
    counts = np.stack([(preds == c).sum(axis=0) for c in range(2)], axis=1)
    cert = bounds.certify_counts(counts, alpha=0.2, sigma_x=same.sigma, sigma_min=same.sigma)
    np.testing.assert_array_equal(cert.pred, same.pred["clean"])
    assert same.voting == 12 and same.radius_joint["clean"].max() > 0
    np.testing.assert_allclose(same.radius_joint["clean"], same.radius_test["clean"])  # one sigma everywhere
  with pytest.raises(ValueError, match="selector_models"):
    answers.grid_selector(rab_runs, {s: splits[s].x for s in SPLITS}, 16)


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/quickstart.py", "--workdir", "W", "--sigmas", "0.25,x"], "comma-separated numbers"),
    (["--config", "configs/quickstart.py", "--workdir", "W", "--sigmas", "0.25", "--sigmas", "0.5"],
     "once per --config"),
    (["--config", "configs/nope.py", "--workdir", "W"], "does not exist"),
])
def test_bad_arguments_stop_with_one_line_before_any_work(tmp_path, args, message):
  from helpers import run_module  # pylint: disable=g-import-not-at-top

  args = [str(tmp_path / "w") if a == "W" else a for a in args]
  proc = run_module("certssb_jax.studies", "envelope", *args)
  assert proc.returncode == 2 and message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not os.path.exists(tmp_path / "w" / "mnist_0-1")


def test_the_results_page_rewrites_only_the_sections_of_the_pairs_it_ran(tmp_path):
  """A command that runs one pair replaces that pair's section and keeps the others as they were written."""
  plot = tmp_path / "envelope_a.png"
  plot.write_bytes(b"png")
  page = tmp_path / "docs" / "results.md"
  sec = lambda key, text: {"key": key, "markdown": f"### {key}\n\n{text}\n", "plots": [str(plot)]}
  pages.write_results_page(str(page), [sec("a_M16", "first a"), sec("b_M16", "first b")], "cmd one")
  pages.write_results_page(str(page), [sec("b_M16", "second b"), sec("c_M64", "first c")], "cmd two")
  sections = pages.page_sections(page.read_text())
  assert list(sections) == ["a_M16", "b_M16", "c_M64"]
  assert "first a" in sections["a_M16"] and "cmd one" in sections["a_M16"]
  assert "second b" in sections["b_M16"] and "first b" not in sections["b_M16"] and "cmd two" in sections["b_M16"]
  assert "first c" in sections["c_M64"] and "cmd two" in sections["c_M64"]
  assert page.read_text().startswith("# Results on full-size real data")
  assert (tmp_path / "docs" / "figures" / "envelope_a.png").read_bytes() == b"png"
