"""The training step: the shared budget, Matryoshka prefixes, the consistency losses, the
learned thresholds, the learned tree's schedule, the gate and per-level budgets (ablations)."""

from __future__ import annotations

import pytest
import torch
from builders import D_SAE, DESIGNS, WIDTHS, K, inputs, step, training_sae, warm_up

import sae_lens_hierarchical as h
from sae_lens_hierarchical import losses

PREFIXES = ["inner_mse_loss_4", "inner_mse_loss_20"]


def _violations(acts: torch.Tensor, parent: torch.Tensor) -> int:
    has_parent = parent >= 0
    parent_acts = acts[..., parent.clamp(min=0)]
    return int(((acts > 0) & (parent_acts <= 0) & has_parent).sum())


@pytest.mark.parametrize("design", list(DESIGNS))
def test_every_loss_term_is_named_and_sums_to_the_loss(design):
    sae = training_sae(design, kl_coefficient=0.5, l2_coefficient=0.25, level_recon_weights=[0.5, 0.7, 1.3])
    warm_up(sae, 12)  # past tree_every, so a learned tree has edges
    assert (sae.parent_index >= 0).any()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[-10:] = True
    out = step(sae, inputs(128) * 3, dead)
    assert set(out.losses) == {"mse_loss", *PREFIXES, "kl_consistency_loss", "l2_consistency_loss",
                               "auxiliary_reconstruction_loss"}
    assert all(v.item() > 0 for v in out.losses.values()), {k: v.item() for k, v in out.losses.items()}
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    assert {"l0_level_0", "l0_level_1", "l0_level_2", "tree_edges"} <= set(out.metrics)


def test_prefix_losses_are_the_weighted_prefix_reconstructions_and_train_the_roots():
    sae = training_sae("fixed", level_recon_weights=[0.5, 0.7, 1.3])
    warm_up(sae, 3)
    x = inputs(128)
    out = step(sae, x)
    unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)  # rescale_acts_by_decoder_norm
    roots_only = sae.b_dec + out.feature_acts[:, :4] @ unit[:4]
    torch.testing.assert_close(out.losses["inner_mse_loss_4"], 0.5 * (roots_only - x).pow(2).sum(-1).mean())
    # The prefix term must carry gradient into the roots (a detached prefix loss has the right
    # value and trains nothing).
    sae.zero_grad()
    out.losses["inner_mse_loss_4"].backward()
    assert sae.W_dec.grad[:4].abs().sum() > 0
    assert sae.W_dec.grad[4:].abs().sum() == 0  # the roots-only prefix touches only the roots


@pytest.mark.parametrize("b_dec_grad", [True, False])
def test_prefix_b_dec_grad_false_leaves_b_dec_to_the_full_reconstruction(b_dec_grad):
    # (apply_b_dec_to_input off: b_dec's other path, through the encoder, stays out of the count)
    sae = training_sae("learned", level_recon_weights=[0.5, 0.7, 1.0], prefix_b_dec_grad=b_dec_grad,
                       apply_b_dec_to_input=False)
    warm_up(sae, 3)
    out = step(sae, inputs(128) * 3)
    sae.zero_grad()
    (out.losses["inner_mse_loss_4"] + out.losses["inner_mse_loss_20"]).backward()
    assert sae.W_dec.grad[:20].abs().sum() > 0  # the prefixes still train their latents
    b_dec_grad_norm = 0.0 if sae.b_dec.grad is None else float(sae.b_dec.grad.abs().sum())
    assert (b_dec_grad_norm > 0) == b_dec_grad
    sae.zero_grad()
    out = step(sae, inputs(128) * 3)  # the values are the same either way: only the gradient differs
    unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    roots_only = sae.b_dec + out.feature_acts[:, :4] @ unit[:4]
    x = inputs(128) * 3
    torch.testing.assert_close(out.losses["inner_mse_loss_4"], 0.5 * (roots_only - x).pow(2).sum(-1).mean())
    out.losses["mse_loss"].backward()
    assert sae.b_dec.grad is not None and sae.b_dec.grad.abs().sum() > 0


