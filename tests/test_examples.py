"""The example notebook runs: its code cells, in order, in one namespace, in a temporary folder."""

import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")


def _load():
  with open(NOTEBOOK) as f:
    return json.load(f)


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


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  folder = tmp_path_factory.mktemp("notebook")
  cwd = os.getcwd()
  os.chdir(folder)
  namespace = {"__name__": "__main__"}
  try:
    for i, cell in enumerate(c for c in _load()["cells"] if c["cell_type"] == "code"):
      program = compile("".join(cell["source"]), f"quickstart.ipynb:code{i}", "exec")
      exec(program, namespace)  # pylint: disable=exec-used
  finally:
    os.chdir(cwd)
  return folder, namespace


def test_the_notebook_certifies_and_plots(executed):
  folder, ns = executed
  m, x, y = ns["M"], ns["x"], ns["y"]
  assert ns["preds"].shape == (m, len(x))
  np.testing.assert_array_equal(ns["votes"].sum(axis=1), m)
  assert ns["accuracy"] > 0.8  # real digits: the smoothed ensemble learns even at this size
  assert np.ptp(ns["exp"].sigma_train) > 0  # the sample-specific search moved the sigmas
  assert len(ns["answer"].pred) == len(y)
  assert os.path.getsize(os.path.join(folder, "certified_accuracy.png")) > 1000
  assert sorted(os.listdir(os.path.join(folder, "quickstart_run", "ensemble"))) == ["chunks_00000-00001"]


def test_the_notebook_votes_equal_a_naive_recomputation_of_model_0(executed):
  """Model 0's predictions, recomputed with a plain model.apply on x + sigma_x * u_0 (no sharding, no layout)."""
  import jax  # pylint: disable=g-import-not-at-top

  from certssb_jax import models  # pylint: disable=g-import-not-at-top
  from certssb_jax import rng  # pylint: disable=g-import-not-at-top

  _, ns = executed
  exp, x = ns["exp"], ns["x"]
  ids, state = next(iter(ns["pipeline"].iter_ensemble(ns["trainer"], ns["workdir"], ns["M"])))
  assert ids[0] == 0
  u0 = np.asarray(jax.random.normal(rng.member_key(ns["config"].seed, rng.TEST_NOISE, 0), x.shape[1:]))
  params = jax.tree.map(lambda a: np.asarray(a)[0], state.params)
  sigma = ns["exp"].sigma_test["clean"].reshape(-1, 1, 1, 1)
  logits = exp.model.apply({"params": params}, x + sigma * u0, train=False)
  np.testing.assert_array_equal(np.asarray(models.logits_to_pred(logits)), ns["preds"][0])
