"""Sharding over the ensemble axis: 8 fake CPU devices give the same bits as 1 (training, sigma search with the
ensemble scorer, certification), also when M is not a multiple of the device count.

Each check runs in a subprocess, because the number of CPU devices is fixed when jax starts
(``JAX_NUM_CPU_DEVICES``, with ``--xla_force_host_platform_device_count`` as the older spelling). Both sides set
``PJRT_NPROC=8``: XLA:CPU sizes its intra-op thread pool as max(#cores, #devices), and the partitioning of the
input-gradient convolution (training, sigma search) depends on the pool size, so without it a 1-device process
and an 8-device process differ in the last bits before any sharding happens (see ``certssb_jax/ensemble.py``).
"""

import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def _env(num_devices: int) -> dict:
  env = dict(os.environ)
  env["JAX_NUM_CPU_DEVICES"] = str(num_devices)
  flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--unused_count")
  flags = " ".join(f for f in flags.split() if not f.startswith("--unused_count"))
  if num_devices > 1:
    flags += f" --xla_force_host_platform_device_count={num_devices}"
  env["XLA_FLAGS"] = flags.strip()
  env["PJRT_NPROC"] = "8"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
  return env


def _run_child(code: str, num_devices: int, *args: str) -> str:
  proc = subprocess.run([sys.executable, "-c", code, *args], env=_env(num_devices), capture_output=True, text=True,
                        timeout=TIMEOUT_S, cwd=ROOT)
  assert proc.returncode == 0, f"child with {num_devices} devices failed:\n{proc.stderr[-4000:]}"
  return proc.stdout


PIPELINE_CHILD = r"""
import json, sys
import jax
from conftest import tiny_config
from certssb_jax import pipeline
workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
config = tiny_config(**overrides)
config.undefended.enabled = False
pipeline.run(config, workdir)
print(json.dumps({"devices": len(jax.devices())}))
"""

