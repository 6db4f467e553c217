"""A PyTorch baseline of the smoothed ensemble, written the way the paper's code works (docs/method.md section 2).

This is the yardstick certssb-jax is measured against (``benchmarks/compare_torch.py``). It is written from
docs/method.md, not ported from the JAX code, and follows the structure of the RAB / Cert-SSB reference code:

* the MNIST CNN of docs/method.md section 7 (conv 5x5x16 VALID, relu, max-pool 2, conv 5x5x32 VALID, relu, max-pool 2,
  dense 512, relu, one logit; K logits for K > 2 classes), Adam, BCE-with-logits (cross-entropy for K logits);
* the M models are trained ONE BY ONE; model m first materialises its own noised copy of the (poisoned)
  training set, ``x + sigma * z_m`` with ``z_m`` drawn once from a ``torch.Generator`` seeded by (seed, m), and
  trains on that same copy for every epoch (the certificate needs the noise fixed per model and sample);
* every trained model's ``state_dict`` is saved to disk; certification reloads each checkpoint and runs it over
  the test splits with one fixed test-noise vector ``u_m`` per model (seeded by (seed, m)), counting votes.

Fixed sigma (RAB) only: one ``sigma`` for every training and test sample. Init, batch order, training noise and
test noise come from four generators seeded by (seed, purpose, m), so model m is a deterministic function of its
noised training set, as docs/method.md section 2 asks. The draws are of course not the JAX pipeline's draws (different
generators, and PyTorch's default init instead of Flax's), so the two agree in distribution, not bit for bit.

Batches are formed by indexing the materialised tensor with a shuffled permutation (the last incomplete batch
of every epoch is dropped, as in certssb-jax), instead of going through a ``DataLoader``: the baseline is, if
anything, faster than the reference code, so it is a demanding yardstick.

Inputs are numpy arrays in the project's layout, (n, H, W, C) float32 in [0, 1], so the baseline sees exactly
the data and poisoning of the JAX pipeline (``certssb_jax.experiment.pipeline.load_data`` / ``poison``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

# Purpose tags of the per-model generators (same meanings as certssb_jax/rng.py; the draws are independent).
INIT = 0  # parameter initialisation of model m
SHUFFLE = 1  # batch order of model m
TRAIN_NOISE = 2  # z_m: the fixed noise of model m's noised training copy
TEST_NOISE = 3  # u_m: the fixed test noise of model m

# on_batch(m, epoch, indices (B,), noised inputs (B, C, H, W)): what model m trains on at one step.
BatchHook = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  """What the baseline needs (a subset of the run config).

  Attributes:
    num_models: M, models trained one after the other.
    epochs: passes over the (fixed) noised training copy of each model.
    batch_size: training batch; each epoch has ``n // batch_size`` steps.
    learning_rate: Adam step size.
    sigma: the global noise level (RAB): every training and test sample uses it.
    seed: root of every generator (init, shuffle, training noise, test noise).
    certify_batch_size: test inputs per forward pass at certification.
  """

  num_models: int
  epochs: int
  batch_size: int
  learning_rate: float
  sigma: float
  seed: int = 0
  certify_batch_size: int = 512

  def validate(self) -> None:
    """Raises ValueError naming the first bad field."""
    for name in ("num_models", "epochs", "batch_size", "certify_batch_size"):
      value = getattr(self, name)
      if int(value) != value or value < 1:
        raise ValueError(f"BaselineConfig.{name} must be an integer >= 1, got {value!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"BaselineConfig.learning_rate must be > 0, got {self.learning_rate!r}")
    if not (self.sigma > 0 and np.isfinite(self.sigma)):
      raise ValueError(f"BaselineConfig.sigma must be finite and > 0, got {self.sigma!r}")


@dataclasses.dataclass
class BaselineResult:
  """Votes and stage times of one baseline run.

  Attributes:
    preds: split -> (M, N) int64, model m's class on input n (for the hold-out correction and paired tests).
    votes: split -> (N, K) int64 vote counts; every row sums to M.
    probs_sum: split -> (N, K) float64, sum over the models of the class probabilities (Hoeffding bounds).
    timings_s: ``train``, ``certify``, ``total`` (= train + certify) and their parts: ``train_noise`` (the noised
      copies), ``train_steps``, ``train_save``, ``certify_load``, ``certify_forward``.
  """

  preds: dict[str, np.ndarray]
  votes: dict[str, np.ndarray]
  probs_sum: dict[str, np.ndarray]
  timings_s: dict[str, float]


class MnistCNN(nn.Module):
  """The paper's MNIST CNN in PyTorch (docs/method.md section 7), for inputs (B, C, H, W) in pixel space.

  Args:
    input_shape: (H, W, C) of one input (the project's layout).
    num_outputs: 1 (one logit, binary) or K.
    hidden: width of the dense layer.
  """

  def __init__(self, input_shape: tuple[int, int, int], num_outputs: int = 1, hidden: int = 512):
    super().__init__()
    h, w, c = input_shape
    fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2  # two VALID 5x5 convs, two 2x2 pools
    if fh < 1 or fw < 1:
      raise ValueError(f"input_shape {input_shape} is too small for two 5x5 convolutions and two 2x2 pools")
    self.features = nn.Sequential(
        nn.Conv2d(c, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    self.head = nn.Sequential(nn.Linear(32 * fh * fw, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(self.features(x))


def member_seed(seed: int, tag: int, m: int) -> int:
  """A 63-bit generator seed for one (seed, purpose, model) triple, by numpy's SeedSequence hashing."""
  words = np.random.SeedSequence([int(seed), int(tag), int(m)]).generate_state(2, np.uint32)
  return int((int(words[0]) << 31) ^ int(words[1]))


def generator(seed: int, tag: int, m: int) -> torch.Generator:
  """The CPU generator of model m for one purpose."""
  return torch.Generator().manual_seed(member_seed(seed, tag, m))


def set_threads(num_threads: int | None = None) -> int:
  """Sets PyTorch's intra-op threads: every core by default (``os.cpu_count()``); returns the count."""
  n = int(num_threads) if num_threads else (os.cpu_count() or 1)
  if n < 1:
    raise ValueError(f"num_threads must be >= 1, got {num_threads!r}")
  torch.set_num_threads(n)
  return n


def to_nchw(x: np.ndarray) -> torch.Tensor:
  """(n, H, W, C) float numpy -> (n, C, H, W) contiguous float32 tensor."""
  x = np.asarray(x, np.float32)
  if x.ndim != 4:
    raise ValueError(f"inputs must have shape (n, H, W, C), got {x.shape}")
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def noised_training_set(x: torch.Tensor, sigma: float, seed: int, m: int) -> torch.Tensor:
  """Model m's noised copy of the training set, x + sigma * z_m, z_m ~ N(0, I) drawn once (docs/method.md section 2).

  Args:
    x: (n, C, H, W) training inputs in [0, 1].
    sigma: the noise level.
    seed: run seed.
    m: model index.

  Returns:
    (n, C, H, W) float32: a new tensor, the same for the same (seed, m).
  """
  z = torch.randn(x.shape, generator=generator(seed, TRAIN_NOISE, m), dtype=torch.float32)  # (n, C, H, W)
  return x + sigma * z


def test_noise(seed: int, m: int, input_shape: tuple[int, int, int]) -> torch.Tensor:
  """u_m, model m's fixed test noise (C, H, W), shared by every query (docs/method.md section 2)."""
  h, w, c = input_shape
  return torch.randn((c, h, w), generator=generator(seed, TEST_NOISE, m), dtype=torch.float32)


def init_model(input_shape: tuple[int, int, int], num_classes: int, seed: int, m: int) -> MnistCNN:
  """Model m with PyTorch's default init drawn from its INIT seed (the global RNG is restored afterwards)."""
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(member_seed(seed, INIT, m))
    return MnistCNN(input_shape, 1 if num_classes == 2 else num_classes)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  """BCE-with-logits for one logit, cross-entropy for K logits. logits (B, L), y (B,) int64."""
  if logits.shape[-1] == 1:
    return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype))
  return nn.functional.cross_entropy(logits, y)


