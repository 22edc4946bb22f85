"""Reports: markdown tables, plots, tree.md and the comparison report over SAE-Bench-format results.

* `collect` / `load_eval_results` / `collect_results`: read SAE-Bench-format result files (plugin
  and stock evals alike) into records. SAE-Bench's `graphing_utils.get_eval_results` picks the
  metric category from the file path and knows only its own evals; `load_eval_results` returns
  its record format for any SAE-Bench-format file (categories flattened, `eval_config`,
  `sae_class` = the architecture, `d_sae` as SAE-Bench's "16k"-style string, `train_tokens`),
  which SAE-Bench's plotting functions take as they are.
* `build_report(results_dir)`: `report.md` and `plots/` (L0 against each metric with SAE-Bench's
  `plot_2var_graph`, per-level bars, native against post-hoc consistency). `hsae eval` writes it.
* `summary_markdown` / `summary_plots` / `stdout_summary`: the run summary of `hsae demo` and the
  LM benchmark (command, machine, load, times, core and plugin metrics side by side).
* `tree_markdown`: the learned tree's most frequent roots, children and grandchildren, each with
  its top-activating snippets, the firing token marked «like this».
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


# Columns and rows

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
    ("hierarchy", "p_child_given_parent", "P(c|p)"),
    ("hierarchy", "hamming_per_token", "Hamming/token"),
    ("hierarchy", "consistency_kl", "consistency KL"),
    ("hierarchy", "level_posthoc_necessity", "post-hoc P(p|c)"),
    ("hierarchy", "level_posthoc_p_child_given_parent", "post-hoc P(c|p)"),
    ("hierarchy", "level_posthoc_hamming_per_token", "post-hoc Hamming/token"),
    ("levelwise", "l0", "L0 (levelwise)"),
    ("levelwise", "outside_tree_l0_share", "L0 share outside tree"),
    ("levelwise", "outside_tree_explained_variance_share", "EV share outside tree"),
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
L0_PLOTS: tuple[tuple[str, str, str], ...] = tuple(c for c in SUMMARY_COLUMNS if c[1] not in ("l0", "tree_source"))

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
    ("hierarchy", "p_child_given_parent", "P(child | parent), per edge"),
    ("hierarchy", "hamming_per_token", "Hamming per token (Luo et al.)"),
    ("hierarchy", "level_posthoc_necessity", "level post-hoc tree: P(parent | child)"),
    ("hierarchy", "level_posthoc_p_child_given_parent", "level post-hoc tree: P(child | parent)"),
    ("hierarchy", "level_posthoc_hamming_per_token", "level post-hoc tree: Hamming per token"),
    ("levelwise", "outside_tree_l0_share", "L0 share of latents outside the tree"),
    ("levelwise", "outside_tree_explained_variance_share", "EV share of latents outside the tree"),
    ("levelwise", "root_explained_variance", "roots-only explained variance"),
    ("levelwise", "explained_variance", "explained variance (levelwise)"),
    ("levelwise", "frac_dead", "fraction dead"),
    ("path_attribution", "reconstruction_root_share", "root share of reconstruction"),
    ("path_attribution", "logit_root_share", "root share of logit"),
)


# Machine


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


def fmt(value: Any) -> str:
    """A table cell: 4 significant digits for floats, – for missing values."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table as a list of lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines


# Reading results


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


def collect_results(results_dir: str | Path, names: Sequence[str]) -> dict[str, Any]:
    """{"metrics": {name: {eval_type: {metric: value}}}, "levels": {name: {eval_type: rows}}}
    from the SAE-Bench-format files under `results_dir`."""
    records, details = collect(str(results_dir))
    metrics: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in names}
    levels: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in names}
    for eval_type, recs in records.items():
        for key, rec in recs.items():
            name = next((n for n in names if key in (n, f"{n}_custom_sae")), None)
            if name is None:
                continue
            metrics[name][eval_type] = {
                k: v
                for k, v in rec.items()
                if k not in ("eval_config",) and (isinstance(v, (int, float, str)) or v is None)
            }
            levels[name][eval_type] = details.get(eval_type, {}).get(key, [])
    return {"metrics": metrics, "levels": levels}


# Plots


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
            points,
            metric,
            title=f"L0 vs {label}",
            y_label=label,
            output_filename=path,
            return_fig=True,
        )
        plt.close("all")
        made.append((label, path))
    return made


