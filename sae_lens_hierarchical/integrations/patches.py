"""Every change this package makes to SAELens, SAE-Bench and their dependencies, in one place.

Each patch is small, idempotent where it is applied at import, and says which upstream
behaviour it works around. `apply_import_patches()` runs when the package is imported; the
context managers run only for the duration of one call.

| patch | where | why (upstream) |
|---|---|---|
| `TORCHVISION_AVAILABLE = False` | datasets | datasets 3.6 imports `torchvision.io.VideoReader`, which torchvision 0.26+ removed, whenever a dataset is torch-formatted (SAELens's ActivationsStore does): huggingface/datasets#8085, pytorch/vision#9373 |
| `JAXTYPING_DISABLE=1` | jaxtyping | jaxtyping 0.3.11's runtime shape checks fail inside SAE-Bench's probe training on its own code path (no upstream issue found) |
| clear loading errors | `sae_lens.loading.pretrained_sae_loaders` | SAELens reads cfg.json / safetensors without naming the file on failure (no upstream issue found) |
| release directory merge | `get_pretrained_saes_directory` | SAELens has no public way to add releases (its directory is one packaged YAML; see decoderesearch/SAELens#433 for the converter route, which does not cover release ids) |
| finer training progress | `MultiSAETrainer._update_pbar` | the multi-SAE bar refreshes every 100 steps, which on a short CPU run shows nothing |
| quiet known warnings | `warnings` filters, a `sae_lens` log filter | SAELens's ActivationsStore compares dataset *rows* with training *tokens* and warns about "fewer samples" on every in-memory dataset (`pipeline.warn_if_data_repeats` says it accurately); `torch.tensor(tensor)` copies inside SAELens and SAE-Bench warn "To copy construct from a tensor"; every SAE with model kwargs in its metadata warns on construction; the runners log "will not be reproducible" when handed the offline model the config names. None is a problem with the user's run (no upstream issues found) |
| `provided_model` | SAE-Bench eval modules | SAE-Bench's `run_eval`s load their model by name (`HookedTransformer.from_pretrained_no_processing`); offline and in-memory models need to be handed in (cf. adamkarvonen/SAEBench PR #8's plan for `run_eval_single_sae`) |
| `absorption_artifacts` | SAE-Bench absorption | absorption writes its probes into the installed package (`sae_bench/artifacts`) |
| `vocab_sample` | SAE-Bench absorption | its cost is linear in the alphabetic vocabulary (47k words for SmolLM2), hours on a CPU; a seeded sample keeps the task and metric |
| `reseed_each_stage` | SAE-Bench absorption | its `run_eval` ignores `random_seed` and draws word splits, ICL examples and probe inits from the global RNGs, so a result depends on the SAEs evaluated before it |
| `stop_at_hook_layer` | a HookedTransformer, during absorption | SAE-Bench runs the whole model to read one `blocks.L` hook; `stop_at_layer` gives the same activations for a fraction of the cost |
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_WRAPPED = "_hsae_wrapped"
# SAE-Bench modules that bind `get_alpha_tokens` at import time: the GT probe's prompts and the
# absorption calculator's ICL word list.
_ABSORPTION_VOCAB_USERS = ("sae_bench.evals.absorption.common", "sae_bench.evals.absorption.feature_absorption")

# Exactly these messages are silenced (regular expressions matched at the message start).
QUIET_WARNINGS = (
    # SAELens ActivationsStore: `len(dataset)` (rows) < `total_training_tokens` (tokens), true of
    # nearly every in-memory dataset; `pipeline.warn_if_data_repeats` says it accurately.
    r"The training dataset contains fewer samples",
    # torch, from `torch.tensor(t)` on a tensor inside SAELens's ActivationsStore and SAE-Bench.
    r"To copy construct from a tensor",
    # SAELens's SAE.__init__ on every SAE whose metadata holds the model's loading kwargs; the
    # evals load the model with exactly those kwargs (`evals.common.load_model`).
    r"\nThis SAE has non-empty model_from_pretrained_kwargs",
)
# SAELens's runners log these when handed a model or dataset object. hsae passes the offline
# model and text that the config itself names (model_name, dataset_path), so the config does
# reproduce the run.
QUIET_LOG_PREFIXES = (
    "override_dataset overrides cfg.dataset_path",
    "override_model overrides cfg.model_name",
    "You just passed in a dataset which will override",
    "You just passed in a model which will override",
)


def apply_import_patches() -> None:
    """The patches that apply for the whole process: environment, loading errors, warnings."""
    _environment()
    _quiet_known_warnings()
    _install_loading_errors()


# ----------------------------------------------------------------------------------------------
# Environment


def _environment() -> None:
    user_set = "JAXTYPING_DISABLE" in os.environ
    os.environ.setdefault("JAXTYPING_DISABLE", "1")
    if not user_set and "jaxtyping" in sys.modules:
        # jaxtyping reads the variable at import; its pytest plugin may have imported it already.
        sys.modules["jaxtyping"].config.update("jaxtyping_disable", True)
    try:
        import datasets.config
    except ImportError:  # a dependency; guarded only for partial installs
        return
    datasets.config.TORCHVISION_AVAILABLE = False


class _QuietLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(QUIET_LOG_PREFIXES)


def _quiet_known_warnings() -> None:
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    sae_lens_logger = logging.getLogger("sae_lens")
    if not any(isinstance(f, _QuietLog) for f in sae_lens_logger.filters):
        sae_lens_logger.addFilter(_QuietLog())


# ----------------------------------------------------------------------------------------------
# Loading errors that name the file and field


def _check_cfg(cfg_dict: Any, cfg_path: Path) -> None:
    import dataclasses

    from sae_lens_hierarchical.config import ARCHITECTURE, HierarchicalSAEConfig, HierarchicalTrainingSAEConfig
    from sae_lens_hierarchical.state_io import HierarchicalSAELoadError

    if not isinstance(cfg_dict, dict):
        raise HierarchicalSAELoadError(
            f"{cfg_path}: must hold a JSON object of SAE config fields, not {type(cfg_dict).__name__}"
        )
    if "architecture" not in cfg_dict:
        raise HierarchicalSAELoadError(f'{cfg_path}: has no \'architecture\' field (e.g. "hierarchical", "batchtopk")')
    arch = cfg_dict.get("architecture")
    if not isinstance(arch, str) or not arch.startswith(ARCHITECTURE):
        return
    if arch != ARCHITECTURE:
        from sae_lens.registry import SAE_CLASS_REGISTRY

        if arch not in SAE_CLASS_REGISTRY:
            raise HierarchicalSAELoadError(
                f"{cfg_path}: architecture={arch!r} is not a registered SAELens architecture "
                f"(this sae_lens_hierarchical provides {ARCHITECTURE!r}); the SAE was saved by "
                "another version of the plugin"
            )
        return
    training_only = {f.name for f in dataclasses.fields(HierarchicalTrainingSAEConfig)} - {
        f.name for f in dataclasses.fields(HierarchicalSAEConfig)
    }
    cls = HierarchicalTrainingSAEConfig if training_only & set(cfg_dict) else HierarchicalSAEConfig
    try:
        cls.from_dict(dict(cfg_dict))
    except (ValueError, TypeError, KeyError) as e:
        raise HierarchicalSAELoadError(f"{cfg_path}: {e}") from e
    details = (cfg_dict.get("metadata") or {}).get("training_architecture_details")
    if cls is HierarchicalSAEConfig and details:  # what TrainingSAE.load_from_disk builds from it
        try:
            HierarchicalTrainingSAEConfig.from_dict(dict(cfg_dict))
        except (ValueError, TypeError, KeyError) as e:
            raise HierarchicalSAELoadError(f"{cfg_path} (metadata.training_architecture_details): {e}") from e


def _wrap_config_reader(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_sae_lens_config_from_disk(
        path: str | Path, device: str | None = None, cfg_overrides: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        cfg_path = Path(path) / "cfg.json"
        raw: Any = {}
        with contextlib.suppress(OSError, ValueError):  # (unreadable files: SAELens's own error, wrapped below)
            raw = json.loads(cfg_path.read_text())
        if not isinstance(raw, dict):  # SAELens would fail indexing it, without naming the file
            _check_cfg(raw, cfg_path)
        try:
            cfg_dict = original(path, device, cfg_overrides)
        except json.JSONDecodeError as e:
            raise json.JSONDecodeError(f"{cfg_path} is not valid JSON: {e.msg}", e.doc, e.pos) from e
        _check_cfg(cfg_dict, cfg_path)
        return cfg_dict

    setattr(get_sae_lens_config_from_disk, _WRAPPED, original)
    return get_sae_lens_config_from_disk


def _wrap_weights_reader(original: Callable[..., Any]) -> Callable[..., Any]:
    from sae_lens_hierarchical.config import ARCHITECTURE
    from sae_lens_hierarchical.state_io import HierarchicalSAELoadError

    @functools.wraps(original)
    def read_sae_components_from_disk(
        cfg_dict: dict[str, Any], weight_path: str | Path, *args: Any, **kwargs: Any
    ) -> Any:
        if cfg_dict.get("architecture") != ARCHITECTURE:
            return original(cfg_dict, weight_path, *args, **kwargs)
        path = Path(weight_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: a hierarchical SAE directory holds cfg.json and "
                "sae_weights.safetensors (SAELens's format)"
            )
        try:
            return original(cfg_dict, weight_path, *args, **kwargs)
        except Exception as e:
            if type(e).__name__ != "SafetensorError" and not isinstance(e, OSError):
                raise
            raise HierarchicalSAELoadError(
                f"{path} cannot be read ({type(e).__name__}: {e}); the file is truncated or "
                "corrupted: save or download it again"
            ) from e

    setattr(read_sae_components_from_disk, _WRAPPED, original)
    return read_sae_components_from_disk


def _install_loading_errors() -> None:
    """Wrap SAELens's cfg.json and safetensors readers once (every loading entry point,
    `SAE.load_from_disk`, `TrainingSAE.load_from_disk` and `SAE.from_pretrained`, goes through
    these two module-level functions). Other architectures pass through untouched; weights that
    do not fit cfg.json are caught by the SAE classes themselves (`state_io.check_loaded_state`)."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    for name, wrap in (
        ("get_sae_lens_config_from_disk", _wrap_config_reader),
        ("read_sae_components_from_disk", _wrap_weights_reader),
    ):
        current = getattr(loaders, name, None)
        if current is None or hasattr(current, _WRAPPED):
            continue  # a future SAELens renamed it (its own messages then apply), or done already
        setattr(loaders, name, wrap(current))


