"""Config of the hierarchy eval (hierarchical consistency of an SAE's tree)."""

from pydantic import Field
from pydantic.dataclasses import dataclass

from sae_lens_hierarchical.evals.base_config import ActivationEvalConfig


@dataclass
class HierarchyEvalConfig(ActivationEvalConfig):
    tree_source: str = Field(
        default="auto",
        title="Tree Source",
        description=(
            "Which tree is scored: 'auto' (a hierarchical SAE's own tree, the post-hoc tree "
            "for any other SAE), 'native' (hierarchical SAEs only) or 'posthoc' (any SAE)."
        ),
    )
    posthoc_tau: float = Field(
        default=0.5,
        title="Post-hoc Tree Threshold",
        description=(
            "A post-hoc parent q of latent c must have P(q on | c on) >= tau; the parent is "
            "the least dense such latent that is denser than c (DESIGN section 3)."
        ),
    )
    posthoc_min_count: int = Field(
        default=1,
        title="Post-hoc Minimum Count",
        description="Latents firing on fewer fit tokens are dead: roots, and nobody's parent.",
    )
    tree_fit_fraction: float = Field(
        default=0.5,
        title="Tree Fit Fraction",
        description=(
            "Fraction of the tokens a post-hoc tree is fitted on; every metric is computed on "
            "the other tokens (held out), for native trees too so both see the same tokens. "
            "0 fits and scores on all tokens."
        ),
    )
    kl_eps: float = Field(
        default=1e-6,
        title="KL Smoothing",
        description="Smoothing added to both distributions of the consistency KL.",
    )
