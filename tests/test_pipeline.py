"""End to end on real MNIST digits: outputs, their schema, the reported numbers against an independent
recomputation from the per-sample outputs, determinism, resuming, and errors that stop before any work."""

import csv
import filecmp
import json
import logging
import os

from conftest import tiny_config  # pylint: disable=g-bad-import-order
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from certssb_jax import defenses, rng
from certssb_jax.certify import bounds
from certssb_jax.data import sources as data_lib
from certssb_jax.ensemble import member, trained, trainer as ensemble
from certssb_jax.experiment import answering, config as config_lib, identity, pipeline, report, rundir
from certssb_jax.models import zoo as models_lib

# The kernel's summed probabilities against a plain loop: to the backend's default matmul precision (float32 on
# CPU, TF32 convolutions on recent NVIDIA GPUs), as in tests/test_certify_kernel.py.
PROBS_TOL = dict(rtol=1e-5, atol=1e-6) if jax.default_backend() == "cpu" else dict(rtol=1e-3, atol=5e-4)

SUMMARY_KEYS = ("dataset", "n_train", "n_test", "n_poisoned", "num_models", "models", "alpha", "bound",
                "defense", "margin_ceiling", "radius_grid", "metrics", "pre_store", "consistency",
                "other_order", "probe", "timings_s", "versions", "devices", "undefended", "precision", "seed")
OUTPUTS = ("config.json", "summary.json", "per_sample.csv", "votes.npz", "sigmas.npz", "certified_accuracy.png",
           "store.npz", "poison.npz", "sigma_histogram.png")


def _rows(workdir, split=None):
  with open(os.path.join(workdir, "per_sample.csv")) as f:
    return [r for r in csv.DictReader(f) if split is None or r["split"] == split]


def test_outputs_and_schema(tiny_run):
  c, workdir, summary = tiny_run
  for name in OUTPUTS:
    assert os.path.exists(os.path.join(workdir, name)), name
    assert os.stat(os.path.join(workdir, name)).st_mode & 0o044 == 0o044, f"{name} is not readable by others"
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  for key in SUMMARY_KEYS:
    assert key in on_disk, key
  metrics = on_disk["metrics"]
  for key in ("clean_accuracy", "era", "asr", "abstain_rate", "abstain_rate_triggered", "cra", "cra_test"):
    assert key in metrics
  assert list(metrics["cra"]) == [str(float(r)) for r in on_disk["radius_grid"]]
  assert on_disk["n_train"] == 256 and on_disk["n_test"] == 64 and on_disk["num_models"] == 8
  assert on_disk["n_poisoned"] == round(0.05 * 256)  # a fraction of the whole training set
  assert set(on_disk["undefended"]) == {"clean_accuracy", "era", "asr"}
  assert on_disk["models"] == {"trained": 8, "search": 0, "voting": 8, "class_selection": 0, "estimating": 8}
  rows = _rows(workdir)
  n_trig = on_disk["n_triggered"]
  assert len(rows) == 64 + n_trig
  votes = np.load(os.path.join(workdir, "votes.npz"))
  assert votes["clean"].shape == (64, 2) and votes["triggered"].shape == (n_trig, 2)
  assert np.all(votes["clean"].sum(axis=1) == 8)
  assert metrics["clean_accuracy"] > 0.8  # the real data learn, even in this tiny run
  assert on_disk["consistency"]["contradictions"] == 0


def test_p_lower_and_margin_equal_an_independent_scipy_recomputation(tiny_run):
  c, workdir, _ = tiny_run
  votes = np.load(os.path.join(workdir, "votes.npz"))
  alpha = c.certify.alpha / 2  # Bonferroni over the two classes
  for split in ("clean", "triggered"):
    for r, counts in zip(_rows(workdir, split), votes[split]):
      top, m = int(np.argmax(counts)), int(counts.sum())
      p_low = 0.0 if counts[top] == 0 else stats.beta.ppf(alpha, counts[top], m - counts[top] + 1)
      assert float(r["p_lower"]) == pytest.approx(p_low, rel=1e-9, abs=1e-12)
      expected_margin = stats.norm.ppf(p_low) if p_low > 0.5 else 0.0  # pB_high = 1 - pA_low
      assert float(r["margin"]) == pytest.approx(expected_margin, rel=1e-9, abs=1e-12)
      assert int(r["pred"]) == (top if p_low > 0.5 else -1)
      assert int(r["votes_top"]) == counts[top]


