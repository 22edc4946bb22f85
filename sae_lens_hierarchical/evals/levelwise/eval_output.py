"""Output of the levelwise eval, in SAE-Bench's format (subclasses of its base classes)."""

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from sae_bench.evals.base_eval_output import (
    DEFAULT_DISPLAY,
    BaseEvalOutput,
    BaseMetricCategories,
    BaseMetrics,
    BaseResultDetail,
)

from sae_lens_hierarchical.evals.levelwise.eval_config import LevelwiseEvalConfig

EVAL_TYPE_ID_LEVELWISE = "levelwise"

PROBE_KS = (1, 2, 5, 10, 20, 50)


@dataclass
class LevelwiseMetrics(BaseMetrics):
    tree_source: str = Field(title="Tree Source", description="'native' levels or 'posthoc' tree depths.")
    n_levels: int = Field(title="Number of Levels", description="Levels of the tree, roots included.")
    l0: float = Field(
        title="L0",
        description="Mean number of active latents per token, all levels.",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    explained_variance: float = Field(
        title="Explained Variance",
        description="1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 of the full reconstruction (textbook form; SAE-Bench's core uses another total variance).",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    root_explained_variance: float = Field(
        title="Root Explained Variance",
        description="Explained variance of the reconstruction from level 0 (the roots) alone.",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    frac_dead: float = Field(
        title="Fraction Dead",
        description="Fraction of all latents that never fire on the evaluation tokens.",
    )
    outside_tree_latents: int = Field(
        default=0,
        title="Latents Outside the Tree",
        description="Latents below level 0 without a parent (a hierarchical SAE's; 0 for a post-hoc tree).",
    )
    outside_tree_l0: float = Field(
        default=0.0,
        title="Outside-Tree L0",
        description="Mean number of active latents outside the tree per token.",
    )
    outside_tree_l0_share: float | None = Field(
        default=None,
        title="Outside-Tree L0 Share",
        description="outside_tree_l0 / l0: the share of the L0 carried by latents outside the tree (None when l0 is 0).",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    outside_tree_explained_variance_share: float | None = Field(
        default=None,
        title="Outside-Tree Explained Variance Share",
        description=(
            "(explained_variance - explained variance with the latents outside the tree zeroed) / "
            "explained_variance: the share of the explained variance they carry (0 without such "
            "latents; None when the explained variance is <= 0)."
        ),
        json_schema_extra=DEFAULT_DISPLAY,
    )
    autointerp_score: float | None = Field(
        default=None,
        title="Autointerp Score",
        description="Mean autointerp score over every judged latent of every level (None when not run).",
    )
    n_tokens: int = Field(default=0, title="Tokens", description="Tokens the metrics are computed on.")


@dataclass
class LevelwiseMetricCategories(BaseMetricCategories):
    levelwise: LevelwiseMetrics = Field(
        title="Levelwise",
        description="Whole-SAE summaries of the levelwise eval; the per-level numbers are in the details.",
    )


@dataclass
class LevelwiseLevelDetail(BaseResultDetail):
    level: int = Field(title="Level", description="0 = roots.")
    n_latents: int = Field(title="Latents", description="Latents at this level.")
    l0: float = Field(title="L0", description="Mean active latents of this level per token.")
    firing_density: float = Field(
        title="Firing Density",
        description="Mean over the level's latents of the fraction of tokens each fires on (= l0 / n_latents).",
    )
    dead_latents: int = Field(title="Dead Latents", description="Latents of this level that never fire.")
    frac_dead: float = Field(title="Fraction Dead", description="dead_latents / n_latents.")
    prefix_explained_variance: float = Field(
        title="Prefix Explained Variance",
        description="Explained variance of x_hat_{<=level}: the reconstruction from levels 0..level only.",
    )
    prefix_mse: float = Field(title="Prefix MSE", description="Mean ||x - x_hat_{<=level}||^2 per token.")
    outside_tree_latents: int = Field(
        default=0,
        title="Latents Outside the Tree",
        description="Latents of this level without a parent (never at level 0).",
    )
    outside_tree_l0: float = Field(
        default=0.0,
        title="Outside-Tree L0",
        description="Mean active latents of this level outside the tree per token.",
    )
    outside_tree_l0_share: float | None = Field(
        default=None,
        title="Outside-Tree L0 Share",
        description="outside_tree_l0 / l0 of this level (None when l0 is 0).",
    )
    outside_tree_explained_variance_share: float | None = Field(
        default=None,
        title="Outside-Tree Explained Variance Share",
        description=(
            "(EV - EV with this level's latents outside the tree zeroed) / EV, EV the whole SAE's "
            "explained variance (0 without such latents; None when EV <= 0)."
        ),
    )
    sparse_probing_test_accuracy: float | None = Field(
        default=None,
        title="Sparse Probing Accuracy",
        description="Probe on all of this level's latents (SAE-Bench sparse probing).",
    )
    sparse_probing_top_1_test_accuracy: float | None = Field(
        default=None, title="Top 1", description="k-sparse probe, k = 1, this level's latents only."
    )
    sparse_probing_top_2_test_accuracy: float | None = Field(default=None, title="Top 2", description="k = 2.")
    sparse_probing_top_5_test_accuracy: float | None = Field(default=None, title="Top 5", description="k = 5.")
    sparse_probing_top_10_test_accuracy: float | None = Field(default=None, title="Top 10", description="k = 10.")
    sparse_probing_top_20_test_accuracy: float | None = Field(default=None, title="Top 20", description="k = 20.")
    sparse_probing_top_50_test_accuracy: float | None = Field(default=None, title="Top 50", description="k = 50.")
    autointerp_score: float | None = Field(
        default=None, title="Autointerp Score", description="Mean score of the judged latents of this level."
    )
    autointerp_std_dev: float | None = Field(
        default=None, title="Autointerp Std Dev", description="Their standard deviation."
    )
    autointerp_n_latents: int = Field(default=0, title="Autointerp Latents", description="Latents judged.")


@dataclass(config=ConfigDict(title="Levelwise"))
class LevelwiseEvalOutput(BaseEvalOutput[LevelwiseEvalConfig, LevelwiseMetricCategories, LevelwiseLevelDetail]):
    # This will end up being the description of the eval in the UI.
    """
    The standard SAE metrics broken down per level of the tree (native levels of a
    hierarchical SAE, post-hoc depths of a flat one): L0, firing density, dead latents,
    explained variance of the prefix reconstruction x_hat_{<=level}, the share of L0 and of
    explained variance carried by latents outside the tree, sparse-probing accuracy with that
    level's latents only, and autointerp per level when an LLM judge is configured.
    """

    eval_config: LevelwiseEvalConfig
    eval_id: str
    datetime_epoch_millis: int
    eval_result_metrics: LevelwiseMetricCategories
    eval_result_details: list[LevelwiseLevelDetail] = Field(
        default_factory=list,
        title="Per-Level Metrics",
        description="One row per level.",
    )
    eval_type_id: str = Field(
        default=EVAL_TYPE_ID_LEVELWISE,
        title="Eval Type ID",
        description="The type of the evaluation",
    )
