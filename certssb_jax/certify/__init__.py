"""Certification: the jitted kernel that batches the noise draws of every member (``kernel``) and the float64
bounds that turn votes into certificates (``bounds``)."""

from certssb_jax.certify.bounds import Certificate, certify_counts
from certssb_jax.certify.kernel import certify_inputs

__all__ = ["Certificate", "certify_counts", "certify_inputs"]