def test_one_shared_budget_keeps_k_per_token_and_learns_its_split():
    sae = training_sae("learned")
    x = inputs(512) * 3
    acts = step(sae, x).feature_acts
    assert (acts > 0).sum().item() == int(K * 512)  # BatchTopK over every latent
    per_level = [(acts[:, sl] > 0).sum().item() for sl in sae.level_slices]
    assert sum(per_level) == int(K * 512) and all(n > 0 for n in per_level)


def test_per_level_budgets_keep_each_levels_k():
    sae = training_sae("per_level")
    acts = step(sae, inputs(512) * 3).feature_acts
    for k, sl in zip(sae.cfg.k_per_level, sae.level_slices, strict=True):
        assert (acts[:, sl] > 0).sum().item() == int(k * 512)


@pytest.mark.parametrize("design", ["learned", "per_level"])
def test_threshold_moves_to_the_smallest_kept_activation(design):
    sae = training_sae(design, topk_threshold_lr=1.0)  # rate 1: the threshold IS this step's target
    out = step(sae, inputs(256) * 3)
    acts = out.feature_acts.detach()
    if design == "learned":
        want = [acts[acts > 0].min().item()] * 3
    else:
        want = [acts[:, sl][acts[:, sl] > 0].min().item() for sl in sae.level_slices]
    torch.testing.assert_close(sae.topk_threshold.float(), torch.tensor(want), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("design", ["learned", "per_level"])
def test_inference_with_the_learned_thresholds_keeps_about_k_active(design, tmp_path):
    """The learned threshold must track the smallest kept activation: tracking e.g. the mean
    would more than halve inference L0."""
    from sae_lens import SAE

    sae = training_sae(design, topk_threshold_lr=0.2)
    g = torch.Generator().manual_seed(5)
    data = torch.randn(4096, sae.cfg.d_in, generator=g) * 3
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for i in range(60):
        out = step(sae, data[(i % 8) * 512:(i % 8 + 1) * 512], logging=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    sae.save_inference_model(tmp_path)
    acts = SAE.load_from_disk(tmp_path).encode(data)
    l0 = (acts > 0).sum(-1).float().mean().item()
    assert 0.7 * K < l0 < 1.5 * K, l0
    if design == "per_level":
        for k, sl in zip(sae.cfg.k_per_level, sae.level_slices, strict=True):
            level_l0 = (acts[:, sl] > 0).sum(-1).float().mean().item()
            assert 0.5 * k < level_l0 < 1.8 * k, (k, level_l0)


def test_the_learned_tree_is_reassigned_every_tree_every_steps():
    sae = training_sae("learned", tree_every=5)
    x = inputs(256) * 3
    for _ in range(5):
        step(sae, x)
        assert not (sae.parent_index >= 0).any()  # nothing before the first window closes
    step(sae, x)  # step 6: re-assigned from steps 1-5
    assert (sae.parent_index >= 0).sum() > 0
    assert sae.schedule.steps_done == 6
    # each assigned parent is one level up
    for level, sl in enumerate(sae.level_slices[1:], start=1):
        par = sae.parent_index[sl]
        above = sae.level_slices[level - 1]
        assert ((par == -1) | ((par >= above.start) & (par < above.stop))).all()


def test_l2_until_step_stops_the_l2_term_after_that_many_steps():
    sae = training_sae("learned", l2_coefficient=0.25, l2_until_step=13)
    warm_up(sae, 12)  # past tree_every: the tree has edges
    assert (sae.parent_index >= 0).any()
    x = inputs(128) * 3
    assert step(sae, x).losses["l2_consistency_loss"].item() > 0  # step 13 (steps_done 12)
    out = step(sae, x)  # step 14
    assert out.losses["l2_consistency_loss"].item() == 0
    torch.testing.assert_close(out.loss, sum(out.losses.values()))


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_l2_until_step_is_checked(bad):
    with pytest.raises(ValueError, match="l2_until_step"):
        training_sae("learned", l2_until_step=bad)


def test_eval_mode_steps_do_not_advance_the_schedule():
    sae = training_sae("learned")
    sae.eval()
    step(sae, inputs(64))
    assert sae.schedule.steps_done == 0 and not sae.schedule.counts.co


@pytest.mark.parametrize("design", ["gated"])
def test_the_hard_gate_never_lets_a_child_fire_without_its_parent(design, tmp_path):
    from sae_lens import SAE

    sae = training_sae(design)
    warm_up(sae)
    x = inputs(1024) * 3
    acts = step(sae, x).feature_acts
    assert (acts[:, 4:] > 0).sum() > 0  # children do fire: not vacuous
    assert _violations(acts, sae.parent_index) == 0
    sae.save_inference_model(tmp_path)
    inf = SAE.load_from_disk(tmp_path)
    inf_acts = inf.encode(x)
    assert (inf_acts[:, 4:] > 0).sum() > 0
    assert _violations(inf_acts, inf.parent_index) == 0
    # without the gate the same SAE's children would fire without their parents
    ungated = training_sae("fixed")
    warm_up(ungated)
    assert _violations(step(ungated, x).feature_acts, ungated.parent_index) > 0


def test_aux_loss_uses_the_dead_latent_mask():
    sae = training_sae("fixed")
    x = inputs(64)
    assert step(sae, x, None).losses["auxiliary_reconstruction_loss"].item() == 0.0
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[30:40] = True
    out = step(sae, x, dead)
    assert out.losses["auxiliary_reconstruction_loss"].item() > 0
    out.losses["auxiliary_reconstruction_loss"].backward()
    assert sae.b_enc.grad[30:40].abs().sum() > 0 and sae.b_enc.grad[:30].abs().sum() == 0


def test_a_hook_that_edits_training_activations_reaches_the_loss():
    sae = training_sae("fixed")
    x = inputs(64)
    plain = step(sae, x).losses
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 0.0)  # noqa: ARG005
    try:
        zeroed = step(sae, x)
    finally:
        sae.hook_sae_acts_post.remove_hooks()
    assert float(zeroed.feature_acts.detach().abs().sum()) == 0.0
    want = (sae.b_dec - x).pow(2).sum(-1).mean()  # nothing active: b_dec alone, at every prefix
    torch.testing.assert_close(zeroed.losses["mse_loss"], want)
    torch.testing.assert_close(zeroed.losses["inner_mse_loss_4"], sae.cfg.level_recon_weights[0] * want)
    assert plain["mse_loss"].item() < want.item()


def test_non_finite_inputs_stop_training_before_the_weights_change():
    sae = training_sae("fixed")
    x = inputs(32)
    x[3, 2] = float("nan")
    before = sae.W_dec.detach().clone()
    with pytest.raises(h.NonFiniteTrainingError, match="1 NaN"):
        step(sae, x)
    assert torch.equal(sae.W_dec.detach(), before)


def test_widths_need_not_divide():
    sae = h.HierarchicalTrainingSAE(h.HierarchicalTrainingSAEConfig(d_in=16, d_sae=100, level_widths=[10, 30, 60],
                                                                    k=5, tree_every=3))
    warm_up(sae, 8)
    assert (sae.parent_index >= 0).any()
    assert WIDTHS  # (builders import kept for the shared constants)


@pytest.mark.parametrize("assign", ["encoder", "decoder"])
def test_a_similarity_tree_gives_each_child_the_most_similar_latent_one_level_up(assign):
    sae = training_sae("learned", tree_every=3, tree_assign=assign, tree_unassigned=0.25)
    x = inputs(256) * 3
    for _ in range(4):
        step(sae, x)
    assert not sae.schedule.counts.co  # nothing counted: the rule reads the weights
    rows = (sae.W_enc.T if assign == "encoder" else sae.W_dec).detach()
    unit = torch.nn.functional.normalize(rows, dim=-1)
    for level, sl in enumerate(sae.level_slices[1:], start=1):
        above = sae.level_slices[level - 1]
        # the tree was assigned before step 4 from the weights then; recompute from those
        par = sae.parent_index[sl]
        assert (par == -1).sum().item() == int(0.25 * (sl.stop - sl.start))  # the least similar quarter
        kept = par >= 0
        assert ((par[kept] >= above.start) & (par[kept] < above.stop)).all()
    # Assigning from the current weights: the rule is the cosine argmax
    sae.schedule.steps_done = 6
    sae.schedule.before_step(sae)
    for level, sl in enumerate(sae.level_slices[1:], start=1):
        above = sae.level_slices[level - 1]
        best = (unit[sl] @ unit[above].T).argmax(-1) + above.start
        par = sae.parent_index[sl]
        assert torch.equal(par[par >= 0], best[par >= 0])


def test_the_hybrid_tree_is_assigned_from_the_windows_co_firing_and_the_decoder():
    import copy

    from sae_lens_hierarchical.tree import similar_parents

    sae = training_sae("learned", tree_every=3, tree_assign="decoder_cofire", tree_unassigned=0.25)
    x = inputs(8).repeat(32, 1) * 3  # eight token types: latents co-fire wherever they fire
    for _ in range(3):
        step(sae, x)
    counts = copy.deepcopy(sae.schedule.counts)
    assert counts.co  # the rule counts co-firing over the window...
    expected = similar_parents(sae.W_dec.detach(), WIDTHS, 0.25, counts)
    assert not torch.equal(expected, similar_parents(sae.W_dec.detach(), WIDTHS, 0.25))  # ...and uses it
    sae.schedule.before_step(sae)
    assert torch.equal(sae.parent_index, expected)
    assert not sae.schedule.counts.co  # a new window starts


def test_tree_assign_is_checked():
    with pytest.raises(ValueError, match="tree_assign='cosine' is invalid; allowed: 'cofire', 'encoder', 'decoder', 'decoder_cofire'"):
        training_sae("learned", tree_assign="cosine")
    with pytest.raises(ValueError, match="tree_min_lift=2 is invalid; it needs tree_assign 'decoder_cofire'"):
        training_sae("learned", tree_assign="decoder", tree_min_lift=2)
    with pytest.raises(ValueError, match="tree_unassigned=1 is invalid"):
        training_sae("learned", tree_unassigned=1)


def test_l2_target_threshold_asks_a_parent_only_to_reach_its_threshold():
    parent = torch.tensor([-1, -1, 0, 0, 1])
    pre = torch.tensor([[0.5, 3.0, 1.0, 2.0, 0.0], [5.0, -1.0, 0.0, 0.0, 4.0]], requires_grad=True)
    acts = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.0], [5.0, 0.0, 0.0, 0.0, 4.0]])
    threshold = torch.full((5,), 2.0)
    loss = losses.consistency_l2(acts, pre, parent, threshold=threshold)
    # token 0: parent 0 at 0.5 under a firing child (deficit 1.5); parent 1 has no firing child.
    # token 1: parent 1 at -1 under child 4 (deficit 3); parent 0 above 2 with no child: nothing.
    torch.testing.assert_close(loss, torch.tensor((1.5**2 + 3.0**2) / 2))
    loss.backward()
    assert pre.grad is not None and pre.grad[:, 2:].abs().sum() == 0  # children untouched
    # the summed form asks for the children's total instead: 3 for parent 0 on token 0
    summed = losses.consistency_l2(acts, pre.detach(), parent)
    torch.testing.assert_close(summed, torch.tensor(((3.0 - 0.5) ** 2 + 4.0**2) / 2))


