"""The run folder's lock and its damaged checkpoints: a second live run into a folder is refused with one line
naming the holder, a dead run's lock is taken over, the lock goes with the run however it ends; a checkpoint
that cannot be read back ends the run with one line naming its models and the remedy, which then works.
"""

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

from conftest import tiny_config, write_tiny_config  # pylint: disable=g-bad-import-order
import helpers
import numpy as np
import pytest

from certssb_jax import files
from certssb_jax.experiment import config as config_lib, folder_lock, rundir

SMALL = dict(max_train=128, max_test=32, num_models=4, models_per_chunk=2,
             **{"train.epochs": 1, "undefended.epochs": 1, "train.checkpoint_every_s": 0})


def _error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
  """The one ``error:`` line of a run that ended with exit code 2 and no traceback."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  for noise in ("Traceback", "asyncio", "Event loop is closed", "never retrieved"):
    assert noise not in proc.stderr, proc.stderr[-3000:]
  for f in fragments:
    assert f in errors[0], errors[0]
  return errors[0]


def _dead_pid() -> int:
  child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                         check=True)
  return int(child.stdout)


def _write_lock(workdir, **holder) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, folder_lock.LOCK_FILE), "w") as f:
    json.dump({"host": socket.gethostname(), "since": "2001-02-03T04:05:06+00:00", **holder}, f)


@pytest.fixture
def cfg():
  return config_lib.resolve(tiny_config(**SMALL))


# ---------------------------------------------------------------------------------------------- the lock


def test_a_launch_into_a_held_folder_is_refused_with_one_line_naming_the_holder(tmp_path, cfg):
  workdir = str(tmp_path / "w")
  config_path = write_tiny_config(tmp_path / "c.py", **SMALL)
  with rundir.RunDir.open(workdir, cfg):
    proc = helpers.launch("--config", config_path, "--workdir", workdir)
    line = _error_line(proc, f"{workdir} is in use by another run", f"pid {os.getpid()}",
                       f"host {socket.gethostname()}", "since ", "use another --workdir")
    assert "resuming" not in proc.stderr
    assert json.load(open(os.path.join(workdir, folder_lock.LOCK_FILE)))["pid"] == os.getpid(), line  # still ours
    assert sorted(os.listdir(workdir)) == ["config.json", folder_lock.LOCK_FILE]  # the refused run wrote nothing
  assert not os.path.exists(os.path.join(workdir, folder_lock.LOCK_FILE))


def test_a_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, cfg, caplog):
  workdir = str(tmp_path / "w")
  dead = _dead_pid()
  _write_lock(workdir, pid=dead)
  with caplog.at_level(logging.WARNING, logger="certssb_jax.experiment.folder_lock"):
    rd = rundir.RunDir.open(workdir, cfg)
  assert f"taking over the lock of pid {dead} on host {socket.gethostname()}" in caplog.text
  assert json.load(open(os.path.join(workdir, folder_lock.LOCK_FILE)))["pid"] == os.getpid()
  rd.close()
  assert not os.path.exists(os.path.join(workdir, folder_lock.LOCK_FILE))


def test_without_flock_the_pid_decides_and_another_host_is_never_taken_over(tmp_path, cfg, monkeypatch):
  """A filesystem without flock: a live pid holds the folder, a dead one does not; a lock of another host
  (whose pids cannot be checked from here) is refused with the file to delete."""

  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(folder_lock.fcntl, "flock", no_flock)
  workdir = str(tmp_path / "w")
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_lock(workdir, pid=sleeper.pid)
    with pytest.raises(folder_lock.RunFolderBusyError, match=f"in use by another run: pid {sleeper.pid} on host"):
      rundir.RunDir.open(workdir, cfg)
  finally:
    sleeper.kill()
    sleeper.wait()
  rundir.RunDir.open(workdir, cfg).close()  # the sleeper is gone now: its lock is taken over
  assert not os.path.exists(os.path.join(workdir, folder_lock.LOCK_FILE))
  _write_lock(workdir, pid=_dead_pid(), host="elsewhere")
  lock = os.path.join(workdir, folder_lock.LOCK_FILE)
  with pytest.raises(folder_lock.RunFolderBusyError, match=f"on host elsewhere .*if that run is gone, delete {lock}"):
    rundir.RunDir.open(workdir, cfg)
  assert json.load(open(lock))["host"] == "elsewhere"


def test_a_process_opening_its_folder_again_takes_its_own_lock_over(tmp_path, cfg):
  """A notebook cell run twice: the second RunDir holds the lock, closing the first does not release it."""
  workdir = str(tmp_path / "w")
  first = rundir.RunDir.open(workdir, cfg)
  second = rundir.RunDir.open(workdir, cfg)
  first.close()
  assert os.path.exists(os.path.join(workdir, folder_lock.LOCK_FILE))
  second.close()
  assert not os.path.exists(os.path.join(workdir, folder_lock.LOCK_FILE))


def test_a_failing_run_releases_the_lock(tmp_path, monkeypatch):
  from certssb_jax.experiment import pipeline  # pylint: disable=g-import-not-at-top

  def fail(*args, **kwargs):
    raise RuntimeError("a stage failed")

  monkeypatch.setattr(pipeline, "poison", fail)
  workdir = str(tmp_path / "w")
  with pytest.raises(RuntimeError, match="a stage failed"):
    pipeline.run(tiny_config(**SMALL), workdir)
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert not os.path.exists(os.path.join(workdir, folder_lock.LOCK_FILE))


# ---------------------------------------------------------------------------------------------- damaged checkpoints


def _truncate_largest(folder: str) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(100)
  return path


def test_a_damaged_single_model_names_it_and_the_folder_to_delete(tmp_path):
  rd = rundir.RunDir(str(tmp_path))
  tree = {"w": np.arange(40000, dtype=np.float32).reshape(200, 200), "b": np.ones(7, np.float32)}
  rd.save_model("pilot", tree)
  np.testing.assert_array_equal(rd.restore_model("pilot", tree)["w"], tree["w"])
  _truncate_largest(rd.file("pilot"))
  with pytest.raises(rundir.DamagedCheckpointError) as e:
    rd.restore_model("pilot", tree)
  assert "\n" not in str(e.value)
  assert "holds the pilot model" in str(e.value) and f"delete {rd.file('pilot')} and run again" in str(e.value)


_RESTORE_REPEATEDLY = """
import gc, os, sys, time
import numpy as np
from certssb_jax.experiment import rundir
rd = rundir.RunDir(sys.argv[1])
rng = np.random.default_rng(0)
tree = {f"layer{i}": rng.normal(size=(64, 64, 8)).astype(np.float32) for i in range(12)}
rd.save_model("undefended", tree)
files = [os.path.join(d, f) for d, _, names in os.walk(rd.file("undefended")) for f in names]
with open(max(files, key=os.path.getsize), "r+b") as f:
  f.truncate(100)
