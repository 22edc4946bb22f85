"""The pipeline every entry point shares (`sae_lens_hierarchical.pipeline`): contestants at the
HSAE's width and L0, held-out documents, packed rows, and the decoder bias started at the
activations' mean in the units each SAE sees."""

from __future__ import annotations

import math

import pytest
import torch
from builders import D_IN, D_SAE, WIDTHS, train_cfg
from lm_builders import SPECIALS, WORDS, documents, tiny_lm

import sae_lens_hierarchical as h
from sae_lens_hierarchical import pipeline

# ----------------------------------------------------------------------------------------------
# matched_configs


def test_matched_configs_put_every_contestant_at_the_hsaes_width_and_l0():
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    hsae = train_cfg(k=9.0)
    cfgs = pipeline.matched_configs(hsae, list(pipeline.CONTESTANTS))
    assert list(cfgs) == ["hsae", "batchtopk", "matryoshka", "topk"]
    assert cfgs["hsae"] is not hsae and cfgs["hsae"].to_dict() == hsae.to_dict()  # a copy, equal
    assert type(cfgs["batchtopk"]) is BatchTopKTrainingSAEConfig
    assert type(cfgs["matryoshka"]) is MatryoshkaBatchTopKTrainingSAEConfig
    assert type(cfgs["topk"]) is TopKTrainingSAEConfig
    assert {c.d_sae for c in cfgs.values()} == {D_SAE} and {c.d_in for c in cfgs.values()} == {D_IN}
    assert cfgs["batchtopk"].k == cfgs["topk"].k == cfgs["matryoshka"].k == 9 == hsae.total_l0
    # The Matryoshka contestant nests its prefixes at the HSAE's level boundaries.
    assert cfgs["matryoshka"].matryoshka_widths == [4, 20, 84] == hsae.level_boundaries == hsae.matryoshka_widths
    assert cfgs["hsae"].level_widths == WIDTHS
    # SAELens's default threshold rate unless asked; asked, every BatchTopK-style SAE gets it.
    assert cfgs["batchtopk"].topk_threshold_lr == 0.01
    given = train_cfg(k=9.0)
    fast = pipeline.matched_configs(given, list(pipeline.CONTESTANTS), threshold_lr=0.05)
    assert [fast[n].topk_threshold_lr for n in ("hsae", "batchtopk", "matryoshka")] == [0.05] * 3
    assert given.topk_threshold_lr == 0.01  # the caller's config is not changed


@pytest.mark.parametrize("design", ["learned", "per_level", "gated", "projected"])
def test_matched_configs_follow_every_design_and_normalisation(design):
    hsae = train_cfg(design, normalize_activations="expected_average_only_in")
    cfgs = pipeline.matched_configs(hsae, ["hierarchical", "batchtopk", "matryoshka_batchtopk", "topk"])
    assert {c.normalize_activations for c in cfgs.values()} == {"expected_average_only_in"}
    assert {c.d_sae for c in cfgs.values()} == {D_SAE}
    # The L0 is the whole budget k, whether one BatchTopK shares it or the levels split it.
    assert cfgs["batchtopk"].k == cfgs["matryoshka"].k == hsae.k == 6
    assert cfgs["topk"].k == 6
    assert cfgs["matryoshka"].matryoshka_widths == [4, 20, 84]


def test_matched_configs_round_topk_and_refuse_unknown_contestants():
    cfgs = pipeline.matched_configs(train_cfg(k=6.4), ["hierarchical", "topk", "batchtopk"])
    assert cfgs["topk"].k == 6 and cfgs["batchtopk"].k == pytest.approx(6.4)  # TopK's k is an integer
    assert list(pipeline.matched_configs(train_cfg(), ["batchtopk"])) == ["batchtopk"]
    with pytest.raises(ValueError, match="unknown contestant 'vanilla'; allowed: hierarchical, batchtopk"):
        pipeline.matched_configs(train_cfg(), ["hierarchical", "vanilla"])


