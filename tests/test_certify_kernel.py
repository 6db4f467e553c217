"""The certification kernel against a naive per-model, per-input loop."""

import jax
import jax.numpy as jnp
import numpy as np

from certssb_jax import certify
from certssb_jax import ensemble
from certssb_jax import models
from certssb_jax import rng
from certssb_jax.member import Streams

# The votes must agree exactly; summed probabilities to the backend's default matmul precision (float32 on CPU,
# TF32 convolutions on recent NVIDIA GPUs: about 1e-4 on these sums).
PROBS_TOL = dict(rtol=1e-5, atol=1e-6) if jax.default_backend() == "cpu" else dict(rtol=1e-3, atol=5e-4)


def _ensemble(num_models, num_classes):
  model = models.get_model("mnist_cnn", num_classes)
  tx_cfg = ensemble.TrainConfig(1, 8, 1e-3, models_per_chunk=num_models)
  tr = ensemble.EnsembleTrainer(model, (28, 28, 1), tx_cfg)
  dummy = np.zeros((8, 28, 28, 1), np.float32), np.zeros(8, np.int32)
  return model, tr.train_chunk(np.arange(num_models), Streams.ensemble(0), *dummy, None, epochs=0)


def _naive(model, state, x, sigma, seed, num_models, num_classes):
  votes = np.zeros((len(x), num_classes), np.int64)
  probs = np.zeros((len(x), num_classes))
  for m in range(num_models):
    u = np.asarray(jax.random.normal(rng.member_key(seed, rng.TEST_NOISE, m), x.shape[1:]))
    params = jax.tree.map(lambda a: a[m], state.params)
    for i in range(len(x)):
      logits = np.asarray(model.apply({"params": params}, jnp.asarray(x[i:i + 1] + sigma[i] * u)))[0]
      p = np.asarray(models.logits_to_probs(jnp.asarray(logits)))
      votes[i, int(np.argmax(p))] += 1
      probs[i] += p
  return votes, probs


def test_kernel_votes_match_a_naive_loop_binary_with_padding_and_chunks():
  model, state = _ensemble(3, 2)
  rs = np.random.RandomState(0)
  x = rs.rand(7, 28, 28, 1).astype(np.float32)
  sigma = rs.uniform(0.1, 1.0, 7).astype(np.float32)
  chunks = [(np.array([0, 1]), jax.tree.map(lambda a: a[:2], state)),
            (np.array([2, 3]), jax.tree.map(lambda a: a[np.array([2, 2])], state))]  # id 3 = padding
  preds, probs = certify.certify_inputs(model, chunks, x, sigma, seed=5, num_models=3, batch_size=4)
  votes = certify.votes_from_preds(preds, 2)
  naive_votes, naive_probs = _naive(model, state, x, sigma, 5, 3, 2)
  np.testing.assert_array_equal(votes, naive_votes)
  np.testing.assert_allclose(probs, naive_probs, **PROBS_TOL)
  assert preds.shape == (3, 7)


def test_kernel_votes_match_a_naive_loop_three_classes():
  model, state = _ensemble(2, 3)
  rs = np.random.RandomState(1)
  x = rs.rand(5, 28, 28, 1).astype(np.float32)
  sigma = np.full(5, 0.5, np.float32)
  preds, probs = certify.certify_inputs(model, [(np.arange(2), state)], x, sigma, seed=0, num_models=2)
  naive_votes, naive_probs = _naive(model, state, x, sigma, 0, 2, 3)
  np.testing.assert_array_equal(certify.votes_from_preds(preds, 3), naive_votes)
  np.testing.assert_allclose(probs, naive_probs, **PROBS_TOL)


def test_test_noise_is_one_fixed_vector_per_model():
  """Model m sees x + sigma u_m with u_m = normal(member_key(seed, TEST_NOISE, m)) for every input: one model,
  two inputs that differ by a constant, shifted logits exactly as the noise says."""
  model, state = _ensemble(2, 2)
  x = np.random.RandomState(0).rand(2, 28, 28, 1).astype(np.float32)
  preds_a, probs_a = certify.certify_inputs(model, [(np.arange(2), state)], x, np.full(2, 0.5, np.float32), seed=3,
                                            num_models=2)
  naive_votes, naive_probs = _naive(model, state, x, np.full(2, 0.5, np.float32), 3, 2, 2)
  np.testing.assert_array_equal(certify.votes_from_preds(preds_a, 2), naive_votes)
  np.testing.assert_allclose(probs_a, naive_probs, **PROBS_TOL)
  _, probs_b = certify.certify_inputs(model, [(np.arange(2), state)], x, np.full(2, 0.5, np.float32), seed=4,
                                      num_models=2)
  assert not np.allclose(probs_a, probs_b)  # another seed, other noise


def test_votes_from_preds():
  preds = np.array([[0, 1, 1], [1, 1, 0]])
  np.testing.assert_array_equal(certify.votes_from_preds(preds, 2), [[1, 1], [0, 2], [1, 1]])
