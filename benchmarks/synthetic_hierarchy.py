"""Ground-truth benchmark: do SAEs recover a known hierarchy? No contestant sees the answer.

Data: SAELens's synthetic model, a forest of mutually exclusive siblings (Zipfian firing, more
features than dimensions) plus features outside any tree. Every contestant gets the same width
`d_sae` and L0 `k` (the truth's L0 over all true features, times each L0 factor) and is trained
by SAELens's `SyntheticSAERunner`: `hierarchical` (the library's default config on a generic
1:4:16 tree, `generic_level_widths`), `hierarchical (truth's shape)` (the same on the truth's top
three levels: a diagnostic of what knowing the shape is worth), batchtopk, matryoshka_batchtopk
(prefixes at the generic tree's levels), topk, standard (L1). Metrics: F1, MCC, per-level MCC,
edge recall and Luo et al.'s P(p|c), P(c|p), Hamming on each SAE's tree (an HSAE's own, a flat
SAE's post-hoc one), absorption gap, explained variance, dead latents, step cost; then the
targets check of `hierarchical`.

    python benchmarks/synthetic_hierarchy.py --profile quick      # smoke test, about a minute
    python benchmarks/synthetic_hierarchy.py --profile default    # 3 seeds x 2 L0s, CPU
    python benchmarks/synthetic_hierarchy.py --profile default --seeds 0 --tag seed0   # or a seed per command,
    python benchmarks/synthetic_hierarchy.py --merge benchmarks/results/synthetic_default_seed{0,1,2}.json --tag merged
    python benchmarks/synthetic_hierarchy.py --profile default --ablation hard-gate:gate=hard --hsae l2_coefficient=0.2
    python benchmarks/synthetic_hierarchy.py --profile gpu --seeds 0 --l0-factors 1.0 --jobs 1 \\
        --contestants hierarchical batchtopk matryoshka_batchtopk --tag seed0_l1   # SynthSAEBench-16k

The `gpu` world is SynthSAEBench-16k, built from its published config; its orthogonalisation takes
about an hour on a CPU, so it is built once into benchmarks/.worlds/ (--world-cache); `anchor4k`
is its generator at a quarter of the size. Writes benchmarks/results/synthetic_<profile>[_<tag>]
.{json,md}; the JSON records the profile, the seeds, the command and the git commit.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sae_lens
import torch
from sae_lens import LoggingConfig
from sae_lens import synthetic as S
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig
from tqdm.auto import tqdm

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from sae_lens_hierarchical import cli_args, reporting
from sae_lens_hierarchical import metrics as M
from sae_lens_hierarchical.config import REMOVED_FIELDS, HierarchicalTrainingSAEConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
WORLDS = Path(__file__).parent / ".worlds"
"""Where SynthSAEBench-style worlds are kept once built (git-ignored; --world-cache)."""
CONTESTANTS = ["hierarchical", "hierarchical_truth_shape", "batchtopk", "matryoshka_batchtopk", "topk", "standard"]
LABELS = {"hierarchical_truth_shape": "hierarchical (truth's shape)"}
"""Row labels that differ from the contestant's name."""
GENERIC_RATIOS = (1, 4, 16)
FIXED_FIELDS = ("d_in", "d_sae", "k", "matryoshka_widths")
"""HSAE fields the benchmark sets for every contestant alike; --hsae / --ablation cannot."""


@dataclass
class Profile:
    # The world (the truth): n_roots x branching^l features at level l <= depth, n_outside
    # features outside any tree. "simple": a small forest, one per seed; "synthsaebench":
    # SynthSAEBench-16k's generator, one world (seed 42).
    n_roots: int
    branching: int
    n_outside: int
    hidden_dim: int
    d_sae: int  # what every contestant gets: this width, and k = the truth's L0 x each of l0_factors
    depth: int = 2
    world: str = "simple"
    min_prob: float = 0.005
    max_prob: float = 0.3
    l0_factors: tuple[float, ...] = (1.0, 1.6)
    # Training and evaluation.
    training_samples: int = 1_000_000
    batch_size: int = 1024
    lr: float = 3e-3
    eval_samples: int = 20_000
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "cpu"
    world_cache: str | None = str(WORLDS)
    """Directory a "synthsaebench" world is saved to and loaded from (None: build every run)."""