def test_matched_configs_build_trainable_saes():
    """Each config builds its SAELens training SAE, and all take the same batch."""
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import TrainStepInput

    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0))
    for name, cfg in pipeline.matched_configs(train_cfg(), list(pipeline.CONTESTANTS)).items():
        sae = get_sae_training_class(cfg.architecture())[0](cfg)
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                       n_training_steps=0, is_logging_step=False))
        assert out.feature_acts.shape == (64, D_SAE), name
        assert torch.isfinite(out.loss), name


# ----------------------------------------------------------------------------------------------
# data


def test_split_texts_holds_out_every_nth_document():
    docs = [f"doc{i}" for i in range(10)]
    train, held = pipeline.split_texts(docs, 5)
    assert held == ["doc4", "doc9"] and len(train) == 8
    assert set(train) | set(held) == set(docs) and not set(train) & set(held)
    # a single document is split 90/10 by characters
    train, held = pipeline.split_texts(["x" * 100], 10)
    assert len(train[0]) == 90 and len(held[0]) == 10


def test_split_texts_edge_cases():
    # fewer documents than the period: the last one is held out
    assert pipeline.split_texts(["a", "b", "c"], 10) == (["a", "b"], ["c"])
    # a period below 2 would hold out everything: every 2nd document instead
    assert pipeline.split_texts(["a", "b", "c", "d"], 1) == (["a", "c"], ["b", "d"])
    # empty documents do not count
    assert pipeline.split_texts(["a", "", "b", ""], 2) == (["a"], ["b"])
    with pytest.raises(ValueError, match="no text"):
        pipeline.split_texts(["", ""], 3)


@pytest.fixture(scope="module")
def word_lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("tok"), d_model=D_IN, n_layers=1, n_ctx=16)


def test_pack_starts_every_row_with_a_special_token(word_lm):
    rows = pipeline.pack(word_lm, documents(3, 200), 16)
    assert len(rows) > 5
    tokens = torch.tensor(rows["tokens"])
    assert tokens.shape[1] == 16
    # a model without BOS (as SmolLM2): every row starts with EOS, the attention sink's position
    assert not word_lm.cfg.default_prepend_bos
    assert (tokens[:, 0] == word_lm.tokenizer.eos_token_id).all()


# ----------------------------------------------------------------------------------------------
# the decoder bias at the activations' mean


HOOK = "blocks.0.hook_resid_post"
WORD_ID = {w: i for i, w in enumerate(SPECIALS + WORDS)}


def test_mean_activation_over_the_first_rows_without_special_tokens(word_lm):
    from sae_lens_hierarchical.evals import common

    rows = pipeline.pack(word_lm, documents(3, 200), 16)
    mean, mean_norm = pipeline.mean_activation(word_lm, rows, HOOK, 16, n_rows=4, batch_prompts=3)
    tokens = torch.tensor(rows["tokens"][:4])
    x = common.hook_activations(word_lm, tokens, HOOK)
    keep = tokens != word_lm.tokenizer.eos_token_id
    assert (~keep).sum() >= 4  # the rows' first tokens are left out
    torch.testing.assert_close(mean, x[keep].mean(0))
    assert mean_norm == pytest.approx(float(x[keep].norm(dim=-1).mean()), rel=1e-5)
    # text rows are tokenised; rows shorter than the context are skipped; none left: None
    from datasets import Dataset

    texts = Dataset.from_dict({"text": [" ".join(["the"] * 40), "king"]})
    from_text = pipeline.mean_activation(word_lm, texts, HOOK, 8)
    assert from_text is not None and from_text[0].shape == (D_IN,)
    only_the = common.hook_activations(word_lm, torch.full((1, 8), WORD_ID["the"]), HOOK)[0]
    torch.testing.assert_close(from_text[0], only_the.mean(0))  # the long row only
    assert pipeline.mean_activation(word_lm, Dataset.from_dict({"text": ["the king"]}), HOOK, 8) is None


def _saes(normalize: str):
    from sae_lens.registry import get_sae_training_class

    hsae = train_cfg(normalize_activations=normalize)
    cfgs = pipeline.matched_configs(hsae, ["hierarchical", "batchtopk", "matryoshka_batchtopk"])
    return {name: get_sae_training_class(c.architecture())[0](c) for name, c in cfgs.items()}


