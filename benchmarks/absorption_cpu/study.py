"""Measure SAE-Bench's absorption eval at CPU size and write results.md.

Each measurement is one model/layer, one vocabulary size (``n_words``, None = SAE-Bench's full
alphabetic vocabulary), one seed. It runs sae_lens_hierarchical.evals.stock.run_cpu_absorption (SAE-Bench's
run_eval, unchanged, with the vocabulary sample, seeding and stop_at_layer patches) on the SAEs
of a ``hsae demo`` folder, or with ``--no-saes`` only the ground-truth probe
(stock.train_gt_probe). Each result is written to runs/<tag>.json and skipped when
that file exists, so the script can be re-run or resumed; ``report`` rebuilds results.md from
all runs/*.json.

Usage (from any directory; HF Hub stays offline):

    python study.py run --model smollm2-135m --layer 3 --n-words 8000 --seeds 1 2
    python study.py run --model smollm2-135m --layer 6 --n-words 8000 --seeds 1 --no-saes
    python study.py report
    python study.py all        # every measurement in results.md, in order, then the report

SAEs: ``hsae demo --out demo --no-evals --tokens 150000`` (SmolLM2, blocks.3) and
``hsae demo --model gemma-3-270m --layer 6 --out demo_gemma --no-evals --tokens 150000``,
both run in this folder (see SAE_DIRS).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import statistics
import time
from typing import Any

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

torch.set_num_threads(1)  # the 2 cores are shared with another job

from sae_lens_hierarchical.evals import stock as ca  # noqa: E402  (run_cpu_absorption and its GT probe)

HERE = os.path.dirname(os.path.abspath(__file__))

RUNS = os.path.join(HERE, "runs")
WORK = os.path.join(HERE, "work")
SAE_DIRS = {
    ("smollm2-135m", 3): os.path.join(HERE, "demo", "saes"),
    ("gemma-3-270m", 6): os.path.join(HERE, "demo_gemma", "saes"),
}
SAE_NAMES = ("hsae", "batchtopk")

# Every measurement reported in results.md: (model, layer, n_words, seeds, with SAEs).
PLAN: list[tuple[str, int, int | None, tuple[int, ...], bool]] = [
    ("smollm2-135m", 3, 8000, (1, 2), True),
    ("smollm2-135m", 3, 16000, (1, 2), True),
    ("smollm2-135m", 3, None, (0,), True),
    ("smollm2-135m", 3, 4000, (1, 2), True),
    ("smollm2-135m", 6, 8000, (1,), False),
    ("smollm2-135m", 9, 8000, (1,), False),
    ("gemma-3-270m", 6, 8000, (1,), False),
    ("gemma-3-270m", 6, 8000, (1, 2), True),
    ("smollm2-135m", 3, 2000, (0, 1, 2), True),
    ("smollm2-135m", 3, 8000, (3,), True),
    ("smollm2-135m", 3, 16000, (3,), True),
]


def tag(model_name: str, layer: int, n_words: int | None, seed: int, saes: bool) -> str:
    words = "all" if n_words is None else str(n_words)
    return f"{model_name}_L{layer}_n{words}_s{seed}" + ("" if saes else "_gt")


@contextlib.contextmanager
def timed_gt_stage(clock: dict[str, float]):
    """Time SAE-Bench's GT-probe stage (prompts, activations, probe) inside run_eval."""
    from sae_bench.evals.absorption import common

    original = common.train_and_save_probes

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            clock["gt_probe_s"] = clock.get("gt_probe_s", 0.0) + time.perf_counter() - start

    common.train_and_save_probes = timed
    try:
        yield
    finally:
        common.train_and_save_probes = original