PROFILES = {
    # 4 roots x 3 x 3 + 8 outside = 60 features in 24 dims; 234 steps, so the HSAE's default
    # tree (re-learned every 100 steps) is assigned twice.
    "quick": Profile(n_roots=4, branching=3, n_outside=8, hidden_dim=24, d_sae=60, training_samples=60_000,
                     batch_size=256, eval_samples=5_000, seeds=(0,), l0_factors=(1.0, 1.6)),
    # 8 roots x 4 x 4 + 24 outside = 192 features in 32 dims, every SAE 192 wide; 977 steps.
    "default": Profile(n_roots=8, branching=4, n_outside=24, hidden_dim=32, d_sae=192),
    # SynthSAEBench-16k (Chanin & Garriga-Alonso 2026), built offline from its published config:
    # 16,384 features, d=768, 128 roots x 4, depth 3, children scaled by their parent, low-rank
    # correlations; every SAE at the published width 4096. The paper trains 200M samples; 20M
    # here (a GPU session's budget), every contestant alike (override with --samples).
    "gpu": Profile(n_roots=128, branching=4, n_outside=16_384 - 128 * 85, hidden_dim=768, depth=3,
                   world="synthsaebench", d_sae=4096, training_samples=20_000_000,
                   lr=3e-4, eval_samples=200_000, device="cuda"),
    # Its generator at a quarter of the size for a CPU: 32 roots x 85 + 1,376 outside = 4,096
    # features in d=192 (the same 21x superposition), every SAE 1,024 wide; 2M samples.
    "anchor4k": Profile(n_roots=32, branching=4, n_outside=4_096 - 32 * 85, hidden_dim=192, depth=3,
                        world="synthsaebench", d_sae=1024,
                        training_samples=2_000_000, lr=3e-4, eval_samples=50_000),
}


# ------------------------------------------------------------------------- the world


def synthetic_model_cfg(p: Profile, seed: int) -> SyntheticModelConfig:
    common = dict(num_features=p.n_roots * sum(p.branching**i for i in range(p.depth + 1)) + p.n_outside,
                  hidden_dim=p.hidden_dim)
    tree = dict(total_root_nodes=p.n_roots, branching_factor=p.branching, max_depth=p.depth,
                mutually_exclusive_portion=1.0, compensate_probabilities=True)
    if p.world == "synthsaebench":  # the published generator; seed 42 for every SAE seed
        return SyntheticModelConfig(
            **common, firing_probability=S.ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
            hierarchy=S.HierarchyConfig(**tree, mutually_exclusive_min_depth=0, scale_children_by_parent=True),
            orthogonalization=S.OrthogonalizationConfig(num_steps=100, lr=3e-4),
            correlation=S.LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
            mean_firing_magnitudes=S.LinearMagnitudeConfig(start=5.0, end=4.0),
            std_firing_magnitudes=S.FoldedNormalMagnitudeConfig(mean=0.5, std=0.5), bias=0.5, seed=42)
    return SyntheticModelConfig(
        **common, firing_probability=S.ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=p.max_prob, min_prob=p.min_prob),
        hierarchy=S.HierarchyConfig(**tree), orthogonalization=S.OrthogonalizationConfig(num_steps=100),
        std_firing_magnitudes=0.1, mean_firing_magnitudes=1.0, bias=False, seed=seed)


def build_world(p: Profile, seed: int) -> SyntheticModel:
    """The synthetic model for this profile and seed. A "synthsaebench" world is built once and
    then loaded from `p.world_cache` (SAELens's SyntheticModel.save / load_from_disk), keyed by
    its config and the SAELens version; small "simple" worlds are rebuilt."""
    smc = synthetic_model_cfg(p, seed)
    if p.world != "synthsaebench" or p.world_cache is None:
        return SyntheticModel(smc, device=p.device)
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


