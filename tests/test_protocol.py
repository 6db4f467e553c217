"""The protocol around the certificate: multi-class runs, held-out search models, the reference release's
numbers, the sweep table, RAB and Cert-SSB sharing their models."""

import csv
import os

from conftest import tiny_config, write_tiny_config  # pylint: disable=g-bad-import-order
import numpy as np
import pytest
from scipy import stats

from certssb_jax import files, rng, sweep
from certssb_jax.defenses import sigma_search, smoothing
from certssb_jax.ensemble import scorer as scorer_lib, trained, trainer as ensemble
from certssb_jax.experiment import config as config_lib, identity, pipeline, rundir


@pytest.mark.slow
def test_three_classes_end_to_end(tmp_path):
  c = tiny_config(classes="0 1 2", defense="rab")
  summary = pipeline.run(c, str(tmp_path / "k3"))
  votes = np.load(tmp_path / "k3" / "votes.npz")
  assert votes["clean"].shape[1] == 3 and np.all(votes["clean"].sum(axis=1) == 8)
  assert summary["classes"] == [0, 1, 2]
  assert summary["n_triggered"] == int((votes["clean_label"] != 0).sum())
  assert summary["metrics"]["clean_accuracy"] > 0.6
  with open(tmp_path / "k3" / "per_sample.csv") as f:
    clean = [r for r in csv.DictReader(f) if r["split"] == "clean"]
  for r, v in zip(clean, votes["clean"]):  # Bonferroni over K = 3 classes: the CP bound at alpha / 3
    top = int(np.argmax(v))
    expected = stats.beta.ppf(c.certify.alpha / 3, v[top], 8 - v[top] + 1) if v[top] else 0.0
    assert float(r["p_lower"]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_search_models_score_and_never_vote(tmp_path):
  """With scorer=ensemble the first search_models models choose sigma_x and the others vote: the votes count
  only models 2..7, and sigma_x is what a search with models 0 and 1 alone gives."""
  c = tiny_config(scorer="ensemble", **{"sigma.search_models": 2})
  summary = pipeline.run(c, str(tmp_path / "s"))
  assert summary["models"]["search"] == 2 and summary["models"]["voting"] == 6
  votes = np.load(tmp_path / "s" / "votes.npz")
  assert np.all(votes["clean"].sum(axis=1) == 6)
  preds = votes["clean_preds"]  # (8, N): every model's class
  np.testing.assert_array_equal(votes["clean"][:, 1], (preds[2:] == 1).sum(axis=0))
  cfg = config_lib.resolve(c)
  from certssb_jax.models import zoo as models  # pylint: disable=g-import-not-at-top
  model = models.get_model("mnist_cnn", 2)
  trainer = ensemble.Trainers().get(model, (28, 28, 1), cfg, models_per_chunk=2)
  held_out = trained.TrainedEnsemble(trainer, 8, rundir.RunDir(str(tmp_path / "s"))).stacked(np.arange(2))
  score_fn = scorer_lib.EnsembleScorer(model, trainer.mesh, 2)
  attacked = pipeline.poison(cfg, pipeline.load_data(cfg), rundir.RunDir(str(tmp_path / "s")), pipeline.no_progress)
  key = jax_fold(rng.stream(0, rng.SIGMA_SEARCH), 1)
  sigma, _ = sigma_search.find_sigmas(score_fn, score_fn.place(held_out.params, held_out.batch_stats),
                                      attacked.splits["clean"].x, None, np.arange(64, dtype=np.int32), key,
                                      smoothing.search_config_of(cfg.sigma), cfg.sigma.objective, 128)
  np.testing.assert_array_equal(sigma, np.load(tmp_path / "s" / "sigmas.npz")["test_clean"])


def jax_fold(key, i):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.fold_in(key, i)


@pytest.mark.slow
def test_reference_compat_shows_the_reference_inflation(tmp_path):
  """compat=reference re-runs the ensemble at sigma_0 (as the reference samples) and multiplies the margin by the
  searched sigma_x: its radii are inflated by exactly sigma_x / sigma_0."""
  c = tiny_config(compat="reference", **{"sigma.sigma_hi": 0.5})
  summary = pipeline.run(c, str(tmp_path / "ref"))
  ref = summary["reference_compat"]
  assert "UNSOUND" in ref["note"]
  cfg = config_lib.resolve(c)
  attacked = pipeline.poison(cfg, pipeline.load_data(cfg), rundir.RunDir(str(tmp_path / "ref")),
                             pipeline.no_progress)
  votes = files.load_npz(str(tmp_path / "ref" / "stages" / "votes.npz"))
  sig = np.load(tmp_path / "ref" / "sigmas.npz")["test_clean"]
  # independent recomputation: Hoeffding with M fixed at 1000, no correction, radius x the searched sigma_x
  mean = votes["ref_clean_probs_sum"] / 8
  top2 = np.sort(mean, axis=1)[:, ::-1]
  h = np.sqrt(np.log(1 / c.certify.alpha) / 2000)
  pa, pb = np.maximum(1e-8, top2[:, 0] - h), np.minimum(1 - 1e-8, top2[:, 1] + h)
  margin = (stats.norm.ppf(pa) - stats.norm.ppf(pb)) / 2
  certified = pa > pb
  correct = (np.argmax(mean, axis=1) == attacked.splits["clean"].y) & certified
  for r in summary["radius_grid"]:
    assert ref["cra"][str(float(r))] == pytest.approx(np.mean(correct & (sig * margin > r)))
    assert ref["cra_at_sigma_0_without_inflation"][str(float(r))] == pytest.approx(
        np.mean(correct & (0.25 * margin > r)))
  factor = sig[certified] / 0.25
  assert factor.max() > 1.2  # the search moved sigma_x, so the inflation is visible
  assert ref["inflation_factor"]["mean"] == pytest.approx(factor.mean(), rel=1e-6)
  assert ref["inflation_factor"]["max"] == pytest.approx(factor.max(), rel=1e-6)
  # its "triggered accuracy" relabels every test input, target class included, to the target
  assert votes["ref_triggered_all_preds"].shape[1] == 64


@pytest.mark.slow
def test_sweep_table_shares_models_and_resumes(tmp_path):
  cfg = write_tiny_config(tmp_path / "tiny.py")
  out = str(tmp_path / "sweep")
  paths = sweep.sweep([cfg], out, ["onepixel"], [0.25], ["rab", "cert_ssb"])
  md = open(paths["table_md"]).read()
  lines = [l for l in md.splitlines() if l.startswith("| mnist")]
  assert len(lines) == 2 and "| RAB |" in lines[0] and "| Cert-SSB |" in lines[1]
  assert "CRA test r=1.45u" in md and "CRA joint r=0.95u" in md and "u = margin ceiling x sigma_0" in md
  assert "majority vote: clean / ERA / ASR" in md
  with open(paths["table_csv"]) as f:
    rows = list(csv.reader(f))
  assert len(rows) == 3 and all(len(r) == len(rows[0]) for r in rows)
  dirs = sorted(os.listdir(os.path.join(out, "mnist_0-1")), key=lambda d: "_rab_" not in d)
  assert len(dirs) == 2 and dirs[0].startswith("onepixel_sigma0.25_rab_") and "_cert_ssb_" in dirs[1]
  rab, ssb = (os.path.join(out, "mnist_0-1", d) for d in dirs)
  assert os.path.islink(os.path.join(ssb, "undefended"))  # Cert-SSB (sigma.train = base) trains RAB's models
  assert all(os.path.islink(os.path.join(ssb, "ensemble", n)) for n in os.listdir(os.path.join(ssb, "ensemble")))
  a, b = np.load(os.path.join(rab, "votes.npz")), np.load(os.path.join(ssb, "votes.npz"))
  assert a["clean_preds"].shape == b["clean_preds"].shape
  assert os.path.exists(os.path.join(out, "cra_mnist_0-1.png"))
  mtime = os.path.getmtime(os.path.join(rab, "summary.json"))
  sweep.sweep([cfg], out, ["onepixel"], [0.25], ["rab", "cert_ssb"])  # finished rows are reused
  assert os.path.getmtime(os.path.join(rab, "summary.json")) == mtime
  # a later sweep of Cert-SSB alone, with another search range, links the models RAB trained in the first one
  other = write_tiny_config(tmp_path / "other.py", **{"sigma.sigma_hi": 0.3125})
  sweep.sweep([other], out, ["onepixel"], [0.25], ["cert_ssb"])
  new = [d for d in os.listdir(os.path.join(out, "mnist_0-1")) if d not in dirs]
  assert len(new) == 1 and os.path.islink(os.path.join(out, "mnist_0-1", new[0], "undefended"))
  ensemble_dir = os.path.join(out, "mnist_0-1", new[0], "ensemble")
  assert all(os.path.islink(os.path.join(ensemble_dir, n)) for n in os.listdir(ensemble_dir))


@pytest.mark.slow
def test_a_larger_ensemble_reuses_a_smaller_ones_models(tmp_path):
  """A sweep row of 8 models links the 4 models of a finished 4-model row (model m depends on the seed and m only)
  and trains the other 4; its first 4 models vote exactly as the smaller run's."""
  small = write_tiny_config(tmp_path / "small.py", defense="rab", num_models=4, epochs=1)
  large = write_tiny_config(tmp_path / "large.py", defense="rab", num_models=8, epochs=1)
  out = str(tmp_path / "sweep")
  (a,) = sweep.run_grid([small], out, None, None, ["rab"])
  (b,) = sweep.run_grid([large], out, None, None, ["rab"])
  linked = sorted(n for n in os.listdir(os.path.join(b["workdir"], "ensemble"))
                  if os.path.islink(os.path.join(b["workdir"], "ensemble", n)))
  assert linked == sorted(os.listdir(os.path.join(a["workdir"], "ensemble")))
  assert len(os.listdir(os.path.join(b["workdir"], "ensemble"))) > len(linked)  # it trained the rest
  va, vb = np.load(os.path.join(a["workdir"], "votes.npz")), np.load(os.path.join(b["workdir"], "votes.npz"))
  np.testing.assert_array_equal(va["clean_preds"], vb["clean_preds"][:4])


def test_no_models_are_linked_between_chunkings_of_another_size(monkeypatch):
  """Where the chunk size follows M (the accelerator default, min(M, 256)), chunk c of a 100-model run holds other
  models than chunk c of a 300-model run: nothing is linked; two runs of 256 or more share their chunks."""
  monkeypatch.setattr(sweep.trainer, "auto_models_per_chunk", lambda requested, m: requested or min(m, 256))
  conf = lambda m: config_lib.to_json(config_lib.resolve(tiny_config(num_models=m, models_per_chunk="none")))
  assert sweep._donor([(conf(100), "small")], conf(300)) is None  # pylint: disable=protected-access
  assert sweep._donor([(conf(100), "small"), (conf(400), "big")], conf(300)) == "big"  # pylint: disable=protected-access


def test_the_studies_command_names_its_studies_and_takes_one_dialect(tmp_path):
  """No study, or a misspelt one: one line naming them; each study takes --config, --workdir, --results_md."""
  from helpers import run_module  # pylint: disable=g-import-not-at-top

  for args, message in (((), "name a study first"), (("famlies",), "did you mean 'families'")):
    proc = run_module("certssb_jax.studies", *args)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
  for study in ("sweep", "envelope", "families", "counts"):
    proc = run_module("certssb_jax.studies", study, "--helpfull")
    for flag in ("--config", "--workdir", "--results_md", "--[no]progress"):
      assert flag in proc.stdout, (study, flag)


def test_training_key_says_which_runs_train_the_same_models():
  key = lambda **kw: identity.training_key(config_lib.to_json(config_lib.resolve(tiny_config(**kw))))
  assert key(defense="rab") == key() == key(objective="prediction", scorer="pilot")
  assert key(defense="rab") != key(train_sigma="search")
  assert key() != key(seed=3) and key() != key(sigma_0=0.5, **{"sigma.sigma_hi": 0.75})
  assert key() == key(**{"train.checkpoint_every_s": 5})
  sized = lambda **kw: identity.training_key(config_lib.to_json(config_lib.resolve(tiny_config(**kw))),
                                               num_models=False)
  assert key(num_models=4) != key(num_models=8) and sized(num_models=4) == sized(num_models=8)
  assert sized(num_models=4) != sized(num_models=4, seed=3)


@pytest.mark.slow
def test_the_reference_rule_and_searched_training_sigmas_run_end_to_end(tmp_path):
  c = tiny_config(rule="reference", train_sigma="search", objective="label", **{"sigma.num_steps": 12})
  pipeline.run(c, str(tmp_path / "ref_rule"))
  sig = np.load(tmp_path / "ref_rule" / "sigmas.npz")
  top = 0.25 + 12 * 1e-4 * stats.norm.ppf(0.98)
  for k in ("train", "test_clean", "test_triggered"):  # the reference rule only ever grows sigma
    assert np.all(sig[k] >= 0.25 - 1e-7) and np.all(sig[k] <= top + 1e-6), k
    assert np.any(sig[k] > 0.25), k


@pytest.mark.slow
def test_the_patches_convolution_trains_the_same_models_end_to_end(tmp_path):
  """model.conv = patches computes the same models (to float32 rounding) through the whole pipeline: every
  model's class agrees with the xla formulation's on nearly every input."""
  overrides = dict(num_models=4, epochs=1, max_train=128, max_test=32, defense="rab",
                   **{"undefended.enabled": False})
  pipeline.run(tiny_config(**overrides), str(tmp_path / "xla"))
  pipeline.run(tiny_config(**overrides, **{"model.conv": "patches"}), str(tmp_path / "patches"))
  a, b = np.load(tmp_path / "xla" / "votes.npz"), np.load(tmp_path / "patches" / "votes.npz")
  assert np.mean(a["clean_preds"] == b["clean_preds"]) >= 0.97
  np.testing.assert_allclose(a["clean_probs_sum"], b["clean_probs_sum"], atol=0.05)
