"""A progress factory for ``pipeline.run`` that records when each progress update happened (the benchmarks'
clock: stage and steady-state times without touching the pipeline)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator


class StepClock:
  """A progress factory for ``pipeline.run`` that records when each progress update happened.

  ``bars[desc]`` is a list of (perf_counter time, cumulative count), starting with the bar's opening.
  """

  def __init__(self):
    self.bars: dict[str, list[tuple[float, int]]] = {}

  @contextlib.contextmanager
  def __call__(self, desc: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    del total, unit
    rec = [(time.perf_counter(), 0)]
    self.bars[desc] = rec

    def update(n: int) -> None:
      if n:
        rec.append((time.perf_counter(), rec[-1][1] + n))

    yield update
    rec.append((time.perf_counter(), rec[-1][1]))  # the bar's closing (e.g. after the last checkpoint save)

  def bar(self, prefix: str) -> list[tuple[float, int]]:
    found = [v for k, v in self.bars.items() if k.startswith(prefix)]
    if len(found) != 1:
      raise KeyError(f"expected one progress bar starting with {prefix!r}, got {list(self.bars)}")
    return found[0]
