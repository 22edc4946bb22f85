"""Free latents: parentless, childless latents after the leaves that encode the tree's residual.

What is checked: the config (every bad value named), their place outside the tree, that the
tree trains exactly as it would without them (no gradient crosses over), that they read
x - x_hat_tree at inference, exact save/load in both classes, and the eval rows that name them.
"""

from __future__ import annotations

import pytest
import torch
from builders import D_IN, WIDTHS, inputs, step, warm_up

import sae_lens_hierarchical as h
from sae_lens import SAE, TrainingSAE

TREE = sum(WIDTHS)
N_FREE = 8


def free_cfg(variant: str = "batchtopk", **kw) -> h.HierarchicalTrainingSAEConfig:
    base = dict(d_in=D_IN, d_sae=TREE + N_FREE, level_widths=list(WIDTHS), variant=variant,
                k_per_level=[2, 3, 4], projection_rank=None, n_free=N_FREE, k_free=2)
    base.update(kw)
    return h.HierarchicalTrainingSAEConfig(**base)


def free_sae(variant: str = "batchtopk", seed: int = 0, **kw) -> h.HierarchicalTrainingSAE:
    torch.manual_seed(seed)
    sae = h.HierarchicalTrainingSAE(free_cfg(variant, **kw))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.01)
    return sae


# ----------------------------------------------------------------------------- config


def test_d_sae_counts_the_free_latents_and_the_tree_is_derived_without_them():
    cfg = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=TREE + N_FREE, branching=[4, 4],
                                          k_per_level=[2, 3, 4], n_free=N_FREE, k_free=1.5)
    assert cfg.level_widths == WIDTHS and cfg.tree_size == TREE
    assert cfg.free_slice == slice(TREE, TREE + N_FREE)


@pytest.mark.parametrize(
    "kwargs, field, says",
    [
        ({"k_free": None}, "k_free", r"with n_free=8 it must be in \(0, 8\]"),
        ({"k_free": 9}, "k_free", r"\(0, 8\]"),
        ({"n_free": 0, "d_sae": TREE}, "k_free", "needs n_free > 0"),
        ({"n_free": -1, "d_sae": TREE - 1}, "n_free", ">= 0"),
        ({"d_sae": TREE}, "d_sae", "plus n_free=8"),
        ({"variant": "relu", "l1_per_level": [0.1, 0.1, 0.1], "k_per_level": None}, "n_free", "'batchtopk' or 'topk'"),
        ({"projection_rank": 4}, "n_free", "projection_rank: null"),
        ({"variant": "topk", "k_free": 1.5}, "k_free", "integer k_free"),
        ({"free_budget_rate": -0.1}, "free_budget_rate", ">= 0"),
        ({"free_budget_rate": 0.01, "variant": "topk"}, "free_budget_rate", "variant 'batchtopk'"),
        ({"free_budget_rate": 0.01, "n_free": 0, "d_sae": TREE, "k_free": None}, "free_budget_rate", "n_free > 0"),
    ],
)
def test_invalid_free_latent_configs_name_field_and_value(kwargs, field, says):
    with pytest.raises(ValueError, match=f"{field}=.* is invalid; .*{says}"):
        free_cfg(**kwargs)


# ----------------------------------------------------------------------------- layout


def test_free_latents_sit_after_the_leaves_outside_the_tree():
    sae = free_sae()
    free = list(range(TREE, TREE + N_FREE))
    assert sae.parent_index[free].tolist() == [-1] * N_FREE
    assert sae.latent_levels.bincount().tolist() == WIDTHS + [N_FREE]  # free: level n_levels
    assert sae.level_of(TREE) == 3 and sae.level_slices[-1].stop == TREE
    assert sae.tree_children(TREE) == [] and sae.path(TREE + 1) == [TREE + 1]
    assert not any(p >= TREE for p in sae.parent_index.tolist())  # nobody's parent
    with pytest.raises(IndexError):
        sae.level_of(TREE + N_FREE)


# ------------------------------------------------------------------- training isolation


def _tree_twin(sae: h.HierarchicalTrainingSAE) -> h.HierarchicalTrainingSAE:
    """The same tree without free latents, sharing every tree weight."""
    cfg = free_cfg(sae.cfg.variant, n_free=0, k_free=None, d_sae=TREE)
    twin = h.HierarchicalTrainingSAE(cfg)
    with torch.no_grad():
        twin.W_enc.copy_(sae.W_enc[:, :TREE])
        twin.W_dec.copy_(sae.W_dec[:TREE])
        twin.b_enc.copy_(sae.b_enc[:TREE])
        twin.b_dec.copy_(sae.b_dec)
    return twin


