"""Configs: the tree's shape, the budget, every field checked with its name and value, round trips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from builders import D_IN, D_SAE, WIDTHS, train_cfg
from sae_lens import SAEConfig, TrainingSAEConfig

import sae_lens_hierarchical as h


def test_levels_from_widths_roots_branching_or_d_sae_alone():
    a = train_cfg()
    b = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_roots=4, branching=[4, 4], k=6)
    c = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6)  # default branching 4
    for cfg in (a, b, c):
        assert cfg.level_widths == WIDTHS and cfg.n_roots == 4 and cfg.n_levels == 3
        assert cfg.matryoshka_widths == [4, 20, 84] == cfg.level_boundaries
    d = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=2 + 4 + 24 + 48, n_levels=4, n_roots=2,
                                        branching=[2, 6, 2], k=4)
    assert d.level_widths == [2, 4, 24, 48]
    uneven = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=100, level_widths=[10, 30, 60], k=5)
    assert uneven.level_slices == [slice(0, 10), slice(10, 40), slice(40, 100)]


def test_default_prefix_weights_leave_the_roots_alone_from_three_levels():
    # the roots' own prefix is weighted 0 only while a deeper prefix still asks for coarse-to-fine
    got = {}
    for widths in ([84], [4, 80], [4, 16, 64], [2, 4, 24, 48]):
        cfg = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=sum(widths), level_widths=widths, k=2)
        got[len(widths)] = cfg.level_recon_weights
    assert got == {1: [1.0], 2: [0.25, 1.0], 3: [0.0, 0.25, 1.0], 4: [0.0, 0.25, 0.25, 1.0]}
    assert train_cfg().l2_target == "children_sum_floor"
    # parents by direction among co-firing latents, no consistency term (docs/benchmarks.md)
    assert (train_cfg().tree_assign, train_cfg().l2_coefficient, train_cfg().kl_coefficient) == ("decoder_cofire", 0, 0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"level_widths": [4, 16]}, "d_sae"),
        ({"level_widths": [4, 0, 80]}, "level_widths"),
        ({"d_sae": D_SAE + 1}, "d_sae"),
        ({"level_widths": None, "branching": [4]}, "branching"),
        ({"level_widths": None, "n_roots": 0}, "n_roots"),
        ({"level_widths": None, "n_levels": 0}, "n_levels"),
        ({"k": 0}, "k"),
        ({"k": D_SAE + 1}, "k"),
        ({"k_per_level": [2, 3]}, "k_per_level"),
        ({"k_per_level": [1, 2, 4]}, "k_per_level"),  # sums to 7, not k
        ({"k_per_level": [0.5, 2.0, 3.5]}, "k_per_level"),  # denser deeper: refused
        ({"gate": "soft"}, "gate"),
        ({"tree": "random"}, "tree"),
        ({"tree_every": 0}, "tree_every"),
        ({"tree_min_cofire": 1.5}, "tree_min_cofire"),
        ({"kl_coefficient": -0.1}, "kl_coefficient"),
        ({"l2_coefficient": float("nan")}, "l2_coefficient"),
        ({"aux_loss_coefficient": -1.0}, "aux_loss_coefficient"),
        ({"projection_rank": 4}, "projection_rank"),  # needs tree: fixed
        ({"tree": "fixed", "projection_rank": 0}, "projection_rank"),
        ({"tree": "fixed", "projection_rank": D_IN + 1}, "projection_rank"),
        ({"tree": "fixed", "level_widths": [4, 10, 70]}, "level_widths"),  # not a fixed layout
        ({"level_recon_weights": [1.0, 1.0]}, "level_recon_weights"),
        ({"level_recon_weights": [1.0, -1.0, 1.0]}, "level_recon_weights"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations"),
        ({"matryoshka_widths": [4, 84]}, "matryoshka_widths"),
    ],
)
def test_invalid_config_names_field_and_value(kwargs, field):
    base = dict(d_in=D_IN, d_sae=D_SAE, level_widths=list(WIDTHS), k=6.0)
    base.update(kwargs)
    with pytest.raises(ValueError) as e:
        h.HierarchicalTrainingSAEConfig(**base)
    msg = str(e.value)
    assert f"{field}=" in msg
    assert repr(kwargs.get(field, base.get(field)))[:4] in msg or field in ("d_sae", "k_per_level", "level_widths")


def test_per_level_budgets_sum_to_k_and_get_sparser_unless_opted_out():
    assert train_cfg(k_per_level=[1.0, 2.0, 3.0]).k_per_level == [1.0, 2.0, 3.0]
    dense = train_cfg(k_per_level=[0.5, 2.0, 3.5], allow_nonincreasing_sparsity=True)
    assert dense.k_per_level == [0.5, 2.0, 3.5]


def test_inference_config_validates_too():
    with pytest.raises(ValueError, match="gate"):
        h.HierarchicalSAEConfig(d_in=D_IN, d_sae=D_SAE, level_widths=WIDTHS, gate="nope")
    with pytest.raises(ValueError, match="d_sae"):
        h.HierarchicalSAEConfig(d_in=D_IN, d_sae=D_SAE - 1, level_widths=WIDTHS)


@pytest.mark.parametrize("design", ["learned", "gated", "per_level", "projected"])
def test_config_round_trips_through_dict_json_and_cfg_json(design, tmp_path):
    cfg = train_cfg(design, kl_coefficient=0.3, l2_coefficient=0.2)
    back = TrainingSAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert type(back) is h.HierarchicalTrainingSAEConfig
    assert back.to_dict() == cfg.to_dict()

    h.HierarchicalTrainingSAE(cfg).save_inference_model(tmp_path)
    on_disk = json.loads((tmp_path / "cfg.json").read_text())
    assert on_disk["architecture"] == "hierarchical"
    inf_cfg = SAEConfig.from_dict(on_disk)
    assert type(inf_cfg) is h.HierarchicalSAEConfig
    assert inf_cfg.level_widths == cfg.level_widths and inf_cfg.gate == cfg.gate
    assert on_disk["metadata"]["training_architecture_details"]["kl_coefficient"] == 0.3


def test_a_cfg_json_of_the_old_fixed_slot_design_is_refused_with_its_fields_named(tmp_path):
    from sae_lens import SAE

    train_cfg().to_dict()
    h.HierarchicalTrainingSAE(train_cfg()).save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.update(variant="batchtopk", n_free=8, k_free=1.0)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(h.HierarchicalSAELoadError, match=r"0\.1.*'k_free', 'n_free', 'variant'"):
        SAE.load_from_disk(tmp_path)


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
