"""From a trained ensemble to a run's answers: what the kernel votes on (``kernel_requests``), every member's votes
(``run_kernel``), the float64 bounds of each split (``bound_split``, ``certificates``) and the store that answers
every query in order (``storage_update``). Each is a function a notebook can call on its own."""

from __future__ import annotations

import dataclasses

import numpy as np

from certssb_jax import defenses, multihost
from certssb_jax.certify import bounds, kernel as certify_lib
from certssb_jax.data import triggers
from certssb_jax.data.attacked import SPLITS, Attacked
from certssb_jax.ensemble import trained
from certssb_jax.experiment import config as config_lib
from certssb_jax.experiment.rundir import RunDir
from certssb_jax.progress import Progress
from certssb_jax.store.certified import CertifiedStore, StoreAnswer

Config = config_lib.Config


def kernel_requests(cfg: Config, attacked: Attacked, sigma_test: dict[str, np.ndarray]) -> dict[str, tuple]:
  """Every (inputs, sigma_x) the ensemble votes on, by name: the two splits at their sigma_x; in runs that search
  sigma_x, both splits again at the smallest and at the largest sigma_x used (the side-channel probe); with
  ``compat=reference`` the clean and the triggered test set (target class included) at sigma_0, as the
  reference release samples."""
  req = {s: (attacked.splits[s].x, sigma_test[s]) for s in SPLITS}
  if defenses.noise_plan(cfg).search_test:
    used = np.concatenate([sigma_test[s] for s in SPLITS])
    for name, level in (("at_min", used.min()), ("at_max", used.max())):
      req.update({f"{name}_{s}": (attacked.splits[s].x, np.full(len(sigma_test[s]), level, np.float32))
                  for s in SPLITS})
  if cfg.certify.compat == "reference":
    a = cfg.attack
    x_all, _ = triggers.apply_trigger(attacked.data.x_test, a.trigger, a.delta, a.blend_alpha)
    for name, x in (("ref_clean", attacked.data.x_test), ("ref_triggered_all", x_all)):
      req[name] = (x, np.full(len(x), cfg.sigma.sigma_0, np.float32))
  return req


def run_kernel(cfg: Config, members: trained.TrainedEnsemble, requests: dict[str, tuple],
               progress: Progress, ranks: bool = False) -> dict[str, np.ndarray]:
  """Every model's class and the summed probabilities on every request, in one pass over the ensemble.

  Returns:
    {"<name>_preds": (M, N) int32, "<name>_probs_sum": (N, K) float64} per request, and with ``ranks``
    "<name>_ranks" (M, N, K) uint8, every model's rank of every class (``certify.kernel.class_ranks``).
  """
  x = np.concatenate([r[0] for r in requests.values()])
  sigma = np.concatenate([r[1] for r in requests.values()])
  with progress(f"certify ({len(x)} inputs)", cfg.train.num_models, "model") as update:
    got = certify_lib.certify_inputs(
        members.model, members.chunks(), x, sigma, seed=cfg.seed, num_models=cfg.train.num_models,
        batch_size=cfg.certify.batch_size, on_chunk=update, mesh=members.trainer.mesh,
        member_map=members.trainer.member_map, models_per_chunk=cfg.certify.models_per_chunk, return_ranks=ranks)
  input_axis = {"preds": 1, "probs_sum": 0, "ranks": 1}
  out, start = {}, 0
  for name, (xr, _) in requests.items():
    for field, a in zip(input_axis, got):
      out[f"{name}_{field}"] = np.take(a, np.arange(start, start + len(xr)), axis=input_axis[field])
    start += len(xr)
  return out


def bound_split(cfg: Config, preds: np.ndarray, probs_sum: np.ndarray, sigma_x: np.ndarray,
                sigma_min: np.ndarray) -> bounds.Certificate:
  """Float64 bounds from the votes of the voting models (docs/method.md section 3).

  The search models (ids below ``sigma.search_models``) never vote. With the holdout correction the first
  ``holdout_models`` voters pick the class and the others bound it. ``probs_sum`` sums every model's
  probabilities, so Hoeffding (which needs them) runs only where every model votes.
  """
  c = cfg.certify
  k = probs_sum.shape[1]
  voters = preds[config_lib.voting(cfg)]
  kwargs = dict(alpha=c.alpha, bound=c.bound, correction=c.correction, sigma_x=sigma_x, sigma_min=sigma_min)
  if c.correction == "holdout":
    m0 = c.holdout_models
    return bounds.certify_counts(certify_lib.votes_from_preds(voters[m0:], k),
                                 selection_votes=certify_lib.votes_from_preds(voters[:m0], k), **kwargs)
  if bounds.BOUNDS[c.bound].uses_soft_scores and len(voters) != len(preds):
    raise ValueError("hoeffding needs the soft scores of the voting models only; run it without search models")
  return bounds.certify_counts(certify_lib.votes_from_preds(voters, k), soft_sums=probs_sum,
                               num_models=len(voters), **kwargs)


def certificates(cfg: Config, votes: dict[str, np.ndarray], sigma_test: dict[str, np.ndarray],
                 sigma_train: np.ndarray) -> tuple[dict[str, bounds.Certificate], dict[str, np.ndarray]]:
  """The certificates of both splits before the store, and the sigma_min their joint radii use.

  A searched sigma_x is a function of the poisoned training set (a pilot or members trained on it) while the
  joint certificate holds sigma_x fixed: a searched answer certifies its test-input radius only, so its joint
  radius (and sigma_min) is 0.
  """
  sigma_min = {s: bounds.sigma_min_of(sigma_test[s], sigma_train) for s in SPLITS}
  certs = {s: bound_split(cfg, votes[f"{s}_preds"], votes[f"{s}_probs_sum"], sigma_test[s], sigma_min[s])
           for s in SPLITS}
  if defenses.noise_plan(cfg).search_test:
    certs = {s: dataclasses.replace(c, radius=np.zeros_like(c.radius)) for s, c in certs.items()}
    sigma_min = {s: np.zeros_like(v) for s, v in sigma_min.items()}
  return certs, sigma_min


def storage_update(cfg: Config, attacked: Attacked, certs: dict[str, bounds.Certificate],
                   sigma_test: dict[str, np.ndarray], sigma_min: dict[str, np.ndarray], order: str,
                   rd: RunDir | None = None) -> dict[str, StoreAnswer]:
  """Answers every query of the run through ONE store of certified balls, in the given order (section 5).

  ``clean_first``: the clean split, then the triggered split, each in dataset order; ``triggered_first``
  the other way round. The answers are the certificates: no two of them contradict each other, but they
  depend on the order (whoever queries first decides). The store is saved as ``store.npz`` when ``rd`` is
  given, so a later stream can continue it (``CertifiedStore.load``).
  """
  st = CertifiedStore(attacked.data.input_shape)
  answers = {}
  for s in (SPLITS if order == "clean_first" else SPLITS[::-1]):
    answers[s] = st.certify(attacked.splits[s].x, certs[s].pred, certs[s].radius_test, sigma_test[s],
                            sigma_min=sigma_min[s])
  if rd is not None and multihost.is_primary():
    st.save(rd.file("store.npz"))
  return answers
