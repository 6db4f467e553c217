"""The host-side store of certified balls that keeps the answers of a stream of queries from contradicting each
other (``certified``), its spatial index (``ball_index``) and the batched distances both use."""

from certssb_jax.store.certified import CertifiedStore, StoreAnswer

__all__ = ["CertifiedStore", "StoreAnswer"]
