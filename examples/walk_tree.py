"""Walk the latent tree of a saved hierarchical SAE: roots, children, grandchildren.

Loads a directory saved by SAELens's runners (or `hsae train`) with `SAE.load_from_disk`,
which gives a `HierarchicalSAE` once `sae_lens_hierarchical` is imported, and prints, for
the top roots, every descendant with

* freq:        the fraction of inputs on which the latent fires,
* cos(parent): the cosine between its decoder row and its parent's decoder row,

then `sae.path(j)` (root -> ... -> j) for a leaf. The tree accessors used here are
`sae.level_slices`, `sae.tree_children(j)`, `sae.parent_index` and `sae.path(j)`.

Firing frequencies come from, in order: `--acts FILE` (a saved [N, d_in] tensor, .pt or
.safetensors), fresh samples of the synthetic model recorded in the directory's
`runner_config.json` (runs of `SyntheticSAERunner`), the training-time densities in
`sparsity.safetensors`, or else standard-normal inputs (shape only, meaningless values).

    python examples/walk_tree.py hsae_runs/train_synthetic
    python examples/walk_tree.py PATH --n-roots 5 --max-children 3 --sort index
    python examples/walk_tree.py --tiny      # trains a tiny synthetic HSAE first, then walks it
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from sae_lens import SAE, LoggingConfig

import sae_lens_hierarchical  # noqa: F401  (registers the "hierarchical" architecture)

LEVEL_NAMES = ["root", "child", "grandchild"]


def train_tiny(out: Path) -> Path:
    """Train a seconds-long HSAE on a 4 x 3 x 3 synthetic hierarchy; returns its directory."""
    from sae_lens.synthetic import HierarchyConfig, SyntheticModelConfig, ZipfianFiringProbabilityConfig
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig

    from sae_lens_hierarchical import HierarchicalTrainingSAEConfig

    synth = SyntheticModelConfig(
        num_features=52, hidden_dim=32,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.02),
        hierarchy=HierarchyConfig(total_root_nodes=4, branching_factor=3, max_depth=2,
                                  compensate_probabilities=True),
        std_firing_magnitudes=0.1, mean_firing_magnitudes=1.0, bias=False, seed=0,
    )
    sae_cfg = HierarchicalTrainingSAEConfig(
        d_in=32, d_sae=52, level_widths=[4, 12, 36], k_per_level=[1, 2, 3], variant="topk",
    )
    torch.manual_seed(0)
    SyntheticSAERunner(SyntheticSAERunnerConfig(
        synthetic_model=synth, sae=sae_cfg, training_samples=20_000, batch_size=500, lr=3e-3,
        eval_samples=0, checkpoint_path=None, output_path=str(out),
        logger=LoggingConfig(log_to_wandb=False),
    )).run()
    return out


def firing_frequencies(sae: SAE, path: Path, acts_file: str | None, n: int) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """(freq [d_sae], where the inputs came from, the activations or None)."""
    x = None
    if acts_file is not None:
        if acts_file.endswith(".safetensors"):
            from safetensors.torch import load_file

            x = next(iter(load_file(acts_file).values()))
        else:
            x = torch.load(acts_file, map_location="cpu")
        x, source = x.reshape(-1, sae.cfg.d_in)[:n].float(), f"{acts_file}"
    elif (path / "runner_config.json").exists():
        from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig

        sm = json.loads((path / "runner_config.json").read_text())["synthetic_model"]
        model = SyntheticModel.load_from_source(
            SyntheticModelConfig.from_dict(sm) if isinstance(sm, dict) else sm
        )
        x, source = model.sample(n), "fresh samples of the run's synthetic model"
    elif (path / "sparsity.safetensors").exists():
        from safetensors.torch import load_file

        log10 = load_file(str(path / "sparsity.safetensors"))["sparsity"]
        return 10 ** log10.float(), "training-time densities (sparsity.safetensors)", None
    else:
        x, source = torch.randn(n, sae.cfg.d_in), "standard-normal inputs (no data found)"
    with torch.no_grad():
        acts = sae.encode(x.to(sae.device, sae.dtype))
    return (acts > 0).float().mean(0).cpu(), f"{source}, {x.shape[0]} inputs", acts.cpu()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=None, help="directory with cfg.json and sae_weights.safetensors")
    p.add_argument("--tiny", action="store_true", help="with no path: train a tiny synthetic HSAE first")
    p.add_argument("--out", default="hsae_runs/walk_tree", help="where --tiny saves its SAE")
    p.add_argument("--n-roots", type=int, default=3, help="roots to print")
    p.add_argument("--sort", default="freq", choices=["freq", "norm", "index"],
                   help="which roots come first: most frequent, largest decoder norm, or index")
    p.add_argument("--max-children", type=int, default=None,
                   help="children shown per node (most frequent first); default all")
    p.add_argument("--acts", default=None, help="a saved [N, d_in] activation tensor for the frequencies")
    p.add_argument("--n-samples", type=int, default=10_000, help="inputs used for the frequencies")
    args = p.parse_args(argv)

    if args.path is None:
        if not args.tiny:
            p.error("give the path of a saved SAE, or --tiny to train a tiny one first")
        path = train_tiny(Path(args.out))
    else:
        path = Path(args.path)

    sae = SAE.load_from_disk(str(path), device="cpu")
    if not hasattr(sae, "path"):
        raise SystemExit(f"{path} holds a {type(sae).__name__}, not a hierarchical SAE")
    cfg = sae.cfg
    freq, source, acts = firing_frequencies(sae, path, args.acts, args.n_samples)
    W_dec = sae.W_dec.detach().float().cpu()
    norms = W_dec.norm(dim=-1)
    unit = W_dec / norms.clamp(min=1e-12).unsqueeze(-1)
    parents = sae.parent_index.cpu()

    print(f"{type(sae).__name__} at {path}: {cfg.n_levels} levels, widths {cfg.level_widths}, "
          f"branching {cfg.branching}, variant {cfg.variant}, d_in {cfg.d_in}")
    print(f"firing frequencies from {source}")
    if acts is not None:
        on = acts > 0
        l0 = [on[:, sl].sum(-1).float().mean().item() for sl in sae.level_slices]
        # An active latent whose parent is inactive would break the tree; the hard gate forbids it.
        child = parents >= 0
        orphans = int((on[:, child] & ~on[:, parents[child]]).sum())
        free = getattr(cfg, "n_free", 0)
        print("L0 per level: " + "  ".join(f"L{i}={v:.2f}" for i, v in enumerate(l0))
              + (f"  free={on[:, sae.free_slice].sum(-1).float().mean().item():.2f} ({free} latents outside the tree)"
                 if free else "")
              + f"; active latents whose parent is off: {orphans}")

    roots = list(range(cfg.level_widths[0]))
    key = {"freq": lambda j: -freq[j].item(), "norm": lambda j: -norms[j].item(), "index": lambda j: j}
    roots = sorted(roots, key=key[args.sort])[: args.n_roots]

    def show(j: int, depth: int) -> None:
        name = LEVEL_NAMES[depth] if depth < len(LEVEL_NAMES) else f"level-{depth}"
        line = f"{'    ' * depth}{name} {j}  freq {freq[j].item():.4f}  |W_dec| {norms[j].item():.3f}"
        if parents[j] >= 0:
            line += f"  cos(parent) {torch.dot(unit[j], unit[parents[j]]).item():+.3f}"
        print(line)
        kids = sorted(sae.tree_children(j), key=lambda c: -freq[c].item())
        for c in kids[: args.max_children]:
            show(c, depth + 1)

    print()
    for r in roots:
        show(r, 0)

    # A leaf under the first root shown: its most frequent descendant chain, then path().
    leaf = roots[0]
    while sae.tree_children(leaf):
        leaf = max(sae.tree_children(leaf), key=lambda c: freq[c].item())
    chain = sae.path(leaf)
    print()
    print(f"path({leaf}) = {chain}  (levels {[sae.level_of(j) for j in chain]})")


if __name__ == "__main__":
    main()
