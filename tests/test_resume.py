"""Resume after a kill: SIGKILL the launcher while the ensemble trains, run it again, and get exactly the files of
a run that was never interrupted; what the kill left half-written is ignored and removed.
"""

import filecmp
import json
import os
import signal
import subprocess
import time

from conftest import write_tiny_config  # pylint: disable=g-bad-import-order
import helpers
import numpy as np
import pytest

OUTPUTS = ("votes.npz", "sigmas.npz", "per_sample.csv", "store.npz", "poison.npz", "summary.json")


def _args(config_path: str, workdir: str) -> list[str]:
  return [f"--config={config_path}", f"--workdir={workdir}", "--noprogress"]


def _run(config_path: str, workdir: str) -> subprocess.CompletedProcess:
  proc = helpers.run_module("certssb_jax.launch", *_args(config_path, workdir))
  helpers.check(proc, "launch")
  return proc


def _kill_when(config_path: str, workdir: str, ready) -> None:
  """Starts the launcher and SIGKILLs it as soon as ``ready()`` holds (polled every 10 ms)."""
  proc = helpers.start_module("certssb_jax.launch", *_args(config_path, workdir), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + helpers.TIMEOUT_S
  try:
    while not ready():
      if proc.poll() is not None:
        pytest.fail(f"the run ended (rc {proc.returncode}) before the moment to kill it came")
      if time.monotonic() > deadline:
        pytest.fail("the moment to kill the run never came")
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("resume")
  config_path = str(tmp / "tiny_resume.py")
  # 6 models in 3 chunks of 2, each saved on its own, so a kill can land between chunks
  write_tiny_config(config_path, max_train=128, max_test=32, num_models=6, models_per_chunk=2,
                    **{"undefended.epochs": 1, "train.checkpoint_every_s": 0})
  whole, killed = str(tmp / "whole"), str(tmp / "killed")
  _run(config_path, whole)
  ensemble = os.path.join(killed, "ensemble")
  _kill_when(config_path, killed, lambda: os.path.isdir(os.path.join(ensemble, "chunks_00000-00000")))
  # The kill lands while chunk 1 trains, or while it is saved. To test the second case every time, leave what
  # a save killed midway leaves (Orbax writes into <name>.orbax-checkpoint-tmp and renames when complete),
  # and a half-written stage file of an atomic write.
  before = sorted(os.listdir(ensemble))
  assert "chunks_00000-00000" in before and "chunks_00002-00002" not in before, before
  partial = os.path.join(ensemble, "chunks_00001-00001.orbax-checkpoint-tmp")
  if not any(".orbax-checkpoint-tmp" in n for n in before):
    os.makedirs(os.path.join(partial, "ocdbt.process_0"))
    with open(os.path.join(partial, "_CHECKPOINT_METADATA"), "w") as f:
      f.write("{")  # truncated
  os.makedirs(os.path.join(killed, "stages"), exist_ok=True)
  with open(os.path.join(killed, "stages", ".tmp_abcvotes.npz"), "wb") as f:
    f.write(b"PK\x03")
  again = _run(config_path, killed)
  return whole, killed, before, again


@pytest.mark.slow
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_outputs(resumed):
  whole, killed, _, _ = resumed
  for name in OUTPUTS:
    a, b = os.path.join(whole, name), os.path.join(killed, name)
    if name.endswith(".npz"):
      fa, fb = np.load(a), np.load(b)
      assert sorted(fa.files) == sorted(fb.files), name
      for k in fa.files:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{name}:{k}")
    elif name == "summary.json":
      sa, sb = json.load(open(a)), json.load(open(b))
      for key in ("timings_s", "files"):
        sa.pop(key), sb.pop(key)
      assert sa == sb
    else:
      assert filecmp.cmp(a, b, shallow=False), name


@pytest.mark.slow
def test_the_resumed_run_reused_the_finished_work_and_removed_the_half_written(resumed):
  _, killed, before, again = resumed
  log = again.stderr
  assert "resuming " in log and "left half-written by an interrupted run" in log
  n_done = sum(1 for n in before if n.startswith("chunks_") and "." not in n)
  assert f"ensemble: reusing {n_done} of 3 trained chunks" in log
  assert "reusing the undefended model" in log and "reusing the pilot model" in log  # the test-sigma scorer
  assert "left half-written by an interrupted run" in log
  assert "taking over the lock of pid" in log  # the killed run could not release it
  assert not os.path.exists(os.path.join(killed, "run.lock"))
  assert sorted(os.listdir(os.path.join(killed, "ensemble"))) == [f"chunks_0000{c}-0000{c}" for c in range(3)]
  assert not [n for n in os.listdir(os.path.join(killed, "stages")) if n.startswith(".tmp_")]


@pytest.mark.slow
def test_a_finished_workdir_is_reused_whole(resumed):
  """A third start recomputes nothing that is stored: every stage and chunk is reused."""
  _, killed, _, _ = resumed
  config_path = os.path.join(os.path.dirname(killed), "tiny_resume.py")
  log = _run(config_path, killed).stderr
  assert "ensemble: reusing 3 of 3 trained chunks" in log
  for stage in ("sigma_clean", "sigma_triggered", "votes"):
    assert f"reusing stage {stage}" in log, stage


@pytest.mark.parametrize("counting", [False, True])
def test_a_chunk_resumed_from_a_mid_training_checkpoint_ends_bit_identical(counting):
  """``train_chunk`` from the state a checkpoint saw at step g (mid-epoch) ends where the unbroken training ends:
  the smoothing ensemble (fixed noise per sample, per-epoch orders) and members on views (their own streams)."""
  import jax  # pylint: disable=g-import-not-at-top

  from certssb_jax.defenses import partition  # pylint: disable=g-import-not-at-top
  from certssb_jax.ensemble import member, trainer as ensemble  # pylint: disable=g-import-not-at-top
  from certssb_jax.models import zoo as models  # pylint: disable=g-import-not-at-top

  rs = np.random.RandomState(0)
  x = rs.rand(40, 16, 16, 1).astype(np.float32)
  y = (rs.rand(40) > 0.5).astype(np.int32)
  tr = ensemble.EnsembleTrainer(models.get_model("mnist_cnn", 2), (16, 16, 1),
                                ensemble.TrainConfig(epochs=3, batch_size=8, learning_rate=1e-2, models_per_chunk=2))
  streams, ids = member.Streams.ensemble(0), np.arange(2)
  kwargs = dict(views=partition.views_of_parts(partition.partition(x, y, 2)), sigma=None) if counting else \
      dict(sigma=np.full(40, 0.25, np.float32))
  saved = {}
  whole = tr.train_chunk(ids, streams, x, y, checkpoint=lambda g, get: saved.setdefault(g, get()), **kwargs)
  g = 7  # mid-epoch: 5 steps per epoch on the whole set, and the views' streams cross epochs anywhere
  resumed = tr.train_chunk(ids, streams, x, y, start=(g, saved[g]), **kwargs)
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(whole.params),
                                                      jax.tree.leaves(saved[g].params)))  # g was mid-training