def ground_truth_levels(gt_parent: torch.Tensor) -> torch.Tensor:
    """Depth of each true feature; -1 for features outside any tree (no parent, no children)."""
    levels = M.tree_levels(gt_parent)
    has_child = torch.zeros_like(gt_parent, dtype=torch.bool)
    has_child[gt_parent[gt_parent >= 0]] = True
    levels[(gt_parent < 0) & ~has_child] = -1
    return levels


@torch.no_grad()
def truth_l0(synth: SyntheticModel, n: int = 20_000, chunk: int = 5_000) -> float:
    """The truth's L0: true features on per sample, over all of them (seeded, so every
    contestant and every process gets the same number)."""
    torch.manual_seed(12345)
    on = sum(float((synth.sample_with_features(min(chunk, n - s))[1] != 0).sum()) for s in range(0, n, chunk))
    return on / n


# ------------------------------------------------------------------------- the contestants


def generic_level_widths(d_sae: int) -> list[int]:
    """The HSAE's default tree, from the width alone: levels 1:4:16 of d_sae (rounded), the
    last level takes the rest. 192 -> [9, 37, 146]; 4096 -> [195, 780, 3121]."""
    total = sum(GENERIC_RATIOS)
    widths = [max(1, round(d_sae * r / total)) for r in GENERIC_RATIOS[:-1]]
    if d_sae - sum(widths) < 1:
        raise ValueError(f"d_sae={d_sae} is too small for a {len(GENERIC_RATIOS)}-level tree")
    return widths + [d_sae - sum(widths)]


def truth_shape_widths(p: Profile) -> list[int]:
    """The truth's top three levels (n_roots, x branching, x branching); the last level takes
    the rest of the width, so the row differs from `hierarchical` in its shape only."""
    top = [p.n_roots * p.branching ** i for i in range(3)]
    if p.d_sae < sum(top):
        raise ValueError(f"d_sae={p.d_sae} is narrower than the truth's top three levels {top}")
    return top[:2] + [p.d_sae - sum(top[:2])]


def hsae_config(d_in: int, d_sae: int, k: float, widths: list[int], overrides: dict[str, Any] | None = None):
    """The library's default HSAE at this width and L0 on the tree `widths`, plus only the
    user's --hsae / --ablation fields. An override's `k_per_level` is read as proportions of k
    (k itself is the truth's L0 times the factor, unknown to the user)."""
    fields = dict(overrides or {})
    widths = list(fields.pop("level_widths", None) or widths)
    if fields.get("k_per_level"):
        shares = [float(s) for s in fields["k_per_level"]]
        fields["k_per_level"] = [k * s / sum(shares) for s in shares]
    return HierarchicalTrainingSAEConfig(d_in=d_in, d_sae=d_sae, level_widths=widths, k=k, **fields)


def flat_config(contestant: str, d_in: int, d_sae: int, k: float):
    cls = get_sae_training_class(contestant)[1]
    if contestant == "batchtopk":
        return cls(d_in=d_in, d_sae=d_sae, k=k)
    if contestant == "matryoshka_batchtopk":  # prefixes at the generic tree's level boundaries
        ends = [sum(generic_level_widths(d_sae)[: i + 1]) for i in range(len(GENERIC_RATIOS))]
        return cls(d_in=d_in, d_sae=d_sae, k=k, matryoshka_widths=ends)
    if contestant == "topk":
        return cls(d_in=d_in, d_sae=d_sae, k=max(1, round(k)))
    if contestant == "standard":  # L1 does not fix L0: a rough aim at k (the row reports its own L0)
        return cls(d_in=d_in, d_sae=d_sae, l1_coefficient=1.5 / max(k, 1.0))
    raise ValueError(f"contestant={contestant!r}; allowed: {', '.join(CONTESTANTS)}")