def test_radius_uses_the_sigma_the_kernel_sampled_with(tiny_run):
  """Every row: radius_test = sigma * margin with the sigma in sigmas.npz (the one passed to the kernel), and
  radius = min(sigma_x, min_j sigma_j) * margin, except in a run that searched sigma_x (this one): a searched
  sigma_x depends on the poisoned training set, so its joint radius is 0 (docs/soundness.md), before the store
  (radius) and in the answer (radius_joint_stored), where the test-input radius stands."""
  c, workdir, _ = tiny_run
  searched = defenses.noise_plan(config_lib.resolve(c)).search_test
  assert searched
  sig = np.load(os.path.join(workdir, "sigmas.npz"))
  sigma_train_min = float(sig["train"].min())
  for split in ("clean", "triggered"):
    rows = _rows(workdir, split)
    np.testing.assert_array_equal(sig[f"test_{split}_index"], [int(r["index"]) for r in rows])
    assert any(float(r["margin"]) > 0 for r in rows) and any(float(r["radius_stored"]) > 0 for r in rows)
    for r, s in zip(rows, sig[f"test_{split}"]):
      assert float(r["sigma"]) == pytest.approx(float(s), rel=1e-7)
      assert float(r["radius_test"]) == pytest.approx(float(s) * float(r["margin"]), rel=1e-7, abs=1e-12)
      joint_sigma = 0.0 if searched else min(float(s), sigma_train_min)
      assert float(r["radius"]) == pytest.approx(joint_sigma * float(r["margin"]), rel=1e-6, abs=1e-12)
      if searched:
        assert float(r["radius_joint_stored"]) == 0.0, r


def test_votes_recounted_model_by_model_from_the_run_folder(tiny_run, tmp_path):
  """The votes of the run recounted without the kernel: the trained models read back from the run folder's
  checkpoints, the inputs rebuilt by the data stages, each model m run on x + sigma_x * u_m (u_m =
  normal(member_key(seed, TEST_NOISE, m)), sigma_x from sigmas.npz) in a plain loop. Every model's class, the
  vote counts and the summed probabilities equal votes.npz, and per_sample.csv's radius_test is that same sigma_x
  times the margin: the sigma in the radius is the one the noise was sampled with. A kernel that samples at
  sigma_0 while the radius uses sigma_x (the reference release's bug) fails here; the test
  test_radius_uses_the_sigma_the_kernel_sampled_with, which reads sigma and radius from the outputs alone, does
  not see it."""
  c, workdir, _ = tiny_run
  cfg = config_lib.resolve(c)
  ds = pipeline.load_data(cfg)
  attacked = pipeline.poison(cfg, ds, rundir.RunDir(str(tmp_path)), pipeline.no_progress)  # writes to tmp only
  sig = np.load(os.path.join(workdir, "sigmas.npz"))
  saved = np.load(os.path.join(workdir, "votes.npz"))
  num_models = cfg.train.num_models
  per_chunk = ensemble.auto_models_per_chunk(cfg.train.models_per_chunk, num_models)  # as train_ensemble saved
  trainer = ensemble.Trainers().get(attacked.model, ds.input_shape, cfg, models_per_chunk=per_chunk)
  preds = {s: np.full((num_models, len(attacked.splits[s].y)), -1) for s in pipeline.SPLITS}
  probs_sum = {s: np.zeros((len(attacked.splits[s].y), ds.num_classes)) for s in pipeline.SPLITS}
  for ids, state in trained.TrainedEnsemble(trainer, num_models, rundir.RunDir(workdir)).chunks():
    for j, m in enumerate(int(i) for i in ids):
      if m >= num_models:  # padding of the last chunk
        continue
      variables = member.variables_of(*jax.tree.map(lambda a, j=j: a[j], (state.params, state.batch_stats)))
      u = np.asarray(jax.random.normal(rng.member_key(cfg.seed, rng.TEST_NOISE, m), ds.input_shape))
      for s in pipeline.SPLITS:
        noised = attacked.splits[s].x + sig[f"test_{s}"][:, None, None, None] * u
        logits = attacked.model.apply(variables, jnp.asarray(noised, jnp.float32), train=False)
        preds[s][m] = np.asarray(models_lib.logits_to_pred(logits))
        probs_sum[s] += np.asarray(models_lib.logits_to_probs(logits), np.float64)
  voters = slice(num_models - config_lib.num_voters(cfg), num_models)
  for s in pipeline.SPLITS:
    np.testing.assert_array_equal(preds[s], saved[f"{s}_preds"], err_msg=f"{s}: classes of the models")
    # the soft scores move with sigma even where no vote flips (the digits of this run are easy)
    np.testing.assert_allclose(probs_sum[s], saved[f"{s}_probs_sum"], **PROBS_TOL, err_msg=f"{s}: probabilities")
    counts = np.stack([(preds[s][voters] == k).sum(axis=0) for k in range(ds.num_classes)], axis=1)
    np.testing.assert_array_equal(counts, saved[s], err_msg=f"{s}: vote counts")
    rows = _rows(workdir, s)
    margin = np.array([float(r["margin"]) for r in rows])
    radius_test = np.array([float(r["radius_test"]) for r in rows])
    np.testing.assert_allclose(radius_test, sig[f"test_{s}"].astype(np.float64) * margin, rtol=1e-7, atol=1e-12)
  assert np.any(sig["test_clean"] != cfg.sigma.sigma_0)  # the run searched: sampling at sigma_0 would differ


