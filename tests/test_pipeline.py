"""End to end on real MNIST digits: outputs, their schema, an independent recomputation, determinism, errors."""

import csv
import filecmp
import json
import os

import jax
import numpy as np
import pytest
from scipy import stats

from certssb_jax import config as config_lib
from certssb_jax import data as data_lib
from certssb_jax import pipeline

from conftest import tiny_config  # pylint: disable=g-bad-import-order

SUMMARY_KEYS = ("dataset", "n_train", "n_test", "n_poisoned", "num_models", "alpha", "bound", "sigma_mode",
                "margin_ceiling", "metrics", "timings_s", "versions", "devices", "undefended")
OUTPUTS = ("config.json", "summary.json", "per_sample.csv", "votes.npz", "sigmas.npz", "certified_accuracy.png",
           "store.npz", "poison.npz", "sigma_histogram.png")


def _rows(workdir):
  with open(os.path.join(workdir, "per_sample.csv")) as f:
    return list(csv.DictReader(f))


def test_outputs_and_schema(tiny_run):
  c, workdir, summary = tiny_run
  for name in OUTPUTS:
    assert os.path.exists(os.path.join(workdir, name)), name
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  for key in SUMMARY_KEYS:
    assert key in on_disk, key
  metrics = on_disk["metrics"]
  for key in ("clean_accuracy", "era", "asr", "abstain_rate", "cra"):
    assert key in metrics
  assert list(metrics["cra"]) == [str(float(r)) for r in np.round(np.arange(0, 2.51, 0.25), 2)]
  assert on_disk["n_train"] == 256 and on_disk["n_test"] == 64 and on_disk["num_models"] == 8
  assert on_disk["n_poisoned"] == round(0.05 * 128)
  assert set(on_disk["undefended"]) == {"clean_accuracy", "era", "asr"}
  assert "storage_update" in on_disk
  rows = _rows(workdir)
  n_trig = on_disk["n_triggered"]
  assert len(rows) == 64 + n_trig
  assert {r["split"] for r in rows} == {"clean", "triggered"}
  votes = np.load(os.path.join(workdir, "votes.npz"))
  assert votes["clean"].shape == (64, 2) and votes["triggered"].shape == (n_trig, 2)
  assert np.all(votes["clean"].sum(axis=1) == 8)
  # the real data learn: the smoothed ensemble is far better than chance even in this tiny run
  assert metrics["clean_accuracy"] > 0.8


def test_p_lower_and_margin_equal_an_independent_scipy_recomputation(tiny_run):
  c, workdir, _ = tiny_run
  votes = np.load(os.path.join(workdir, "votes.npz"))
  k = 2
  alpha = c.certify.alpha / k  # Bonferroni over the classes
  rows = _rows(workdir)
  for split in ("clean", "triggered"):
    split_rows = [r for r in rows if r["split"] == split]
    for i, r in enumerate(split_rows):
      counts = votes[split][i]
      top = int(np.argmax(counts))
      m = int(counts.sum())
      p_low = 0.0 if counts[top] == 0 else stats.beta.ppf(alpha, counts[top], m - counts[top] + 1)
      assert float(r["p_lower"]) == pytest.approx(p_low, rel=1e-9, abs=1e-12)
      expected_margin = stats.norm.ppf(p_low) if p_low > 0.5 else 0.0  # pB_high = 1 - pA_low
      assert float(r["margin"]) == pytest.approx(expected_margin, rel=1e-9, abs=1e-12)
      assert int(r["pred"]) == (top if p_low > 0.5 else -1)
      assert int(r["votes_top"]) == counts[top]


def test_radius_uses_the_sigma_the_kernel_sampled_with(tiny_run):
  """Every row: radius_test = sigma * margin with the sigma in sigmas.npz (the one passed to the kernel), and
  radius = min(sigma_x, min_j sigma_j) * margin."""
  c, workdir, _ = tiny_run
  sig = np.load(os.path.join(workdir, "sigmas.npz"))
  sigma_train_min = float(sig["train"].min())
  rows = _rows(workdir)
  assert sig["train"].std() > 0  # sample-specific: the sigmas really differ
  for split in ("clean", "triggered"):
    split_rows = [r for r in rows if r["split"] == split]
    np.testing.assert_array_equal(sig[f"test_{split}_index"], [int(r["index"]) for r in split_rows])
    for r, s in zip(split_rows, sig[f"test_{split}"]):
      assert float(r["sigma"]) == pytest.approx(float(s), rel=1e-7)
      assert float(r["radius_test"]) == pytest.approx(float(s) * float(r["margin"]), rel=1e-7, abs=1e-12)
      assert float(r["radius"]) == pytest.approx(min(float(s), sigma_train_min) * float(r["margin"]), rel=1e-6,
                                                 abs=1e-12)


def test_same_seed_gives_identical_outputs(tiny_run, tmp_path):
  c, workdir, _ = tiny_run
  again = str(tmp_path / "again")
  pipeline.run(tiny_config(), again)
  for name in ("per_sample.csv", "poison.npz"):
    assert filecmp.cmp(os.path.join(workdir, name), os.path.join(again, name), shallow=False), name
  for name in ("votes.npz", "sigmas.npz", "store.npz"):
    a, b = np.load(os.path.join(workdir, name)), np.load(os.path.join(again, name))
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")


