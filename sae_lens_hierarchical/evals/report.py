"""A comparison report over a folder of SAE-Bench-format results (plugin and stock evals).

    build_report("eval_out")   # eval_out/<eval>/<release>_<sae_id>_eval_results.json

writes `eval_out/report.md` and PNGs in `eval_out/plots/`:

* `l0_vs_<eval>_<metric>.png`: L0 against each headline metric, one marker per architecture,
  drawn by SAE-Bench's own `graphing_utils.plot_2var_graph`;
* `per_level_<eval>_<metric>.png`: per-level bars, one bar per SAE at each level;
* `consistency_native_vs_posthoc.png`: HCS, necessity and coverage of each SAE, hierarchical
  SAEs on their own tree, flat SAEs on their post-hoc trees.

Loading: SAE-Bench's `graphing_utils.get_eval_results` chooses the metric category by
substrings of the file path and knows only its own evals, so it cannot read plugin files.
`load_eval_results` returns the same record format for any SAE-Bench-format file (metric
categories flattened, `eval_config`, `sae_class` = the architecture, `d_sae` as SAE-Bench's
"16k"-style string, `train_tokens`), which SAE-Bench's plotting functions take as they are.
The eval type is read from the file's `eval_type_id`, not guessed from its path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

# (eval type id, metric key, label): the columns of the summary table, in order.
SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("core", "l0", "L0 (core)"),
    ("core", "explained_variance", "EV (core)"),
    ("core", "ce_loss_score", "CE loss score"),
    ("core", "kl_div_score", "KL div score"),
    ("hierarchy", "tree_source", "tree"),
    ("hierarchy", "hierarchical_consistency_score", "HCS"),
    ("hierarchy", "necessity", "necessity"),
    ("hierarchy", "coverage", "coverage"),
    ("hierarchy", "hamming_distance", "Hamming"),
    ("hierarchy", "consistency_kl", "consistency KL"),
    ("levelwise", "l0", "L0 (levelwise)"),
    ("levelwise", "root_explained_variance", "root EV"),
    ("levelwise", "explained_variance", "EV (levelwise)"),
    ("levelwise", "frac_dead", "dead"),
    ("levelwise", "autointerp_score", "autointerp"),
    ("sparse_probing", "sae_top_1_test_accuracy", "probe top-1"),
    ("meta_structure_decoder_variance", "decoder_fraction_variance_explained", "meta-SAE FVE"),
    ("absorption_first_letter", "mean_absorption_fraction_score", "absorption"),
    ("autointerp", "autointerp_score", "autointerp (stock)"),
    ("path_attribution", "reconstruction_root_share", "root share (recon)"),
    ("path_attribution", "logit_root_share", "root share (logit)"),
)

# Metrics plotted against L0 (numeric ones of the summary, less L0 itself).
L0_PLOTS: tuple[tuple[str, str, str], ...] = tuple(
    c for c in SUMMARY_COLUMNS if c[1] not in ("l0", "tree_source")
)

PER_LEVEL_PLOTS: tuple[tuple[str, str, str], ...] = (
    ("levelwise", "l0", "L0"),
    ("levelwise", "firing_density", "firing density"),
    ("levelwise", "frac_dead", "fraction dead"),
    ("levelwise", "prefix_explained_variance", "prefix explained variance"),
    ("levelwise", "sparse_probing_top_1_test_accuracy", "sparse probing top-1 accuracy"),
    ("levelwise", "autointerp_score", "autointerp score"),
    ("hierarchy", "hierarchical_consistency_score", "HCS (parents at this level)"),
    ("hierarchy", "necessity", "necessity"),
    ("hierarchy", "coverage", "coverage"),
    ("hierarchy", "consistency_kl", "consistency KL"),
)


def _file_key(path: str) -> str:
    return os.path.basename(path).replace("_eval_results.json", "")


def load_eval_results(paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """SAE-Bench's `get_eval_results` record for any SAE-Bench-format results file.

    {file key: {every metric of every category, "eval_config", "sae_class", "d_sae",
    "train_tokens", "eval_type_id"}}; the file key is the file name without
    "_eval_results.json", as in SAE-Bench.
    """
    from sae_bench.sae_bench_utils.graphing_utils import get_d_sae_string

    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        record: dict[str, Any] = {}
        for category in data["eval_result_metrics"].values():
            record.update(category)
        cfg = data.get("sae_cfg_dict") or {}
        record["eval_config"] = data["eval_config"]
        record["sae_class"] = cfg.get("architecture", "unknown")
        record["d_sae"] = get_d_sae_string(cfg["d_sae"]) if "d_sae" in cfg else "unknown"
        record["d_sae_int"] = cfg.get("d_sae")
        record["train_tokens"] = cfg.get("training_tokens", 1e-6)
        record["eval_type_id"] = data["eval_type_id"]
        out[_file_key(path)] = record
    return out


def collect(results_dir: str) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, list[dict]]]]:
    """All results under `results_dir`: ({eval_type: {sae key: record}}, {eval_type: {sae key: details}})."""
    from sae_bench.sae_bench_utils.graphing_utils import find_eval_results_files

    records: dict[str, dict[str, dict[str, Any]]] = {}
    details: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(find_eval_results_files([results_dir])):
        if not path.endswith("_eval_results.json"):
            continue
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or "eval_type_id" not in data or "eval_result_metrics" not in data:
            continue
        eval_type = data["eval_type_id"]
        key = _file_key(path)
        records.setdefault(eval_type, {}).update(load_eval_results([path]))
        details.setdefault(eval_type, {})[key] = data.get("eval_result_details") or []
    return records, details


def _l0_of(records: dict[str, dict[str, dict[str, Any]]], key: str) -> float | None:
    for eval_type in ("core", "levelwise"):
        value = records.get(eval_type, {}).get(key, {}).get("l0")
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_l0_vs_metrics(records: dict[str, dict[str, dict[str, Any]]], plots_dir: str) -> list[tuple[str, str]]:
    """L0 against each metric with SAE-Bench's plot_2var_graph; returns [(label, png path)]."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sae_bench.sae_bench_utils import graphing_utils

    made = []
    for eval_type, metric, label in L0_PLOTS:
        points = {}
        for key, rec in records.get(eval_type, {}).items():
            value, l0 = _num(rec.get(metric)), _l0_of(records, key)
            if value is None or l0 is None:
                continue
            points[key] = {"l0": l0, metric: value, "sae_class": rec["sae_class"], "d_sae": rec["d_sae"]}
        if not points:
            continue
        path = os.path.join(plots_dir, f"l0_vs_{eval_type}_{metric}.png")
        graphing_utils.plot_2var_graph(
            points, metric, title=f"L0 vs {label}", y_label=label, output_filename=path,
            return_fig=True,
        )
        plt.close("all")
        made.append((label, path))
    return made


