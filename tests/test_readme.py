"""The README's Python API examples run as written (the full run made quick), and its two commands are the ones
CI and a new user run."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.slow
def test_readme_python_api_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code = "\n".join(re.findall(r"```python\n(.*?)```", open(README).read(), re.S))
  shrink = {
      'config_lib.load_config("configs/quickstart.py:num_models=16")':
          'config_lib.load_config("configs/quickstart.py:quick,num_models=12")',
      '"/tmp/q16"': f'{str(tmp_path / "q16")!r}',
      '"/tmp/store.npz"': f'{str(tmp_path / "store.npz")!r}',
  }
  for old, new in shrink.items():
    assert old in code, old  # the README still shows this line
    code = code.replace(old, new)
  namespace = {}
  exec(compile(code, README, "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["summary"]["consistency"]["contradictions"] == 0
  assert namespace["cert"].pred.shape == (200,) and namespace["answer"].pred.shape == (200,)
  assert os.path.exists(tmp_path / "store.npz")


def test_the_readme_gives_the_two_commands_ci_runs():
  text = open(README).read()
  assert "python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/quickstart" in text
  assert "python -m pytest -q" in text
  ci = open(os.path.join(os.path.dirname(README), ".ci", "run")).read()
  assert "python -m pytest -q" in ci
