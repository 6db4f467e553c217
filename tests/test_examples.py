"""The example notebook runs: its code cells, in order, in one namespace, in a temporary folder."""

import contextlib
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")


def _load():
  with open(NOTEBOOK) as f:
    return json.load(f)


def _code_cells() -> list[str]:
  return ["".join(c["source"]) for c in _load()["cells"] if c["cell_type"] == "code"]


def _install_cell(monkeypatch, folder, source=None, installed=False) -> list[list[str]]:
  """Runs the notebook's first cell from ``folder``, by default as in a runtime without certssb_jax (Colab);
  returns the commands it ran instead of running them."""
  commands = []
  if not installed:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "certssb_jax" else find_spec(name, *a))
  monkeypatch.setattr(subprocess, "check_call", lambda cmd, **kwargs: commands.append(cmd))
  monkeypatch.chdir(folder)
  if source is None:
    monkeypatch.delenv("CERTSSB_JAX_SOURCE", raising=False)
  else:
    monkeypatch.setenv("CERTSSB_JAX_SOURCE", source)
  code = compile(_code_cells()[0], "quickstart.ipynb:code0", "exec")
  with contextlib.redirect_stdout(io.StringIO()):
    exec(code, {"__name__": "__main__"})  # pylint: disable=exec-used
  return commands


@pytest.mark.skipif(os.path.isdir("/content"), reason="a Colab runtime: its /content may hold uploads")
def test_the_first_cell_installs_an_uploaded_wheel_or_archive_else_the_clone(monkeypatch, tmp_path):
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  # Colab: the wheel (or a zip of the repository) uploaded next to the notebook; the latest upload wins
  (tmp_path / "certssb-jax-main.zip").write_bytes(b"")
  wheel = tmp_path / "certssb_jax-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  os.utime(tmp_path / "certssb-jax-main.zip", (0, 0))
  assert _install_cell(monkeypatch, tmp_path) == [pip + [str(wheel)]]
  # a clone: the notebook in examples/
  assert _install_cell(monkeypatch, os.path.join(ROOT, "examples")) == [pip + [ROOT]]
  # the variable overrides both
  assert _install_cell(monkeypatch, tmp_path, "git+https://example.org/certssb-jax") == [
      pip + ["git+https://example.org/certssb-jax"]]
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(RuntimeError, match="upload its wheel"):
    _install_cell(monkeypatch, empty)
  monkeypatch.undo()
  assert _install_cell(monkeypatch, tmp_path, installed=True) == []  # the package is here: nothing to install


