"""sae-lens-hierarchical: Hierarchical Sparse Autoencoders for SAELens and SAE-Bench.

Importing the package registers the `hierarchical` architecture with SAELens (idempotently), so
`SAE.load_from_disk`, `SAE.from_pretrained` and SAELens's runners accept it, merges the package's
release directory into SAELens's and applies the small patches listed in
`integrations.patches`. The installed `sae_lens_hierarchical_autoload.pth` imports the package as
soon as SAELens is imported, so an explicit import is optional.

Where things are: `config` (the fields), `tree` (parents, learning them, the gate),
`training_sae` / `sae` (the training and inference SAEs), `losses`, `schedule`, `state_io`,
`metrics`, `pipeline` (configs at matched width and L0, training, evaluation), `reporting`,
`cli`, `models` (offline LMs and texts), `evals/` (SAE-Bench-format evals), `integrations/`.
"""

from sae_lens_hierarchical.integrations import patches

patches.apply_import_patches()

from sae_lens_hierarchical.config import (  # noqa: E402
    ARCHITECTURE,
    HierarchicalSAEConfig,
    HierarchicalTrainingSAEConfig,
)
from sae_lens_hierarchical.integrations import releases  # noqa: E402
from sae_lens_hierarchical.registration import register  # noqa: E402
from sae_lens_hierarchical.sae import HierarchicalSAE  # noqa: E402
from sae_lens_hierarchical.state_io import HierarchicalSAELoadError  # noqa: E402
from sae_lens_hierarchical.training_sae import HierarchicalTrainingSAE, NonFiniteTrainingError  # noqa: E402

register()
releases.register_releases()

__version__ = "0.2.0"

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
