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
