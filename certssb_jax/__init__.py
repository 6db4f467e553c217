"""certssb-jax: certified defenses against backdoor (data-poisoning) attacks in JAX/Flax: RAB and Cert-SSB
(randomized smoothing of training and test inputs), DPA, Finite Aggregation and bagging (certificates that count
poisoned samples) and DPA with test-time smoothing (a count and a test trigger together).

The Python API, the same functions ``python -m certssb_jax.launch`` uses:

  import certssb_jax as cj
  c = cj.load_config("configs/quickstart.py")          # or cj.base_config()
  summary = cj.run(c, "/tmp/run")                        # the whole experiment, resumable
  summary = cj.run(c, "/tmp/dpa", defense=cj.dpa(50))    # another defense, as a value

The layers, bottom to top: ``rng``, ``backend``, ``multihost``, ``files``, ``progress``, ``checks`` (ground
floor); ``data``, ``models``; ``ensemble`` (members, sharding, training programs); ``certify`` (kernel, bounds);
``store``; ``defenses``; ``experiment`` (config, run folder, pipeline, metrics, report); ``launch``, ``studies``
(``sweep``, ``envelope``, ``families``, ``count_study``) and ``apidoc`` on top. docs/api.md documents the names
below.
"""

from certssb_jax.certify.bounds import Certificate, certify_counts, poison_budget
from certssb_jax.certify.draws import draw_votes
from certssb_jax.certify.kernel import certify_inputs
from certssb_jax.data.sources import load_dataset
from certssb_jax.defenses import (
                                  CountCertificate,
                                  Defense,
                                  bagging,
                                  cert_ssb,
                                  dpa,
                                  dpa_smoothing,
                                  finite_aggregation,
                                  rab,
                                  run_off,
)
from certssb_jax.ensemble.trained import TrainedEnsemble
from certssb_jax.ensemble.trainer import EnsembleTrainer
from certssb_jax.ensemble.views import Views
from certssb_jax.experiment.config import base_config, load_config, with_defense
from certssb_jax.experiment.pipeline import compare, run, run_arrays
from certssb_jax.store.certified import CertifiedStore, StoreAnswer

__version__ = "0.1.0"

__all__ = ["Certificate", "CertifiedStore", "CountCertificate", "Defense", "EnsembleTrainer", "StoreAnswer",
           "TrainedEnsemble", "Views", "bagging", "base_config", "cert_ssb", "certify_counts", "certify_inputs",
           "compare", "dpa", "dpa_smoothing", "draw_votes", "finite_aggregation", "load_config", "load_dataset",
           "poison_budget", "rab", "run", "run_arrays", "run_off", "with_defense"]
