"""The data as the attacker left it: what every stage after the poisoning reads."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from certssb_jax.data.dataset import Dataset

# The test splits every run evaluates: clean inputs, and the non-target inputs with the trigger added.
SPLITS = ("clean", "triggered")


@dataclasses.dataclass(frozen=True)
class Split:
  """A test split: inputs, TRUE labels, their indices in the test set and (triggered) the trigger norms."""

  x: np.ndarray  # (N, H, W, C)
  y: np.ndarray  # (N,)
  index: np.ndarray  # (N,)
  trigger_norm: np.ndarray | None = None  # (N,)


@dataclasses.dataclass(frozen=True)
class Attacked:
  """The poisoned training set and the clean and triggered test splits, with the model every member shares."""

  data: Dataset
  x_train: np.ndarray  # (n, H, W, C) poisoned training inputs
  y_train: np.ndarray  # (n,) poisoned training labels
  poison_indices: np.ndarray  # (n_poisoned,)
  poison_norms: np.ndarray  # (n_poisoned,) effective trigger norms
  splits: dict[str, Split]
  model: Any  # the Flax model (a flax.linen.Module)
