"""The `hierarchical` architecture: configs, tree, gating, flat views, losses, folding, saving."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from builders import (
    D_IN,
    D_SAE,
    RANKS,
    VARIANTS,
    WIDTHS,
    inputs,
    step,
    tiny_hooked_transformer,
    train_cfg,
    training_sae,
    warm_up,
)

import sae_lens_hierarchical as h
from sae_lens import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig
from sae_lens_hierarchical.hierarchical_sae import level_kl
from sae_lens_hierarchical.metrics import consistency_kl

# ---------------------------------------------------------------------------- configs


def test_tree_from_widths_roots_branching_or_d_sae_alone():
    a = train_cfg()
    b = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_roots=4, branching=[4, 4], k_per_level=[2, 3, 4])
    c = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k_per_level=[2, 3, 4])  # default branching 4
    for cfg in (a, b, c):
        assert cfg.level_widths == WIDTHS and cfg.branching == [4, 4] and cfg.n_roots == 4
    d = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=2 + 4 + 24 + 48, n_levels=4, n_roots=2,
                                        branching=[2, 6, 2], k_per_level=[1, 1.5, 2, 3])
    assert d.level_widths == [2, 4, 24, 48]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"level_widths": [4, 18, 72], "d_sae": 94}, "level_widths"),
        ({"level_widths": [4, 16]}, "level_widths"),
        ({"d_sae": D_SAE + 1}, "d_sae"),
        ({"level_widths": None, "d_sae": 100}, "d_sae"),
        ({"branching": [4, 2]}, "branching"),
        ({"n_roots": 5}, "n_roots"),
        ({"n_levels": 0, "level_widths": None}, "n_levels"),
        ({"k_per_level": [5, 3, 4]}, "k_per_level"),
        ({"k_per_level": [2, 3]}, "k_per_level"),
        ({"k_per_level": [1, 8, 32]}, "k_per_level"),  # denser deeper: refused
        ({"variant": "gated"}, "variant"),
        ({"variant": "topk", "k_per_level": [2, 2.5, 4]}, "k_per_level"),
        ({"kl_coefficient": -0.1}, "kl_coefficient"),
        ({"l2_coefficient": -1.0}, "l2_coefficient"),
        ({"aux_loss_coefficient": -1.0}, "aux_loss_coefficient"),
        ({"l2_form": "cosine"}, "l2_form"),
        ({"projection_rank": 0}, "projection_rank"),
        ({"projection_rank": D_IN + 1}, "projection_rank"),
        ({"level_recon_weights": [1.0, 1.0]}, "level_recon_weights"),
        ({"level_recon_weights": [1.0, -1.0, 1.0]}, "level_recon_weights"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations"),
        ({"child_init_parent_mix": 1.5}, "child_init_parent_mix"),
        ({"variant": "relu", "k_per_level": None}, "l1_per_level"),
        ({"variant": "relu", "l1_per_level": [0.1, 0.01, 0.01]}, "l1_per_level"),
        ({"variant": "relu", "l1_per_level": [0.1, -0.1, 0.2]}, "l1_per_level"),
    ],
)
def test_invalid_config_names_field_and_value(kwargs, field):
    base = dict(d_in=D_IN, d_sae=D_SAE, level_widths=list(WIDTHS), k_per_level=[2, 3, 4])
    base.update(kwargs)
    with pytest.raises(ValueError) as e:
        h.HierarchicalTrainingSAEConfig(**base)
    msg = str(e.value)
    assert field in msg
    assert repr(kwargs.get(field, base.get(field)))[:6] in msg or field == "d_sae"


def test_sparsity_order_can_be_opted_out():
    cfg = train_cfg(k_per_level=[1, 8, 32], allow_nonincreasing_sparsity=True)
    assert cfg.k_per_level == [1, 8, 32]
    relu = train_cfg("relu", l1_per_level=[0.1, 0.01, 0.0], allow_nonincreasing_sparsity=True)
    assert relu.l1_per_level == [0.1, 0.01, 0.0]


def test_inference_config_validates_too():
    with pytest.raises(ValueError, match="variant"):
        h.HierarchicalSAEConfig(d_in=D_IN, d_sae=D_SAE, level_widths=WIDTHS, variant="nope")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rank", RANKS)
def test_config_round_trips_through_dict_json_and_cfg_json(variant, rank, tmp_path):
    cfg = train_cfg(variant, rank, kl_coefficient=0.3, l2_form="activation", l2_coefficient=0.2)
    back = TrainingSAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert type(back) is h.HierarchicalTrainingSAEConfig
    assert back.to_dict() == cfg.to_dict()

    sae = h.HierarchicalTrainingSAE(cfg)
    sae.save_inference_model(tmp_path)
    on_disk = json.loads((tmp_path / "cfg.json").read_text())
    assert on_disk["architecture"] == "hierarchical"
    inf_cfg = SAEConfig.from_dict(on_disk)
    assert type(inf_cfg) is h.HierarchicalSAEConfig
    for name in ("level_widths", "branching", "variant", "k_per_level", "projection_rank", "n_levels"):
        assert getattr(inf_cfg, name) == getattr(cfg, name)
    assert on_disk["metadata"]["training_architecture_details"]["kl_coefficient"] == 0.3


def test_registration_is_idempotent_in_any_order():
    h.register()
    h.register()
    code = (
        "import importlib, sae_lens\n"
        "from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY\n"
        "import sae_lens_hierarchical as p\n"
        "importlib.reload(p.registration); p.register(); importlib.reload(p)\n"
        "assert SAE_CLASS_REGISTRY['hierarchical'][0].__name__ == 'HierarchicalSAE'\n"
        "assert SAE_TRAINING_CLASS_REGISTRY['hierarchical'][0].__name__ == 'HierarchicalTrainingSAE'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------------- tree


def test_tree_accessors():
    sae = training_sae()
    pi = sae.parent_index
    assert pi.dtype == torch.long and pi.shape == (D_SAE,)
    assert pi[:4].tolist() == [-1] * 4
    assert pi[4:8].tolist() == [0] * 4 and pi[8:12].tolist() == [1] * 4
    assert pi[20].item() == 4 and pi[D_SAE - 1].item() == 19
    assert sae.level_slices == [slice(0, 4), slice(4, 20), slice(20, 84)]
    assert sae.children(1) == [8, 9, 10, 11]
    assert sae.children(5) == [24, 25, 26, 27]
    assert sae.children(83) == []
    assert sae.path(83) == [3, 19, 83]
    assert sae.latent_levels.bincount().tolist() == WIDTHS
    # children() without an index is still nn.Module.children(), which torch relies on.
    assert all(isinstance(m, torch.nn.Module) for m in sae.children())
    with pytest.raises(IndexError):
        sae.children(D_SAE)


# ------------------------------------------------------------- gating and sparsity


def _saved_inference(sae, tmp_path):
    sae.save_inference_model(tmp_path)
    return SAE.load_from_disk(tmp_path)


def _violations(acts: torch.Tensor, parent_index: torch.Tensor) -> int:
    has_parent = parent_index >= 0
    parent_acts = acts[..., parent_index.clamp(min=0)]
    return int(((acts > 0) & (parent_acts <= 0) & has_parent).sum())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rank", RANKS)
def test_no_child_is_ever_active_while_its_parent_is_inactive(variant, rank, tmp_path):
    sae = training_sae(variant, rank)
    warm_up(sae)
    x = inputs(1024) * 3
    acts = step(sae, x).feature_acts
    assert (acts > 0).sum() > 0
    # Children do fire, so the check is not vacuous.
    assert (acts[:, 4:] > 0).sum() > 0
    assert _violations(acts, sae.parent_index) == 0
    inf = _saved_inference(sae, tmp_path)
    inf_acts = inf.encode(x)
    assert (inf_acts[:, 4:] > 0).sum() > 0
    assert _violations(inf_acts, inf.parent_index) == 0


def test_ungated_children_would_fire_without_parent():
    """The gate is what prevents violations: without it children fire on their own."""
    sae = training_sae("relu")
    x = inputs(512) * 3
    pre = sae.encode_with_hidden_pre(x)[1]
    ungated = pre.relu()
    assert _violations(ungated, sae.parent_index) > 0


@pytest.mark.parametrize("rank", RANKS)
def test_levelwise_sparsity_budgets(rank, tmp_path):
    x = inputs(512) * 3
    topk = training_sae("topk", rank)
    acts = topk.encode(x)
    for k, sl in zip([2, 3, 4], topk.level_slices):
        assert ((acts[:, sl] > 0).sum(-1) <= k).all()
    # the roots keep exactly min(k_0, #positive pre-activations) per token
    positive_roots = (topk.encode_with_hidden_pre(x)[1][:, :4] > 0).sum(-1)
    assert torch.equal((acts[:, :4] > 0).sum(-1), positive_roots.clamp(max=2))

    btk = training_sae("batchtopk", rank)
    acts = btk.encode(x)
    n_positive = (btk.encode_with_hidden_pre(x)[1][:, :4] > 0).sum().item()
    assert n_positive > 2 * 512 * 0.5
    # exactly k_0 per token on average (capped by how many roots are positive at all)
    assert (acts[:, :4] > 0).sum().item() == min(2 * 512, n_positive)
    for k, sl in zip([3, 4], btk.level_slices[1:]):
        assert (acts[:, sl] > 0).sum().item() <= k * 512


# --------------------------------------------------------------------- flat views


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rank", RANKS)
def test_flat_views_reproduce_encode_and_decode(variant, rank, tmp_path):
    sae = training_sae(variant, rank)
    warm_up(sae)
    inf = _saved_inference(sae, tmp_path)
    assert inf.W_enc.shape == (D_IN, D_SAE) and inf.W_dec.shape == (D_SAE, D_IN)
    x = inputs(64)
    _, cache = inf.run_with_cache(x)
    expected_pre = (x - inf.b_dec) @ inf.W_enc + inf.b_enc
    torch.testing.assert_close(cache["hook_sae_acts_pre"], expected_pre, atol=1e-5, rtol=1e-5)
    a = inf.encode(x)
    torch.testing.assert_close(inf.decode(a), a @ inf.W_dec + inf.b_dec, atol=1e-5, rtol=1e-5)
    # decode is affine: linear in the latents once b_dec is removed
    a2 = torch.rand_like(a)
    lin = lambda z: inf.decode(z) - inf.b_dec  # noqa: E731
    torch.testing.assert_close(lin(2 * a - 3 * a2), 2 * lin(a) - 3 * lin(a2), atol=1e-4, rtol=1e-4)


def test_children_live_in_their_parents_subspace():
    rank, b = 2, 8
    cfg = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=2 + 16 + 128, level_widths=[2, 16, 128],
                                          projection_rank=rank, k_per_level=[1, 2, 4])
    sae = h.HierarchicalTrainingSAE(cfg)
    W_dec, W_enc = sae.W_dec.detach(), sae.W_enc.detach()
    for p in range(cfg.d_sae - 128):
        kids = sae.children(p)
        assert len(kids) == b
        assert torch.linalg.matrix_rank(W_dec[kids]) == rank
        assert torch.linalg.matrix_rank(W_enc[:, kids]) == rank
    unfactored = h.HierarchicalTrainingSAE(train_cfg(rank=None))
    assert torch.linalg.matrix_rank(unfactored.W_dec.detach()[unfactored.children(0)]) == 4


@pytest.mark.parametrize("variant", ["topk", "relu"])
def test_any_leading_dimensions(variant, tmp_path):
    inf = _saved_inference(training_sae(variant), tmp_path)
    x = inputs(24).reshape(2, 3, 4, D_IN)
    a = inf.encode(x)
    assert a.shape == (2, 3, 4, D_SAE)
    torch.testing.assert_close(a.reshape(24, -1), inf.encode(x.reshape(24, D_IN)))
    assert inf.decode(a).shape == x.shape
    assert inf(x).shape == x.shape


def test_hook_points_fire(tmp_path):
    inf = _saved_inference(training_sae("topk"), tmp_path)
    _, cache = inf.run_with_cache(inputs(8))
    for name in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"):
        assert name in cache
    assert cache["hook_sae_acts_post"].shape == (8, D_SAE)



def test_a_hook_that_edits_training_activations_reaches_the_loss():
    sae = training_sae("batchtopk")
    x = inputs(64)
    plain = step(sae, x).losses
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 0.0)
    try:
        zeroed = step(sae, x)
    finally:
        sae.hook_sae_acts_post.remove_hooks()
    assert float(zeroed.feature_acts.abs().sum()) == 0.0
    # Nothing active: the reconstruction is b_dec alone, at every prefix.
    want = (sae.b_dec - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(zeroed.losses["mse_loss"], want)
    torch.testing.assert_close(zeroed.losses["prefix_mse_level_0"], want)
    assert plain["mse_loss"].item() < want.item()

def test_spliced_into_hooked_sae_transformer(tmp_path):
    model = tiny_hooked_transformer()
    sae = training_sae("topk")
    warm_up(sae)
    inf = _saved_inference(sae, tmp_path)
    inf.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    clean = model(tokens)
    model.add_sae(inf)
    logits, cache = model.run_with_cache(tokens)
    acts = cache["blocks.0.hook_resid_post.hook_sae_acts_post"]
    assert acts.shape == (2, 10, D_SAE) and (acts > 0).any()
    assert not torch.allclose(logits, clean)  # the reconstruction is really spliced in
    model.reset_saes()
    model.add_sae(inf, use_error_term=True)
    torch.testing.assert_close(model(tokens), clean, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------- losses


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_loss_term_is_named_and_sums_to_the_loss(variant):
    sae = training_sae(variant, kl_coefficient=0.5, l2_coefficient=0.25, level_recon_weights=[0.5, 0.7, 1.3])
    warm_up(sae, 5)
    x = inputs(128)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[-10:] = True
    out = step(sae, x, dead)
    names = {"mse_loss", "prefix_mse_level_0", "prefix_mse_level_1", "kl_consistency_loss",
             "l2_consistency_loss", "auxiliary_reconstruction_loss"}
    if variant == "relu":
        names.add("l1_loss")
    assert set(out.losses) == names
    assert all(v.item() > 0 for v in out.losses.values())
    expected = 1.3 * out.losses["mse_loss"] + sum(v for k, v in out.losses.items() if k != "mse_loss")
    torch.testing.assert_close(out.loss, expected)
    # the prefix term really is the roots-only reconstruction
    unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    acts = out.feature_acts
    roots_only = sae.b_dec + acts[:, :4] @ unit[:4]
    torch.testing.assert_close(out.losses["prefix_mse_level_0"], 0.5 * (roots_only - x).pow(2).sum(-1).mean())
    assert {"l0_level_0", "l0_level_1", "l0_level_2"} <= set(out.metrics)


@pytest.mark.parametrize("off", ["kl_coefficient", "l2_coefficient", "aux_loss_coefficient"])
def test_each_consistency_term_switches_off_by_its_coefficient(off):
    kw = {"kl_coefficient": 0.5, "l2_coefficient": 0.5, "aux_loss_coefficient": 1.0, off: 0.0}
    sae = training_sae("batchtopk", **kw)
    x = inputs(64)
    dead = torch.ones(D_SAE, dtype=torch.bool)
    out = step(sae, x, dead)
    name = {"kl_coefficient": "kl_consistency_loss", "l2_coefficient": "l2_consistency_loss",
            "aux_loss_coefficient": "auxiliary_reconstruction_loss"}[off]
    assert out.losses[name].item() == 0.0
    others = [k for k in out.losses if k not in (name, "mse_loss", "prefix_mse_level_0", "prefix_mse_level_1")]
    assert all(out.losses[k].item() > 0 for k in others)


def test_l2_forms_differ_and_decoder_form_is_zero_for_identical_children():
    sae = training_sae("topk", rank=None, l2_coefficient=1.0)
    x = inputs(64)
    dec = step(sae, x).losses["l2_consistency_loss"]
    with torch.no_grad():  # make every child's decoder row equal its parent's
        sae.W_dec[4:20] = sae.W_dec[:4].repeat_interleave(4, 0)
        sae.W_dec[20:84] = sae.W_dec[4:20].repeat_interleave(4, 0)
    assert step(sae, x).losses["l2_consistency_loss"].item() < 1e-10 < dec.item()
    sae_act = training_sae("topk", rank=None, l2_coefficient=1.0, l2_form="activation")
    acts = step(sae_act, x).feature_acts
    expected = sum(
        (acts[:, p] - acts[:, c].unflatten(-1, (-1, 4)).sum(-1)).pow(2).sum(-1).mean()
        for p, c in [(slice(0, 4), slice(4, 20)), (slice(4, 20), slice(20, 84))]
    )
    torch.testing.assert_close(step(sae_act, x).losses["l2_consistency_loss"], expected)


def test_level_kl_matches_the_general_metric_and_is_zero_when_consistent():
    sae = training_sae("relu")
    acts = step(sae, inputs(256) * 3).feature_acts
    general = consistency_kl(acts, sae.parent_index, None)
    torch.testing.assert_close(level_kl(acts, sae.cfg), general, atol=1e-5, rtol=1e-4)
    # Children carrying exactly their parent's mass, split any way: KL 0.
    consistent = torch.zeros(3, D_SAE)
    consistent[:, :4] = torch.tensor([1.0, 2.0, 0.0, 3.0])
    consistent[:, 4:20] = consistent[:, :4].repeat_interleave(4, -1) / 4
    consistent[:, 20:] = consistent[:, 4:20].repeat_interleave(4, -1) / 4
    assert level_kl(consistent, sae.cfg).item() < 1e-5
    consistent[:, 4] += 5.0
    assert level_kl(consistent, sae.cfg).item() > 0.1


def test_aux_loss_uses_the_dead_latent_mask():
    sae = training_sae("batchtopk")
    x = inputs(64)
    assert step(sae, x, None).losses["auxiliary_reconstruction_loss"].item() == 0.0
    assert step(sae, x, torch.zeros(D_SAE, dtype=torch.bool)).losses["auxiliary_reconstruction_loss"].item() == 0.0
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[30:40] = True
    out = step(sae, x, dead)
    assert out.losses["auxiliary_reconstruction_loss"].item() > 0
    out.losses["auxiliary_reconstruction_loss"].backward()
    assert sae.b_enc.grad[30:40].abs().sum() > 0 and sae.b_enc.grad[:30].abs().sum() == 0


def test_batchtopk_thresholds_are_learned_per_level():
    sae = training_sae("batchtopk")
    assert sae.topk_threshold.tolist() == [0.0, 0.0, 0.0]
    warm_up(sae, 10)
    thr = sae.topk_threshold
    assert thr.shape == (3,) and (thr > 0).all()



def _dense_gated_batchtopk(sae, hidden_pre):
    """Reference: gate each dense level by its parents, then keep the level's top k*B entries."""
    outs, parent_on = [], None
    for level, sl in enumerate(sae.level_slices):
        acts = hidden_pre[..., sl].relu()
        if parent_on is not None:  # each child times its own parent's on/off (any tree)
            acts = acts * parent_on[:, sae.parent_index[sl] - sae.level_slices[level - 1].start]
        flat = acts.flatten()
        vals, idx = flat.topk(int(sae.cfg.k_per_level[level] * acts.shape[0]))
        acts = torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts)
        parent_on = (acts > 0).float()
        outs.append(acts)
    return torch.cat(outs, -1)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_batchtopk_selection_equals_gating_the_dense_levels(rank, seed):
    """Training selects children only among the kept parents' children; the result and its
    gradient must equal gating every dense level and taking its top-k."""
    sae = training_sae("batchtopk", rank=rank, seed=seed, k_per_level=[1.5, 2.0, 3.0])
    warm_up(sae, 5)
    got = _check_sparse_selection_against_dense(sae, inputs(96, seed=seed))
    assert (got > 0).sum() > 0.5 * sum(sae.cfg.k_per_level) * 96  # not vacuous


