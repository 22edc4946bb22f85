"""Seed design: children live in their parent's learned subspace (projection_rank)."""

from __future__ import annotations

import torch
from builders import D_IN, step, training_sae, warm_up

import sae_lens_hierarchical as h


def test_children_live_in_their_parents_subspace_and_stay_there_when_trained():
    rank = 2
    cfg = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=2 + 16 + 128, level_widths=[2, 16, 128], k=4,
                                          tree="fixed", projection_rank=rank)
    sae = h.HierarchicalTrainingSAE(cfg)
    for _ in range(2):
        W_dec, W_enc = sae.W_dec.detach(), sae.W_enc.detach()
        for p in range(2 + 16):
            kids = sae.children(p)
            assert len(kids) == 8
            assert torch.linalg.matrix_rank(W_dec[kids]) == rank
            assert torch.linalg.matrix_rank(W_enc[:, kids]) == rank
        warm_up(sae, 5)
    assert {n for n, _ in sae.named_parameters()} >= {"W_dec_l0", "dec_basis_l1", "enc_codes_l2"}


def test_unfactored_children_are_free():
    sae = training_sae("fixed")
    assert torch.linalg.matrix_rank(sae.W_dec.detach()[sae.children(0)]) == 4


def test_factored_weights_train_and_save_flat(tmp_path):
    from safetensors.torch import load_file

    sae = training_sae("projected")
    before = sae.W_dec.detach().clone()
    warm_up(sae, 5)
    assert not torch.allclose(before, sae.W_dec.detach())
    sae.save_inference_model(tmp_path)
    names = set(load_file(str(tmp_path / "sae_weights.safetensors")))
    assert names == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold", "tree_parent"}
    assert step  # (builders)