def run_one(model: Any, model_name: str, layer: int, n_words: int | None, seed: int, saes: bool) -> dict:
    name = tag(model_name, layer, n_words, seed, saes)
    path = os.path.join(RUNS, f"{name}.json")
    if os.path.exists(path):
        print(f"[study] {name}: exists, skipped", flush=True)
        with open(path) as f:
            return json.load(f)
    print(f"[study] {name}: running", flush=True)
    work = os.path.join(WORK, name)
    os.makedirs(work, exist_ok=True)
    art = os.path.join(work, "artifacts")
    record: dict[str, Any] = {
        "model": model_name, "layer": layer, "n_words": n_words, "seed": seed,
        "config": {k: v for k, v in vars(ca.cpu_absorption_config()).items() if k != "model_name"},
        "load1": os.getloadavg()[0],
    }
    clock: dict[str, float] = {}
    start = time.perf_counter()
    if saes:
        from sae_lens import SAE

        import sae_lens_hierarchical  # noqa: F401  (registers the hierarchical architecture)

        folder = SAE_DIRS[(model_name, layer)]
        selected = [(n, SAE.load_from_disk(os.path.join(folder, n))) for n in SAE_NAMES]
        # SAE-Bench writes one json per SAE into ./artifacts/absorption: keep it in `work`.
        with contextlib.chdir(work), timed_gt_stage(clock):
            results = ca.run_cpu_absorption(
                selected, model, os.path.join(work, "eval_results"),
                n_words=n_words, seed=seed, artifacts_path=art,
            )
        record["sae"] = {}
        for key, res in (results or {}).items():
            sae_name = key.removesuffix("_custom_sae")
            record["sae"][sae_name] = {
                "metrics": res["eval_result_metrics"]["mean"],
                "letters": {d["first_letter"]: d for d in res["eval_result_details"]},
            }
        record["evaluated"] = bool(results)
    else:
        ca.train_gt_probe(model, layer, n_words=n_words, seed=seed, artifacts_path=art)
        clock["gt_probe_s"] = time.perf_counter() - start
    record["wall_s"] = time.perf_counter() - start
    record["gt_probe_s"] = clock.get("gt_probe_s")
    probes = os.path.join(ca.artifacts_dir(art, n_words, seed), "absorption", "probes")
    record["gt"] = ca.gt_probe_stats(probes, model.cfg.model_name, layer)
    record["load1_end"] = os.getloadavg()[0]
    os.makedirs(RUNS, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"[study] {name}: {record['wall_s']:.0f} s", flush=True)
    return record


def _load(model_name: str) -> Any:
    from sae_lens_hierarchical.models import load_model

    start = time.perf_counter()
    model = load_model(model_name)
    print(f"[study] loaded {model_name} in {time.perf_counter() - start:.0f} s", flush=True)
    return model


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def _fmt(m: dict | None, key: str) -> str:
    if not m:
        return "n/a"
    return f"{m[f'mean_{key}_score']:.3f} ± {m[f'std_dev_{key}_score']:.3f}"


def _kept(rec: dict, threshold: float = 0.6) -> int:
    return sum(v["f1"] > threshold for v in rec["gt"]["letters"].values())