def logits_to_pred_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """(class (B,), class probabilities (B, K)): sigmoid [1 - p, p] for one logit (class 1 iff logit > 0)."""
  if logits.shape[-1] == 1:
    p = torch.sigmoid(logits[:, 0])
    return (logits[:, 0] > 0).long(), torch.stack([1 - p, p], dim=-1)
  return logits.argmax(-1), torch.softmax(logits, -1)


def train_member(x_noised: torch.Tensor, y: torch.Tensor, m: int, num_classes: int, config: BaselineConfig,
                 on_batch: BatchHook | None = None) -> MnistCNN:
  """Trains model m on its fixed noised copy for ``config.epochs`` epochs of shuffled mini-batches.

  The model trains on the device of ``x_noised`` (the CPU, or a GPU for ``benchmarks/bench_gpu.py``); its init
  and batch order come from CPU generators, so they are the same on every device.

  Args:
    x_noised: (n, C, H, W) the model's noised training copy (kept for every epoch).
    y: (n,) int64 labels, on the device of ``x_noised``.
    m: model index (seeds its init and batch order).
    num_classes: K.
    config: the baseline settings.
    on_batch: optional hook called with (m, epoch, indices, inputs) before every step (for tests).

  Returns:
    The trained model (on the device of ``x_noised``).
  """
  n, c, h, w = x_noised.shape
  b = config.batch_size
  model = init_model((h, w, c), num_classes, config.seed, m).to(x_noised.device)
  model.train()
  opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
  shuffle = generator(config.seed, SHUFFLE, m)
  for epoch in range(config.epochs):
    perm = torch.randperm(n, generator=shuffle).to(x_noised.device)  # (n,)
    for s in range(n // b):
      idx = perm[s * b:(s + 1) * b]  # (B,)
      xb = x_noised[idx]  # (B, C, H, W)
      if on_batch is not None:
        on_batch(m, epoch, idx, xb)
      opt.zero_grad(set_to_none=True)
      loss_fn(model(xb), y[idx]).backward()
      opt.step()
  return model


class FuncEnsemble:
  """C models of ``MnistCNN`` trained in lockstep as one program: PyTorch's own way to train an ensemble at once.

  The models' parameters are stacked along a leading model axis (``torch.func.stack_module_state``), one step
  computes every model's gradient on its own batch with ``torch.func.vmap(torch.func.grad(loss))``, and one
  foreach Adam updates the stacked tensors (Adam is elementwise, so this is each model's own Adam). It is the
  PyTorch counterpart of certssb-jax's vmapped chunk (``benchmarks/bench_gpu.py`` times both on one GPU); the
  sequential ``train_member`` is the paper code's way.

  Args:
    input_shape: (H, W, C) of one input.
    num_classes: K.
    model_ids: the models (each initialised as ``init_model`` does for its id).
    seed: run seed.
    learning_rate: Adam step size.
    device: where the stacked parameters live.
  """

  def __init__(self, input_shape: tuple[int, int, int], num_classes: int, model_ids: list[int], seed: int,
               learning_rate: float, device: str | torch.device = "cpu"):
    from torch import func  # pylint: disable=g-import-not-at-top

    nets = [init_model(input_shape, num_classes, seed, m).to(device) for m in model_ids]
    self.params, self.buffers = func.stack_module_state(nets)  # name -> (C, ...) leaves
    self._base = copy.deepcopy(nets[0]).to("meta")  # the architecture, without storage

    def loss(params, buffers, x, y):
      return loss_fn(func.functional_call(self._base, (params, buffers), (x,)), y)

    self._grads = func.vmap(func.grad(loss))
    self.opt = torch.optim.Adam(list(self.params.values()), lr=learning_rate, foreach=True)

  def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
    """One Adam step of every model on its own batch: x (C, B, C_in, H, W), y (C, B) int64."""
    grads = self._grads(self.params, self.buffers, x, y)
    for name, p in self.params.items():
      p.grad = grads[name]
    self.opt.step()

  def state_dict(self, i: int) -> dict[str, torch.Tensor]:
    """Model i's parameters, keyed as its ``MnistCNN.state_dict()``."""
    return {name: p[i].detach() for name, p in self.params.items()}


def checkpoint_path(ckpt_dir: str, m: int) -> str:
  return os.path.join(ckpt_dir, f"model_{m:05d}.pt")


def train_ensemble(x_train: np.ndarray, y_train: np.ndarray, num_classes: int, config: BaselineConfig,
                   ckpt_dir: str, on_batch: BatchHook | None = None) -> dict[str, float]:
  """Trains the M models one by one and saves each ``state_dict`` as ``ckpt_dir/model_{m:05d}.pt``.

  Args:
    x_train: (n, H, W, C) float32 (possibly poisoned) training inputs in [0, 1].
    y_train: (n,) int labels in [0, K).
    num_classes: K >= 2.
    config: the baseline settings.
    ckpt_dir: checkpoint folder (created).
    on_batch: optional per-step hook (see ``train_member``).

  Returns:
    Seconds spent: ``train`` (all of it), ``train_noise``, ``train_steps``, ``train_save``.
  """
  config.validate()
  x, y = _check_data(x_train, y_train, num_classes)
  if len(y) < config.batch_size:
    raise ValueError(f"training set has {len(y)} samples, fewer than batch_size {config.batch_size}")
  os.makedirs(ckpt_dir, exist_ok=True)
  t = {"train_noise": 0.0, "train_steps": 0.0, "train_save": 0.0}
  start = time.perf_counter()
  for m in range(config.num_models):
    t0 = time.perf_counter()
    x_noised = noised_training_set(x, config.sigma, config.seed, m)  # (n, C, H, W), fixed for all epochs
    t1 = time.perf_counter()
    model = train_member(x_noised, y, m, num_classes, config, on_batch)
    t2 = time.perf_counter()
    torch.save(model.state_dict(), checkpoint_path(ckpt_dir, m))
    t3 = time.perf_counter()
    t["train_noise"] += t1 - t0
    t["train_steps"] += t2 - t1
    t["train_save"] += t3 - t2
    logger.debug("torch baseline: model %d trained in %.2f s", m, t3 - t0)
  t["train"] = time.perf_counter() - start
  return t


def certify(splits: dict[str, np.ndarray], input_shape: tuple[int, int, int], num_classes: int,
            config: BaselineConfig, ckpt_dir: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                             dict[str, float]]:
  """Reloads every checkpoint and runs it over each split with its fixed test noise (docs/method.md section 2).

  Model m sees ``x + sigma * u_m`` for every input x of every split (one u_m per model).

  Args:
    splits: split name -> (N, H, W, C) float32 test inputs.
    input_shape: (H, W, C).
    num_classes: K.
    config: the baseline settings.
    ckpt_dir: where ``train_ensemble`` saved the models.

  Returns:
    (preds: split -> (M, N) int64, probs_sum: split -> (N, K) float64, seconds: ``certify``, ``certify_load``,
    ``certify_forward``).
  """
  config.validate()
  xs = {name: to_nchw(x) for name, x in splits.items()}
  for name, x in xs.items():
    if tuple(x.shape[2:]) + (x.shape[1],) != tuple(input_shape):
      raise ValueError(f"split {name!r} has inputs of shape {tuple(splits[name].shape[1:])}, expected {input_shape}")
  preds = {name: np.empty((config.num_models, len(x)), np.int64) for name, x in xs.items()}
  probs_sum = {name: np.zeros((len(x), num_classes), np.float64) for name, x in xs.items()}
  t = {"certify_load": 0.0, "certify_forward": 0.0}
  start = time.perf_counter()
  model = MnistCNN(input_shape, 1 if num_classes == 2 else num_classes)
  model.eval()
  bsz = config.certify_batch_size
  for m in range(config.num_models):
    t0 = time.perf_counter()
    path = checkpoint_path(ckpt_dir, m)
    if not os.path.exists(path):
      raise ValueError(f"missing checkpoint of model {m}: {path}")
    model.load_state_dict(torch.load(path, weights_only=True))
    t1 = time.perf_counter()
    u = config.sigma * test_noise(config.seed, m, input_shape)  # (C, H, W)
    with torch.inference_mode():
      for name, x in xs.items():
        for i in range(0, len(x), bsz):
          pred, probs = logits_to_pred_probs(model(x[i:i + bsz] + u))
          preds[name][m, i:i + bsz] = pred.numpy()
          probs_sum[name][i:i + bsz] += probs.double().numpy()
    t["certify_load"] += t1 - t0
    t["certify_forward"] += time.perf_counter() - t1
  t["certify"] = time.perf_counter() - start
  return preds, probs_sum, t


def votes_from_preds(preds: np.ndarray, num_classes: int) -> np.ndarray:
  """(M, N) per-model classes -> (N, K) int64 vote counts."""
  return np.stack([(preds == k).sum(axis=0) for k in range(num_classes)], axis=1).astype(np.int64)


def run_baseline(x_train: np.ndarray, y_train: np.ndarray, splits: dict[str, np.ndarray], num_classes: int,
                 config: BaselineConfig, ckpt_dir: str, on_batch: BatchHook | None = None,
                 num_threads: int | None = None) -> BaselineResult:
  """Trains the M models one by one, saves them, then certifies every split from the checkpoints.

  Args:
    x_train: (n, H, W, C) float32 (poisoned) training inputs in [0, 1].
    y_train: (n,) int labels.
    splits: split name -> (N, H, W, C) test inputs (e.g. ``clean`` and ``triggered``).
    num_classes: K >= 2.
    config: the baseline settings.
    ckpt_dir: checkpoint folder.
    on_batch: optional per-step training hook (tests).
    num_threads: PyTorch threads; None: ``os.cpu_count()``.

  Returns:
    A ``BaselineResult`` (votes (N, K) per split, stage seconds).
  """
  threads = set_threads(num_threads)
  logger.info("torch baseline: %d models, %d epochs, %d threads", config.num_models, config.epochs, threads)
  timings = train_ensemble(x_train, y_train, num_classes, config, ckpt_dir, on_batch)
  preds, probs_sum, t_cert = certify(splits, tuple(np.shape(x_train)[1:]), num_classes, config, ckpt_dir)
  timings.update(t_cert)
  timings["total"] = timings["train"] + timings["certify"]
  votes = {name: votes_from_preds(p, num_classes) for name, p in preds.items()}
  return BaselineResult(preds, votes, probs_sum, {k: round(v, 3) for k, v in timings.items()})


def _check_data(x_train: np.ndarray, y_train: np.ndarray, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  x = to_nchw(x_train)  # (n, C, H, W)
  y = np.asarray(y_train)
  if y.shape != (len(x),):
    raise ValueError(f"y_train must have shape ({len(x)},), got {y.shape}")
  if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
    raise ValueError(f"y_train must hold integer labels in [0, {num_classes})")
  return x, torch.from_numpy(y.astype(np.int64))