# ----------------------------------------------------------------------------------------------
# The release directory


def install_directory_wrapper(merge: Callable[[dict[str, Any]], None]) -> None:
    """Make every SAELens / SAE-Bench module's `get_pretrained_saes_directory` call `merge` on the
    directory it returns.

    SAELens's function is `functools.cache`d, so merged entries live in its cached dict and a
    `cache_clear()` would drop them; the wrapper re-merges on every call (`merge` must be
    idempotent) and keeps `cache_clear` / `cache_info`. Modules that imported the function by
    name get the wrapper too; modules imported later read it from its home module.
    """
    from sae_lens.loading import pretrained_saes_directory as home

    current = home.get_pretrained_saes_directory
    original = getattr(current, "_hsae_original", current)
    if getattr(current, "_hsae_merge", None) is not merge:

        @functools.wraps(original)
        def get_pretrained_saes_directory() -> dict[str, Any]:
            directory = original()
            merge(directory)
            return directory

        wrapper: Any = get_pretrained_saes_directory
        wrapper._hsae_original = original
        wrapper._hsae_merge = merge
        wrapper.cache_clear = original.cache_clear
        wrapper.cache_info = original.cache_info
        home.get_pretrained_saes_directory = wrapper
    wrapper = home.get_pretrained_saes_directory
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("sae_lens", "sae_bench")):
            continue
        if getattr(module, "__dict__", {}).get("get_pretrained_saes_directory") in (original, current):
            module.get_pretrained_saes_directory = wrapper  # type: ignore[attr-defined]


