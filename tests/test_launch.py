"""The launcher as a user runs it: `python -m certssb_jax.launch` on the quick configs, and its error exit."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "certssb_jax.launch", *args, "--noprogress"], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


@pytest.mark.parametrize("config", ["configs/quickstart.py:quick", "configs/mnist.py:quick"])
def test_quick_configs_run_through_the_launcher(config, tmp_path):
  out = _launch("--config", config, "--workdir", str(tmp_path / "w"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "clean accuracy" in out.stdout and "undefended ASR" in out.stdout  # the one-screen table
  assert "summary.json" in out.stdout  # the paths of the files written
  summary = json.load(open(tmp_path / "w" / "summary.json"))
  assert summary["metrics"]["clean_accuracy"] > 0.9  # real digits, even at one epoch
  assert summary["undefended"] is not None


def test_bad_config_exits_with_a_clear_message(tmp_path):
  out = _launch("--config", "configs/quickstart.py:trigger=star", "--workdir", str(tmp_path / "w"))
  assert out.returncode == 2
  assert "attack.trigger 'star'" in out.stderr
  assert not os.path.exists(tmp_path / "w")
