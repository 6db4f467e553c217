"""Ensemble training: fixed per-(model, sample) noise, per-model streams, and the vmapped chunk."""

import jax
import numpy as np
import pytest

from certssb_jax import rng
from certssb_jax.ensemble import member, trained, trainer as ensemble
from certssb_jax.models import weights, zoo as models


@pytest.fixture(scope="module")
def trainer():
  model = models.get_model("mnist_cnn", 2)
  cfg = ensemble.TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3, models_per_chunk=3)
  return ensemble.EnsembleTrainer(model, (28, 28, 1), cfg)


@pytest.fixture(scope="module")
def data():
  rs = np.random.RandomState(0)
  x = rs.rand(24, 28, 28, 1).astype(np.float32)
  y = (rs.rand(24) > 0.5).astype(np.int32)
  sigma = rs.uniform(0.1, 0.5, 24).astype(np.float32)
  return x, y, sigma


def _noise_by_sample(trainer, data, epoch, fresh=False):
  """Recovers z_{m,j} = (noised - x_j) / sigma_j for every (model, sample) seen in one epoch."""
  x, y, sigma = data
  ids = np.arange(3)
  out = {}
  for step in range(len(x) // trainer.config.batch_size):
    xb, yb, idx = trainer.training_batch(ids, member.Streams.ensemble(0), x, y, sigma, epoch, step, fresh)
    for m in range(3):
      for b, j in enumerate(idx[m]):
        assert yb[m, b] == y[j]
        out[(m, int(j))] = (xb[m, b] - x[j]) / sigma[j]
  return out


def test_training_noise_is_fixed_across_epochs_and_differs_between_models(trainer, data):
  e0 = _noise_by_sample(trainer, data, 0)
  e1 = _noise_by_sample(trainer, data, 1)
  assert len(e0) == 3 * 24  # every sample seen once per epoch (24 = 3 batches of 8)
  for key, z in e0.items():
    np.testing.assert_allclose(z, e1[key], atol=1e-4)  # same z_{m,j} in every epoch
  for j in range(24):
    assert np.abs(e0[(0, j)] - e0[(1, j)]).max() > 0.5  # models see different noise
  # and it is the documented stream: normal(fold_in(fold_in(k_train_noise, m), j))
  k = jax.random.fold_in(jax.random.fold_in(rng.stream(0, rng.TRAIN_NOISE), 2), 5)
  np.testing.assert_allclose(e0[(2, 5)], np.asarray(jax.random.normal(k, (28, 28, 1))), atol=1e-4)


def test_batch_order_changes_between_epochs(trainer, data):
  x, y, sigma = data
  _, _, idx0 = trainer.training_batch(np.arange(3), member.Streams.ensemble(0), x, y, sigma, 0, 0)
  _, _, idx1 = trainer.training_batch(np.arange(3), member.Streams.ensemble(0), x, y, sigma, 1, 0)
  assert not np.array_equal(idx0, idx1)
  assert not np.array_equal(idx0[0], idx0[1])  # and between models


def test_fresh_noise_redraws_per_epoch(trainer, data):
  e0 = _noise_by_sample(trainer, data, 0, fresh=True)
  e1 = _noise_by_sample(trainer, data, 1, fresh=True)
  assert all(np.abs(e0[k] - e1[k]).max() > 0.5 for k in e0)


def test_chunk_training_equals_training_each_model_alone(data):
  """Model m of a vmapped chunk is the same function as model m trained in a chunk of its own."""
  x, y, sigma = data
  model = models.get_model("mnist_cnn", 2)
  cfg = dict(epochs=1, batch_size=8, learning_rate=1e-3)
  big = ensemble.EnsembleTrainer(model, (28, 28, 1), ensemble.TrainConfig(models_per_chunk=2, **cfg))
  one = ensemble.EnsembleTrainer(model, (28, 28, 1), ensemble.TrainConfig(models_per_chunk=1, **cfg))
  streams = member.Streams.ensemble(7)
  both = big.train_chunk(np.arange(2), streams, x, y, sigma)
  second = one.train_chunk(np.array([1]), streams, x, y, sigma)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b[0], rtol=2e-4, atol=2e-5), both.params, second.params)
  first = jax.tree.map(lambda a: a[0], both.params)
  assert not np.allclose(first["Dense_0"]["kernel"], jax.tree.map(lambda a: a[1], both.params)["Dense_0"]["kernel"])


@pytest.mark.parametrize("models_per_chunk", [1, 3])
def test_noised_copies_and_noise_from_keys_train_the_same_bits(data, monkeypatch, models_per_chunk):
  """The two noise sources (a chunk's noised training sets made once, or noise regenerated in every step) give
  bit-identical models, and the copy is what a trainer uses when it fits NOISE_CACHE_BYTES."""
  x, y, sigma = data
  model = models.get_model("mnist_cnn", 2)
  tr = ensemble.EnsembleTrainer(model, (28, 28, 1), ensemble.TrainConfig(2, 8, 1e-3, models_per_chunk))
  streams, ids = member.Streams.ensemble(3), np.arange(models_per_chunk)
  assert tr.noise_source(x, sigma) == "noised_copy"
  cached = tr.train_chunk(ids, streams, x, y, sigma)
  monkeypatch.setattr(ensemble, "NOISE_CACHE_BYTES", models_per_chunk * x.size * 4 - 1)
  assert tr.noise_source(x, sigma) == "noise_keys"
  from_keys = tr.train_chunk(ids, streams, x, y, sigma)
  for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(from_keys)):
    np.testing.assert_array_equal(a, b)
  # the undefended model (no sigma) and the pilot (fresh noise every epoch) never use a copy
  monkeypatch.setattr(ensemble, "NOISE_CACHE_BYTES", 1 << 30)
  assert tr.noise_source(x, None) == "none" and tr.noise_source(x, sigma, fresh_noise=True) == "noise_keys"