def sae_cfg(p: Profile, contestant: str, k: float, overrides: dict[str, Any] | None = None):
    """Contestant `contestant`'s SAELens training config: width p.d_sae, L0 k, nothing else
    from the truth (the truth's-shape row excepted, by design)."""
    if contestant == "hierarchical":
        return hsae_config(p.hidden_dim, p.d_sae, k, generic_level_widths(p.d_sae), overrides)
    if contestant == "hierarchical_truth_shape":
        ov = {key: v for key, v in (overrides or {}).items() if key != "level_widths"}
        return hsae_config(p.hidden_dim, p.d_sae, k, truth_shape_widths(p), ov)
    return flat_config(contestant, p.hidden_dim, p.d_sae, k)


def parse_fields(items: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE items (YAML values) as HSAE config fields, checked against the config class."""
    fields: dict[str, Any] = {}
    for item in items:
        keys, value = cli_args.parse_override(item, flag)
        fields[".".join(keys)] = value
    for key in fields:
        if key in (*REMOVED_FIELDS, "oracle_init", *FIXED_FIELDS):
            raise ValueError(f"{flag}: {key!r} " + ("is the benchmark's, the same for every contestant (change the "
                             "profile or --l0-factors)" if key in FIXED_FIELDS else "was removed in 0.2 (no free "
                             "latents, re-seating or oracle starts)"))
    cli_args.check_fields(fields, HierarchicalTrainingSAEConfig, path=flag)
    return fields


def parse_ablation(item: str) -> tuple[str, dict[str, Any]]:
    """NAME:KEY=VALUE,KEY=VALUE -> ("hierarchical[NAME]", fields); commas inside list values stay."""
    name, sep, spec = item.partition(":")
    if not sep or not name or not spec:
        raise ValueError(f"--ablation {item!r}: expected NAME:KEY=VALUE,..., e.g. hard-gate:gate=hard")
    return f"hierarchical[{name}]", parse_fields([kv for kv in re.split(r",(?=\w+=)", spec) if kv], "--ablation")


# ------------------------------------------------------------------------- training and evaluation


@torch.no_grad()
def evaluate(sae, synth: SyntheticModel, gt_parent: torch.Tensor, gt_levels: torch.Tensor,
             n: int, device: str) -> dict[str, Any]:
    """Tree metrics on held-out samples. The tree is the HSAE's own or, for a flat SAE, the
    post-hoc co-firing tree fitted on the first half; P(p|c), P(c|p) and Hamming are scored on
    the second half."""
    sae.eval()
    x, feats = synth.sample_with_features(n)
    acts = torch.cat([sae.encode(xb.to(device)) for xb in x.split(4096)]).cpu()
    feats = feats.cpu()
    W_dec = sae.W_dec.detach().float().cpu()
    V = synth.feature_dict.feature_vectors.detach().float().cpu()
    half = n // 2
    native = hasattr(sae, "parent_index")
    parent = sae.parent_index.cpu() if native else M.posthoc_tree(acts[:half])
    latent_for_feature, cos = M.match_latents_to_features(W_dec, V)
    cons = M.hierarchical_consistency(acts[half:], parent)
    out = {
        "tree": "native" if native else "post-hoc", "tree_edges": int((parent >= 0).sum()),
        "edge_recall": M.edge_recall(gt_parent, parent, latent_for_feature),
        "edge_recall_ancestor": M.edge_recall(gt_parent, parent, latent_for_feature, allow_ancestor=True),
        "absorption_gap": M.mean_absorption_gap(acts, feats, gt_parent, latent_for_feature),
        "p_parent_given_child": cons["necessity"], "p_child_given_parent": cons["coverage"],
        "hcs": cons["hcs"], "hamming": cons["hamming"], "hamming_per_token": cons["hamming_per_token"],
        "mcc_tree_features": cos[gt_levels >= 0].mean().item(),
        **{f"mcc_level_{key}": v for key, v in M.per_level_mcc(W_dec, V, gt_levels).items() if key != "all"},
    }
    if native:  # the split of the one budget over the levels, as learned
        out["level_l0"] = [round((a > 0).sum(-1).float().mean().item(), 4) for a in acts.split(sae.cfg.level_widths, dim=-1)]
    return out


def run_one(p: Profile, contestant: str, seed: int, l0_factor: float,
            label: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and score one contestant at one seed and L0 factor. `overrides`: HSAE fields
    (--hsae, or an ablation's, then `label` names the row)."""
    torch.set_num_threads(1)  # two runs on two cores beat two runs fighting over both
    synth = build_world(p, seed)
    gt_parent = M.parent_index_from_hierarchy(synth.hierarchy.roots, synth.cfg.num_features)
    gt_levels = ground_truth_levels(gt_parent)
    k = round(truth_l0(synth) * l0_factor, 2)
    cfg = sae_cfg(p, contestant, k, overrides if contestant.startswith("hierarchical") else None)
    runner_cfg = SyntheticSAERunnerConfig(
        synthetic_model=synth.cfg, sae=cfg, training_samples=p.training_samples, batch_size=p.batch_size,
        lr=p.lr, device=p.device, eval_samples=p.eval_samples, checkpoint_path=None, output_path=None,
        logger=LoggingConfig(log_to_wandb=False), dead_feature_window=200,
    )
    given = json.loads(json.dumps(cfg.to_dict(), default=str))  # as given (training adds metadata to it)
    torch.manual_seed(seed)
    t = time.perf_counter()
    res = SyntheticSAERunner(runner_cfg, override_synthetic_model=synth).run()
    train_s = time.perf_counter() - t
    fe = res.final_eval
    row = {
        "contestant": label or LABELS.get(contestant, contestant), "seed": seed, "l0_factor": l0_factor,
        "k": k, "d_sae": cfg.d_sae, "widths": getattr(cfg, "level_widths", None)
        or (generic_level_widths(p.d_sae) if contestant == "matryoshka_batchtopk" else None),
        "true_l0": fe.true_l0, "l0": fe.sae_l0, "explained_variance": fe.explained_variance, "mcc": fe.mcc,
        "f1": fe.classification.f1_score, "dead": fe.dead_latents, "train_seconds": train_s,
        "config": given,
    }
    row.update(evaluate(res.sae, synth, gt_parent, gt_levels, p.eval_samples, p.device))
    return row


def step_cost(sae, d: int, batch: int, device: str, n: int = 20) -> dict[str, float]:
    """Seconds per SAE training step (forward, backward, Adam) on a fixed random batch."""
    sae = copy.deepcopy(sae).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    step = TrainStepInput(sae_in=torch.randn(batch, d, device=device), coefficients={"l1": 1.0}, n_training_steps=0,
                          dead_neuron_mask=torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device), is_logging_step=False)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(3 + n):  # 3 warm-up steps
        if i == 3:
            sync()
            t = time.perf_counter()
        opt.zero_grad()
        sae.training_forward_pass(step).loss.backward()
        opt.step()
    sync()
    return {"sec_per_step": (time.perf_counter() - t) / n}


