"""The launcher and the sweep as a user runs them: the quick configs end to end, and every user mistake ends with
one line on stderr, exit code 2 and nothing written."""

import json
import os

from conftest import write_tiny_config  # pylint: disable=g-bad-import-order
import helpers
import numpy as np
import pytest


@pytest.mark.slow
@pytest.mark.parametrize("config,own_cache", [("configs/quickstart.py:quick", False), ("configs/mnist.py:quick", True),
                                              ("configs/fashion_mnist.py:quick", False)])
def test_quick_configs_run_through_the_launcher(config, own_cache, tmp_path):
  """The second run fills the compilation cache the launcher turns on (the suite's shared cache, set through
  JAX_COMPILATION_CACHE_DIR, is taken away from it). The Fashion-MNIST run reads the real files from their
  default folder (Debian's dataset-fashion-mnist, which .ci/run installs)."""
  environ = helpers.env()
  if own_cache:
    environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  cache = ["--compilation_cache_dir", str(tmp_path / "xla")] if own_cache else []
  out = helpers.launch("--config", config, "--workdir", str(tmp_path / "w"), *cache, environ=environ)
  stdout = helpers.check(out, "launch")
  assert (len(os.listdir(tmp_path / "xla")) > 5) if own_cache else not os.path.exists(tmp_path / "xla")
  assert "clean accuracy" in stdout and "undefended ASR" in stdout  # the one-screen table
  assert "summary.json" in stdout  # where the files went
  summary = json.load(open(tmp_path / "w" / "summary.json"))
  assert summary["undefended"] is not None
  # the table's radii are ones the run can certify: below the margin ceiling times its largest sigma
  radii = [float(l.split(" > ")[1].split(")")[0]) for l in stdout.splitlines() if l.startswith("CRA(")]
  reach = summary["margin_ceiling"] * (summary["sigma_search"] or {}).get("sigma_hi", summary["sigma_0"])
  assert len(radii) == 6 and max(radii) < reach, (radii, reach)


@pytest.mark.slow
def test_the_ten_class_count_config_runs_through_the_launcher(tmp_path):
  out = helpers.launch("--config", "configs/fashion_mnist10.py:quick", "--workdir", str(tmp_path / "w"))
  stdout = helpers.check(out, "DPA+ROE")
  summary = json.load(open(tmp_path / "w" / "summary.json"))
  assert summary["classes"] == list(range(10)) and summary["n_poisoned"] == 0
  assert "certified accuracy, 1 insertions/deletions" in stdout


def _one_error_line(proc, *fragments):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr
  assert "Traceback" not in proc.stderr and "resuming" not in proc.stderr and "FATAL" not in proc.stderr
  for f in fragments:
    assert f in errors[0], errors[0]
  return errors[0]


@pytest.mark.parametrize("args,fragments", [
    (["--config", "configs/nosuch.py"], ["config file", "nosuch.py", "does not exist"]),
    (["--config", "configs/quickstart.py", "--config.train.epocs=3"], ["unknown config field 'train.epocs'",
                                                                        "did you mean 'train.epochs'"]),
    (["--config", "configs/quickstart.py:trigers=fourpixel"], ["unknown config field 'trigers'",
                                                                "did you mean 'trigger'"]),
    (["--config", "configs/quickstart.py:trigger=star"], ["attack.trigger 'star'"]),
    (["--config", "configs/quickstart.py:num_models=many"], ["cannot read 'many' as int"]),
    (["--config", "configs/quickstart.py:sigma_mode=fixed"], ["config field 'sigma_mode' is gone", "defense=rab"]),
    (["--config", "configs/quickstart.py", "--compare", "rab,dpq"], ["defense.name 'dpq'", "did you mean 'dpa'"]),
    (["--config", "configs/quickstart.py:source=idx,data_dir=/nonexistent"], ["/nonexistent"]),
    (["--config", "configs/quickstart.py", "--nosuchflag"], ["nosuchflag"]),
    (["--workdir_missing"], ["workdir_missing"]),
])
def test_user_mistakes_end_with_one_line_and_exit_code_2(args, fragments, tmp_path):
  workdir = tmp_path / "w"
  extra = ["--workdir", str(workdir)] if "--workdir_missing" not in args else ["--config", "configs/quickstart.py"]
  proc = helpers.launch(*[a for a in args if a != "--workdir_missing"], *extra)
  if "--workdir_missing" in args:
    _one_error_line(proc, "--workdir is required")
  else:
    _one_error_line(proc, *fragments)
  assert not workdir.exists()  # nothing written


