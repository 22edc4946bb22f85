"""Run the plugin evals and the applicable stock SAE-Bench evals over a set of SAEs.

The counterpart of SAE-Bench's `custom_saes/run_all_evals_custom_saes.py` for this package
(SAE-Bench has no plugin registry): one call, one model and one token source for every SAE,
results in SAE-Bench's layout `<output_dir>/<eval>/<release>_<sae_id>_eval_results.json`,
then `reporting.build_report` over that folder. `hsae eval` is the command line over it.

Which stock evals apply:
* core and meta_structure: always;
* sparse_probing: when its datasets can be read locally (a folder named like the dataset under
  `probe_data_dir`, e.g. LabHC/bias_in_bios) or when asked for explicitly (then from the Hub);
  the levelwise eval's per-level probing follows the same rule;
* absorption: only when asked for (it needs a model that encodes first letters, >= 2B
  parameters in SAE-Bench's advice); SAE-Bench skips it when too few letters are decodable;
* autointerp: only when asked for and an LLM judge key is set (levelwise autointerp likewise
  runs whenever a key is set).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_lens_hierarchical.evals import common, stock

PLUGIN_EVALS = ("hierarchy", "levelwise", "path_attribution")
ALL_EVALS = PLUGIN_EVALS + stock.STOCK_EVALS
DEFAULT_EVALS = PLUGIN_EVALS + ("core", "meta_structure", "sparse_probing")
DEFAULT_PROBE_DATASETS = ("LabHC/bias_in_bios_class_set1",)


@dataclass
class RunSettings:
    """Knobs shared by every eval of a run (each eval keeps SAE-Bench's defaults otherwise)."""

    dataset_name: str = "Skylion007/openwebtext"
    context_size: int = 128
    n_eval_prompts: int = 256
    batch_size_prompts: int = 16
    llm_dtype: str = "float32"
    random_seed: int = 42
    core_batches: int = 10
    """Core eval batches of batch_size_prompts prompts for CE/KL (the whole model runs)."""
    core_sparsity_batches: int | None = None
    """Core eval batches for L0 / explained variance (the model up to the hook); None: core_batches."""
    meta_structure_steps: int = 1500
    probe_datasets: Sequence[str] = DEFAULT_PROBE_DATASETS
    probe_train_set_size: int = 4000
    probe_test_set_size: int = 1000
    probe_context_length: int = 128
    probe_k_values: Sequence[int] = (1, 2, 5)
    probe_data_dir: str | None = None
    path_n_latents: int = 8
    absorption_words: int | None = None
    """Absorption's vocabulary sample (`stock.CPU_N_WORDS` on a CPU); None: SAE-Bench's whole
    alphabetic vocabulary (its default, the setting for a GPU)."""
    posthoc_level_widths: Sequence[int] | None = None
    """Level widths of a flat SAE's level post-hoc tree in the hierarchy eval (adding up to its
    d_sae; e.g. the compared HSAE's level_widths); None: 1:4:16 of d_sae."""
    api_key_env: str = "OPENAI_API_KEY"
    trust_remote_code: bool = False
    """Let a Hugging Face dataset named by the user run its own loading script (core eval)."""
    extra: dict[str, Any] = field(default_factory=dict)


def probe_data_status(names: Sequence[str], probe_data_dir: str | None) -> tuple[bool, str]:
    """(local copy found for every dataset, message). SAE-Bench reads e.g.
    'LabHC/bias_in_bios_class_set1' from the folder LabHC/bias_in_bios."""
    root = probe_data_dir or os.getcwd()
    missing = []
    for name in names:
        base = name.split("_class_set")[0].split("_sentiment")[0]
        if not os.path.isdir(os.path.join(root, base)):
            missing.append(base)
    if missing:
        return False, f"no local copy of {sorted(set(missing))} under {root}"
    return True, f"local copies under {root}"


@contextlib.contextmanager
def working_dir(path: str | None) -> Iterator[None]:
    """Run SAE-Bench's dataset loading from `path` (datasets.load_dataset resolves names there)."""
    if path is None:
        yield
        return
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


CACHE_MANIFEST = "sae_weights.json"


def _cached_files(roots: Sequence[str], prefix: str) -> list[str]:
    """Files and folders SAE-Bench and the plugin evals keep for the SAE whose result files are
    named `<prefix>_...` (also `layer_<n>_<prefix>...` and a folder named `<prefix>`)."""
    pattern = re.compile(rf"^(layer_\d+_)?{re.escape(prefix)}(_|\.|$)")
    found: list[str] = []
    for root in dict.fromkeys(roots):
        for here, dirs, files in os.walk(root):
            for d in [d for d in dirs if d == prefix]:
                found.append(os.path.join(here, d))
                dirs.remove(d)
            found += [os.path.join(here, f) for f in files if pattern.match(f)]
    return found


def sync_result_cache(
    saes: Sequence[tuple[str, Any]], output_dir: str, roots: Sequence[str], force_rerun: bool
) -> None:
    """Results are reused only for the weights they were made from.

    `output_dir/sae_weights.json` records each local SAE's weights digest
    (`state_io.tensor_digest`) next to its results. An SAE whose cached results came from other
    weights (or from before digests were kept) has them removed, so every eval recomputes them;
    one with the same weights is said to reuse them.
    """
    import json

    from sae_lens_hierarchical.state_io import tensor_digest

    manifest_path = os.path.join(output_dir, CACHE_MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    for release, sae in saes:
        if isinstance(sae, str):
            continue  # a pretrained SAE is named by its release id
        prefix = f"{release}_custom_sae"
        digest = tensor_digest(sae.state_dict())
        cached = _cached_files(roots, prefix)
        if cached and manifest.get(prefix) != digest:
            for path in cached:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            why = "other weights" if prefix in manifest else "weights this folder has no record of"
            print(f"{release}: the cached results in {output_dir} were made from {why}; recomputing them")
        elif cached and not force_rerun:
            print(f"{release}: reusing the cached results in {output_dir} (same weights, sha256 {digest[:12]})")
        manifest[prefix] = digest
    os.makedirs(output_dir, exist_ok=True)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)


def run_all_evals(
    selected_saes: common.SelectedSAEs,
    model: Any,
    output_dir: str,
    evals: Sequence[str] = DEFAULT_EVALS,
    dataset: Any = None,
    settings: RunSettings | None = None,
    device: str = "cpu",
    force_rerun: bool = False,
    artifacts_path: str | None = None,
    explicit: Sequence[str] = (),
) -> dict[str, str]:
    """Run `evals` on every SAE; returns {eval: "ok" | "skipped: reason"}.

    selected_saes: (release, sae_id) pairs or (unique name, SAE object) pairs.
    model: the HookedTransformer every eval uses.
    dataset: the token source (a Dataset, token tensor or name); None: settings.dataset_name.
    explicit: evals the user asked for by name (sparse_probing then runs even without a local
        copy of its data, i.e. from the Hub).
    """
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

    from sae_lens_hierarchical.evals.hierarchy import main as hierarchy
    from sae_lens_hierarchical.evals.hierarchy.eval_config import HierarchyEvalConfig
    from sae_lens_hierarchical.evals.levelwise import main as levelwise
    from sae_lens_hierarchical.evals.levelwise.eval_config import LevelwiseEvalConfig
    from sae_lens_hierarchical.evals.path_attribution import main as path_attribution
    from sae_lens_hierarchical.evals.path_attribution.eval_config import PathAttributionEvalConfig

    unknown = [e for e in evals if e not in ALL_EVALS]
    if unknown:
        raise ValueError(f"unknown evals {unknown}; choose from {ALL_EVALS}")
    s = settings or RunSettings()
    grad = torch.is_grad_enabled()
    output_dir = os.path.abspath(output_dir)
    artifacts_path = os.path.abspath(artifacts_path or os.path.join(output_dir, "artifacts"))
    probe_dir = os.path.abspath(s.probe_data_dir) if s.probe_data_dir else None
    saes = list(selected_saes)
    status: dict[str, str] = {}
    if dataset is None:
        dataset = common.resolve_dataset(None, s.dataset_name, model, s.context_size)
    key = os.environ.get(s.api_key_env)
    local_probe, probe_msg = probe_data_status(s.probe_datasets, probe_dir)
    probing = ("sparse_probing" in evals) and (local_probe or "sparse_probing" in explicit)
    sync_result_cache(saes, output_dir, [output_dir, artifacts_path], force_rerun)

    shared = dict(
        model_name=model.cfg.model_name,
        dataset_name=s.dataset_name,
        context_size=s.context_size,
        n_eval_prompts=s.n_eval_prompts,
        batch_size_prompts=s.batch_size_prompts,
        llm_dtype=s.llm_dtype,
        random_seed=s.random_seed,
    )

    def out(name: str) -> str:
        return os.path.join(output_dir, name)

    for name in evals:
        print(f"== {name}")
        if name == "hierarchy":
            widths = list(s.posthoc_level_widths) if s.posthoc_level_widths is not None else None
            hierarchy.run_eval(
                HierarchyEvalConfig(**shared, posthoc_level_widths=widths),
                saes,
                device,
                out(name),
                force_rerun,
                model,
                dataset,
            )
        elif name == "levelwise":
            cfg = LevelwiseEvalConfig(
                **shared,
                run_sparse_probing=probing,
                sparse_probing_dataset_names=list(s.probe_datasets),
                probe_train_set_size=s.probe_train_set_size,
                probe_test_set_size=s.probe_test_set_size,
                probe_context_length=s.probe_context_length,
                probe_k_values=list(s.probe_k_values),
                autointerp_api_key_env=s.api_key_env,
            )
            with working_dir(probe_dir if probing else None):
                levelwise.run_eval(cfg, saes, device, out(name), force_rerun, model, dataset, artifacts_path)
        elif name == "path_attribution":
            cfg = PathAttributionEvalConfig(**shared, n_latents=s.path_n_latents)
            path_attribution.run_eval(cfg, saes, device, out(name), force_rerun, model, dataset)
        elif name == "core":
            core_data = dataset
            if isinstance(dataset, torch.Tensor):  # core reads rows through an ActivationsStore
                from datasets import Dataset

                core_data = Dataset.from_dict({"tokens": dataset.tolist()})
            stock.run_core(
                saes,
                model,
                core_data,  # type: ignore[arg-type]
                out(name),
                device,
                dataset_name=s.dataset_name,
                context_size=s.context_size,
                batch_size_prompts=s.batch_size_prompts,
                n_eval_reconstruction_batches=s.core_batches,
                n_eval_sparsity_variance_batches=s.core_sparsity_batches or s.core_batches,
                exclude_special_tokens_from_reconstruction=model.tokenizer is not None,
                llm_dtype=s.llm_dtype,
                force_rerun=force_rerun,
                shuffle_seed=s.random_seed,
                trust_remote_code=s.trust_remote_code,
            )
        elif name == "meta_structure":
            stock.run_meta_structure(
                saes,
                out(name),
                device,
                MetaStructureEvalConfig(train_steps=s.meta_structure_steps, random_seed=s.random_seed),
                force_rerun,
            )
        elif name == "sparse_probing":
            if not probing:
                status[name] = f"skipped: {probe_msg} (name sparse_probing explicitly to read the Hub)"
                print(status[name])
                continue
            cfg = SparseProbingEvalConfig(
                random_seed=s.random_seed,
                dataset_names=list(s.probe_datasets),
                probe_train_set_size=s.probe_train_set_size,
                probe_test_set_size=s.probe_test_set_size,
                context_length=s.probe_context_length,
                k_values=list(s.probe_k_values),
                llm_batch_size=s.batch_size_prompts,
                llm_dtype=s.llm_dtype,
                model_name=model.cfg.model_name,
            )
            with working_dir(probe_dir):
                stock.run_sparse_probing(saes, model, out(name), device, cfg, force_rerun, artifacts_path)
        elif name == "absorption":
            words = (
                s.absorption_words
                if s.absorption_words is not None
                else (stock.CPU_N_WORDS if str(device).startswith("cpu") else None)
            )
            with working_dir(common.output_dir(artifacts_path)):  # its per-SAE json goes to ./artifacts/absorption
                if words is None:
                    cfg = AbsorptionEvalConfig(
                        model_name=model.cfg.model_name, llm_dtype=s.llm_dtype, random_seed=s.random_seed
                    )
                    res = stock.run_absorption(saes, model, out(name), device, cfg, force_rerun, artifacts_path)
                else:
                    cfg = stock.cpu_absorption_config(model.cfg.model_name, llm_dtype=s.llm_dtype)
                    res = stock.run_cpu_absorption(
                        saes,
                        model,
                        out(name),
                        n_words=words,
                        seed=s.random_seed,
                        config=cfg,
                        artifacts_path=artifacts_path,
                        device=device,
                        force_rerun=force_rerun,
                    )
            if res is None:
                status[name] = "skipped: SAE-Bench found too few first-letter features in this model"
                continue
        elif name == "autointerp":
            if not key:
                status[name] = f"skipped: no LLM judge (set {s.api_key_env})"
                print(status[name])
                continue
            tokens = None
            if not isinstance(dataset, str):
                ctx = common.EvalContext(HierarchyEvalConfig(**shared), device, model, dataset)
                sae0 = common.load_saes(saes[:1], device).__next__()[2]
                tokens = ctx.tokens(sae0)
            stock.run_autointerp(saes, model, out(name), key, device, None, force_rerun, artifacts_path, tokens)
        status[name] = "ok"
    torch.set_grad_enabled(grad)  # some SAE-Bench evals switch gradients globally
    return status
