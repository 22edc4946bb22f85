"""Configs of the `hierarchical` architecture: the tree's shape, its budget and its losses.

`HierarchicalTrainingSAEConfig` extends SAELens's Matryoshka BatchTopK config: the levels of the
tree are the Matryoshka prefixes (roots first), `k` is the one L0 budget every latent shares,
and the fields below add the tree that ties each latent to a parent one level up. Every field
is either on the default path, an item of the seed design (a fixed tree shape, per-parent
learned subspaces, per-level budgets, the KL and L2 consistency terms), or an ablation whose
measurement is in docs/benchmarks.md. `HierarchicalSAEConfig` is what cfg.json of a saved
(inference) SAE holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEConfig
from typing_extensions import override

ARCHITECTURE = "hierarchical"
Gate = Literal["none", "hard"]
TreeMode = Literal["learned", "fixed"]
TreeAssign = Literal["cofire", "encoder", "decoder", "decoder_cofire"]
L2Target = Literal["children_sum", "children_sum_floor", "threshold"]
# Stateful run-time normalisations delete their statistics on the first decode, so the
# prefix decodes of training would fail (SAELens's Matryoshka SAE has the same limit).
TRAINABLE_NORMALIZATIONS = ("none", "expected_average_only_in")
# Fields of cfg.json files written by sae-lens-hierarchical 0.1 (the fixed-slot design with free
# latents), which 0.2 cannot load: the model they describe no longer exists.
REMOVED_FIELDS = (
    "variant",
    "n_free",
    "k_free",
    "l1_per_level",
    "reseat_every",
    "reseat_stat_steps",
    "reseat_until",
    "free_budget_rate",
    "tree_fit_step",
    "tree_fit_stat_steps",
    "l2_form",
    "child_init_parent_mix",
    "aux_within_parent",
)


def config_error(field_name: str, value: Any, allowed: str) -> ValueError:
    """The error every invalid field raises: which field, what value, what is allowed."""
    return ValueError(f"HierarchicalSAE config: {field_name}={value!r} is invalid; {allowed}.")


@dataclass(kw_only=True)
class TreeShape:
    """The tree's levels, shared by the inference and training configs."""

    level_widths: list[int] | None = None
    """Latents per level, roots first (the levels are also the Matryoshka prefixes). None: from
    n_roots and branching, or from d_sae and branching."""
    n_levels: int = 3
    """Depth of the tree, roots included (used when level_widths is None)."""
    n_roots: int | None = None
    """Roots (level 0) when level_widths is None; None: d_sae / sum of the branching products."""
    branching: list[int] | None = None
    """Children per parent of each level below the roots when level_widths is None (default 4).
    With `tree: learned` this only sets the widths; each parent keeps the children it learns."""
    gate: Gate = "none"
    """"hard": a latent can fire only where its parent fires (the seed design's gate; ablation,
    costs reconstruction). "none": the tree is learned and enforced by the consistency losses."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> Any:
        """SAELens's `from_dict` drops unknown keys silently; a cfg.json of 0.1's fixed-slot
        design (free latents, variants, re-seating) describes a model 0.2 lacks, so say so."""
        old = sorted(k for k in REMOVED_FIELDS if k in config_dict)
        if old:
            raise ValueError(
                f"this hierarchical SAE was saved by sae-lens-hierarchical 0.1 (its config has {old}), "
                "whose fixed-slot design 0.2 replaced with a learned tree; 0.2 cannot load it. Retrain "
                "it, or load it with `pip install sae-lens-hierarchical==0.1.0`."
            )
        return super().from_dict(config_dict)  # type: ignore[misc]

    def resolve_shape(self, d_sae: int) -> None:
        """Fill level_widths from whichever fields were given; check they add up to d_sae."""
        if self.level_widths is None:
            if not isinstance(self.n_levels, int) or self.n_levels < 1:
                raise config_error("n_levels", self.n_levels, "it must be an integer >= 1")
            branching = [4] * (self.n_levels - 1) if self.branching is None else list(self.branching)
            if len(branching) != self.n_levels - 1 or any(not isinstance(b, int) or b < 1 for b in branching):
                raise config_error(
                    "branching", self.branching, f"it needs n_levels-1={self.n_levels - 1} integers >= 1"
                )
            per_root = [math.prod(branching[:i]) for i in range(self.n_levels)]
            n_roots = self.n_roots if self.n_roots is not None else d_sae // sum(per_root)
            if not isinstance(n_roots, int) or n_roots < 1:
                raise config_error("n_roots", self.n_roots, "it must be an integer >= 1")
            self.level_widths = [n_roots * p for p in per_root]
            self.branching = branching
        widths = self.level_widths
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise config_error("level_widths", widths, "it must be a list of integers >= 1")
        if sum(widths) != d_sae:
            raise config_error("d_sae", d_sae, f"it must equal sum(level_widths={widths}) = {sum(widths)}")
        self.n_levels, self.n_roots = len(widths), widths[0]
        if self.gate not in ("none", "hard"):
            raise config_error("gate", self.gate, "allowed: 'none', 'hard'")

    @property
    def level_boundaries(self) -> list[int]:
        """Cumulative level widths: where each level (each Matryoshka prefix) ends."""
        assert self.level_widths is not None
        out, total = [], 0
        for w in self.level_widths:
            total += w
            out.append(total)
        return out

    @property
    def level_slices(self) -> list[slice]:
        """Each level's contiguous slice of the latent axis."""
        ends = self.level_boundaries
        return [slice(a, b) for a, b in zip([0, *ends[:-1]], ends, strict=True)]


