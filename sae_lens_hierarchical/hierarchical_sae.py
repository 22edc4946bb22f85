"""The `hierarchical` SAE architecture: a fixed tree of latents, readable top to bottom.

Layout. Levels 0..L-1 (0 = roots, coarsest; L-1 = leaves, finest). Level widths
n_0, n_l = n_{l-1} * b_l, so the tree is fixed at construction: the parent of latent j at
level l is j // b_l at level l-1. Latents are stored level-major (all roots, then level 1,
...), so `d_sae = sum(n_l)`, a level is a contiguous slice and siblings are contiguous.

Projections. Each non-leaf node p owns a learned rank-r subspace: its children's encoder
columns and decoder rows are codes inside that subspace,
    W_enc[:, c] = P_p @ e_c    (P_p: [d_in, r], e_c: [r])
    W_dec[c]    = d_c @ U_p    (d_c: [r],       U_p: [r, d_in])
so the hierarchy is geometric (as in H-SAE), not only a gating rule. `projection_rank=None`
stores child rows directly. That is the default: on the synthetic benchmark the factored
form trains worse even when r >= b (where it constrains nothing), because Adam steps on
(codes, basis) move rows differently from steps on the rows themselves; see the README. Either way the model exposes flat `W_enc`
[d_in, d_sae] and `W_dec` [d_sae, d_in] (read-only views) because SAELens's evals,
SAE-Bench and HookedSAETransformer read them, and `decode` stays linear in the latents.

Gating. A child can be active only if its parent is active: at every level the gated
pre-activations are `relu(pre) * (parent_act > 0)` before that level's sparsity rule runs,
so every active latent sits on an active root-to-node path (hard gate, train and test).

Free latents (`n_free`, `k_free`). Not every feature is hierarchical, and a fixed tree of the
wrong shape cannot hold every feature that is. Free latents sit after the leaves, with no
parent and no children; they encode what the tree leaves, r = x - x_hat_tree:
    free = select(r @ W_enc[:, free] + b_enc[free])
and decode like any latent, so decode stays linear. They train on r with the tree's output
detached, so the tree trains exactly as it would without them (tested): free latents trained
jointly with the tree take its features (the failure DESIGN.md records), these cannot.

Sparsity per level (`variant`):
  "batchtopk": per-level BatchTopK with k_l while training; a per-level threshold learned
               alongside (as SAELens's BatchTopK does) replaces it at inference, so inference
               is per-token.
  "topk":      per-token TopK with k_l in each level, train and test.
  "relu":      ReLU with a per-level L1 coefficient l1_per_level[l].

Loss (training):
  sum_l w_l * ||x - x_hat_{<=l}||^2        prefix reconstructions: the roots alone must
                                           reconstruct x coarsely, which keeps parents alive
  + kl_coefficient * KL                    activation mass of each level vs its children's
  + l2_coefficient * L2                    children kept near their parent
  + aux-k on dead latents (SAELens's helpers) + per-level L1 (relu variant)
Every term is returned under its own name, so SAELens's trainer logs it as `losses/<name>`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from typing_extensions import override

from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.topk_sae import calculate_topk_aux_acts

ARCHITECTURE = "hierarchical"
VARIANTS = ("batchtopk", "topk", "relu")
L2_FORMS = ("decoder", "activation")
# Stateful run-time normalisations delete their statistics on the first decode, so the
# extra prefix decodes of training would fail; SAELens's matryoshka SAE has the same limit.
TRAINABLE_NORMALIZATIONS = ("none", "expected_average_only_in")


def _bad(field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(
        f"HierarchicalSAE config: {field_name}={value!r} is invalid; {allowed}."
    )


class HierarchicalSAELoadError(ValueError):
    """A saved hierarchical SAE cannot be loaded; the message names the file and the field."""


class NonFiniteTrainingError(ValueError):
    """A training step met NaN/inf activations or losses; raised before the weights change."""


def check_loaded_state(module: nn.Module, state_dict: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Check tensors read from sae_weights.safetensors against the model its cfg.json builds.

    `module` is the SAE built from cfg.json (on the meta device while loading), so its own
    state dict gives every expected name and shape. A cfg.json that does not belong to the
    weights is reported with the tensor, both shapes and the cfg.json fields behind them;
    NaN/inf weights (a diverged run, a damaged file) are refused too.
    """
    cfg = module.cfg  # type: ignore[attr-defined]
    fields = (
        f"d_in={cfg.d_in}, d_sae={cfg.d_sae}, level_widths={cfg.level_widths}, "
        f"projection_rank={cfg.projection_rank}" + (f", n_free={cfg.n_free}" if cfg.n_free else "")
    )
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in skip}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - set(skip))
    if missing or unexpected:
        raise HierarchicalSAELoadError(
            f"sae_weights.safetensors does not match cfg.json ({fields}): "
            f"missing tensors {missing}, unexpected tensors {unexpected} "
            "(n_levels and projection_rank decide which tensors exist)"
        )
    for name, shape in expected.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise HierarchicalSAELoadError(
                f"sae_weights.safetensors: tensor {name!r} has shape {list(got)} but cfg.json "
                f"({fields}) implies {list(shape)}"
            )
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise HierarchicalSAELoadError(
                f"sae_weights.safetensors: tensor {name!r} holds {n_bad} NaN/inf values "
                "(saved from a diverged run, or the file is damaged)"
            )


def _pop_checkpoint_extras(
    state_dict: dict[str, Any],
) -> tuple[dict[int, Any], dict[int, Any], int | None, Any]:
    """Take what only training checkpoints carry out of a state dict: the tree-fit co-firing
    counts (inside the counting window), the number of steps trained and the moved budgets."""
    cofire = {int(k[len("_cofire_l"):]): state_dict.pop(k) for k in list(state_dict)
              if k.startswith("_cofire_l")}
    fire = {int(k[len("_fire_l"):]): state_dict.pop(k) for k in list(state_dict)
            if k.startswith("_fire_l")}
    steps = state_dict.pop("_train_steps", None)
    budget = state_dict.pop("_budget", None)
    return cofire, fire, (None if steps is None else int(steps)), budget


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _TreeFields:
    """Fields shared by the inference and training configs: the tree and its sparsity."""

    n_levels: int = 3
    """Depth of the tree: number of levels, roots included."""
    level_widths: list[int] | None = None
    """Latents per level, roots first; derived from n_roots and branching when None."""
    n_roots: int | None = None
    """Number of root latents (level 0); derived from level_widths or d_sae when None."""
    branching: list[int] | None = None
    """Children per parent for levels 1..L-1; defaults to 4 at every level."""
    variant: str = "batchtopk"
    """Sparsity rule per level: one of "batchtopk", "topk", "relu"."""
    k_per_level: list[float] | None = None
    """Active latents per token in each level (batchtopk: on average); topk variants only."""
    projection_rank: int | None = None
    """Rank r of each parent's learned subspace for its children; None = unfactored rows."""
    n_free: int = 0
    """Latents outside the tree (no parent, no children), after the leaves: they encode what the tree leaves unexplained."""
    k_free: float | None = None
    """Active free latents per token (batchtopk: on average); needed when n_free > 0."""
    # The next two are checked by the training config only. They live here so that a saved
    # cfg.json holds them and TrainingSAE.load_from_disk(saved dir) rebuilds a valid config.
    l1_per_level: list[float] | None = None
    """L1 coefficient per level (variant "relu" only); must not decrease with level."""
    allow_nonincreasing_sparsity: bool = False
    """Opt out of the check that deeper levels are sparser (k_l/n_l decreasing)."""

    def _resolve_tree(self, d_in: int, d_sae: int) -> None:
        """Fill level_widths / n_roots / branching from whichever was given, then validate."""
        if not isinstance(self.n_levels, int) or self.n_levels < 1:
            raise _bad("n_levels", self.n_levels, "it must be an integer >= 1")
        L = self.n_levels
        n_free = self.n_free
        if not isinstance(n_free, int) or n_free < 0:
            raise _bad("n_free", n_free, "it must be an integer >= 0")
        if self.level_widths is not None:
            widths = [int(w) for w in self.level_widths]
            if len(widths) != L:
                raise _bad(
                    "level_widths", self.level_widths,
                    f"it must have n_levels={L} entries",
                )
            if any(w < 1 for w in widths):
                raise _bad("level_widths", self.level_widths, "every width must be >= 1")
            derived = [widths[i] // widths[i - 1] for i in range(1, L)]
            for i in range(1, L):
                if widths[i] % widths[i - 1] != 0:
                    raise _bad(
                        "level_widths", self.level_widths,
                        f"each width must be a multiple of the one before "
                        f"({widths[i]} is not a multiple of {widths[i - 1]})",
                    )
            if self.branching is not None and list(self.branching) != derived:
                raise _bad(
                    "branching", self.branching,
                    f"level_widths={widths} implies branching={derived}",
                )
            if self.n_roots is not None and self.n_roots != widths[0]:
                raise _bad(
                    "n_roots", self.n_roots, f"level_widths={widths} implies n_roots={widths[0]}"
                )
            branching = derived
        else:
            branching = [4] * (L - 1) if self.branching is None else [int(b) for b in self.branching]
            if len(branching) != L - 1:
                raise _bad(
                    "branching", self.branching,
                    f"it must have n_levels-1={L - 1} entries (one per non-root level)",
                )
            if any(b < 1 for b in branching):
                raise _bad("branching", self.branching, "every branching factor must be >= 1")
            per_root = [math.prod(branching[:i]) for i in range(L)]
            if self.n_roots is None:
                tree_size = d_sae - n_free
                if tree_size % sum(per_root) != 0:
                    raise _bad(
                        "d_sae", d_sae,
                        f"with branching={branching} and n_free={n_free} it must be n_free plus a "
                        f"multiple of {sum(per_root)} (or give n_roots / level_widths)",
                    )
                n_roots = tree_size // sum(per_root)
            else:
                n_roots = int(self.n_roots)
            if n_roots < 1:
                raise _bad("n_roots", self.n_roots, "it must be >= 1")
            widths = [n_roots * p for p in per_root]
        if sum(widths) + n_free != d_sae:
            raise _bad(
                "d_sae", d_sae,
                f"it must equal the tree's size sum(level_widths)={sum(widths)} "
                f"for level_widths={widths}" + (f" plus n_free={n_free}" if n_free else ""),
            )
        self.level_widths, self.branching, self.n_roots = widths, branching, widths[0]

        if self.variant not in VARIANTS:
            raise _bad("variant", self.variant, f"allowed: {', '.join(VARIANTS)}")
        if self.variant in ("batchtopk", "topk"):
            if self.k_per_level is None:
                raise _bad(
                    "k_per_level", None,
                    f"variant={self.variant!r} needs one k per level ({L} values)",
                )
            if len(self.k_per_level) != L:
                raise _bad("k_per_level", self.k_per_level, f"it must have {L} entries")
            for k, n in zip(self.k_per_level, widths):
                if not (0 < k <= n):
                    raise _bad(
                        "k_per_level", self.k_per_level,
                        f"each k must be in (0, level width]; widths are {widths}",
                    )
            if self.variant == "topk" and any(float(k) != int(k) for k in self.k_per_level):
                raise _bad("k_per_level", self.k_per_level, "variant 'topk' needs integer k")
        if self.projection_rank is not None and not (1 <= self.projection_rank <= d_in):
            raise _bad(
                "projection_rank", self.projection_rank, f"it must be None or in [1, d_in={d_in}]"
            )
        if n_free:
            if self.variant not in ("batchtopk", "topk"):
                raise _bad("n_free", n_free, f"free latents need variant 'batchtopk' or 'topk', not {self.variant!r}")
            if self.projection_rank is not None:
                raise _bad("n_free", n_free, "free latents need projection_rank: null (unfactored rows)")
            if self.k_free is None or not (0 < self.k_free <= n_free):
                raise _bad("k_free", self.k_free, f"with n_free={n_free} it must be in (0, {n_free}]")
            if self.variant == "topk" and float(self.k_free) != int(self.k_free):
                raise _bad("k_free", self.k_free, "variant 'topk' needs an integer k_free")
        elif self.k_free is not None:
            raise _bad("k_free", self.k_free, "it needs n_free > 0 (there are no free latents)")

    # Derived structure, read by the model, the metrics and the evals.
    @property
    def level_slices(self) -> list[slice]:
        """Contiguous slice of each level in the flat latent axis."""
        assert self.level_widths is not None
        starts = [0]
        for w in self.level_widths:
            starts.append(starts[-1] + w)
        return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]

    @property
    def tree_size(self) -> int:
        """Latents in the tree (all levels); the free latents follow them."""
        assert self.level_widths is not None
        return sum(self.level_widths)

    @property
    def free_slice(self) -> slice:
        """The free latents' slice of the flat latent axis (empty when n_free is 0)."""
        return slice(self.tree_size, self.tree_size + self.n_free)


