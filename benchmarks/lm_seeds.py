"""Mean ± sd over seeds of `lm_hierarchy.py` result files (one file per seed and setting).

    python benchmarks/lm_seeds.py --out benchmarks/results/lm_cpu_smollm2_reseat_seeds.md \\
        baseline=benchmarks/results/lm_cpu_smollm2_seed{42,1,2}.json \\
        reseat=benchmarks/results/lm_cpu_smollm2_reseat50_until200{,_seed1,_seed2}.json

Each NAME=FILE,FILE,... (or several NAME=FILE arguments with the same NAME) is one setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = [("core_ce_loss_score", "CE loss score"), ("core_kl_div_score", "KL score"),
           ("core_explained_variance", "EV (core)"), ("core_frac_alive", "alive"),
           ("hierarchy_hierarchical_consistency_score", "HCS")]


def _fmt(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+", metavar="NAME=FILE[,FILE...]")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    groups: dict[str, list[Path]] = {}
    for item in args.settings:
        name, _, files = item.partition("=")
        groups.setdefault(name, []).extend(Path(f) for f in files.split(",") if f)
    lines = ["| setting | contestant | seeds | " + " | ".join(label for _, label in METRICS) + " |",
             "|---" * (len(METRICS) + 3) + "|"]
    sources = []
    for name, files in groups.items():
        rows: dict[str, list[dict]] = {}
        for f in files:
            data = json.loads(f.read_text())
            sources.append(f"- {name}: `{f.name}`: `{data['meta']['command']}`")
            for row in data["results"][0]["rows"]:
                rows.setdefault(row["contestant"], []).append(row)
        for contestant, rs in rows.items():
            cells = [_fmt([r[key] for r in rs if r.get(key) is not None]) for key, _ in METRICS]
            lines.append(f"| {name} | {contestant} | {len(rs)} | " + " | ".join(cells) + " |")
    md = ("# SmolLM2 LM benchmark over seeds\n\nMean ± sd over the seeds' result files (one "
          "`benchmarks/lm_hierarchy.py` run each; the seed sets data order and SAE init).\n\n"
          + "\n".join(lines) + "\n\nSources:\n" + "\n".join(sources) + "\n")
    args.out.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