failed = 0
for _ in range(20):
  try:
    rd.restore_model("undefended", tree)
  except rundir.DamagedCheckpointError:
    failed += 1
gc.collect()
time.sleep(1)  # the reads still in flight report now
print(failed, "failed")
"""


def test_a_failed_restore_leaves_no_echo_on_stderr(tmp_path):
  """Orbax closes its event loop when one read fails; the reads still in flight then report on stderr."""
  proc = subprocess.run([sys.executable, "-c", _RESTORE_REPEATEDLY, str(tmp_path)], env=helpers.env(),
                        cwd=helpers.ROOT, capture_output=True, text=True, timeout=helpers.TIMEOUT_S)
  assert proc.returncode == 0 and proc.stdout.strip() == "20 failed", proc.stderr[-3000:]
  for noise in ("Traceback", "Event loop is closed", "never retrieved"):
    assert noise not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_damaged_ensemble_checkpoint_ends_with_one_line_and_its_remedy_works(tmp_path):
  """A run killed before its votes left its chunks saved; one file of chunks 1 (models 2 and 3) is truncated.
  The rerun stops with one line naming those models and the folder to delete; deleting it retrains them, and the
  votes are those of the original run."""
  config_path = write_tiny_config(tmp_path / "c.py", **SMALL)
  workdir = str(tmp_path / "w")
  helpers.check(helpers.launch("--config", config_path, "--workdir", workdir), "launch")
  assert not os.path.exists(os.path.join(workdir, folder_lock.LOCK_FILE))  # gone after a normal run
  original = files.load_npz(os.path.join(workdir, "votes.npz"))
  os.remove(os.path.join(workdir, "stages", "votes.npz"))  # as if killed before the votes
  damaged = os.path.join(workdir, "ensemble", "chunks_00001-00001")
  _truncate_largest(damaged)
  kept = {p: open(p, "rb").read() for p in (os.path.join(workdir, n) for n in
                                           ("config.json", "poison.npz", "stages/sigma_clean.npz"))}

  proc = helpers.launch("--config", config_path, "--workdir", workdir)
  _error_line(proc, f"checkpoint {damaged} is damaged", "holds models 2 to 3 of the ensemble",
              f"delete {damaged} and run again to retrain just those models")
  assert not os.path.exists(os.path.join(workdir, folder_lock.LOCK_FILE))  # gone after a failing run
  assert sorted(os.listdir(os.path.join(workdir, "ensemble"))) == ["chunks_00000-00000", "chunks_00001-00001"]
  assert all(open(p, "rb").read() == data for p, data in kept.items())

  shutil.rmtree(damaged)  # the remedy the line gives
  log = helpers.launch("--config", config_path, "--workdir", workdir)
  helpers.check(log, "launch after the remedy")
  assert "ensemble: reusing 1 of 2 trained chunks" in log.stderr
  again = files.load_npz(os.path.join(workdir, "votes.npz"))
  assert sorted(again) == sorted(original)
  for k, v in original.items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)