@pytest.mark.parametrize("variant", ["batchtopk", "topk"])
def test_the_tree_trains_exactly_as_it_would_without_free_latents(variant):
    sae = free_sae(variant)
    warm_up(sae, 10)
    twin = _tree_twin(sae)
    x = inputs(256) * 2
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[TREE - 6 :] = True  # dead leaves and dead free latents: aux-k runs for both
    out, out_twin = step(sae, x, dead), step(twin, x, dead[:TREE])
    torch.testing.assert_close(out.feature_acts[:, :TREE], out_twin.feature_acts)
    for name in ("prefix_mse_level_0", "prefix_mse_level_1", "kl_consistency_loss"):
        torch.testing.assert_close(out.losses[name], out_twin.losses[name])
    # The tree's full reconstruction is the twin's whole MSE; the free latents lower the SAE's.
    torch.testing.assert_close(out.losses["prefix_mse_level_2"], out_twin.losses["mse_loss"])
    sae.zero_grad(set_to_none=True)  # (warm_up leaves its last step's gradients)
    out.loss.backward()
    out_twin.loss.backward()
    torch.testing.assert_close(sae.W_enc.grad[:, :TREE], twin.W_enc.grad)
    torch.testing.assert_close(sae.W_dec.grad[:TREE], twin.W_dec.grad)
    torch.testing.assert_close(sae.b_enc.grad[:TREE], twin.b_enc.grad)
    torch.testing.assert_close(sae.b_dec.grad, twin.b_dec.grad)
    assert sae.W_dec.grad[TREE:].abs().sum() > 0  # ... while the free latents do learn


def test_every_loss_term_sums_to_the_loss_and_mse_is_the_whole_saes():
    sae = free_sae(level_recon_weights=[0.5, 0.7, 1.3])
    warm_up(sae, 5)
    x = inputs(128)
    out = step(sae, x)
    assert {"mse_loss", "prefix_mse_level_0", "prefix_mse_level_1", "prefix_mse_level_2"} <= set(out.losses)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    torch.testing.assert_close(out.losses["mse_loss"], (out.sae_out - x).pow(2).sum(-1).mean())
    assert out.losses["mse_loss"] < out.losses["prefix_mse_level_2"] / 1.3  # the free latents help
    # The SAE's MSE trains the free latents only.
    grads = torch.autograd.grad(out.losses["mse_loss"], [sae.W_dec, sae.W_enc, sae.b_dec], allow_unused=True)
    assert grads[0][:TREE].abs().sum() == 0 and grads[1][:, :TREE].abs().sum() == 0
    assert grads[2] is None and grads[0][TREE:].abs().sum() > 0  # b_dec belongs to the tree
    assert out.metrics["l0_free"] == pytest.approx(2.0, abs=0.01)
    assert "threshold_free" in out.metrics


