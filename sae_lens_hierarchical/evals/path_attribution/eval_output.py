"""Output of the path attribution eval, in SAE-Bench's format (subclasses of its base classes)."""

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from sae_bench.evals.base_eval_output import (
    DEFAULT_DISPLAY,
    BaseEvalOutput,
    BaseMetricCategories,
    BaseMetrics,
    BaseResultDetail,
)

from sae_lens_hierarchical.evals.path_attribution.eval_config import PathAttributionEvalConfig

EVAL_TYPE_ID_PATH_ATTRIBUTION = "path_attribution"


@dataclass
class PathAttributionMetrics(BaseMetrics):
    tree_source: str = Field(title="Tree Source", description="'native' or 'posthoc' paths.")
    n_paths: int = Field(title="Paths", description="(input, latent) pairs attributed.")
    n_skipped: int = Field(
        default=0, title="Skipped", description="Requested (text, latent) pairs where the latent never fires."
    )
    mean_path_length: float | None = Field(
        default=None, title="Mean Path Length", description="Nodes per path, root and target included."
    )
    reconstruction_root_share: float | None = Field(
        default=None,
        title="Reconstruction Root Share",
        description="Mean share of the path's projection on the reconstruction direction carried by the root.",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    reconstruction_target_share: float | None = Field(
        default=None,
        title="Reconstruction Target Share",
        description="Mean share carried by the target latent itself (the path's last node).",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    probe_root_share: float | None = Field(
        default=None,
        title="Probe Root Share",
        description="Mean share of the path's probe projection carried by the root.",
    )
    probe_target_share: float | None = Field(
        default=None, title="Probe Target Share", description="Mean share carried by the target latent."
    )
    logit_root_share: float | None = Field(
        default=None,
        title="Logit Root Share",
        description="Mean share of the path's gradient x activation on the target logit carried by the root.",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    logit_target_share: float | None = Field(
        default=None, title="Logit Target Share", description="Mean share carried by the target latent."
    )
    path_fraction_of_reconstruction: float | None = Field(
        default=None,
        title="Path Fraction of Reconstruction",
        description="Mean of the path's projection on the reconstruction direction over the whole reconstruction's norm (all latents).",
    )
    path_fraction_of_logit: float | None = Field(
        default=None,
        title="Path Fraction of Logit Attribution",
        description="Mean of the path's gradient x activation over that of all latents.",
    )
    max_share_sum_error: float = Field(
        default=0.0,
        title="Max Share Sum Error",
        description="Largest |sum of a path's shares - 1| over paths and targets (a self-check; ~0).",
    )


@dataclass
class PathAttributionMetricCategories(BaseMetricCategories):
    path_attribution: PathAttributionMetrics = Field(
        title="Path Attribution",
        description="Summaries over the attributed paths; each path is in the details.",
    )


@dataclass
class PathAttributionDetail(BaseResultDetail):
    target_latent: int = Field(title="Target Latent", description="The latent whose root-to-latent path is attributed.")
    prompt_index: int = Field(title="Prompt", description="Row of the evaluation tokens (or index into input_texts).")
    token_position: int = Field(title="Position", description="Token position in that row.")
    token: str = Field(title="Token", description="The token at that position.")
    path: list[int] = Field(
        title="Path",
        description="Latents from the root down to the target ([target] for a latent outside the tree).",
    )
    path_levels: list[int] = Field(title="Path Levels", description="Level of each path node.")
    activations: list[float] = Field(title="Activations", description="Activation a_v of each path node at this token.")
    reconstruction_contributions: list[float] = Field(
        title="Reconstruction Contributions",
        description="(a_v W_dec[v]) . u with u the unit direction of the reconstruction (all latents, bias excluded).",
    )
    reconstruction_total: float = Field(
        title="Reconstruction Total", description="The whole path's contribution (computed from the path's decode)."
    )
    reconstruction_shares: list[float | None] = Field(
        title="Reconstruction Shares", description="Contributions / total (None when the total is 0)."
    )
    probe_contributions: list[float] = Field(
        title="Probe Contributions", description="(a_v W_dec[v]) . probe direction (unit)."
    )
    probe_total: float = Field(title="Probe Total", description="The whole path's projection on the probe.")
    probe_shares: list[float | None] = Field(title="Probe Shares", description="Contributions / total.")
    logit_token: str = Field(title="Logit Token", description="The token whose logit is attributed.")
    logit_contributions: list[float] = Field(
        title="Logit Contributions", description="Gradient x activation of each node on that logit, through the model."
    )
    logit_total: float = Field(
        title="Logit Total",
        description="Gradient of the logit w.r.t. the reconstruction, dotted with the path's decode.",
    )
    logit_shares: list[float | None] = Field(title="Logit Shares", description="Contributions / total.")
    reconstruction_all_latents: float = Field(
        title="Reconstruction, All Latents", description="Norm of the reconstruction (bias excluded)."
    )
    logit_all_latents: float = Field(
        title="Logit, All Latents", description="Gradient x activation summed over all latents."
    )


@dataclass(config=ConfigDict(title="Path Attribution"))
class PathAttributionEvalOutput(
    BaseEvalOutput[PathAttributionEvalConfig, PathAttributionMetricCategories, PathAttributionDetail]
):
    # This will end up being the description of the eval in the UI.
    """
    Path-based attribution: for chosen inputs and latents, the path from the root down to the
    latent (native tree of a hierarchical SAE, post-hoc tree of a flat one) and each node's
    contribution a_v W_dec[v] projected on the reconstruction direction and on a probe
    direction, and its gradient x activation on a logit through the model. Each path's
    contributions sum to its total, so its shares sum to 1.
    """

    eval_config: PathAttributionEvalConfig
    eval_id: str
    datetime_epoch_millis: int
    eval_result_metrics: PathAttributionMetricCategories
    eval_result_details: list[PathAttributionDetail] = Field(
        default_factory=list,
        title="Paths",
        description="One row per attributed (input, latent) path.",
    )
    eval_type_id: str = Field(
        default=EVAL_TYPE_ID_PATH_ATTRIBUTION,
        title="Eval Type ID",
        description="The type of the evaluation",
    )
