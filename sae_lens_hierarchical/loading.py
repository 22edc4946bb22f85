"""Clear loading errors for hierarchical SAEs, whichever SAELens entry point reads them.

`SAE.load_from_disk`, `TrainingSAE.load_from_disk` and `SAE.from_pretrained` all read a
saved SAE through two module-level functions of `sae_lens.loading.pretrained_sae_loaders`:
`get_sae_lens_config_from_disk` (cfg.json) and `read_sae_components_from_disk`
(sae_weights.safetensors). `install()` wraps both, in that module only:

* cfg.json that is not valid JSON: the JSONDecodeError (same type) names the file, for any
  architecture;
* a `hierarchical` cfg.json whose fields are invalid (an unknown `variant`, widths that do
  not add up to d_sae, ...), or whose `architecture` is an unknown hierarchical variant:
  HierarchicalSAELoadError naming the file and the field;
* a missing, truncated or corrupted sae_weights.safetensors of a `hierarchical` SAE:
  FileNotFoundError / HierarchicalSAELoadError naming the file.

Other architectures pass through untouched. Weights that do not fit cfg.json (shapes,
missing or extra tensors, NaN/inf values) are caught by the SAE classes themselves, in
`process_state_dict_for_loading` (see `hierarchical_sae.check_loaded_state`), so that check
also covers custom converters and `load_weights_from_checkpoint`.

If a future SAELens renames these functions, `install()` does nothing and SAELens's own
messages apply.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from sae_lens_hierarchical.hierarchical_sae import (
    ARCHITECTURE,
    HierarchicalSAEConfig,
    HierarchicalSAELoadError,
)

_WRAPPED = "_hsae_wrapped"


def _check_cfg(cfg_dict: dict[str, Any], cfg_path: Path) -> None:
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
    try:
        HierarchicalSAEConfig.from_dict(dict(cfg_dict))
    except (ValueError, TypeError, KeyError) as e:
        raise HierarchicalSAELoadError(f"{cfg_path}: {e}") from e


def _wrap_config_reader(original: Any) -> Any:
    @functools.wraps(original)
    def get_sae_lens_config_from_disk(path: str | Path, device: str | None = None,
                                      cfg_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg_path = Path(path) / "cfg.json"
        try:
            cfg_dict = original(path, device, cfg_overrides)
        except json.JSONDecodeError as e:
            raise json.JSONDecodeError(f"{cfg_path} is not valid JSON: {e.msg}", e.doc, e.pos) from e
        _check_cfg(cfg_dict, cfg_path)
        return cfg_dict

    setattr(get_sae_lens_config_from_disk, _WRAPPED, original)
    return get_sae_lens_config_from_disk


def _wrap_weights_reader(original: Any) -> Any:
    @functools.wraps(original)
    def read_sae_components_from_disk(cfg_dict: dict[str, Any], weight_path: str | Path,
                                      *args: Any, **kwargs: Any) -> Any:
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


def install() -> None:
    """Wrap SAELens's two readers once (idempotent)."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    for name, wrap in (("get_sae_lens_config_from_disk", _wrap_config_reader),
                       ("read_sae_components_from_disk", _wrap_weights_reader)):
        current = getattr(loaders, name, None)
        if current is None or hasattr(current, _WRAPPED):
            continue
        setattr(loaders, name, wrap(current))
