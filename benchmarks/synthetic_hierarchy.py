"""Ground-truth benchmark: do SAEs recover a known 3-level hierarchy? (DESIGN.md §3-4)

Data: SAELens's synthetic model with a 3-level forest (mutually exclusive siblings, Zipfian
firing, superposition: features > d) plus features outside any tree. Contestants, at the
same width and matched L0, all trained through SAELens's `SyntheticSAERunner`:
hierarchical, batchtopk, matryoshka_batchtopk, topk, standard. Metrics come from
`sae_lens_hierarchical.metrics` and SAELens's synthetic eval.

    python benchmarks/synthetic_hierarchy.py --profile quick      # CI smoke test (~1 min)
    python benchmarks/synthetic_hierarchy.py --profile default    # CPU, < 30 min on 2 cores
    python benchmarks/synthetic_hierarchy.py --profile gpu        # SynthSAEBench-16k, GPU

On a lent GPU (10-minute commands, 15 minutes in all) run one seed per command, e.g.
    python benchmarks/synthetic_hierarchy.py --profile gpu --seeds 0 --jobs 1 \
        --contestants hierarchical batchtopk matryoshka_batchtopk --tag seed0
and merge the seeds afterwards (`--merge results/synthetic_gpu_seed0.json ... --tag merged`).
The world is built from SynthSAEBench-16k's published config (no Hub access needed); its
orthogonalisation takes about an hour on a CPU, so it is built once and kept in
benchmarks/.worlds/ (--world-cache). On a CPU, `--profile anchor4k` runs the same generator
at a quarter of the size (about 13 minutes per run on one core).

Writes benchmarks/results/synthetic_<profile>.{json,md} and an EV-vs-L0 PNG.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from sae_lens import LoggingConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from sae_lens.synthetic import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig
from sae_lens_hierarchical import metrics as M

RESULTS = Path(__file__).parent / "results"
WORLDS = Path(__file__).parent / ".worlds"
"""Where SynthSAEBench-style worlds are kept once built (git-ignored; --world-cache)."""
CONTESTANTS = ["hierarchical", "batchtopk", "matryoshka_batchtopk", "topk", "standard"]


@dataclass
class Profile:
    n_roots: int
    branching: int
    n_free: int
    hidden_dim: int
    training_samples: int
    seeds: list[int]
    shapes: list[str]
    l0_factors: list[float]
    eval_samples: int = 20_000
    batch_size: int = 1024
    lr: float = 3e-3
    min_prob: float = 0.005
    max_prob: float = 0.3
    device: str = "cpu"
    hsae: dict[str, Any] = field(default_factory=dict)
    depth: int = 2
    """Levels below the truth's roots (the HSAE always has 3 levels)."""
    world: str = "simple"
    """"simple" (this file's small forest, one per seed) or "synthsaebench" (SynthSAEBench-16k's
    generator at n_roots x 85 tree features + n_free, hidden_dim; one world, seed 42)."""
    hsae_widths: list[int] | None = None
    """The HSAE's tree at shape `match`, when it is not the truth's top three levels."""
    flat_width: int | None = None
    """Width of the flat contestants, when it is not the HSAE's."""
    l0: float | None = None
    """Fixed L0 target (times the L0 factor) instead of the truth's L0 over the top 3 levels."""
    world_cache: Path | None = WORLDS
    """Directory the "synthsaebench" world is saved to and loaded from (None: build every run)."""


# The HSAE's free latents (outside its tree, fitted to what the tree leaves) and their share of
# the L0; every contestant's width includes them. 48 for the default's 168-latent tree and 11%
# of the L0 were measured best for explained variance on the three tree shapes (n_free 24 at
# 6% keeps more F1 and less EV; 64 at 11% and 48 at 15% did no better); see the README.
# 11% is where the budget starts: free_budget_rate moves it between the levels below the
# roots and the free latents during training (more to the free latents when the tree's
# shape is wrong: 3 seeds, EV wider 0.856 -> 0.880, narrower 0.832 -> 0.862).
FREE_LATENTS = {"n_free": 48, "free_l0_share": 0.11, "free_budget_rate": 0.002}

