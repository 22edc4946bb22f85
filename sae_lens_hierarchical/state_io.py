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
