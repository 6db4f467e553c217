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
      '"/tmp/q16_dpa"': f'{str(tmp_path / "q16_dpa")!r}',
      '"/tmp/store.npz"': f'{str(tmp_path / "store.npz")!r}',
  }
  for old, new in shrink.items():
    assert old in code, old  # the README still shows this line
    code = code.replace(old, new)
  namespace = {}
  exec(compile(code, README, "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["summary"]["consistency"]["contradictions"] == 0
  assert namespace["counts"]["method"] == "DPA" and namespace["counts"]["defense"]["partitions"] == 16
  assert namespace["cert"].pred.shape == (200,) and namespace["answer"].pred.shape == (200,)
  assert namespace["right"].mean() > 0.5  # the example certifies most inputs, as it says in words
  assert os.path.exists(tmp_path / "store.npz")


def _two_commands() -> list[str]:
  block = re.search(r"## The two commands\n\n```bash\n(.*?)```", open(README).read(), re.S)
  assert block, "the README has no bash block under '## The two commands'"
  return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_the_readme_gives_the_two_commands_ci_runs(monkeypatch):
  """Two commands: a launch of a config that exists and resolves, and the test command CI's script ends with."""
  from certssb_jax import launch  # pylint: disable=g-import-not-at-top
  from certssb_jax.experiment import config as config_lib  # pylint: disable=g-import-not-at-top

  main, tests = _two_commands()
  words = main.split()
  assert words[:3] == ["python", "-m", "certssb_jax.launch"], main
  spec, overrides, rest = launch.split_config_args(words[3:])
  assert rest[0] == "--workdir" and len(rest) == 2, main
  monkeypatch.chdir(os.path.dirname(README))  # the commands run from the clone's root
  config_lib.resolve(config_lib.apply_overrides(config_lib.load_config(spec), overrides))
  ci = [line.strip() for line in open(os.path.join(os.path.dirname(README), ".ci", "run")) if line.strip()]
  assert ci[-1] == tests == "python -m pytest -q"