# M = 12 in chunks of 8: two chunks, the second padded (ids 12..15); on 8 devices one model per device and slot,
# on 1 device eight. The test sigmas come from the sharded ensemble scorer.
OVERRIDES = {"num_models": 12, "train.models_per_chunk": 8, "test_scorer": "ensemble", "max_train": 96,
             "max_test": 24, "epochs": 1, "sigma.num_steps": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for n in (1, 8):
    workdir = str(tmp_path_factory.mktemp(f"devices{n}"))
    stdout = _run_child(PIPELINE_CHILD, n, workdir, json.dumps(OVERRIDES))
    assert json.loads(stdout.strip().splitlines()[-1])["devices"] == n
    out[n] = workdir
  return out


def test_pipeline_outputs_are_bit_identical_on_1_and_8_devices(runs):
  one, eight = runs[1], runs[8]
  assert filecmp.cmp(os.path.join(one, "per_sample.csv"), os.path.join(eight, "per_sample.csv"), shallow=False)
  for name in ("votes.npz", "sigmas.npz", "store.npz"):
    a, b = np.load(os.path.join(one, name)), np.load(os.path.join(eight, name))
    assert sorted(a.files) == sorted(b.files), name
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
  votes = np.load(os.path.join(one, "votes.npz"))
  assert np.all(votes["clean"].sum(axis=1) == 12)  # every one of the M = 12 models voted, padding did not
  assert votes["clean_preds"].shape == (12, 24)
  sig = np.load(os.path.join(one, "sigmas.npz"))
  assert np.ptp(sig["test_clean"]) > 0  # the ensemble-scorer search really moved the sigmas
  summary = json.load(open(os.path.join(eight, "summary.json")))
  assert len(summary["devices"]) == 8


UNIT_CHILD = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from certssb_jax import certify, ensemble, models
assert len(jax.devices()) == 8
out = {}

# (a) ordered_sum over 8 devices = a sequential float32 left fold in id order (numpy), M = 13 of 16 slots
mesh8 = ensemble.default_mesh()
rs = np.random.RandomState(0)
vals = (rs.randn(16, 5, 3) * 10.0 ** rs.randint(-6, 6, (16, 5, 3))).astype(np.float32)
valid = np.arange(16) < 13
f = jax.jit(jax.shard_map(lambda v, ok: ensemble.ordered_sum(v, ok, 8), mesh=mesh8,
                          in_specs=(P("ens"), P("ens")), out_specs=P(), check_vma=False))
acc = np.zeros((5, 3), np.float32)
for m in range(13):
  acc = (acc + vals[m]).astype(np.float32)
out["ordered_sum_equal"] = bool(np.array_equal(np.asarray(f(vals, valid)), acc))
grouped = np.zeros((5, 3), np.float32)  # what a psum of per-device partial sums (2 models each) would give
for d in range(8):
  part = np.zeros((5, 3), np.float32)
  for m in range(2 * d, min(2 * d + 2, 13)):
    part = (part + vals[m]).astype(np.float32)
  grouped = (grouped + part).astype(np.float32)
out["pairwise_differs"] = bool(not np.array_equal(grouped, acc))  # the order matters for these values

# (b) certification of M = 12 models on an 8-device mesh and on a 1-device mesh of the same process
model = models.get_model("mnist_cnn", 2)
tr = ensemble.EnsembleTrainer(model, (28, 28, 1), ensemble.TrainConfig(1, 8, 1e-3, 12), mesh=mesh8)
state = tr._init(tr._keys(np.arange(16), jax.random.key(3)))
state = jax.tree.map(np.asarray, jax.device_get(state))
x = rs.rand(10, 28, 28, 1).astype(np.float32)
sigma = rs.uniform(0.2, 0.8, 10).astype(np.float32)
chunks = [(np.arange(16), state)]
mesh1 = ensemble.default_mesh(jax.devices()[:1])
p8, s8 = certify.certify_inputs(model, chunks, x, sigma, seed=1, num_models=12, batch_size=4, mesh=mesh8)
p1, s1 = certify.certify_inputs(model, chunks, x, sigma, seed=1, num_models=12, batch_size=4, mesh=mesh1,
                                models_per_chunk=5)
out["certify_equal"] = bool(np.array_equal(p8, p1) and np.array_equal(s8, s1))
out["certify_shape"] = list(p8.shape)

# (c) the ensemble scorer: value and sigma-gradient on 8 devices = on 1 device (bits) ~ a naive loop
params = jax.tree.map(lambda a: a[:12], state.params)
xb = jnp.asarray(x[:3])
def radius_like(score_fn, st, s):
  return jnp.sum(score_fn(st, xb + s * jnp.ones_like(xb))[:, 1] ** 2)
res = {}
for name, mesh in (("8", mesh8), ("1", mesh1)):
  sc = ensemble.EnsembleScorer(model, mesh, 12)
  st = sc.place(params, {})
  val, grad = jax.jit(jax.value_and_grad(lambda s: radius_like(sc, st, s)))(0.3)
  res[name] = (np.asarray(val), np.asarray(grad))
def naive(s):
  probs = [models.logits_to_probs(model.apply({"params": jax.tree.map(lambda a: a[m], params)},
                                              xb + s * jnp.ones_like(xb))) for m in range(12)]
  return jnp.sum((sum(probs) / 12)[:, 1] ** 2)
nv, ng = jax.value_and_grad(naive)(0.3)
out["scorer_equal"] = bool(np.array_equal(res["8"][0], res["1"][0]) and np.array_equal(res["8"][1], res["1"][1]))
out["scorer_close"] = bool(np.allclose(res["8"][0], nv, rtol=1e-5) and np.allclose(res["8"][1], ng, rtol=1e-4,
                                                                                      atol=1e-6))
print(json.dumps(out))
"""


def test_sharded_pieces_match_independent_references_on_8_devices():
  out = json.loads(_run_child(UNIT_CHILD, 8).strip().splitlines()[-1])
  assert out["pairwise_differs"]  # else the order check below could not fail
  assert out["ordered_sum_equal"]
  assert out["certify_shape"] == [12, 10]
  assert out["certify_equal"]
  assert out["scorer_close"]
  assert out["scorer_equal"]


def test_layout_split_and_merge_are_inverse_and_keep_devices_contiguous():
  from certssb_jax import ensemble  # pylint: disable=g-import-not-at-top

  ids = np.arange(16)
  for member_map in ("loop", "vmap"):
    layout = ensemble.ChunkLayout.make(16, 4, member_map)
    slots = layout.split(ids)
    np.testing.assert_array_equal(layout.merge(slots), ids)
    k = layout.per_slot
    for d in range(4):  # device d holds ids 4d .. 4d + 3, whatever the layout
      held = sorted(int(i) for s in slots for i in np.asarray(s)[d * k:(d + 1) * k])
      assert held == list(range(4 * d, 4 * d + 4))
  with pytest.raises(ValueError, match="cannot be split"):
    ensemble.ChunkLayout.make(10, 4)
  with pytest.raises(ValueError, match="member_map"):
    ensemble.ChunkLayout.make(8, 4, "pmap")
