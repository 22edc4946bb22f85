"""Train a hierarchical SAE on SAELens's synthetic data with a 3-level ground-truth hierarchy.

SAELens's `SyntheticModel` draws sparse activations of known feature vectors; a
`HierarchyConfig` makes the features trees (a child fires only when its parent does), so a
3-level tree of latents has a matching 3-level truth to recover. `SyntheticSAERunner` trains
any registered architecture, `hierarchical` included once `sae_lens_hierarchical` is
imported, then evaluates it against the ground truth and saves it in SAELens's format.

    python examples/train_synthetic.py                 # 16 roots x 4 x 4, 1M samples (minutes on CPU)
    python examples/train_synthetic.py --tiny          # 4 roots x 3 x 3, seconds
    python examples/train_synthetic.py --variant topk --out my_runs/topk

Prints SAELens's final eval (MCC against the true feature vectors, explained variance, L0),
the MCC per level (latents of level l matched only to true features of level l), and where
the SAE was saved; reload it with `SAE.load_from_disk(path)` after importing
`sae_lens_hierarchical`, or walk its tree with `examples/walk_tree.py PATH`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from sae_lens import LoggingConfig
from sae_lens.synthetic import (
    HierarchyConfig,
    OrthogonalizationConfig,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig

import sae_lens_hierarchical  # noqa: F401  (registers the "hierarchical" architecture)
from sae_lens_hierarchical import HierarchicalTrainingSAEConfig
from sae_lens_hierarchical.metrics import parent_index_from_hierarchy, per_level_mcc, tree_levels


def sizes(tiny: bool) -> dict:
    """Problem and training sizes: a seconds-long smoke run or a meaningful CPU run."""
    if tiny:
        return dict(roots=4, branching=3, extra_features=0, hidden_dim=32,
                    k_per_level=[1, 1.5, 2], orthogonalize=False,
                    training_samples=20_000, batch_size=500, eval_samples=2_000)
    # The shape of bench_configs/synthetic-3level.yaml: 16 x 4 x 4 = 336 tree features plus
    # 48 features outside any tree, in 64 dimensions.
    return dict(roots=16, branching=4, extra_features=48, hidden_dim=64,
                k_per_level=[2, 2, 2], orthogonalize=True,
                training_samples=1_000_000, batch_size=1024, eval_samples=50_000)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke test, seconds)")
    p.add_argument("--out", default="hsae_runs/train_synthetic", help="output directory")
    p.add_argument("--variant", default="batchtopk", choices=["batchtopk", "topk"],
                   help="per-level sparsity rule (see HierarchicalTrainingSAEConfig)")
    p.add_argument("--samples", type=int, default=None, help="training samples (overrides the size preset)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    s = sizes(args.tiny)

    # --- the ground truth: trees of depth 2 (3 levels), roots first, breadth-first --------
    b, R = s["branching"], s["roots"]
    level_widths = [R, R * b, R * b * b]
    n_tree = sum(level_widths)
    synth_cfg = SyntheticModelConfig(
        num_features=n_tree + s["extra_features"],
        hidden_dim=s["hidden_dim"],
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.01),
        hierarchy=HierarchyConfig(
            total_root_nodes=R, branching_factor=b, max_depth=2,
            mutually_exclusive_portion=0.0, compensate_probabilities=True,
        ),
        # Push the random feature vectors apart (seconds; skipped for --tiny).
        orthogonalization=OrthogonalizationConfig(num_steps=100) if s["orthogonalize"] else None,
        std_firing_magnitudes=0.1, mean_firing_magnitudes=1.0, bias=False, seed=args.seed,
    )

    # --- the SAE: one latent per tree node, same shape as the truth ----------------------
    sae_cfg = HierarchicalTrainingSAEConfig(
        d_in=s["hidden_dim"], d_sae=n_tree, level_widths=level_widths,
        k_per_level=s["k_per_level"], variant=args.variant,
        # Defaults (unfactored children, KL 0.1, L2 off) are the best setting measured on
        # the synthetic benchmark (benchmarks/results); pass projection_rank=8 for subspaces.
        device=args.device,
    )
    cfg = SyntheticSAERunnerConfig(
        synthetic_model=synth_cfg, sae=sae_cfg,
        training_samples=args.samples or s["training_samples"], batch_size=s["batch_size"],
        lr=args.lr, eval_samples=s["eval_samples"], device=args.device,
        checkpoint_path=None, output_path=str(args.out),
        # aux-k revives latents silent for this many steps; SAELens's default (1000) is
        # longer than this whole run, so dead latents would never be revived.
        dead_feature_window=200,
        logger=LoggingConfig(log_to_wandb=False),
    )
    torch.manual_seed(args.seed)  # the SAE's initialisation
    result = SyntheticSAERunner(cfg).run()

    ev = result.final_eval
    assert ev is not None
    print("final eval:")
    print(f"  mcc:                {ev.mcc:.4f}")
    print(f"  explained_variance: {ev.explained_variance:.4f}")
    print(f"  sae_l0:             {ev.sae_l0:.4f}")
    print(f"  true_l0:            {ev.true_l0:.4f}")
    print(f"  dead_latents:       {ev.dead_latents}")

    # MCC per level: latents of level l only compete for the true features of level l.
    synth = result.synthetic_model
    assert synth.hierarchy is not None
    gt_vecs = synth.feature_dict.feature_vectors.detach()[:n_tree]
    gt_levels = tree_levels(parent_index_from_hierarchy(synth.hierarchy.roots, n_tree))
    sae = result.sae
    by_level = per_level_mcc(sae.W_dec.detach(), gt_vecs, gt_levels, sae.latent_levels)
    print("  mcc per level:      " + "  ".join(
        f"L{lv}={by_level[str(lv)]:.4f}" for lv in range(sae.n_levels)
    ))
    print(f"Saved SAE to: {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
