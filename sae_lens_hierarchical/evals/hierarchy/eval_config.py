"""Config of the hierarchy eval (hierarchical consistency of an SAE's tree)."""

from pydantic import Field
from pydantic.dataclasses import dataclass

from sae_lens_hierarchical.evals.base_config import TreeEvalConfig


@dataclass
class HierarchyEvalConfig(TreeEvalConfig):
    tree_fit_fraction: float = Field(
        default=0.5,
        title="Tree Fit Fraction",
        description=(
            "Fraction of the tokens the post-hoc trees (the co-firing tree of a flat SAE and every "
            "SAE's level post-hoc tree) are fitted on; every metric is computed on the other "
            "tokens (held out), for native trees too so all trees see the same tokens. 0 fits "
            "and scores on all tokens."
        ),
    )
    kl_eps: float = Field(
        default=1e-6,
        title="KL Smoothing",
        description="Smoothing added to both distributions of the consistency KL.",
    )
    posthoc_level_widths: list[int] | None = Field(
        default=None,
        title="Level Post-hoc Tree Widths",
        description=(
            "Latents per level (roots first, adding up to d_sae) of a flat SAE's level post-hoc "
            "tree: levels by firing density, each latent's parent the latent one level up with "
            "the highest P(parent on | latent on). None: three levels in the ratio 1:4:16 of "
            "d_sae. A hierarchical SAE's level post-hoc tree always uses its own level_widths."
        ),
    )