def test_l2_target_children_sum_floor_is_the_one_sided_term():
    sae = training_sae("learned", l2_coefficient=1.0, l2_target="children_sum_floor")
    warm_up(sae, 12)
    assert (sae.parent_index >= 0).any()
    out = step(sae, inputs(128) * 3)
    acts, pre = out.feature_acts, out.hidden_pre
    want = losses.consistency_l2(acts, pre, sae.tree_parent, one_sided=True)
    torch.testing.assert_close(out.losses["l2_consistency_loss"], want)
    assert want < losses.consistency_l2(acts, pre, sae.tree_parent)  # strictly less than two-sided


def test_l2_target_threshold_trains_and_is_checked():
    sae = training_sae("learned", l2_coefficient=0.25, l2_target="threshold")
    warm_up(sae, 12)
    assert (sae.parent_index >= 0).any()
    x = inputs(128) * 3
    sae.topk_threshold.fill_(1e-9)  # only parents below zero under a firing child are pulled
    low = step(sae, x).losses["l2_consistency_loss"].item()
    sae.topk_threshold.fill_(1e3)  # every parent under a firing child is, by ~1e3 each
    out = step(sae, x)
    assert out.losses["l2_consistency_loss"].item() > 1e3 * max(low, 1e-3)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    with pytest.raises(ValueError, match="l2_target"):
        training_sae("learned", l2_target="parents")
