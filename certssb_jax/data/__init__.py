"""Data: image sources and readers, the fetch command, triggers (the attacker's side).

``sources.load_dataset`` is the one entry point; ``python -m certssb_jax.data fetch NAME`` downloads a data set.
"""

from certssb_jax.data.dataset import DataError, Dataset
from certssb_jax.data.sources import load_dataset

__all__ = ["DataError", "Dataset", "load_dataset"]