def test_checkpoint_grouping_and_reading_back_do_not_change_results(tiny_run, tmp_path, monkeypatch):
  """The tiny run kept its ensemble in memory and saved its 2 chunks in one checkpoint; a run that saves every
  chunk on its own and certifies from the checkpoints (nothing kept in memory) gives the same bits."""
  from certssb_jax import ensemble, models  # pylint: disable=g-import-not-at-top

  c, workdir, _ = tiny_run
  again = str(tmp_path / "per_chunk")
  monkeypatch.setattr(pipeline, "KEEP_ENSEMBLE_IN_MEMORY_BYTES", 0)
  pipeline.run(tiny_config(**{"train.checkpoint_every_s": 0}), again)
  assert os.listdir(os.path.join(workdir, "ensemble")) == ["chunks_00000-00001"]
  assert sorted(os.listdir(os.path.join(again, "ensemble"))) == ["chunks_00000-00000", "chunks_00001-00001"]
  assert filecmp.cmp(os.path.join(workdir, "per_sample.csv"), os.path.join(again, "per_sample.csv"), shallow=False)
  a, b = np.load(os.path.join(workdir, "votes.npz")), np.load(os.path.join(again, "votes.npz"))
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  t = c.train
  trainer = ensemble.EnsembleTrainer(models.get_model(c.model.name, len(c.data.classes)), (28, 28, 1),
                                     ensemble.TrainConfig(t.epochs, t.batch_size, t.learning_rate, t.models_per_chunk))
  grouped = list(pipeline.iter_ensemble(trainer, workdir, t.num_models))
  single = list(pipeline.iter_ensemble(trainer, again, t.num_models))
  assert [list(ids) for ids, _ in grouped] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  for (ids_a, sa), (ids_b, sb) in zip(grouped, single):
    np.testing.assert_array_equal(ids_a, ids_b)
    assert sa.opt_state is None and sb.opt_state is None  # only params and batch statistics are saved
    for la, lb in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
      np.testing.assert_array_equal(la, lb)
  with pytest.raises(FileNotFoundError, match="chunk 2 of the ensemble is in no checkpoint"):
    list(pipeline.iter_ensemble(trainer, workdir, t.num_models + 1))


def test_rerun_in_the_same_workdir_reuses_every_stage(tiny_run, caplog):
  c, workdir, summary = tiny_run
  before = open(os.path.join(workdir, "per_sample.csv")).read()
  import logging
  with caplog.at_level(logging.INFO, logger="certssb_jax"):
    again = pipeline.run(tiny_config(), workdir)
  assert "reusing" in caplog.text
  assert open(os.path.join(workdir, "per_sample.csv")).read() == before
  assert again["metrics"] == summary["metrics"]


@pytest.mark.parametrize("override,message", [
    ({"trigger": "star"}, "attack.trigger 'star'"),
    ({"sigma_0": -0.1}, "sigma.sigma_0 must be > 0"),
    ({"alpha": 1.5}, "certify.alpha must be in"),
    ({"bound": "bernstein"}, "certify.bound 'bernstein'"),
    ({"target_class": 2}, "attack.target_class 2"),
    ({"source": "idx"}, "needs data.data_dir"),
    ({"model.pretrained": "/nonexistent/weights.npz"}, "is not a file"),
    ({"poison_rate": 1.5}, "poison_rate must be in"),
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
  assert not os.path.exists(tmp_path / "w" / "ensemble")


def test_labels_outside_the_pair_stop_with_a_clear_message(tmp_path):
  c = tiny_config()
  c.data.classes = (0, 11)
  with pytest.raises(data_lib.DataError, match="11"):
    pipeline.run(c, str(tmp_path / "w"))


def test_a_workdir_with_another_config_is_refused(tiny_run):
  c, workdir, _ = tiny_run
  other = tiny_config(seed=1)
  with pytest.raises(pipeline.ConfigMismatchError, match="seed: 0 -> 1"):
    pipeline.run(other, workdir)
  assert os.path.exists(os.path.join(workdir, "votes.npz"))  # nothing lost


def test_config_variants_parse():
  from configs import mnist, quickstart  # noqa: F401
  c = mnist.get_config("trigger=fourpixel,sigma_0=0.5,num_models=200,bound=hoeffding")
  assert (c.attack.trigger, c.sigma.sigma_0, c.train.num_models, c.certify.bound) == ("fourpixel", 0.5, 200, "hoeffding")
  config_lib.validate_config(c)
  q = quickstart.get_config("quick")
  assert q.train.num_models < 40
  with pytest.raises(ValueError, match="unknown config field"):
    mnist.get_config("sigma0=0.5")
  with pytest.raises(ValueError, match="cannot read"):
    mnist.get_config("num_models=many")


def test_too_few_models_warns_with_the_number_needed(caplog):
  import logging
  c = tiny_config(num_models=4, alpha=0.001)
  with caplog.at_level(logging.WARNING, logger="certssb_jax"):
    assert pipeline.warn_if_uncertifiable(c) == 0.0
  assert "4 models cannot certify any radius" in caplog.text and "at least 11 models" in caplog.text
