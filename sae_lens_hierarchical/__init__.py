"""sae-lens-hierarchical: Hierarchical Sparse Autoencoders for SAELens and SAE-Bench.

Importing the package registers the `hierarchical` architecture with SAELens (idempotently),
so `SAE.load_from_disk`, `SAE.from_pretrained` and SAELens's runners accept it.
"""

from sae_lens_hierarchical import _env

_env.apply()

from sae_lens_hierarchical.hierarchical_sae import (  # noqa: E402
    ARCHITECTURE,
    HierarchicalSAE,
    HierarchicalSAEConfig,
    HierarchicalTrainingSAE,
    HierarchicalTrainingSAEConfig,
)
from sae_lens_hierarchical.registration import register  # noqa: E402

register()

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURE",
    "HierarchicalSAE",
    "HierarchicalSAEConfig",
    "HierarchicalTrainingSAE",
    "HierarchicalTrainingSAEConfig",
    "register",
]