def original_directory() -> dict[str, Any]:
    """SAELens's own (cached) directory dict, without going through the wrapper."""
    from sae_lens.loading import pretrained_saes_directory as home

    fn = home.get_pretrained_saes_directory
    return getattr(fn, "_hsae_original", fn)()


# ----------------------------------------------------------------------------------------------
# Training progress


@contextlib.contextmanager
def finer_progress(every_steps: int) -> Iterator[None]:
    """Refresh SAELens's multi-SAE training bar every `every_steps` steps (its default is 100).
    Restored on exit; a no-op if SAELens renames the method."""
    try:
        from sae_lens.training.multi_sae_trainer import MultiSAETrainer
    except ImportError:
        yield
        return
    original = getattr(MultiSAETrainer, "_update_pbar", None)
    if original is None:
        yield
        return

    def update(self: Any, step_outputs: Any, pbar: Any, update_interval: int = 100) -> None:  # noqa: ARG001
        original(self, step_outputs, pbar, update_interval=every_steps)

    MultiSAETrainer._update_pbar = update  # type: ignore[method-assign]
    try:
        yield
    finally:
        MultiSAETrainer._update_pbar = original  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------
# SAE-Bench


@contextlib.contextmanager
def provided_model(module: Any, model: Any) -> Iterator[None]:
    """Make `module.HookedTransformer.from_pretrained_no_processing(...)` return `model`.

    SAE-Bench's run_eval functions load their model through this module-level name; inside the
    block they get `model` (moved to the requested device and dtype) instead, whatever name
    they ask for. The module is restored on exit.
    """
    import torch

    original = module.HookedTransformer

    class _Provided:
        @staticmethod
        def from_pretrained_no_processing(name: str, device: Any = None, dtype: Any = None, **_: Any) -> Any:  # noqa: ARG004
            current = next(model.parameters())
            out = model
            if device is not None and torch.device(device) != current.device:
                out = out.to(device)
            if dtype is not None and dtype != current.dtype:
                out = out.to(dtype)
            return out

        from_pretrained = from_pretrained_no_processing

    module.HookedTransformer = _Provided
    try:
        yield
    finally:
        module.HookedTransformer = original