def report() -> str:
    recs = []
    for p in sorted(glob.glob(os.path.join(RUNS, "*.json"))):
        with open(p) as f:
            recs.append(json.load(f))
    order: dict[tuple, int] = {}
    for i, (m, layer, n, _, saes) in enumerate(PLAN):
        order.setdefault((m, layer, n, saes), i)
    recs.sort(key=lambda r: (order.get((r["model"], r["layer"], r["n_words"], "sae" in r), 99),
                             r["model"], r["layer"], r["n_words"] or 10**9, r["seed"]))
    lines = [
        "# SAE-Bench absorption (first letter) on a 2-core CPU",
        "",
        "Written by `study.py report` from runs/*.json (`study.py all` re-runs everything).",
        "SAE-Bench 0.6.0's `run_eval`, unchanged, through `run_cpu_absorption` (then a prototype of `evals.stock`'s): a",
        "seeded sample of `n_words` alphabetic tokens (`all` = SAE-Bench's default, the whole",
        "alphabetic vocabulary), global RNGs seeded with the same seed, `stop_at_layer` forwards, and",
        "`cpu_absorption_config()` (precalculated SAE acts, llm_batch_size 32; thresholds, max_k=10,",
        "probe epochs and template are SAE-Bench's defaults). SAEs: `hsae demo --tokens 150000` (HSAE",
        "and BatchTopK, d_sae 1680, L0 26.4).",
        "",
        "* GT F1: mean over the 26 letters of the ground-truth probe's held-out F1 (SAE-Bench's rule:",
        "  logit > 0, one letter vs the rest); kept: letters with F1 > 0.6 (SAE-Bench's",
        "  `min_GT_probe_f1`; it needs >= 20); acc: 26-way top-1 accuracy on held-out words.",
        "* absorption / full: SAE-Bench's `mean_absorption_fraction_score` /",
        "  `mean_full_absorption_score` ± their std dev over the kept letters.",
        "* wall: seconds for the whole eval of both SAEs (GT stage in brackets), model load excluded,",
        "  measured while another job used ~1.7 of the 2 cores (load1 = 1-min load average at start).",
        "",
        "| model | layer | n_words | seed | test words | GT F1 | kept | acc | HSAE absorption | HSAE full | "
        "BatchTopK absorption | BatchTopK full | wall s (GT) | load1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        gt = r["gt"]
        sae = r.get("sae")
        h = (sae or {}).get("hsae", {}).get("metrics")
        b = (sae or {}).get("batchtopk", {}).get("metrics")
        if sae is None:
            cells = ["(GT probe only)"] * 4
        elif not r.get("evaluated"):
            cells = ["not evaluated (< 20 letters)"] + [""] * 3
        else:
            cells = [_fmt(h, "absorption_fraction"), _fmt(h, "full_absorption"),
                     _fmt(b, "absorption_fraction"), _fmt(b, "full_absorption")]
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['n_words'] or 'all'} | {r['seed']} | {gt['n_test']} | "
            f"{gt['mean_f1']:.3f} | {_kept(r)} | {gt['accuracy_26way']:.3f} | " + " | ".join(cells)
            + f" | {r['wall_s']:.0f} ({r['gt_probe_s']:.0f}) | {r['load1']:.1f} |"
        )
    lines += ["", "## Vocabulary size against the full vocabulary (SmolLM2-135M, blocks.3)", "",
              "Means over the evaluated seeds of each setting (a seed that SAE-Bench could not evaluate",
              "counts in `seeds` but not in the means). `all` is SAE-Bench's default vocabulary.", "",
              "| n_words | seeds (evaluated) | GT F1 | kept | HSAE absorption | HSAE full "
              "| BatchTopK absorption | BatchTopK full | HSAE − BatchTopK absorption | wall s (GT) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    by_n: dict[Any, list[dict]] = {}
    for r in recs:
        if r["model"] == "smollm2-135m" and r["layer"] == 3 and "sae" in r:
            by_n.setdefault(r["n_words"], []).append(r)
    for n in sorted(by_n, key=lambda v: v or 10**9):
        rs = by_n[n]
        ev = [r for r in rs if r.get("evaluated")]

        def avg(values: list[float]) -> str:
            return f"{statistics.mean(values):.3f}" if values else "n/a"

        def metric(sae: str, key: str, rows: list[dict] = ev) -> list[float]:
            return [r["sae"][sae]["metrics"][f"mean_{key}_score"] for r in rows]

        hsae, btk = metric("hsae", "absorption_fraction"), metric("batchtopk", "absorption_fraction")
        gap = [a - b for a, b in zip(hsae, btk, strict=True)]
        lines.append(
            f"| {n or 'all'} | {len(rs)} ({len(ev)}) | {avg([r['gt']['mean_f1'] for r in rs])} | "
            f"{'/'.join(str(_kept(r)) for r in rs)} | {avg(metric('hsae', 'absorption_fraction'))} | "
            f"{avg(metric('hsae', 'full_absorption'))} | {avg(metric('batchtopk', 'absorption_fraction'))} | "
            f"{avg(metric('batchtopk', 'full_absorption'))} | "
            f"{'/'.join(f'{g:+.3f}' for g in gap) or 'n/a'} | "
            f"{statistics.mean(r['wall_s'] for r in rs):.0f} "
            f"({statistics.mean(r['gt_probe_s'] for r in rs):.0f}) |"
        )
    lines += ["", "## Seed agreement", "",
              "For each setting with >= 2 evaluated seeds: |difference of the means| compared with the",
              "smaller of the two across-letter std devs (the brief's criterion) and with the combined",
              "standard error sqrt(sd1²/n1 + sd2²/n2) over letters (a stricter one).", "",
              "| model | layer | n_words | seeds | SAE | metric | diff | min sd | within sd | combined se "
              "| diff / se |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        if r.get("evaluated"):
            groups.setdefault((r["model"], r["layer"], r["n_words"]), []).append(r)
    for (m, layer, n), rs in groups.items():
        for i in range(len(rs)):
            for j in range(i + 1, len(rs)):
                for sae in SAE_NAMES:
                    for key in ("absorption_fraction", "full_absorption"):
                        a, b = rs[i]["sae"][sae], rs[j]["sae"][sae]
                        ma, mb = a["metrics"], b["metrics"]
                        diff = abs(ma[f"mean_{key}_score"] - mb[f"mean_{key}_score"])
                        sd = min(ma[f"std_dev_{key}_score"], mb[f"std_dev_{key}_score"])
                        se = (ma[f"std_dev_{key}_score"] ** 2 / len(a["letters"])
                              + mb[f"std_dev_{key}_score"] ** 2 / len(b["letters"])) ** 0.5
                        lines.append(
                            f"| {m} | {layer} | {n or 'all'} | {rs[i]['seed']},{rs[j]['seed']} "
                            f"| {sae} | {key} | "
                            f"{diff:.3f} | {sd:.3f} | {'yes' if diff <= sd else 'NO'} | {se:.3f} | "
                            f"{diff / se if se else float('nan'):.2f} |"
                        )
    lines += ["", "## HSAE minus BatchTopK, per run", "",
              "Both SAEs are scored on the same words, probe and letters in a run, so their difference is",
              "paired by letter: mean ± standard error of the per-letter differences.", "",
              "| model | layer | n_words | seed | letters | absorption fraction diff "
              "| full absorption diff |",
              "|---|---|---|---|---|---|---|"]
    for r in recs:
        if not r.get("evaluated"):
            continue
        h, b = r["sae"]["hsae"]["letters"], r["sae"]["batchtopk"]["letters"]
        common = sorted(set(h) & set(b))
        cells = []
        for key in ("mean_absorption_fraction", "full_absorption_rate"):
            d = [h[c][key] - b[c][key] for c in common]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
            cells.append(f"{statistics.mean(d):+.3f} ± {se:.3f}")
        lines.append(f"| {r['model']} | {r['layer']} | {r['n_words'] or 'all'} | {r['seed']} "
                     f"| {len(common)} | " + " | ".join(cells) + " |")
    lines += ["", "## GT probe per letter (F1, held-out words)", ""]
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines.append("| model | layer | n_words | seed | " + " | ".join(letters) + " |")
    lines.append("|---|---|---|---|" + "---|" * 26)
    for r in recs:
        f1 = r["gt"]["letters"]
        lines.append(f"| {r['model']} | {r['layer']} | {r['n_words'] or 'all'} | {r['seed']} | "
                     + " | ".join(f"{f1[c]['f1']:.2f}" for c in letters) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="measure one model/layer/n_words for some seeds")
    run.add_argument("--model", default="smollm2-135m")
    run.add_argument("--layer", type=int, default=3)
    run.add_argument("--n-words", default="8000", help="an integer, or 'all'")
    run.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    run.add_argument("--no-saes", action="store_true", help="GT probe only")
    sub.add_parser("report", help="write results.md from runs/*.json")
    sub.add_parser("all", help="run the whole PLAN (skipping finished runs), then report")
    args = parser.parse_args()

    if args.cmd == "run":
        n_words = None if args.n_words == "all" else int(args.n_words)
        model = _load(args.model)
        for seed in args.seeds:
            run_one(model, args.model, args.layer, n_words, seed, not args.no_saes)
    elif args.cmd == "all":
        models: dict[str, Any] = {}
        for model_name, layer, n_words, seeds, saes in PLAN:
            for seed in seeds:
                if os.path.exists(os.path.join(RUNS, tag(model_name, layer, n_words, seed, saes) + ".json")):
                    continue
                if saes and not os.path.isdir(SAE_DIRS.get((model_name, layer), "")):
                    print(f"[study] no SAEs for {model_name} layer {layer}: skipped", flush=True)
                    continue
                if model_name not in models:
                    models.clear()
                    models[model_name] = _load(model_name)
                run_one(models[model_name], model_name, layer, n_words, seed, saes)
    print(report())


if __name__ == "__main__":
    main()