@dataclass
class HierarchicalSAEConfig(_TreeFields, SAEConfig):
    """Inference config of a hierarchical SAE (what cfg.json holds)."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        self._resolve_tree(self.d_in, self.d_sae)


@dataclass(kw_only=True)
class HierarchicalTrainingSAEConfig(_TreeFields, TrainingSAEConfig):
    """Training config of a hierarchical SAE: the tree plus every loss coefficient."""

    level_recon_weights: list[float] | None = None
    """Weight w_l of the prefix reconstruction x_hat_{<=l}; the last is the full MSE's."""
    kl_coefficient: float = 0.1
    """Weight of the KL consistency term (parent mass vs pooled child mass)."""
    l2_coefficient: float = 0.0
    """Weight of the L2 consistency term (form chosen by l2_form)."""
    l2_form: str = "decoder"
    """L2 term: "decoder" (unit child rows near parent row) or "activation" (a_p ~ sum a_c)."""
    aux_loss_coefficient: float = 1.0
    """Weight of SAELens's aux-k loss that lets dead latents reconstruct the residual."""
    aux_k: int | None = None
    """Dead latents used by the aux-k loss per token; None = d_in // 2 (SAELens's heuristic)."""
    topk_threshold_lr: float = 0.01
    """EMA rate of the per-level inference thresholds learned during batchtopk training."""
    child_init_parent_mix: float = 0.25
    """At init each child direction is this mix of its parent's direction and a random one
    (0.25 measured best over the benchmark's three tree shapes; 0.5 and 0.9 did worse)."""
    aux_within_parent: bool = True
    """Aux-k revives a dead child only on tokens where its parent is active (measured better
    on every benchmark shape; False = SAELens's aux-k over all dead latents)."""
    tree_fit_step: int | None = None
    """Train ungated until this step, then move each child slot under the parent it co-fires with most."""
    tree_fit_stat_steps: int = 100
    """Steps just before tree_fit_step over which child/parent co-firing is counted."""
    reseat_every: int | None = None
    """Every N steps move dead child slots under the parents their siblings cover least (unfactored only)."""
    reseat_stat_steps: int = 50
    """Steps before each re-seat over which uncovered parent firings and their residuals are summed."""
    reseat_until: int | None = None
    """No re-seat at or after this step (moved slots need steps to train); None = no limit."""
    free_budget_rate: float = 0.0
    """Each step move L0 budget between every level below the roots and the free latents,
    towards equal BatchTopK thresholds (the budget goes where one more activation
    reconstructs more; total L0 unchanged); 0 = the configured k_per_level / k_free throughout."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        # Resolved directly (not through the registry) so a training config can be built
        # before or without registration.
        return HierarchicalSAEConfig

    def __post_init__(self) -> None:
        self._resolve_tree(self.d_in, self.d_sae)
        L = self.n_levels
        assert self.level_widths is not None
        if self.normalize_activations not in TRAINABLE_NORMALIZATIONS:
            raise _bad(
                "normalize_activations", self.normalize_activations,
                f"training supports {', '.join(TRAINABLE_NORMALIZATIONS)} "
                "(stateful norms break the per-level prefix decodes)",
            )
        for name in ("kl_coefficient", "l2_coefficient", "aux_loss_coefficient",
                     "topk_threshold_lr"):
            if getattr(self, name) < 0:
                raise _bad(name, getattr(self, name), "it must be >= 0")
        if not 0.0 <= self.child_init_parent_mix <= 1.0:
            raise _bad("child_init_parent_mix", self.child_init_parent_mix, "it must be in [0, 1]")
        if self.l2_form not in L2_FORMS:
            raise _bad("l2_form", self.l2_form, f"allowed: {', '.join(L2_FORMS)}")
        if self.free_budget_rate < 0:
            raise _bad("free_budget_rate", self.free_budget_rate, "it must be >= 0")
        if self.free_budget_rate > 0 and (not self.n_free or self.variant != "batchtopk"):
            raise _bad("free_budget_rate", self.free_budget_rate,
                       "moving budget needs free latents (n_free > 0) and variant 'batchtopk' "
                       f"(got n_free={self.n_free}, variant={self.variant!r})")
        if self.tree_fit_step is not None and self.tree_fit_step < 1:
            raise _bad("tree_fit_step", self.tree_fit_step, "it must be None or >= 1")
        if self.tree_fit_stat_steps < 1:
            raise _bad("tree_fit_stat_steps", self.tree_fit_stat_steps, "it must be >= 1")
        if self.reseat_every is not None:
            if self.reseat_every < 2:
                raise _bad("reseat_every", self.reseat_every, "it must be None or >= 2")
            if self.projection_rank is not None:
                raise _bad("reseat_every", self.reseat_every,
                           "re-seating needs projection_rank: null (a subspace holds exactly b children)")
        if not 1 <= self.reseat_stat_steps:
            raise _bad("reseat_stat_steps", self.reseat_stat_steps, "it must be >= 1")
        if self.aux_k is not None and self.aux_k < 1:
            raise _bad("aux_k", self.aux_k, "it must be None or >= 1")
        if self.level_recon_weights is None:
            self.level_recon_weights = [1.0] * L
        if len(self.level_recon_weights) != L or any(w < 0 for w in self.level_recon_weights):
            raise _bad(
                "level_recon_weights", self.level_recon_weights,
                f"it must hold {L} non-negative weights",
            )
        if self.variant == "relu":
            if self.l1_per_level is None or len(self.l1_per_level) != L:
                raise _bad(
                    "l1_per_level", self.l1_per_level,
                    f"variant 'relu' needs {L} non-negative L1 coefficients",
                )
            if any(c < 0 for c in self.l1_per_level):
                raise _bad("l1_per_level", self.l1_per_level, "coefficients must be >= 0")
            if not self.allow_nonincreasing_sparsity and any(
                b < a for a, b in zip(self.l1_per_level, self.l1_per_level[1:])
            ):
                raise _bad(
                    "l1_per_level", self.l1_per_level,
                    "coefficients must not decrease with level (deeper = sparser); "
                    "set allow_nonincreasing_sparsity=True to opt out",
                )
        elif not self.allow_nonincreasing_sparsity:
            assert self.k_per_level is not None
            dens = [k / n for k, n in zip(self.k_per_level, self.level_widths)]
            if any(b >= a for a, b in zip(dens, dens[1:])):
                raise _bad(
                    "k_per_level", self.k_per_level,
                    f"the active fraction k_l/n_l must decrease with level (got "
                    f"{[round(x, 4) for x in dens]} for widths {self.level_widths}); "
                    "set allow_nonincreasing_sparsity=True to opt out",
                )
        super().__post_init__()


# ---------------------------------------------------------------------------------------
# Shared model: parameters, the flat views, the tree, gating, folding
# ---------------------------------------------------------------------------------------


def _param_names(cfg: _TreeFields) -> tuple[str, ...]:
    """The tensors that hold the encoder and decoder.

    Unfactored (projection_rank None): SAELens's usual flat W_enc [d_in, d_sae] and W_dec
    [d_sae, d_in], levels being contiguous column/row blocks, so the weights load in any
    tool that reads an SAE's safetensors. Factored: the roots' W_enc_l0 / W_dec_l0 and, per
    child level, the parents' subspace bases and the children's codes in them.
    """
    if cfg.projection_rank is None:
        return ("W_enc", "W_dec")
    names = ["W_enc_l0", "W_dec_l0"]
    for level in range(1, cfg.n_levels):
        names += [f"enc_basis_l{level}", f"enc_codes_l{level}", f"dec_basis_l{level}", f"dec_codes_l{level}"]
    return tuple(names)


def upgrade_legacy_state(state_dict: dict[str, Any], cfg: _TreeFields) -> None:
    """Files saved before 0.2 kept unfactored weights per level (W_enc_l0, W_dec_l0, ...):
    concatenate them into the flat W_enc / W_dec they are now."""
    if cfg.projection_rank is not None or "W_dec" in state_dict or "W_dec_l0" not in state_dict:
        return
    n = cfg.n_levels
    if all(f"W_dec_l{lv}" in state_dict and f"W_enc_l{lv}" in state_dict for lv in range(n)):
        state_dict["W_dec"] = torch.cat([state_dict.pop(f"W_dec_l{lv}") for lv in range(n)], dim=0)
        state_dict["W_enc"] = torch.cat([state_dict.pop(f"W_enc_l{lv}") for lv in range(n)], dim=1)


def code_multiplier(cfg: _TreeFields) -> float:
    """Constant factor between stored and effective child codes.

    With codes d_c of size r feeding d_in-dimensional rows, Adam's per-element steps move a
    child row about sqrt(r/d_in) times slower than an unfactored row would; storing codes
    divided by 3*sqrt(d_in/r) restores a comparable step (measured on the synthetic
    benchmark: F1 0.55 -> 0.77 at d_in=64, r=8; 1x and 10x did worse than 3x).
    """
    assert cfg.projection_rank is not None
    return 3.0 * math.sqrt(cfg.d_in / cfg.projection_rank)  # type: ignore[attr-defined]


def scale_latents(
    tensors: dict[str, torch.Tensor],
    cfg: _TreeFields,
    enc_scale: torch.Tensor,
    dec_scale: torch.Tensor,
) -> None:
    """Multiply latent j's encoder column by enc_scale[j] and decoder row by dec_scale[j].

    Works on a name -> tensor dict (a state dict or the live parameters) and rebinds the
    entries, so state-dict tensors that share storage with parameters are left alone.
    Factored children are scaled through their codes, which keeps each subspace intact.
    """
    assert cfg.level_widths is not None and cfg.branching is not None
    if cfg.projection_rank is None:
        tensors["W_enc"] = tensors["W_enc"] * enc_scale.to(tensors["W_enc"].dtype)
        tensors["W_dec"] = tensors["W_dec"] * dec_scale.to(tensors["W_dec"].dtype).unsqueeze(-1)
        return
    for level, sl in enumerate(cfg.level_slices):
        e, d = enc_scale[sl], dec_scale[sl]
        if level == 0:
            we, wd = "W_enc_l0", "W_dec_l0"
            tensors[we] = tensors[we] * e.to(tensors[we].dtype)
            tensors[wd] = tensors[wd] * d.to(tensors[wd].dtype).unsqueeze(-1)
        else:
            b = cfg.branching[level - 1]
            ec, dc = f"enc_codes_l{level}", f"dec_codes_l{level}"
            tensors[ec] = tensors[ec] * e.to(tensors[ec].dtype).view(-1, 1, b)
            tensors[dc] = tensors[dc] * d.to(tensors[dc].dtype).view(-1, b, 1)


class _HierarchicalMixin:
    """Parameters, flat views, tree accessors and the gated activation (both classes)."""

    cfg: Any
    dtype: torch.dtype
    device: torch.device

    # --- tree ----------------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return self.cfg.n_levels

    @property
    def level_slices(self) -> list[slice]:
        return self.cfg.level_slices

    @property
    def parent_index(self) -> torch.Tensor:
        """LongTensor [d_sae]: the parent of each latent, -1 for roots."""
        return self.tree_parent

    def _default_parent_index(self) -> torch.Tensor:
        """The fixed layout: children contiguous, b per parent, in parent order."""
        return default_parent_index(self.cfg)

    def _local_parents(self, level: int) -> torch.Tensor:
        """LongTensor [n_level]: each latent's parent as an index into level-1."""
        return self.tree_parent[self.level_slices[level]] - self.level_slices[level - 1].start

    def _set_tree(self, parent_index: torch.Tensor) -> None:
        self.tree_parent.copy_(parent_index)
        self._note_tree_changed()

    def _note_tree_changed(self, parent_index: torch.Tensor | None = None) -> None:
        tree = self.tree_parent if parent_index is None else parent_index
        # (a model built on the meta device to be loaded into holds the default layout)
        self._contiguous = tree.is_meta or bool(torch.equal(tree.cpu(), self._default_parent_index()))
        self._kids_cache: dict[Any, torch.Tensor] = {}

    def _kids(self, level: int) -> torch.Tensor:
        """LongTensor [n_{level-1}, max children]: each parent's children at `level`, -1 padded."""
        key = (level, self.tree_parent.device)
        if key not in self._kids_cache:
            par = self._local_parents(level)
            n_par = self.cfg.level_widths[level - 1]
            order = torch.argsort(par, stable=True)
            counts = torch.bincount(par, minlength=n_par)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(par.numel(), device=par.device) - starts[par[order]]
            table = torch.full((n_par, max(int(counts.max()), 1)), -1, dtype=torch.long, device=par.device)
            table[par[order], rank] = order
            self._kids_cache[key] = table
        return self._kids_cache[key]

    @property
    def latent_levels(self) -> torch.Tensor:
        """LongTensor [d_sae]: the level of each latent; free latents carry level n_levels
        (one past the leaves: parentless, childless, fitted to what the tree leaves)."""
        return torch.repeat_interleave(
            torch.arange(self.n_levels + 1), torch.tensor(self.cfg.level_widths + [self.cfg.n_free])
        ).to(self.b_dec.device)

    @property
    def free_slice(self) -> slice:
        return self.cfg.free_slice

    def level_of(self, j: int) -> int:
        """The level of latent j (n_levels for a free latent)."""
        for level, sl in enumerate(self.level_slices + [self.free_slice]):
            if sl.start <= j < sl.stop:
                return level
        raise IndexError(f"latent {j} is outside the SAE (d_sae={self.cfg.d_sae})")

    def children(self, j: int | None = None) -> Any:  # type: ignore[override]
        """Flat indices of latent j's children (empty for leaves).

        Called without j it is nn.Module.children() (the sub-modules), which torch itself
        relies on, so both meanings share the name.
        """
        if j is None:
            return nn.Module.children(self)  # type: ignore[arg-type]
        return self.tree_children(j)

    def tree_children(self, j: int) -> list[int]:
        """Flat indices of latent j's children (empty for leaves)."""
        self.level_of(j)  # range check
        return (self.tree_parent == j).nonzero().flatten().tolist()

    def path(self, j: int) -> list[int]:
        """Flat indices from the root down to latent j (inclusive)."""
        parents = self.parent_index.tolist()
        out = [j]
        while parents[out[-1]] >= 0:
            out.append(parents[out[-1]])
        return out[::-1]

    # --- parameters ----------------------------------------------------------------------
    def initialize_weights(self) -> None:
        cfg = self.cfg
        d, r = cfg.d_in, cfg.projection_rank
        kw = dict(dtype=self.dtype, device=self.device)
        init_norm = getattr(cfg, "decoder_init_norm", None) or 1.0
        mix = getattr(cfg, "child_init_parent_mix", 0.0)
        self.b_dec = nn.Parameter(torch.zeros(d, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        # Each latent's parent (-1 for roots). The layout starts contiguous (b children per
        # parent); re-seating (training) may move children, so it is state, saved and loaded.
        self.register_buffer("tree_parent", default_parent_index(cfg).to(self.device))
        self._note_tree_changed()

        def unit(x: torch.Tensor) -> torch.Tensor:
            return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)

        # Initialise in float32 then cast: QR and normalisation are unstable in bf16.
        parent_dirs = unit(torch.randn(cfg.level_widths[0], d))
        rows = [parent_dirs * init_norm]
        if r is not None:
            self._register_level(0, W_dec=rows[0], kw=kw)
        for level in range(1, cfg.n_levels):
            b = cfg.branching[level - 1]
            n_par = cfg.level_widths[level - 1]
            # Children start as a mix of their parent's direction and a random one: a
            # level-aware init that gives each child slot a reason to sit under its parent.
            if r is None:
                child = unit(mix * parent_dirs.repeat_interleave(b, 0)
                             + (1 - mix) * unit(torch.randn(n_par * b, d)))
                rows.append(child * init_norm)
                parent_dirs = child
                continue
            # The subspace basis U_p: orthonormal rows whose first row is the parent's
            # direction, so the parent direction is always reachable by the children.
            raw = torch.randn(n_par, d, r)
            raw[:, :, 0] = parent_dirs
            basis = torch.linalg.qr(raw).Q.transpose(1, 2)  # [n_par, r, d], orthonormal rows
            sign = torch.sign((basis[:, 0] * parent_dirs).sum(-1)).view(-1, 1, 1)
            basis[:, :1] = basis[:, :1] * sign
            codes = torch.zeros(n_par, b, r)
            codes[:, :, 0] = mix
            codes = unit(codes + (1 - mix) * unit(torch.randn(n_par, b, r)))
            child = torch.einsum("pbr,prd->pbd", codes, basis).reshape(n_par * b, d)
            for name, value in (
                (f"dec_basis_l{level}", basis),
                (f"dec_codes_l{level}", codes * init_norm / code_multiplier(cfg)),
                (f"enc_basis_l{level}", basis.transpose(1, 2).contiguous()),
                (f"enc_codes_l{level}", (codes * init_norm / code_multiplier(cfg)).transpose(1, 2).contiguous()),
            ):
                setattr(self, name, nn.Parameter(value.to(**kw)))
            parent_dirs = unit(child)
        if r is None:
            rows.append(unit(torch.randn(cfg.n_free, d)) * init_norm)  # free latents
            # Straight into _parameters: W_dec / W_enc are also properties (below), which
            # nn.Module's setattr would refuse to shadow.
            W_dec = torch.cat(rows)
            self._parameters["W_dec"] = nn.Parameter(W_dec.to(**kw))
            self._parameters["W_enc"] = nn.Parameter(W_dec.T.contiguous().to(**kw))

    def _register_level(self, level: int, W_dec: torch.Tensor, kw: dict[str, Any]) -> None:
        setattr(self, f"W_dec_l{level}", nn.Parameter(W_dec.to(**kw)))
        setattr(self, f"W_enc_l{level}", nn.Parameter(W_dec.T.contiguous().to(**kw)))

    def level_W_dec(self, level: int) -> torch.Tensor:
        """Decoder rows of one level, [n_level, d_in] (materialised from the subspaces)."""
        if self.cfg.projection_rank is None:
            return self.W_dec[self.level_slices[level]]
        if level == 0:
            return getattr(self, f"W_dec_l{level}")
        codes, basis = getattr(self, f"dec_codes_l{level}"), getattr(self, f"dec_basis_l{level}")
        return torch.einsum("pbr,prd->pbd", codes * code_multiplier(self.cfg), basis).flatten(0, 1)

    def level_W_enc(self, level: int) -> torch.Tensor:
        """Encoder columns of one level, [d_in, n_level]."""
        if self.cfg.projection_rank is None:
            return self.W_enc[:, self.level_slices[level]]
        if level == 0:
            return getattr(self, f"W_enc_l{level}")
        basis, codes = getattr(self, f"enc_basis_l{level}"), getattr(self, f"enc_codes_l{level}")
        return torch.einsum("pdr,prb->dpb", basis, codes * code_multiplier(self.cfg)).flatten(1, 2)

    @property
    def W_dec(self) -> torch.Tensor:  # type: ignore[override]
        """Flat decoder [d_sae, d_in]: the parameter itself when unfactored, else a read-only
        view built from the subspaces (edit through the fold methods)."""
        param = self._parameters.get("W_dec")  # type: ignore[attr-defined]
        if param is not None:
            return param
        return torch.cat([self.level_W_dec(lv) for lv in range(self.n_levels)], dim=0)

    @property
    def W_enc(self) -> torch.Tensor:  # type: ignore[override]
        """Flat encoder [d_in, d_sae]: the parameter itself when unfactored, else a read-only
        view built from the subspaces (edit through the fold methods)."""
        param = self._parameters.get("W_enc")  # type: ignore[attr-defined]
        if param is not None:
            return param
        return torch.cat([self.level_W_enc(lv) for lv in range(self.n_levels)], dim=1)

    def _live_weights(self) -> dict[str, torch.Tensor]:
        return {n: p.data for n, p in self.named_parameters()}  # type: ignore[attr-defined]

    @torch.no_grad()
    def _scale_latents_(self, enc_scale: torch.Tensor, dec_scale: torch.Tensor) -> None:
        weights = self._live_weights()
        scale_latents(weights, self.cfg, enc_scale, dec_scale)
        for name, value in weights.items():
            getattr(self, name).data.copy_(value)

    @torch.no_grad()
    def _scale_input_space_(self, s: float) -> None:
        """Fold x -> x*s into the weights: encoder side x s, decoder side and b_dec / s."""
        ones = torch.ones(self.cfg.d_sae, device=self.b_dec.device)
        self._scale_latents_(ones * s, ones / s)
        self.b_dec.data /= s

    def _tree_residual(self, sae_in: torch.Tensor, tree_recon: torch.Tensor) -> torch.Tensor:
        """x - x_hat_tree, from process_sae_in's output and the tree's latents @ W_dec rows
        (b_dec excluded): what the free latents are fitted to and encoded from."""
        if self.cfg.apply_b_dec_to_input:
            return sae_in - tree_recon
        return sae_in - tree_recon - self.b_dec

    # --- the gated, level-by-level activation ------------------------------------------
    def _gate(self, acts: torch.Tensor, parent_on: torch.Tensor, level: int) -> torch.Tensor:
        """Zero every child whose parent is off. acts [..., n_l], parent_on [..., n_{l-1}]."""
        if not self._contiguous:
            return acts * parent_on[..., self._local_parents(level)]
        n_par = parent_on.shape[-1]
        gated = acts.unflatten(-1, (n_par, acts.shape[-1] // n_par)) * parent_on.unsqueeze(-1)
        return gated.flatten(-2)

    def _hierarchical_levels(
        self, hidden_pre: torch.Tensor, select: Any, gated: bool = True
    ) -> list[torch.Tensor]:
        """Run levels root-first: relu, gate by the parent level, then `select(level, acts, pre)`.

        Returns one tensor per level. `split` rather than slicing: its backward is one
        concatenation, where each slice's backward would write into a zeroed full-size copy.
        """
        outs: list[torch.Tensor] = []
        parent_on: torch.Tensor | None = None
        for level, pre in enumerate(hidden_pre.split(self.cfg.level_widths, dim=-1)):
            acts = pre.relu()
            if parent_on is not None and gated:
                acts = self._gate(acts, parent_on, level)
            acts = select(level, acts, pre)
            parent_on = acts > 0
            outs.append(acts)
        return outs

    def _hierarchical_activation(
        self, hidden_pre: torch.Tensor, select: Any, gated: bool = True
    ) -> torch.Tensor:
        """The gated activation over all levels, [..., d_sae]."""
        return torch.cat(self._hierarchical_levels(hidden_pre, select, gated), dim=-1)


class _Encoded(NamedTuple):
    """What the training SAE's encoder computes in one pass (see `_encode`)."""

    levels: list[torch.Tensor]
    free: torch.Tensor | None
    hidden_pre: torch.Tensor
    unit_W_dec: torch.Tensor
    terms: list[torch.Tensor] | None


def _topk_per_token(acts: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = acts.topk(min(int(k), acts.shape[-1]), dim=-1, sorted=False)
    return torch.zeros_like(acts).scatter(-1, idx, vals)


# ---------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------


class HierarchicalSAE(_HierarchicalMixin, SAE[HierarchicalSAEConfig]):
    """Inference hierarchical SAE: per-token, hard-gated, linear decode."""

    threshold: torch.Tensor

    def __init__(self, cfg: HierarchicalSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        # Per-latent threshold on the (norm-folded) pre-activation: the batchtopk variant's
        # learned per-level threshold; 0 for relu; unused by topk.
        self.register_buffer(
            "threshold", torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)
        )

    def _select(self, level: int, acts: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """Level `level`'s sparsity rule; level n_levels is the free latents'."""
        free = level == self.n_levels
        if self.cfg.variant == "topk":
            return _topk_per_token(acts, int(self.cfg.k_free if free else self.cfg.k_per_level[level]))
        return acts * (pre > self.threshold[self.free_slice if free else self.level_slices[level]])

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        if not self.cfg.n_free:
            hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
            return self.hook_sae_acts_post(self._hierarchical_activation(hidden_pre, self._select))
        # Free latents read what the tree leaves: x - x_hat_tree. So the tree is encoded and
        # decoded first, then the free latents are encoded from its residual (the
        # hook_sae_acts_pre hook sees both parts; the free part is computed from the tree's
        # unhooked activations).
        T = self.cfg.tree_size
        W_enc, b_enc = self.W_enc, self.b_enc
        pre_tree = sae_in @ W_enc[:, :T] + b_enc[:T]
        tree = self._hierarchical_activation(pre_tree, self._select)
        pre_free = self._tree_residual(sae_in, tree @ self.W_dec[:T]) @ W_enc[:, T:] + b_enc[T:]
        cat = torch.cat([pre_tree, pre_free], dim=-1)
        hidden_pre = self.hook_sae_acts_pre(cat)
        if hidden_pre is not cat:  # a hook edited the pre-activations
            pre_tree, pre_free = hidden_pre.split([T, self.cfg.n_free], dim=-1)
            tree = self._hierarchical_activation(pre_tree, self._select)
        free = self._select(self.n_levels, pre_free.relu(), pre_free)
        return self.hook_sae_acts_post(torch.cat([tree, free], dim=-1))

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        norms = self.get_W_dec_norm()
        if self.cfg.variant == "topk" and not torch.allclose(norms, torch.ones_like(norms)):
            # Per-token TopK compares pre-activations across latents; rescaling them by
            # different norms would change which latents win.
            raise NotImplementedError(
                "fold_W_dec_norm would change the TopK selection of a 'topk' hierarchical SAE "
                "whose decoder rows are not unit-norm"
            )
        self._scale_latents_(norms, 1.0 / norms)
        self.b_enc.data *= norms
        self.threshold.data *= norms.to(self.threshold.dtype)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        # Pre-activations are unchanged by the fold, so the thresholds stay as they are.
        self._scale_input_space_(scaling_factor)
        self.cfg.normalize_activations = "none"

    @override
    @torch.no_grad()
    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "covariance_whitening is not supported by hierarchical SAEs yet"
        )

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # A training checkpoint keeps unfolded decoder norms and per-level thresholds:
        # convert it to the inference form so SAE.load_from_disk(checkpoint) is exact.
        _pop_checkpoint_extras(state_dict)  # training-only state of a checkpoint
        upgrade_legacy_state(state_dict, self.cfg)
        _load_tree(self, state_dict)
        if "topk_threshold" in state_dict:
            check_loaded_state(self, state_dict, skip=("threshold", "topk_threshold", "tree_fitted"))
            n_thr = _n_thresholds(self.cfg)
            if tuple(state_dict["topk_threshold"].shape) != (n_thr,):
                raise HierarchicalSAELoadError(
                    f"sae_weights.safetensors: tensor 'topk_threshold' has shape "
                    f"{list(state_dict['topk_threshold'].shape)} but cfg.json "
                    f"(n_levels={self.cfg.n_levels}, n_free={self.cfg.n_free}) implies [{n_thr}]"
                )
            _training_to_inference_state(state_dict, self.cfg)
        check_loaded_state(self, state_dict)
        _accept_tree(self, state_dict)


def _load_tree(sae: Any, state_dict: dict[str, Any]) -> None:
    """Files from before re-seating have no tree_parent: they use the fixed layout."""
    tree = state_dict.setdefault("tree_parent", default_parent_index(sae.cfg))
    state_dict["tree_parent"] = tree.long()  # (loaders may cast every tensor to the cfg dtype)


def _accept_tree(sae: Any, state_dict: dict[str, Any]) -> None:
    """Check a loaded tree (each latent's parent one level up), after the shapes were checked."""
    cfg = sae.cfg
    default = default_parent_index(cfg)
    tree = state_dict["tree_parent"]
    if not torch.equal(tree.cpu(), default):
        t = tree.cpu().long()
        for level, sl in enumerate(cfg.level_slices):
            lo, hi = (-1, -1) if level == 0 else (cfg.level_slices[level - 1].start, sl.start - 1)
            bad = ((t[sl] < lo) | (t[sl] > hi)).nonzero().flatten()
            if len(bad):
                j = int(bad[0]) + sl.start
                raise HierarchicalSAELoadError(
                    f"sae_weights.safetensors: tensor 'tree_parent' gives latent {j} (level "
                    f"{level}) the parent {int(t[j])}; a level-{level} latent's parent must be "
                    f"{'-1' if level == 0 else f'in [{lo}, {hi}]'}")
        free = cfg.free_slice
        if bool((t[free] != -1).any()):
            j = int((t[free] != -1).nonzero()[0]) + free.start
            raise HierarchicalSAELoadError(
                f"sae_weights.safetensors: tensor 'tree_parent' gives free latent {j} the parent "
                f"{int(t[j])}; free latents (after the tree's {cfg.tree_size}) have none (-1)")
        if cfg.projection_rank is not None:
            raise HierarchicalSAELoadError(
                "sae_weights.safetensors: tensor 'tree_parent' holds a re-seated tree, but cfg.json "
                f"has projection_rank={cfg.projection_rank}: factored children need the fixed layout")
    sae._note_tree_changed(tree)


def _training_to_inference_state(state_dict: dict[str, Any], cfg: _TreeFields) -> None:
    """Fold decoder norms into the encoder and turn per-level thresholds into per-latent ones."""
    level_thresholds = state_dict.pop("topk_threshold")
    fitted = state_dict.pop("tree_fitted", None)
    if fitted is not None and not bool(fitted):
        warnings.warn(
            "this hierarchical SAE is saved before its tree_fit_step: it was trained ungated, "
            "but inference always applies the parent gate",
            stacklevel=2,
        )
    probe = {n: state_dict[n] for n in _param_names(cfg)}
    norms = _flat_W_dec_norms(probe, cfg)
    scale_latents(state_dict, cfg, norms, 1.0 / norms)
    state_dict["b_enc"] = state_dict["b_enc"] * norms.to(state_dict["b_enc"].dtype)
    groups = list(cfg.level_widths or []) + ([cfg.n_free] if cfg.n_free else [])
    thr = torch.cat([
        torch.full((w,), float(t) if cfg.variant == "batchtopk" else 0.0)
        for w, t in zip(groups, level_thresholds.tolist())
    ])
    state_dict["threshold"] = thr.to(dtype=state_dict["b_enc"].dtype, device=state_dict["b_enc"].device)


def _n_thresholds(cfg: _TreeFields) -> int:
    """Entries of a training SAE's topk_threshold: one per level, then the free latents'."""
    return cfg.n_levels + (1 if cfg.n_free else 0)


def _flat_W_dec_norms(tensors: dict[str, torch.Tensor], cfg: _TreeFields) -> torch.Tensor:
    if cfg.projection_rank is None:
        return tensors["W_dec"].norm(dim=-1).clamp(min=1e-8)
    rows = []
    for level in range(cfg.n_levels):
        if level == 0:
            rows.append(tensors[f"W_dec_l{level}"])
        else:
            rows.append(torch.einsum(
                "pbr,prd->pbd", tensors[f"dec_codes_l{level}"] * code_multiplier(cfg),
                tensors[f"dec_basis_l{level}"],
            ).flatten(0, 1))
    return torch.cat(rows).norm(dim=-1).clamp(min=1e-8)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


class HierarchicalTrainingSAE(_HierarchicalMixin, TrainingSAE[HierarchicalTrainingSAEConfig]):
    """Training hierarchical SAE.

    As SAELens's TopK SAEs do with `rescale_acts_by_decoder_norm`, activations are measured
    in units of a unit-norm decoder: hidden_pre is scaled by ||W_dec[j]|| and decode uses
    the normalised rows, so the scale of a decoder row cannot buy sparsity. Saving for
    inference folds the norms into the encoder, leaving a plain linear decoder.
    """

    topk_threshold: torch.Tensor

    def __init__(self, cfg: HierarchicalTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # Double precision for the EMA, as SAELens's BatchTopK does.
        self.register_buffer(
            "topk_threshold",
            torch.zeros(_n_thresholds(cfg), dtype=torch.double, device=self.b_dec.device),
        )
        # Whether the parent gate is on. Persistent, so a resumed run knows its phase.
        self.register_buffer(
            "tree_fitted",
            torch.tensor(cfg.tree_fit_step is None, device=self.b_dec.device),
        )
        # Co-firing counts for tree fitting: plain attributes, not state (they are rebuilt
        # during the counting window and dropped after the fit).
        self._cofire: dict[int, torch.Tensor] = {}
        self._fire: dict[int, torch.Tensor] = {}
        # Re-seating statistics: per child level, uncovered firings and residual sums of
        # each parent (plain attributes, rebuilt in each counting window).
        self._uncovered: dict[int, torch.Tensor] = {}
        self._uncovered_resid: dict[int, torch.Tensor] = {}
        # Slots moved at the last re-seat: SAELens still counts them dead until they first
        # fire, so they sit out one round instead of being moved again straight away.
        self._just_moved: set[int] = set()
        # Steps trained, and the correction from SAELens's step label to it (see _step).
        self._steps_done = 0
        self._step_offset = 0
        self._loaded_steps: int | None = None
        # The sparsity budget in use: k per level, then k_free. It starts at the config's and
        # only free_budget_rate moves it (saved in checkpoints; cfg keeps the starting values).
        self._k: list[float] = [] if cfg.k_per_level is None else (
            [float(k) for k in cfg.k_per_level] + ([float(cfg.k_free)] if cfg.n_free else []))

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    def _unit_W_dec(self) -> tuple[torch.Tensor, torch.Tensor]:
        W_dec = self.W_dec
        norms = W_dec.norm(dim=-1).clamp(min=1e-8)
        return W_dec / norms.unsqueeze(-1), norms

    def _select_train(self, level: int, acts: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        k = self._k[level] if self._k else None
        if self.cfg.variant == "topk":
            return _topk_per_token(acts, int(k))
        if self.cfg.variant == "relu":
            return acts
        return self._batch_topk(acts, k)

    def _batch_topk(self, acts: torch.Tensor, k: float) -> torch.Tensor:
        """BatchTopK over the batch's flattened group: k per token on average. Keeping
        everything at or above the smallest kept positive value selects the same entries
        as scattering the top-k (ties aside) with fewer ops, and that value is exactly what
        the inference threshold's running average needs (appended to _level_min_kept)."""
        flat = acts.flatten()
        n_keep = min(int(k * acts.shape[:-1].numel()), flat.numel())
        vals = flat.topk(n_keep, sorted=False).values
        min_kept = torch.where(vals > 0, vals, torch.inf).min()
        self._level_min_kept.append(min_kept)
        return acts * (acts >= min_kept)

    def _gated(self) -> bool:
        """Whether the parent gate is on (always, unless an ungated tree-fit warm-up runs)."""
        return self.cfg.tree_fit_step is None or bool(self.tree_fitted)

    def _encode(self, x: torch.Tensor, gated: bool | None = None) -> _Encoded:
        """Per-level activations, the free latents' (None without them), hidden_pre
        [..., d_sae], the unit-norm decoder and (with free latents) each level's decoded
        contribution, which the training step reuses for its prefix reconstructions."""
        cfg = self.cfg
        sae_in = self.process_sae_in(x)
        unit_W_dec, norms = self._unit_W_dec()
        if gated is None:
            gated = self._gated()
        if not cfg.n_free:
            hidden_pre = self.hook_sae_acts_pre((sae_in @ self.W_enc + self.b_enc) * norms)
            return _Encoded(self._tree_levels(hidden_pre, gated), None, hidden_pre, unit_W_dec, None)
        # The tree first; the free latents then read its residual (see HierarchicalSAE.encode).
        T = cfg.tree_size
        rows = unit_W_dec[:T].split(cfg.level_widths)
        pre_tree = (sae_in @ self.W_enc[:, :T] + self.b_enc[:T]) * norms[:T]
        levels = self._tree_levels(pre_tree, gated)
        terms = [a @ W for a, W in zip(levels, rows)]
        # Detached: the free latents fit what the tree leaves without pulling the tree
        # towards leaving it (free latents trained jointly take the tree's own features).
        resid = self._tree_residual(sae_in, sum(terms)).detach()  # type: ignore[arg-type]
        pre_free = (resid @ self.W_enc[:, T:] + self.b_enc[T:]) * norms[T:]
        cat = torch.cat([pre_tree, pre_free], dim=-1)
        hidden_pre = self.hook_sae_acts_pre(cat)
        if hidden_pre is not cat:  # a hook edited the pre-activations
            pre_tree, pre_free = hidden_pre.split([T, cfg.n_free], dim=-1)
            levels = self._tree_levels(pre_tree, gated)
            terms = [a @ W for a, W in zip(levels, rows)]
        return _Encoded(levels, self._select_free(pre_free), hidden_pre, unit_W_dec, terms)

    def _tree_levels(self, hidden_pre: torch.Tensor, gated: bool) -> list[torch.Tensor]:
        self._level_min_kept = []
        if gated and self.cfg.variant == "batchtopk":
            return self._batchtopk_levels(hidden_pre)
        return self._hierarchical_levels(hidden_pre, self._select_train, gated=gated)

    def _select_free(self, pre_free: torch.Tensor) -> torch.Tensor:
        """The free latents' sparsity rule (k_free), their threshold learned after the levels'."""
        acts = pre_free.relu()
        if self.cfg.variant == "topk":
            return _topk_per_token(acts, int(self._k[-1]))
        return self._batch_topk(acts, self._k[-1])

    def _cat_acts(self, levels: list[torch.Tensor], free: torch.Tensor | None) -> torch.Tensor:
        return torch.cat(levels if free is None else [*levels, free], dim=-1)

    def _batchtopk_levels(self, hidden_pre: torch.Tensor) -> list[torch.Tensor]:
        """Gated per-level BatchTopK that only looks at children of active parents.

        Under the gate a child can only fire where its parent fired, so level l's BatchTopK
        runs over the b children of the n_keep_{l-1} parent entries kept one level up, not
        over all B x n_l entries: the selection costs O(k_{l-1} B b) instead of O(B n_l)
        (a 25x smaller top-k at the benchmark's leaf level). Same result as gating the dense
        level and taking its top-k (checked against that in the tests).
        """
        cfg = self.cfg
        lead = hidden_pre.shape[:-1]
        n_tok = lead.numel()
        outs: list[torch.Tensor] = []
        cand_idx: torch.Tensor | None = None  # flat indices of this level's candidate entries
        for level, pre in enumerate(hidden_pre.split(cfg.level_widths, dim=-1)):
            flat_pre = pre.reshape(-1)
            if cand_idx is None:
                cand = flat_pre.relu()
            else:
                cand = flat_pre.index_select(0, cand_idx).relu() * cand_ok
            n_keep = min(int(self._k[level] * n_tok), cand.numel())
            vals, pos = cand.topk(n_keep, sorted=False)
            idx = pos if cand_idx is None else cand_idx.index_select(0, pos)
            min_kept = torch.where(vals > 0, vals, torch.inf).min()
            self._level_min_kept.append(min_kept)
            # Re-seated trees pad each parent's child list, so padding may repeat an index
            # (with value 0): accumulate, which leaves the real entry's value intact.
            outs.append(flat_pre.new_zeros(flat_pre.shape).index_put(
                (idx,), vals, accumulate=not self._contiguous).view_as(pre))
            if level + 1 < cfg.n_levels and self._contiguous:
                # The kept parents' children: entries idx*b .. idx*b + b-1 of the next level
                # (children are contiguous per parent, and a token's row of n_l children
                # starts where its row of n_{l-1} parents does, times b).
                b = cfg.branching[level]
                cand_idx = (idx.unsqueeze(-1) * b + torch.arange(b, device=idx.device)).reshape(-1)
                cand_ok = (vals > 0).repeat_interleave(b).to(vals.dtype)
            elif level + 1 < cfg.n_levels:
                n_par, n_child = cfg.level_widths[level], cfg.level_widths[level + 1]
                kid = self._kids(level + 1)[idx % n_par]  # [n_keep, max children]
                cand_idx = ((idx // n_par).unsqueeze(-1) * n_child + kid.clamp(min=0)).reshape(-1)
                cand_ok = ((kid >= 0) & (vals > 0).unsqueeze(-1)).reshape(-1).to(vals.dtype)
        return outs

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._encode(x)
        return self.hook_sae_acts_post(self._cat_acts(enc.levels, enc.free)), enc.hidden_pre

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        unit_W_dec, _ = self._unit_W_dec()
        sae_out = self.hook_sae_recons(feature_acts @ unit_W_dec + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        cfg = self.cfg
        x = step_input.sae_in
        n_step = self._step(step_input.n_training_steps)
        fit_at = cfg.tree_fit_step
        if fit_at is not None and not bool(self.tree_fitted) and n_step >= fit_at:
            # Before the forward pass: the weights move here, and autograd must not see it.
            self.fit_tree()
        every = cfg.reseat_every
        gated_now = self._gated()
        if cfg.reseat_until is not None and n_step >= cfg.reseat_until:
            every = None
        if every and gated_now and n_step > 0 and n_step % every == 0 and self._uncovered:
            self.reseat(step_input.dead_neuron_mask)  # before the forward pass, as fit_tree
        levels, free, hidden_pre, unit_W_dec, terms = self._encode(x, gated=gated_now)
        cat = self._cat_acts(levels, free)
        acts = self.hook_sae_acts_post(cat)
        if acts is not cat:  # a hook edited the activations: the losses must see its edit
            parts = list(acts.split(cfg.level_widths + ([cfg.n_free] if free is not None else []), dim=-1))
            levels, free, terms = parts[: cfg.n_levels], (parts[-1] if free is not None else None), None
        if fit_at is not None and not bool(self.tree_fitted) and (
            n_step >= fit_at - cfg.tree_fit_stat_steps
        ):
            self._count_cofiring(acts.detach())
        weights = cfg.level_recon_weights

        # Prefix reconstructions x_hat_{<=l}: one decode split by level costs the same as one.
        losses: dict[str, torch.Tensor] = {}
        recon = self.b_dec.expand_as(x)
        total = x.new_zeros(())
        for level, (a, W) in enumerate(zip(levels, unit_W_dec[: cfg.tree_size].split(cfg.level_widths))):
            recon = recon + (a @ W if terms is None else terms[level])
            err = (recon - x).pow(2).sum(-1).mean()
            if level < cfg.n_levels - 1 or free is not None:
                losses[f"prefix_mse_level_{level}"] = weights[level] * err
            else:
                mse = err
            total = total + weights[level] * err
        out = recon
        if free is not None:
            # The SAE's output adds the free latents to the (detached) tree: their MSE, which
            # is the whole SAE's, trains the free latents alone.
            out = recon.detach() + free @ unit_W_dec[cfg.tree_size:]
            mse = (out - x).pow(2).sum(-1).mean()
            total = total + mse
        sae_out = self.hook_sae_recons(out)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        losses = {"mse_loss": mse, **losses}
        if every and gated_now and (n_step % every) >= every - cfg.reseat_stat_steps:
            self._count_uncovered(levels, (x - recon).detach())

        zero = x.new_zeros(())
        losses["kl_consistency_loss"] = (
            cfg.kl_coefficient * level_kl(levels, cfg, parents=None if self._contiguous else [
                self._local_parents(lv) for lv in range(1, cfg.n_levels)])
            if cfg.kl_coefficient > 0 else zero
        )
        losses["l2_consistency_loss"] = (
            cfg.l2_coefficient * self._l2_consistency(levels, unit_W_dec)
            if cfg.l2_coefficient > 0 else zero
        )
        if cfg.variant == "relu":
            assert cfg.l1_per_level is not None
            losses["l1_loss"] = sum(
                (c * a.sum(-1).mean() for c, a in zip(cfg.l1_per_level, levels)), zero
            )
        dead = step_input.dead_neuron_mask
        if free is None or dead is None:
            aux = self._aux_loss(x, recon, hidden_pre, unit_W_dec, dead, acts)
        else:
            # Dead tree latents learn what the tree misses, dead free latents what the whole
            # SAE misses (the free latents' own target). Each decodes only its own block of
            # latents: the same loss as decoding all d_sae with the other block zero, at the
            # cost of one aux decode instead of two.
            T = cfg.tree_size
            aux = (self._aux_loss(x, recon, hidden_pre[..., :T], unit_W_dec[:T], dead[:T], acts)
                   + self._aux_loss(x, out, hidden_pre[..., T:], unit_W_dec[T:], dead[T:], None))
        losses["auxiliary_reconstruction_loss"] = aux
        # prefix terms are already in `total`; add the rest (not mse, not prefixes).
        for name, value in losses.items():
            if name != "mse_loss" and not name.startswith("prefix_mse"):
                total = total + value

        # One check (one device sync) per step, before backward and before the thresholds
        # move: NaN/inf inputs or losses stop training with the step and the culprit named.
        # Non-finite activations always reach the loss through the MSE, so the loss suffices.
        if not bool(torch.isfinite(total)):
            raise NonFiniteTrainingError(
                _non_finite_message(x, losses, total, n_step)
            )
        self._steps_done = n_step + 1
        if cfg.variant == "batchtopk" and self.training:
            self._update_thresholds()
            if cfg.free_budget_rate > 0:
                self._move_budget()
        metrics: dict[str, Any] = {}
        if step_input.is_logging_step:
            with torch.no_grad():
                for level, a in enumerate(levels):
                    metrics[f"l0_level_{level}"] = (a > 0).sum(-1).float().mean().item()
                    if cfg.variant == "batchtopk":
                        metrics[f"threshold_level_{level}"] = self.topk_threshold[level].item()
                if cfg.free_budget_rate > 0:
                    metrics.update({f"k_level_{lv}": k for lv, k in enumerate(self._k[:-1])})
                    metrics["k_free"] = self._k[-1]
                if free is not None:
                    metrics["l0_free"] = (free > 0).sum(-1).float().mean().item()
                    if cfg.variant == "batchtopk":
                        metrics["threshold_free"] = self.topk_threshold[-1].item()
        return TrainStepOutput(
            sae_in=x, sae_out=sae_out, feature_acts=acts, hidden_pre=hidden_pre,
            loss=total, losses=losses, metrics=metrics,
        )

    @override
    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out):  # type: ignore[override]
        # training_forward_pass computes every term itself; kept for the abstract contract.
        unit_W_dec, _ = self._unit_W_dec()
        return {"auxiliary_reconstruction_loss": self._aux_loss(
            step_input.sae_in, sae_out, hidden_pre, unit_W_dec, step_input.dead_neuron_mask)}

    def _aux_loss(self, x, recon, hidden_pre, unit_W_dec, dead_mask, acts=None) -> torch.Tensor:
        """SAELens's aux-k: the top dead latents reconstruct the live latents' residual.

        hidden_pre, unit_W_dec and dead_mask cover the same latents: all of them, the tree's
        (acts given: a dead child is then revived only where its parent is on) or the free
        latents' (acts None)."""
        if dead_mask is None or self.cfg.aux_loss_coefficient == 0:
            return x.new_zeros(())
        num_dead = int(dead_mask.sum())
        if num_dead == 0:
            return x.new_zeros(())
        k_aux = self.cfg.aux_k or x.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        if acts is not None and self.cfg.aux_within_parent and bool(self.tree_fitted):
            aux_acts = self._aux_acts_within_parent(min(k_aux, num_dead), hidden_pre, dead_mask, acts)
        else:
            aux_acts = calculate_topk_aux_acts(min(k_aux, num_dead), hidden_pre, dead_mask)
        residual = (x - recon).detach()
        aux = (aux_acts @ unit_W_dec - residual).pow(2).sum(-1).mean()
        return self.cfg.aux_loss_coefficient * scale * aux

    def _aux_acts_within_parent(self, k_aux, hidden_pre, dead_mask, acts) -> torch.Tensor:
        """Aux-k restricted to dead latents whose parent is on for that token.

        A dead child is revived on the tokens where it could actually fire (its parent is
        active), so it learns what is missing under its own parent, not anywhere.
        """
        allowed = torch.ones_like(hidden_pre, dtype=torch.bool)
        for level in range(1, self.n_levels):
            parent_on = acts[..., self.level_slices[level - 1]] > 0
            allowed[..., self.level_slices[level]] = parent_on[..., self._local_parents(level)]
        cand = torch.where(dead_mask & allowed, hidden_pre, -torch.inf)
        top = cand.topk(k_aux, dim=-1, sorted=False)
        vals = torch.where(torch.isfinite(top.values), top.values, 0.0)
        return torch.zeros_like(hidden_pre).scatter(-1, top.indices, vals)

    def _l2_consistency(self, levels: list[torch.Tensor], unit_W_dec: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        out = levels[0].new_zeros(())
        rows = unit_W_dec[: cfg.tree_size].split(cfg.level_widths)
        for level in range(1, cfg.n_levels):
            par = self._local_parents(level)
            if cfg.l2_form == "decoder":
                # mean over parents of the mean squared distance to their children
                diff = (rows[level] - rows[level - 1][par]).pow(2).sum(-1)
                per_parent = diff.new_zeros(rows[level - 1].shape[0]).index_add(0, par, diff)
                counts = torch.bincount(par, minlength=rows[level - 1].shape[0]).clamp(min=1)
                out = out + (per_parent / counts).mean()
            else:  # Luo et al.: the parent's activation should equal its children's sum.
                child_sum = _pool_children(levels[level], par, levels[level - 1].shape[-1])
                out = out + (levels[level - 1] - child_sum).pow(2).sum(-1).mean()
        return out

    @torch.no_grad()
    def _update_thresholds(self) -> None:
        """Running average of each level's smallest kept activation (the inference threshold)."""
        lr = self.cfg.topk_threshold_lr
        with torch.autocast(self.topk_threshold.device.type, enabled=False):
            mins = torch.stack(self._level_min_kept).double()
            old = self.topk_threshold
            # A level that kept nothing this batch (min is inf) keeps its threshold.
            self.topk_threshold.copy_(torch.where(torch.isfinite(mins), (1 - lr) * old + lr * mins, old))

    # --- budget between the tree and the free latents ----------------------------------------
    # A tree of the wrong shape leaves features to the free latents, a matching one leaves
    # them little: the right split of the L0 depends on the data. BatchTopK's smallest kept
    # activation is what the last unit of a group's budget buys, so each step every level
    # below the roots gives budget to the free latents (or takes it back) in proportion to
    # the log ratio of the two; the roots keep theirs (their children need them). Measured on
    # the synthetic benchmark's mismatched trees: EV +0.03 / +0.04 (wider / narrower), the
    # matched tree unchanged.

    @torch.no_grad()
    def _move_budget(self) -> None:
        cfg = self.cfg
        assert cfg.k_per_level is not None and cfg.k_free is not None
        mins = torch.stack(self._level_min_kept).double().tolist()  # one sync per step
        k = self._k
        t_free = mins[-1]
        for lv in range(1, cfg.n_levels):
            t = mins[lv]
            if not (math.isfinite(t) and math.isfinite(t_free) and t > 0 and t_free > 0):
                continue
            dk = cfg.free_budget_rate * math.log(t_free / t) * k[lv]
            # Neither side drops below a quarter of its configured budget or exceeds its width.
            dk = min(dk, k[lv] - cfg.k_per_level[lv] / 4, cfg.n_free - k[-1])
            dk = max(dk, -(k[-1] - cfg.k_free / 4), -(cfg.level_widths[lv] - k[lv]))
            k[lv] -= dk
            k[-1] += dk

    # --- re-seating -------------------------------------------------------------------------
    # A fixed layout gives every parent b children, but parents need different numbers:
    # some children never win a token (dead), while other parents fire with none of their
    # children on. Every reseat_every steps each dead child slot moves (with its subtree)
    # under the parent with the most such uncovered firings, its directions set to the mean
    # residual there, so aux-k within the parent can grow it into what that parent lacks.

    @torch.no_grad()
    def _count_uncovered(self, levels: list[torch.Tensor], residual: torch.Tensor) -> None:
        res = residual.reshape(-1, residual.shape[-1]).float()
        for level in range(1, self.n_levels):
            par_on = levels[level - 1].reshape(-1, levels[level - 1].shape[-1]) > 0
            kids_on = _pool_children((levels[level].reshape(-1, levels[level].shape[-1]) > 0).float(),
                                     self._local_parents(level), par_on.shape[-1]) > 0
            unc = (par_on & ~kids_on).float()  # [tokens, n_par]
            cnt, rsum = unc.sum(0), unc.T @ res
            if level in self._uncovered:
                self._uncovered[level] += cnt
                self._uncovered_resid[level] += rsum
            else:
                self._uncovered[level], self._uncovered_resid[level] = cnt, rsum

    @torch.no_grad()
    def reseat(self, dead_mask: torch.Tensor | None) -> int:
        """Move dead child slots under the parents with the most uncovered firings; returns
        how many moved. Each move halves that parent's remaining claim, so one hungry parent
        does not take every dead slot."""
        moved = 0
        just_moved: set[int] = set()
        if dead_mask is not None:
            tree = self.tree_parent.clone()
            for level in range(1, self.n_levels):
                if level not in self._uncovered:
                    continue
                sl, psl = self.level_slices[level], self.level_slices[level - 1]
                dead = [c for c in dead_mask[sl].nonzero().flatten().tolist()
                        if sl.start + c not in self._just_moved]
                claim = self._uncovered[level].clone()
                resid = self._uncovered_resid[level]
                norm = self.W_dec.data[sl].norm(dim=-1).mean()  # a moved row gets the level's typical norm
                for c in dead:
                    p = int(claim.argmax())
                    if float(claim[p]) < 1:
                        break
                    claim[p] /= 2
                    j = sl.start + c
                    tree[j] = psl.start + p
                    direction = resid[p] / resid[p].norm().clamp(min=1e-12)
                    self.W_dec.data[j] = (direction * norm).to(self.W_dec.dtype)
                    self.W_enc.data[:, j] = direction.to(self.W_enc.dtype)
                    self.b_enc.data[j] = 0
                    just_moved.add(j)
                    moved += 1
            if moved:
                self._set_tree(tree)
        self._uncovered, self._uncovered_resid = {}, {}
        self._just_moved = just_moved
        return moved

    # --- tree fitting ----------------------------------------------------------------------
    # A fixed tree says nothing about which learned feature lands in which slot. Trained
    # ungated, every level learns features on its own (each with its own sparsity budget and
    # prefix loss, as in a Matryoshka SAE); then each child slot is moved under the parent
    # slot it co-fires with most (P(parent on | child on)), each parent taking exactly b
    # children, and the gate is switched on.

    @torch.no_grad()
    def _count_cofiring(self, acts: torch.Tensor) -> None:
        on = (acts.reshape(-1, acts.shape[-1]) > 0).float()
        for level in range(1, self.n_levels):
            child = on[:, self.level_slices[level]]
            parent = on[:, self.level_slices[level - 1]]
            co = child.T @ parent
            if level in self._cofire:  # (counts loaded from a checkpoint may sit on the CPU)
                self._cofire[level] = self._cofire[level].to(co.device) + co
                self._fire[level] = self._fire[level].to(co.device) + child.sum(0)
            else:
                self._cofire[level], self._fire[level] = co, child.sum(0)

    @torch.no_grad()
    def fit_tree(self) -> None:
        """Re-seat child slots under the parents they co-fire with, top-down; gate from now on."""
        for level in range(1, self.n_levels):
            if level not in self._cofire:
                continue  # no statistics (e.g. resumed after the window): keep the layout
            score = self._cofire[level] / self._fire[level].clamp(min=1).unsqueeze(-1)
            perm = capacity_assign(score, self.cfg.branching[level - 1])
            self._permute_level(level, perm)
            if level + 1 in self._cofire:  # the next level's parents just moved
                self._cofire[level + 1] = self._cofire[level + 1][:, perm]
        self._cofire, self._fire = {}, {}
        self.tree_fitted.fill_(True)

    @torch.no_grad()
    def _permute_level(self, level: int, perm: torch.Tensor) -> None:
        sl = self.level_slices[level]
        self.b_enc.data[sl] = self.b_enc.data[sl][perm]
        rows = self.level_W_dec(level)[perm]
        cols = self.level_W_enc(level)[:, perm]
        if self.cfg.projection_rank is None:
            self.W_dec.data[sl] = rows
            self.W_enc.data[:, sl] = cols
            return
        # Each parent's subspace is re-fitted to the children it now owns (exact when
        # rank >= branching, the best rank-r fit otherwise).
        b = self.cfg.branching[level - 1]
        r = self.cfg.projection_rank
        for kind, vecs in (("dec", rows.unflatten(0, (-1, b))), ("enc", cols.T.unflatten(0, (-1, b)))):
            basis, codes = _fit_subspaces(vecs, r)  # [n_par, r, d], [n_par, b, r]
            codes = codes / code_multiplier(self.cfg)
            if kind == "dec":
                getattr(self, f"dec_basis_l{level}").data.copy_(basis)
                getattr(self, f"dec_codes_l{level}").data.copy_(codes)
            else:
                getattr(self, f"enc_basis_l{level}").data.copy_(basis.transpose(1, 2))
                getattr(self, f"enc_codes_l{level}").data.copy_(codes.transpose(1, 2))

    # --- folding and saving --------------------------------------------------------------
    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        # Training activations are already in unit-decoder units, so folding the norms into
        # the encoder changes nothing the model computes.
        norms = self.get_W_dec_norm()
        self._scale_latents_(norms, 1.0 / norms)
        self.b_enc.data *= norms

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        self._scale_input_space_(scaling_factor)
        # Thresholds live in unit-decoder units, which shrink with the decoder by 1/s.
        self.topk_threshold /= scaling_factor
        self.cfg.normalize_activations = "none"

    @override
    @torch.no_grad()
    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("covariance_whitening is not supported by hierarchical SAEs yet")

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        _training_to_inference_state(state_dict, self.cfg)

    def _step(self, label: int) -> int:
        """This step's index: SAELens's label, corrected once after loading a checkpoint.

        SAELens (6.54) saves its step counter in a checkpoint before incrementing it, so a
        resumed run labels each step one lower than the uninterrupted run did. A checkpoint
        also records the steps this SAE completed; the first step after loading it derives
        the offset, so tree fitting happens at the same step with or without a resume.
        """
        if self._loaded_steps is not None:
            self._step_offset = self._loaded_steps - label
            self._loaded_steps = None
        return label + self._step_offset

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        state_dict["_train_steps"] = torch.tensor(self._steps_done, dtype=torch.long)
        if self.cfg.free_budget_rate > 0:
            state_dict["_budget"] = torch.tensor(self._k, dtype=torch.double)
        # A checkpoint taken inside the tree-fit counting window keeps the counts, so a run
        # resumed from it fits the same tree as an uninterrupted one.
        for level, co in self._cofire.items():
            state_dict[f"_cofire_l{level}"] = co.detach().clone()
            state_dict[f"_fire_l{level}"] = self._fire[level].detach().clone()

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        cofire, fire, steps, budget = _pop_checkpoint_extras(state_dict)
        upgrade_legacy_state(state_dict, self.cfg)
        _load_tree(self, state_dict)
        if cofire:
            self._cofire, self._fire = cofire, fire
        if steps is not None:
            self._loaded_steps = steps
        if budget is not None:
            self._k = [float(k) for k in budget.tolist()]
        # An inference directory (folded, per-latent thresholds) loads as a training SAE.
        state_dict.setdefault("tree_fitted", torch.tensor(True))
        if "threshold" in state_dict and "topk_threshold" not in state_dict:
            thr = state_dict.pop("threshold")
            if tuple(thr.shape) != (self.cfg.d_sae,):
                raise HierarchicalSAELoadError(
                    f"sae_weights.safetensors: tensor 'threshold' has shape {list(thr.shape)} "
                    f"but cfg.json (d_sae={self.cfg.d_sae}) implies [{self.cfg.d_sae}]"
                )
            groups = self.level_slices + ([self.free_slice] if self.cfg.n_free else [])
            state_dict["topk_threshold"] = torch.stack([thr[sl.start] for sl in groups]).double()
        check_loaded_state(self, state_dict)
        _accept_tree(self, state_dict)

    @override
    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        hists = super().log_histograms()
        norms = self.W_dec.detach().float().norm(dim=1)
        for level, sl in enumerate(self.level_slices):
            hists[f"weights/W_dec_norms_level_{level}"] = norms[sl].cpu().numpy()
        if self.cfg.n_free:
            hists["weights/W_dec_norms_free"] = norms[self.free_slice].cpu().numpy()
        return hists


def _non_finite_message(x: torch.Tensor, losses: dict[str, torch.Tensor], total: torch.Tensor,
                        step: int) -> str:
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.reshape(-1, x.shape[-1]).any(-1)
        return (
            f"HierarchicalTrainingSAE: training step {step}: the activation batch holds "
            f"{int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} inf values "
            f"({int(rows.sum())} of {rows.numel()} activation vectors); the step is refused "
            "before it reaches the weights. Check the model's dtype (fp16 overflow) and the "
            "hook, or filter the activations; a run with n_checkpoints > 0 can be resumed "
            "with resume_from_checkpoint."
        )
    names = [name for name, value in losses.items() if not bool(torch.isfinite(value))]
    return (
        f"HierarchicalTrainingSAE: training step {step}: the loss is {float(total.detach())} "
        f"(non-finite terms: {', '.join(names) or 'their sum overflowed'}) although the "
        "activations are finite; the step is refused before it reaches the weights. Lower "
        "lr or the loss coefficients, or check the activations' scale."
    )


def capacity_assign(score: torch.Tensor, b: int) -> torch.Tensor:
    """Give each parent exactly b children, maximising the summed child->parent score.

    score: [n_child, n_parent] with n_child = b * n_parent. Returns `perm` such that child
    slot perm[i] moves to position i, i.e. parent i // b gets children perm[i*b:(i+1)*b].
    Small problems are solved exactly (Hungarian, scipy); large ones greedily, best first.
    """
    n_child, n_par = score.shape
    if n_child != b * n_par:
        raise ValueError(f"capacity_assign: {n_child} children cannot fill {n_par} parents x {b}")
    s = score.detach().double().cpu()
    if n_child <= 1024:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(s.repeat_interleave(b, dim=1).numpy(), maximize=True)
        parent_of = torch.as_tensor(cols // b)[torch.as_tensor(rows).argsort()]
    else:
        parent_of = torch.full((n_child,), -1, dtype=torch.long)
        room = torch.full((n_par,), b, dtype=torch.long)
        for c in s.max(1).values.argsort(descending=True).tolist():
            row = s[c].masked_fill(room == 0, -float("inf"))
            p = int(row.argmax())
            parent_of[c] = p
            room[p] -= 1
    # stable sort by parent keeps each sibling group contiguous
    return torch.sort(parent_of, stable=True).indices.to(score.device)


def _fit_subspaces(vecs: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis [n, r, d] and codes [n, b, r] with codes @ basis ~= vecs [n, b, d]."""
    n, b, d = vecs.shape
    v = vecs.float()
    if r >= b:
        # Any completion of the basis is valid; a fixed generator keeps it independent of the
        # global RNG, so a resumed run fits exactly the tree an uninterrupted one does.
        pad = torch.randn(n, d, r - b, generator=torch.Generator().manual_seed(0)).to(v.device)
        q = torch.linalg.qr(torch.cat([v.transpose(1, 2), pad], dim=2)).Q  # [n, d, r]
        basis = q.transpose(1, 2)
    else:
        basis = torch.linalg.svd(v, full_matrices=False).Vh[:, :r]  # [n, r, d]
    codes = v @ basis.transpose(1, 2)
    return basis.to(vecs.dtype), codes.to(vecs.dtype)


def default_parent_index(cfg: _TreeFields) -> torch.Tensor:
    """LongTensor [d_sae]: the fixed layout's parents (children contiguous, b per parent;
    free latents, after the leaves, have none)."""
    parts = [torch.full((cfg.level_widths[0],), -1, dtype=torch.long)]
    for level in range(1, cfg.n_levels):
        start = cfg.level_slices[level - 1].start
        parts.append(start + torch.arange(cfg.level_widths[level]) // cfg.branching[level - 1])
    parts.append(torch.full((cfg.n_free,), -1, dtype=torch.long))
    return torch.cat(parts)


def _pool_children(child: torch.Tensor, parents: torch.Tensor, n_par: int) -> torch.Tensor:
    """Sum each parent's children: child [..., n_l], parents Long[n_l] -> [..., n_par]."""
    out = child.new_zeros(*child.shape[:-1], n_par)
    return out.index_add(-1, parents, child)


def level_kl(acts: torch.Tensor | list[torch.Tensor], cfg: _TreeFields, eps: float = 1e-6,
             parents: list[torch.Tensor] | None = None) -> torch.Tensor:
    """KL(pi_l || pooled children) summed over parent levels, averaged over counted tokens.

    acts ([..., d_sae], or one tensor per level) are in unit-decoder units, so they are the
    activation mass a_j * ||W_dec[j]||. pi_l is each token's distribution of mass over
    level l; the pooled distribution puts the mass of level l+1 on its parents. Tokens with
    no mass on either side are skipped. `parents` (per child level, each child's parent
    within the level above) is needed once children were re-seated; None = the fixed layout.
    """
    if isinstance(acts, torch.Tensor):
        acts = list(acts[..., : cfg.tree_size].split(cfg.level_widths, dim=-1))
    levels = [a.reshape(-1, a.shape[-1]) for a in acts]
    total = levels[0].new_zeros(())
    for level in range(cfg.n_levels - 1):
        b = cfg.branching[level]
        parent_mass = levels[level]
        pooled = (levels[level + 1].unflatten(-1, (-1, b)).sum(-1) if parents is None
                  else _pool_children(levels[level + 1], parents[level], parent_mass.shape[-1]))
        ps, qs = parent_mass.sum(-1, keepdim=True), pooled.sum(-1, keepdim=True)
        # Mask rather than gather the counted tokens: no data-dependent shapes, no host sync.
        keep = ((ps > 0) & (qs > 0)).squeeze(-1).to(parent_mass.dtype)
        n = parent_mass.shape[-1]
        p = (parent_mass / ps.clamp(min=1e-30) + eps) / (1 + eps * n)
        q = (pooled / qs.clamp(min=1e-30) + eps) / (1 + eps * n)
        kl = (p * (p.log() - q.log())).sum(-1)
        total = total + (kl * keep).sum() / keep.sum().clamp(min=1)
    return total
