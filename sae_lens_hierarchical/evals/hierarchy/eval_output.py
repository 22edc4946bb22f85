"""Output of the hierarchy eval, in SAE-Bench's format (subclasses of its base classes)."""

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from sae_bench.evals.base_eval_output import (
    DEFAULT_DISPLAY,
    BaseEvalOutput,
    BaseMetricCategories,
    BaseMetrics,
    BaseResultDetail,
)

from sae_lens_hierarchical.evals.hierarchy.eval_config import HierarchyEvalConfig

EVAL_TYPE_ID_HIERARCHY = "hierarchy"


@dataclass
class HierarchyMetrics(BaseMetrics):
    hierarchical_consistency_score: float | None = Field(
        title="Hierarchical Consistency Score",
        description=(
            "Mean over firing parents of the harmonic mean of necessity (mean P(parent on | "
            "child on) over its edges) and coverage (P(some child on | parent on)). 1 = every "
            "child fires only under its parent and every parent has a child firing."
        ),
        json_schema_extra=DEFAULT_DISPLAY,
    )
    necessity: float | None = Field(
        title="Necessity",
        description="Mean over edges p->c whose child fires of P(p on | c on) (Luo et al. 2026).",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    p_child_given_parent: float | None = Field(
        title="P(child | parent)",
        description="Mean over edges p->c whose parent fires of P(c on | p on) (Luo et al. 2026).",
    )
    coverage: float | None = Field(
        title="Coverage",
        description="Mean over firing parents of P(some child of p on | p on).",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    hamming_distance: float | None = Field(
        title="Hamming Distance",
        description=(
            "Mean over parents of the fraction of tokens where the parent's firing differs from "
            "the OR of its children's (0 = perfectly consistent)."
        ),
    )
    hamming_per_token: float = Field(
        title="Hamming Distance per Token",
        description="Mean number of parents per token whose firing differs from the OR of their children (Luo et al.).",
    )
    consistency_kl: float = Field(
        title="Consistency KL",
        description=(
            "Sum over parent levels of the mean over tokens of KL(pi_l || pooled children): pi_l "
            "is the token's activation mass a_j * ||W_dec[j]|| over level l, the pooled "
            "distribution puts level l+1's mass on its parents (0 = children's mass sits "
            "exactly under the parents that carry it)."
        ),
        json_schema_extra=DEFAULT_DISPLAY,
    )
    tree_source: str = Field(
        title="Tree Source",
        description="'native' (the SAE's own tree) or 'posthoc' (fitted on co-firing).",
    )
    n_levels: int = Field(title="Number of Levels", description="Levels of the tree, roots included.")
    n_edges: int = Field(title="Edges", description="Parent->child edges of the tree.")
    n_parents: int = Field(title="Parents", description="Latents with at least one child.")
    n_edges_scored: int = Field(title="Edges Scored", description="Edges whose child fires on the held-out tokens.")
    n_parents_scored: int = Field(title="Parents Scored", description="Parents that fire on the held-out tokens.")
    n_outside_tree: int = Field(
        title="Latents Outside the Tree",
        description="Latents below level 0 without a parent (a native tree's; 0 for a post-hoc tree).",
    )
    n_tokens: int = Field(title="Tokens", description="Held-out tokens the metrics are computed on.")


@dataclass
class LevelPosthocMetrics(BaseMetrics):
    level_posthoc_necessity: float | None = Field(
        title="Necessity (Level Post-hoc Tree)",
        description="Necessity, mean P(p on | c on) over edges, of the level post-hoc tree.",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    level_posthoc_p_child_given_parent: float | None = Field(
        title="P(child | parent) (Level Post-hoc Tree)",
        description="Mean P(c on | p on) over the level post-hoc tree's edges whose parent fires.",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    level_posthoc_coverage: float | None = Field(
        title="Coverage (Level Post-hoc Tree)",
        description="Mean over firing parents of P(some child on | parent on), level post-hoc tree.",
    )
    level_posthoc_hierarchical_consistency_score: float | None = Field(
        title="HCS (Level Post-hoc Tree)",
        description="Hierarchical consistency score of the level post-hoc tree.",
    )
    level_posthoc_hamming_per_token: float = Field(
        title="Hamming per Token (Level Post-hoc Tree)",
        description="Mean number of parents per token whose firing differs from the OR of their children.",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    level_posthoc_n_edges: int = Field(
        title="Edges (Level Post-hoc Tree)",
        description="Edges of the level post-hoc tree (latents below level 0 that fire with some latent one level up).",
    )
    level_posthoc_n_edges_scored: int = Field(
        title="Edges Scored (Level Post-hoc Tree)",
        description="Of those, edges whose child fires on the held-out tokens.",
    )
    level_posthoc_level_widths: list[int] = Field(
        title="Level Widths (Level Post-hoc Tree)",
        description="Latents per level of the level post-hoc tree, roots first.",
    )


@dataclass
class HierarchyMetricCategories(BaseMetricCategories):
    hierarchy: HierarchyMetrics = Field(
        title="Hierarchy",
        description="Hierarchical consistency of the whole tree chosen by tree_source.",
    )
    level_posthoc: LevelPosthocMetrics = Field(
        title="Level Post-hoc Tree",
        description=(
            "The same metrics on the level post-hoc tree, built the same way for every SAE "
            "(hierarchical or flat): levels by firing density on the fit tokens with the "
            "hierarchical SAE's level widths (a flat SAE: posthoc_level_widths), each latent's "
            "parent the latent one level up with the highest P(parent on | latent on); scored "
            "on the held-out tokens."
        ),
    )


@dataclass
class HierarchyLevelDetail(BaseResultDetail):
    level: int = Field(title="Level", description="Level of the parents (0 = roots); their edges go to level + 1.")
    n_latents: int = Field(title="Latents", description="Latents at this level.")
    outside_tree_latents: int = Field(
        title="Latents Outside the Tree",
        description="Latents of this level without a parent (levels below 0; a native tree's only).",
    )
    hierarchical_consistency_score: float | None = Field(title="HCS", description="HCS over this level's parents.")
    necessity: float | None = Field(title="Necessity", description="Necessity of the edges from this level.")
    p_child_given_parent: float | None = Field(
        title="P(child | parent)", description="Mean P(c on | p on) over the edges from this level whose parent fires."
    )
    coverage: float | None = Field(title="Coverage", description="Coverage of this level's parents.")
    hamming_distance: float | None = Field(
        title="Hamming Distance", description="Hamming distance of this level's parents."
    )
    hamming_per_token: float = Field(
        title="Hamming per Token", description="Mismatching parents of this level per token."
    )
    consistency_kl: float | None = Field(
        title="Consistency KL",
        description="KL(pi_l || pooled level l+1) for this level (the overall KL is the sum over levels); None for the last level.",
    )
    n_edges: int = Field(title="Edges", description="Edges from this level's parents.")
    n_parents: int = Field(title="Parents", description="Parents at this level.")
    n_edges_scored: int = Field(title="Edges Scored", description="Of those, edges whose child fires.")
    n_parents_scored: int = Field(title="Parents Scored", description="Of those, parents that fire.")


@dataclass(config=ConfigDict(title="Hierarchy"))
class HierarchyEvalOutput(BaseEvalOutput[HierarchyEvalConfig, HierarchyMetricCategories, HierarchyLevelDetail]):
    # This will end up being the description of the eval in the UI.
    """
    Hierarchical consistency of an SAE's tree: the native tree of a hierarchical SAE, the
    post-hoc tree (co-firing) of a flat one. Necessity P(parent | child), P(child | parent),
    coverage, their harmonic mean (HCS), the Hamming distance between each parent and the OR
    of its children, and the consistency KL, overall and per level, on held-out tokens; plus
    the same parent-child numbers on a level post-hoc tree built the same way for every SAE.
    """

    eval_config: HierarchyEvalConfig
    eval_id: str
    datetime_epoch_millis: int
    eval_result_metrics: HierarchyMetricCategories
    eval_result_details: list[HierarchyLevelDetail] = Field(
        default_factory=list,
        title="Per-Level Metrics",
        description="The same metrics for each level of parents of the tree chosen by tree_source.",
    )
    eval_type_id: str = Field(
        default=EVAL_TYPE_ID_HIERARCHY,
        title="Eval Type ID",
        description="The type of the evaluation",
    )