def _headline_from_rows(rows_by_split, grid, pred_col, joint_col, test_col, target):
  def split(rows):
    y = np.array([int(r["label"]) for r in rows])
    pred = np.array([int(r[pred_col]) for r in rows])
    joint = np.array([float(r[joint_col]) for r in rows])
    test = np.array([float(r[test_col]) for r in rows])
    return y, pred, joint, test

  y, pred, joint, test = split(rows_by_split["clean"])
  ty, tpred, _, _ = split(rows_by_split["triggered"])
  cra = lambda rad: {str(float(r)): float(np.mean((pred == y) & (rad > r))) for r in grid}
  answered = tpred != -1
  return {"clean_accuracy": float(np.mean(pred == y)), "era": float(np.mean(tpred == ty)),
          "asr": float(np.mean(tpred == target)) if answered.any() else None,
          "cra": cra(joint), "cra_test": cra(test)}


def test_reported_numbers_are_the_storage_update_answers(tiny_run):
  """summary.metrics recomputed from per_sample.csv's pred_stored / radius_joint_stored / radius_stored, and
  summary.pre_store from the certificates before the store (pred / radius / radius_test)."""
  c, workdir, summary = tiny_run
  rows = {s: _rows(workdir, s) for s in ("clean", "triggered")}
  grid = summary["radius_grid"]
  after = _headline_from_rows(rows, grid, "pred_stored", "radius_joint_stored", "radius_stored", 0)
  before = _headline_from_rows(rows, grid, "pred", "radius", "radius_test", 0)
  for key, value in after.items():
    assert summary["metrics"][key] == value, key
  for key, value in before.items():
    assert summary["pre_store"][key] == value, key


def test_store_answers_are_consistent_and_saved(tiny_run):
  c, workdir, summary = tiny_run
  st = np.load(os.path.join(workdir, "store.npz"))
  rows = _rows(workdir, "clean") + _rows(workdir, "triggered")
  answered = [r for r in rows if int(r["pred_stored"]) != -1]
  assert len(st["label"]) == len(answered)  # one store, every answered query of both splits, in order
  np.testing.assert_allclose(st["radius"], [float(r["radius_stored"]) for r in answered])
  from certssb_jax.store import certified as store_lib  # pylint: disable=g-import-not-at-top
  assert store_lib.audit(st["x"], st["label"], st["radius"])[0] == 0


