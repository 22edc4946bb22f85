"""sae-lens-hierarchical: Hierarchical Sparse Autoencoders for SAELens and SAE-Bench.

Importing the package registers the `hierarchical` architecture with SAELens (idempotently),
so `SAE.load_from_disk`, `SAE.from_pretrained` and SAELens's runners accept it, merges the
package's release directory into SAELens's (`releases`), and makes loading errors name the
file and field (`loading`). The installed `sae_lens_hierarchical_autoload.pth` imports the
package as soon as SAELens is imported, so an explicit import is optional.
"""

from sae_lens_hierarchical import _env

_env.apply()

from sae_lens_hierarchical import loading, releases  # noqa: E402
from sae_lens_hierarchical.hierarchical_sae import (  # noqa: E402
    ARCHITECTURE,
    HierarchicalSAE,
    HierarchicalSAEConfig,
    HierarchicalSAELoadError,
    HierarchicalTrainingSAE,
    HierarchicalTrainingSAEConfig,
    NonFiniteTrainingError,
)
from sae_lens_hierarchical.registration import register  # noqa: E402

register()
loading.install()
releases.register_releases()

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURE",
    "HierarchicalSAE",
    "HierarchicalSAEConfig",
    "HierarchicalSAELoadError",
    "HierarchicalTrainingSAE",
    "HierarchicalTrainingSAEConfig",
    "NonFiniteTrainingError",
    "register",
]
