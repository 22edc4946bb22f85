"""Train a hierarchical SAE on SAELens's synthetic data with a 3-level ground-truth hierarchy.

SAELens's `SyntheticModel` draws sparse activations of known feature vectors; a
`HierarchyConfig` makes the features trees (a child fires only when its parent does), so a
3-level HSAE has a matching 3-level truth to recover. `SyntheticSAERunner` trains any
registered architecture, `hierarchical` included once `sae_lens_hierarchical` is imported,
then evaluates it against the ground truth and saves it in SAELens's format.

The HSAE is given what a flat SAE is given, a width (split into levels, roots first) and an
L0 `k` shared by every latent; it learns how to split `k` over the levels and which latent
one level up is each latent's parent (re-assigned every `tree_every` steps by decoder direction
among the latents that fire with it).

    python examples/train_synthetic.py                 # bench_configs/synthetic-3level.yaml's world, 1M samples
    python examples/train_synthetic.py --tiny          # 4 roots x 3 x 3, 20k samples, seconds
    python examples/train_synthetic.py --k 8 --set l2_coefficient=0.3 --out my_runs/k8

The default run took 100 s (64 s of CPU) on 2 shared CPU cores at load average ~4.6 (measured
2026-12-02); --tiny about 12 s there.

Prints SAELens's final eval (MCC against the true feature vectors, explained variance, L0),
the MCC per level (latents of level l matched only to true features of level l), the L0 per
level, the learned tree (edges, latents outside it, and the share of true parent->child edges
it recovers), and where the SAE was saved; reload it with `SAE.load_from_disk(path)`, or walk
its tree with `examples/walk_tree.py PATH`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from sae_lens import SAE, LoggingConfig
from sae_lens.synthetic import (
    HierarchyConfig,
    OrthogonalizationConfig,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig

import sae_lens_hierarchical  # noqa: F401  (registers the "hierarchical" architecture)
from sae_lens_hierarchical import HierarchicalTrainingSAEConfig, cli_args
from sae_lens_hierarchical.metrics import (
    edge_recall,
    match_latents_to_features,
    parent_index_from_hierarchy,
    per_level_mcc,
    tree_levels,
)


def sizes(tiny: bool) -> dict:
    """Problem and training sizes: a seconds-long smoke run or the benchmark config's shape."""
    if tiny:
        # 20 steps of 1000 samples: the tree is re-learned every 5 steps, and the saved SAE's
        # threshold (a moving average of the smallest kept activation) moves fast enough to settle.
        return dict(roots=4, branching=3, extra_features=0, hidden_dim=32, k=4.5,
                    sae_fields={"tree_every": 5, "topk_threshold_lr": 0.1},
                    orthogonalize=False, training_samples=20_000, batch_size=1000, eval_samples=2_000)
    # bench_configs/synthetic-3level.yaml: 16 x 4 x 4 = 336 tree features plus 48 features
    # outside any tree, in 64 dimensions; 976 steps, every other SAE field at its default.
    return dict(roots=16, branching=4, extra_features=48, hidden_dim=64, k=6.6, sae_fields={},
                orthogonalize=True, training_samples=1_000_000, batch_size=1024, eval_samples=50_000)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke test, seconds)")
    p.add_argument("--out", default="hsae_runs/train_synthetic", help="output directory")
    p.add_argument("--k", type=float, default=None,
                   help="L0 (active latents per input) shared by every latent (default 6.6, --tiny 4.5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other HierarchicalTrainingSAEConfig field (YAML value), e.g. "
                        "l2_coefficient=0.3, tree=fixed, gate=hard; repeatable")
    p.add_argument("--samples", type=int, default=None, help="training samples (overrides the size preset)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    s = sizes(args.tiny)

    # --- the ground truth: trees of depth 2 (3 levels) --------------------------------------
    b, R = s["branching"], s["roots"]
    level_widths = [R, R * b, R * b * b]
    n_tree = sum(level_widths)
    synth_cfg = SyntheticModelConfig(
        num_features=n_tree + s["extra_features"],
        hidden_dim=s["hidden_dim"],
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.005),
        hierarchy=HierarchyConfig(  # siblings are mutually exclusive: at most one child fires
            total_root_nodes=R, branching_factor=b, max_depth=2,
            mutually_exclusive_portion=1.0, compensate_probabilities=True,
        ),
        # Push the random feature vectors apart (seconds; skipped for --tiny).
        orthogonalization=OrthogonalizationConfig(num_steps=100) if s["orthogonalize"] else None,
        std_firing_magnitudes=0.1, mean_firing_magnitudes=1.0, bias=False, seed=args.seed,
    )

    # --- the SAE: as many latents per level as the truth has features -------------------------
    extra = dict(s["sae_fields"])
    for item in args.set:  # --set KEY=VALUE: names and types checked against the config class
        keys, value = cli_args.parse_override(item)
        extra[".".join(keys)] = value
    cli_args.check_fields(extra, HierarchicalTrainingSAEConfig, path="--set")
    sae_cfg = HierarchicalTrainingSAEConfig(
        d_in=s["hidden_dim"], d_sae=n_tree, level_widths=level_widths,
        k=args.k if args.k is not None else s["k"], device=args.device, **extra,
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
    synth, sae = result.synthetic_model, result.sae
    assert synth.hierarchy is not None
    gt_vecs = synth.feature_dict.feature_vectors.detach()[:n_tree]
    gt_parent = parent_index_from_hierarchy(synth.hierarchy.roots, n_tree)
    by_level = per_level_mcc(sae.W_dec.detach(), gt_vecs, tree_levels(gt_parent), sae.latent_levels)
    print("  mcc per level:      " + "  ".join(f"L{lv}={by_level[str(lv)]:.4f}" for lv in range(sae.n_levels)))

    # How the saved SAE (JumpReLU with the learned thresholds: what SAE.load_from_disk gives)
    # splits its L0 over the levels, on fresh samples.
    saved = SAE.load_from_disk(str(args.out), device=args.device)
    with torch.no_grad():
        acts = saved.encode(synth.sample(5_000).to(saved.W_dec))
    l0 = [(acts[:, sl] > 0).float().sum(-1).mean().item() for sl in saved.level_slices]
    print("  l0 per level:       " + "  ".join(f"L{i}={v:.2f}" for i, v in enumerate(l0))
          + f"  (saved SAE, {sum(l0):.2f} in all)")

    # The learned tree against the true one: a true edge parent->child is recovered when the
    # latents matched to the two features are parent and child in the SAE's tree.
    latent_for_feature, _ = match_latents_to_features(sae.W_dec.detach(), gt_vecs)
    below_roots = int((sae.latent_levels > 0).sum())
    print(f"  tree edges:         {int((sae.parent_index >= 0).sum())}")
    print(f"  outside tree:       {int(sae.outside_tree.sum())}  (of {below_roots} latents below the roots)")
    print(f"  edge_recall:        {edge_recall(gt_parent, sae.parent_index, latent_for_feature):.4f}")
    print(f"Saved SAE to: {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
