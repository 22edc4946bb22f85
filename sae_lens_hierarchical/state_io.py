"""Saved state: what a weights file must hold, thresholds between the training and inference
forms, and errors that name the tensor, the file's config fields and what was expected."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sae_lens_hierarchical.tree import fixed_parents, level_of_latents


class HierarchicalSAELoadError(ValueError):
    """A saved hierarchical SAE cannot be loaded; the message names the file or tensor and field."""


def check_loaded_state(module: nn.Module, state_dict: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Check tensors read from sae_weights.safetensors against the model its cfg.json builds.

    `module` is the SAE built from cfg.json, so its own state dict gives every expected name and
    shape. A cfg.json that does not belong to the weights is reported with the tensor, both
    shapes and the cfg.json fields behind them; NaN/inf weights and impossible trees are refused.
    """
    cfg: Any = module.cfg
    fields = f"d_in={cfg.d_in}, d_sae={cfg.d_sae}, level_widths={cfg.level_widths}"
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in skip}
    if "tree_parent" in expected and "tree_parent" not in state_dict:
        _missing_tree(cfg, state_dict)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - set(skip))
    if missing or unexpected:
        raise HierarchicalSAELoadError(
            f"sae_weights.safetensors does not match cfg.json ({fields}): missing tensors {missing}, "
            f"unexpected tensors {unexpected}"
        )
    for name, shape in expected.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise HierarchicalSAELoadError(
                f"sae_weights.safetensors: tensor {name!r} has shape {list(got)} but cfg.json ({fields}) "
                f"implies {list(shape)}"
            )
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise HierarchicalSAELoadError(
                f"sae_weights.safetensors: tensor {name!r} holds {int((~torch.isfinite(tensor)).sum())} "
                "NaN/inf values (saved from a diverged run, or the file is damaged)"
            )
    if "tree_parent" in state_dict:
        state_dict["tree_parent"] = state_dict["tree_parent"].long()  # loaders may cast to cfg dtype
        check_tree(state_dict["tree_parent"], cfg)


def tree_mode(cfg: Any) -> str | None:
    """'learned' / 'fixed' from a training config, or from the training details an inference
    cfg.json keeps; None when neither says."""
    mode = getattr(cfg, "tree", None)
    if mode is None:
        metadata = getattr(cfg, "metadata", None)
        details = (metadata.get("training_architecture_details") if metadata is not None else None) or {}
        mode = details.get("tree")
    return mode if isinstance(mode, str) else None


def _missing_tree(cfg: Any, state_dict: dict[str, Any]) -> None:
    """No `tree_parent` tensor: a fixed tree is rebuilt from the config (with a warning); a
    learned (re-seated) tree cannot be, so loading stops."""
    import warnings

    mode = tree_mode(cfg)
    if mode == "fixed":
        warnings.warn(
            "sae_weights.safetensors has no 'tree_parent' tensor; cfg.json says tree: fixed, so the "
            "fixed layout is rebuilt from level_widths",
            stacklevel=4,
        )
        state_dict["tree_parent"] = fixed_parents(cfg.level_widths)
        return
    raise HierarchicalSAELoadError(
        "sae_weights.safetensors has no 'tree_parent' tensor, and cfg.json's tree was "
        f"{'learned (re-seated during training)' if mode == 'learned' else 'not recorded'}: the default tree would be "
        "the wrong one. Save the SAE again with this package (save_inference_model) to include it"
    )


def check_tree(parent: torch.Tensor, cfg: Any) -> None:
    """Each latent's parent is -1 or a latent one level up; a fixed tree is the fixed layout."""
    t = parent.cpu().long()
    levels = level_of_latents(cfg.level_widths)
    starts = [sl.start for sl in cfg.level_slices]
    for level, sl in enumerate(cfg.level_slices):
        lo, hi = (-1, -1) if level == 0 else (starts[level - 1], sl.start - 1)
        bad = ((t[sl] != -1) & ((t[sl] < lo) | (t[sl] > hi))).nonzero().flatten()
        if len(bad):
            j = int(bad[0]) + sl.start
            raise HierarchicalSAELoadError(
                f"sae_weights.safetensors: tensor 'tree_parent' gives latent {j} (level {level}) the "
                f"parent {int(t[j])}; a level-{level} latent's parent must be -1"
                + ("" if level == 0 else f" or in [{lo}, {hi}]")
            )
    if getattr(cfg, "tree", "learned") == "fixed" and not torch.equal(t, fixed_parents(cfg.level_widths)):
        raise HierarchicalSAELoadError(
            "sae_weights.safetensors: tensor 'tree_parent' is not the fixed layout but cfg.json has tree: fixed"
        )
    del levels


