"""The run folder: its paths, the config check, the stage cache, the model checkpoints and atomic writes.

A killed run leaves a folder that resumes: every finished stage is one ``.npz`` written to a temporary name and
renamed into place, models are Orbax checkpoints (which Orbax also commits atomically), and what a killed run
left half-written is removed when the folder is opened again. Only process 0 writes (``multihost``).

A run holds its folder from ``RunDir.open`` to ``RunDir.close`` through the lock file ``run.lock``
(``folder_lock``), so a second run started into it is refused instead of racing the first one's checkpoints. A
checkpoint that cannot be read back raises ``DamagedCheckpointError`` naming the models it held and how to
retrain just those.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import orbax.checkpoint as ocp

from certssb_jax import multihost
from certssb_jax.experiment import config as config_lib, identity
from certssb_jax.experiment.folder_lock import FolderLock, RunFolderBusyError
from certssb_jax.files import load_json, load_npz, save_json, save_npz

logger = logging.getLogger(__name__)

_ENSEMBLE_CHECKPOINT = re.compile(r"^chunks_(\d{5})-(\d{5})$")  # chunks first..last (inclusive) of the ensemble
_PARTIAL_CHECKPOINT = re.compile(r"^partial_(\d{5})_step(\d{8})$")  # chunk c part-trained, after that many steps
_RESULTS = ("stages", "ensemble", "pilot", "undefended", "surrogate")  # what --fresh discards


class ConfigMismatchError(ValueError):
  """The run folder holds a run with a different config."""


class DamagedCheckpointError(ValueError):
  """A model checkpoint of the run folder cannot be read back (truncated, deleted or foreign files)."""


# ---------------------------------------------------------------------------------------------- atomic files


def _remove(path: str) -> None:
  """Removes a file, a folder or a link (not what a link points to)."""
  if os.path.islink(path) or os.path.isfile(path):
    os.unlink(path)
  elif os.path.isdir(path):
    shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------- the folder


def check_config(path: str, config: Any, *, fresh: bool = False) -> bool:
  """Whether the folder holds a run with another config (its results would be discarded), without writing.

  Raises:
    ConfigMismatchError: it does (names the fields) and ``fresh`` is False.
  """
  new = config if isinstance(config, dict) else config_lib.to_json(config)
  old_path = os.path.join(path, "config.json")
  if not os.path.exists(old_path):
    return False
  try:
    diff = identity.differences(load_json(old_path), new)
  except (ValueError, AttributeError):
    diff = ["config.json: unreadable"]
  if diff and not fresh:
    raise ConfigMismatchError(
        f"{os.path.abspath(path)} holds a run with another config ({'; '.join(diff[:4])}"
        f"{'; ...' if len(diff) > 4 else ''}): use another --workdir, or --fresh to discard its results")
  return bool(diff)


# ---------------------------------------------------------------------------------------------- failed restores

# Paths being restored, and those whose restore failed. When one read of a restore fails, Orbax closes its event
# loop while TensorStore's other reads are in flight: each then reports "Event loop is closed" (an unraisable
# exception) or an unretrieved task's error (asyncio's logger), on stderr, after the run reported the damage in
# one line. Those echoes are dropped while a path is in this set; nothing else is.
_RESTORING: set[str] = set()
_SILENCED = [False]


def _silence_failed_restores() -> None:
  """Installs (once) the filters that drop the echoes of a failed restore (``_RESTORING``)."""
  if _SILENCED[0]:
    return
  _SILENCED[0] = True
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    exc = unraisable.exc_value
    if not (_RESTORING and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_echo_of_failed_restore)


def _echo_of_failed_restore(record: logging.LogRecord) -> bool:
  """False for asyncio's report of an unretrieved error that names a path being restored."""
  exc = record.exc_info[1] if record.exc_info else None
  return exc is None or not any(p in str(exc) for p in _RESTORING)