def test_a_workdir_of_another_run_is_refused_and_kept(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"seed": 5}))
  (workdir / "votes.npz").write_bytes(b"results of another run")
  proc = helpers.launch("--config", write_tiny_config(tmp_path / "c.py"), "--workdir", str(workdir))
  _one_error_line(proc, "holds a run with another config", "--fresh")
  assert (workdir / "votes.npz").read_bytes() == b"results of another run"
  assert json.loads((workdir / "config.json").read_text()) == {"seed": 5}


def test_the_sweep_refuses_a_bad_config_before_any_training(tmp_path):
  proc = helpers.run_module("certssb_jax.studies", "sweep", "--config", "configs/quickstart.py:quick,sigma_0=-1",
                            "--workdir", str(tmp_path / "s"), "--noprogress")
  _one_error_line(proc, "sigma.sigma_0 must be > 0")
  assert not os.path.exists(tmp_path / "s" / "mnist_0-1")


@pytest.mark.parametrize("overrides,method,rows", [
    ({"defense.name": "rab", "sigma.sigma_hi": None}, "RAB", ["CRA(joint radius", "margin ceiling"]),
    ({"sigma.sigma_hi": None}, "Cert-SSB", ["CRA(joint radius", "contradictions"]),
    ({"defense.name": "dpa"}, "DPA", ["certified accuracy, 1 insertions/deletions", "largest possible, modifications"]),
    ({"defense.name": "bagging", "certify.alpha": 0.001, "train.num_models": 12},
     "bagging", ["certified accuracy, 1 modifications", "each p >= 1 - 0.001"]),
    ({"defense.name": "finite_aggregation", "defense.spread": 2}, "FA", ["certified accuracy, 1 insertions/deletions"]),
    ({"defense.name": "fa_roe", "defense.spread": 2, "data.classes": "0,1,2"},
     "FA+ROE", ["certified accuracy, 1 insertions/deletions"]),
    ({"defense.name": "dpa_smoothing", "sigma.sigma_0": 0.5, "sigma.sigma_hi": None, "certify.draws": 32},
     "DPA+smoothing", ["largest modifications r with a test trigger < 1: median / max",
                       "certified accuracy, 0 changes, test trigger < 1"]),
])
def test_every_defense_runs_through_the_launcher_and_prints_its_table(tmp_path, overrides, method, rows):
  spec = write_tiny_config(tmp_path / "c.py", **{"undefended.enabled": False, "train.num_models": 6, **overrides})
  stdout = helpers.check(helpers.launch("--config", spec, "--workdir", str(tmp_path / "w")), method)
  header = stdout.strip().splitlines()[0]
  assert header.split() == [method], stdout
  for row in ["clean accuracy", "majority vote: clean / ERA / ASR", *rows]:
    assert row in stdout, (row, stdout)
  assert f"{method}: wrote" in stdout


def test_compare_runs_defenses_side_by_side_and_trains_shared_members_once(tmp_path):
  """--compare dpa,dpa_roe: two run folders, one table; the run-off's folder links DPA's trained members (equal
  training identity) instead of training them again, and both certify from the same members' votes."""
  spec = write_tiny_config(tmp_path / "c.py", **{"undefended.enabled": False, "train.num_models": 6,
                                                 "data.classes": "0,1,2"})
  workdir = tmp_path / "w"
  stdout = helpers.check(helpers.launch("--config", spec, "--workdir", str(workdir), "--compare", "dpa,dpa_roe"),
                         "compare")
  assert stdout.strip().splitlines()[0].split() == ["dpa", "dpa_roe"], stdout
  assert "dpa_roe: wrote" in stdout and str(workdir / "dpa_roe") in stdout
  folder = workdir / "dpa_roe" / "ensemble"
  assert any(os.path.islink(folder / n) for n in os.listdir(folder)), os.listdir(folder)
  a, b = (np.load(workdir / d / "votes.npz") for d in ("dpa", "dpa_roe"))
  np.testing.assert_array_equal(a["clean_preds"], b["clean_preds"])
