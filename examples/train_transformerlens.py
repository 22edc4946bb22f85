"""Train a hierarchical SAE on a TransformerLens model's activations with SAELens's runner.

The SAE is an ordinary SAELens training config, `HierarchicalTrainingSAEConfig`, passed as
`sae=` to `LanguageModelSAERunnerConfig`; `LanguageModelSAETrainingRunner` then collects
activations, trains and saves exactly as it does for SAELens's own architectures.

Two routes:

* default (no network): a small random `HookedTransformer` built from a
  `HookedTransformerConfig` and an in-memory dataset of random token ids, passed to the
  runner as `override_model=` / `override_dataset=`. The activations mean nothing; the run
  shows the plumbing end to end (300 steps: 35 s on 2 shared CPU cores at load average ~5,
  measured 2026-12-02; --tiny about 12 s there).
* `--model-name gpt2` (needs the Hugging Face Hub): loads the model with
  `HookedTransformer.from_pretrained` and streams `--dataset-path` (default
  NeelNanda/pile-10k), tokenised on the fly.

    python examples/train_transformerlens.py                      # random small LM, 300k tokens
    python examples/train_transformerlens.py --tiny               # 15k tokens, seconds
    python examples/train_transformerlens.py --level-widths 16 48 200 --k 8 --set l2_coefficient=0.3
    python examples/train_transformerlens.py --model-name gpt2 --hook-name blocks.6.hook_resid_post

The SAE is given what a flat SAE is given: a width, split into levels (roots first, any
widths), and an L0 `k` shared by every latent. It learns how to split `k` over the levels and
each latent's parent one level up (re-assigned by decoder direction every `tree_every` steps).

After training, the saved SAE is reloaded with `SAE.load_from_disk` and scored on a fresh
batch of activations (explained variance, L0 per level) and its learned tree is summarised
(edges, latents outside it, children per parent); the script ends with `Saved SAE to: PATH`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from datasets import Dataset
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_hierarchical  # noqa: F401  (registers "hierarchical"; works around a datasets bug)
from sae_lens_hierarchical import HierarchicalTrainingSAEConfig, cli_args, pipeline

# SAELens's runner loads models with these kwargs by default and records them in the SAE's
# metadata; loading the model the same way keeps that record true.
FROM_PRETRAINED_KWARGS = {"center_writing_weights": False}


def tiny_random_model(
    d_model: int, n_layers: int, n_ctx: int, d_vocab: int, seed: int, device: str
) -> HookedTransformer:
    """A randomly initialised HookedTransformer: no download, deterministic for a seed."""
    return HookedTransformer(HookedTransformerConfig(
        d_model=d_model, d_head=d_model // 4, n_heads=4, n_layers=n_layers, n_ctx=n_ctx,
        d_vocab=d_vocab, act_fn="gelu", normalization_type="LN", seed=seed, device=device,
    ))


def random_token_dataset(n_rows: int, n_ctx: int, d_vocab: int, seed: int) -> Dataset:
    """Pre-tokenised rows of random token ids (SAELens reads a `tokens` column)."""
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"tokens": torch.randint(0, d_vocab, (n_rows, n_ctx), generator=g).tolist()})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke test, seconds)")
    p.add_argument("--out", default="hsae_runs/train_transformerlens", help="output directory")
    p.add_argument("--model-name", default=None,
                   help="a TransformerLens model name (e.g. gpt2) loaded from the Hub; "
                        "default: a small random HookedTransformer, offline")
    p.add_argument("--dataset-path", default="NeelNanda/pile-10k",
                   help="Hub text dataset, streamed and tokenised (only with --model-name)")
    p.add_argument("--hook-name", default=None,
                   help="hook point to train on (default: resid_post of the middle layer)")
    p.add_argument("--level-widths", type=int, nargs="+", default=None,
                   help="latents per level, roots first (any widths; default 16 64 256, --tiny 4 16 64, "
                        "with --model-name 64 512 4096)")
    p.add_argument("--k", type=float, default=None,
                   help="active latents per token (L0), shared by every latent (default 8, --tiny 4, "
                        "with --model-name 32)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other HierarchicalTrainingSAEConfig field (YAML value), e.g. "
                        "l2_coefficient=0.3, tree_every=50; repeatable")
    p.add_argument("--training-tokens", type=int, default=None)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 3e-3 for the random model, 3e-4 with --model-name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    # --- model, data and sizes -----------------------------------------------------------
    extra: dict = {}  # HierarchicalTrainingSAEConfig fields beyond the widths and k (else the defaults)
    if args.model_name is not None:
        model = HookedTransformer.from_pretrained(
            args.model_name, device=args.device, **FROM_PRETRAINED_KWARGS
        )
        dataset = None  # the runner streams cfg.dataset_path
        ctx, batch_tokens, n_buffer = 128, 4096, 64
        widths, k = [64, 512, 4096], 32.0
        if args.tiny:  # 20 steps: re-learn the tree every 5
            extra = {"tree_every": 5, "topk_threshold_lr": 0.1}
        tokens = 20 * batch_tokens if args.tiny else 2_000_000
        data_kwargs = dict(dataset_path=args.dataset_path, is_dataset_tokenized=False,
                           streaming=True, prepend_bos=True)
    else:
        if args.tiny:
            d_model, n_layers, ctx, vocab, rows = 32, 1, 32, 200, 500
            batch_tokens, n_buffer, steps = 256, 16, 60
            widths, k = [4, 16, 64], 4.0
            # 60 steps: re-learn the tree every 10, and let the inference threshold settle
            extra = {"tree_every": 10, "topk_threshold_lr": 0.1}
        else:
            d_model, n_layers, ctx, vocab, rows = 64, 2, 64, 1000, 5000
            batch_tokens, n_buffer, steps = 1024, 32, 300
            widths, k = [16, 64, 256], 8.0
        model = tiny_random_model(d_model, n_layers, ctx, vocab, args.seed, args.device)
        dataset = random_token_dataset(rows, ctx, vocab, args.seed)
        tokens = steps * batch_tokens
        data_kwargs = dict(dataset_path="", is_dataset_tokenized=True, streaming=False,
                           prepend_bos=False)
    widths = args.level_widths or widths
    k = args.k if args.k is not None else k
    for item in args.set:  # --set KEY=VALUE: names and types checked
        keys, value = cli_args.parse_override(item)
        extra[".".join(keys)] = value
    cli_args.check_fields(extra, HierarchicalTrainingSAEConfig, path="--set")
    hook_name = args.hook_name or f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    # The activation store's buffer holds n_batches_in_buffer * context_size tokens and must
    # hold at least one training batch.
    assert n_buffer * ctx >= batch_tokens

    # --- the runner config: SAELens's own, with a hierarchical SAE ----------------------
    cfg = LanguageModelSAERunnerConfig(
        sae=HierarchicalTrainingSAEConfig(
            d_in=model.cfg.d_model, d_sae=sum(widths), level_widths=widths, k=k, **extra,
        ),
        model_name=args.model_name or "tiny-random-hooked-transformer",
        hook_name=hook_name,
        context_size=ctx,
        training_tokens=args.training_tokens or tokens,
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=8,
        n_batches_in_buffer=n_buffer,
        lr=args.lr or (3e-4 if args.model_name else 3e-3),
        device=args.device,
        seed=args.seed,
        model_from_pretrained_kwargs=FROM_PRETRAINED_KWARGS,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(args.out),
        verbose=False,
        **data_kwargs,
    )
    torch.manual_seed(args.seed)  # the SAE's initialisation
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
    # SAELens starts the decoder bias at zero; a real residual stream carries a large constant
    # offset that a short run never recovers from (most latents die), so start it at the
    # activations' mean, as `hsae train` does.
    stats = pipeline.mean_activation(model, runner.activations_store.dataset, hook_name, ctx)
    pipeline.start_b_dec_at_mean({"hsae": runner.sae}, stats)
    runner.run()

    # --- reload the saved SAE and score it on fresh activations --------------------------
    sae = SAE.load_from_disk(str(args.out), device=args.device)
    batch_tokens_t = runner.activations_store.get_batch_tokens(4)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch_tokens_t, names_filter=hook_name)
        x = cache[hook_name].reshape(-1, model.cfg.d_model)
        acts = sae.encode(x)
        x_hat = sae.decode(acts)
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    l0 = [(acts[:, sl] > 0).float().sum(-1).mean().item() for sl in sae.level_slices]
    print(f"reloaded {type(sae).__name__} from disk; on {x.shape[0]} fresh tokens at {hook_name}:")
    print(f"  explained_variance: {ev.item():.4f}")
    print("  l0 per level:       " + "  ".join(f"L{i}={v:.2f}" for i, v in enumerate(l0)))
    # The learned tree: each latent below the roots has a parent one level up, or none.
    parents = sae.parent_index
    kids_per_parent = [len(sae.tree_children(j)) for j in range(sum(widths[:-1]))]
    print(f"  tree edges:         {int((parents >= 0).sum())}")
    print(f"  outside tree:       {int(sae.outside_tree.sum())}  (of {sum(widths[1:])} latents below the roots)")
    print(f"  children per parent: min {min(kids_per_parent)}, max {max(kids_per_parent)}"
          f"  (a learned tree's branching is uneven)")
    print(f"Saved SAE to: {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
