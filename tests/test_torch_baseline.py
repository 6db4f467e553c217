"""The PyTorch baseline (benchmarks/torch_baseline.py) and the comparison statistics (benchmarks/compare_torch.py).

Checks the properties the certificate needs (docs/method.md section 2): each model trains on ONE fixed noised copy
for every epoch, copies differ between models, the noise is N(0, sigma^2); votes have shape (N, K) and sum to
M; each vote equals an independent functional re-implementation of the CNN run on the saved checkpoint.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_baseline as tb  # noqa: E402  pylint: disable=g-import-not-at-top

M, EPOCHS, N_TRAIN, BATCH, SIGMA, SEED = 3, 2, 64, 16, 0.5, 7


@pytest.fixture(scope="module")
def tiny():
  """A tiny baseline run on random 28x28 inputs whose label is the brightness of the left half."""
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(N_TRAIN, 28, 28, 1)).astype(np.float32)  # (n, H, W, C)
  x[: N_TRAIN // 2, :, :14] += 0.5
  x = np.clip(x, 0, 1)
  y = (np.arange(N_TRAIN) < N_TRAIN // 2).astype(np.int32)
  splits = {"clean": rng.uniform(size=(20, 28, 28, 1)).astype(np.float32),
            "triggered": rng.uniform(size=(9, 28, 28, 1)).astype(np.float32)}
  seen: dict[tuple[int, int], dict[int, np.ndarray]] = {}

  def on_batch(m, epoch, idx, xb):
    d = seen.setdefault((m, epoch), {})
    for j, v in zip(idx.tolist(), xb.numpy()):
      assert j not in d, "a sample was drawn twice in one epoch"
      d[j] = v.copy()

  config = tb.BaselineConfig(num_models=M, epochs=EPOCHS, batch_size=BATCH, learning_rate=1e-3, sigma=SIGMA,
                             seed=SEED, certify_batch_size=8)
  import tempfile  # pylint: disable=g-import-not-at-top

  ckpt = tempfile.mkdtemp(prefix="torch_baseline_")
  result = tb.run_baseline(x, y, splits, 2, config, ckpt, on_batch=on_batch)
  return dict(x=x, y=y, splits=splits, seen=seen, config=config, ckpt=ckpt, result=result)


def test_noise_is_fixed_per_model_across_epochs_and_differs_between_models(tiny):
  seen, x = tiny["seen"], tiny["x"]
  x_chw = x.transpose(0, 3, 1, 2)  # (n, C, H, W)
  for m in range(M):
    for epoch in range(EPOCHS):
      assert sorted(seen[(m, epoch)]) == list(range(N_TRAIN))  # every sample once per epoch (64 = 4 x 16)
    first = np.stack([seen[(m, 0)][j] for j in range(N_TRAIN)])  # (n, C, H, W)
    for epoch in range(1, EPOCHS):
      again = np.stack([seen[(m, epoch)][j] for j in range(N_TRAIN)])
      np.testing.assert_array_equal(again, first)  # the SAME noised copy in every epoch
    z = (first - x_chw) / SIGMA  # the model's noise, N(0, 1) if right
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02, (z.mean(), z.std())
  # the batch order changes between epochs (so equal inputs per index is not an artefact of equal batches)
  order = lambda m, e: list(seen[(m, e)])
  assert order(0, 0) != order(0, 1)
  # different models: different noise (correlation ~ 0 over 64 * 784 values)
  z = [np.stack([seen[(m, 0)][j] for j in range(N_TRAIN)]) - x_chw for m in range(M)]
  for a in range(M):
    for b in range(a + 1, M):
      assert abs(np.corrcoef(z[a].ravel(), z[b].ravel())[0, 1]) < 0.03


def test_noised_copy_and_test_noise_are_deterministic_in_seed_and_model():
  x = torch.zeros((4, 1, 28, 28))
  a = tb.noised_training_set(x, 0.25, 1, 2)
  torch.testing.assert_close(a, tb.noised_training_set(x, 0.25, 1, 2), rtol=0, atol=0)
  assert not torch.equal(a, tb.noised_training_set(x, 0.25, 1, 3))
  assert not torch.equal(a, tb.noised_training_set(x, 0.25, 2, 2))
  u = tb.test_noise(1, 2, (28, 28, 1))
  assert u.shape == (1, 28, 28)
  torch.testing.assert_close(u, tb.test_noise(1, 2, (28, 28, 1)), rtol=0, atol=0)
  assert not torch.equal(u, tb.test_noise(1, 3, (28, 28, 1)))


def test_votes_shape_and_sum(tiny):
  r = tiny["result"]
  for split, xs in tiny["splits"].items():
    n = len(xs)
    assert r.votes[split].shape == (n, 2) and r.votes[split].dtype == np.int64
    np.testing.assert_array_equal(r.votes[split].sum(axis=1), np.full(n, M))
    assert r.preds[split].shape == (M, n)
    np.testing.assert_allclose(r.probs_sum[split].sum(axis=1), M, rtol=1e-6)
  assert sorted(os.listdir(tiny["ckpt"])) == [f"model_{m:05d}.pt" for m in range(M)]
  for k in ("train", "certify", "total", "train_steps", "certify_forward"):
    assert r.timings_s[k] >= 0
  assert r.timings_s["total"] == pytest.approx(r.timings_s["train"] + r.timings_s["certify"], abs=2e-3)


def _functional_logit(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
  """The CNN of docs/method.md section 7 written with torch.nn.functional on a state_dict (independent of MnistCNN)."""
  f = torch.nn.functional
  w = list(sd.values())  # conv1 w, b, conv2 w, b, dense w, b, out w, b
  h = f.max_pool2d(f.relu(f.conv2d(x, w[0], w[1])), 2)  # VALID 5x5 conv: 28 -> 24 -> 12
  h = f.max_pool2d(f.relu(f.conv2d(h, w[2], w[3])), 2)  # 12 -> 8 -> 4
  h = f.relu(f.linear(h.flatten(1), w[4], w[5]))  # 4 * 4 * 32 = 512 -> 512
  return f.linear(h, w[6], w[7])[:, 0]


def test_votes_equal_an_independent_recomputation_from_the_checkpoints(tiny):
  r, config = tiny["result"], tiny["config"]
  for m in range(M):
    sd = torch.load(os.path.join(tiny["ckpt"], f"model_{m:05d}.pt"), weights_only=True)
    assert [tuple(v.shape) for v in sd.values()] == [(16, 1, 5, 5), (16,), (32, 16, 5, 5), (32,), (512, 512), (512,),
                                                      (1, 512), (1,)]
    u = tb.test_noise(SEED, m, (28, 28, 1))  # (C, H, W)
    for split, xs in tiny["splits"].items():
      with torch.no_grad():
        logit = _functional_logit(sd, torch.from_numpy(xs.transpose(0, 3, 1, 2).copy()) + SIGMA * u)
      np.testing.assert_array_equal(r.preds[split][m], (logit > 0).long().numpy())
  assert config.num_models == M


def test_parameter_count_matches_the_flax_model():
  import jax  # pylint: disable=g-import-not-at-top

  from certssb_jax.models import zoo as models  # pylint: disable=g-import-not-at-top

  flax_params = models.MnistCNN(num_outputs=1).init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
  n_flax = sum(a.size for a in jax.tree.leaves(flax_params))
  n_torch = sum(p.numel() for p in tb.MnistCNN((28, 28, 1)).parameters())
  assert n_torch == n_flax == 416 + 12832 + 262656 + 513


def test_bad_input_raises():
  x = np.zeros((8, 28, 28, 1), np.float32)
  y = np.zeros(8, np.int32)
  ok = dict(num_models=1, epochs=1, batch_size=4, learning_rate=1e-3, sigma=0.25)
  with pytest.raises(ValueError, match="sigma"):
    tb.BaselineConfig(**{**ok, "sigma": 0.0}).validate()
  with pytest.raises(ValueError, match="num_models"):
    tb.BaselineConfig(**{**ok, "num_models": 0}).validate()
  with pytest.raises(ValueError, match="batch_size"):
    tb.train_ensemble(x, y, 2, tb.BaselineConfig(**{**ok, "batch_size": 16}), "/tmp/unused_torch_ckpt")
  with pytest.raises(ValueError, match="labels"):
    tb.train_ensemble(x, np.full(8, 2, np.int32), 2, tb.BaselineConfig(**ok), "/tmp/unused_torch_ckpt")
  with pytest.raises(ValueError, match="y_train"):
    tb.train_ensemble(x, y[:5], 2, tb.BaselineConfig(**ok), "/tmp/unused_torch_ckpt")


def test_agreement_mcnemar_matches_statsmodels_and_detects_a_difference():
  from statsmodels.stats.contingency_tables import mcnemar  # pylint: disable=g-import-not-at-top

  import benchmarks.compare_torch as ct  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  a = rng.uniform(size=300) < 0.8
  b = a.copy()
  flip = np.concatenate([np.flatnonzero(a)[:7], np.flatnonzero(~a)[:5]])  # 7 vs 5 discordant: no difference
  b[flip] = ~b[flip]
  agr = ct.agreement({"m": a}, {"m": b})
  table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
  assert agr["rows"]["m"]["p"] == pytest.approx(mcnemar(table, exact=True).pvalue)
  assert agr["rows"]["m"]["agree"]
  worse = a & (rng.uniform(size=300) < 0.7)  # ~ 24% fewer successes, all discordant one way
  assert not ct.agreement({"m": a}, {"m": worse})["all_agree"]
  same = ct.agreement({"m": a, "r": np.where(a, 0.2, 0.0)}, {"m": a, "r": np.where(a, 0.2, 0.0)})
  assert same["all_agree"] and same["num_tested"] == 0 and same["rows"]["r"]["p"] == 1.0


def test_steady_state_replaces_the_first_chunk_by_the_mean_of_the_others():
  import benchmarks.compare_torch as ct  # pylint: disable=g-import-not-at-top

  # opening at 0; chunk 1 (2 steps) ends at 10 (compile); chunks 2 and 3 take 1 s each; closing at 12.5
  rec = [(0.0, 0), (9.0, 1), (10.0, 2), (10.5, 3), (11.0, 4), (11.5, 5), (12.0, 6), (12.5, 6)]
  s = ct.steady_state(rec, 2)
  assert s["chunks"] == 3 and s["first"] == 10.0 and s["per_chunk"] == pytest.approx(1.25)
  assert s["without_compile"] == pytest.approx(12.5 - 10.0 + 1.25)
  assert ct.steady_state(rec[:3], 2) is None


def test_func_ensemble_step_equals_each_model_trained_alone():
  """The torch.func ensemble of bench_gpu.py: one stacked foreach-Adam step == each model's own Adam step."""
  shape, ids, b = (28, 28, 1), [3, 5], 6
  rng = np.random.default_rng(2)
  x = torch.from_numpy(rng.uniform(size=(len(ids), b, 1, 28, 28)).astype(np.float32))  # (C, B, C_in, H, W)
  y = torch.from_numpy(rng.integers(0, 2, (len(ids), b)).astype(np.int64))
  ens = tb.FuncEnsemble(shape, 2, ids, SEED, 1e-3)
  for _ in range(2):
    ens.step(x, y)
  for i, m in enumerate(ids):
    model = tb.init_model(shape, 2, SEED, m)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
      opt.zero_grad(set_to_none=True)
      tb.loss_fn(model(x[i]), y[i]).backward()
      opt.step()
    ref = model.state_dict()
    got = ens.state_dict(i)
    assert list(got) == list(ref)
    for k in ref:
      torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_compare_torch_config_setup_and_outcomes(tmp_path):
  """compare_torch.py on the current pipeline API: RAB config, the pipeline's data and poisoning, our bounds."""
  import benchmarks.compare_torch as ct  # pylint: disable=g-import-not-at-top

  m = 12
  config = ct.benchmark_config("configs/quickstart.py", m, 1)
  assert (config.defense.name, config.undefended.enabled, config.train.num_models, config.train.epochs) == (
      "rab", False, m, 1)
  setup = ct.make_setup(config, str(tmp_path / "jax"))
  a = setup.attacked
  assert len(a.y_train) == len(setup.sigma_train) and np.all(setup.sigma_train == config.sigma.sigma_0)
  assert os.path.exists(tmp_path / "jax" / "poison.npz")
  target = config.attack.target_class

  def unanimous(labels):  # every model votes for the given class of each input
    labels = np.asarray(labels, np.int64)
    return {"preds": np.tile(labels, (m, 1)), "probs_sum": m * np.eye(2)[labels]}

  out = ct.outcomes(setup, {"clean": unanimous(a.splits["clean"].y),
                            "triggered": unanimous(np.full(len(a.splits["triggered"].y), target))})
  assert out["clean accuracy"].all() and not out["abstain (clean)"].any() and out["CRA(r=0.0)"].all()
  assert out["ASR (triggered -> target)"].all() and not out["ERA (triggered, true label)"].any()
  assert np.all(out[ct.AREA] > 0)
