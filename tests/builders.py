"""Small builders for tiny hierarchical SAEs and models, shared by the tests."""

from __future__ import annotations

from typing import Any

import torch
from sae_lens.saes.sae import TrainStepInput

import sae_lens_hierarchical as h

D_IN = 16
WIDTHS = [4, 16, 64]
D_SAE = sum(WIDTHS)
K = 6.0
# (tree, gate, k_per_level, projection_rank): the default and the seed design's ablations.
DESIGNS = {
    "learned": dict(),
    "fixed": dict(tree="fixed"),
    "per_level": dict(tree="fixed", k_per_level=[1.0, 2.0, 3.0]),
    "gated": dict(tree="fixed", gate="hard"),
    "projected": dict(tree="fixed", projection_rank=4),
}


def train_cfg(design: str = "learned", **kw: Any) -> h.HierarchicalTrainingSAEConfig:
    base: dict[str, Any] = dict(d_in=D_IN, d_sae=D_SAE, level_widths=list(WIDTHS), k=K, tree_every=5,
                                **DESIGNS[design])
    base.update(kw)
    return h.HierarchicalTrainingSAEConfig(**base)


def training_sae(design: str = "learned", seed: int = 0, **kw: Any) -> h.HierarchicalTrainingSAE:
    torch.manual_seed(seed)
    sae = h.HierarchicalTrainingSAE(train_cfg(design, **kw))
    # Non-trivial biases so folding and saving are actually exercised.
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.01)
    return sae


def step(sae: h.HierarchicalTrainingSAE, x: torch.Tensor, dead: torch.Tensor | None = None,
         logging: bool = True):
    return sae.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=logging,
    ))


def warm_up(sae: h.HierarchicalTrainingSAE, n: int = 20, seed: int = 1) -> None:
    """A few optimiser steps so decoder norms, thresholds, biases and a learned tree move off
    their init."""
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
