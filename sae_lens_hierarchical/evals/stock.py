"""SAE-Bench's own evals, run unchanged on hierarchical and flat SAEs with a model in hand.

SAE-Bench's `run_eval` functions load their model by name with
`HookedTransformer.from_pretrained_no_processing`, and core's `multiple_evals` reads its
tokens from a dataset *name*. Neither works for a model built in memory (or loaded offline by
`sae_lens_hierarchical.models.load_model`) or for tokens that are not on the Hub. So:

* core: the same steps as SAE-Bench's `multiple_evals` (`load_and_format_sae`,
  `ActivationsStore.from_sae`, `run_evals`, `calculate_misc_metrics`,
  `replace_nans_with_negative_one`, `save_single_eval_result`), with the model and the dataset
  (a name, or an in-memory text or pretokenized `datasets.Dataset`) passed in. Nothing of
  SAE-Bench's is replaced.
* sparse_probing, absorption, autointerp: SAE-Bench's own `run_eval`, with `provided_model`
  making its module-level model loader return the model in hand (for the duration of the call
  only). Their datasets are read by SAE-Bench as usual: the Hub, or for sparse probing a local
  folder of the same name under the working directory (`datasets.load_dataset` reads
  "LabHC/bias_in_bios" from ./LabHC/bias_in_bios when it exists).
* meta_structure: SAE-Bench's `run_eval` as it is (it only reads W_dec).

Absorption writes its probes into the installed package by default
(`sae_bench/artifacts/absorption`); `absorption_artifacts` points them at `artifacts_path`.
Its run_eval needs a model that linearly encodes first letters; on others it prints
"Cannot evaluate absorption" and writes nothing, which `run_absorption` reports as None.

A hierarchical SAE's flat `W_dec` has unit-norm rows (folded at save time), so the evals that
read decoder rows as directions (absorption, SCR/TPP) see what they assume.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_hierarchical.evals import common
from sae_lens_hierarchical.integrations import patches
from sae_lens_hierarchical.integrations.patches import absorption_artifacts, provided_model

if TYPE_CHECKING:
    import datasets as hf_datasets
    from transformer_lens import HookedTransformer

STOCK_EVALS = ("core", "sparse_probing", "meta_structure", "absorption", "autointerp")


def _model_name(model: HookedTransformer, name: str | None) -> str:
    return name or model.cfg.model_name


def run_core(
    selected_saes: common.SelectedSAEs,
    model: HookedTransformer,
    dataset: hf_datasets.Dataset | str,
    output_path: str,
    device: str = "cpu",
    *,
    dataset_name: str | None = None,
    context_size: int = 128,
    batch_size_prompts: int = 16,
    n_eval_reconstruction_batches: int = 10,
    n_eval_sparsity_variance_batches: int = 1,
    exclude_special_tokens_from_reconstruction: bool = False,
    trust_remote_code: bool = False,
    llm_dtype: str = "float32",
    force_rerun: bool = False,
    shuffle_seed: int = 42,
) -> dict[str, str]:
    """SAE-Bench's core eval on each SAE: `multiple_evals`' steps with a model and data in hand.

    dataset: a dataset name (the Hub or a local folder of text) or an in-memory
        `datasets.Dataset` (a `text` column, or pretokenized `tokens` rows of context_size).
    dataset_name: the label recorded in the output's eval_config (default: the name, or
        "in-memory").
    Returns {"<release>_<sae_id>": results file}. Unlike `multiple_evals`, an error is raised,
    not logged and skipped.
    """
    import sae_bench.evals.core.main as core
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.sae_bench_utils import general_utils
    from sae_lens.training.activations_store import ActivationsStore

    common.output_dir(output_path)
    header = common.eval_header()
    label = dataset_name or (dataset if isinstance(dataset, str) else "in-memory")
    dtype = general_utils.str_to_dtype(llm_dtype)
    tok = model.tokenizer
    ignore: set[int | None] = (
        {int(t) for t in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) if t is not None}  # type: ignore[arg-type]
        if tok is not None
        else set()
    )
    written: dict[str, str] = {}
    for release, sae_object_or_id in selected_saes:
        sae_id, sae, _ = general_utils.load_and_format_sae(release, sae_object_or_id, device)  # type: ignore[misc]
        sae = sae.to(device=device, dtype=dtype)
        path = general_utils.get_results_filepath(output_path, release, sae_id)
        if os.path.exists(path) and not force_rerun:
            print(f"Skipping {release}_{sae_id} as results already exist")
            written[f"{release}_{sae_id}"] = path
            continue
        cfg = CoreEvalConfig(
            model_name=sae.cfg.model_name,
            batch_size_prompts=batch_size_prompts,
            n_eval_reconstruction_batches=n_eval_reconstruction_batches,
            n_eval_sparsity_variance_batches=n_eval_sparsity_variance_batches,
            exclude_special_tokens_from_reconstruction=exclude_special_tokens_from_reconstruction,
            dataset=label,
            context_size=context_size,
            compute_kl=True,
            compute_ce_loss=True,
            compute_l2_norms=True,
            compute_sparsity_metrics=True,
            compute_variance_metrics=True,
            compute_featurewise_density_statistics=True,
            compute_featurewise_weight_based_metrics=True,
            llm_dtype=llm_dtype,
        )
        store = ActivationsStore.from_sae(
            model,
            sae,
            context_size=context_size,
            dataset=dataset,
            # A dataset named on the command line runs its loading script only when the user opts in.
            dataset_trust_remote_code=trust_remote_code,
            store_batch_size_prompts=batch_size_prompts,
            device=device,
        )
        store.shuffle_input_dataset(seed=shuffle_seed)
        eval_metrics: dict[str, Any] = {
            "unique_id": f"{release}_{sae_id}",
            "sae_set": release,
            "sae_id": sae_id,
            "eval_cfg": cfg,
        }
        scalar_metrics, feature_metrics = core.run_evals(
            sae=sae,
            activation_store=store,
            model=model,
            eval_config=cfg,
            ignore_tokens=ignore,
        )
        eval_metrics["metrics"] = scalar_metrics
        eval_metrics["metrics"]["misc_metrics"] = core.calculate_misc_metrics(feature_metrics)
        eval_metrics["feature_metrics"] = feature_metrics
        cleaned = core.replace_nans_with_negative_one(eval_metrics)
        core.save_single_eval_result(
            cleaned, header["eval_id"], header["sae_lens_version"], header["sae_bench_commit_hash"], path, sae
        )
        written[f"{release}_{sae_id}"] = path
    return written


def run_sparse_probing(
    selected_saes: common.SelectedSAEs,
    model: HookedTransformer,
    output_path: str,
    device: str = "cpu",
    config: Any = None,
    force_rerun: bool = False,
    artifacts_path: str = "artifacts",
) -> dict[str, Any]:
    """SAE-Bench's sparse_probing `run_eval`, unchanged, on the model in hand.

    config: a SparseProbingEvalConfig (model_name and llm_dtype default to the model's).
    """
    from sae_bench.evals.sparse_probing import main as sp
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

    config = config or SparseProbingEvalConfig()
    config.model_name = _model_name(model, config.model_name)
    config.llm_dtype = config.llm_dtype or "float32"
    config.llm_batch_size = config.llm_batch_size or 16
    with provided_model(sp, model):
        return sp.run_eval(config, list(selected_saes), device, output_path, force_rerun, artifacts_path=artifacts_path)


def run_meta_structure(
    selected_saes: common.SelectedSAEs,
    output_path: str,
    device: str = "cpu",
    config: Any = None,
    force_rerun: bool = False,
) -> dict[str, Any]:
    """SAE-Bench's meta_structure `run_eval` as it is (a meta-SAE on the decoder rows)."""
    from sae_bench.evals.meta_structure import main as ms
    from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig

    return ms.run_eval(config or MetaStructureEvalConfig(), list(selected_saes), device, output_path, force_rerun)


def run_absorption(
    selected_saes: common.SelectedSAEs,
    model: HookedTransformer,
    output_path: str,
    device: str = "cpu",
    config: Any = None,
    force_rerun: bool = False,
    artifacts_path: str = "artifacts",
) -> dict[str, Any] | None:
    """SAE-Bench's absorption `run_eval`, unchanged, on the model in hand.

    Needs a model with a tokenizer vocabulary of alphabetic words and first-letter
    information at the SAE's layer (`blocks.<layer>.hook_resid_post`, hard-coded by SAE-Bench).
    Returns None when SAE-Bench finds too few first-letter features to evaluate (it then
    writes nothing).
    """
    from sae_bench.evals.absorption import main as ab
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    config = config or AbsorptionEvalConfig()
    config.model_name = _model_name(model, config.model_name)
    common.output_dir(output_path)  # SAE-Bench's absorption does not create it
    grad = torch.is_grad_enabled()
    try:
        with provided_model(ab, model), absorption_artifacts(artifacts_path):
            results = ab.run_eval(config, list(selected_saes), device, output_path, force_rerun)
    finally:
        torch.set_grad_enabled(grad)  # absorption switches gradients on globally
    return results or None


def run_autointerp(
    selected_saes: common.SelectedSAEs,
    model: HookedTransformer,
    output_path: str,
    api_key: str,
    device: str = "cpu",
    config: Any = None,
    force_rerun: bool = False,
    artifacts_path: str = "artifacts",
    tokens: torch.Tensor | None = None,
) -> dict[str, Any]:
    """SAE-Bench's autointerp `run_eval`, unchanged, on the model in hand (needs an LLM judge).

    tokens: [n, context] tokens to judge on, given to autointerp as its token cache (offline
    runs); None lets autointerp read config.dataset_name.
    """
    from sae_bench.evals.autointerp import main as ai
    from sae_bench.evals.autointerp.eval_config import AutoInterpEvalConfig

    config = config or AutoInterpEvalConfig()
    config.model_name = _model_name(model, config.model_name)
    config.llm_dtype = config.llm_dtype or "float32"
    config.llm_batch_size = config.llm_batch_size or 16
    if tokens is not None:
        config.total_tokens = int(tokens.numel())
        config.llm_context_size = int(tokens.shape[1])
        folder = common.output_dir(os.path.join(artifacts_path, "autointerp"))
        name = f"{ai.escape_slash(config.model_name)}_{config.total_tokens}_tokens_{config.llm_context_size}_ctx.pt"
        torch.save(tokens.clone(), os.path.join(folder, name))
    grad = torch.is_grad_enabled()
    try:
        with provided_model(ai, model):
            return ai.run_eval(
                config, list(selected_saes), device, api_key, output_path, force_rerun, artifacts_path=artifacts_path
            )
    finally:
        torch.set_grad_enabled(grad)


# ----------------------------------------------------------------------------------------------
# Absorption at CPU size

# The CPU setting's vocabulary: 8,000 alphabetic tokens drawn with a seed. Two different samples
# agreed within their standard deviation for both SAEs measured (docs/benchmarks.md, "Absorption
# on a CPU"); SAE-Bench's default (every alphabetic token) stays the setting for a GPU.
CPU_N_WORDS = 8000


def artifacts_dir(artifacts_path: str, n_words: int | None, seed: int) -> str:
    """The folder under `artifacts_path` for one vocabulary sample: ``cpu_absorption/<n>_words_seed<s>``.

    SAE-Bench caches the GT probe (the expensive part: one model forward per word) by model
    name and layer under it, so every SAE evaluated with the same model, layer, `n_words` and
    `seed` reuses it, and different samples never share one.
    """
    words = "all" if n_words is None else str(n_words)
    return os.path.join(artifacts_path, "cpu_absorption", f"{words}_words_seed{seed}")


def cpu_absorption_config(model_name: str = "", **overrides: Any) -> Any:
    """SAE-Bench's ``AbsorptionEvalConfig`` with the settings used on a 2-core CPU.

    Only cost knobs differ from SAE-Bench's defaults; the task (template, token position,
    ``max_k_value``, ``f1_jump_threshold``, ``min_GT_probe_f1``, ``min_feats_for_eval``, the
    probes' L1 decay) is unchanged, so the numbers mean the same thing:

    * ``precalc_k_sparse_probe_sae_acts=True``: encode the training activations with the SAE
      once instead of in each of the L1 probe's 50 epochs (SAE-Bench recommends it for small
      SAEs; same result up to float rounding).
    * ``llm_batch_size=32``: the absorption calculator's model batch (default 10) on CPU.
    * ``eval_k_sparse_probe_batch_size=256``: SAE encoding batch of the k-sparse scoring.

    The vocabulary size is not a config field: use :func:`vocab_sample` (``CPU_N_WORDS``).
    ``overrides`` set any other field. On a GPU use ``AbsorptionEvalConfig()`` instead.
    """
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    settings: dict[str, Any] = {
        "model_name": model_name,
        "precalc_k_sparse_probe_sae_acts": True,
        "llm_batch_size": 32,
        "eval_k_sparse_probe_batch_size": 256,
    }
    settings.update(overrides)
    return AbsorptionEvalConfig(**settings)


def run_cpu_absorption(
    selected_saes: Any,
    model: Any,
    output_path: str,
    *,
    n_words: int | None = CPU_N_WORDS,
    seed: int = 0,
    config: Any = None,
    artifacts_path: str = "artifacts",
    device: str = "cpu",
    force_rerun: bool = True,
) -> dict[str, Any] | None:
    """SAE-Bench's absorption ``run_eval``, unchanged, at CPU size.

    ``sae_lens_hierarchical.evals.stock.run_absorption`` (the model in hand) inside
    :func:`vocab_sample` (`n_words`, `seed`), :func:`reseed_each_stage` (`seed`) and
    :func:`stop_at_hook_layer`, with SAE-Bench's probe and experiment folders under
    ``artifacts_dir(artifacts_path, n_words, seed)``. The GT probe found there is reused
    (``force_rerun`` re-runs the per-SAE steps only). `config` defaults to
    :func:`cpu_absorption_config`. Returns run_eval's dict ({"<name>_custom_sae": result}), or
    None when too few letters pass the GT probe (SAE-Bench then writes nothing).
    ``n_words=None`` is SAE-Bench's full vocabulary (still with the seeding and stop_at_layer).
    """
    config = config or cpu_absorption_config()
    with patches.vocab_sample(n_words, seed), patches.reseed_each_stage(seed), patches.stop_at_hook_layer(model):
        return run_absorption(
            selected_saes,
            model,
            output_path,
            device=device,
            config=config,
            force_rerun=force_rerun,
            artifacts_path=artifacts_dir(artifacts_path, n_words, seed),
        )


def train_gt_probe(
    model: Any,
    layer: int,
    *,
    n_words: int | None = CPU_N_WORDS,
    seed: int = 0,
    artifacts_path: str = "artifacts",
    config: Any = None,
) -> dict[str, Any]:
    """Train (or load) SAE-Bench's ground-truth first-letter probe only; return :func:`gt_probe_stats`.

    Why: whether a model encodes first letters at a layer decides whether absorption can be
    measured there at all (SAE-Bench drops letters with GT-probe F1 <= ``min_GT_probe_f1`` and
    gives up below ``min_feats_for_eval`` letters). This is the first stage of
    :func:`run_cpu_absorption` with the same patches, seed and folder, so it needs no SAE, and
    a later :func:`run_cpu_absorption` with the same arguments reuses its probe.
    """
    from sae_bench.evals.absorption import common

    config = config or cpu_absorption_config()
    probes_dir = os.path.join(artifacts_dir(artifacts_path, n_words, seed), "absorption", "probes")
    probe = os.path.join(probes_dir, model.cfg.model_name, f"layer_{layer}", "probe.pth")
    if not os.path.exists(probe):
        with (
            patches.vocab_sample(n_words, seed),
            patches.reseed_each_stage(seed),
            patches.stop_at_hook_layer(model),
            torch.enable_grad(),
        ):
            common.train_and_save_probes(
                model,
                layers=[layer],
                base_template=config.prompt_template,
                pos_idx=config.prompt_token_pos,
                probes_dir=probes_dir,
                device="cpu",
            )
    return gt_probe_stats(probes_dir, model.cfg.model_name, layer)


def gt_probe_stats(probes_dir: str, model_name: str, layer: int) -> dict[str, Any]:
    """Per-letter quality of a GT probe saved by SAE-Bench, on its held-out (test) words.

    F1/precision/recall use SAE-Bench's own rule (``k_sparse_probing.build_metrics_df``: a
    letter's logit > 0, one letter against the rest), so ``f1 > min_GT_probe_f1`` reproduces
    which letters the eval keeps. Also reports the 26-way top-1 accuracy (argmax of the logits)
    and the number of test words per letter.
    """
    import numpy as np
    from sae_bench.evals.absorption.vocab import LETTERS
    from sklearn import metrics

    folder = os.path.join(probes_dir, model_name, f"layer_{layer}")
    from sae_bench.evals.absorption.common import load_probe

    # SAE-Bench's own loader for the probe SAE-Bench wrote (a pickled module in our artifacts folder).
    probe = load_probe(model_name, layer, probes_dir, dtype=torch.float32, device="cpu")
    data = np.load(os.path.join(folder, "data.npz"))
    x, y = torch.from_numpy(data["X_test"]).float(), data["y_test"]
    with torch.no_grad():
        logits = probe(x).numpy()
    letters = {}
    for i, letter in enumerate(LETTERS):
        truth, pred = y == i, logits[:, i] > 0
        letters[letter] = {
            "n_test": int(truth.sum()),
            "f1": float(metrics.f1_score(truth, pred, zero_division=0.0)),  # type: ignore[arg-type]
            "precision": float(metrics.precision_score(truth, pred, zero_division=0.0)),  # type: ignore[arg-type]
            "recall": float(metrics.recall_score(truth, pred, zero_division=0.0)),  # type: ignore[arg-type]
            "auc": float(metrics.roc_auc_score(truth, logits[:, i])) if 0 < truth.sum() < len(y) else None,
        }
    f1s = [v["f1"] for v in letters.values()]
    return {
        "n_train": int(len(data["y_train"])),
        "n_test": int(len(y)),
        "accuracy_26way": float((logits.argmax(1) == y).mean()),
        "mean_f1": float(np.mean(f1s)),
        "letters": letters,
    }
