"""The inference SAE: a JumpReLU SAE (the threshold BatchTopK learned) whose latents form a tree.

Encoding is per token: every latent whose pre-activation passes its threshold fires; with
`gate: hard` a latent whose parent is off is zeroed too, level by level. `tree_parent` (each
latent's parent, -1 for roots and for latents outside the tree) is saved with the weights.
Decoding is SAELens's linear decode, so SAE-Bench, SAELens's evals and HookedSAETransformer read
`W_enc` / `W_dec` as for any SAE.
"""

from __future__ import annotations

from typing import Any

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from typing_extensions import override

from sae_lens_hierarchical import state_io
from sae_lens_hierarchical.config import HierarchicalSAEConfig
from sae_lens_hierarchical.tree import gate, no_parents
from sae_lens_hierarchical.tree_access import TreeAccess


class HierarchicalSAE(TreeAccess, JumpReLUSAE):
    """Inference hierarchical SAE (architecture "hierarchical")."""

    cfg: HierarchicalSAEConfig  # type: ignore[assignment]
    tree_parent: torch.Tensor

    def __init__(self, cfg: HierarchicalSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.register_buffer("tree_parent", no_parents(cfg.level_widths or []).to(self.W_dec.device))

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.gate != "hard":
            return super().encode(x)
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        acts = self.activation_fn(hidden_pre) * (hidden_pre > self.threshold).to(hidden_pre.dtype)
        return self.hook_sae_acts_post(gate(acts, self.tree_parent, self.cfg.level_widths or []))

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        if "topk_threshold" in state_dict:  # a training checkpoint loads as an inference SAE
            raise state_io.HierarchicalSAELoadError(
                "sae_weights.safetensors is a training checkpoint; load it with "
                "TrainingSAE.load_from_disk, or save it for inference with save_inference_model"
            )
        state_io.check_loaded_state(self, state_dict)
        state_io.verify_checksum(self.cfg, state_dict)  # after the checks that name a cause
