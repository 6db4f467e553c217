"""Certificate arithmetic of Cert-SSB (docs/method.md section 3): host-side, float64, scipy.

This module is deliberately host-side code. The device produces exact integer vote counts (or soft-score sums)
over the M ensemble members; everything statistical happens here in numpy float64 with scipy, vectorised over
the N test inputs. Nothing here runs in float32 or under ``jit``.

What is certified (docs/method.md section 3). With Sigma = diag(sigma_1^2 I, ..., sigma_n^2 I, sigma_x^2 I), a lower
bound ``pA_low`` on the probability of the predicted class c_A and an upper bound ``pB_high`` on every other
class, the smoothed prediction is constant for every joint perturbation Delta with

    || Sigma^(-1/2) Delta ||_2  <  margin := (Phi^-1(pA_low) - Phi^-1(pB_high)) / 2.

We report ``margin`` (sigma units), ``radius = sigma_min * margin`` (joint isotropic l2 radius, sigma_min =
min(sigma_x, min_j sigma_j)) and ``radius_test = sigma_x * margin`` (test input alone), and abstain
(``pred = -1``, margin = radius = radius_test = 0) when ``pA_low <= pB_high``.

Statistics (decided; docs/method.md section 3 "Statistics"):

* Selection. c_A is the argmax of the votes (``bound="clopper_pearson"``) or of the soft scores
  (``bound="hoeffding"``); ties go to the lowest class index (``np.argmax``).
* ``correction="bonferroni"`` (default). Choosing c_A from the same draws that bound it biases the bound (the
  selected class is the one whose count happened to come out high). We bound every one of the K classes
  simultaneously at level ``alpha / K`` each; by the union bound all K lower bounds hold together with
  probability >= 1 - alpha, so in particular the bound of whichever class was selected holds.
* ``correction="holdout"``. Cohen et al.'s CERTIFY (n0 selection draws): ``selection_votes`` from M0 held-out
  models choose c_A, and ``votes`` (or soft scores) from the other, independent models bound it at level
  ``alpha`` with no K factor. M is then the number of estimation models, ``votes.sum(axis=1)``.
* ``correction=None``. No selection correction: c_A and its bound come from the same draws at level alpha.
  This is BIASED (the coverage can fall below 1 - alpha, up to about K * alpha when classes are close) and is
  only provided to compare with the reference code and RAB, which do this.
* ``bound="clopper_pearson"`` (default): the exact one-sided Clopper-Pearson lower bound on votes[c_A] out of
  M at level alpha' (alpha / K or alpha), via ``scipy.stats.beta.ppf``.
* ``bound="hoeffding"``: on the mean soft score s_A = soft_sums[:, c_A] / M of M i.i.d. [0, 1] variables,
  pA_low = s_A - sqrt(ln(1 / alpha') / (2 M)), with M = ``num_models`` the REAL ensemble size (the reference
  release hard-codes 1000 there, which is wrong for M = 200).
* pB_high = 1 - pA_low in every case. This is valid because the class probabilities (of votes, and of mean
  soft scores alike) sum to one, so every runner-up has probability <= 1 - p_A <= 1 - pA_low. Hence the
  abstain rule pA_low <= pB_high is pA_low <= 1/2, and the margin equals Phi^-1(pA_low).
* Phi^-1 is ``scipy.special.ndtri`` in float64; probabilities are clipped away from {0, 1} only to avoid
  infinities (no certified margin is affected: pA_low of a certified input lies in (1/2, 1)).

``margin_ceiling`` gives the largest margin M and alpha allow at all, so users know when M is too small for the
radius they want (docs/method.md section 7: Hoeffding, M = 1000, alpha = 0.001, no correction: 1.565;
Clopper-Pearson with all votes on one class: about 2.46 uncorrected, 2.43 at alpha / 2).

``poison_budget`` turns a margin into the structured joint certificate: how many training images a trigger of
norm t may poison, the test input triggered too, before the certificate stops covering the attack.

``reference_certificate`` reproduces the reference release's formulas (docs/method.md section 6) for comparison
only; it is unsound and never the default.

The parts: ``intervals`` (confidence bounds, the ``BOUNDS`` registry), ``certificates`` (margins and radii),
``budget`` (concrete attacks, the poison budget, certified accuracy), ``reference`` (the release's formulas).
"""

from certssb_jax.certify.bounds.budget import (
  CRA_GRID,
  budget_grid,
  certified_accuracy,
  certified_accuracy_budget,
  certified_against,
  poison_budget,
  whitened_norm,
)
from certssb_jax.certify.bounds.certificates import (
  CORRECTIONS,
  Certificate,
  certify_counts,
  margin_ceiling,
  sigma_min_of,
)
from certssb_jax.certify.bounds.intervals import (
  BOUNDS,
  Bound,
  clopper_pearson_lower,
  clopper_pearson_upper,
  hoeffding_lower,
)
from certssb_jax.certify.bounds.reference import reference_certificate

__all__ = ["BOUNDS", "CORRECTIONS", "CRA_GRID", "Bound", "Certificate", "budget_grid", "certified_accuracy",
           "certified_accuracy_budget", "certified_against", "certify_counts", "clopper_pearson_lower",
           "clopper_pearson_upper", "hoeffding_lower", "margin_ceiling", "poison_budget", "reference_certificate",
           "sigma_min_of", "whitened_norm"]
