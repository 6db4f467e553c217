"""The defense seam: what a defense tells the one ensemble engine.

A ``Defense`` is a small record of functions, as an optax ``GradientTransformation`` is: the run asks it how
each member's training view is made, at which noise the members train and vote, and how votes become a
certificate. Two families plug in:

* smoothing (RAB, Cert-SSB): every member sees the whole training set with its own fixed Gaussian noise and
  votes on noised queries; the certificate is an l2 radius (``certify.bounds``), answers go through the store.
* counting (DPA, bagging): each member sees a part of the training set (a partition, a bag) without noise and
  votes on the clean query; the certificate is a number of poisoned training samples, labels included.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import numpy as np

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


class Defense(NamedTuple):
  """How one defense uses the ensemble engine (see the module docstring).

  Attributes:
    name: as reported ("RAB", "Cert-SSB", "DPA", "bagging").
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
    trains: the ``defenses.COUNTING`` name of the defense whose members this one votes with (both share trained
      models); None: its own.
  """

  name: str
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