PROFILES = {
    "quick": Profile(n_roots=4, branching=3, n_free=8, hidden_dim=24, training_samples=40_000,
                     seeds=[0], shapes=["match"], l0_factors=[1.0], eval_samples=5_000,
                     hsae=dict(FREE_LATENTS, n_free=12)),
    # 1M samples (977 steps): at 500k every contestant was still improving fast, and the
    # HSAE's re-seating (every 100 steps) needs steps after each move (wider tree, seed 0:
    # F1 0.27 at 500k, 0.36 at 1M, 0.41 at 2M; without re-seating 0.36 at 2M).
    "default": Profile(n_roots=8, branching=4, n_free=24, hidden_dim=32, training_samples=1_000_000,
                       seeds=[0, 1, 2], shapes=["match", "wider", "narrower"],
                       l0_factors=[0.67, 1.0, 1.5], hsae=dict(FREE_LATENTS, reseat_every=100)),
    # The bench config's problem (16 x 4 x 4 + 48 free features in 64 dims), 1M samples.
    "large": Profile(n_roots=16, branching=4, n_free=48, hidden_dim=64, training_samples=1_000_000,
                     seeds=[0, 1, 2], shapes=["match"], l0_factors=[1.0], hsae=dict(FREE_LATENTS, n_free=96)),
    # SynthSAEBench-16k (Chanin & Garriga-Alonso 2026), built offline from its published
    # config (SAELens docs, synth_sae_bench.md): 16,384 features, d=768, 128 roots x 4, depth 3
    # (so 4 true levels), mutually exclusive children scaled by their parent, low-rank
    # correlations. Flat SAEs at the published width 4096 and L0 25; the HSAE at the same
    # width and L0, set as measured best on `anchor4k` below: the truth's top three levels as
    # its tree (128 x 4 x 4 = 2,688 latents), the rest of the width as free latents (1,408)
    # at the truth's share of L0 outside those levels (34%: 4.6 outside any tree + 7.2 at the
    # fourth level, of 34.8), re-seating every 100 steps. The paper trains 200M samples; the
    # default here is 20M (a GPU session's budget), with every contestant at that budget
    # (override with --samples).
    "gpu": Profile(n_roots=128, branching=4, n_free=16_384 - 128 * 85, hidden_dim=768,
                   training_samples=20_000_000, seeds=[0, 1, 2], shapes=["match"],
                   l0_factors=[1.0], eval_samples=200_000, batch_size=1024, lr=3e-4,
                   min_prob=5e-4, max_prob=0.4, device="cuda", depth=3, world="synthsaebench",
                   flat_width=4096, l0=25.0,
                   hsae={"n_free": 1408, "free_l0_share": 0.34, "free_budget_rate": 0.002, "reseat_every": 100}),
    # SynthSAEBench-16k's generator at a quarter of its size, for a CPU: 32 roots x 85 tree
    # features + 1,376 outside any tree = 4,096 features in d=192 (the same 21x
    # superposition), every SAE at a quarter of the width (1,024) and the anchor's L0 ratio
    # (25 against the truth's 34.8 there; 11.5 against 16.0 here). 2M samples; about 0.35 s
    # per step on one core, mostly sampling. The HSAE: the truth's top tree 32 x 4 x 4 + 352
    # free latents at 31% of the L0 (the truth's share outside those levels), re-seating
    # every 100 steps. Measured (3 seeds, synthetic_anchor4k.md, `truetree_reseat`) against a
    # 40 x 4 x 4 tree + 184 free at 11% without re-seating: EV 0.622 -> 0.647 (BatchTopK
    # 0.655), F1 0.232 -> 0.255, dead latents 303 -> 121.
    "anchor4k": Profile(n_roots=32, branching=4, n_free=4_096 - 32 * 85, hidden_dim=192,
                        training_samples=2_000_000, seeds=[0, 1, 2], shapes=["match"],
                        l0_factors=[1.0], eval_samples=50_000, batch_size=1024, lr=3e-4,
                        min_prob=5e-4, max_prob=0.4, depth=3, world="synthsaebench",
                        flat_width=1024, l0=11.5,
                        hsae={"n_free": 352, "free_l0_share": 0.31, "free_budget_rate": 0.002,
                              "reseat_every": 100}),
}


def tree_widths(n_roots: int, branching: list[int]) -> list[int]:
    widths = [n_roots]
    for b in branching:
        widths.append(widths[-1] * b)
    return widths


def sae_shape(p: Profile, shape: str) -> list[int]:
    """The SAE's tree: the truth's shape, wider (more roots) or narrower (less branching)."""
    if shape == "match" and p.hsae_widths:
        return list(p.hsae_widths)
    if shape == "match":
        return tree_widths(p.n_roots, [p.branching, p.branching])
    if shape == "wider":
        return tree_widths(p.n_roots * 3 // 2, [p.branching, p.branching])
    if shape == "narrower":
        return tree_widths(p.n_roots, [max(p.branching - 1, 1)] * 2)
    raise ValueError(f"shape={shape!r}; allowed: match, wider, narrower")


def synthetic_model_cfg(p: Profile, seed: int) -> SyntheticModelConfig:
    if p.world == "synthsaebench":
        # The published model's generator (seed 42 for every SAE seed: one benchmark world);
        # at n_roots=128, n_free=5504, hidden_dim=768 it is SynthSAEBench-16k itself.
        return SyntheticModelConfig(
            num_features=p.n_roots * sum(p.branching ** i for i in range(p.depth + 1)) + p.n_free,
            hidden_dim=p.hidden_dim,
            firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
            hierarchy=HierarchyConfig(total_root_nodes=p.n_roots, branching_factor=p.branching,
                                      max_depth=p.depth, mutually_exclusive_portion=1.0,
                                      mutually_exclusive_min_depth=0,
                                      compensate_probabilities=True, scale_children_by_parent=True),
            orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
            correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
            mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
            std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
            bias=0.5, seed=42,
        )
    n_tree = sum(tree_widths(p.n_roots, [p.branching] * p.depth))
    return SyntheticModelConfig(
        num_features=n_tree + p.n_free, hidden_dim=p.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=p.max_prob, min_prob=p.min_prob),
        hierarchy=HierarchyConfig(total_root_nodes=p.n_roots, branching_factor=p.branching, max_depth=p.depth,
                                  mutually_exclusive_portion=1.0, compensate_probabilities=True),
        orthogonalization=OrthogonalizationConfig(num_steps=100),
        std_firing_magnitudes=0.1, mean_firing_magnitudes=1.0, bias=False, seed=seed,
    )


