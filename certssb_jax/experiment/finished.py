"""A finished run read back from its folder: the one reader the studies share (``sweep``, ``envelope``,
``families``, ``count_study``).

What a run wrote (docs/outputs.md): ``config.json`` (read in today's spelling, ``defenses.upgrade``),
``summary.json``, ``per_sample.csv`` (one row per test input and split) and ``votes.npz`` (every voting member's
class of every query), each read once, when first asked for.
"""

from __future__ import annotations

import csv
import functools
import os
from typing import Any, Callable

import ml_collections
import numpy as np

from certssb_jax import defenses, files


class FinishedRun:
  """The files of a finished run in ``workdir`` (a missing ``summary.json`` raises FileNotFoundError)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.summary: dict[str, Any] = files.load_json(os.path.join(workdir, "summary.json"))

  @functools.cached_property
  def config(self) -> dict[str, Any]:
    """``config.json`` as JSON, in today's spelling."""
    return defenses.upgrade(files.load_json(os.path.join(self.workdir, "config.json")))

  @functools.cached_property
  def resolved(self) -> ml_collections.ConfigDict:
    """``config.json`` as the config the run read (attribute access, as the stages and defenses take it)."""
    return ml_collections.ConfigDict(self.config)

  @property
  def defense(self) -> defenses.Defense:
    return defenses.get(self.resolved)

  @functools.cached_property
  def rows(self) -> list[dict[str, str]]:
    """``per_sample.csv``, one dict per row."""
    with open(os.path.join(self.workdir, "per_sample.csv")) as f:
      return list(csv.DictReader(f))

  @functools.cached_property
  def votes(self) -> dict[str, np.ndarray]:
    """``votes.npz``: ``<split>_preds`` (M, N) every member's class, and the other arrays the run saved."""
    return files.load_npz(os.path.join(self.workdir, "votes.npz"))

  def column(self, split: str, name: str, kind: Callable[[str], Any] = float) -> np.ndarray:
    """One column of ``per_sample.csv`` over the rows of ``split``, read as ``kind``."""
    return np.array([kind(r[name]) for r in self.rows if r["split"] == split])