def _check_sparse_selection_against_dense(sae, x):
    """The sparse selection and its gradient equal the dense reference; returns the selection."""
    hidden_pre = sae.encode_with_hidden_pre(x)[1].detach().requires_grad_(True)
    got = torch.cat(sae._batchtopk_levels(hidden_pre), -1)
    ref_pre = hidden_pre.detach().clone().requires_grad_(True)
    want = _dense_gated_batchtopk(sae, ref_pre)
    torch.testing.assert_close(got, want)
    w = torch.randn_like(got)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(hidden_pre.grad, ref_pre.grad)
    return got.detach()


def test_weights_saved_per_level_by_older_versions_still_load(tmp_path):
    """Before 0.2 unfactored weights were stored per level (W_enc_l0, W_dec_l0, ...)."""
    from safetensors.torch import load_file, save_file

    sae = training_sae("batchtopk", rank=None)
    warm_up(sae, 5)
    sae.save_model(str(tmp_path / "new"))
    tensors = load_file(str(tmp_path / "new" / "sae_weights.safetensors"))
    assert {"W_enc", "W_dec"} <= set(tensors)  # SAELens's usual names, flat
    W_enc, W_dec = tensors.pop("W_enc"), tensors.pop("W_dec")
    for level, sl in enumerate(sae.level_slices):
        tensors[f"W_enc_l{level}"] = W_enc[:, sl].contiguous()
        tensors[f"W_dec_l{level}"] = W_dec[sl].contiguous()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "cfg.json").write_text((tmp_path / "new" / "cfg.json").read_text())
    save_file(tensors, str(tmp_path / "old" / "sae_weights.safetensors"))
    x = inputs(32)
    for cls in (SAE, TrainingSAE):
        a, b = cls.load_from_disk(str(tmp_path / "new")), cls.load_from_disk(str(tmp_path / "old"))
        torch.testing.assert_close(_outputs(a, x), _outputs(b, x))