def test_the_step_returns_every_models_loss_and_a_nan_stops_the_run(data):
  x, y, sigma = data
  model = models.get_model("mnist_cnn", 2)
  tr = ensemble.EnsembleTrainer(model, (28, 28, 1), ensemble.TrainConfig(2, 8, 1e-3, 2))
  _, losses = tr.train_chunk(np.arange(2), member.Streams.ensemble(0), x, y, sigma, return_losses=True)
  assert losses.shape == (2, 2 * (len(x) // 8)) and np.all(np.isfinite(losses)) and np.all(losses > 0)
  ensemble.check_losses(losses, np.arange(2))
  losses[1, 3] = np.nan
  with pytest.raises(FloatingPointError, match=r"model\(s\) \[1\] from step 3"):
    ensemble.check_losses(losses, np.arange(2))
  bad = x.copy()
  bad[0, 0, 0, 0] = np.nan
  _, nan_losses = tr.train_chunk(np.arange(2), member.Streams.ensemble(0), bad, y, sigma, return_losses=True)
  with pytest.raises(FloatingPointError):
    ensemble.check_losses(nan_losses, np.arange(2))


def test_training_reduces_the_loss_and_learns(data):
  rs = np.random.RandomState(1)
  x = rs.rand(64, 28, 28, 1).astype(np.float32) * 0.2
  y = (np.arange(64) % 2).astype(np.int32)
  x[y == 1, 10:18, 10:18, 0] = 1.0  # a separable task
  model = models.get_model("mnist_cnn", 2)
  tr = ensemble.EnsembleTrainer(model, (28, 28, 1),
                                ensemble.TrainConfig(epochs=5, batch_size=16, learning_rate=1e-3, models_per_chunk=2))
  state = tr.train_chunk(np.arange(2), member.Streams.ensemble(0), x, y, np.full(64, 0.1, np.float32))
  logits = trained.predict_logits(model, state, x)  # (2, 64, 1)
  acc = ((logits[..., 0] > 0) == y).mean(axis=1)
  assert np.all(acc > 0.95), acc


def test_chunks_pad_the_last_chunk():
  model = models.get_model("mnist_cnn", 2)
  tr = ensemble.EnsembleTrainer(model, (28, 28, 1), ensemble.TrainConfig(1, 8, 1e-3, models_per_chunk=4))
  chunks = tr.chunks(10)
  assert [list(c) for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_train_chunk_rejects_a_too_small_training_set():
  model = models.get_model("mnist_cnn", 2)
  tr = ensemble.EnsembleTrainer(model, (28, 28, 1), ensemble.TrainConfig(1, 64, 1e-3, models_per_chunk=1))
  with pytest.raises(ValueError, match="fewer than train.batch_size 64; use train.batch_size=10"):
    tr.train_chunk(np.arange(1), member.Streams.ensemble(0), np.zeros((10, 28, 28, 1)), np.zeros(10), None)


def test_pretrained_weights_initialise_every_model_but_the_head(tmp_path):
  model = models.get_model("mnist_cnn", 2)
  cfg = ensemble.TrainConfig(1, 8, 1e-3, models_per_chunk=2)
  source = model.init(jax.random.key(42), np.zeros((1, 28, 28, 1), np.float32))
  weights.save_params(source, str(tmp_path / "w.npz"))
  tr = ensemble.EnsembleTrainer(model, (28, 28, 1), cfg, pretrained=weights.read_params(str(tmp_path / "w.npz")))
  plain = ensemble.EnsembleTrainer(model, (28, 28, 1), cfg)
  state = tr.init_chunk(np.arange(2), member.Streams.ensemble(0))
  fresh = plain.init_chunk(np.arange(2), member.Streams.ensemble(0))
  for m in range(2):
    np.testing.assert_array_equal(state.params["Conv_0"]["kernel"][m], source["params"]["Conv_0"]["kernel"])
    np.testing.assert_array_equal(state.params["Dense_0"]["kernel"][m], source["params"]["Dense_0"]["kernel"])
  # the head keeps each model's own initialisation
  np.testing.assert_array_equal(state.params["head"]["kernel"], fresh.params["head"]["kernel"])
  assert not np.array_equal(state.params["head"]["kernel"][0], source["params"]["head"]["kernel"])
  assert not np.array_equal(fresh.params["Conv_0"]["kernel"][0], source["params"]["Conv_0"]["kernel"])


def test_the_training_step_is_traced_once_for_every_chunk_epoch_and_step(monkeypatch, data):
  """Chunks, epochs and steps reuse one compiled step per noise source (chex counts the traces of the member
  step inside it): a step index or model ids that reach the program as constants would retrace it every time."""
  import chex  # pylint: disable=g-import-not-at-top

  chex.clear_trace_counter()
  monkeypatch.setattr(ensemble, "member_step", chex.assert_max_traces(member.member_step, n=1))
  x, y, sigma = data
  tr = ensemble.EnsembleTrainer(models.get_model("mnist_cnn", 2), (28, 28, 1),
                                ensemble.TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3, models_per_chunk=1))
  assert tr.layout.num_slots == 1  # one slot: a trace of the step traces the member step once
  for m in range(3):
    tr.train_chunk(np.array([m]), member.Streams.ensemble(0), x, y, sigma)  # 3 chunks x 2 epochs x 3 steps
