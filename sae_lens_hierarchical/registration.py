"""Register the `hierarchical` architecture with SAELens's two registries, idempotently."""

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from sae_lens_hierarchical.config import (
    ARCHITECTURE,
    HierarchicalSAEConfig,
    HierarchicalTrainingSAEConfig,
)
from sae_lens_hierarchical.sae import HierarchicalSAE
from sae_lens_hierarchical.training_sae import HierarchicalTrainingSAE


def register() -> None:
    """Register inference then training classes; a second call (or a prior one) is a no-op.

    The inference class goes first because building any training config looks up its
    inference config class (SAELens's TrainingSAEConfig.__post_init__).
    """
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, HierarchicalSAE, HierarchicalSAEConfig)
    if ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class(ARCHITECTURE, HierarchicalTrainingSAE, HierarchicalTrainingSAEConfig)
