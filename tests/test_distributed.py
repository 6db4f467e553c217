"""Multi-host for real: two local CPU processes (2 devices each) joined by ``jax.distributed`` on loopback run the
launcher on one workdir, and their outputs equal a single-process, single-device run's bit for bit.

The processes talk through gloo (``jax_cpu_collectives_implementation``). All three processes set
``PJRT_NPROC=4`` so XLA:CPU's intra-op thread pool has the same size in each (see ``test_multidevice.py``).
Every subprocess is bounded by a timeout and killed if it hangs.
"""

import filecmp
import os
import socket
import subprocess

from conftest import write_tiny_config  # pylint: disable=g-bad-import-order
import helpers
import numpy as np
import pytest


def _has_cpu_collectives() -> bool:
  import jax  # pylint: disable=g-import-not-at-top

  try:
    jax.config.jax_cpu_collectives_implementation  # pylint: disable=pointless-statement
  except AttributeError:
    return False
  return True


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_args(config_path: str, workdir: str) -> list[str]:
  return [f"--config={config_path}", f"--workdir={workdir}", "--noprogress"]


def _wait_all(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
  """Waits for every process (one shared deadline); kills them all if one hangs."""
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=helpers.TIMEOUT_S)
      out.append((p.returncode, stdout, stderr))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"a process did not finish within {helpers.TIMEOUT_S} s (deadlock between processes?)")
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  if not _has_cpu_collectives():
    pytest.skip("this jax has no CPU collectives (jax_cpu_collectives_implementation): no multi-process CPU runs")
  tmp = tmp_path_factory.mktemp("distributed")
  config_path = str(tmp / "tiny_distributed.py")
  # 6 models in chunks of 4 (the second chunk is padded), the ensemble as the test scorer
  write_tiny_config(config_path, max_train=96, max_test=24, num_models=6, models_per_chunk=4, epochs=1,
                    scorer="ensemble", **{"sigma.search_models": 2, "sigma.num_steps": 1,
                                          "undefended.enabled": False, "train.checkpoint_every_s": 0})
  single, multi = str(tmp / "single"), str(tmp / "multi")
  port = _free_port()
  procs = [helpers.start_module("certssb_jax.launch", *_launch_args(config_path, multi),
                                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                                "--distributed_timeout_s=120", environ=helpers.env(2, nproc=4),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  results = _wait_all(procs)
  for i, (rc, _, stderr) in enumerate(results):
    assert rc == 0, f"process {i} failed:\n{stderr[-4000:]}"
  (rc, _, stderr), = _wait_all([helpers.start_module("certssb_jax.launch", *_launch_args(config_path, single),
                                                     environ=helpers.env(1, nproc=4), stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE)])
  assert rc == 0, stderr[-4000:]
  return single, multi, results


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_single_process_outputs(runs):
  single, multi, _ = runs
  assert filecmp.cmp(os.path.join(single, "per_sample.csv"), os.path.join(multi, "per_sample.csv"), shallow=False)
  for name in ("votes.npz", "sigmas.npz", "store.npz", "poison.npz"):
    a, b = np.load(os.path.join(single, name)), np.load(os.path.join(multi, name))
    assert sorted(a.files) == sorted(b.files), name
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
  votes = np.load(os.path.join(multi, "votes.npz"))
  assert np.all(votes["clean"].sum(axis=1) == 4)  # neither the padding models nor the 2 search models voted
  # a checkpoint per chunk (checkpoint_every_s = 0: the processes agreed on every save), nothing stray
  assert sorted(os.listdir(os.path.join(multi, "ensemble"))) == ["chunks_00000-00000", "chunks_00001-00001"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_processes_formed_one_job_and_only_process_0_reported(runs):
  _, multi, results = runs
  (_, out0, err0), (_, out1, err1) = results
  assert "process 0 of 2: 2 local devices, 4 in all" in err0
  assert "process 1 of 2: 2 local devices, 4 in all" in err1
  assert "clean accuracy" in out0 and "wrote" in out0
  # process 1 computed its share and reported nothing (gloo prints its own connection lines, from threads)
  assert "clean accuracy" not in out1 and "wrote" not in out1
  import json  # pylint: disable=g-import-not-at-top

  summary = json.load(open(os.path.join(multi, "summary.json")))
  assert summary["process_count"] == 2 and len(summary["devices"]) == 4


def test_half_given_distributed_flags_are_refused():
  from certssb_jax import launch  # pylint: disable=g-import-not-at-top

  with pytest.raises(launch.UsageError, match="go together"):
    launch.initialize_distributed("127.0.0.1:1234", None, 0)
  with pytest.raises(launch.UsageError, match="process_id must be in"):
    launch.initialize_distributed("127.0.0.1:1234", 2, 2)
