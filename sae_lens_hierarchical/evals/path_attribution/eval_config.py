"""Config of the path attribution eval."""

from pydantic import Field
from pydantic.dataclasses import dataclass

from sae_lens_hierarchical.evals.base_config import TreeEvalConfig


@dataclass
class PathAttributionEvalConfig(TreeEvalConfig):
    latents: list[int] | None = Field(
        default=None,
        title="Latents",
        description=(
            "Target latents whose root-to-latent paths are attributed. None: the n_latents "
            "deepest latents that fire (most frequent first)."
        ),
    )
    n_latents: int = Field(
        default=8,
        title="Number of Latents",
        description="Target latents chosen when `latents` is None.",
    )
    n_inputs_per_latent: int = Field(
        default=2,
        title="Inputs per Latent",
        description=(
            "Token positions per target latent: its strongest activations over the evaluation "
            "tokens (or, with input_texts, its strongest position in each text)."
        ),
    )
    input_texts: list[str] | None = Field(
        default=None,
        title="Input Texts",
        description=(
            "Texts to attribute instead of the evaluation tokens; each target latent is "
            "attributed at its strongest position in each text where it fires."
        ),
    )
    probe_direction_path: str | None = Field(
        default=None,
        title="Probe Direction File",
        description=(
            "A file holding a [d_in] probe direction (torch.save or .npy). None: each path "
            "is scored against the difference-of-means probe of its target latent (mean model "
            "activation where the latent fires minus where it does not), fitted on the "
            "evaluation tokens."
        ),
    )
    logit_target: str = Field(
        default="top_prediction",
        title="Logit Target",
        description=(
            "The logit whose gradient x activation is attributed: 'top_prediction' (the "
            "model's top next-token logit at that position) or 'next_token' (the logit of the "
            "actual next token; the top prediction at the last position)."
        ),
    )
    plot: bool = Field(
        default=True,
        title="Plot",
        description="Also write a PNG of the per-node shares next to the JSON.",
    )
    max_paths_in_plot: int = Field(
        default=16,
        title="Paths in Plot",
        description="At most this many paths are drawn.",
    )
