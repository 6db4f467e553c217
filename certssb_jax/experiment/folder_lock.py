"""The lock of a run folder, ``run.lock``: one live run per folder, and a dead run's lock taken over.

A run holds its folder from ``RunDir.open`` to ``RunDir.close`` (``rundir``), so a second run started into it is
refused instead of racing the first one's checkpoints; the refusal names the holder (host, pid, since).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import Any

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunFolderBusyError(ValueError):
  """Another live run holds the run folder (its ``run.lock``)."""


def _holder_of(lock_file: str, info: dict[str, Any]) -> str:
  if not info:
    return "a run that is starting"
  return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')}, lock {lock_file})"


def _same_file(fd: int, path: str) -> bool:
  """Whether ``path`` is still the file open as ``fd`` (a releasing holder removes it)."""
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


def _pid_alive(pid: Any) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: alive
    return True
  except (TypeError, ValueError, OverflowError):  # no pid in the file: nothing shows the holder is gone
    return True
  return True


class FolderLock:
  """The lock of one run folder: ``run.lock``, ``flock``ed while held and naming its holder (host, pid, since).

  The kernel drops the ``flock`` however the holder ends (a SIGKILL too), so a file left behind whose ``flock``
  is free is a dead run's and is taken over with a warning. Where the filesystem has no ``flock`` the pid is
  checked instead, on this host only. A lock left by another host is never taken over: that host's pids
  cannot be checked from here, and some shared filesystems lock per host only. The file is removed on
  release; a process opening the folder again (a notebook cell run twice) takes its own lock over.
  """

  _held: dict[str, FolderLock] = {}  # the folders this process holds, by path

  def __init__(self, folder: str):
    self.folder = folder
    self.file = os.path.join(folder, LOCK_FILE)
    self.fd: int | None = None
    self.owner: Any = None

  @classmethod
  def acquire(cls, folder: str, owner: Any) -> FolderLock:
    """Takes the folder's lock for ``owner`` (a RunDir) or raises RunFolderBusyError naming the holder."""
    lock = cls._held.get(folder)
    if lock is None:
      lock = cls(folder)
      lock._take()
      cls._held[folder] = lock
    else:
      logger.info("%s was opened again by this process: the new run takes its lock over", folder)
    lock.owner = owner
    return lock

  def _take(self) -> None:
    os.makedirs(self.folder, exist_ok=True)
    while True:
      fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        kernel_lock = True
      except BlockingIOError:
        holder = self._read(fd)
        os.close(fd)
        raise RunFolderBusyError(self._busy(holder)) from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          os.close(fd)
          raise
        kernel_lock = False
      if _same_file(fd, self.file):
        break
      os.close(fd)  # the holder released (removed) the file between our open and flock: take the new file
    try:
      self._check_holder(self._read(fd), kernel_lock)
      info = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self.fd = fd

  def _check_holder(self, holder: dict[str, Any], kernel_lock: bool) -> None:
    """Refuses a holder that may be alive; warns about the dead one whose lock it takes over."""
    if not holder:
      return
    if holder.get("host") != socket.gethostname():
      raise RunFolderBusyError(self._busy(holder) + f"; if that run is gone, delete {self.file}")
    if not kernel_lock and _pid_alive(holder.get("pid")):
      raise RunFolderBusyError(self._busy(holder))
    logger.warning("taking over the lock of %s: that run ended without releasing it", _holder_of(self.file, holder))

  def _busy(self, holder: dict[str, Any]) -> str:
    return (f"{self.folder} is in use by another run: {_holder_of(self.file, holder)}; wait for it to end "
            "or use another --workdir")

  @staticmethod
  def _read(fd: int) -> dict[str, Any]:
    """The holder the lock file names; {} when empty or unreadable (a holder that had not written it yet)."""
    try:
      info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:  # UnicodeDecodeError included
      return {}
    return info if isinstance(info, dict) else {}

  def release(self, owner: Any) -> None:
    """Removes the lock file and drops the ``flock`` (a no-op unless ``owner`` holds the lock)."""
    if self.owner is not owner or self.fd is None:
      return
    try:
      if _same_file(self.fd, self.file):
        os.unlink(self.file)  # before the flock is dropped: whoever opened the file meanwhile sees it go
    finally:
      os.close(self.fd)
      self.fd, self.owner = None, None
      self._held.pop(self.folder, None)
