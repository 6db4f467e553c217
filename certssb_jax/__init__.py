"""certssb-jax: Cert-SSB (certified backdoor defense with sample-specific smoothing noise) in JAX/Flax.

The Python API, the same functions ``python -m certssb_jax.launch`` uses:

  from certssb_jax import config, pipeline
  c = config.base_config()                # or configs/quickstart.py's get_config()
  summary = pipeline.run(c, "/tmp/run")   # the whole experiment, resumable

and stage by stage: ``pipeline.load_data``, ``pipeline.poison``, ``ensemble.EnsembleTrainer``,
``sigma_search.search_sigma``, ``certify.certify_inputs``, ``bounds.certify_counts``,
``store.CertifiedStore``; see the README ("Python API").
"""

__version__ = "0.1.0"
