"""The certification kernel against a naive per-model, per-input loop, and against itself on shifted inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certssb_jax import rng
from certssb_jax.certify import kernel as certify
from certssb_jax.ensemble import trainer as ensemble
from certssb_jax.ensemble.member import MemberState, Streams
from certssb_jax.models import zoo as models

# The votes must agree exactly; summed probabilities to the backend's default matmul precision (float32 on CPU,
# TF32 convolutions on recent NVIDIA GPUs: about 1e-4 on these sums).
PROBS_TOL = dict(rtol=1e-5, atol=1e-6) if jax.default_backend() == "cpu" else dict(rtol=1e-3, atol=5e-4)


def _ensemble(num_models, num_classes):
  model = models.get_model("mnist_cnn", num_classes)
  tx_cfg = ensemble.TrainConfig(1, 8, 1e-3, models_per_chunk=num_models)
  tr = ensemble.EnsembleTrainer(model, (28, 28, 1), tx_cfg)
  return model, tr.init_chunk(np.arange(num_models), Streams.ensemble(0))


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


def test_ranks_order_each_models_probabilities_across_chunks_and_padding():
  model, state = _ensemble(5, 4)
  rs = np.random.RandomState(3)
  x = rs.rand(6, 28, 28, 1).astype(np.float32)
  sigma = np.full(6, 0.5, np.float32)
  chunks = [(np.array([0, 1, 2]), jax.tree.map(lambda a: a[:3], state)),
            (np.array([3, 4, 5]), jax.tree.map(lambda a: a[np.array([3, 4, 4])], state))]  # id 5 = padding
  preds, probs, ranks = certify.certify_inputs(model, chunks, x, sigma, seed=2, num_models=5, batch_size=4,
                                               models_per_chunk=2, return_ranks=True)
  assert ranks.shape == (5, 6, 4) and ranks.dtype == np.uint8
  np.testing.assert_array_equal(np.sort(ranks, axis=-1), np.broadcast_to(np.arange(4), ranks.shape))
  np.testing.assert_array_equal(ranks.argmin(-1), preds)
  for m in range(5):  # model m's rank order is the order of its own probabilities on each input
    u = np.asarray(jax.random.normal(rng.member_key(2, rng.TEST_NOISE, m), x.shape[1:]))
    p = np.asarray(models.logits_to_probs(model.apply({"params": jax.tree.map(lambda a, m=m: a[m], state.params)},
                                                      jnp.asarray(x + 0.5 * u))))
    by_rank = np.take_along_axis(p, np.argsort(ranks[m], -1), -1)  # the probabilities, rank 0 first
    assert (np.diff(by_rank, axis=-1) <= 1e-6).all(), by_rank
  np.testing.assert_array_equal(certify.class_ranks(np.array([[0.2, 0.5, 0.2, 0.1]])), [[1, 0, 2, 3]])


def test_sigma_zero_votes_on_the_input_itself_beside_noised_inputs():
  """A counting defense queries at sigma 0: the kernel must then return each member's class on x itself (no
  noise, whatever u_m is), even when the same batch holds inputs queried at sigma > 0."""
  model, state = _ensemble(3, 3)
  rs = np.random.RandomState(2)
  x = rs.rand(6, 28, 28, 1).astype(np.float32)
  sigma = np.array([0.0, 0.8, 0.0, 1.5, 0.0, 0.3], np.float32)
  preds, probs = certify.certify_inputs(model, [(np.arange(3), state)], x, sigma, seed=7, num_models=3)
  clean = np.stack([np.asarray(models.logits_to_pred(model.apply(
      {"params": jax.tree.map(lambda a, m=m: a[m], state.params)}, jnp.asarray(x)))) for m in range(3)])
  zero = sigma == 0
  np.testing.assert_array_equal(preds[:, zero], clean[:, zero])
  naive_votes, naive_probs = _naive(model, state, x, sigma, 7, 3, 3)
  np.testing.assert_array_equal(certify.votes_from_preds(preds, 3), naive_votes)
  np.testing.assert_allclose(probs, naive_probs, **PROBS_TOL)
  assert (preds[:, ~zero] != clean[:, ~zero]).any()  # the noised inputs do move: sigma > 0 was applied

class _Scores(nn.Module):
  """K = 10 logits, a fixed random linear map of the flattened input: the class moves with the noise."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(10, use_bias=False, name="head")(x.reshape(x.shape[0], -1))


def test_test_noise_is_one_fixed_vector_per_model():
  """Model m sees x + sigma_x * u_m with u_m = normal(member_key(seed, TEST_NOISE, m)), one vector per model for
  every input, and each input's own sigma_x: M copies of one model, so model m' on the shifted input
  x + sigma_x * u_m - tau * u_m' at noise tau sees exactly what model m saw on x at sigma_x and must give its class
  (a metamorphic check: the kernel on both sides, no second forward pass). Another seed moves the classes."""
  shape, num_models, n = (4, 4, 1), 4, 24
  rs = np.random.RandomState(0)
  model = _Scores()
  params = model.init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
  stacked = jax.tree.map(lambda a: np.repeat(np.asarray(a)[None], num_models, axis=0), params)
  chunks = [(np.arange(num_models), MemberState(stacked, {}, None))]
  x = rs.normal(0.0, 0.3, (n, *shape)).astype(np.float32)
  sigma = rs.uniform(0.5, 1.5, n).astype(np.float32)
  tau = rs.uniform(0.5, 1.5, n).astype(np.float32)  # another sigma for each input
  run = lambda xs, sig, seed: certify.certify_inputs(model, chunks, xs, sig, seed=seed, num_models=num_models,
                                                     batch_size=n)[0]  # one batch shape: one compilation
  preds = run(x, sigma, 3)
  u = np.stack([np.asarray(jax.random.normal(rng.member_key(3, rng.TEST_NOISE, m), shape))
                for m in range(num_models)])  # (M, *shape)
  other = (np.arange(num_models) + 1) % num_models  # model m' = m + 1 answers for model m
  expand = lambda a: a[None, :, None, None, None]
  shifted = x[None] + expand(sigma) * u[:, None] - expand(tau) * u[other, None]  # (source model m, N, *shape)
  shifted_preds = run(shifted.reshape(-1, *shape), np.tile(tau, num_models), 3)
  shifted_preds = shifted_preds.reshape(num_models, num_models, n)  # (model, source model m, input)
  np.testing.assert_array_equal(shifted_preds[other, np.arange(num_models)], preds)
  assert len(np.unique(preds)) >= 4 and (preds != preds[:1]).mean() > 0.5  # the classes move with the noise
  assert (run(x, sigma, 4) != preds).any()  # another seed, other noise


def test_votes_from_preds():
  preds = np.array([[0, 1, 1], [1, 1, 0]])
  np.testing.assert_array_equal(certify.votes_from_preds(preds, 2), [[1, 1], [0, 2], [1, 1]])