def test_one_store_answers_both_splits_without_contradictions(tmp_path):
  """The tiny run's certificates do not contradict each other (easy digits: nothing to align or trim), so the
  audits of its outputs cannot fail. Here the pipeline's storage-update stage gets certificates that do: every clean input
  certified with its label and every triggered copy, at most the trigger's norm away, with the target class, both
  with radius 2. One store for both splits answers without a contradiction, and in the run's order (clean first)
  the triggered copies of the other class take the clean label; a store per split would keep the pairs."""
  cfg = config_lib.resolve(tiny_config())
  attacked = pipeline.poison(cfg, pipeline.load_data(cfg), rundir.RunDir(str(tmp_path)), pipeline.no_progress)
  certs, sigma = {}, {}
  for s in pipeline.SPLITS:
    n = len(attacked.splits[s].y)
    pred = attacked.splits[s].y if s == "clean" else np.full(n, cfg.attack.target_class)
    radius, sigma[s] = np.full(n, 2.0), np.full(n, cfg.sigma.sigma_0, np.float32)
    margin = radius / sigma[s]
    certs[s] = bounds.Certificate(pred.astype(np.int64), np.full(n, 0.99), np.full(n, 0.01), margin, radius, radius,
                                  np.full(n, cfg.train.num_models))
  cat = lambda f: np.concatenate([f(s) for s in pipeline.SPLITS])
  x = cat(lambda s: attacked.splits[s].x)
  from certssb_jax.store import certified as store_lib  # pylint: disable=g-import-not-at-top
  assert store_lib.audit(x, cat(lambda s: certs[s].pred), cat(lambda s: certs[s].radius_test))[0] > 0
  answers = answering.storage_update(cfg, attacked, certs, sigma, sigma, "clean_first")
  assert store_lib.audit(x, cat(lambda s: answers[s].pred), cat(lambda s: answers[s].radius_stored))[0] == 0
  trig = attacked.splits["triggered"]
  np.testing.assert_array_equal(answers["triggered"].pred, trig.y)  # the attack fails: the clean label answers
  assert answers["triggered"].aligned.all()


def test_same_seed_gives_identical_outputs(tiny_run, tmp_path):
  _, workdir, _ = tiny_run
  again = str(tmp_path / "again")
  pipeline.run(tiny_config(), again)
  for name in ("per_sample.csv", "poison.npz"):
    assert filecmp.cmp(os.path.join(workdir, name), os.path.join(again, name), shallow=False), name
  for name in ("votes.npz", "sigmas.npz", "store.npz"):
    a, b = np.load(os.path.join(workdir, name)), np.load(os.path.join(again, name))
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")


def test_a_run_trains_its_own_epochs_after_a_run_with_other_epochs(tmp_path):
  """The trainer (and its compiled step) is shared by runs that differ only in epochs; each run still trains
  for its own number: a run after a 2-epoch run in the same trainers equals the same run in new ones."""
  overrides = dict(num_models=2, max_train=64, max_test=16, defense="rab", **{"undefended.enabled": False})
  pipeline.run(tiny_config(**overrides, epochs=1), str(tmp_path / "fresh"))
  shared = ensemble.Trainers()
  pipeline.run(tiny_config(**overrides, epochs=2), str(tmp_path / "two_epochs"), trainers=shared)
  pipeline.run(tiny_config(**overrides, epochs=1), str(tmp_path / "after"), trainers=shared)
  a, b = np.load(tmp_path / "fresh" / "votes.npz"), np.load(tmp_path / "after" / "votes.npz")
  np.testing.assert_array_equal(a["clean_probs_sum"], b["clean_probs_sum"])
  assert not np.array_equal(a["clean_probs_sum"], np.load(tmp_path / "two_epochs" / "votes.npz")["clean_probs_sum"])


def test_checkpoint_grouping_and_reading_back_do_not_change_results(tiny_run, tmp_path, monkeypatch):
  """The tiny run kept its ensemble in memory and saved its first chunk alone and the other three together; a run
  that saves every chunk on its own and certifies from the checkpoints (nothing kept in memory) gives the same
  bits."""
  c, workdir, _ = tiny_run
  again = str(tmp_path / "per_chunk")
  monkeypatch.setattr(trained, "KEEP_IN_MEMORY_BYTES", 0)
  pipeline.run(tiny_config(**{"train.checkpoint_every_s": 0}), again)
  assert sorted(os.listdir(os.path.join(workdir, "ensemble"))) == ["chunks_00000-00000", "chunks_00001-00003"]
  assert sorted(os.listdir(os.path.join(again, "ensemble"))) == [f"chunks_0000{i}-0000{i}" for i in range(4)]
  assert filecmp.cmp(os.path.join(workdir, "per_sample.csv"), os.path.join(again, "per_sample.csv"), shallow=False)
  cfg = config_lib.resolve(c)
  from certssb_jax.models import zoo as models  # pylint: disable=g-import-not-at-top
  trainer = ensemble.Trainers().get(models.get_model(cfg.model.name, 2), (28, 28, 1), cfg, models_per_chunk=2)
  grouped = list(trained.TrainedEnsemble(trainer, 8, rundir.RunDir(workdir)).chunks())
  single = list(trained.TrainedEnsemble(trainer, 8, rundir.RunDir(again)).chunks())
  assert [list(ids) for ids, _ in grouped] == [[0, 1], [2, 3], [4, 5], [6, 7]]
  for (ids_a, sa), (ids_b, sb) in zip(grouped, single):
    np.testing.assert_array_equal(ids_a, ids_b)
    assert sa.opt_state is None and sb.opt_state is None  # only params and batch statistics are saved
    for la, lb in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
      np.testing.assert_array_equal(la, lb)
  with pytest.raises(FileNotFoundError, match="chunk 4 of the ensemble is in no checkpoint"):
    list(trained.TrainedEnsemble(trainer, 9, rundir.RunDir(workdir)).chunks())


