"""SAE-Bench's own evals, unchanged, on hierarchical SAEs (and a flat one) with tiny models.

* core: SAE-Bench's core functions on an in-memory pretokenized dataset (nothing patched);
* sparse_probing: SAE-Bench's run_eval reading a local LabHC/bias_in_bios folder;
* meta_structure: SAE-Bench's run_eval as it is;
* absorption: SAE-Bench's run_eval on a model planted with first-letter directions.
The model object reaches run_eval through `stock.provided_model` (their model loader only).
"""

from __future__ import annotations

import os
import random
import string

import pytest
import torch
from conftest import (
    CTX,
    HOOK,
    SPECIALS,
    build_model,
    hsae,
    load_json,
    nested_flat_sae,
    perfect_hsae,
    trained_hsae,
    write_bias_in_bios,
)

import sae_lens_hierarchical as h
from sae_lens_hierarchical.evals import stock


def test_core_runs_unpatched_on_an_in_memory_pretokenized_dataset(tiny_model, token_dataset, tmp_path):
    from sae_bench.sae_bench_utils import general_utils

    trained = trained_hsae(tmp_path)
    assert type(trained) is h.HierarchicalSAE
    # the flat view of a saved HSAE has unit-norm decoder rows, as SAE-Bench assumes
    assert general_utils.check_decoder_norms(trained.W_dec.detach())
    flat, _ = nested_flat_sae()
    saes = [("perfect", perfect_hsae()), ("trained", trained), ("flat", flat)]
    out = tmp_path / "core"
    written = stock.run_core(saes, tiny_model, token_dataset, str(out), context_size=CTX,
                             batch_size_prompts=4, n_eval_reconstruction_batches=2,
                             n_eval_sparsity_variance_batches=2)
    assert sorted(os.listdir(out)) == sorted(f"{n}_custom_sae_eval_results.json" for n in ("perfect", "trained", "flat"))
    for name, sae in saes:
        data = load_json(written[f"{name}_custom_sae"])
        assert data["eval_type_id"] == "core" and data["eval_config"]["dataset"] == "in-memory"
        m = data["eval_result_metrics"]
        assert set(m) == {"model_behavior_preservation", "model_performance_preservation", "reconstruction_quality",
                          "shrinkage", "sparsity", "token_stats", "misc_metrics"}
        assert m["token_stats"]["total_tokens_eval_reconstruction"] == CTX * 2 * 4
        assert m["sparsity"]["l0"] > 0
        assert [d["index"] for d in data["eval_result_details"]] == list(range(sae.cfg.d_sae))
    perfect = load_json(written["perfect_custom_sae"])
    # each child copies its parent's encoder column: SAE-Bench finds a twin for every latent
    assert perfect["eval_result_metrics"]["misc_metrics"]["average_max_encoder_cosine_sim"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["sae_cfg_dict"]["architecture"] == "hierarchical"
    assert perfect["sae_cfg_dict"]["level_widths"] == [4, 8, 16]


def test_sparse_probing_runs_from_a_local_dataset_folder(tiny_model, tmp_path, monkeypatch):
    from sae_bench.evals.sparse_probing import main as sp
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig
    from transformer_lens import HookedTransformer

    monkeypatch.chdir(write_bias_in_bios(tmp_path))
    flat, _ = nested_flat_sae()
    cfg = SparseProbingEvalConfig(dataset_names=["LabHC/bias_in_bios_class_set1"], probe_train_set_size=40,
                                  probe_test_set_size=20, context_length=16, k_values=[1, 2])
    res = stock.run_sparse_probing([("hsae", perfect_hsae()), ("flat", flat)], tiny_model,
                                   str(tmp_path / "out"), config=cfg, artifacts_path=str(tmp_path / "art"))
    assert sp.HookedTransformer is HookedTransformer  # the model loader is restored
    assert set(res) == {"hsae_custom_sae", "flat_custom_sae"}
    data = load_json(tmp_path / "out" / "hsae_custom_sae_eval_results.json")
    assert data["eval_type_id"] == "sparse_probing" and data["eval_config"]["model_name"] == tiny_model.cfg.model_name
    sae_m, llm_m = data["eval_result_metrics"]["sae"], data["eval_result_metrics"]["llm"]
    for value in (sae_m["sae_test_accuracy"], sae_m["sae_top_1_test_accuracy"], sae_m["sae_top_2_test_accuracy"],
                  llm_m["llm_test_accuracy"]):
        assert 0.0 <= value <= 1.0
    assert sae_m["sae_top_5_test_accuracy"] is None  # not asked for
    assert [d["dataset_name"] for d in data["eval_result_details"]] == ["LabHC/bias_in_bios_class_set1_results"]


def test_meta_structure_runs_as_it_is(tmp_path):
    from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig

    res = stock.run_meta_structure([("hsae", perfect_hsae())], str(tmp_path),
                                   config=MetaStructureEvalConfig(train_steps=20, train_batch_size=32))
    data = load_json(tmp_path / "hsae_custom_sae_eval_results.json")
    assert data["eval_type_id"] == "meta_structure_decoder_variance"
    fve = data["eval_result_metrics"]["meta_structure"]["decoder_fraction_variance_explained"]
    assert fve == pytest.approx(res["hsae_custom_sae"]) and fve < 1.0


def planted_first_letter_model(tmp_path):
    """A 1-layer model whose embedding of every alphabetic token is 3 x the unit direction of
    its first letter plus noise, with a word-level tokenizer that splits ':' off, so the
    absorption prompts put the word at position -6 as SAE-Bench expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    words: set[str] = set()
    for letter in string.ascii_lowercase:
        while sum(w[0] == letter for w in words) < 24:
            words.add(letter + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6))))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in sorted(words) + ["has", "the", "first", "letter", ":"] + list(string.ascii_uppercase):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(tmp_path / "tok"))
    model = build_model(tmp_path / "tok", model_name="tiny-first-letters", d_model=32, n_ctx=96)
    letters = torch.eye(32)[:26]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tok, i in vocab.items():
            e = 0.2 * torch.randn(32, generator=g)
            if tok[0].isalpha():
                e += 3 * letters[ord(tok[0].lower()) - ord("a")]
            model.W_E[i] = e
    return model, letters


def test_absorption_runs_on_a_planted_first_letter_model(tmp_path, monkeypatch):
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    monkeypatch.chdir(tmp_path)  # SAE-Bench writes a per-SAE json to ./artifacts/absorption
    model, letters = planted_first_letter_model(tmp_path)
    sae = hsae((32, 64), d_in=32, model_name="tiny-first-letters", hook=HOOK)
    with torch.no_grad():  # roots 0..25 read and write the letter directions
        sae.W_dec[:26] = letters
        sae.W_enc[:, :26] = letters.T
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    ab_cfg = AbsorptionEvalConfig(k_sparse_probe_num_epochs=5, max_k_value=3, precalc_k_sparse_probe_sae_acts=True,
                                  min_feats_for_eval=5, llm_batch_size=32)
    res = stock.run_absorption([("hsae", sae)], model, str(tmp_path / "out"), config=ab_cfg,
                               artifacts_path=str(tmp_path / "art"))
    assert res is not None
    data = load_json(tmp_path / "out" / "hsae_custom_sae_eval_results.json")
    assert data["eval_type_id"] == "absorption_first_letter"
    mean = data["eval_result_metrics"]["mean"]
    assert 0.0 <= mean["mean_absorption_fraction_score"] <= 1.0
    assert len(data["eval_result_details"]) >= 5  # letters the ground-truth probe decodes
    # probes went to artifacts_path, not into the installed sae_bench package
    assert (tmp_path / "art" / "absorption" / "probes").is_dir()
    import sae_bench

    assert not os.path.exists(os.path.join(os.path.dirname(sae_bench.__file__), "artifacts"))
    assert torch.is_grad_enabled()