def test_a_hook_that_edits_training_activations_reaches_the_free_loss_too():
    sae = free_sae()
    x = inputs(64)
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 0.0)
    try:
        zeroed = step(sae, x)
    finally:
        sae.hook_sae_acts_post.remove_hooks()
    want = (sae.b_dec - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(zeroed.losses["mse_loss"], want)
    torch.testing.assert_close(zeroed.losses["prefix_mse_level_2"], want)


# ------------------------------------------------------------------------- inference


def _trained(variant: str = "batchtopk") -> h.HierarchicalTrainingSAE:
    sae = free_sae(variant)
    warm_up(sae, 40)
    return sae


@pytest.mark.parametrize("variant", ["batchtopk", "topk"])
def test_inference_free_latents_read_what_the_tree_leaves(variant, tmp_path):
    sae = _trained(variant)
    sae.save_inference_model(tmp_path)
    inf = SAE.load_from_disk(tmp_path)
    assert type(inf) is h.HierarchicalSAE and inf.cfg.n_free == N_FREE
    x = inputs(512, seed=7) * 2
    acts = inf.encode(x)
    tree, free = acts[:, :TREE], acts[:, TREE:]
    assert (tree[:, 4:] > 0).any() and (free > 0).any()
    par = inf.parent_index
    child = par >= 0
    assert int(((acts[:, child] > 0) & (acts[:, par[child]] <= 0)).sum()) == 0  # the gate holds
    resid = x - (tree @ inf.W_dec[:TREE] + inf.b_dec)
    pre = resid @ inf.W_enc[:, TREE:] + inf.b_enc[TREE:]
    if variant == "batchtopk":
        want = pre.relu() * (pre > inf.threshold[TREE:])
        assert torch.equal(inf.threshold[TREE:], torch.full((N_FREE,), float(sae.topk_threshold[-1])))
    else:
        assert ((free > 0).sum(-1) <= 2).all()
        want = pre.relu()
        want = torch.zeros_like(want).scatter(-1, want.topk(2, dim=-1).indices, want.topk(2, dim=-1).values)
    torch.testing.assert_close(free, want, atol=1e-5, rtol=1e-5)
    recon = inf.decode(acts)
    torch.testing.assert_close(recon, acts @ inf.W_dec + inf.b_dec, atol=1e-5, rtol=1e-5)
    tree_only = tree @ inf.W_dec[:TREE] + inf.b_dec
    assert (x - recon).pow(2).sum() < (x - tree_only).pow(2).sum()


def test_save_for_inference_is_exact_with_free_latents(tmp_path):
    sae = _trained()
    x = inputs(256, seed=3)
    sae.save_inference_model(tmp_path / "inf")
    inf = SAE.load_from_disk(tmp_path / "inf")
    # The reference: the training SAE with its batch top-k replaced by the learned thresholds.
    thr = sae.topk_threshold.float()
    with torch.no_grad():
        unit, norms = sae._unit_W_dec()
        pre = (x - sae.b_dec) @ sae.W_enc[:, :TREE] * norms[:TREE] + sae.b_enc[:TREE] * norms[:TREE]
        tree = sae._hierarchical_activation(pre, lambda lv, a, p: a * (p > thr[lv]))
        resid = x - sae.b_dec - tree @ unit[:TREE]
        pre_f = (resid @ sae.W_enc[:, TREE:] + sae.b_enc[TREE:]) * norms[TREE:]
        free = pre_f.relu() * (pre_f > thr[-1])
        want = torch.cat([tree, free], -1) @ unit + sae.b_dec
    torch.testing.assert_close(inf.decode(inf.encode(x)), want, atol=1e-5, rtol=1e-5)
    # ... and back into the training class, thresholds included; a checkpoint loads as both.
    back = TrainingSAE.load_from_disk(tmp_path / "inf")
    torch.testing.assert_close(back.topk_threshold, sae.topk_threshold.to(back.topk_threshold.dtype))
    sae.save_model(tmp_path / "ckpt")
    from_ckpt = SAE.load_from_disk(tmp_path / "ckpt")
    torch.testing.assert_close(from_ckpt.encode(x), inf.encode(x), atol=1e-5, rtol=1e-5)


def test_fold_W_dec_norm_keeps_the_outputs(tmp_path):
    sae = _trained()
    x = inputs(128, seed=4)
    sae.eval()
    before = sae.decode(sae.encode(x))
    assert not torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.d_sae))
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.decode(sae.encode(x)), before, atol=1e-5, rtol=1e-5)


def test_a_free_latent_with_a_parent_in_a_file_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    free_sae().save_model(str(tmp_path))
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    tensors["tree_parent"][TREE + 2] = 5
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(h.HierarchicalSAELoadError, match=f"gives free latent {TREE + 2} the parent 5"):
        SAE.load_from_disk(str(tmp_path))


# ----------------------------------------------------------------------------- evals


def test_eval_tables_name_the_free_latents_and_count_them_outside_the_depth(tmp_path):
    from sae_lens_hierarchical.evals import common
    from sae_lens_hierarchical.evals.levelwise.main import activation_metrics

    sae = _trained()
    sae.save_inference_model(tmp_path)
    inf = SAE.load_from_disk(tmp_path)
    tree = common.sae_tree(inf, None)
    assert (tree.free_level, tree.n_levels, tree.depth) == (3, 4, 3)
    x = inputs(512, seed=9)
    rows = activation_metrics(inf, x, tree)
    assert [r["free_latents"] for r in rows] == [False, False, False, True]
    assert rows[3]["n_latents"] == N_FREE and rows[3]["l0"] > 0
    # The last prefix is the whole SAE: its error is below the tree's own (row 2).
    with torch.no_grad():
        recon = inf.decode(inf.encode(x))
    assert rows[3]["prefix_mse"] == pytest.approx(float((x - recon).pow(2).sum(-1).mean()), rel=1e-4)
    assert rows[3]["prefix_mse"] < rows[2]["prefix_mse"]


def test_main_job_gives_every_contestant_the_free_latents_width_and_l0():
    from sae_lens_hierarchical.main_job import sae_configs

    cfgs = sae_configs(D_IN, WIDTHS, [2, 3, 4], ["hierarchical", "batchtopk", "matryoshka_batchtopk", "topk"],
                       n_free=N_FREE, k_free=2.0)
    assert {c.d_sae for c in cfgs.values()} == {TREE + N_FREE}
    assert cfgs["hsae"].n_free == N_FREE and cfgs["hsae"].k_free == 2.0
    assert cfgs["batchtopk"].k == 11.0 and cfgs["topk"].k == 11
    assert cfgs["matryoshka"].matryoshka_widths == [4, 20, 84, 92]