def step_costs(cfgs: dict[str, Any], batch: int, device: str, rounds: int = 5, n: int = 10) -> dict[str, dict[str, float]]:
    """Seconds per training step of each config (label -> config), side by side in one process:
    freshly initialised SAEs, interleaved round-robin, the minimum over rounds kept, so load
    from other processes inflates every contestant alike or not at all."""
    saes = {}
    for label, cfg in cfgs.items():
        cfg = copy.deepcopy(cfg)
        cfg.device = device
        saes[label] = get_sae_training_class(cfg.architecture())[0](cfg).to(device)
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for label, sae in saes.items():
            m = step_cost(sae, sae.cfg.d_in, batch, device, n=n)
            best[label] = min(best.get(label, m), m, key=lambda x: x["sec_per_step"])
    base = best.get("batchtopk", {}).get("sec_per_step")
    for m in best.values():
        m["step_ratio_vs_batchtopk"] = m["sec_per_step"] / base if base else float("nan")
    return best


# ------------------------------------------------------------------------- reporting

TABLE_COLS = ["f1", "mcc", "edge_recall", "absorption_gap", "explained_variance", "l0", "dead",
              "p_parent_given_child", "p_child_given_parent", "hamming", "mcc_level_0", "mcc_level_1",
              "mcc_level_2", "mcc_level_3", "step_ratio_vs_batchtopk"]
