"""Checks every config passes before anything loads: YAML without duplicate keys, value ranges,
finite numbers, a known model name and a layer that exists in it.

Each check raises `cli_args.FieldError` whose message names the file (or flag), the field, its
value and what is allowed; `hsae train`, `hsae train --check` and `hsae demo` turn it into exit
code 2. The model checks read only names and configs (the offline registry, TransformerLens's
list of official names, a config.json already in the Hugging Face cache), never weights or the
network, so `--check` stays instant.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from typing import Any

import yaml

from sae_lens_hierarchical.cli_args import FieldError

# ----------------------------------------------------------------------------------------------
# YAML: the last of two equal keys silently wins in PyYAML; here it is an error naming both lines.


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)  # type: ignore[arg-type]
        line = key_node.start_mark.line + 1
        if key in seen:
            raise FieldError(
                f"{loader.name}: key {key!r} appears twice (lines {seen[key]} and {line}); "
                "YAML would silently keep the last one"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, name: str = "<string>") -> Any:
    """`yaml.safe_load` that refuses duplicate keys (FieldError naming both lines)."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


# ----------------------------------------------------------------------------------------------
# Value ranges. A field is checked wherever it appears (runner config, `sae:` section, demo).

POSITIVE = "a finite number > 0"
NONNEG = "a finite number >= 0"
UNIT = "a number in [0, 1]"
OPEN_UNIT = "a number in (0, 1]"
BETA = "a number in [0, 1)"

RANGES: dict[str, str] = {
    # LanguageModelSAERunnerConfig
    "lr": POSITIVE,
    "training_tokens": POSITIVE,
    "train_batch_size_tokens": POSITIVE,
    "context_size": POSITIVE,
    "store_batch_size_prompts": POSITIVE,
    "n_batches_in_buffer": POSITIVE,
    "n_checkpoints": NONNEG,
    "lr_warm_up_steps": NONNEG,
    "lr_decay_steps": NONNEG,
    "lr_end": NONNEG,
    "dead_feature_window": POSITIVE,
    "feature_sampling_window": POSITIVE,
    "dead_feature_threshold": NONNEG,
    "adam_beta1": BETA,
    "adam_beta2": BETA,
    "activations_mixing_fraction": UNIT,
    "n_eval_batches": NONNEG,
    "eval_batch_size_prompts": POSITIVE,
    # SyntheticSAERunnerConfig
    "training_samples": POSITIVE,
    "batch_size": POSITIVE,
    "eval_samples": NONNEG,
    # SAE configs (every architecture)
    "d_in": POSITIVE,
    "d_sae": POSITIVE,
    "k": POSITIVE,
    "l1_coefficient": NONNEG,
    "aux_loss_coefficient": NONNEG,
    "topk_threshold_lr": OPEN_UNIT,
    "kl_coefficient": NONNEG,
    "l2_coefficient": NONNEG,
    "l2_until_step": NONNEG,
    "tree_every": POSITIVE,
    "tree_min_cofire": UNIT,
    "tree_unassigned": UNIT,
    "tree_min_lift": NONNEG,
    "projection_rank": POSITIVE,
    "n_levels": POSITIVE,
    "n_roots": POSITIVE,
}
# Lists whose every item must be in range.
LIST_RANGES: dict[str, str] = {
    "level_widths": POSITIVE,
    "k_per_level": POSITIVE,
    "branching": POSITIVE,
    "level_recon_weights": NONNEG,
    "matryoshka_widths": POSITIVE,
}


