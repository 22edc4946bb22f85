"""Small builders for tiny hierarchical SAEs and models, shared by the tests."""

from __future__ import annotations

from typing import Any

import torch

import sae_lens_hierarchical as h
from sae_lens.saes.sae import TrainStepInput

D_IN = 16
WIDTHS = [4, 16, 64]
D_SAE = sum(WIDTHS)
VARIANTS = ["batchtopk", "topk", "relu"]
RANKS = [4, None]


def variant_kwargs(variant: str) -> dict[str, Any]:
    if variant == "relu":
        return {"l1_per_level": [0.01, 0.01, 0.02]}
    return {"k_per_level": [2, 3, 4]}


def train_cfg(variant: str = "batchtopk", rank: int | None = 4, **kw: Any) -> h.HierarchicalTrainingSAEConfig:
    base: dict[str, Any] = dict(
        d_in=D_IN, d_sae=D_SAE, level_widths=list(WIDTHS), variant=variant, projection_rank=rank,
        **variant_kwargs(variant),
    )
    base.update(kw)
    return h.HierarchicalTrainingSAEConfig(**base)


def training_sae(variant: str = "batchtopk", rank: int | None = 4, seed: int = 0, **kw: Any) -> h.HierarchicalTrainingSAE:
    torch.manual_seed(seed)
    sae = h.HierarchicalTrainingSAE(train_cfg(variant, rank, **kw))
    # Non-trivial biases and norms so folding and saving are actually exercised.
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.01)
    return sae


def step(sae: h.HierarchicalTrainingSAE, x: torch.Tensor, dead: torch.Tensor | None = None,
         logging: bool = True):
    return sae.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0,
        is_logging_step=logging,
    ))


def warm_up(sae: h.HierarchicalTrainingSAE, n: int = 20, seed: int = 1) -> None:
    """A few optimiser steps so decoder norms, thresholds and biases move off their init."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(n):
        x = torch.randn(128, sae.cfg.d_in, generator=g)
        out = step(sae, x, logging=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


def inputs(n: int = 256, d: int = D_IN, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def tiny_hooked_transformer(d_model: int = D_IN, seed: int = 0):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    return HookedSAETransformer(HookedTransformerConfig(
        d_model=d_model, d_head=8, n_heads=2, n_layers=1, n_ctx=32, d_vocab=50,
        act_fn="gelu", normalization_type="LN", seed=seed, device="cpu",
    ))
