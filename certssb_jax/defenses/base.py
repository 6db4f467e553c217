"""The defense seam: what a defense tells the one ensemble engine.

A ``Defense`` is a small record of functions, as an optax ``GradientTransformation`` is: the run asks it how
each member's training view is made, at which noise the members train and vote, and how votes become a
certificate. Two families plug in:

* smoothing (RAB, Cert-SSB): every member sees the whole training set with its own fixed Gaussian noise and
  votes on noised queries; the certificate is an l2 radius (``certify.bounds``), answers go through the store.
* counting (DPA, bagging): each member sees a part of the training set (a partition, a bag) without noise and
  votes on the clean query; the certificate is a number of poisoned training samples, labels included.

A defense also owns its config section: ``resolve`` checks and fills the fields it reads and clears the ones it
does not, so that two runs of one defense differ only by what they compute. ``settings`` binds a value's
arguments (``defenses.dpa(k=50)``) to config fields, which is how a run records it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

from ml_collections import config_dict
import numpy as np

from certssb_jax import checks
from certssb_jax.ensemble.views import MemberViews

# The threats a count certifies against (``CountCertificate.counts``):
MODIFICATIONS = "modifications"  # r training samples changed at will (image and label), the set's size n fixed
INSERTIONS_DELETIONS = "insertions_deletions"  # r training samples inserted or deleted, in total

THREAT_TEXT = {MODIFICATIONS: "modified training samples (any image and label, n fixed)",
               INSERTIONS_DELETIONS: "inserted or deleted training samples (in total)"}


@dataclasses.dataclass(frozen=True)
class CountCertificate:
  """What a counting defense certifies for each query.

  Attributes:
    pred: (N,) the ensemble's class (majority vote, ties to the smaller class).
    votes_top: (N,) votes for ``pred``.
    votes_runner: (N,) votes for the strongest other class.
    counts: threat (``MODIFICATIONS``, ``INSERTIONS_DELETIONS``) -> (N,) int64, the largest number of such
      changes of the training set that cannot change ``pred``; -1 where not even the unchanged training set is
      certified (bagging's bound). A defense lists only the threats its certificate covers.
    exact: True when the counts hold with certainty (DPA), False when each holds with probability >= 1 - alpha
      (bagging: over the members' training; a test-time smoothed ensemble: over its draws).
    bounds: (p_low of the class, p_high of the strongest rival), (N,) each, where the certificate comes from
      bounds on vote probabilities that the run reports per query; else None.
    trigger_norm: where the counts hold together with any change of the test input of l2 norm below this (a
      test-time smoothed ensemble), else None (the test input as given).
    at_norm: trigger norm t -> the counts at t instead (same threats), where ``trigger_norm`` is set.
  """

  pred: np.ndarray
  votes_top: np.ndarray
  votes_runner: np.ndarray
  counts: dict[str, np.ndarray]
  exact: bool
  bounds: tuple[np.ndarray, np.ndarray] | None = None
  trigger_norm: float | None = None
  at_norm: Callable[[float], dict[str, np.ndarray]] | None = None

  @property
  def modifications(self) -> np.ndarray:
    """The count every counting defense here states: modified training samples."""
    return self.counts[MODIFICATIONS]


class NoisePlan(NamedTuple):
  """Where a smoothing defense's noise levels come from (every field False: sigma_0 everywhere, no pilot)."""

  search_train: bool = False  # sigma_j of each training sample searched with the pilot
  search_test: bool = False  # sigma_x of each test input searched (the side-channel probe runs too)
  pilot: bool = False  # the pilot model is trained: a search scores with it


class Defense(NamedTuple):
  """How one defense uses the ensemble engine (see the module docstring).

  Attributes:
    name: as reported ("RAB", "Cert-SSB", "DPA", "bagging").
    key: its ``defense.name`` in a config (``defenses.REGISTRY``): "rab", "cert_ssb", "dpa", "bagging", ...
    family: "smoothing" (certifies an l2 trigger radius) or "counting" (certifies a number of poisoned samples).
    member_views: (config, poisoned training inputs, labels) -> the members' training views
      (``ensemble.views.MemberViews``), each a function of the member's own view alone; None: every member
      trains on the whole training set.
    certify_votes: (config, votes (N, K) int, training-set size, every member's vote (M, N) or None where the
      members do not vote one by one, or their ranks (M, N, K) with ``member_ranks``) -> CountCertificate
      (counting family); None for smoothing, whose bounds need each query's sigma
      (``certify.bounds.certify_counts`` through the run).
    describe: config -> the defense's settings as the summary records them.
    diagnostics: what the run reports beyond the certificates: "sigma_search" (the search settings in the
      summary), "sigma_histogram" (the plot of the training and test sigmas), "side_channel_probe" (whether
      sigma_x leaks the trigger, in the summary).
    largest_certificate: (config, training-set size) -> {threat: the most any answer can certify} (counting).
    view_size: (mutable config, training-set size) -> the typical member view's length, after filling and
      checking the defense's fields that depend on that size (counting; raises ValueError naming the field).
    train_sigma: config -> the Gaussian augmentation its members train with, None for none (counting).
    query_votes: (config, trained ensemble, queries, progress) -> vote counts (N, K); None: every member's vote
      on the clean query (counting).
    buckets: config -> (B, d) int, the members each bucket of the training set feeds (a changed training sample
      changes one bucket, or two for a modification under a hash of the sample); None where members' views
      overlap at random (bagging).
    member_ranks: ``certify_votes`` gets every member's rank of every class (M, N, K) in place of its vote.
    trains: the key of the defense whose members this one votes with (both share trained models); None: its own.
    resolve: (mutable config) -> None: checks the defense's fields and fills or clears them (module docstring);
      raises ValueError in one line naming the field.
    noise: config -> ``NoisePlan``, where the noise levels come from (smoothing).
    training_identity: JSON config -> what, beside data, attack, model, training and seed, decides the models
      its members are (``experiment.identity.training_key``): two runs whose identities agree share trained models.
    settings: config field (dotted) -> value, the arguments a factory bound (``with_defense`` applies them).
  """

  name: str
  key: str
  family: str
  member_views: Callable[[Any, np.ndarray, np.ndarray], MemberViews] | None
  certify_votes: Callable[[Any, np.ndarray, int, np.ndarray | None], CountCertificate] | None
  describe: Callable[[Any], dict[str, Any]]
  diagnostics: tuple[str, ...] = ()
  largest_certificate: Callable[[Any, int], dict[str, int]] | None = None
  view_size: Callable[[Any, int], int] | None = None
  train_sigma: Callable[[Any], float | None] = lambda cfg: None
  query_votes: Callable[[Any, Any, np.ndarray, Any], np.ndarray] | None = None
  buckets: Callable[[Any], np.ndarray] | None = None
  member_ranks: bool = False
  trains: str | None = None
  resolve: Callable[[Any], None] = lambda c: None
  noise: Callable[[Any], NoisePlan] = lambda cfg: NoisePlan()
  training_identity: Callable[[dict[str, Any]], dict[str, Any]] = lambda j: {}
  settings: dict[str, Any] = {}


def top_two(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(class c, n_c, strongest other class c', n_c') of each row of votes (N, K); c = argmax with ties to the
  smaller class (numpy's argmax), c' likewise among the others."""
  votes = np.asarray(votes, np.int64)
  rows = np.arange(len(votes))
  c = votes.argmax(1)
  others = votes.copy()
  others[rows, c] = -1
  c2 = others.argmax(1)
  return c, votes[rows, c], c2, votes[rows, c2]


# ---------------------------------------------------------------------------------------------- config sections

# The sigma fields only a search of noise levels reads (Cert-SSB's); every other defense records them as None.
SEARCH_FIELDS = ("train", "objective", "rule", "sigma_lo", "sigma_hi", "num_steps", "num_draws", "lr", "kappa",
                 "target_draws", "start", "scorer", "search_models", "batch_size", "pilot_epochs", "pilot_sigma")
PARTITION_KEYS = ("sample", "position")  # what decides a training sample's part (``partition``)


def resolve_fixed_noise(c: Any) -> None:
  """One noise level, sigma_0, and no search: the sigma section records sigma_0 alone."""
  s = c.sigma
  checks.check(s.sigma_0 > 0 and math.isfinite(s.sigma_0), f"sigma.sigma_0 must be > 0, got {s.sigma_0}")
  for name in SEARCH_FIELDS:
    s[name] = None


def resolve_counting(c: Any) -> None:
  """The counting defenses' section: partition key, spread, bag size and member batch; a noise level sigma_0 (the
  members' augmentation and the queries' noise where the defense uses one) and no search; their own bound."""
  f, cert = c.defense, c.certify
  checks.one_of(f.partition, PARTITION_KEYS, "defense.partition")
  if f.bag_size == 0:  # configs written before the bag size was recorded: 0 meant "derive it"
    f.bag_size = None
  checks.check(isinstance(f.spread, int) and f.spread >= 1, f"defense.spread must be an int >= 1, got {f.spread!r}")
  for name in ("bag_size", "member_batch_size"):
    checks.check(f[name] is None or (isinstance(f[name], int) and f[name] >= 1),
                 f"defense.{name} must be an int >= 1 or None, got {f[name]!r}")
  resolve_fixed_noise(c)
  checks.check(isinstance(cert.draws, int) and cert.draws >= 1,
               f"certify.draws must be an int >= 1, got {cert.draws!r}")
  checks.check(cert.bound == "clopper_pearson" and cert.correction == "bonferroni" and cert.compat == "none",
               f"defense.name={f.name} certifies with its own bound: leave certify.bound, correction and compat at "
               "their defaults")


def counting_identity(defense: Defense) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """A counting defense's training identity: its section (under the name of the defense whose members it trains)
  and its members' augmentation."""
  def identity(j: dict[str, Any]) -> dict[str, Any]:
    noise = defense.train_sigma(config_dict.ConfigDict(j))
    return {"defense": {**j["defense"], "name": defense.trains or defense.key}, "sigma_0": noise, "sigma": None}

  return identity


def counting(**fields: Any) -> Defense:
  """A counting defense: its fields, with the family's config section and training identity."""
  defense = Defense(family="counting", resolve=resolve_counting, **fields)
  return defense._replace(training_identity=counting_identity(defense))
