"""Shared fixtures: a tiny end-to-end run on the built-in data (real MNIST digits), made once per session.

Markers: ``slow`` (a test that trains several runs or starts subprocesses; ``pytest -m "not slow"`` is the fast
development subset) and ``multiprocess`` (starts several JAX processes). CI runs everything.
"""

import os

# One persistent compilation cache for the whole test session (and the subprocesses it starts): the same
# programs are compiled by many small runs, and compilation dominates the suite's time on a 2-core CPU.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="certssb_jax_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from certssb_jax.experiment import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """The quickstart made tiny: 256 train / 64 test digits, 8 models, 2 epochs, alpha 0.1 so something certifies."""
  c = config_lib.base_config()
  c.data.source = "builtin"
  c.data.max_train = 256
  c.data.max_test = 64
  c.attack.poison_rate = 0.05
  c.train.num_models = 8
  c.train.epochs = 2
  c.train.batch_size = 32
  c.train.models_per_chunk = 2
  c.defense.name = "cert_ssb"
  c.sigma.sigma_0 = 0.25
  c.sigma.sigma_hi = 0.375  # search sigma_x (Cert-SSB's default range is the single point sigma_0)
  c.sigma.num_steps = 2
  c.sigma.num_draws = 2
  c.sigma.target_draws = 8
  c.sigma.batch_size = 128
  c.sigma.pilot_epochs = 1
  c.certify.alpha = 0.1
  c.undefended.epochs = 2
  return config_lib.apply_overrides(c, {k: str(v) for k, v in overrides.items()})


def write_tiny_config(path, **overrides) -> str:
  """Writes a config file (for ``--config``) whose get_config returns ``tiny_config(**overrides)``."""
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  with open(path, "w") as f:
    f.write(f"import sys\nsys.path.insert(0, {tests_dir!r})\nfrom conftest import tiny_config\n\n\n"
            f"def get_config(arg=None):\n  return tiny_config(**{overrides!r})\n")
  return str(path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(config, workdir, summary) of one tiny sample-specific run."""
  from certssb_jax.experiment import pipeline  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  c = tiny_config()
  return c, workdir, pipeline.run(c, workdir)