@contextlib.contextmanager
def absorption_artifacts(artifacts_path: str) -> Iterator[None]:
    """Point SAE-Bench absorption's probe and experiment folders at `artifacts_path/absorption`."""
    from sae_bench.evals.absorption import main as ab

    root = os.path.join(artifacts_path, "absorption")
    k_dir, fa_dir, probes = (os.path.join(root, d) for d in ("k_sparse_probing", "feature_absorption", "probes"))
    originals = (ab.run_k_sparse_probing_experiment, ab.run_feature_absortion_experiment)
    ab.run_k_sparse_probing_experiment = functools.partial(  # type: ignore[assignment]
        originals[0], experiment_dir=k_dir, probes_dir=probes
    )
    ab.run_feature_absortion_experiment = functools.partial(  # type: ignore[assignment]
        originals[1], experiment_dir=fa_dir, sparse_probing_experiment_dir=k_dir, probes_dir=probes
    )
    try:
        yield
    finally:
        ab.run_k_sparse_probing_experiment, ab.run_feature_absortion_experiment = originals


@contextlib.contextmanager
def vocab_sample(n_words: int | None, seed: int = 0) -> Iterator[None]:
    """Restrict SAE-Bench absorption's alphabetic vocabulary to `n_words` words drawn with `seed`.

    Why: the eval's cost is linear in the vocabulary, and by default it uses every alphabetic
    token (47k for SmolLM2, 140k for Gemma-3), which on a CPU is hours of model forwards. A
    uniform random sample keeps the task (the same prompts, the same 80/20 word split, the same
    per-letter metric) and only shrinks the word set; with a fixed seed it is reproducible.

    How: SAE-Bench imports ``get_alpha_tokens`` by name into ``absorption.common`` (GT-probe
    prompts) and ``absorption.feature_absorption`` (the ICL examples of the absorption
    prompts). Inside the block both names return the same sample: the full list, sorted (the
    tokenizer's dict order is not guaranteed), then ``random.Random(seed).sample(n_words)``.
    Both are restored on exit. ``n_words=None`` (or more than there are) keeps every word.

    Note: SAE-Bench caches its GT probe per model name and layer under ``probes_dir``, so
    runs with different samples need different ``artifacts_path`` folders.
    """
    import importlib

    from sae_bench.evals.absorption import vocab

    full = vocab.get_alpha_tokens
    modules = [importlib.import_module(name) for name in _ABSORPTION_VOCAB_USERS]
    originals = [m.get_alpha_tokens for m in modules]
    cache: dict[int, list[str]] = {}

    def sampled_alpha_tokens(tokenizer: Any, *args: Any, **kwargs: Any) -> list[str]:
        key = id(tokenizer)
        if key not in cache:
            words = sorted(full(tokenizer, *args, **kwargs))
            if n_words is not None and n_words < len(words):
                words = random.Random(seed).sample(words, n_words)
            cache[key] = words
        return list(cache[key])

    for m in modules:
        m.get_alpha_tokens = sampled_alpha_tokens
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.get_alpha_tokens = original


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's `random`, NumPy and torch for the block; restore their states after.

    Why: SAE-Bench's absorption eval ignores ``config.random_seed``. Its word split
    (``random.sample`` in ``create_dataset_probe_training``), the ICL examples of every prompt
    (``create_icl_prompt``), and the GT and L1 probes' initialisation and batch order (torch)
    all draw from the global generators, so two runs on the same words give different numbers.
    """
    import numpy as np
    import torch

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def reseed_each_stage(seed: int) -> Iterator[None]:
    """Run each stage of SAE-Bench's absorption eval under :func:`seeded` (`seed`).

    Why: inside one ``run_eval`` the GT probe (trained once per model and layer, then cached)
    and every SAE's experiments draw from the same global generators one after the other, so
    an SAE's number would depend on the SAEs evaluated before it in the call and on whether
    the GT probe was trained or loaded. Reseeding at the start of
    ``common.train_and_save_probes`` (GT probe: word split, ICL examples, probe),
    ``run_k_sparse_probing_experiment`` and ``run_feature_absortion_experiment`` (per SAE:
    L1 probe, calculator ICL examples) makes each result a function of (model, layer,
    vocabulary sample, seed, SAE) only. The three module names are restored on exit.
    """
    from sae_bench.evals.absorption import common
    from sae_bench.evals.absorption import main as ab

    targets = [
        (common, "train_and_save_probes"),
        (ab, "run_k_sparse_probing_experiment"),
        (ab, "run_feature_absortion_experiment"),
    ]
    originals = [getattr(m, name) for m, name in targets]

    def reseeding(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with seeded(seed):
                return fn(*args, **kwargs)

        return wrapper

    for (m, name), fn in zip(targets, originals):
        setattr(m, name, reseeding(fn))
    try:
        yield
    finally:
        for (m, name), fn in zip(targets, originals):
            setattr(m, name, fn)


_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


@contextlib.contextmanager
def stop_at_hook_layer(model: Any) -> Iterator[None]:
    """Make `model.run_with_cache(..., names_filter=[hooks])` stop after the last hooked block.

    Why: SAE-Bench reads only ``blocks.L.hook_resid_post`` but runs the whole model (and the
    unembedding) for every prompt. For SmolLM2 at layer 3 that is 30 blocks where 4 suffice.
    ``stop_at_layer=L+1`` runs blocks 0..L, so the cached activation is the same tensor.

    Applies only when `names_filter` is a string or a list of ``blocks.<n>.`` hook names and the
    caller did not pass ``stop_at_layer``; anything else goes through unchanged. Patched on the
    instance, removed on exit.
    """
    had_own = "run_with_cache" in vars(model)
    original = model.run_with_cache

    def run_with_cache(*args: Any, **kwargs: Any) -> Any:
        names = kwargs.get("names_filter")
        if isinstance(names, str):
            names = [names]
        if "stop_at_layer" not in kwargs and isinstance(names, (list, tuple)) and names:
            layers = [_BLOCK_HOOK.match(n) for n in names if isinstance(n, str)]
            if len(layers) == len(names) and all(layers):
                kwargs["stop_at_layer"] = max(int(m.group(1)) for m in layers) + 1  # type: ignore[union-attr]
        return original(*args, **kwargs)

    model.run_with_cache = run_with_cache
    try:
        yield
    finally:
        if had_own:
            model.run_with_cache = original
        else:
            del model.run_with_cache
