"""certssb-jax: certified defenses against backdoor (data-poisoning) attacks in JAX/Flax: RAB and Cert-SSB
(randomized smoothing of training and test inputs), DPA and bagging (certificates that count poisoned samples).

The Python API, the same functions ``python -m certssb_jax.launch`` uses:

  import certssb_jax as cj
  c = cj.base_config()                # or configs/quickstart.py's get_config()
  summary = cj.run(c, "/tmp/run")     # the whole experiment, resumable

The layers, bottom to top: ``rng``, ``backend``, ``multihost``, ``files`` (ground floor); ``data``, ``models``;
``ensemble`` (members, sharding, training programs); ``certify`` (kernel, bounds); ``store``; ``defenses``;
``run`` (config, run folder, pipeline, metrics, report); ``launch``, ``sweep``, ``envelope`` on top.
"""

from certssb_jax.certify.bounds import Certificate, certify_counts
from certssb_jax.certify.kernel import certify_inputs
from certssb_jax.data.sources import load_dataset
from certssb_jax.ensemble.trainer import EnsembleTrainer, TrainedEnsemble
from certssb_jax.run.config import base_config, load_config
from certssb_jax.run.pipeline import compare_modes, run
from certssb_jax.store.certified import CertifiedStore, StoreAnswer

__version__ = "0.1.0"

__all__ = ["Certificate", "CertifiedStore", "EnsembleTrainer", "StoreAnswer", "TrainedEnsemble", "base_config",
           "certify_counts", "certify_inputs", "compare_modes", "load_config", "load_dataset", "run"]
