"""Progress of the long stages, in the form that suits where it goes: bars on a terminal (or notebook widgets), a
logged line every tenth of the work elsewhere (a log file, a notebook without ipywidgets, the Python API), where
carriage-return bars would fill the output with thousands of updates.

A progress factory is ``progress(description, total, unit)``, a context manager yielding ``update(n)``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import time
from typing import Callable, ContextManager, Iterator

logger = logging.getLogger("certssb_jax.progress")

Progress = Callable[[str, int, str], ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(desc: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
  del desc, total, unit
  yield lambda n: None


@contextlib.contextmanager
def tqdm_progress(desc: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
  """A tqdm bar with rate and ETA: a widget in a notebook that has ipywidgets, text otherwise."""
  in_notebook = "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None
  if in_notebook:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  else:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True) as bar:
    yield bar.update


@contextlib.contextmanager
def log_progress(desc: str, total: int, unit: str, every: float = 0.1) -> Iterator[Callable[[int], None]]:
  """Logs one INFO line each time another ``every`` of the work is done (rate and time left), and one at the end."""
  done, next_mark, t0 = 0, every, time.monotonic()

  def update(n: int) -> None:
    nonlocal done, next_mark
    done += n
    if total and done / total >= next_mark and done < total:
      elapsed = time.monotonic() - t0
      rate = done / elapsed if elapsed > 0 else float("inf")
      logger.info("%s: %d%% (%d of %d %ss, %.3g %s/s, %.0f s left)", desc, int(100 * done / total), done, total,
                  unit, rate, unit, (total - done) / rate if rate else float("nan"))
      while next_mark <= done / total:
        next_mark += every

  yield update
  logger.info("%s: %d %ss in %.1f s", desc, done, unit, time.monotonic() - t0)


def default_progress(primary: bool = True) -> Progress:
  """Bars where a person watches (a terminal, a notebook), logged lines otherwise; none on processes other than
  the one that reports (``primary``)."""
  if not primary:
    return no_progress
  return tqdm_progress if sys.stderr.isatty() or "ipykernel" in sys.modules else log_progress
