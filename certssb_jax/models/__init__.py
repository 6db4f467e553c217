"""Models: the Flax architectures every member shares (``zoo``), their layers, pretrained weights."""

from certssb_jax.models.zoo import get_model, logits_to_probs

__all__ = ["get_model", "logits_to_probs"]
