"""The path attribution eval: per-node contributions add up to each path's total (computed
separately from the path's own decode), gradient x activation is the exact logit change when
the logit is linear in the SAE's output, probe contributions follow the decoder rows, flat SAEs
get post-hoc paths, and the JSON comes with a plot."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import CTX, HOOK, MODEL_NAME, WORDS, build_model, load_json, nested_flat_sae, perfect_hsae

from sae_lens_hierarchical import metrics
from sae_lens_hierarchical.evals import common
from sae_lens_hierarchical.evals.path_attribution import main as pa
from sae_lens_hierarchical.evals.path_attribution.eval_config import PathAttributionEvalConfig
from sae_lens_hierarchical.evals.path_attribution.eval_output import PathAttributionEvalOutput


def config(**kw) -> PathAttributionEvalConfig:
    base = dict(model_name=MODEL_NAME, dataset_name="in-memory", context_size=CTX, n_eval_prompts=32,
                batch_size_prompts=16, n_latents=4, n_inputs_per_latent=2)
    base.update(kw)
    return PathAttributionEvalConfig(**base)


def mixed_hsae() -> torch.nn.Module:
    """A hierarchical SAE whose children are gated by their parents (gate: hard) but read other
    directions, so each path node carries its own share."""
    sae = perfect_hsae(gate="hard")
    with torch.no_grad():
        children = sae.W_enc[:, sae.level_slices[1].start:]
        children.add_(0.5 * torch.randn_like(children))
    return sae


def test_shares_sum_to_total_and_a_plot_is_written(tiny_model, token_dataset, tmp_path):
    torch.manual_seed(0)
    sae = mixed_hsae()
    res = pa.run_eval(config(), [("hsae", sae)], "cpu", str(tmp_path), model=tiny_model, dataset=token_dataset)
    data = res["hsae_custom_sae"]
    rows = data["eval_result_details"]
    assert len(rows) == data["eval_result_metrics"]["path_attribution"]["n_paths"] > 0
    for r in rows:
        assert r["path"] == sae.path(r["target_latent"]) and r["path"][-1] == r["target_latent"]
        assert r["path_levels"] == list(range(len(r["path"])))
        assert all(a > 0 for a in r["activations"])  # a path of active latents (hard gate)
        for kind in ("reconstruction", "probe", "logit"):
            contrib, total = r[f"{kind}_contributions"], r[f"{kind}_total"]
            assert sum(contrib) == pytest.approx(total, rel=1e-4, abs=1e-5), kind
            shares = r[f"{kind}_shares"]
            if all(s is not None for s in shares):
                assert sum(shares) == pytest.approx(1.0, abs=1e-3), kind
    m = data["eval_result_metrics"]["path_attribution"]
    assert m["tree_source"] == "native"
    assert m["max_share_sum_error"] < 1e-3
    assert m["mean_path_length"] == 3.0  # the deepest firing latents are leaves
    png = tmp_path / "hsae_custom_sae_path_attribution.png"
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_times_activation_is_the_exact_logit_change_when_linear(tokenizer_dir, token_dataset, tmp_path):
    """Without a final LayerNorm and with the SAE at the last block's output, the logit is linear
    in the reconstruction, so a node's gradient x activation equals the logit change when that
    node's activation is removed (the rest of the model unchanged)."""
    model = build_model(tokenizer_dir, model_name="tiny-linear-logits", normalization_type=None)
    torch.manual_seed(1)
    sae = mixed_hsae()
    cfg = config(model_name="tiny-linear-logits", n_latents=2, n_inputs_per_latent=1)
    res = pa.run_eval(cfg, [("hsae", sae)], "cpu", str(tmp_path), model=model, dataset=token_dataset)
    rows = res["hsae_custom_sae"]["eval_result_details"]
    tokens = torch.tensor(token_dataset.shuffle(seed=42)["tokens"][:32])
    tok_id = {model.tokenizer.decode([i]): i for i in range(model.cfg.d_vocab)}
    assert rows
    for r in rows:
        row, pos, target = tokens[r["prompt_index"]], r["token_position"], tok_id[r["logit_token"]]

        def logit(drop: int | None, row=row, pos=pos, target=target) -> float:
            def splice(act, hook):
                f = sae.encode(act)
                x_hat = sae.decode(f)
                g = f.clone()
                if drop is not None:
                    g[0, pos, drop] = 0
                return sae.decode(g) + (act - x_hat)

            with torch.no_grad():
                return float(model.run_with_hooks(row[None], fwd_hooks=[(HOOK, splice)])[0, pos, target])

        full = logit(None)
        for v, contrib in zip(r["path"], r["logit_contributions"]):
            assert full - logit(v) == pytest.approx(contrib, rel=1e-3, abs=1e-5)


