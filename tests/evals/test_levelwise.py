"""The levelwise eval: per-level numbers against a direct computation, the share of L0 and of
explained variance carried by latents outside the tree on a planted SAE where both are known,
per-level sparse probing through SAE-Bench's own code on a local dataset folder, and autointerp
per level through SAE-Bench's autointerp with a local OpenAI-compatible judge (or skipped with
a message)."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from conftest import (
    CTX,
    D_MODEL,
    HOOK,
    MODEL_NAME,
    load_json,
    nested_flat_sae,
    perfect_hsae,
    planted_features,
    planted_sae,
    write_bias_in_bios,
)

from sae_lens_hierarchical.evals import common
from sae_lens_hierarchical.evals.levelwise import main as levelwise
from sae_lens_hierarchical.evals.levelwise.eval_config import LevelwiseEvalConfig
from sae_lens_hierarchical.evals.levelwise.eval_output import LevelwiseEvalOutput


def config(**kw) -> LevelwiseEvalConfig:
    base = dict(model_name=MODEL_NAME, dataset_name="in-memory", context_size=CTX, n_eval_prompts=32,
                batch_size_prompts=16, tree_fit_fraction=0.0, run_sparse_probing=False,
                run_autointerp=False)
    base.update(kw)
    return LevelwiseEvalConfig(**base)


def test_per_level_numbers_match_a_direct_computation(tiny_model, token_dataset, tmp_path):
    sae = perfect_hsae()
    with torch.no_grad():
        sae.b_enc[sae.level_slices[2]] = 0.5  # leaves fire on fewer tokens than their parents
    res = levelwise.run_eval(config(), [("hsae", sae)], "cpu", str(tmp_path), model=tiny_model,
                             dataset=token_dataset)
    data = res["hsae_custom_sae"]
    rows = data["eval_result_details"]

    # the same tokens, straight through the model and the SAE
    tokens = torch.tensor(token_dataset.shuffle(seed=42)["tokens"][:32])
    _, cache = tiny_model.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, D_MODEL)  # BOS left out
    with torch.no_grad():
        acts = sae.encode(x)
        total = (x - x.mean(0)).pow(2).sum()
        for lv, sl in enumerate(sae.level_slices):
            row = rows[lv]
            assert row["n_latents"] == sl.stop - sl.start
            assert row["l0"] == pytest.approx(float((acts[:, sl] > 0).sum(-1).float().mean()), rel=1e-6)
            assert row["firing_density"] == pytest.approx(row["l0"] / row["n_latents"])
            assert row["dead_latents"] == int(((acts[:, sl] > 0).sum(0) == 0).sum())
            prefix = acts.clone()
            prefix[:, sl.stop:] = 0
            ev = 1 - (x - sae.decode(prefix)).pow(2).sum() / total
            assert row["prefix_explained_variance"] == pytest.approx(float(ev), abs=1e-4)
    m = data["eval_result_metrics"]["levelwise"]
    assert m["tree_source"] == "native" and m["n_levels"] == 3
    assert m["l0"] == pytest.approx(sum(r["l0"] for r in rows))
    assert m["explained_variance"] == rows[2]["prefix_explained_variance"]
    assert m["root_explained_variance"] == rows[0]["prefix_explained_variance"]
    assert m["n_tokens"] == x.shape[0]
    # the fixed layout leaves no latent outside the tree
    assert m["outside_tree_latents"] == 0 and m["outside_tree_l0"] == 0.0
    assert m["outside_tree_l0_share"] == 0.0 and m["outside_tree_explained_variance_share"] == 0.0
    assert all(r["outside_tree_latents"] == 0 and r["outside_tree_explained_variance_share"] == 0.0 for r in rows)
    assert "free_latents" not in rows[0]


class _Activations:
    def __init__(self, x):
        self.x = x


class _Context:
    """The part of common.EvalContext the levelwise eval reads: activations of given tokens."""

    def __init__(self, x):
        self.x = x

    def activations(self, sae):
        return _Activations(self.x)


def test_outside_tree_l0_and_explained_variance_shares_on_a_planted_sae():
    """Features fire down a planted tree of 2 roots, 4 children and 8 grandchildren; latent j
    reads and writes feature j, so the SAE reconstructs x exactly (EV = 1). Its native tree
    leaves latents 5 (level 1, a parent) and 9, 12 (level 2) without a parent. Their share of
    the L0 is their share of the features that fire, and zeroing them removes exactly their
    squared magnitudes (orthonormal features): EV share = sum m_j^2 / total variance."""
    planted = torch.tensor([-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    x, mags, q = planted_features(planted, [0.7, 0.5] + [0.6] * 12, n=3000, d_in=16, seed=5)
    native = planted.clone()
    outside = [5, 9, 12]
    native[outside] = -1
    sae = planted_sae(q, level_widths=[2, 4, 8], parent=native)
    assert sae.outside_tree.nonzero().flatten().tolist() == outside

    overall, rows, _ = levelwise.run_eval_single_sae(config(), sae, _Context(x))
    on = mags > 0
    total_var = float((x.double() - x.double().mean(0)).pow(2).sum())
    assert overall["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert overall["outside_tree_latents"] == 3
    assert overall["outside_tree_l0"] == pytest.approx(float(on[:, outside].sum()) / x.shape[0])
    assert overall["outside_tree_l0_share"] == pytest.approx(float(on[:, outside].sum() / on.sum()), rel=1e-6)
    expected_ev = float(mags[:, outside].double().pow(2).sum()) / total_var
    assert overall["outside_tree_explained_variance_share"] == pytest.approx(expected_ev, rel=1e-4)
    assert 0.05 < expected_ev < 0.5
    levels = sae.latent_levels
    for lv, row in enumerate(rows):
        out_lv = [j for j in outside if int(levels[j]) == lv]
        assert row["outside_tree_latents"] == len(out_lv)
        in_lv = (levels == lv).nonzero().flatten()
        assert row["outside_tree_l0_share"] == pytest.approx(float(on[:, out_lv].sum() / on[:, in_lv].sum()), abs=1e-7)
        share = float(mags[:, out_lv].double().pow(2).sum()) / total_var
        assert row["outside_tree_explained_variance_share"] == pytest.approx(share, rel=1e-4, abs=1e-9)
    assert rows[0]["outside_tree_latents"] == 0 and rows[0]["outside_tree_l0_share"] == 0.0
    # the same SAE on a post-hoc tree: its levels are depths, nothing is outside it
    overall, _, _ = levelwise.run_eval_single_sae(config(tree_source="posthoc"), sae, _Context(x))
    assert overall["tree_source"] == "posthoc" and overall["outside_tree_latents"] == 0
    assert overall["outside_tree_explained_variance_share"] == 0.0
    tree = common.native_tree(sae)
    assert tree.outside.nonzero().flatten().tolist() == outside


def test_flat_sae_gets_posthoc_levels(tiny_model, token_dataset, tmp_path):
    sae, _ = nested_flat_sae()
    res = levelwise.run_eval(config(), [("flat", sae)], "cpu", str(tmp_path), model=tiny_model,
                             dataset=token_dataset)
    data = res["flat_custom_sae"]
    assert data["eval_result_metrics"]["levelwise"]["tree_source"] == "posthoc"
    rows = data["eval_result_details"]
    assert sum(r["n_latents"] for r in rows) == sae.cfg.d_sae
    assert data["sae_cfg_dict"]["architecture"] == "standard"


def test_level_subset_sae_exposes_only_its_latents():
    sae = perfect_hsae()
    sub = levelwise.LevelSubsetSAE(sae, torch.arange(4, 12))
    x = torch.randn(5, 7, D_MODEL)
    with torch.no_grad():
        full = sae.encode(x)
        assert torch.equal(sub.encode(x), full[..., 4:12])
        masked = torch.zeros_like(full)
        masked[..., 4:12] = full[..., 4:12]
        torch.testing.assert_close(sub.decode(sub.encode(x)), sae.decode(masked))
    assert sub.cfg.d_sae == 8 and sae.cfg.d_sae == 28  # the SAE's own cfg is untouched
    assert sub.W_dec.shape == (8, D_MODEL) and sub.dtype == torch.float32


def test_sparse_probing_per_level_reads_a_local_dataset_folder(tiny_model, token_dataset, tmp_path, monkeypatch):
    """SAE-Bench's sparse probing, unpatched, once per level. A level whose latents never fire
    must score exactly chance (0.5): nothing from the other levels leaks into its probe."""
    monkeypatch.chdir(write_bias_in_bios(tmp_path / "data"))
    sae = perfect_hsae()
    with torch.no_grad():
        sae.b_enc[sae.level_slices[2]] = -100.0  # dead leaves
    cfg = config(run_sparse_probing=True, probe_train_set_size=40, probe_test_set_size=20,
                 probe_context_length=16, probe_k_values=[1, 5])
    art = tmp_path / "artifacts"
    res = levelwise.run_eval(cfg, [("hsae", sae)], "cpu", str(tmp_path / "out"), model=tiny_model,
                             dataset=token_dataset, artifacts_path=str(art))
    rows = res["hsae_custom_sae"]["eval_result_details"]
    assert rows[2]["dead_latents"] == 16 and rows[2]["frac_dead"] == 1.0
    assert rows[2]["sparse_probing_test_accuracy"] == pytest.approx(0.5)
    assert rows[2]["sparse_probing_top_1_test_accuracy"] == pytest.approx(0.5)
    for row in rows[:2]:
        assert 0.0 <= row["sparse_probing_test_accuracy"] <= 1.0
        assert 0.0 <= row["sparse_probing_top_1_test_accuracy"] <= 1.0
    assert rows[0]["sparse_probing_top_5_test_accuracy"] is None  # level 0 has only 4 latents
    assert rows[1]["sparse_probing_top_5_test_accuracy"] is not None
    # the model activations are cached where SAE-Bench's own sparse probing looks for them
    cache = art / "sparse_probing" / MODEL_NAME / HOOK / "LabHC_bias_in_bios_class_set1_activations.pt"
    assert cache.exists()


def test_sparse_probing_without_data_is_skipped_with_the_reason(tiny_model, token_dataset, tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # no LabHC/bias_in_bios here, and no Hub:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    res = levelwise.run_eval(config(run_sparse_probing=True), [("hsae", perfect_hsae())], "cpu",
                             str(tmp_path / "out"), model=tiny_model, dataset=token_dataset,
                             artifacts_path=str(tmp_path / "art"))
    data = res["hsae_custom_sae"]
    assert "sparse probing per level skipped" in data["eval_result_unstructured"]["sparse_probing"]
    assert all(r["sparse_probing_test_accuracy"] is None for r in data["eval_result_details"])


def test_autointerp_without_a_judge_says_what_to_set(tiny_model, token_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    res = levelwise.run_eval(config(run_autointerp=True), [("hsae", perfect_hsae())], "cpu", str(tmp_path),
                             model=tiny_model, dataset=token_dataset)
    data = res["hsae_custom_sae"]
    msg = data["eval_result_unstructured"]["autointerp"]["skipped"]
    assert "OPENAI_API_KEY" in msg and "api_key=" in msg
    assert "OPENAI_API_KEY" in capsys.readouterr().out
    assert data["eval_result_metrics"]["levelwise"]["autointerp_score"] is None
    assert all(r["autointerp_score"] is None and r["autointerp_n_latents"] == 0 for r in data["eval_result_details"])


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions endpoint: a fixed explanation, then it predicts
    that sequences 1 and 2 activate."""

    calls: list[str] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        scoring = "Here is the explanation" in prompt
        _Judge.calls.append("score" if scoring else "explain")
        text = "1, 2" if scoring else "This neuron activates on made-up words."
        reply = json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def local_judge(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Judge.calls = []
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    yield _Judge
    server.shutdown()
    server.server_close()


def test_autointerp_per_level_through_saebench_with_a_local_judge(tiny_model, token_dataset, tmp_path, local_judge):
    cfg = config(run_autointerp=True, autointerp_latents_per_level=2, n_eval_prompts=48)
    res = levelwise.run_eval(cfg, [("hsae", perfect_hsae())], "cpu", str(tmp_path / "out"),
                             model=tiny_model, dataset=token_dataset, artifacts_path=str(tmp_path / "art"))
    data = res["hsae_custom_sae"]
    rows = data["eval_result_details"]
    judged = data["eval_result_unstructured"]["autointerp"]["latents"]
    assert sum(r["autointerp_n_latents"] for r in rows) == len(judged) > 0
    assert all(r["autointerp_n_latents"] <= 2 for r in rows)
    # one explanation and one scoring call per judged latent, answered by the local judge
    assert local_judge.calls.count("explain") == local_judge.calls.count("score") == len(judged)
    for j, r in judged.items():
        assert r["explanation"] == "made-up words"
        assert 0.0 <= r["score"] <= 1.0
        level = next(lv for lv, sl in enumerate(perfect_hsae().level_slices) if sl.start <= int(j) < sl.stop)
        assert rows[level]["autointerp_n_latents"] > 0
    scores = [r["score"] for r in judged.values()]
    assert data["eval_result_metrics"]["levelwise"]["autointerp_score"] == pytest.approx(sum(scores) / len(scores))
    assert torch.is_grad_enabled()  # SAE-Bench's autointerp switches gradients off; restored


def test_committed_schema_equals_generated():
    from sae_lens_hierarchical.evals import generate_json_schemas as gen

    path = os.path.join(os.path.dirname(levelwise.__file__), "eval_output_schema_levelwise.json")
    assert load_json(path) == gen.schema(LevelwiseEvalOutput)