def training_to_inference_thresholds(state_dict: dict[str, Any], cfg: Any) -> None:
    """Per-level BatchTopK thresholds -> the JumpReLU per-latent `threshold`."""
    level_thresholds = state_dict.pop("topk_threshold")
    per_latent = level_thresholds[level_of_latents(cfg.level_widths).to(level_thresholds.device)]
    state_dict["threshold"] = per_latent.to(dtype=state_dict["b_enc"].dtype, device=state_dict["b_enc"].device)


def inference_to_training_state(state_dict: dict[str, Any], cfg: Any) -> None:
    """A saved inference SAE loads as a training SAE: per-latent thresholds -> per-level ones."""
    if "threshold" in state_dict and "topk_threshold" not in state_dict:
        thr = state_dict.pop("threshold")
        if tuple(thr.shape) != (cfg.d_sae,):
            raise HierarchicalSAELoadError(
                f"sae_weights.safetensors: tensor 'threshold' has shape {list(thr.shape)} but cfg.json "
                f"(d_sae={cfg.d_sae}) implies [{cfg.d_sae}]"
            )
        state_dict["topk_threshold"] = torch.stack([thr[sl.start] for sl in cfg.level_slices]).double()


def tensor_digest(state_dict: dict[str, Any], dtype: torch.dtype | None = None) -> str:
    """sha256 over every tensor's name, shape and values, independent of device and of the width
    a value is held in: floating tensors are first cast to `dtype` (the one a loader produces:
    SAELens casts every tensor of a weights file to the config's dtype), then every value is
    hashed as float64. Used for saved SAEs' checksum (`weights_sha256` in cfg.json) and for
    `hsae eval`'s cache of results."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        flat = t.reshape(-1)
        h.update(f"{name}:{list(t.shape)};".encode())
        for start in range(0, flat.numel(), 1 << 22):  # 4M values (32 MB) at a time
            h.update(flat[start : start + (1 << 22)].cpu().to(torch.float64).numpy().tobytes())
    return h.hexdigest()


CHECKSUM_KEY = "weights_sha256"


def write_checksum(weights_path: Any, cfg_path: Any) -> None:
    """Record the saved tensors' digest in cfg.json as `metadata.weights_sha256`
    ("<dtype>:<sha256>", the tensors as a loader casts them to cfg.json's dtype). SAELens keeps
    unknown metadata keys, so every loader still reads the file; this package's loaders verify
    it (`verify_checksum`)."""
    import json

    from safetensors.torch import load_file

    with open(cfg_path) as f:
        cfg = json.load(f)
    dtype = str(cfg.get("dtype") or "float32")
    tensors = load_file(str(weights_path))
    digest = tensor_digest(tensors, getattr(torch, dtype.removeprefix("torch.")))
    cfg.setdefault("metadata", {})[CHECKSUM_KEY] = f"{dtype}:{digest}"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def verify_checksum(cfg: Any, state_dict: dict[str, Any]) -> None:
    """Refuse tensors that differ from those the checksum in cfg.json was made from (a damaged or
    edited weights file: safetensors itself has no checksum). Skipped when cfg.json has none, or
    when the SAE was loaded in another dtype than it was saved in (its values then differ by
    design). The checksum describes the file, not the model in memory (which may train on), so
    it is dropped from the loaded config."""
    metadata = getattr(cfg, "metadata", None)
    expected = metadata.get(CHECKSUM_KEY) if metadata is not None else None
    if metadata is not None and CHECKSUM_KEY in metadata:
        delattr(metadata, CHECKSUM_KEY)
    if not isinstance(expected, str):
        return
    dtype, _, digest = expected.rpartition(":")
    if str(getattr(cfg, "dtype", dtype)) != dtype:
        return
    if tensor_digest(state_dict) != digest:
        raise HierarchicalSAELoadError(
            "sae_weights.safetensors: its tensors do not match the checksum cfg.json recorded when it "
            f"was saved (metadata.{CHECKSUM_KEY}): the weights file was changed or damaged after saving"
        )