def test_rerun_in_the_same_workdir_reuses_every_stage(tiny_run, caplog):
  c, workdir, summary = tiny_run
  before = open(os.path.join(workdir, "per_sample.csv")).read()
  with caplog.at_level(logging.INFO, logger="certssb_jax"):
    again = pipeline.run(tiny_config(), workdir)
  assert "reusing stage votes" in caplog.text and "train ensemble" not in caplog.text
  assert open(os.path.join(workdir, "per_sample.csv")).read() == before
  assert again["metrics"] == summary["metrics"]
  for stage in ("undefended", "pilot", "train_ensemble", "votes"):  # the compute time of the first run, kept
    assert again["timings_s"][stage] == summary["timings_s"][stage], stage


@pytest.mark.parametrize("override,message", [
    ({"trigger": "star"}, "attack.trigger 'star'"),
    ({"sigma_0": -0.1}, "sigma.sigma_0 must be > 0"),
    ({"alpha": 1.5}, "certify.alpha must be in"),
    ({"bound": "bernstein"}, "certify.bound 'bernstein'"),
    ({"target_class": 2}, "attack.target_class 2"),
    ({"source": "idx", "data.name": "toy"}, "set data.data_dir"),
    ({"model.pretrained": "/nonexistent/weights.npz"}, "is not a file"),
    ({"poison_rate": 1.5}, "poison_rate must be in"),
    ({"bound": "hoeffding", "correction": "holdout"}, "does not work with certify.bound 'hoeffding'"),
    ({"scorer": "ensemble", "sigma.search_models": 0}, "breaks the bound's coverage"),
    ({"sigma.search_models": 2}, "is for sigma.scorer 'ensemble'"),
    ({"scorer": "ensemble", "sigma.search_models": 8}, "no model is left to vote"),
    ({"objective": "labels"}, "did you mean 'label'"),
])
def test_bad_config_stops_before_any_work(override, message, tmp_path):
  c = tiny_config(**override)
  with pytest.raises(ValueError, match=message):
    pipeline.run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # nothing started


def test_missing_data_folder_stops_with_a_clear_message(tmp_path):
  c = tiny_config(source="idx", data_dir=str(tmp_path / "nowhere"))
  with pytest.raises(data_lib.DataError, match="nowhere"):
    pipeline.run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_labels_outside_the_pair_stop_with_a_clear_message(tmp_path):
  c = tiny_config()
  c.data.classes = (0, 11)
  with pytest.raises(data_lib.DataError, match="11"):
    pipeline.run(c, str(tmp_path / "w"))


def test_a_workdir_with_another_config_is_refused(tiny_run):
  _, workdir, _ = tiny_run
  with pytest.raises(rundir.ConfigMismatchError, match="seed: 0 -> 1"):
    pipeline.run(tiny_config(seed=1), workdir)
  assert os.path.exists(os.path.join(workdir, "votes.npz"))  # nothing lost