def test_the_notebook_is_valid_nbformat_4():
  nb = _load()
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 0
  assert "kernelspec" in nb["metadata"]
  ids = set()
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code")
    assert isinstance(cell["source"], list) and all(isinstance(line, str) for line in cell["source"])
    assert cell["id"] not in ids
    ids.add(cell["id"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None  # stored without outputs
  kinds = [c["cell_type"] for c in nb["cells"]]
  assert kinds.count("code") >= 6 and kinds[0] == "markdown"
  # the first cell says how to run it in Colab, where no repository can be cloned: upload a wheel
  assert "In Colab" in "".join(nb["cells"][0]["source"])
  assert "python -m pip wheel . --no-deps -w dist" in "".join(nb["cells"][0]["source"])


@pytest.fixture(scope="module")
def executed(tmp_path_factory, monkeypatch_module):
  """Every code cell in order, in one namespace, from a temporary folder (the notebook writes into its own
  temporary folder, OUT); what the notebook displays and prints is recorded."""
  from IPython import display  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top

  from certssb_jax.experiment import pipeline  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  shown, defaults = [], []
  monkeypatch_module.setattr(display, "display", shown.append)
  # in a notebook the default progress is tqdm's, whose widgets need ipywidgets: the notebook passes its own
  monkeypatch_module.setattr(pipeline, "default_progress", lambda *a: defaults.append(a) or pipeline.no_progress)
  monkeypatch_module.setattr(display, "Image", lambda path: path)
  folder = tmp_path_factory.mktemp("notebook")
  monkeypatch_module.chdir(folder)
  namespace = {"__name__": "__main__"}
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    for i, cell in enumerate(_code_cells()):
      exec(compile(cell, f"quickstart.ipynb:code{i}", "exec"), namespace)  # pylint: disable=exec-used
  assert not os.listdir(folder)  # nothing written into the working directory
  namespace["PRINTED"], namespace["DEFAULT_PROGRESS"] = printed.getvalue(), defaults
  return namespace, shown


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


@pytest.mark.slow
def test_the_notebook_shows_the_attack_and_both_defenses(executed):
  ns, shown = executed
  rab, ssb = ns["runs"]["rab"], ns["runs"]["cert_ssb"]
  assert rab["undefended"]["asr"] > 0.3  # the attack works without a defense
  assert rab["metrics"]["clean_accuracy"] > 0.8 and ssb["metrics"]["clean_accuracy"] > 0.8  # real digits learn
  assert ssb["consistency"]["contradictions"] == 0
  assert len(shown) == 3 and all(os.path.getsize(p) > 1000 for p in shown)
  assert all(p.startswith(ns["OUT"]) for p in shown)


@pytest.mark.slow
def test_the_notebooks_stages_give_the_votes_of_a_naive_recomputation_of_model_0(executed):
  """Model 0's votes in the by-hand stages, recomputed with a plain model.apply on x + sigma_x * u_0."""
  import jax  # pylint: disable=g-import-not-at-top

  from certssb_jax import rng  # pylint: disable=g-import-not-at-top
  from certssb_jax.models import zoo as models  # pylint: disable=g-import-not-at-top

  ns, _ = executed
  attacked, members, sigma_test = ns["attacked"], ns["members"], ns["sigma_test"]
  x = attacked.splits["clean"].x
  ids, state = next(iter(members.chunks()))
  assert ids[0] == 0
  u0 = np.asarray(jax.random.normal(rng.member_key(ns["cfg"].seed, rng.TEST_NOISE, 0), x.shape[1:]))
  params = jax.tree.map(lambda a: np.asarray(a)[0], state.params)
  logits = attacked.model.apply({"params": params}, x + sigma_test["clean"].reshape(-1, 1, 1, 1) * u0, train=False)
  np.testing.assert_array_equal(np.asarray(models.logits_to_pred(logits)), ns["votes"]["clean_preds"][0])
  assert ns["answers"]["clean"].pred.shape == (len(x),)


@pytest.mark.slow
def test_the_notebooks_answers_are_the_runs_answers(executed):
  """The by-hand stages end with the answers the run reports (after the store; a searched answer's joint radius is
  0), and the notebook prints those, not the certificates before the store."""
  ns, _ = executed
  answers, cfg = ns["answers"]["clean"], ns["cfg"]
  with open(os.path.join(ns["OUT"], "compare", "cert_ssb", "per_sample.csv")) as f:
    rows = [r for r in csv.DictReader(f) if r["split"] == "clean"]
  np.testing.assert_array_equal(answers.pred, [int(r["pred_stored"]) for r in rows])
  np.testing.assert_array_equal(answers.radius_stored, [float(r["radius_stored"]) for r in rows])
  np.testing.assert_array_equal(answers.radius_joint, [float(r["radius_joint_stored"]) for r in rows])
  assert ns["defenses"].noise_plan(cfg).search_test and not answers.radius_joint.any()  # searched: test-input radii
  i = ns["i"]
  assert answers.radius_stored[i] == answers.radius_stored.max() > 0
  assert (f"test-input radius {answers.radius_stored[i]:.3f}, joint radius 0.000" in ns["PRINTED"])

@pytest.mark.slow
def test_the_notebook_prints_its_progress_as_lines(executed):
  ns, _ = executed
  assert not ns["DEFAULT_PROGRESS"]  # every stage got the notebook's progress, no tqdm bar
  assert "train ensemble (16 models): " in ns["PRINTED"]  # one line per finished stage