def plot_per_level(
    details: dict[str, dict[str, list[dict]]],
    plots_dir: str | Path,
    metrics: Sequence[tuple[str, str, str]] = PER_LEVEL_PLOTS,
    max_levels: int | None = None,
    prefix: str = "per_level",
) -> list[tuple[str, str]]:
    """Grouped bars per level (one bar per SAE) for each (eval type, metric, label) in `metrics`.

    details: {eval type: {SAE key: per-level rows}}. max_levels: only levels below it (a flat
    SAE's post-hoc tree can be dozens of levels deep).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    made = []
    for eval_type, metric, label in metrics:
        series = {}
        for key, rows in details.get(eval_type, {}).items():
            vals = {int(r["level"]): _num(r.get(metric)) for r in rows if "level" in r}
            vals = {lv: v for lv, v in vals.items() if max_levels is None or lv < max_levels}
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
            ax.set_xlabel("level (0 = roots; flat SAEs: depth in their post-hoc tree)", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{label} per level ({eval_type})")
            ax.legend(fontsize=8, loc="best")
            fig.tight_layout()
            path = os.path.join(plots_dir, f"{prefix}_{eval_type}_{metric}.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
        made.append((f"{label} per level", path))
    return made


def plot_consistency(records: dict[str, dict[str, dict[str, Any]]], plots_dir: str) -> tuple[str, str] | None:
    """HCS, necessity and coverage per SAE: native trees (solid) against post-hoc trees (hatched)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

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
                ax.bar(
                    j + (i - 1) * width,
                    value,
                    width=width,
                    color=f"C{i}",
                    hatch="//" if posthoc else None,
                    edgecolor="black",
                )
        ax.set_xticks(range(len(keys)), [f"{k}\n({recs[k].get('tree_source')})" for k in keys], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("score")
        ax.set_title("Consistency: native trees vs post-hoc (hatched)")
        handles = [Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(metrics))]
        ax.legend(handles, [m[1] for m in metrics], fontsize=8, loc="best")
        fig.tight_layout()
        path = os.path.join(plots_dir, "consistency_native_vs_posthoc.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return ("HCS: native vs post-hoc trees", path)


def summary_plots(results: dict[str, Any], plots_dir: str | Path) -> list[tuple[str, str]]:
    """Per-level L0 and prefix-EV bars (the first SAE's levels), and core EV against L0."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    by_eval: dict[str, dict[str, list[dict]]] = {}
    for name, per_eval in results["levels"].items():
        for eval_type, rows in per_eval.items():
            by_eval.setdefault(eval_type, {})[name] = rows
    first_rows = next(iter(results["levels"].values()), {}).get("levelwise", [])
    made = plot_per_level(
        by_eval,
        plots_dir,
        metrics=(
            ("levelwise", "l0", "L0 (active latents per token)"),
            ("levelwise", "prefix_explained_variance", "explained variance of levels 0..l"),
        ),
        max_levels=len(first_rows) or 3,
        prefix="summary",
    )
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
        made.append(("explained variance against L0 (SAE-Bench core)", str(path)))
    return made


# Reports


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
        lines += ["## Evals run", ""] + md_table(["eval", "status"], sorted(status.items())) + [""]

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
    lines += md_table(["SAE", "architecture", "d_sae"] + [c[2] for c in columns], rows) + [""]
    lines.append(
        "HCS, necessity, coverage, Hamming and KL: each hierarchical SAE on its own tree, each flat SAE "
        "on its post-hoc co-firing tree (`tree` column), on held-out tokens. EV (core) is SAE-Bench's "
        "explained variance; EV (levelwise) and root EV use the textbook total variance."
    )
    lines.append("")

    for eval_type, cols in (
        (
            "hierarchy",
            [
                "level",
                "n_latents",
                "hierarchical_consistency_score",
                "necessity",
                "coverage",
                "hamming_distance",
                "consistency_kl",
            ],
        ),
        (
            "levelwise",
            [
                "level",
                "n_latents",
                "l0",
                "firing_density",
                "frac_dead",
                "prefix_explained_variance",
                "sparse_probing_top_1_test_accuracy",
                "autointerp_score",
            ],
        ),
    ):
        if not details.get(eval_type):
            continue
        lines += [f"## Per level: {eval_type}", ""]
        for k in sorted(details[eval_type]):
            lines += [f"**{k}**", ""]
            lines += md_table(cols, [[r.get(c) for c in cols] for r in details[eval_type][k]]) + [""]

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
    lines += md_table(
        ["", ""],
        [
            ["model", cfg.get("model")],
            ["hook", cfg.get("hook")],
            ["text", cfg.get("text")],
            ["training tokens", cfg.get("training_tokens")],
            ["width (d_sae)", cfg.get("d_sae")],
            ["HSAE level widths", cfg.get("level_widths")],
            ["L0 (k) of every SAE", cfg.get("l0")],
            ["HSAE config overrides", cfg.get("set") or "none"],
            [
                "machine",
                f"{machine.get('cpu')}, {machine.get('cores')} cores, "
                f"{machine.get('memory_gib')} GiB, torch threads {machine.get('torch_threads')}"
                + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
            ],
            ["load average (1/5/15 min) at start → end", f"{load.get('start')} → {load.get('end')}"],
        ],
    ) + [""]
    lines += ["## Times (seconds)", ""]
    lines += md_table(["phase", "s"], [[k, round(v, 1)] for k, v in timings.items()]) + [""]

    lines += ["## Core metrics (SAE-Bench)", ""]
    core_rows = [[label] + [results["metrics"][n].get("core", {}).get(k) for n in names] for k, label in CORE_ROWS]
    core_rows = [r for r in core_rows if any(v is not None for v in r[1:])]
    if core_rows:
        lines += md_table(["metric", *names], core_rows) + [""]
    else:
        lines += [f"not run ({status.get('core', 'evals off')})", ""]
    lines += ["## Plugin metrics", ""]
    plug_rows = [[label] + [results["metrics"][n].get(e, {}).get(k) for n in names] for e, k, label in PLUGIN_ROWS]
    plug_rows = [r for r in plug_rows if any(v is not None for v in r[1:])]
    if plug_rows:
        lines += md_table(["metric", *names], plug_rows) + [""]
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
            lines += md_table(
                ["level", "n_latents", *cols],
                [[r.get("level"), r.get("n_latents"), *[r.get(c) for c in cols]] for r in rows],
            ) + [""]
    if status:
        lines += ["## Evals", ""] + md_table(["eval", "status"], sorted(status.items())) + [""]
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


def stdout_summary(results: dict[str, Any], timings: dict[str, float], out: Path) -> str:
    names = list(results["metrics"])
    rows = []
    for e, k, label in [("core", k, lb) for k, lb in CORE_ROWS[:6]] + list(PLUGIN_ROWS[1:3]):
        vals = [results["metrics"][n].get(e, {}).get(k) for n in names]
        if any(v is not None for v in vals):
            rows.append([label, *vals])
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    lines += [f"{r[0]:<{width}}  " + "  ".join(f"{fmt(v):>12}" for v in r[1:]) for r in rows]
    lines.append(f"total {timings['total']:.0f} s. Report: {out.resolve()}/summary.md (tree: tree.md)")
    return "\n".join(lines)


# tree.md


def _clean(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎").replace("`", "'")


def snippet(model: HookedTransformer, row: Sequence[int], pos: int, before: int, after: int) -> str:
    """The decoded tokens around `pos`, the token at `pos` marked «like this»."""
    tok = model.tokenizer
    a, b = max(0, pos - before), min(len(row), pos + after + 1)
    if tok is None:
        pieces = [str(t) for t in row[a:b]]
        return " ".join(pieces[: pos - a] + [f"«{pieces[pos - a]}»"] + pieces[pos - a + 1 :])
    left = str(tok.decode(list(row[a:pos])))
    mid = str(tok.decode([int(row[pos])]))
    right = str(tok.decode(list(row[pos + 1 : b])))
    return f"{_clean(left)}«{_clean(mid)}»{_clean(right)}"


@dataclass
class LatentStats:
    index: int
    level: int
    frequency: float  # fraction of tokens it fires on
    max_act: float
    snippets: list[tuple[str, float]]
    top_tokens: list[tuple[str, float]]  # the tokens it fires on most often, with their share


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
        acts = acts * common.non_special(model, tokens).unsqueeze(-1)
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
        out[j] = LatentStats(
            j,
            int(levels[j]),
            freq,
            float(col.max()) if col.numel() else 0.0,
            chosen,
            _top_tokens(model, tokens.reshape(-1)[col > 0]),
        )
    return out, acts


def _top_tokens(model: HookedTransformer, fired_on: torch.Tensor, n: int = 5) -> list[tuple[str, float]]:
    """The `n` token strings a latent fires on most often, with the share of its firings."""
    if fired_on.numel() == 0:
        return []
    ids, counts = fired_on.unique(return_counts=True)
    order = counts.argsort(descending=True)[:n]
    tok = model.tokenizer

    def text(i: int) -> str:
        return _clean(str(tok.decode([i]))) if tok is not None else str(i)

    return [(text(int(ids[o])), float(counts[o]) / fired_on.numel()) for o in order]


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
    keep = common.non_special(model, tokens)
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
    stats, _ = latent_stats(
        sae, model, tokens, hook_name, sorted(set(chosen)), n_snippets, window, batch_prompts, acts=acts
    )

    def describe(j: int) -> str:
        s = stats[j]
        tops = ", ".join(f"`{t}` {100 * share:.0f}%" for t, share in s.top_tokens)
        return f"fires on {100 * s.frequency:.2f}% of tokens, max {s.max_act:.3g}; mostly on {tops or '–'}"

    def snips(j: int) -> str:
        return " · ".join(f"`{text}` ({value:.3g})" for text, value in stats[j].snippets) or "(none)"

    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    level_fire = [int((freq[sl] > 0).sum()) for sl in sae.level_slices]
    lines += [
        f"{n} held-out prompts of {ctx} tokens ({n_kept} tokens without BOS/EOS/PAD). Latents that "
        f"fire at all on them, per level: "
        + ", ".join(
            f"level {lv}: {c}/{sl.stop - sl.start}" for lv, (c, sl) in enumerate(zip(level_fire, sae.level_slices))
        )
        + ".",
        "",
        f"The {len(roots)} most frequent roots, each with its {n_children} most frequent children and "
        f"their {n_grandchildren} most frequent children (a child is a latent whose learned parent is the "
        "one above it). In each snippet «·» "
        "marks the token with the latent's activation in brackets; ⏎ is a line break.",
        "",
    ]
    as_json: list[dict[str, Any]] = []
    for rank, (r, kids) in enumerate(plan, 1):
        n_kids = len(sae.tree_children(r))
        lines += [f"## {rank}. Root {r} — {describe(r)}; {n_kids} children", "", f"{snips(r)}", ""]
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
