"""Sharding over the ensemble axis: 8 fake CPU devices give the same bits as 1 (training, sigma search with the
held-out search models, certification), also when M is not a multiple of the device count.

Each check runs in a child process (``tests/children``), because the number of CPU devices is fixed when jax
starts. Both sides set ``PJRT_NPROC=8`` (``helpers.env``).
"""

import filecmp
import json
import os

import helpers
import numpy as np
import pytest

from certssb_jax.ensemble import sharding

# M = 12 in chunks of 8: two chunks, the second padded (ids 12..15); on 8 devices one model per device and slot,
# on 1 device eight. The test sigmas come from the sharded scorer of the 2 held-out search models.
OVERRIDES = {"num_models": 12, "train.models_per_chunk": 8, "scorer": "ensemble", "sigma.search_models": 2,
             "max_train": 96, "max_test": 24, "epochs": 1, "sigma.num_steps": 1, "undefended.enabled": False,
             "sigma.start": "sigma_0"}  # the low end, so the one step moves them (from sigma_hi they stay clipped)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for n in (1, 8):
    workdir = str(tmp_path_factory.mktemp(f"devices{n}"))
    stdout = helpers.check(helpers.run_module("children.pipeline_run", workdir, json.dumps(OVERRIDES),
                                              environ=helpers.env(n, nproc=8)), f"child with {n} devices")
    assert json.loads(stdout.strip().splitlines()[-1])["devices"] == n
    out[n] = workdir
  return out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pipeline_outputs_are_bit_identical_on_1_and_8_devices(runs):
  one, eight = runs[1], runs[8]
  assert filecmp.cmp(os.path.join(one, "per_sample.csv"), os.path.join(eight, "per_sample.csv"), shallow=False)
  for name in ("votes.npz", "sigmas.npz", "store.npz"):
    a, b = np.load(os.path.join(one, name)), np.load(os.path.join(eight, name))
    assert sorted(a.files) == sorted(b.files), name
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
  votes = np.load(os.path.join(one, "votes.npz"))
  assert np.all(votes["clean"].sum(axis=1) == 10)  # the 10 voting models; padding and search models did not vote
  assert votes["clean_preds"].shape == (12, 24)
  sig = np.load(os.path.join(one, "sigmas.npz"))
  assert np.ptp(sig["test_clean"]) > 0  # the search with the held-out models really moved the sigmas
  summary = json.load(open(os.path.join(eight, "summary.json")))
  assert len(summary["devices"]) == 8


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharded_pieces_match_independent_references_on_8_devices():
  stdout = helpers.check(helpers.run_module("children.sharded_pieces", environ=helpers.env(8, nproc=8)))
  out = json.loads(stdout.strip().splitlines()[-1])
  assert out["pairwise_differs"]  # else the order check below could not fail
  assert out["ordered_sum_equal"]
  assert out["certify_shape"] == [12, 10]
  assert out["certify_equal"]
  assert out["scorer_close"]
  assert out["scorer_equal"]


def test_layout_split_and_merge_are_inverse_and_keep_devices_contiguous():
  ids = np.arange(16)
  for member_map in ("loop", "vmap"):
    layout = sharding.ChunkLayout.make(16, 4, member_map)
    slots = layout.split(ids)
    np.testing.assert_array_equal(layout.merge(slots), ids)
    k = layout.per_slot
    for d in range(4):  # device d holds ids 4d .. 4d + 3, whatever the layout
      held = sorted(int(i) for s in slots for i in np.asarray(s)[d * k:(d + 1) * k])
      assert held == list(range(4 * d, 4 * d + 4))
  with pytest.raises(ValueError, match="cannot be split"):
    sharding.ChunkLayout.make(10, 4)
  with pytest.raises(ValueError, match="member_map"):
    sharding.ChunkLayout.make(8, 4, "pmap")
  assert sharding.round_up(13, 8) == 16 and sharding.round_up(0, 4) == 4