TARGET_HSAE = "hierarchical"


def _vals(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [v for v in (r.get(key) for r in rows) if isinstance(v, (int, float)) and not math.isnan(v)]


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(_vals(rows, key) or [math.nan])


def _fmt(vals: list[float]) -> str:
    if len(vals) < 2:
        return f"{vals[0]:.3g}" if vals else "–"
    return f"{statistics.fmean(vals):.3g} ± {statistics.stdev(vals):.2g}"


def summarise(rows: list[dict[str, Any]]) -> str:
    lines = []
    cols = [c for c in TABLE_COLS if any(c in r for r in rows)]
    for factor in sorted({r["l0_factor"] for r in rows}):
        sel = [r for r in rows if r["l0_factor"] == factor]
        ks = ", ".join(f"{k:g}" for k in sorted(set(_vals(sel, "k"))))
        lines += [f"\n### L0 = {factor:g} x the truth's (k {ks}, width {sel[0]['d_sae']})\n",
                  "| contestant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for c in dict.fromkeys(r["contestant"] for r in sel):
            rs = [r for r in sel if r["contestant"] == c]
            lines.append(f"| {c} (n={len(rs)}) | " + " | ".join(_fmt(_vals(rs, key)) for key in cols) + " |")
    return "\n".join(lines)


def targets_check(rows: list[dict[str, Any]], hsae: str = TARGET_HSAE) -> tuple[list[dict[str, Any]], bool]:
    """The HSAE row `hsae` against its targets at each L0 factor, on means over seeds: F1, MCC
    and edge recall above Matryoshka's and BatchTopK's, absorption gap <= 0.02, explained
    variance within 0.02 of BatchTopK's. Returns (checks, all passed); a check whose rows are
    missing fails."""
    checks = []
    for factor in sorted({r["l0_factor"] for r in rows}):
        by = {c: [r for r in rows if r["contestant"] == c and r["l0_factor"] == factor]
              for c in (hsae, "batchtopk", "matryoshka_batchtopk")}
        h = {key: _mean(by[hsae], key) for key in ("f1", "mcc", "edge_recall", "absorption_gap", "explained_variance")}
        for key in ("f1", "mcc", "edge_recall"):
            ref = max(_mean(by["batchtopk"], key), _mean(by["matryoshka_batchtopk"], key))
            checks.append({"l0_factor": factor, "target": f"{key} > Matryoshka's and BatchTopK's",
                           "value": h[key], "bound": ref, "ok": h[key] > ref})
        checks.append({"l0_factor": factor, "target": "absorption_gap <= 0.02", "value": h["absorption_gap"],
                       "bound": 0.02, "ok": h["absorption_gap"] <= 0.02})
        ev = _mean(by["batchtopk"], "explained_variance")
        checks.append({"l0_factor": factor, "target": "explained_variance >= BatchTopK's - 0.02",
                       "value": h["explained_variance"], "bound": ev - 0.02,
                       "ok": h["explained_variance"] >= ev - 0.02})
    return checks, bool(checks) and all(c["ok"] for c in checks)


def targets_markdown(rows: list[dict[str, Any]]) -> str:
    checks, ok = targets_check(rows)
    lines = [f"\n### Targets (`{TARGET_HSAE}`, the generic tree; means over seeds): "
             f"{'all met' if ok else 'NOT all met'}\n", "| L0 factor | target | HSAE | bound | met |", "|---|---|---|---|---|"]
    lines += [f"| {c['l0_factor']:g} | {c['target']} | {c['value']:.3f} | {c['bound']:.3f} | {'yes' if c['ok'] else 'NO'} |"
              for c in checks]
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, stem: str) -> str:
    """Write <stem>.json and <stem>.md; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    p = meta["profile"]
    runs = meta.get("sources") or [meta]
    commands = "\n".join(f"    {r['command']}    # commit {r['commit']}" for r in runs)
    md = (f"# Synthetic hierarchy benchmark: `{meta['profile_name']}`\n\nMachine: {meta['machine']}. "
          f"Date: {meta['date']}. Seeds: {meta['seeds']}. Wall time: {meta['wall_seconds'] / 60:.1f} min."
          f"\n\nCommand{'s' if len(runs) > 1 else ''} (from the repository root):\n\n{commands}\n\n"
          + (f"{meta['note']}\n\n" if meta.get("note") else "")
          + f"Every contestant: width {p['d_sae']}, k = the truth's L0 x the L0 factor, {p['training_samples']:,} "
          f"training samples, batch {p['batch_size']}, lr {p['lr']:g}. `hierarchical`: the library's default config "
          "with the generic 1:4:16 tree; `hierarchical (truth's shape)`: the truth's top three levels (a "
          "diagnostic that sees the truth's shape). Mean ± sd over seeds. Trees: an HSAE's own, a flat SAE's "
          "post-hoc co-firing tree; p_parent_given_child, p_child_given_parent and hamming (Luo et al.) on it. "
          "step_ratio_vs_batchtopk: seconds per training step over batchtopk's (fresh SAEs, min over "
          "interleaved rounds).\n" + summarise(rows) + "\n" + targets_markdown(rows))
    (out / f"{stem}.md").write_text(md)
    return md


def git_commit() -> str | None:
    """HEAD's commit, with +dirty when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else None


def merge_results(paths: list[Path], out: Path, tag: str, note: str = "") -> int:
    """Rows of several result files of one profile in one report (later files win on the same
    contestant, seed and L0 factor): one seed (or L0) per command, then one table."""
    files = [json.loads(Path(x).read_text()) for x in paths]
    if any(not isinstance(d["meta"].get("profile"), dict) for d in files):
        raise SystemExit("--merge: a file was written by the 0.1 benchmark (no recorded profile); rerun it")
    same = [{k: v for k, v in d["meta"]["profile"].items() if k not in ("seeds", "device", "world_cache")} for d in files]
    if len({d["meta"]["profile_name"] for d in files}) != 1 or any(x != same[0] for x in same):
        raise SystemExit(f"--merge: the files come from different profiles "
                         f"({sorted({d['meta']['profile_name'] for d in files})}); merge one profile at a time")
    keyed = {(r["contestant"], r["seed"], r["l0_factor"]): r for d in files for r in d["rows"]}
    seeds = sorted({s for d in files for s in d["meta"]["seeds"]})
    sources = [{k: src.get(k) for k in ("file", "command", "commit", "seeds")}  # a merged file keeps its sources
               for x, d in zip(paths, files) for src in d["meta"].get("sources") or [dict(d["meta"], file=Path(x).name)]]
    meta = dict(files[0]["meta"], seeds=seeds, profile=dict(files[0]["meta"]["profile"], seeds=seeds), sources=sources,
                command=" ; ".join(src["command"] for src in sources),
                commit=", ".join(dict.fromkeys(str(src["commit"]) for src in sources)),
                wall_seconds=sum(d["meta"].get("wall_seconds") or 0 for d in files),
                note=f"Merged from {', '.join(Path(x).name for x in paths)}. {note}".strip())
    name = meta["profile_name"]
    print(write_report(list(keyed.values()), meta, out, f"synthetic_{name}{('_' + tag) if tag else ''}"))
    return 0


# ------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="default")
    ap.add_argument("--quick", action="store_true", help="alias for --profile quick")
    ap.add_argument("--contestants", nargs="+", default=CONTESTANTS, choices=CONTESTANTS)
    ap.add_argument("--seeds", nargs="+", type=int, help="override the profile's seeds")
    ap.add_argument("--l0-factors", nargs="+", type=float, help="override the profile's L0 factors")
    ap.add_argument("--samples", type=int, help="override the profile's training samples")
    ap.add_argument("--eval-samples", type=int, help="override the profile's held-out evaluation samples")
    ap.add_argument("--device", help="override the profile's device (e.g. a CPU dry run of --profile gpu)")
    ap.add_argument("--world-cache", metavar="DIR", help=f"where a synthsaebench world is kept (default {WORLDS}; 'none': rebuild)")
    ap.add_argument("--hsae", action="append", default=[], metavar="KEY=VALUE",
                    help="an HSAE config field for every hierarchical row (YAML value), e.g. --hsae l2_coefficient=0.2")
    ap.add_argument("--ablation", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="an HSAE variant on the generic tree as its own row, e.g. --ablation hard-gate:gate=hard "
                         "(k_per_level is read as proportions of k)")
    ap.add_argument("--jobs", type=int, default=2, help="training runs in parallel (one thread each)")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="combine result JSONs of one profile into synthetic_<profile>_<tag>.{json,md}; no training")
    ap.add_argument("--note", default="", help="with --merge: a sentence for the report's head")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.merge:
        return merge_results(args.merge, args.out, args.tag, args.note)
    name = "quick" if args.quick else args.profile
    p = copy.deepcopy(PROFILES[name])
    for attr, value in (("seeds", args.seeds), ("l0_factors", args.l0_factors), ("training_samples", args.samples),
                        ("eval_samples", args.eval_samples), ("device", args.device)):
        if value:
            setattr(p, attr, tuple(value) if isinstance(value, list) else value)
    if args.world_cache is not None:
        p.world_cache = None if args.world_cache in ("", "none") else args.world_cache
    try:
        hsae = parse_fields(args.hsae, "--hsae")
        ablations = dict(parse_ablation(a) for a in args.ablation)
    except ValueError as e:
        ap.error(str(e))
    if p.device.startswith("cuda") and not torch.cuda.is_available():
        print("profile needs a GPU; none is available (--device cpu for a dry run)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    info = reporting.machine_info()  # what a results file needs to be reproduced: command, commit, machine
    meta = {"command": shlex.join(["python", str(Path(__file__).resolve().relative_to(ROOT)), *argv]),
            "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{info['gpu'] or info['cpu']} ({info['cores']} cores), torch {info['torch']}, sae_lens "
                       f"{info.get('sae_lens')}, sae_lens_hierarchical {sae_lens_hierarchical.__version__}"}
    stem = f"synthetic_{name}{('_' + args.tag) if args.tag else ''}"
    specs = [(c, None, hsae) for c in args.contestants] + [("hierarchical", lab, {**hsae, **ov}) for lab, ov in ablations.items()]
    timed = specs + ([("batchtopk", None, {})] if "batchtopk" not in args.contestants else [])
    # Every config up front, from the truth's L0 of each seed's world: a bad field fails now, not
    # after an hour of training. The first seed's and factor's configs also time the step.
    jobs, timing_cfgs = [], {}
    for seed in p.seeds:
        truth = truth_l0(build_world(p, seed))
        for factor in p.l0_factors:
            for i, (c, label, ov) in enumerate(timed):
                try:
                    timing_cfgs.setdefault(label or LABELS.get(c, c), sae_cfg(p, c, round(truth * factor, 2), ov))
                except ValueError as e:
                    ap.error(f"{label or c}: {e}")
                if i < len(specs):
                    jobs.append((p, c, seed, factor, label, ov))
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        for fut in tqdm(as_completed([pool.submit(run_one, *j) for j in jobs]), total=len(jobs), desc="benchmark runs"):
            rows.append(fut.result())
            tqdm.write(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items() if k != "config"}))
    order = {(j[4] or LABELS.get(j[1], j[1]), j[2], j[3]): i for i, j in enumerate(jobs)}
    rows.sort(key=lambda r: (r["l0_factor"], order[(r["contestant"], r["seed"], r["l0_factor"])]))
    costs = step_costs(timing_cfgs, p.batch_size, p.device)
    for r in rows:
        r.update(costs[r["contestant"]])
    meta.update(profile_name=name, profile=dataclasses.asdict(p), seeds=list(p.seeds), contestants=args.contestants,
                hsae_overrides=hsae, ablations=ablations, jobs=args.jobs, wall_seconds=round(time.perf_counter() - t_start, 1))
    print(write_report(rows, meta, args.out, stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
