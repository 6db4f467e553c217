"""The launcher as a user runs it: `python -m certssb_jax.launch` on the quick configs, and its error exit."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, timeout=300, env=None):
  return subprocess.run([sys.executable, "-m", "certssb_jax.launch", *args, "--noprogress"], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy())


@pytest.mark.parametrize("config,own_cache", [("configs/quickstart.py:quick", False), ("configs/mnist.py:quick", True)])
def test_quick_configs_run_through_the_launcher(config, own_cache, tmp_path):
  """The second run fills the compilation cache the launcher turns on (the suite's shared cache, set through
  JAX_COMPILATION_CACHE_DIR, is taken away from it)."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  cache = ["--compilation_cache_dir", str(tmp_path / "xla")] if own_cache else []
  out = _launch("--config", config, "--workdir", str(tmp_path / "w"), *cache, env=env if own_cache else None)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (len(os.listdir(tmp_path / "xla")) > 5) if own_cache else not os.path.exists(tmp_path / "xla")
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
