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
def executed(tmp_path_factory, monkeypatch_module):
  """Every code cell in order, in one namespace, from a temporary folder (the notebook writes into its own
  temporary folder, OUT); what the notebook displays is recorded."""
  from IPython import display  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  shown = []
  monkeypatch_module.setattr(display, "display", shown.append)
  monkeypatch_module.setattr(display, "Image", lambda path: path)
  folder = tmp_path_factory.mktemp("notebook")
  monkeypatch_module.chdir(folder)
  namespace = {"__name__": "__main__"}
  for i, cell in enumerate(c for c in _load()["cells"] if c["cell_type"] == "code"):
    exec(compile("".join(cell["source"]), f"quickstart.ipynb:code{i}", "exec"), namespace)  # pylint: disable=exec-used
  assert not os.listdir(folder)  # nothing written into the working directory
  return namespace, shown


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


@pytest.mark.slow
def test_the_notebook_shows_the_attack_and_both_defenses(executed):
  ns, shown = executed
  rab, ssb = ns["runs"]["RAB"], ns["runs"]["Cert-SSB"]
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