def _in_range(value: Any, allowed: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return {
        POSITIVE: value > 0,
        NONNEG: value >= 0,
        UNIT: 0 <= value <= 1,
        OPEN_UNIT: 0 < value <= 1,
        BETA: 0 <= value < 1,
    }[allowed]


def check_ranges(section: dict[str, Any], where: str = "", path: str = "config") -> None:
    """Every known field of `section` in its range, and every number anywhere in it finite.

    Run after `cli_args.check_fields`, so numbers are numbers. A value that is None (a field's
    "not set") is left alone."""
    for key, value in section.items():
        name = f"{path}: {where}{key}={value!r} is invalid"
        if value is None:
            continue
        if key in RANGES and not _in_range(value, RANGES[key]):
            raise FieldError(f"{name}: expected {RANGES[key]}")
        if key in LIST_RANGES and isinstance(value, list):
            bad = [v for v in value if not _in_range(v, LIST_RANGES[key])]
            if bad:
                raise FieldError(f"{name}: every item must be {LIST_RANGES[key]} (not {bad[0]!r})")
        if isinstance(value, float) and not math.isfinite(value):
            raise FieldError(f"{name}: expected a finite number")
        if isinstance(value, dict):
            check_ranges(value, f"{where}{key}.", path)


# ----------------------------------------------------------------------------------------------
# Models: the name is one TransformerLens (or the offline registry) knows, and the hook's layer
# exists. Read from names and cached configs only.


def known_model_names() -> list[str]:
    """Offline names and aliases, then TransformerLens's official names and aliases."""
    from sae_lens_hierarchical import models

    names = [a for spec in models.OFFLINE_MODELS.values() for a in (spec.name, *spec.aliases)]
    try:
        from transformer_lens import supported_models as tl

        names += list(tl.OFFICIAL_MODEL_NAMES)
        names += [a for aliases in tl.MODEL_ALIASES.values() for a in aliases]
    except Exception:  # pragma: no cover - TransformerLens without these tables
        pass
    return names


def _tl_official_name(name: str) -> str | None:
    try:
        from transformer_lens import supported_models as tl

        lowered = name.lower()
        for official in tl.OFFICIAL_MODEL_NAMES:
            if official.lower() == lowered:
                return official
        for official, aliases in tl.MODEL_ALIASES.items():
            if any(a.lower() == lowered for a in aliases):
                return official
    except Exception:  # pragma: no cover
        return None
    return None


def check_model_name(name: Any, field: str, path: str) -> None:
    """`name` an offline model, a TransformerLens name or alias, or a local folder; else the
    closest known names."""
    from pathlib import Path

    from sae_lens_hierarchical import models

    if not isinstance(name, str) or not name:
        raise FieldError(f"{path}: {field}={name!r} is invalid: expected a model name")
    if models.canonical_offline_name(name) or _tl_official_name(name) or Path(name).exists():
        return
    names = known_model_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5) or difflib.get_close_matches(
        name.lower(), [n.lower() for n in names], n=3, cutoff=0.5
    )
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise FieldError(
        f"{path}: {field}={name!r} is not a model TransformerLens or the offline registry knows{hint} "
        f"(offline: {', '.join(sorted(models.OFFLINE_MODELS))})"
    )


def model_n_layers(name: str) -> int | None:
    """Layers of the named model from its config alone (offline registry, or a config.json
    already in the Hugging Face cache); None when no config is at hand without the network."""
    from sae_lens_hierarchical import models

    canonical = models.canonical_offline_name(name)
    if canonical is not None:
        return models.OFFLINE_MODELS[canonical].n_layers
    official = _tl_official_name(name)
    if official is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(official, "config.json")
    except Exception:
        return None
    if not isinstance(cached, str):
        return None
    try:
        with open(cached) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    text_config = config.get("text_config") or {}
    value = text_config.get("num_hidden_layers")
    return int(value) if isinstance(value, int) else None


def hook_layer(hook_name: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", hook_name or "")
    return int(match.group(1)) if match else None


def check_layer(model_name: str, layer: int | None, field: str, value: Any, path: str) -> None:
    """The hook's layer exists in the model (when its config can be read without the network)."""
    if layer is None:
        return
    n_layers = model_n_layers(model_name)
    if n_layers is not None and not 0 <= layer < n_layers:
        raise FieldError(
            f"{path}: {field}={value!r} is invalid: {model_name} has {n_layers} layers (blocks.0 to blocks.{n_layers - 1})"
        )