def test_config_variants_parse_and_resolve():
  c = config_lib.load_config("configs/mnist.py:trigger=fourpixel,sigma_0=0.5,num_models=200,bound=hoeffding")
  assert (c.attack.trigger, c.sigma.sigma_0, c.train.num_models, c.certify.bound) == ("fourpixel", 0.5, 200, "hoeffding")
  r = config_lib.resolve(c)
  assert (r.sigma.sigma_lo, r.sigma.sigma_hi, r.sigma.num_steps, r.sigma.num_draws) == (0.5, 0.5, 10, 8)
  assert r.undefended.epochs == 20 and r.sigma.pilot_epochs == 20
  ref = config_lib.resolve(config_lib.load_config("configs/mnist.py:rule=reference"))
  assert (ref.sigma.num_steps, ref.sigma.num_draws, ref.sigma.lr) == (850, 1, 1e-4)
  assert config_lib.load_config("configs/quickstart.py:quick").train.num_models < 40
  assert config_lib.load_config("configs/fashion_mnist.py:classes=7+9").data.classes == (7, 9)
  assert config_lib.parse_variant("classes=0,1,quick,num_models=16") == {"classes": "0,1", "quick": "true",
                                                                         "num_models": "16"}
  with pytest.raises(ValueError, match="unknown config field 'sigma0' \\(did you mean 'sigma_0'\\?\\)"):
    config_lib.load_config("configs/mnist.py:sigma0=0.5")
  with pytest.raises(ValueError, match="cannot read"):
    config_lib.load_config("configs/mnist.py:num_models=many")
  with pytest.raises(ValueError, match="does not exist"):
    config_lib.load_config("configs/nosuch.py")


def test_the_default_cert_ssb_range_answers_at_sigma_0_without_a_pilot(tmp_path):
  """sigma.sigma_hi defaults to sigma_0: no pilot, no search, every sigma_x = sigma_0 (RAB's noise), and the store,
  the audit and the probe as in every Cert-SSB run."""
  c = tiny_config(num_models=4, epochs=1, max_train=64, max_test=16, **{"sigma.sigma_hi": None})
  cfg = config_lib.resolve(c)
  assert cfg.sigma.sigma_hi == 0.25 and not defenses.noise_plan(cfg).search_test
  summary = pipeline.run(c, str(tmp_path / "d"))
  assert not os.path.exists(tmp_path / "d" / "pilot")
  sig = np.load(tmp_path / "d" / "sigmas.npz")
  for k in ("train", "test_clean", "test_triggered"):
    np.testing.assert_array_equal(sig[k], np.float32(0.25))
  assert summary["probe"]["auc_poisoned"] == 0.5 and not summary["probe"]["channel"]
  assert summary["consistency"]["contradictions"] == 0


def test_random_seed_is_drawn_and_recorded(tmp_path):
  seeds = {config_lib.apply_overrides(config_lib.base_config(), {"seed": "random"}).seed for _ in range(3)}
  assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)
  c = tiny_config(seed="random", num_models=2, epochs=1, max_train=64, max_test=16, **{"undefended.enabled": False})
  pipeline.run(c, str(tmp_path / "r"))
  assert json.load(open(tmp_path / "r" / "config.json"))["seed"] == c.seed


def test_too_few_models_warns_with_the_number_needed(caplog):
  with caplog.at_level(logging.WARNING, logger="certssb_jax"):
    assert report.warn_if_uncertifiable(config_lib.resolve(tiny_config(num_models=4, alpha=0.001))) == 0.0
  assert "4 estimating models cannot certify any radius" in caplog.text and "at least 11 are needed" in caplog.text


def test_margin_ceiling_and_radius_grid():
  cfg = config_lib.resolve(tiny_config(num_models=60, alpha=0.001))
  from certssb_jax.experiment import metrics  # pylint: disable=g-import-not-at-top
  ceiling = bounds.margin_ceiling(60, 0.001, num_classes=2)
  assert metrics.margin_ceiling(cfg) == ceiling
  assert metrics.radius_grid(cfg)[4] == pytest.approx(0.95 * ceiling * 0.25, abs=1e-4)


def test_a_field_an_older_config_lacks_counts_as_its_default():
  old = {"model": {"name": "mnist_cnn"}, "seed": 0}
  assert identity.differences(old, {"model": {"name": "mnist_cnn", "conv": "xla"}, "seed": 0}) == []
  assert identity.differences(old, {"model": {"name": "mnist_cnn", "conv": "patches"}, "seed": 0}) == [
      "model.conv: 'xla' -> 'patches'"]
  assert identity.differences({"train": {"checkpoint_every_s": 1}}, {"train": {"checkpoint_every_s": 9}}) == []
  # and the models such a config trained are found again (a sweep links them instead of retraining)
  full = config_lib.to_json(config_lib.resolve(tiny_config(defense="rab")))
  older = json.loads(json.dumps(full))
  del older["model"]["conv"], older["attack"]["selection"]
  assert identity.training_key(older) == identity.training_key(full)
  older["model"]["name"] = "preact_resnet"
  assert identity.training_key(older) != identity.training_key(full)
