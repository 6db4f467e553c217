"""Weights of one model on disk: save, read, and merge into a freshly initialised model (all but its head)."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

from flax import traverse_util
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- weights on disk
#
# Format: one ``.npz`` file (numpy's zip of ``.npy`` arrays, read with ``allow_pickle=False``), one entry per
# array of the variable tree, keyed by the "/"-joined path of nested dict keys: for ResNet18 params
# "stem_conv/kernel" (7, 7, 3, 64), "stem_bn/scale" (64,), "stage2_block1/proj_conv/kernel" (1, 1, 64, 128),
# "head/kernel" (512, L), ... Convolution kernels are Flax's HWIO (a PyTorch OIHW kernel converts with
# ``w.transpose(2, 3, 1, 0)``; a PyTorch linear weight with ``w.T``). The same functions work on the
# ``batch_stats`` tree ("stem_bn/mean", "stem_bn/var") or on the whole variables dict ("params/stem_conv/kernel").


def save_params(params: Mapping[str, Any], path: str) -> None:
  """Writes a (nested dict) variable tree of ONE model to ``path`` as an ``.npz`` with "a/b/c" keys.

  Args:
    params: nested mapping of arrays (e.g. ``variables["params"]``), without a leading model axis.
    path: output file; written exactly there (no ``.npz`` suffix appended), through a temporary file.

  Raises:
    ValueError: a key contains "/" (it could not be read back unambiguously) or the tree is empty.
  """
  flat = _flatten(params)
  if not flat:
    raise ValueError("save_params: the parameter tree has no arrays")
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
  os.replace(tmp, path)


def read_params(path: str) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` written by ``save_params``, as a flat {"a/b/c": array} dict.

  Raises:
    ValueError: the file is missing or not a readable ``.npz`` of arrays.
  """
  if not os.path.isfile(path):
    raise ValueError(f"pretrained weights file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read pretrained weights {path} as an .npz of arrays: {e}") from e


def merge_params(params: Mapping[str, Any], flat: Mapping[str, Any], *, exclude: Sequence[str] = ("head",),
                 source: str = "pretrained weights") -> dict[str, Any]:
  """Replaces every array of ``params`` whose "/"-joined path is a key of ``flat``, except excluded modules.

  Pure (no I/O), so it can run inside a jitted, vmapped init: every model of an ensemble then starts from the
  same pretrained body and its own randomly initialised head (which keeps model m a function of its keys and
  its noised data, docs/method.md section 2).

  Args:
    params: nested mapping of arrays of one model (the freshly initialised tree).
    flat: {"a/b/c": array} of the weights to load.
    exclude: path components whose arrays are never replaced (default the ``head`` module, whose shape
      depends on the task).
    source: what ``flat`` is, for messages.

  Returns:
    A new nested dict, with replaced arrays cast to the dtype of the ones they replace.

  Raises:
    ValueError: a matching key has a different shape (names the key and both shapes), or no key matches.
  """
  own = _flatten(params)
  out, loaded = {}, 0
  for key, value in own.items():
    if key in flat and not set(key.split("/")) & set(exclude):
      new = flat[key]
      if tuple(np.shape(new)) != tuple(np.shape(value)):
        raise ValueError(f"{source}: {key!r} has shape {tuple(np.shape(new))} but the model expects "
                         f"{tuple(np.shape(value))}")
      out[key] = jnp.asarray(new, dtype=jnp.result_type(value))
      loaded += 1
    else:
      out[key] = value
  if loaded == 0:
    raise ValueError(f"{source}: none of its {len(flat)} arrays matches a parameter of the model (model keys "
                     f"look like {sorted(own)[:3]}, file keys like {sorted(flat)[:3]})")
  missing = [k for k in own if k not in flat and not set(k.split("/")) & set(exclude)]
  unused = [k for k in flat if k not in own]
  if missing or unused:
    logger.warning("%s: loaded %d arrays; %d model arrays not in the file (kept as initialised, e.g. %s); "
                   "%d file arrays unused (e.g. %s)", source, loaded, len(missing), missing[:3], len(unused),
                   unused[:3])
  return traverse_util.unflatten_dict(out, sep="/")


def load_pretrained(params: Mapping[str, Any], path: str, *, exclude: Sequence[str] = ("head",)) -> dict[str, Any]:
  """Loads local weights (an ``.npz`` of ``save_params``) into ``params``, keeping the head as initialised.

  Nothing is downloaded: convert published weights to this format once (see the format note above) and point
  here. Arrays are matched by their "/"-joined path; the ``head`` module (one logit or K) is never replaced,
  so an ImageNet classifier's 1000-way head is simply ignored.

  Args:
    params: the model's initialised variable tree (one model, e.g. ``variables["params"]``).
    path: the ``.npz`` file.
    exclude: module names never loaded (default ``("head",)``).

  Returns:
    The tree with every matching array replaced.

  Raises:
    ValueError: missing or unreadable file, a shape mismatch (naming the key), or no matching key.
  """
  return merge_params(params, read_params(path), exclude=exclude, source=f"pretrained weights {path}")


def _flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} of a nested mapping; raises ValueError on keys that contain "/"."""
  flat = traverse_util.flatten_dict(tree)
  for path in flat:
    bad = [k for k in path if "/" in str(k)]
    if bad:
      raise ValueError(f"parameter key {bad[0]!r} contains '/', which the flat format uses as separator")
  return {"/".join(map(str, path)): leaf for path, leaf in flat.items()}
