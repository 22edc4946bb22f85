"""The tree: the fixed layout, learning parents from co-firing, the gate, accessors."""

from __future__ import annotations

import pytest
import torch
from builders import D_SAE, WIDTHS, training_sae

from sae_lens_hierarchical.tree import (
    CoFiring,
    fixed_parents,
    gate,
    learned_parents,
    no_parents,
    similar_parents,
    tree_levels,
)


def test_fixed_layout_and_accessors():
    sae = training_sae("fixed")
    pi = sae.parent_index
    assert pi.dtype == torch.long and pi.shape == (D_SAE,)
    assert torch.equal(pi, fixed_parents(WIDTHS))
    assert pi[:4].tolist() == [-1] * 4
    assert pi[4:8].tolist() == [0] * 4 and pi[8:12].tolist() == [1] * 4
    assert pi[20].item() == 4 and pi[D_SAE - 1].item() == 19
    assert sae.level_slices == [slice(0, 4), slice(4, 20), slice(20, 84)]
    assert sae.children(1) == [8, 9, 10, 11]
    assert sae.children(83) == []
    assert sae.path(83) == [3, 19, 83]
    assert sae.latent_levels.bincount().tolist() == WIDTHS
    assert not sae.outside_tree.any()
    # children() without an index is still nn.Module.children(), which torch relies on.
    assert all(isinstance(m, torch.nn.Module) for m in sae.children())
    with pytest.raises(IndexError):
        sae.children(D_SAE)


def test_a_learned_tree_starts_with_every_latent_outside_it():
    sae = training_sae("learned")
    assert torch.equal(sae.parent_index, no_parents(WIDTHS))
    assert sae.outside_tree.sum() == D_SAE - WIDTHS[0]


def test_learned_parents_are_the_most_specific_ancestors_and_a_weak_one_is_none():
    widths = [3, 4]
    counts = CoFiring(widths)
    on = torch.zeros(100, 7)
    on[:, 0] = 1            # parent 0 fires always: P(0 | anything) = 1
    on[:50, 1] = 1          # parent 1 fires on the first half
    on[50:, 2] = 1          # parent 2 on the second
    on[:40, 3] = 1          # child 3 inside parent 1's tokens: 1 (specific) beats 0 (always on)
    on[60:90, 4] = 1        # child 4 inside parent 2's
    on[45:55, 5] = 1        # child 5 straddles 1 and 2 (P = 0.5 each): the always-on 0 is P = 1...
    counts.add(on)
    current = torch.tensor([-1, -1, -1, -1, -1, -1, 2])
    parent = learned_parents(counts, current, min_cofire=0.6)
    # 5: 1 and 2 also reach 0.5 and are rarer than 0: the first of them; 6 never fired: kept
    assert parent.tolist() == [-1, -1, -1, 1, 2, 1, 2]
    # without an always-on latent, a child whose best parent is below min_cofire has none
    weak = CoFiring([2, 1])
    on2 = torch.zeros(100, 3)
    on2[:50, 0] = 1
    on2[50:, 1] = 1
    on2[40:100:3, 2] = 1    # P(0|c) = 0.2, P(1|c) = 0.8 -> 1
    weak.add(on2)
    assert learned_parents(weak, torch.full((3,), -1), 0.9).tolist() == [-1, -1, 1]
    on2[:, 1] = 0
    on2[45:50, 1] = 1       # now P(1|c) = 0.1, P(0|c) = 0.2: none reaches min_cofire 0.25
    weak.reset()
    weak.add(on2)
    assert learned_parents(weak, torch.full((3,), -1), 0.25).tolist() == [-1, -1, -1]


def test_the_hybrid_rule_picks_by_direction_among_co_firing_latents_only():
    widths = [3, 3]
    rows = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0],  # parents: three axes
                         [0.9, 0.1, 0], [0.9, 0.1, 0], [0, 0, 1.0]])
    counts = CoFiring(widths)
    on = torch.zeros(100, 6)
    on[:50, 1] = 1          # parent 1 fires on the first half, parent 0 never
    on[:40, 3] = 1          # child 3 fires inside parent 1 only: 1, though its direction is 0's
    on[60:70, 4] = 1        # child 4 fires with no parent: falls back to direction (0)
    on[:10, 5] = 1          # child 5 fires inside 1 and points at 2, which never fires with it
    counts.add(on)
    assert similar_parents(rows, widths, 0.0).tolist() == [-1, -1, -1, 0, 0, 2]  # direction alone
    assert similar_parents(rows, widths, 0.0, counts).tolist() == [-1, -1, -1, 1, 0, 1]
    # the latent without a co-firing candidate is the first left outside the tree
    assert similar_parents(rows, widths, 0.34, counts).tolist() == [-1, -1, -1, 1, -1, 1]
    # A parent that fires almost everywhere is everyone's candidate, unless a lift is asked for
    on[:90, 2] = 1          # parent 2 now fires on 90 % of tokens, and on all of child 5's
    counts.reset()
    counts.add(on[:50])
    counts.add(on[50:])     # (two batches: the token count adds up)
    assert counts.tokens[1].item() == 100
    assert similar_parents(rows, widths, 0.0, counts).tolist() == [-1, -1, -1, 1, 2, 2]
    # lift 1.5: parent 1 (50 % of tokens) has 1.0 >= 0.75 on child 3 and 5; parent 2 needs
    # P >= 1.35 anywhere: no one's candidate, so 4 falls back to direction and 5 to parent 1
    assert similar_parents(rows, widths, 0.0, counts, min_lift=1.5).tolist() == [-1, -1, -1, 1, 0, 1]


def test_co_firing_counts_survive_a_state_round_trip():
    counts = CoFiring(WIDTHS)
    counts.add((torch.rand(64, D_SAE) > 0.8).float())
    again = CoFiring(WIDTHS)
    again.load({k: v.clone() for k, v in counts.state().items()})
    for level in counts.co:
        assert torch.equal(again.co[level], counts.co[level])
        assert torch.equal(again.fired[level], counts.fired[level])


def test_gate_zeroes_children_of_inactive_parents_level_by_level():
    parent = fixed_parents([2, 4, 8])
    acts = torch.ones(1, 14)
    acts[0, 0] = 0  # root 0 off: its children 2, 3 and their children 6..9 go
    out = gate(acts, parent, [2, 4, 8])
    assert out[0].tolist() == [0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]
    # a latent outside the tree is never gated
    loose = parent.clone()
    loose[2] = -1
    assert gate(acts, loose, [2, 4, 8])[0, 2] == 1


def test_tree_levels_and_cycles():
    assert tree_levels(fixed_parents(WIDTHS)).bincount().tolist() == WIDTHS
    with pytest.raises(ValueError, match="cycle"):
        tree_levels(torch.tensor([1, 0]))
