"""The ensemble: one member's pure functions (``member``), the layout of a chunk of members over the devices
(``sharding``), the training programs (``trainer``), members on views (``views``), the trained ensemble
(``trained``) and the batched scorer of the sigma search (``scorer``)."""

from certssb_jax.ensemble.member import MemberState, Streams
from certssb_jax.ensemble.trained import TrainedEnsemble
from certssb_jax.ensemble.trainer import EnsembleTrainer

__all__ = ["MemberState", "Streams", "EnsembleTrainer", "TrainedEnsemble"]