class RunDir:
  """One run's folder. ``RunDir.open`` locks it and checks it against the config; the stages then read and write
  through it; ``close`` (or leaving a ``with`` block) releases it."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self._checkpointer = ocp.StandardCheckpointer()
    self._lock: FolderLock | None = None
    self._whole = range(0)  # the chunks the save in the background holds whole

  @classmethod
  def open(cls, path: str, config: Any, *, fresh: bool = False) -> RunDir:
    """Creates the folder, or checks that the run it holds has the same config, and removes half-written files.

    Args:
      path: the folder.
      config: the resolved config (``config.resolve``); written to ``config.json``.
      fresh: discard the results of a run with another config instead of refusing.

    Raises:
      RunFolderBusyError: another live run holds the folder (names its host, pid and start).
      ConfigMismatchError: the folder's ``config.json`` differs (names the fields) and ``fresh`` is False.
    """
    rd = cls(path)
    refused = None
    if multihost.is_primary():
      try:
        # locked first: what looks half-written may be a live run's checkpoint in progress
        rd._lock = FolderLock.acquire(rd.path, rd)
        rd._check_config(config_lib.to_json(config), fresh)
        rd.clean_partial_writes()
      except (RunFolderBusyError, ConfigMismatchError) as e:
        refused = e
      except BaseException:
        rd.close()
        raise
    if not multihost.agree(refused is None):
      rd.close()
      raise refused or ConfigMismatchError(f"process 0 refused run folder {path} (see its log)")
    note = rd.describe() if multihost.is_primary() else None
    if note:
      logger.info("%s", note)
    return rd

  def close(self) -> None:
    """Waits for the checkpoints being saved, then releases the folder's lock (a second call does nothing)."""
    try:
      self._checkpointer.wait_until_finished()
    finally:
      if self._lock is not None:
        self._lock.release(self)
        self._lock = None

  def __enter__(self) -> RunDir:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def _check_config(self, new: dict[str, Any], fresh: bool) -> None:
    if check_config(self.path, new, fresh=fresh):
      for name in _RESULTS:
        _remove(self.file(name))
    os.makedirs(self.path, exist_ok=True)
    save_json(self.file("config.json"), new)

  def describe(self) -> str | None:
    """One line on what the folder already holds (what a resumed run reuses), or None when it holds nothing."""
    stages = sorted(f[:-4] for f in os.listdir(self.file("stages")) if f.endswith(".npz")) \
        if os.path.isdir(self.file("stages")) else []
    chunks = [c for first, last in self._listed_chunks() for c in range(first, last + 1)]
    models = [n for n in ("surrogate", "undefended", "pilot") if os.path.isdir(self.file(n))]
    if not (stages or chunks or models):
      return None
    return (f"resuming {self.path}: stages {', '.join(stages) or 'none'}; {len(chunks)} trained ensemble chunks"
            + (f"; models {', '.join(models)}" if models else ""))

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def clean_partial_writes(self) -> list[str]:
    """Removes what a killed run left half-written (Orbax ``*.orbax-checkpoint-tmp*`` folders, ``.tmp_*`` files
    of atomic writes): never reused, they would only accumulate. Returns the removed paths."""
    removed = []
    for folder in (self.path, self.file("stages"), self.file("ensemble")):
      for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(path, ignore_errors=True)
          removed.append(path)
        elif name.startswith(".tmp_") and os.path.isfile(path):
          os.remove(path)
          removed.append(path)
    for path in removed:
      logger.info("removed %s, left half-written by an interrupted run", path)
    return removed

  # ------------------------------------------------------------------ results and the stage cache

  def save_npz(self, name: str, **arrays: Any) -> None:
    if multihost.is_primary():
      save_npz(self.file(name), **arrays)

  def save_json(self, name: str, obj: Any) -> None:
    if multihost.is_primary():
      save_json(self.file(name), obj)

  def stage(self, name: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays of a finished stage, or ``compute()`` saved as one (its seconds go to ``timings``)."""
    path = self.file(os.path.join("stages", f"{name}.npz"))
    if multihost.agree(os.path.exists(path)):
      logger.info("reusing stage %s", name)
      return load_npz(path)
    t0 = time.perf_counter()
    out = multihost.broadcast_exact(compute())
    self.record_time(name, time.perf_counter() - t0)
    self.save_npz(os.path.join("stages", f"{name}.npz"), **out)
    return out

  def record_time(self, name: str, seconds: float, *, accumulate: bool = True) -> None:
    """Records the compute time of a stage in ``stages/timings.json``, kept across resumed runs: added to what
    earlier runs spent on it (a stage resumed after a kill), or replacing it (a stage every run recomputes)."""
    if not multihost.is_primary():
      return
    timings = self.timings()
    timings[name] = round((timings.get(name, 0.0) if accumulate else 0.0) + seconds, 3)
    save_json(self.file(os.path.join("stages", "timings.json")), timings)

  def timings(self) -> dict[str, float]:
    """Seconds spent computing each stage, over every run in this folder (reused work costs nothing)."""
    path = self.file(os.path.join("stages", "timings.json"))
    return load_json(path) if os.path.exists(path) else {}

  # ------------------------------------------------------------------ single models (pilot, undefended, ...)

  def has_model(self, name: str) -> bool:
    return multihost.agree(os.path.exists(self.file(name)))

  def restore_model(self, name: str, template: Any) -> Any:
    """The saved model ``name``. Raises DamagedCheckpointError when its checkpoint cannot be read back."""
    logger.info("reusing the %s model", name)
    return self._restore(self.file(name), template, f"the {name} model", "retrain it")

  def _restore(self, path: str, template: Any, held: str, remedy: str) -> Any:
    """Orbax's restore, its errors (of many types, from deep in TensorStore) turned into one line."""
    _silence_failed_restores()
    _RESTORING.add(path)
    try:
      out = self._checkpointer.restore(path, template)
    except Exception as e:  # pylint: disable=broad-except
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
      link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
      raise DamagedCheckpointError(
          f"checkpoint {path}{link} is damaged and cannot be read back ({reason[:300]}); it holds {held}: "
          f"delete {path} and run again to {remedy} (a resumed run trains only what no checkpoint holds; "
          "nothing else in the folder is lost)") from e
    _RESTORING.discard(path)  # kept on failure: the reads still in flight report it later
    return out

  def save_model(self, name: str, state: Any) -> None:
    self._checkpointer.save(self.file(name), state)
    self._checkpointer.wait_until_finished()

  # ------------------------------------------------------------------ ensemble chunks

  def chunks_dir(self, first: int, last: int) -> str:
    """The Orbax checkpoint of the trained chunks ``first..last`` (inclusive), stacked along the model axis."""
    return self.file(os.path.join("ensemble", f"chunks_{first:05d}-{last:05d}"))

  def saved_chunks(self) -> list[tuple[int, int]]:
    """(first, last) chunk of every complete ensemble checkpoint (Orbax writes under a temporary name and renames
    when complete, so a listed one is whole). Process 0's list, on every process (a collective)."""
    found = np.asarray(self._listed_chunks(), np.int64).reshape(-1, 2)
    return [tuple(int(v) for v in g) for g in multihost.broadcast_exact(found)]

  def _listed_chunks(self) -> list[tuple[int, int]]:
    """This process's listing of the complete ensemble checkpoints."""
    folder = self.file("ensemble")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [(int(m.group(1)), int(m.group(2))) for m in map(_ENSEMBLE_CHECKPOINT.match, names) if m]

  def save_chunks(self, first: int, last: int, tree: Any) -> None:
    """Starts saving chunks ``first..last`` in the background (after the previous save finished, whose chunks'
    part-trained checkpoints are then dropped)."""
    self.wait()
    self._checkpointer.save(self.chunks_dir(first, last), tree)
    self._whole = range(first, last + 1)

  def wait(self) -> None:
    """Waits for the save in the background; the part-trained checkpoints of the chunks it saved whole go."""
    self._checkpointer.wait_until_finished()
    for chunk in self._whole:
      for _, path in self._partials(chunk) if multihost.is_primary() else ():
        _remove(path)
    self._whole = range(0)

  def _partials(self, chunk: int) -> list[tuple[int, str]]:
    """(steps, path) of every complete part-trained checkpoint of ``chunk``, the most advanced last."""
    folder = self.file("ensemble")
    found = [(int(m.group(2)), os.path.join(folder, m.group(0))) for m in map(_PARTIAL_CHECKPOINT.match,
             sorted(os.listdir(folder)) if os.path.isdir(folder) else []) if m and int(m.group(1)) == chunk]
    return sorted(found)

  def save_partial(self, chunk: int, steps: int, tree: Any) -> None:
    """Saves a part-trained chunk (its whole training state after ``steps`` steps) and then drops the chunk's
    older ones; written before it returns, so a kill right after it loses nothing."""
    self.wait()
    older = self._partials(chunk) if multihost.is_primary() else []
    self._checkpointer.save(self.file(os.path.join("ensemble", f"partial_{chunk:05d}_step{steps:08d}")), tree)
    self._checkpointer.wait_until_finished()
    for _, path in older:
      _remove(path)

  def restore_partial(self, chunk: int, template: Any) -> tuple[int, Any] | None:
    """(steps, training state) of the most advanced part-trained checkpoint of ``chunk``, or None."""
    partials = self._partials(chunk) if multihost.is_primary() else []
    found = multihost.broadcast_exact(np.asarray(partials[-1][0] if partials else -1, np.int64))
    if int(found) < 0:
      return None
    path = self.file(os.path.join("ensemble", f"partial_{chunk:05d}_step{int(found):08d}"))
    logger.info("chunk %d resumes after %d training steps", chunk, int(found))
    return int(found), self._restore(path, template, f"chunk {chunk} part-trained", "train that chunk again")

  def drop_partials(self) -> None:
    """Removes every part-trained checkpoint (once their chunks are saved whole)."""
    folder = self.file("ensemble")
    if multihost.is_primary() and os.path.isdir(folder):
      for name in os.listdir(folder):
        if _PARTIAL_CHECKPOINT.match(name):
          _remove(os.path.join(folder, name))

  def restore_chunks(self, first: int, last: int, template: Any, model_ids: Sequence[int] = ()) -> Any:
    """Chunks ``first..last``, holding the models ``model_ids`` (named when the checkpoint cannot be read).

    Raises:
      DamagedCheckpointError: the checkpoint cannot be read back; names the models and how to retrain them.
    """
    ids = [int(m) for m in model_ids]
    held = (f"models {ids[0]} to {ids[-1]}" if len(ids) > 1 else f"model {ids[0]}") if ids \
        else f"chunks {first} to {last}"
    return self._restore(self.chunks_dir(first, last), template, f"{held} of the ensemble",
                         "retrain just those models")


def link_trained(src: str, dst: str, config: Any, *, any_size: bool = False) -> bool:
  """Lets the run folder ``dst`` reuse the models trained in ``src`` when ``config`` trains the same ones.

  A Cert-SSB run with ``sigma.train = base`` trains exactly RAB's models (same data, seeds and training noise),
  so a sweep or ``--compare rab,cert_ssb`` trains them once: ``dst`` gets links to ``src``'s undefended model,
  surrogate and ensemble checkpoints (whatever ``dst`` does not hold yet). With ``any_size`` the ensembles may
  differ in size (``identity.training_key(num_models=False)``): the caller checks that both train in chunks of
  the same size, so that chunk c holds the same models in both; ``dst`` trains only the chunks it lacks.
  Returns whether it linked.
  """
  src_config = os.path.join(src, "config.json")
  if not multihost.is_primary() or not os.path.exists(src_config):
    return False
  key = lambda j: identity.training_key(j, num_models=not any_size)
  if key(load_json(src_config)) != key(config_lib.to_json(config)):
    return False
  os.makedirs(os.path.join(dst, "ensemble"), exist_ok=True)
  names = [n for n in ("undefended", "surrogate") if os.path.isdir(os.path.join(src, n))]
  folder = os.path.join(src, "ensemble")
  names += [os.path.join("ensemble", n) for n in sorted(os.listdir(folder)) if _ENSEMBLE_CHECKPOINT.match(n)] \
      if os.path.isdir(folder) else []
  for name in names:
    if not os.path.lexists(os.path.join(dst, name)):
      os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(dst, name))
  logger.info("%s reuses the models trained in %s", dst, src)
  return True