def test_start_b_dec_at_mean_in_the_units_each_sae_sees():
    """Unnormalised SAEs start at the mean; under expected_average_only_in at the mean times
    SAELens's own scaling factor sqrt(d_in) / mean norm (ActivationScaler), i.e. at the mean of
    the scaled activations the SAE will be trained on."""
    from sae_lens.training.activation_scaler import ActivationScaler

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, D_IN, generator=g) * 0.5 + torch.linspace(-4, 6, D_IN)  # a large offset
    stats = (x.mean(0), float(x.norm(dim=-1).mean()))

    plain = _saes("none")
    pipeline.start_b_dec_at_mean(plain, stats)
    for name, sae in plain.items():
        torch.testing.assert_close(sae.b_dec.detach(), x.mean(0), msg=name)

    scaled = _saes("expected_average_only_in")
    pipeline.start_b_dec_at_mean(scaled, stats)
    scaler = ActivationScaler()
    scaler.estimate_scaling_factor(D_IN, iter([x]), n_batches_for_norm_estimate=1)
    assert scaler.scaling_factor == pytest.approx(math.sqrt(D_IN) / stats[1])
    for name, sae in scaled.items():
        torch.testing.assert_close(sae.b_dec.detach(), x.mean(0) * scaler.scaling_factor, msg=name)
        torch.testing.assert_close(sae.b_dec.detach(), scaler.scale(x).mean(0), msg=name)
    assert isinstance(scaled["hsae"], h.HierarchicalTrainingSAE)


def test_start_b_dec_at_mean_without_stats_changes_nothing():
    saes = _saes("none")
    with torch.no_grad():
        for sae in saes.values():
            sae.b_dec.fill_(0.25)
    pipeline.start_b_dec_at_mean(saes, None)
    assert all(torch.equal(sae.b_dec.detach(), torch.full((D_IN,), 0.25)) for sae in saes.values())


# ----------------------------------------------------------------------------------------------
# train_saes: contestants start from one draw


def test_contestants_start_from_one_draw_so_the_matryoshka_objective_gives_matryoshka(word_lm, tmp_path):
    """Every contestant starts from the same seeded weights, so a per-seed comparison differs only
    by the objective. The check that can fail: the HSAE with SAELens's Matryoshka objective (no L2
    term, prefix weights 1) ends bit-identical to SAELens's Matryoshka SAE trained beside it, while
    the default HSAE (same start) does not."""
    from safetensors.torch import load_file

    rows = pipeline.pack(word_lm, documents(6, 400), 16)
    matryoshka_objective = h.HierarchicalTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, level_widths=WIDTHS, k=6.0, l2_coefficient=0.0, level_recon_weights=[1.0, 1.0, 1.0]
    )
    cfgs = pipeline.matched_configs(matryoshka_objective, ["hierarchical", "batchtopk", "matryoshka_batchtopk"])
    default = h.HierarchicalTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, level_widths=WIDTHS, k=6.0)
    cfgs = {"default": default, **cfgs}
    starts = {}
    original = pipeline.start_b_dec_at_mean

    def record(saes, stats):
        starts.update({n: s.W_dec.detach().clone() for n, s in saes.items()})
        return original(saes, stats)

    pipeline.start_b_dec_at_mean = record
    try:
        pipeline.train_saes(word_lm, rows, cfgs, HOOK, tmp_path, model_name="tiny", dataset_label="docs",
                            training_tokens=512, context_size=16, batch_tokens=64, seed=3, progress_every=1000)
    finally:
        pipeline.start_b_dec_at_mean = original
    assert all(torch.equal(w, starts["hsae"]) for w in starts.values())  # one draw for all four
    weights = {n: load_file(str(tmp_path / n / "sae_weights.safetensors")) for n in cfgs}
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(weights["hsae"][key], weights["matryoshka"][key]), key
    # (The inference threshold differs by design: the HSAE's moving average starts at its first
    # target, SAELens's at 0, which 8 steps do not forget.)
    assert not torch.equal(weights["default"]["W_dec"], weights["matryoshka"]["W_dec"])
    assert not torch.equal(weights["batchtopk"]["W_dec"], weights["matryoshka"]["W_dec"])
