"""Config checks that stop a run before anything is computed: one line naming the field, and a value that works
where one can be named."""

from __future__ import annotations

import difflib
from typing import Any


def check(ok: bool, message: str) -> None:
  """Raises ``ValueError("invalid config: <message>")`` unless ``ok``."""
  if not ok:
    raise ValueError(f"invalid config: {message}")


def did_you_mean(name: str, choices: list[str]) -> str:
  """`` (did you mean X?)`` for the closest choice, or ``""``."""
  close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(value: Any, choices, field: str) -> None:
  """Checks that ``value`` is one of ``choices`` (a dict: its keys), naming the closest one when it is not."""
  choices = sorted(choices) if isinstance(choices, dict) else list(choices)
  check(value in choices, f"{field} {value!r} is not one of {choices}{did_you_mean(str(value), choices)}")
