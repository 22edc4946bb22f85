"""The inference SAE: saved from training exactly, the tree with it, folds, flat views, hooks,
splicing into a model, other dtypes, loading errors that name the tensor."""

from __future__ import annotations

import pytest
import torch
from builders import D_IN, D_SAE, inputs, step, tiny_hooked_transformer, training_sae, warm_up
from sae_lens import SAE, TrainingSAE

import sae_lens_hierarchical as h


def _saved(sae, tmp_path):
    sae.save_inference_model(tmp_path)
    return SAE.load_from_disk(tmp_path)


def _outputs(sae, x):
    return sae.decode(sae.encode(x))


def _threshold_reference(sae, x):
    """What inference must compute: the training SAE's pre-activations (decoder-norm units),
    kept where they exceed their level's learned threshold (then gated, if the SAE gates)."""
    _, pre = sae.encode_with_hidden_pre(x)
    thr = sae.topk_threshold.float()[sae.latent_levels]
    acts = pre.relu() * (pre > thr)
    if sae.cfg.gate == "hard":
        from sae_lens_hierarchical.tree import gate

        acts = gate(acts, sae.tree_parent, sae.cfg.level_widths)
    unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    return acts, acts @ unit + sae.b_dec


@pytest.mark.parametrize("design", ["learned", "per_level", "gated", "projected"])
def test_save_for_inference_is_exact(design, tmp_path):
    sae = training_sae(design)
    warm_up(sae, 12)
    x = inputs(256) * 3
    inf = _saved(sae, tmp_path)
    assert type(inf) is h.HierarchicalSAE
    assert torch.equal(inf.tree_parent, sae.tree_parent)
    torch.testing.assert_close(inf.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5, rtol=0)
    acts, out = _threshold_reference(sae, x)
    assert (acts > 0).any()
    torch.testing.assert_close(inf.encode(x), acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_outputs(inf, x), out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("design", ["learned", "projected"])
def test_a_training_checkpoint_loads_back_exactly(design, tmp_path):
    sae = training_sae(design)
    warm_up(sae, 12)
    sae.save_model(tmp_path / "ckpt")
    back = TrainingSAE.load_from_disk(tmp_path / "ckpt")
    assert type(back) is h.HierarchicalTrainingSAE
    assert torch.equal(back.tree_parent, sae.tree_parent)
    torch.testing.assert_close(back.topk_threshold.double(), sae.topk_threshold, atol=1e-6, rtol=1e-6)
    x = inputs(64)
    torch.testing.assert_close(back.encode_with_hidden_pre(x)[1], sae.encode_with_hidden_pre(x)[1])
    assert back.schedule.steps_done == sae.schedule.steps_done
    # an inference folder loads as a training SAE too (per-latent thresholds -> per level)
    sae.save_inference_model(tmp_path / "inf")
    again = TrainingSAE.load_from_disk(tmp_path / "inf")
    torch.testing.assert_close(again.topk_threshold.float(), sae.topk_threshold.float(), atol=1e-6, rtol=1e-6)
    with pytest.raises(h.HierarchicalSAELoadError, match="training checkpoint"):
        SAE.load_from_disk(tmp_path / "ckpt")


def test_fold_W_dec_norm_is_exact(tmp_path):
    inf = _saved(training_sae("learned"), tmp_path)
    with torch.no_grad():  # give the inference SAE non-unit norms, then fold them away
        scale = torch.linspace(0.5, 2.0, D_SAE)
        inf.W_dec.mul_(scale.unsqueeze(-1))
        inf.W_enc.div_(scale)
        inf.b_enc.div_(scale)
        inf.threshold.div_(scale)
    x = inputs(128) * 3
    before = _outputs(inf, x)
    inf.fold_W_dec_norm()
    torch.testing.assert_close(inf.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5, rtol=0)
    torch.testing.assert_close(_outputs(inf, x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("design", ["learned", "projected"])
def test_activation_norm_scaling_fold_is_exact(design, tmp_path):
    s = 2.7
    sae = training_sae(design, normalize_activations="expected_average_only_in")
    warm_up(sae, 5)
    x = inputs(128)
    before = sae.decode(sae.encode_with_hidden_pre(x * s)[0]) / s
    sae.fold_activation_norm_scaling_factor(s)
    assert sae.cfg.normalize_activations == "none"
    torch.testing.assert_close(sae.decode(sae.encode_with_hidden_pre(x)[0]), before, atol=1e-5, rtol=1e-5)
    inf = _saved(sae, tmp_path)
    before = _outputs(inf, x * s) / s
    inf.fold_activation_norm_scaling_factor(s)
    torch.testing.assert_close(_outputs(inf, x), before, atol=1e-5, rtol=1e-5)


def test_flat_views_hooks_and_any_leading_dimensions(tmp_path):
    sae = training_sae("learned")
    warm_up(sae, 12)
    inf = _saved(sae, tmp_path)
    assert inf.W_enc.shape == (D_IN, D_SAE) and inf.W_dec.shape == (D_SAE, D_IN)
    x = inputs(24) * 3
    _, cache = inf.run_with_cache(x)
    for name in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"):
        assert name in cache
    a = inf.encode(x)
    torch.testing.assert_close(inf.decode(a), a @ inf.W_dec + inf.b_dec, atol=1e-5, rtol=1e-5)
    x4 = x.reshape(2, 3, 4, D_IN)
    torch.testing.assert_close(inf.encode(x4).reshape(24, -1), a)
    assert inf(x4).shape == x4.shape


def test_spliced_into_hooked_sae_transformer(tmp_path):
    model = tiny_hooked_transformer()
    sae = training_sae("learned")
    warm_up(sae)
    inf = _saved(sae, tmp_path)
    inf.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    clean = model(tokens)
    model.add_sae(inf)
    logits, cache = model.run_with_cache(tokens)
    acts = cache["blocks.0.hook_resid_post.hook_sae_acts_post"]
    assert acts.shape == (2, 10, D_SAE) and (acts > 0).any()
    assert not torch.allclose(logits, clean)
    model.reset_saes()
    model.add_sae(inf, use_error_term=True)
    torch.testing.assert_close(model(tokens), clean, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_loads_in_other_dtypes(dtype, tmp_path):
    sae = training_sae("learned")
    warm_up(sae, 12)
    sae.save_inference_model(tmp_path)
    inf = SAE.load_from_disk(tmp_path, dtype=dtype)
    assert inf.W_dec.dtype == getattr(torch, dtype) and inf.tree_parent.dtype == torch.long
    out = _outputs(inf, inputs(8))
    assert out.dtype == getattr(torch, dtype) and torch.isfinite(out.float()).all()


def test_an_impossible_tree_in_a_file_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    sae = training_sae("learned")
    warm_up(sae, 12)
    sae.save_inference_model(tmp_path)
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    tensors["tree_parent"][30] = 2  # a leaf (level 2) whose parent is a root: two levels up
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(h.HierarchicalSAELoadError, match=r"latent 30 \(level 2\) the parent 2"):
        SAE.load_from_disk(tmp_path)


def test_training_step_of_a_loaded_inference_sae_is_refused_politely(tmp_path):
    inf = _saved(training_sae("learned"), tmp_path)
    assert not hasattr(inf, "training_forward_pass") or not isinstance(inf, TrainingSAE)
    assert step  # (imported for the shared builders)