# ------------------------------------------------------------- folding and saving


def _outputs(sae, x):
    return sae.decode(sae.encode(x))


def _untied(sae, x):
    """For per-token TopK, rows whose pre-activations hold no two values equal to float32
    rounding: a fold's rounding may legitimately swap which of two tied latents wins there."""
    if sae.cfg.variant != "topk":
        return x
    with torch.no_grad():
        pre = sae.encode_with_hidden_pre(x)[1] if hasattr(sae, "training_forward_pass") else (
            sae.process_sae_in(x) @ sae.W_enc + sae.b_enc)
        s = pre.sort(-1).values
        tied = ((s[:, 1:] - s[:, :-1]).abs() <= 1e-6 * s[:, 1:].abs().clamp(min=1e-3)).any(-1)
    assert tied.float().mean() < 0.05  # a rare coincidence, never most rows
    return x[~tied]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rank", RANKS)
def test_fold_W_dec_norm_is_exact(variant, rank, tmp_path):
    sae = training_sae(variant, rank)
    warm_up(sae)
    x = _untied(sae, inputs(128))
    before = _outputs(sae, x)
    assert not torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5, rtol=0)
    torch.testing.assert_close(_outputs(sae, x), before, atol=1e-5, rtol=1e-5)

    if variant == "topk":
        return  # a per-token TopK selection is not invariant to unfolded norms (refused below)
    inf = _saved_inference(training_sae(variant, rank), tmp_path)
    with torch.no_grad():  # give the inference SAE non-unit norms, then fold them away
        scale = torch.linspace(0.5, 2.0, D_SAE)
        from sae_lens_hierarchical.hierarchical_sae import scale_latents
        w = {n: p.data for n, p in inf.named_parameters()}
        scale_latents(w, inf.cfg, 1.0 / scale, scale)
        for n, v in w.items():
            getattr(inf, n).data.copy_(v)
        inf.b_enc.data /= scale
        inf.threshold.data /= scale
    before = _outputs(inf, x)
    inf.fold_W_dec_norm()
    torch.testing.assert_close(_outputs(inf, x), before, atol=1e-5, rtol=1e-5)