def test_probe_contributions_follow_the_decoder_rows(tiny_model, token_dataset, tmp_path):
    torch.manual_seed(2)
    sae = mixed_hsae()
    probe = torch.randn(sae.cfg.d_in)
    torch.save(probe, tmp_path / "probe.pt")
    cfg = config(probe_direction_path=str(tmp_path / "probe.pt"), n_latents=2)
    res = pa.run_eval(cfg, [("hsae", sae)], "cpu", str(tmp_path / "out"), model=tiny_model, dataset=token_dataset)
    unit = probe / probe.norm()
    with torch.no_grad():
        W_dec = sae.W_dec
        for r in res["hsae_custom_sae"]["eval_result_details"]:
            expected = [a * float(W_dec[v] @ unit) for v, a in zip(r["path"], r["activations"])]
            assert r["probe_contributions"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="d_in"):
        pa.load_probe_direction(str(tmp_path / "probe.pt"), sae.cfg.d_in + 1)


def test_flat_sae_gets_posthoc_paths(tiny_model, token_dataset, tmp_path):
    sae, _ = nested_flat_sae()
    res = pa.run_eval(config(), [("flat", sae)], "cpu", str(tmp_path), model=tiny_model, dataset=token_dataset)
    data = res["flat_custom_sae"]
    assert data["eval_result_metrics"]["path_attribution"]["tree_source"] == "posthoc"
    # the post-hoc tree of the same tokens, computed separately
    ev = common.eval_activations(tiny_model, common.collect_tokens(
        tiny_model, token_dataset, CTX, 32, HOOK, sae.cfg.d_in, True, 16, 42), HOOK)
    parent = metrics.posthoc_tree(sae.encode(ev.x).detach()).tolist()
    rows = data["eval_result_details"]
    assert rows
    for r in rows:
        path = r["path"]
        assert parent[path[0]] == -1
        assert all(parent[c] == p for p, c in zip(path, path[1:]))


def test_input_texts_and_explicit_latents(tiny_model, token_dataset, tmp_path):
    sae = mixed_hsae()
    texts = [" ".join(WORDS[:12]), " ".join(WORDS[100:112])]
    cfg = config(latents=[4, 20], input_texts=texts, logit_target="next_token")
    res = pa.run_eval(cfg, [("hsae", sae)], "cpu", str(tmp_path), model=tiny_model, dataset=token_dataset)
    m = res["hsae_custom_sae"]["eval_result_metrics"]["path_attribution"]
    rows = res["hsae_custom_sae"]["eval_result_details"]
    assert m["n_paths"] + m["n_skipped"] == len(texts) * 2
    for r in rows:
        assert r["target_latent"] in (4, 20) and r["prompt_index"] in (0, 1)
        assert r["token"] in WORDS and r["token_position"] >= 1  # BOS is never the input
    with pytest.raises(ValueError, match="outside"):
        pa.run_eval(config(latents=[999]), [("bad", sae)], "cpu", str(tmp_path / "bad"),
                    model=tiny_model, dataset=token_dataset)


def test_latents_outside_the_tree_are_chosen_last_and_are_their_own_path():
    sae = perfect_hsae()
    with torch.no_grad():
        sae.tree_parent[20] = -1  # a leaf outside the tree
    tree = common.native_tree(sae)
    assert tree.outside.nonzero().flatten().tolist() == [20]
    assert tree.path(20) == [20] and tree.path(21) == sae.path(21) and len(tree.path(21)) == 3
    fires = torch.ones(sae.cfg.d_sae, dtype=torch.long)
    fires[20] = 100  # the most frequent latent, at the deepest level
    chosen = pa._choose_latents(tree, fires, 28)
    # deepest first (by frequency, then index), latent 20 last although it fires most
    assert chosen == [*range(12, 20), *range(21, 28), *range(4, 12), *range(4), 20]


def test_committed_schema_equals_generated():
    from sae_lens_hierarchical.evals import generate_json_schemas as gen

    path = os.path.join(os.path.dirname(pa.__file__), "eval_output_schema_path_attribution.json")
    assert load_json(path) == gen.schema(PathAttributionEvalOutput)


class _Payload:
    """Any pickled object that is not plain tensors: torch.load(weights_only=False) would run it."""


def test_probe_direction_file_is_loaded_without_unpickling_code(tmp_path):
    good, bad = tmp_path / "probe.pt", tmp_path / "evil.pt"
    torch.save(torch.ones(4), good)
    torch.save({"direction": torch.ones(4), "payload": _Payload()}, bad)
    assert pa.load_probe_direction(str(good), 4).tolist() == [1.0] * 4
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        pa.load_probe_direction(str(bad), 4)
