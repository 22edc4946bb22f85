"""The pipeline every entry point shares: matched configs, data, training, evaluation.

`hsae train`, `hsae demo`, `hsae eval`, `benchmarks/lm_hierarchy.py` and the examples call these
functions rather than their own copies:

* `matched_configs`: the HSAE and the flat contestants at one width and one L0;
* `split_texts` / `pack`: held-out documents and fixed-length token rows;
* `mean_activation` / `start_b_dec_at_mean`: every SAE's decoder bias starts at the activations'
  mean (SAELens starts it at zero, which a short run on a real residual stream with a large
  constant offset never recovers from: most latents die);
* `train_saes`: SAELens's `MultiSAETrainingRunner`, one model pass per batch for every SAE;
* `evaluate`: SAE-Bench's core eval and the plugin evals through `evals.run_all`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_hierarchical.integrations import patches
from sae_lens_hierarchical.integrations.resume import seed_everything

if TYPE_CHECKING:
    import datasets as hf_datasets
    from transformer_lens import HookedTransformer

# SAELens architectures a benchmark can field against the HSAE, and their short names.
CONTESTANTS: dict[str, str] = {
    "hierarchical": "hsae",
    "batchtopk": "batchtopk",
    "matryoshka_batchtopk": "matryoshka",
    "topk": "topk",
}


# ----------------------------------------------------------------------------------------------
# SAE configs at one width and L0


def matched_configs(
    hsae: Any,
    contestants: Sequence[str] = ("hierarchical", "batchtopk"),
    threshold_lr: float | None = None,
) -> dict[str, Any]:
    """{short name: SAELens TrainingSAEConfig}: every contestant at the HSAE's width and L0.

    hsae: the HSAE's `HierarchicalTrainingSAEConfig` (not changed: a copy is returned). Width is
    its `d_sae` (every latent it stores); L0 its `total_l0` (every active latent whose decoder row
    enters the output). batchtopk / topk get k = that L0 (topk rounds it); matryoshka_batchtopk
    nests its prefixes at the HSAE's level boundaries.
    threshold_lr: `topk_threshold_lr` of every BatchTopK-style contestant, the rate of the
    moving average that learns the inference threshold (None keeps SAELens's 0.01).
    """
    import copy

    from sae_lens.registry import get_sae_training_class

    out: dict[str, Any] = {}
    for contestant in contestants:
        if contestant not in CONTESTANTS:
            raise ValueError(f"unknown contestant {contestant!r}; allowed: {', '.join(CONTESTANTS)}")
        common: dict[str, Any] = dict(
            d_in=hsae.d_in, d_sae=hsae.d_sae, normalize_activations=hsae.normalize_activations
        )
        if threshold_lr is not None and contestant != "topk":
            common["topk_threshold_lr"] = threshold_lr
        cls: Any = get_sae_training_class(contestant)[1]
        if contestant == "hierarchical":
            cfg = copy.deepcopy(hsae)
            if threshold_lr is not None:
                cfg.topk_threshold_lr = threshold_lr
        elif contestant == "topk":
            cfg = cls(**common, k=max(1, round(hsae.total_l0)))
        elif contestant == "matryoshka_batchtopk":
            cfg = cls(**common, k=hsae.total_l0, matryoshka_widths=hsae.level_boundaries)
        else:
            cfg = cls(**common, k=hsae.total_l0)
        out[CONTESTANTS[contestant]] = cfg
    return out


# ----------------------------------------------------------------------------------------------
# Data


def split_texts(texts: Sequence[str], heldout_every: int) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: every `heldout_every`-th document is held out (at least the
    last one); a single document is split 90/10 by characters."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no text to train on")
    if len(texts) == 1:
        cut = int(len(texts[0]) * 0.9)
        return [texts[0][:cut]], [texts[0][cut:]]
    n = max(2, heldout_every)
    held = [i for i in range(len(texts)) if i % n == n - 1] or [len(texts) - 1]
    return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in held]


def pack(model: HookedTransformer, texts: Sequence[str], context_size: int) -> hf_datasets.Dataset:
    """`models.tokenized_dataset` rows whose first token is always a special token.

    The first position of a row is an attention sink with a residual norm about ten times the
    others (SmolLM2 at layer 3: ~800 against ~85). Gemma rows start with BOS anyway; rows of a
    model without BOS (SmolLM2) start with EOS here, so that position is a special token, which
    training (`exclude_special_tokens`) and every eval leave out.
    """
    from sae_lens_hierarchical import models

    begin: Any = "auto"
    if model.tokenizer is not None and not model.cfg.default_prepend_bos:
        begin = "eos"
    return models.tokenized_dataset(model, texts, context_size, begin_batch_token=begin)


@torch.no_grad()
def mean_activation(
    model: HookedTransformer,
    dataset: Any,
    hook_name: str,
    context_size: int,
    n_rows: int = 64,
    batch_prompts: int = 8,
) -> tuple[torch.Tensor, float] | None:
    """(mean activation [d_in], mean norm) at `hook_name` over the first `n_rows` rows of
    `dataset` (`tokens` / `input_ids` rows, or `text` tokenized here), special tokens left out;
    None when no row has `context_size` tokens."""
    from datasets import IterableDataset

    from sae_lens_hierarchical.evals import common

    rows = (
        list(dataset.take(n_rows))
        if isinstance(dataset, IterableDataset)
        else [dataset[i] for i in range(min(n_rows, len(dataset)))]
    )
    token_rows = []
    for row in rows:
        if "tokens" in row or "input_ids" in row:
            toks = torch.as_tensor(row["tokens"] if "tokens" in row else row["input_ids"]).long()
        else:
            toks = model.to_tokens(row["text"], prepend_bos=bool(model.cfg.default_prepend_bos))[0]
        if toks.numel() >= context_size:
            token_rows.append(toks[:context_size].cpu())
    if not token_rows:
        return None
    tokens = torch.stack(token_rows)
    x = common.hook_activations(model, tokens, hook_name, batch_prompts)
    x = x[common.non_special(model, tokens)]
    if x.shape[0] == 0:
        return None
    return x.mean(0), float(x.norm(dim=-1).mean())


@torch.no_grad()
def start_b_dec_at_mean(saes: Mapping[str, Any], stats: tuple[torch.Tensor, float] | None) -> None:
    """Set every SAE's decoder bias to the activations' mean, in the units the SAE sees (after
    SAELens's `expected_average_only_in` scaling when the SAE uses it). No-op for None."""
    if stats is None:
        return
    mean, mean_norm = stats
    for sae in saes.values():
        scale = 1.0
        if sae.cfg.normalize_activations == "expected_average_only_in":
            scale = math.sqrt(sae.cfg.d_in) / mean_norm  # SAELens's scaling factor
        sae.b_dec.copy_((mean * scale).to(sae.b_dec))


# ----------------------------------------------------------------------------------------------
# Training: every SAE from one pass of the model


def warn_if_data_repeats(n_rows: int, context_size: int, training_tokens: int) -> None:
    """Say when training will pass over the data more than once. (SAELens's own warning compares
    the dataset's rows with the training tokens, so it fires on every in-memory dataset; it is
    silenced in `integrations.patches`, and this is the accurate one.)"""
    available = n_rows * context_size
    if available < training_tokens:
        import warnings

        warnings.warn(
            f"the training data holds {n_rows} rows x {context_size} tokens = {available:,} tokens but "
            f"training uses {training_tokens:,}: it repeats about {training_tokens / available:.1f} times",
            stacklevel=3,
        )


def train_saes(
    model: HookedTransformer,
    dataset: hf_datasets.Dataset,
    saes: Mapping[str, Any],
    hook_name: str,
    output_path: str | Path,
    *,
    model_name: str,
    dataset_label: str,
    training_tokens: int,
    context_size: int = 128,
    batch_tokens: int = 1024,
    lr: float = 1e-3,
    lr_decay_fraction: float = 0.2,
    dead_feature_window: int = 50,
    norm_batches: int = 8,
    seed: int = 42,
    device: str = "cpu",
    progress_every: int = 10,
    b_dec_at_mean: bool = True,
) -> dict[str, Any]:
    """Train `saes` ({name: TrainingSAEConfig}) with SAELens's MultiSAETrainingRunner.

    One model pass per batch feeds every SAE (each keeps its own optimizer, schedules and
    dead-latent tracking), so they train on the same activation batches. Saves each to
    `<output_path>/<name>/` in SAELens's format plus the runner's runner_cfg.json; returns
    {name: trained TrainingSAE}. Every SAE starts from the same seeded draw.
    """
    from sae_lens import LoggingConfig
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig
    from sae_lens.registry import get_sae_training_class

    steps = max(1, training_tokens // batch_tokens)
    store_prompts = max(1, min(16, batch_tokens // context_size))
    # SAELens's mixing buffer holds n_batches_in_buffer * context_size tokens and must hold a
    # training batch; twice that keeps some mixing.
    n_batches_in_buffer = max(8, 2 * math.ceil(batch_tokens / context_size))
    cfg = MultiSAETrainingRunnerConfig(
        saes=dict(saes),
        hook_names=hook_name,
        model_name=model_name,
        dataset_path=dataset_label,
        streaming=False,
        context_size=context_size,
        n_batches_in_buffer=n_batches_in_buffer,
        store_batch_size_prompts=store_prompts,
        training_tokens=steps * batch_tokens,
        train_batch_size_tokens=batch_tokens,
        prepend_bos=bool(getattr(model.cfg, "default_prepend_bos", True)),
        exclude_special_tokens=model.tokenizer is not None,
        lr=lr,
        lr_decay_steps=int(steps * lr_decay_fraction),
        dead_feature_window=dead_feature_window,
        feature_sampling_window=max(dead_feature_window, steps),
        n_batches_for_norm_estimate=norm_batches,
        device=device,
        seed=seed,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=str(output_path),
    )
    warn_if_data_repeats(len(dataset), context_size, steps * batch_tokens)
    built = {}
    for name, c in saes.items():
        # Every contestant starts from the same random draw (the same weights wherever the shapes
        # agree), so a per-seed comparison is paired: it differs only by the objective. On
        # SmolLM2 one objective's absorption ranged 0.39-0.64 over draws (docs/benchmarks.md).
        seed_everything(seed)
        built[name] = get_sae_training_class(c.architecture())[0](c)
    if b_dec_at_mean:
        start_b_dec_at_mean(built, mean_activation(model, dataset, hook_name, context_size))
    runner = MultiSAETrainingRunner(cfg, override_dataset=dataset, override_model=model, override_saes=built)
    with patches.finer_progress(progress_every):
        return runner.run()


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    sae_dirs: Mapping[str, Path],
    model: HookedTransformer,
    dataset: Any,
    results_dir: str | Path,
    settings: Any,
    *,
    evals: Sequence[str],
    device: str = "cpu",
    timings: dict[str, float] | None = None,
) -> dict[str, str]:
    """Run `evals` (SAE-Bench's core and the plugin evals) on the saved SAEs; results in SAE-Bench's
    layout under `results_dir/<eval>/`. Returns {eval: "ok" | "skipped: ..."}; each eval's
    seconds go into `timings["eval_<name>"]`.

    settings: an `evals.run_all.RunSettings`.
    """
    from sae_lens_hierarchical.evals import common, run_all

    selected = [common.load_local_sae(f"{name}={path}", device=device) for name, path in sae_dirs.items()]
    status: dict[str, str] = {}
    timings = timings if timings is not None else {}
    for name in evals:  # one at a time, so each gets its own time
        t = time.perf_counter()
        status.update(
            run_all.run_all_evals(
                selected, model, str(results_dir), [name], dataset, settings, device, force_rerun=True
            )
        )
        timings[f"eval_{name}"] = time.perf_counter() - t
    return status