def build_world(p: Profile, seed: int) -> SyntheticModel:
    """The synthetic model for this profile and seed.

    A "synthsaebench" world is built once and then loaded from `p.world_cache` (SAELens's own
    SyntheticModel.save / load_from_disk), keyed by its config and the SAELens version: its
    orthogonalisation takes about an hour on a CPU for the 16k world, and every run and
    every one-seed GPU command would otherwise repeat it. Small "simple" worlds are rebuilt."""
    smc = synthetic_model_cfg(p, seed)
    if p.world != "synthsaebench" or p.world_cache is None:
        return SyntheticModel(smc, device=p.device)
    import hashlib
    import os
    import shutil

    import sae_lens

    key = json.dumps(smc.to_dict(), sort_keys=True, default=str) + sae_lens.__version__
    path = Path(p.world_cache) / f"{p.world}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if path.is_dir():
        return SyntheticModel.load_from_disk(path, device=p.device)
    synth = SyntheticModel(smc, device=p.device)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    synth.save(tmp)
    try:  # a rename, so a run killed mid-save never leaves a half world behind
        os.replace(tmp, path)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return synth


def level_budgets(level_l0: list[float], total: float) -> list[float]:
    """The HSAE's k per level for a total budget, from the truth's per-level L0.

    At or above the truth's total, in proportion to it. Below, deeper levels are cut more
    (level l keeps level_l0[l] * f**((l + 1) / 2), f = total / sum(level_l0), rescaled to the
    total): a child can only fire under its parent, so budget cut from the roots is lost
    for every level below. Measured at 0.67x the true L0 (one seed): EV 0.736 -> 0.795
    (BatchTopK 0.817)."""
    f = total / sum(level_l0)
    w = [x * (f ** ((lv + 1) / 2) if f < 1 else 1.0) for lv, x in enumerate(level_l0)]
    return [x * total / sum(w) for x in w]


def sae_cfg(contestant: str, widths: list[int], l0: float, level_l0: list[float], d: int, hsae: dict[str, Any],
            flat_width: int | None = None):
    """The contestant's SAELens training config at total width sum(widths) + n_free (flat
    contestants: flat_width if given) and L0 ~ l0.

    `hsae` holds hierarchical config fields plus benchmark keys: `n_free` (the HSAE's free
    latents, which every contestant's width includes), `free_l0_share` (the part of l0 given
    to them; the tree's levels share the rest in proportion to level_l0) and `oracle_init`
    (read by run_one).
    """
    hsae = dict(hsae)
    hsae.pop("oracle_init", None)  # an initialisation (run_one), not a config field
    widths = list(hsae.pop("level_widths", widths))  # an ablation's own tree
    n_free, share = int(hsae.pop("n_free", 0)), float(hsae.pop("free_l0_share", 0.0))
    if not n_free:
        hsae.pop("free_budget_rate", None)  # it moves budget to free latents: none here
    total = sum(widths) + n_free
    d_sae = total if contestant == "hierarchical" else (flat_width or total)
    cls = get_sae_training_class(contestant)[1]
    if contestant == "hierarchical":
        tree_l0 = l0 * (1 - share) if n_free else l0
        k = [max(0.5, round(x, 2)) for x in level_budgets(level_l0, tree_l0)]
        k = [min(kk, w) for kk, w in zip(k, widths)]
        kw = dict(level_widths=widths, k_per_level=k, allow_nonincreasing_sparsity=True)
        if n_free:
            kw.update(n_free=n_free, k_free=min(float(n_free), max(0.05, round(l0 - sum(k), 2))))
        kw.update(hsae)
        return cls(d_in=d, d_sae=d_sae, **kw)
    if contestant == "batchtopk":
        return cls(d_in=d, d_sae=d_sae, k=l0)
    if contestant == "matryoshka_batchtopk":
        # Nested like the HSAE: roots, + level 1, ..., then the rest (its free latents).
        cum = [sum(widths[: i + 1]) for i in range(len(widths))]
        if cum[-1] != d_sae:
            cum.append(d_sae)
        return cls(d_in=d, d_sae=d_sae, k=l0, matryoshka_widths=cum)
    if contestant == "topk":
        return cls(d_in=d, d_sae=d_sae, k=max(1, round(l0)))
    if contestant == "standard":
        # L1 does not fix L0; this coefficient lands near the target L0 on this data.
        return cls(d_in=d, d_sae=d_sae, l1_coefficient=1.5 / max(l0, 1.0))
    raise ValueError(f"contestant={contestant!r}; allowed: {', '.join(CONTESTANTS)}")