def plot_per_level(details: dict[str, dict[str, list[dict]]], plots_dir: str) -> list[tuple[str, str]]:
    """Grouped bars per level (one bar per SAE) for each per-level metric."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    made = []
    for eval_type, metric, label in PER_LEVEL_PLOTS:
        series = {}
        for key, rows in details.get(eval_type, {}).items():
            vals = {int(r["level"]): _num(r.get(metric)) for r in rows if "level" in r}
            if any(v is not None for v in vals.values()):
                series[key] = vals
        if not series:
            continue
        levels = sorted({lv for vals in series.values() for lv in vals})
        width = 0.8 / len(series)
        with plt.rc_context({"font.size": 10}):
            fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(levels) + 3), 4))
            for i, (key, vals) in enumerate(sorted(series.items())):
                xs = [lv + (i - (len(series) - 1) / 2) * width for lv in levels if vals.get(lv) is not None]
                ys = [vals[lv] for lv in levels if vals.get(lv) is not None]
                ax.bar(xs, ys, width=width, label=key)
            ax.set_xticks(levels, [str(lv) for lv in levels])
            ax.set_xlabel("level (0 = roots)")
            ax.set_ylabel(label)
            ax.set_title(f"{label} per level ({eval_type})")
            ax.legend(fontsize=8, loc="best")
            fig.tight_layout()
            path = os.path.join(plots_dir, f"per_level_{eval_type}_{metric}.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
        made.append((f"{label} per level", path))
    return made


def plot_consistency(records: dict[str, dict[str, dict[str, Any]]], plots_dir: str) -> tuple[str, str] | None:
    """HCS, necessity and coverage per SAE: native trees (solid) against post-hoc trees (hatched)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    recs = records.get("hierarchy", {})
    if not recs:
        return None
    keys = sorted(recs, key=lambda k: (recs[k].get("tree_source") != "native", k))
    metrics = [("hierarchical_consistency_score", "HCS"), ("necessity", "necessity"), ("coverage", "coverage")]
    width = 0.8 / len(metrics)
    with plt.rc_context({"font.size": 10}):
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(keys) + 2), 4))
        for i, (metric, _) in enumerate(metrics):
            for j, key in enumerate(keys):
                value = _num(recs[key].get(metric))
                if value is None:
                    continue
                posthoc = recs[key].get("tree_source") != "native"
                ax.bar(j + (i - 1) * width, value, width=width, color=f"C{i}",
                       hatch="//" if posthoc else None, edgecolor="black")
        ax.set_xticks(range(len(keys)), [f"{k}\n({recs[k].get('tree_source')})" for k in keys], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("score")
        ax.set_title("Consistency: native trees vs post-hoc (hatched)")
        handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(metrics))]
        ax.legend(handles, [m[1] for m in metrics], fontsize=8, loc="best")
        fig.tight_layout()
        path = os.path.join(plots_dir, "consistency_native_vs_posthoc.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return ("HCS: native vs post-hoc trees", path)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def build_report(
    results_dir: str,
    output_dir: str | None = None,
    title: str = "SAE comparison",
    status: dict[str, str] | None = None,
) -> str:
    """Write report.md and plots/ for the results under `results_dir`; returns report.md's path."""
    output_dir = output_dir or results_dir
    plots_dir = os.path.join(output_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    records, details = collect(results_dir)
    keys = sorted({k for recs in records.values() for k in recs})

    def rel(path: str) -> str:
        return os.path.relpath(path, output_dir)

    lines = [f"# {title}", ""]
    lines.append(
        f"{len(keys)} SAEs, evals: {', '.join(sorted(records)) or 'none'}. Results: `{rel(results_dir) if results_dir != output_dir else '.'}` "
        "(SAE-Bench format, one `<release>_<sae_id>_eval_results.json` per SAE and eval)."
    )
    lines.append("")
    if status:
        lines += ["## Evals run", ""] + _table(["eval", "status"], sorted(status.items())) + [""]

    columns = [c for c in SUMMARY_COLUMNS if any(c[1] in r for r in records.get(c[0], {}).values())]
    arch = {}
    d_sae = {}
    for recs in records.values():
        for k, r in recs.items():
            arch.setdefault(k, r["sae_class"])
            d_sae.setdefault(k, r.get("d_sae_int"))
    rows = []
    for k in keys:
        rows.append([k, arch.get(k), d_sae.get(k)] + [records.get(e, {}).get(k, {}).get(m) for e, m, _ in columns])
    lines += ["## Summary", ""]
    lines += _table(["SAE", "architecture", "d_sae"] + [c[2] for c in columns], rows) + [""]
    lines.append(
        "HCS, necessity, coverage, Hamming and KL: each hierarchical SAE on its own tree, each flat SAE "
        "on its post-hoc co-firing tree (`tree` column), on held-out tokens. EV (core) is SAE-Bench's "
        "explained variance; EV (levelwise) and root EV use the textbook total variance."
    )
    lines.append("")

    for eval_type, cols in (
        ("hierarchy", ["level", "n_latents", "hierarchical_consistency_score", "necessity", "coverage",
                       "hamming_distance", "consistency_kl"]),
        ("levelwise", ["level", "n_latents", "l0", "firing_density", "frac_dead", "prefix_explained_variance",
                       "sparse_probing_top_1_test_accuracy", "autointerp_score"]),
    ):
        if not details.get(eval_type):
            continue
        lines += [f"## Per level: {eval_type}", ""]
        for k in sorted(details[eval_type]):
            lines += [f"**{k}**", ""]
            lines += _table(cols, [[r.get(c) for c in cols] for r in details[eval_type][k]]) + [""]

    figures = plot_l0_vs_metrics(records, plots_dir) + plot_per_level(details, plots_dir)
    hcs = plot_consistency(records, plots_dir)
    if hcs:
        figures.append(hcs)
    pa_dir = os.path.join(results_dir, "path_attribution")
    if os.path.isdir(pa_dir):
        for p in sorted(os.listdir(pa_dir)):
            if p.endswith("_path_attribution.png"):
                figures.append((f"path attribution: {p.replace('_path_attribution.png', '')}", os.path.join(pa_dir, p)))
    if figures:
        lines += ["## Plots", ""]
        for label, path in figures:
            lines += [f"### {label}", "", f"![{label}]({rel(path)})", ""]
    report = os.path.join(output_dir, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    return report
