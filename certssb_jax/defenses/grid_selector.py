"""The grid selector's mathematics (docs/method.md section 4): for every test input, the sigma of RAB's trained grid
whose voting models are expected to certify the largest test-input radius, judged by held-out selector models
of each ensemble. Host-side float64; ``envelope.answers.grid_selector`` builds the answers from run folders."""

from __future__ import annotations

import numpy as np
import scipy.special
import scipy.stats

from certssb_jax.certify import bounds


def expected_radius(top_votes: np.ndarray, num_selector: int, num_voting: int, sigma: float, alpha: float,
                    num_classes: int) -> np.ndarray:
  """The selector's objective: the expected certified test-input radius at ``sigma``, host-side float64.

  The certificate the voters give is sigma * Phi^-1(pA_low(K)) for K of ``num_voting`` votes on the top class
  (Clopper-Pearson at alpha / num_classes, 0 when pA_low <= 1/2). The selector's ``top_votes`` of
  ``num_selector`` votes give a Jeffreys posterior Beta(k + 1/2, M_s - k + 1/2) on the class's probability, so K
  is beta-binomial; the objective is E[radius].

  Args:
    top_votes: (N,) the selector models' votes for their top class at ``sigma``.
    num_selector: M_s.
    num_voting: the voters' M.
    sigma: the noise level.
    alpha, num_classes: the run's alpha and K (Bonferroni).

  Returns:
    (N,) float64 expected radii.
  """
  k = np.arange(num_voting + 1)
  p_low = bounds.clopper_pearson_lower(k, num_voting, alpha / num_classes)
  radius = np.where(p_low > 0.5, sigma * scipy.special.ndtri(np.clip(p_low, 0.5, 1 - 1e-16)), 0.0)  # (M + 1,)
  a = np.asarray(top_votes, np.float64)[:, None] + 0.5
  pmf = scipy.stats.betabinom.pmf(k[None, :], num_voting, a, num_selector - a + 1.0)  # (N, M + 1)
  return pmf @ radius


def select_sigmas(selector_preds: dict[float, np.ndarray], num_voting: int, alpha: float,
                  num_classes: int) -> np.ndarray:
  """sigma_x of every input: the grid sigma of the largest expected radius (ties: the smaller sigma).

  Args:
    selector_preds: {sigma: (M_s, N) the selector models' classes at that sigma}.
    num_voting, alpha, num_classes: as in ``expected_radius``.

  Returns:
    (N,) float64 selected sigmas.
  """
  grid = sorted(selector_preds)
  objective = []
  for s in grid:
    preds = selector_preds[s]
    top = np.stack([(preds == c).sum(axis=0) for c in range(num_classes)], axis=1).max(axis=1)  # (N,)
    objective.append(expected_radius(top, len(preds), num_voting, s, alpha, num_classes))
  return np.asarray(grid)[np.argmax(np.stack(objective), axis=0)]  # argmax takes the first, the smallest sigma