def ground_truth_levels(gt_parent: torch.Tensor) -> torch.Tensor:
    """Depth of each true feature; -1 for features outside any tree (no parent, no children)."""
    levels = M.tree_levels(gt_parent)
    has_child = torch.zeros_like(gt_parent, dtype=torch.bool)
    has_child[gt_parent[gt_parent >= 0]] = True
    levels[(gt_parent < 0) & ~has_child] = -1
    return levels


def true_level_l0(synth: SyntheticModel, levels: torch.Tensor, n: int = 20_000) -> list[float]:
    _, feats = synth.sample_with_features(n)
    on = (feats > 0).float()
    return [on[:, levels == lv].sum(-1).mean().item() for lv in range(int(levels.max()) + 1)]


def step_cost(sae, d: int, batch: int, device: str, n: int = 20, dead_frac: float = 0.0) -> dict[str, float]:
    """Seconds per SAE training step (forward, backward, Adam) on a fixed batch, and peak memory.

    dead_frac: the share of latents marked dead (the same seeded choice for every contestant
    of a width), so the aux-k loss that revives them is part of the step, as in training."""
    sae = copy.deepcopy(sae).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d, device=device)
    g = torch.Generator().manual_seed(0)
    dead = (torch.rand(sae.cfg.d_sae, generator=g) < dead_frac).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def one() -> None:
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 1.0},
                                                       dead_neuron_mask=dead, n_training_steps=0,
                                                       is_logging_step=False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    for _ in range(3):
        one()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        one()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out = {"sec_per_step": (time.perf_counter() - t) / n}
    if device.startswith("cuda"):
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        # Parameters + Adam moments + gradients: the part that differs between contestants.
        out["peak_mem_mb"] = 4 * sum(p.numel() * p.element_size() for p in sae.parameters()) / 2**20
    return out


def evaluate(sae, synth: SyntheticModel, gt_parent: torch.Tensor, gt_levels: torch.Tensor,
             n: int, device: str) -> dict[str, Any]:
    """Tree metrics on held-out samples: native tree for HSAEs, post-hoc tree for flat SAEs."""
    sae.eval()
    with torch.no_grad():
        x, feats = synth.sample_with_features(n)
        acts = torch.cat([sae.encode(xb.to(device)) for xb in x.split(4096)]).cpu()
        W_dec = sae.W_dec.detach().float().cpu()
    native = hasattr(sae, "parent_index")
    parent = sae.parent_index.cpu() if native else M.posthoc_tree(acts)
    latent_for_feature, cos = M.match_latents_to_features(W_dec, synth.feature_dict.feature_vectors.detach().float().cpu())
    tree = gt_levels >= 0
    cons = M.hierarchical_consistency(acts, parent)
    plm = M.per_level_mcc(W_dec, synth.feature_dict.feature_vectors.detach().float().cpu(), gt_levels)
    return {
        "edge_recall": M.edge_recall(gt_parent, parent, latent_for_feature),
        "edge_recall_ancestor": M.edge_recall(gt_parent, parent, latent_for_feature, allow_ancestor=True),
        "absorption_gap": M.mean_absorption_gap(acts, feats, gt_parent, latent_for_feature),
        "hcs": cons["hcs"],
        "necessity": cons["necessity"],
        "coverage": cons["coverage"],
        "mcc_tree_features": cos[tree].mean().item(),
        **{f"mcc_level_{k}": v for k, v in plm.items() if k != "all"},
    }