@pytest.mark.slow
def test_the_quickstart_killed_at_60_percent_of_its_training_keeps_most_of_it(tmp_path):
  """Killed once 60% of the ensemble's training steps are done (its logged progress says so), the quickstart
  resumes with at most 0.75 of its training left, and its votes equal an uninterrupted run's."""
  args = lambda d: ["--config", "configs/quickstart.py:quick,num_models=16", "--workdir", d,
                    "--config.train.checkpoint_every_s=0.25"]  # a save every few chunks: the kill finds most saved
  whole, killed, log = str(tmp_path / "whole"), str(tmp_path / "killed"), tmp_path / "killed.log"
  helpers.check(helpers.run_module("certssb_jax.launch", *args(whole)), "uninterrupted")
  with open(log, "w") as f:
    proc = helpers.start_module("certssb_jax.launch", *args(killed), stdout=f, stderr=f)
    deadline = time.monotonic() + helpers.TIMEOUT_S
    while not any(f"train ensemble (16 models): {p}%" in log.read_text() for p in (60, 70, 80)):
      assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  again = helpers.run_module("certssb_jax.launch", *args(killed))
  helpers.check(again, "resumed")
  lines = [l for l in again.stderr.splitlines() if "train ensemble (16 models): " in l and "% (" in l]
  done, total = (int(v) for v in lines[0].split("% (")[1].split(" steps")[0].split(" of "))
  assert done >= 0.25 * total, lines[:3]  # the first progress line: what the checkpoints kept
  a, b = np.load(os.path.join(whole, "votes.npz")), np.load(os.path.join(killed, "votes.npz"))
  for key in a.files:
    np.testing.assert_array_equal(a[key], b[key])
