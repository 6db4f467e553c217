"""Configs and run folders written before RAB and Cert-SSB were defenses of their own (``defense.name =
"smoothing"`` with ``sigma.mode``): they load, compare equal to today's spelling, and their runs resume."""

import json
import os

from conftest import tiny_config
import ml_collections
import pytest

from certssb_jax import defenses, files
from certssb_jax.experiment import config as config_lib, identity, pipeline

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy_configs")


def _legacy(name):
  with open(os.path.join(LEGACY, f"{name}.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name,today", [("rab", "rab"), ("cert_ssb_search", "cert_ssb"), ("dpa_roe", "dpa_roe")])
def test_a_config_json_of_the_earlier_version_resolves_to_the_same_run(name, today):
  """config.json files that the previous version wrote (quickstart RAB, the quickstart searching sigma_x, DPA+ROE):
  read as a config, each resolves to today's defense with no field that computes differently."""
  old = _legacy(name)
  assert "mode" in old["sigma"]
  resolved = config_lib.resolve(ml_collections.ConfigDict(old))
  assert resolved.defense.name == today and "mode" not in resolved.sigma
  assert identity.differences(old, config_lib.to_json(resolved)) == []
  assert identity.training_key(old) == identity.training_key(config_lib.to_json(resolved))


def test_upgrade_names_each_old_defense():
  up = lambda name, mode: defenses.upgrade({"defense": {"name": name}, "sigma": {"mode": mode, "sigma_0": 1.0}})
  assert up("smoothing", "fixed")["defense"]["name"] == "rab"
  assert up("smoothing", "sample_specific")["defense"]["name"] == "cert_ssb"
  assert up("dpa", "fixed")["defense"]["name"] == "dpa"  # counting configs recorded mode "fixed" too
  assert "mode" not in up("smoothing", "fixed")["sigma"]
  today = {"defense": {"name": "rab"}, "sigma": {"sigma_0": 1.0}}
  assert defenses.upgrade(today) is today


def test_a_run_folder_of_the_earlier_version_resumes_without_computing_again(tmp_path, caplog):
  """A finished RAB run whose config.json is in the earlier spelling: the same run today reuses every stage."""
  c = tiny_config(defense="rab", num_models=2, max_train=64, max_test=16, **{"undefended.enabled": False})
  workdir = str(tmp_path / "rab")
  first = pipeline.run(c, workdir)
  path = os.path.join(workdir, "config.json")
  j = files.load_json(path)
  j["defense"]["name"] = "smoothing"
  j["sigma"]["mode"] = "fixed"
  with open(path, "w") as f:
    json.dump(j, f)
  votes = files.load_npz(os.path.join(workdir, "votes.npz"))
  caplog.set_level("INFO")
  caplog.clear()
  again = pipeline.run(c, workdir)
  assert "train ensemble" not in caplog.text and "reusing" in caplog.text
  assert again["metrics"] == first["metrics"]
  for k, v in files.load_npz(os.path.join(workdir, "votes.npz")).items():
    assert (v == votes[k]).all(), k