def run_one(p: Profile, contestant: str, shape: str, seed: int, l0_factor: float,
            label: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one contestant; `label`/`overrides` make an ablation of the hierarchical SAE."""
    torch.manual_seed(seed)
    synth = build_world(p, seed)
    smc = synth.cfg
    gt_parent = M.parent_index_from_hierarchy(synth.hierarchy.roots, smc.num_features)
    gt_levels = ground_truth_levels(gt_parent)
    # The HSAE's per-level budgets follow the truth's top three levels; deeper true levels
    # (SynthSAEBench has four) are left to the leaves' budget via the total.
    level_l0 = true_level_l0(synth, gt_levels)[:3]
    widths = sae_shape(p, shape)
    l0 = (p.l0 if p.l0 is not None else sum(level_l0)) * l0_factor
    overrides = dict(overrides or {})
    oracle = bool(overrides.pop("oracle_init", False))
    cfg = sae_cfg(contestant, widths, l0, level_l0, p.hidden_dim, {**p.hsae, **overrides},
                  flat_width=p.flat_width)
    runner_cfg = SyntheticSAERunnerConfig(
        synthetic_model=smc, sae=cfg, training_samples=p.training_samples, batch_size=p.batch_size,
        lr=p.lr, device=p.device, eval_samples=p.eval_samples, checkpoint_path=None, output_path=None,
        logger=LoggingConfig(log_to_wandb=False), dead_feature_window=200,
    )
    torch.manual_seed(seed)
    sae = None
    if oracle:
        if contestant != "hierarchical":
            raise ValueError(f"oracle_init is for the hierarchical SAE, not {contestant!r}")
        sae = get_sae_training_class(contestant)[0](cfg).to(p.device)
        oracle_init_(sae, synth, gt_parent, gt_levels)
    t = time.perf_counter()
    res = SyntheticSAERunner(runner_cfg, override_synthetic_model=synth, override_sae=sae).run()
    train_s = time.perf_counter() - t
    fe = res.final_eval
    row = {
        "contestant": label or contestant, "shape": shape, "seed": seed, "l0_factor": l0_factor,
        "d_sae": cfg.d_sae, "widths": widths, "target_l0": l0, "true_l0": fe.true_l0,
        "l0": fe.sae_l0, "explained_variance": fe.explained_variance, "mcc": fe.mcc,
        "f1": fe.classification.f1_score, "dead": fe.dead_latents, "train_seconds": train_s,
    }
    row.update(evaluate(res.sae, synth, gt_parent, gt_levels, p.eval_samples, p.device))
    return row


@torch.no_grad()
def oracle_init_(sae, synth: SyntheticModel, gt_parent: torch.Tensor, gt_levels: torch.Tensor) -> None:
    """Start an HSAE at the truth's own tree (a diagnostic, not a method): each root slot takes
    a true root (most frequent first; spare root slots and the free latents take the most
    frequent features outside any tree), each slot's children the true children of its
    feature, most frequent first, as many as its branching holds; slots left over keep their
    random init. Whether training from here beats training from scratch separates a tree
    shape the HSAE cannot fit (capacity) from one it fails to find (optimisation)."""
    V = synth.feature_dict.feature_vectors.detach().float()
    V = (V / V.norm(dim=-1, keepdim=True)).to(sae.W_dec.device, sae.W_dec.dtype)
    _, feats = synth.sample_with_features(20_000)
    freq = (feats > 0).float().mean(0).cpu()
    by_freq = lambda idx: sorted(idx, key=lambda f: -float(freq[f]))  # noqa: E731
    cfg = sae.cfg
    free_feats = by_freq((gt_levels == -1).nonzero().flatten().tolist())
    roots = by_freq((gt_levels == 0).nonzero().flatten().tolist())
    spare = cfg.level_widths[0] - len(roots)
    slot_feature = dict(enumerate((roots + free_feats[:max(spare, 0)])[: cfg.level_widths[0]]))
    free_feats = free_feats[max(spare, 0):]
    queue = list(slot_feature.items())
    while queue:
        slot, f = queue.pop(0)
        for child_slot, child_f in zip(sae.tree_children(slot), by_freq((gt_parent == f).nonzero().flatten().tolist())):
            slot_feature[child_slot] = child_f
            queue.append((child_slot, child_f))
    for j, f in zip(range(cfg.tree_size, cfg.d_sae), free_feats):
        slot_feature[j] = f
    slots = torch.tensor(list(slot_feature), device=V.device)
    rows = V[torch.tensor(list(slot_feature.values()), device=V.device)]
    sae.W_dec.data[slots] = rows * sae.W_dec.data[slots].norm(dim=-1, keepdim=True)
    sae.W_enc.data[:, slots] = rows.T


def _worker(args: tuple) -> dict[str, Any]:
    # One thread per run: two runs on two cores beat two runs fighting over both.
    torch.set_num_threads(1)
    return run_one(*args)


# A realistic width for the step-cost comparison: GPT-2-small's d_in and about 5k latents
# (the benchmark's own SAEs are so small that per-op overhead dominates their step); free
# latents at the bench configs' 20% of the width and ~10% of the L0.
DEAD_FRAC = 0.2
"""Share of latents marked dead in the realistic-width step cost's second measurement."""

WIDE_STEP = dict(d=768, widths=[192, 768, 3072], level_l0=[4.0, 8.0, 12.0], batch=1024,
                 n_free=1008, free_l0_share=0.1)


def step_costs(p: Profile, contestants: list[str], ablations: dict[str, dict[str, Any]] | None = None,
               rounds: int = 5, wide: bool = False) -> dict[str, dict[str, float]]:
    """Seconds per training step of each contestant, measured side by side in one process.

    Freshly initialised SAEs of the benchmark's configs (the dense compute does not depend
    on the weights); contestants are interleaved round-robin and the minimum over rounds is
    kept, so load from other processes inflates every contestant alike or not at all.
    """
    widths, level_l0, d, batch, n = sae_shape(p, "match"), [1.0, 1.5, 2.0], p.hidden_dim, p.batch_size, 10
    if p.l0 is not None:
        level_l0 = [x * p.l0 / sum(level_l0) for x in level_l0]
    hsae = dict(p.hsae)
    if wide:
        widths, level_l0, d, batch, n = WIDE_STEP["widths"], WIDE_STEP["level_l0"], WIDE_STEP["d"], WIDE_STEP["batch"], 3
        hsae.update(n_free=WIDE_STEP["n_free"], free_l0_share=WIDE_STEP["free_l0_share"])
    saes = {}
    named = [(c, c, {}) for c in contestants] + [(lab, "hierarchical", ov) for lab, ov in (ablations or {}).items()]
    for label, c, ov in named:
        cfg = sae_cfg(c, widths, sum(level_l0), level_l0, d, {**hsae, **ov},
                      flat_width=None if wide else p.flat_width)
        cfg.device = p.device
        saes[label] = get_sae_training_class(c)[0](cfg).to(p.device)
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for c, sae in saes.items():
            m = step_cost(sae, d, batch, p.device, n=n)
            if wide:  # also with a fifth of the latents dead: aux-k runs, as in training
                m["sec_per_step_dead"] = step_cost(sae, d, batch, p.device, n=n, dead_frac=DEAD_FRAC)["sec_per_step"]
            prev = best.get(c)
            if prev is None:
                best[c] = m
            else:
                for key in ("sec_per_step", "sec_per_step_dead"):
                    if key in m:
                        prev[key] = min(prev[key], m[key])
    for key, ratio in (("sec_per_step", "step_ratio_vs_batchtopk"), ("sec_per_step_dead", "step_ratio_dead_vs_batchtopk")):
        base = best.get("batchtopk", {}).get(key)
        for m in best.values():
            if key in m:
                m[ratio] = m[key] / base if base else float("nan")
    return best


# ------------------------------------------------------------------------- reporting

TABLE_COLS = ["f1", "mcc", "edge_recall", "absorption_gap", "explained_variance", "l0", "dead",
              "hcs", "mcc_level_0", "mcc_level_1", "mcc_level_2", "step_ratio_vs_batchtopk", "peak_mem_mb"]


def _fmt(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:.3g}"
    return f"{m:.3g} ± {statistics.stdev(vals):.2g}"


def summarise(rows: list[dict[str, Any]]) -> str:
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for factor in sorted({r["l0_factor"] for r in rows if r["shape"] == shape}):
            sel = [r for r in rows if r["shape"] == shape and r["l0_factor"] == factor]
            lines.append(f"\n### shape `{shape}`, L0 factor {factor} (widths {sel[0]['widths']})\n")
            lines.append("| contestant | " + " | ".join(TABLE_COLS) + " |")
            lines.append("|---" * (len(TABLE_COLS) + 1) + "|")
            for c in dict.fromkeys(r["contestant"] for r in sel):
                rs = [r for r in sel if r["contestant"] == c]
                lines.append(f"| {c} (n={len(rs)}) | " + " | ".join(_fmt([r.get(k) for r in rs]) for k in TABLE_COLS) + " |")
    return "\n".join(lines)


def _wide_table(meta: dict[str, Any]) -> str:
    costs, shape = meta.get("step_cost_wide"), meta.get("step_cost_wide_shape")
    if not costs:
        return ""
    n_free = shape.get("n_free", 0)
    lines = [f"\n### Step cost at a realistic width (d_in {shape['d']}, tree {shape['widths']} = "
             f"{sum(shape['widths'])} latents" + (f" + {n_free} free" if n_free else "")
             + f", every contestant {sum(shape['widths']) + n_free} wide, L0 {sum(shape['level_l0']):g}, "
             f"batch {shape['batch']}; fresh SAEs, min over 3 interleaved rounds)\n",
             f"| contestant | ms per step | ratio vs batchtopk | ms per step, {DEAD_FRAC:.0%} of latents dead (aux-k on) | ratio vs batchtopk |",
             "|---|---|---|---|---|"]
    for c, m in costs.items():
        dead = (f"{1e3 * m['sec_per_step_dead']:.1f} | {m['step_ratio_dead_vs_batchtopk']:.2f}"
                if "sec_per_step_dead" in m else "– | –")
        lines.append(f"| {c} | {1e3 * m['sec_per_step']:.1f} | {m['step_ratio_vs_batchtopk']:.2f} | {dead} |")
    return "\n".join(lines) + "\n"


def plot_ev_vs_l0(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sel = [r for r in rows if r["shape"] == "match"]
    for c in dict.fromkeys(r["contestant"] for r in sel):
        pts = {}
        for r in sel:
            if r["contestant"] == c:
                pts.setdefault(r["l0_factor"], []).append((r["l0"], r["explained_variance"]))
        if len(pts) < 2:
            continue  # ablation rows run at one L0 only
        xs = [statistics.fmean(a for a, _ in v) for _, v in sorted(pts.items())]
        ys = [statistics.fmean(b for _, b in v) for _, v in sorted(pts.items())]
        ax.plot(xs, ys, marker="o", label=c)
    ax.set_xlabel("L0")
    ax.set_ylabel("explained variance")
    ax.set_title("Synthetic hierarchy: explained variance vs L0 (shape match)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    import os

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="default")
    ap.add_argument("--quick", action="store_true", help="alias for --profile quick")
    ap.add_argument("--contestants", nargs="+", default=CONTESTANTS, choices=CONTESTANTS)
    ap.add_argument("--seeds", nargs="+", type=int, help="override the profile's seeds")
    ap.add_argument("--shapes", nargs="+", choices=["match", "wider", "narrower"])
    ap.add_argument("--l0-factors", nargs="+", type=float, help="override the profile's L0 sweep")
    ap.add_argument("--samples", type=int, help="override the profile's training samples")
    ap.add_argument("--eval-samples", type=int, help="override the profile's held-out evaluation samples")
    ap.add_argument("--device", help="override the profile's device (e.g. a CPU dry run of --profile gpu)")
    ap.add_argument("--world-cache", metavar="DIR",
                    help=f"where a synthsaebench world is kept once built (default {WORLDS}; 'none': rebuild)")
    ap.add_argument("--hsae", action="append", default=[], metavar="KEY=VALUE",
                    help="override a hierarchical config field (YAML value), e.g. --hsae kl_coefficient=0")
    ap.add_argument("--ablation", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="add a hierarchical variant as its own row (on the --ablation-shapes, L0 factor 1), "
                         "e.g. --ablation kl:kl_coefficient=0.1")
    ap.add_argument("--ablation-shapes", nargs="+", default=["match"], choices=["match", "wider", "narrower"],
                    help="tree shapes the --ablation rows run on (default: match)")
    ap.add_argument("--jobs", type=int, default=2, help="training runs in parallel (one thread each)")
    ap.add_argument("--tag", default="", help="suffix for the result files (ablations)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="combine result JSONs of one profile (e.g. one seed per GPU command) into "
                         "synthetic_<profile>_<tag>.{json,md}; no training")
    ap.add_argument("--note", default="", help="with --merge: a sentence for the report's head")
    ap.add_argument("--step-cost-only", action="store_true",
                    help="only the realistic-width step cost (no training): step_cost_wide[_TAG].md/.json")
    args = ap.parse_args(argv)
    import yaml

    if args.merge:
        return merge_results(args.merge, args.out, args.tag, args.note)
    name = "quick" if args.quick else args.profile
    p = copy.deepcopy(PROFILES[name])
    if args.seeds:
        p.seeds = args.seeds
    if args.shapes:
        p.shapes = args.shapes
    if args.l0_factors:
        p.l0_factors = args.l0_factors
    if args.samples:
        p.training_samples = args.samples
    if args.device:
        p.device = args.device
    if args.eval_samples:
        p.eval_samples = args.eval_samples
    for item in args.hsae:
        k, v = item.split("=", 1)
        p.hsae[k] = yaml.safe_load(v)
    if p.device == "cuda" and not torch.cuda.is_available():
        print("profile needs a GPU; none is available", file=sys.stderr)
        return 2
    if args.world_cache is not None:
        p.world_cache = None if args.world_cache in ("", "none") else Path(args.world_cache)

    t_start = time.perf_counter()
    if args.step_cost_only:
        wide_costs = step_costs(p, list(dict.fromkeys(args.contestants + ["batchtopk"])), rounds=3, wide=True)
        meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
                "step_cost_wide": wide_costs, "step_cost_wide_shape": WIDE_STEP}
        stem = f"step_cost_wide{('_' + args.tag) if args.tag else ''}"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(meta, indent=1))
        md = (f"# Step cost at a realistic width\n\nMachine: {meta['machine']}, torch threads "
              f"{meta['torch_threads']}. Date: {meta['date']}.\nCommand: `{meta['command']}`\n"
              + _wide_table(meta))
        (args.out / f"{stem}.md").write_text(md)
        print(md)
        return 0
    jobs = [(p, c, s, seed, f) for s in p.shapes for f in p.l0_factors for seed in p.seeds
            for c in args.contestants
            if f == 1.0 or (seed == p.seeds[0] and s == "match")]  # the L0 sweep: one seed, one shape
    ablations = {}
    for item in args.ablation:  # NAME:KEY=VALUE,KEY=VALUE
        ab_name, _, spec = item.partition(":")
        ablations[f"hierarchical[{ab_name}]"] = {
            # split on commas that start a new KEY=, so list values like [0,0,1] survive
            k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in re.split(r",(?=\w+=)", spec) if kv)}
    jobs += [(p, "hierarchical", shape, seed, 1.0, label, ov)
             for label, ov in ablations.items() for shape in args.ablation_shapes for seed in p.seeds]
    if p.world == "synthsaebench" and p.world_cache is not None:
        t = time.perf_counter()  # one world for every run: build (or load) it once, up front
        build_world(p, p.seeds[0])
        print(f"world ready in {time.perf_counter() - t:.0f} s (cache: {p.world_cache})", file=sys.stderr)
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing as mp

    from tqdm.auto import tqdm

    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, j) for j in jobs]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="benchmark runs"):
            row = fut.result()
            rows.append(row)
            tqdm.write(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    order = {((j[5] if len(j) > 5 else j[1]),) + tuple(j[2:5]): i for i, j in enumerate(jobs)}
    rows.sort(key=lambda r: order[(r["contestant"], r["shape"], r["seed"], r["l0_factor"])])
    costs = step_costs(p, list(dict.fromkeys(args.contestants + ["batchtopk"])), ablations)
    for r in rows:
        r.update(costs[r["contestant"]])
    wide_costs = None
    if p.device == "cpu" and name != "quick":
        wide_costs = step_costs(p, list(dict.fromkeys(args.contestants + ["batchtopk"])), rounds=3, wide=True)

    meta = {"profile": name, "machine": machine(), "hsae_overrides": p.hsae,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "wall_seconds": round(time.perf_counter() - t_start, 1), "jobs": args.jobs,
            "step_cost_wide": wide_costs, "step_cost_wide_shape": WIDE_STEP if wide_costs else None}
    stem = f"synthetic_{name}{('_' + args.tag) if args.tag else ''}"
    print(write_report(rows, meta, p, args.out, stem))
    return 0


def merge_results(paths: list[Path], out: Path, tag: str, note: str = "") -> int:
    """Rows of several result files of one profile in one report (later files win on the same
    contestant, shape, seed and L0 factor)."""
    files = [json.loads(Path(x).read_text()) for x in paths]
    names = {d["meta"]["profile"] for d in files}
    if len(names) != 1:
        raise SystemExit(f"--merge: the files come from profiles {sorted(names)}; merge one profile at a time")
    name = names.pop()
    keyed = {(r["contestant"], r["shape"], r["seed"], r["l0_factor"]): r for d in files for r in d["rows"]}
    rows = list(keyed.values())  # first-seen order: the contestants stay in the files' order
    meta = dict(files[0]["meta"], command=" ; ".join(d["meta"]["command"] for d in files),
                wall_seconds=sum(d["meta"].get("wall_seconds") or 0 for d in files),
                note=f"Merged from {', '.join(Path(x).name for x in paths)}. {note}".strip())
    stem = f"synthetic_{name}{('_' + tag) if tag else ''}"
    print(write_report(rows, meta, PROFILES[name], out, stem))
    return 0


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any], p: Profile, out: Path, stem: str) -> str:
    """Write <stem>.json, <stem>.md and (with an L0 sweep) <stem>_ev_vs_l0.png; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    wall = f" Wall time: {meta['wall_seconds'] / 60:.1f} min ({meta.get('jobs', 1)} runs in parallel)." if meta.get("wall_seconds") else ""
    md = (f"# Synthetic hierarchy benchmark: `{meta['profile']}`\n\nMachine: {meta['machine']}. Date: {meta['date']}.{wall}\n"
          f"Command: `{meta['command']}`\n\n" + (f"{meta['note']}\n\n" if meta.get("note") else "")
          + "Mean ± sd over seeds (L0 sweep points: one seed). "
          f"step_ratio_vs_batchtopk: seconds per SAE training step (forward+backward+Adam, min "
          f"over interleaved rounds, freshly initialised, shape match) over batchtopk's, on a fixed batch of "
          f"{p.batch_size}; peak_mem_mb: {'CUDA peak' if p.device == 'cuda' else 'params+grads+Adam state'}.\n"
          + summarise(rows) + "\n" + _wide_table(meta))
    (out / f"{stem}.md").write_text(md)
    if len({r["l0_factor"] for r in rows}) > 1:
        plot_ev_vs_l0(rows, out / f"{stem}_ev_vs_l0.png")
    return md


if __name__ == "__main__":
    sys.exit(main())