def test_fold_W_dec_norm_refuses_when_topk_selection_would_change(tmp_path):
    inf = _saved_inference(training_sae("topk"), tmp_path)
    inf.fold_W_dec_norm()  # unit norms: fine
    with torch.no_grad():
        inf.W_dec_l0.mul_(3.0)
    with pytest.raises(NotImplementedError, match="TopK"):
        inf.fold_W_dec_norm()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rank", RANKS)
def test_activation_norm_scaling_fold_is_exact(variant, rank, tmp_path):
    s = 2.7
    sae = training_sae(variant, rank, normalize_activations="expected_average_only_in")
    warm_up(sae)
    x = inputs(128)
    before = _outputs(sae, x * s) / s
    sae.fold_activation_norm_scaling_factor(s)
    assert sae.cfg.normalize_activations == "none"
    torch.testing.assert_close(_outputs(sae, x), before, atol=1e-5, rtol=1e-5)

    inf = _saved_inference(training_sae(variant, rank), tmp_path)
    before = _outputs(inf, x * s) / s
    inf.fold_activation_norm_scaling_factor(s)
    torch.testing.assert_close(_outputs(inf, x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rank", RANKS)
def test_save_for_inference_is_exact(variant, rank, tmp_path):
    sae = training_sae(variant, rank)
    warm_up(sae)
    x = _untied(sae, inputs(256))
    inf = _saved_inference(sae, tmp_path)
    assert type(inf) is h.HierarchicalSAE
    torch.testing.assert_close(inf.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5, rtol=0)
    if variant == "batchtopk":
        # Inference replaces the batch top-k by the learned per-level thresholds.
        thr = sae.topk_threshold.float()
        _, pre = sae.encode_with_hidden_pre(x)
        expected_acts = sae._hierarchical_activation(pre, lambda lv, a, p: a * (p > thr[lv]))
        expected = sae.decode(expected_acts)
        assert torch.equal(inf.threshold[:4], thr[0].expand(4))
    else:
        expected_acts, expected = sae.encode(x), _outputs(sae, x)
    torch.testing.assert_close(inf.encode(x), expected_acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_outputs(inf, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", RANKS)
def test_checkpoints_and_inference_dirs_load_into_either_class(rank, tmp_path):
    sae = training_sae("batchtopk", rank)
    warm_up(sae)
    x = inputs(64)
    sae.save_model(tmp_path / "ckpt")  # a training checkpoint: unfolded, per-level thresholds
    sae.save_inference_model(tmp_path / "inf")
    from_ckpt = SAE.load_from_disk(tmp_path / "ckpt")
    from_inf = SAE.load_from_disk(tmp_path / "inf")
    torch.testing.assert_close(_outputs(from_ckpt, x), _outputs(from_inf, x), atol=1e-5, rtol=1e-5)
    back = TrainingSAE.load_from_disk(tmp_path / "inf")
    assert type(back) is h.HierarchicalTrainingSAE
    torch.testing.assert_close(back.topk_threshold, sae.topk_threshold.to(back.topk_threshold.dtype))
    torch.testing.assert_close(_outputs(back, x), _outputs(sae, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_loads_in_other_dtypes(dtype, tmp_path):
    sae = training_sae("topk")
    sae.save_inference_model(tmp_path)
    inf = SAE.load_from_disk(tmp_path, dtype=dtype)
    assert inf.W_dec.dtype == getattr(torch, dtype)
    out = _outputs(inf, inputs(8))
    assert out.dtype == getattr(torch, dtype) and torch.isfinite(out.float()).all()



# ------------------------------------------------------------------- tree fitting

from sae_lens_hierarchical.hierarchical_sae import capacity_assign  # noqa: E402


@pytest.mark.parametrize("n_par, b", [(4, 4), (300, 4)])  # exact (Hungarian) and greedy paths
def test_capacity_assign_recovers_a_planted_assignment(n_par, b):
    g = torch.Generator().manual_seed(0)
    true_parent = torch.randperm(n_par * b, generator=g) // b  # each parent owns exactly b
    score = torch.rand(n_par * b, n_par, generator=g) * 0.3
    score[torch.arange(n_par * b), true_parent] += 0.7
    perm = capacity_assign(score, b)
    assert sorted(perm.tolist()) == list(range(n_par * b))  # a permutation
    new_parent = torch.arange(n_par * b) // b
    assert torch.equal(true_parent[perm], new_parent)


def test_capacity_assign_respects_capacity_when_everyone_wants_one_parent():
    score = torch.zeros(8, 2)
    score[:, 0] = 1.0
    perm = capacity_assign(score, 4)
    assert sorted(perm.tolist()) == list(range(8))
    with pytest.raises(ValueError, match="cannot fill"):
        capacity_assign(torch.zeros(7, 2), 4)


@pytest.mark.parametrize("rank", RANKS)
def test_fit_tree_reseats_children_under_their_cofiring_parents(rank):
    sae = training_sae("topk", rank, tree_fit_step=5, tree_fit_stat_steps=1)
    assert not bool(sae.tree_fitted)
    warm_up(sae, 3)  # steps 0..2 of warm_up run with n_training_steps=0: ungated, no counting
    x = inputs(256)
    ungated = lambda: sae.decode(sae._hierarchical_activation(  # noqa: E731
        sae.encode_with_hidden_pre(x)[1], sae._select_train, gated=False))
    before = ungated()
    rows_before = sae.W_dec.detach().clone()
    # Plant co-firing: level-1 slot c fires with root true1[c]; level-2 slot c with level-1 slot true2[c].
    g = torch.Generator().manual_seed(3)
    true1 = torch.randperm(16, generator=g) // 4
    true2 = torch.randperm(64, generator=g) // 4
    acts = torch.zeros(64 * 4, D_SAE)
    for t in range(64 * 4):
        c2 = t % 64
        c1 = int(true2[c2])
        acts[t, 20 + c2] = 1.0
        acts[t, 4 + c1] = 1.0
        acts[t, int(true1[c1])] = 1.0
    sae._count_cofiring(acts)
    sae.fit_tree()
    assert bool(sae.tree_fitted)
    rows_after = sae.W_dec.detach()
    # each old level-1 slot c now sits under root true1[c]; find where each row went
    where1 = [int((rows_after[4:20] - rows_before[4 + c]).norm(dim=-1).argmin()) for c in range(16)]
    assert [w // 4 for w in where1] == true1.tolist()
    where2 = [int((rows_after[20:] - rows_before[20 + c]).norm(dim=-1).argmin()) for c in range(64)]
    # old level-2 slot c must sit under the NEW position of its old level-1 parent
    assert [w // 4 for w in where2] == [where1[int(p)] for p in true2]
    # permuting slots within levels leaves the ungated model's function unchanged
    torch.testing.assert_close(ungated(), before, atol=1e-4, rtol=1e-4)


def test_training_switches_the_gate_on_at_tree_fit_step():
    sae = training_sae("batchtopk", tree_fit_step=3, tree_fit_stat_steps=2)
    x = inputs(256) * 3
    from sae_lens.saes.sae import TrainStepInput

    def run(t):
        return sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=t, is_logging_step=False))

    acts0 = run(0).feature_acts
    assert _violations(acts0, sae.parent_index) > 0  # ungated phase: children fire freely
    run(1)
    run(2)
    assert len(sae._cofire) == 2 and not bool(sae.tree_fitted)
    acts3 = run(3).feature_acts
    assert bool(sae.tree_fitted) and sae._cofire == {}
    assert _violations(acts3, sae.parent_index) == 0


def test_aux_within_parent_only_revives_children_whose_parent_is_on():
    sae = training_sae("topk", aux_within_parent=True)
    x = inputs(128) * 3
    out = step(sae, x)
    acts, pre = out.feature_acts, out.hidden_pre
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[4:20] = True  # every level-1 latent counts as dead
    aux = sae._aux_acts_within_parent(8, pre, dead, acts)
    chosen = aux != 0
    assert chosen[:, :4].sum() == 0 and chosen[:, 20:].sum() == 0  # only dead latents
    parent_on = (acts[:, :4] > 0).repeat_interleave(4, dim=-1)
    assert chosen[:, 4:20].sum() > 0
    assert not (chosen[:, 4:20] & ~parent_on).any()  # never under an inactive parent
    # a token whose roots are all off gets no aux activations at all (no -inf leaks)
    assert torch.isfinite(aux).all()



# ------------------------------------------------------------- re-seating children


def _shuffled_tree(sae, seed=0):
    """A valid non-contiguous tree: every child under a random parent one level up."""
    g = torch.Generator().manual_seed(seed)
    tree = sae.parent_index.clone()
    for level in range(1, sae.n_levels):
        sl, psl = sae.level_slices[level], sae.level_slices[level - 1]
        tree[sl] = psl.start + torch.randint(0, psl.stop - psl.start, (sl.stop - sl.start,), generator=g)
    return tree


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_selection_on_a_reseated_tree_equals_the_dense_reference(seed):
    sae = training_sae("batchtopk", rank=None, seed=seed, k_per_level=[1.5, 2.0, 3.0])
    warm_up(sae, 5)
    sae._set_tree(_shuffled_tree(sae, seed))
    assert not sae._contiguous and sae._kids(1).shape[1] != 4  # some parent has != 4 children
    got = _check_sparse_selection_against_dense(sae, inputs(96, seed=seed))
    assert _violations(got, sae.parent_index) == 0 and (got > 0).sum() > 100


def test_level_kl_on_a_reseated_tree_matches_the_general_metric():
    sae = training_sae("relu", rank=None)
    sae._set_tree(_shuffled_tree(sae))
    acts = step(sae, inputs(256) * 3).feature_acts.detach()
    parents = [sae._local_parents(lv) for lv in range(1, 3)]
    general = consistency_kl(acts, sae.parent_index, None)
    torch.testing.assert_close(level_kl(acts, sae.cfg, parents=parents), general, atol=1e-5, rtol=1e-4)


def test_reseat_moves_dead_children_under_the_parent_with_most_uncovered_firings():
    sae = training_sae("batchtopk", rank=None, reseat_every=10)
    x = inputs(256)
    levels = sae._encode(x).levels
    recon = sae.decode(torch.cat(levels, -1)).detach()
    sae._count_uncovered(levels, x - recon)
    unc = sae._uncovered[1].clone()
    hungry = int(unc.argmax())
    assert unc[hungry] > 0
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[4, 5]] = True  # two level-1 children of root 0
    before = sae.parent_index.clone()
    assert sae.reseat(dead) == 2
    tree = sae.parent_index
    assert tree[4] == hungry  # the hungriest root takes the first one
    assert (tree != before).sum() <= 2 and sae._uncovered == {}
    # its new decoder row points along that parent's uncovered residual
    direction = torch.nn.functional.normalize(
        ((x - recon) * ((levels[0][:, hungry] > 0) & ~(levels[1][:, 4 * hungry:4 * hungry + 4] > 0).any(-1)).unsqueeze(-1).float()).sum(0), dim=0)
    cos = torch.nn.functional.cosine_similarity(sae.W_dec[4].detach(), direction, dim=0)
    assert cos > 0.999
    out = step(sae, x)
    assert _violations(out.feature_acts, tree) == 0


@pytest.mark.parametrize("cls", [SAE, TrainingSAE])
def test_a_reseated_tree_saves_and_loads(cls, tmp_path):
    sae = training_sae("batchtopk", rank=None)
    warm_up(sae, 5)
    sae._set_tree(_shuffled_tree(sae))
    x = inputs(64)
    if cls is SAE:
        sae.save_inference_model(str(tmp_path))
    else:
        sae.save_model(str(tmp_path))
    loaded = cls.load_from_disk(str(tmp_path))
    assert torch.equal(loaded.parent_index, sae.parent_index) and not loaded._contiguous
    assert loaded.parent_index.dtype == torch.long
    acts = loaded.encode(x)
    assert _violations(acts, loaded.parent_index) == 0 and (acts > 0).any()
    assert loaded.tree_children(0) == (sae.parent_index == 0).nonzero().flatten().tolist()


def test_an_impossible_tree_in_a_file_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    sae = training_sae("batchtopk", rank=None)
    sae.save_model(str(tmp_path))
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    tensors["tree_parent"][30] = 2  # a level-2 latent under a root
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(h.HierarchicalSAELoadError, match=r"'tree_parent' gives latent 30 \(level 2\) the parent 2"):
        SAE.load_from_disk(str(tmp_path))


def test_reseating_needs_unfactored_children():
    with pytest.raises(ValueError, match="reseat_every=10 is invalid; re-seating needs projection_rank: null"):
        train_cfg("batchtopk", 4, reseat_every=10)


def test_a_slot_moved_at_one_reseat_sits_out_the_next():
    sae = training_sae("batchtopk", rank=None, reseat_every=10)
    x = inputs(256)

    def count():
        levels = sae._encode(x).levels
        sae._count_uncovered(levels, x - sae.decode(torch.cat(levels, -1)).detach())

    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[4, 5]] = True
    count()
    assert sae.reseat(dead) == 2
    count()
    assert sae.reseat(dead) == 0  # still "dead" by SAELens's count, but just moved
    count()
    assert sae.reseat(dead) == 2  # a round later they may move again


def test_reseat_runs_on_schedule_and_stops_at_reseat_until():
    from sae_lens.saes.sae import TrainStepInput

    sae = training_sae("batchtopk", rank=None, reseat_every=4, reseat_stat_steps=2, reseat_until=9)
    calls = []
    real = sae.reseat
    sae.reseat = lambda dead: calls.append(sae._steps_done) or real(dead)  # type: ignore[method-assign]
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    for n in range(14):
        sae.training_forward_pass(TrainStepInput(sae_in=inputs(64, seed=n), coefficients={},
                                                 dead_neuron_mask=dead, n_training_steps=n,
                                                 is_logging_step=False))
    assert calls == [4, 8]  # steps 4 and 8; 12 is past reseat_until
