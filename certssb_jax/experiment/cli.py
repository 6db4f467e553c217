"""What every ``python -m certssb_jax.*`` command shares: a user's mistake (a bad flag, a stray argument, bad
input found later) is one ``error:`` line on stderr and exit code 2, and the run folders keep what was done."""

from __future__ import annotations

import logging
import sys
from typing import Callable, NoReturn

from absl import app, flags

USER_ERRORS = (ValueError, FileNotFoundError)  # config, data and run-folder errors are ValueErrors


def fail(message: object) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # an unknown or malformed flag (absl's message names near matches)
    fail(e)


def checked(body: Callable[[], None]) -> Callable[[list[str]], None]:
  """An ``absl.app`` main that refuses positional arguments, logs this package at INFO and the libraries at
  WARNING (orbax logs every checkpoint at INFO), and turns a user error raised by ``body`` into ``fail``."""

  def main(argv: list[str]) -> None:
    try:
      if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
      logging.getLogger().setLevel(logging.WARNING)
      logging.getLogger("certssb_jax").setLevel(logging.INFO)
      body()
    except USER_ERRORS as e:
      fail(e)

  return main


def run(body: Callable[[], None], argv: list[str] | None = None) -> None:
  """Parses the flags (defined by the caller) and runs ``body`` under ``checked``."""
  app.run(checked(body), argv=argv, flags_parser=parse_flags)


def require(**values: object) -> None:
  """Raises one line naming the required flags that are missing."""
  missing = [f"--{k}" for k, v in values.items() if not v]
  if missing:
    raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")


def numbers(values: list[str], kind: type, flag: str) -> list:
  """A comma-separated flag's values as ``kind``; one line naming the flag and an example otherwise."""
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise ValueError(f"--{flag} takes numbers, e.g. --{flag} {'32,64' if kind is int else '0.5,1'}; got "
                     f"{','.join(values)}") from None


def one_config(configs: list[str] | None) -> str:
  """The one ``--config`` of a study that takes one."""
  require(config=configs)
  if len(configs) > 1:
    raise ValueError(f"this study takes one --config, got {len(configs)}: {' '.join(configs)}")
  return configs[0]


def progress(show: bool):
  """The pipeline's progress: bars on a terminal, logged lines in a log file (``progress.default_progress``); none
  without ``show``."""
  from certssb_jax import progress as progress_lib  # pylint: disable=g-import-not-at-top

  return progress_lib.default_progress() if show else progress_lib.no_progress