def test_path_attribution_picks_tree_latents_before_free_ones():
    from sae_lens_hierarchical.evals import common
    from sae_lens_hierarchical.evals.path_attribution.main import _choose_latents

    parent = torch.tensor([-1, 0, 1, -1, -1])
    tree = common.Tree(parent, torch.tensor([0, 1, 2, 3, 3]), "native", free_level=3)
    fires = torch.tensor([50, 20, 5, 90, 0])
    assert _choose_latents(tree, fires, 2) == [2, 1]  # deepest tree latents, not the free one
    assert _choose_latents(tree, fires, 4) == [2, 1, 0, 3]  # free latents last


# ----------------------------------------------------------------------------- moving budget


def test_budget_moves_to_the_group_whose_last_kept_activation_is_larger():
    sae = free_sae(free_budget_rate=0.1)
    start = list(sae._k)
    assert start == [2.0, 3.0, 4.0, 2.0]
    # The free latents' smallest kept activation is 4x the levels': budget flows to them.
    sae._level_min_kept = [torch.tensor(v) for v in (1.0, 0.2, 0.2, 0.8)]
    sae._move_budget()
    assert sae._k[0] == 2.0  # the roots keep theirs
    assert sae._k[1] < 3.0 and sae._k[2] < 4.0 and sae._k[3] > 2.0
    assert sum(sae._k) == pytest.approx(sum(start))  # total L0 unchanged
    # The other way round it flows back.
    sae._k = list(start)
    sae._level_min_kept = [torch.tensor(v) for v in (1.0, 0.8, 0.8, 0.2)]
    sae._move_budget()
    assert sae._k[3] < 2.0 and sae._k[1] > 3.0 and sum(sae._k) == pytest.approx(sum(start))
    # Equal thresholds move nothing; a level that kept nothing (inf) is skipped.
    sae._k = list(start)
    sae._level_min_kept = [torch.tensor(v) for v in (1.0, 0.5, float("inf"), 0.5)]
    sae._move_budget()
    assert sae._k == start


def test_budget_never_drops_below_a_quarter_of_the_configured_one():
    sae = free_sae(free_budget_rate=50.0)
    for _ in range(5):
        sae._level_min_kept = [torch.tensor(v) for v in (1.0, 0.01, 0.01, 10.0)]
        sae._move_budget()
    assert sae._k[1] == pytest.approx(3.0 / 4) and sae._k[2] == pytest.approx(4.0 / 4)
    assert sae._k[3] == pytest.approx(2.0 + 3.0 * 3 / 4 + 4.0 * 3 / 4)
    assert sae._k[3] <= N_FREE
    for _ in range(5):
        sae._level_min_kept = [torch.tensor(v) for v in (1.0, 10.0, 10.0, 0.01)]
        sae._move_budget()
    assert sae._k[3] == pytest.approx(2.0 / 4)


def test_training_keeps_the_moved_budget_and_logs_it():
    sae = free_sae(free_budget_rate=0.05)
    warm_up(sae, 3)
    assert sae._k != [2.0, 3.0, 4.0, 2.0] and sum(sae._k) == pytest.approx(11.0)
    sae._k = [2.0, 3.0, 1.0, 3.0]
    x = inputs(256)
    out = step(sae, x)
    assert out.metrics["l0_free"] == pytest.approx(3.0, abs=0.01)  # the selection reads the moved k
    assert out.metrics["l0_level_2"] == pytest.approx(1.0, abs=0.01)
    assert out.metrics["k_free"] == sae._k[3] and out.metrics["k_level_1"] == sae._k[1]
    assert sae.cfg.k_free == 2 and sae.cfg.k_per_level == [2, 3, 4]  # cfg keeps the start


def test_aux_loss_is_the_trees_plus_the_free_latents_each_on_its_own_residual():
    # Each block decodes only its own latents; the reference decodes all d_sae with SAELens's
    # aux-k (the other block's latents not dead, so zero) on the whole SAE's residual.
    from sae_lens.saes.topk_sae import calculate_topk_aux_acts

    sae = free_sae()
    warm_up(sae, 10)
    twin = _tree_twin(sae)
    x = inputs(256) * 2
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[TREE - 6 :] = True
    out, out_twin = step(sae, x, dead), step(twin, x, dead[:TREE])
    free_dead = dead.clone()
    free_dead[:TREE] = False
    k_aux = sae.cfg.aux_k or D_IN // 2
    n_dead = int(free_dead.sum())
    aux_acts = calculate_topk_aux_acts(min(k_aux, n_dead), out.hidden_pre, free_dead)
    unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    free_aux = (aux_acts @ unit - (x - out.sae_out).detach()).pow(2).sum(-1).mean()
    free_aux = sae.cfg.aux_loss_coefficient * min(n_dead / k_aux, 1.0) * free_aux
    assert free_aux > 0 and out_twin.losses["auxiliary_reconstruction_loss"] > 0
    torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"],
                               out_twin.losses["auxiliary_reconstruction_loss"] + free_aux)