@dataclass
class HierarchicalSAEConfig(TreeShape, JumpReLUSAEConfig):
    """Inference config (cfg.json of a saved SAE): a JumpReLU SAE whose latents form a tree.

    The tree itself (each latent's parent) is a tensor of the weights file, `tree_parent`.
    """

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        self.resolve_shape(self.d_sae)


@dataclass(kw_only=True)
class HierarchicalTrainingSAEConfig(TreeShape, MatryoshkaBatchTopKTrainingSAEConfig):
    """Training config: SAELens's Matryoshka BatchTopK config plus the tree and its losses.

    Inherited and worth knowing: `k` (the L0 every latent shares; the flat contestants get the
    same), `topk_threshold_lr`, `aux_loss_coefficient`, `use_matryoshka_aux_loss`,
    `rescale_acts_by_decoder_norm`. `matryoshka_widths` is derived from the levels.
    """

    k: float = 24.0  # type: ignore[assignment]
    """Active latents per token on average (BatchTopK over every latent): the whole L0 budget.
    How it splits over the levels is learned."""
    k_per_level: list[float] | None = None
    """Seed design (ablation): a BatchTopK budget per level instead of one shared `k`; must sum
    to `k` and get sparser with depth (k_l / n_l decreasing) unless allow_nonincreasing_sparsity."""
    allow_nonincreasing_sparsity: bool = False
    """Accept k_per_level whose active fraction does not decrease with depth."""
    level_recon_weights: list[float] | None = None
    """Weight of each level's prefix reconstruction x_hat_{<=l}, roots first; the last is the
    full reconstruction's. None: 0 for the roots alone, 0.25 for every deeper prefix and 1 for
    the full reconstruction (with two levels: 0.25 and 1). SAELens's Matryoshka weighs every
    prefix 1. Asking the roots to reconstruct alone made them dense, k-means-like directions that
    took most of the L0 (three quarters on Gemma-3-270m); weighting that prefix 0 gave back CE-loss
    score on Gemma-3-270m and at low L0 and tied the tree tighter (docs/benchmarks.md, "Roots
    that need not reconstruct alone")."""
    tree: TreeMode = "learned"
    """"learned": every `tree_every` steps each latent below the roots takes a parent one level up
    by the `tree_assign` rule (uneven branching). "fixed": the seed design's
    contiguous layout, `branching` children per parent, never moved."""
    tree_every: int = 50
    """Steps between re-assignments of the learned tree (with "cofire" / "decoder_cofire": the
    co-firing counts of those steps)."""
    tree_min_cofire: float = 0.05
    """With tree_assign "cofire": a latent whose best parent has P(parent on | latent on) below
    this keeps no parent (it is outside the tree, reported as such)."""
    tree_assign: TreeAssign = "decoder_cofire"
    """How a learned tree picks parents. "decoder_cofire" (default): among the latents one level
    up that fired on half of the latent's firings in the last window, the one whose decoder
    direction is most similar (the plain "decoder" rule where none did); with no L2 term its top
    roots are line and clause ends with few children, and its parents fire with their children
    more often than the "decoder" rule's (docs/benchmarks.md, "The current default").
    "decoder" (Luo et al. 2026): the latent one level up whose decoder direction is most similar,
    co-firing or not. "cofire": the most specific latent one level up that fires on half of the
    latent's firings. "encoder" (experimental): by encoder direction."""
    tree_unassigned: float = 0.2
    """With tree_assign "decoder_cofire" / "decoder" / "encoder": the share of each level's
    latents, lowest best similarity first, left outside the tree (Luo et al. leave 20 %; reports
    give the share of L0 and of explained variance they carry)."""
    tree_min_lift: float = 0.0
    """Experimental, with tree_assign "decoder_cofire": a parent candidate must also fire on the
    latent's firings at least this many times as often as on all tokens (0: no such test), so a
    latent that fires on a third of all tokens cannot become everyone's parent."""
    kl_coefficient: float = 0.0
    """Weight of the KL consistency term: each level's activation mass against its children's,
    pooled onto their parents."""
    l2_coefficient: float = 0.0
    """Weight of the L2 consistency term (Luo et al. 2026): on tokens where some child of a parent
    fires, the parent's activation should be at least the sum of its children's (`l2_target`).
    Off by default: with parents chosen among co-firing latents it made the most frequent roots
    fire wherever their new children did, unions of unrelated children on a third of all tokens;
    without it the tree is learned beside the reconstruction and does not enter the loss
    (docs/benchmarks.md, "The current default"). The seed design used 0.05-0.2."""
    l2_until_step: int | None = None
    """Experimental: apply the L2 term only for the first this many training steps (None: always),
    to test whether the tree it ties early survives without its late cost."""
    l2_target: L2Target = "children_sum_floor"
    """What the L2 term asks of a parent where a child fires. "children_sum_floor": at least its
    children's summed activation (one-sided: a parent the reconstruction wants stronger is not
    pushed down). "children_sum" (Luo et al.): exactly their sum; its cost grew with training.
    "threshold" (experimental): only its level's inference threshold, so it fires, at a strength
    the reconstruction chooses; children are not touched."""
    l2_children_grad: bool = True
    """Experimental: False stops the L2 term's gradient on the children's side, so it only pulls
    a parent towards the sum of its children (necessity) and never pushes a child down."""
    prefix_b_dec_grad: bool = True
    """Experimental: False adds the decoder bias b_dec to every prefix reconstruction detached,
    so as an output bias it is set by the full reconstruction only (a prefix, missing its deeper
    levels, pulls b_dec towards what it lacks, which biases the full reconstruction)."""
    projection_rank: int | None = None
    """Seed design (ablation): each parent owns a learned rank-r subspace in which its children's
    encoder and decoder rows live (H-SAE). Needs `tree: fixed`. None: unfactored rows."""
    matryoshka_widths: list[int] = field(default_factory=list)
    """Derived from the levels; leave empty."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> Any:
        """A saved inference SAE's cfg.json keeps the training-only fields (k, the tree's schedule,
        the losses) under metadata.training_architecture_details; loading it as a training SAE
        reads them back from there rather than falling back to the defaults."""
        details = (config_dict.get("metadata") or {}).get("training_architecture_details") or {}
        merged = {**details, **config_dict}
        merged.pop("matryoshka_widths", None)  # derived from level_widths: never read back
        return super().from_dict(merged)

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return HierarchicalSAEConfig

    def __post_init__(self) -> None:
        self.resolve_shape(self.d_sae)
        assert self.level_widths is not None
        L = self.n_levels
        if self.matryoshka_widths and self.matryoshka_widths != self.level_boundaries:
            raise config_error(
                "matryoshka_widths",
                self.matryoshka_widths,
                f"it is derived from the levels ({self.level_boundaries}); leave it empty",
            )
        self.matryoshka_widths = self.level_boundaries
        if self.normalize_activations not in TRAINABLE_NORMALIZATIONS:
            raise config_error(
                "normalize_activations",
                self.normalize_activations,
                f"training supports {', '.join(TRAINABLE_NORMALIZATIONS)} "
                "(stateful norms break the per-level prefix decodes)",
            )
        if not (isinstance(self.k, (int, float)) and 0 < self.k <= self.d_sae):
            raise config_error("k", self.k, f"it must be in (0, d_sae={self.d_sae}]")
        for name in ("kl_coefficient", "l2_coefficient", "aux_loss_coefficient", "topk_threshold_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise config_error(name, value, "it must be a finite number >= 0")
        if self.l2_until_step is not None and not (
            isinstance(self.l2_until_step, int) and not isinstance(self.l2_until_step, bool) and self.l2_until_step >= 0
        ):
            raise config_error("l2_until_step", self.l2_until_step, "it must be an integer >= 0 or null")
        if self.l2_target not in ("children_sum", "children_sum_floor", "threshold"):
            raise config_error(
                "l2_target", self.l2_target, "allowed: 'children_sum', 'children_sum_floor', 'threshold'"
            )
        if self.tree not in ("learned", "fixed"):
            raise config_error("tree", self.tree, "allowed: 'learned', 'fixed'")
        if not isinstance(self.tree_every, int) or self.tree_every < 1:
            raise config_error("tree_every", self.tree_every, "it must be an integer >= 1")
        if not 0 <= self.tree_min_cofire <= 1:
            raise config_error("tree_min_cofire", self.tree_min_cofire, "it must be in [0, 1]")
        if self.tree_assign not in ("cofire", "encoder", "decoder", "decoder_cofire"):
            raise config_error(
                "tree_assign", self.tree_assign, "allowed: 'cofire', 'encoder', 'decoder', 'decoder_cofire'"
            )
        if self.tree_min_lift < 0:
            raise config_error("tree_min_lift", self.tree_min_lift, "it must be >= 0")
        if self.tree_min_lift > 0 and self.tree_assign != "decoder_cofire":
            raise config_error(
                "tree_min_lift", self.tree_min_lift, "it needs tree_assign 'decoder_cofire' (else use 0)"
            )
        if not 0 <= self.tree_unassigned < 1:
            raise config_error("tree_unassigned", self.tree_unassigned, "it must be in [0, 1)")
        if self.projection_rank is not None:
            if self.tree != "fixed":
                raise config_error(
                    "projection_rank",
                    self.projection_rank,
                    "per-parent subspaces need tree: fixed (a learned tree moves children)",
                )
            if not (isinstance(self.projection_rank, int) and 1 <= self.projection_rank <= self.d_in):
                raise config_error(
                    "projection_rank", self.projection_rank, f"it must be None or an integer in [1, d_in={self.d_in}]"
                )
        if self.tree == "fixed":
            self._check_fixed_layout()
        if self.level_recon_weights is None:
            # with no prefix loss at all one latent took 90 % of tokens, so two levels keep the roots'
            self.level_recon_weights = ([0.0] + [0.25] * (L - 2) if L > 2 else [0.25] * (L - 1)) + [1.0]
        if len(self.level_recon_weights) != L or any(
            not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0) for w in self.level_recon_weights
        ):
            raise config_error("level_recon_weights", self.level_recon_weights, f"it must hold {L} finite weights >= 0")
        if self.k_per_level is not None:
            self._check_level_budgets()
        super().__post_init__()

    def _check_fixed_layout(self) -> None:
        widths = self.level_widths or []
        for a, b in zip(widths, widths[1:]):
            if b % a:
                raise config_error(
                    "level_widths", widths, "a fixed tree needs each width to be a multiple of the one before"
                )

    def _check_level_budgets(self) -> None:
        assert self.k_per_level is not None and self.level_widths is not None
        ks, widths = list(self.k_per_level), self.level_widths
        if len(ks) != len(widths) or any(not (0 < k <= n) for k, n in zip(ks, widths, strict=True)):
            raise config_error("k_per_level", ks, f"it needs one k in (0, width] per level; widths {widths}")
        if abs(sum(ks) - self.k) > 1e-6:
            raise config_error("k_per_level", ks, f"it must sum to k={self.k:g} (the whole L0)")
        density = [k / n for k, n in zip(ks, widths, strict=True)]
        if not self.allow_nonincreasing_sparsity and any(b >= a for a, b in zip(density, density[1:])):
            raise config_error(
                "k_per_level",
                ks,
                f"the active fraction k_l/n_l must decrease with depth (got "
                f"{[round(d, 4) for d in density]}); set allow_nonincreasing_sparsity to opt out",
            )

    @property
    def total_l0(self) -> float:
        """Active latents per token whose decoder rows enter the output: the budget `k`."""
        return float(self.k)
