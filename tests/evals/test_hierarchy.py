"""The hierarchy eval: consistency numbers that are known in advance, SAE-Bench's output format.

* a hand-built perfect tree (children copy their parent's encoder) scores HCS = necessity =
  coverage = 1, Hamming 0, KL 0, on a real tiny HookedTransformer and an in-memory
  pretokenized dataset, written to SAE-Bench's file name with SAE-Bench's top-level fields;
* the same tree with dead leaves: level-1 parents get coverage 0, so HCS = (4*1 + 8*0)/12;
* a flat SAE with planted nesting: the post-hoc tree is the planted one and coverage equals
  P(child on | parent on) counted by hand;
* the chunked per-level KL adds up to one `metrics.consistency_kl` call on all tokens;
* (release, sae_id) pairs go through SAE-Bench's pretrained loader and file naming;
* the committed JSON schema equals the generated one.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from conftest import CTX, D_MODEL, MODEL_NAME, nested_flat_sae, perfect_hsae
from pydantic import TypeAdapter

from sae_lens_hierarchical import metrics
from sae_lens_hierarchical.evals import common
from sae_lens_hierarchical.evals.hierarchy import main as hierarchy
from sae_lens_hierarchical.evals.hierarchy.eval_config import HierarchyEvalConfig
from sae_lens_hierarchical.evals.hierarchy.eval_output import HierarchyEvalOutput


def config(**kw) -> HierarchyEvalConfig:
    base = dict(model_name=MODEL_NAME, dataset_name="in-memory", context_size=CTX,
                n_eval_prompts=32, batch_size_prompts=16)
    base.update(kw)
    return HierarchyEvalConfig(**base)


def test_perfect_tree_scores_one_in_saebench_format(tiny_model, token_dataset, tmp_path):
    from sae_bench.evals.base_eval_output import BaseEvalOutput
    from sae_bench.sae_bench_utils import general_utils

    out = tmp_path / "hierarchy"
    res = hierarchy.run_eval(config(), [("perfect", perfect_hsae())], "cpu", str(out),
                             model=tiny_model, dataset=token_dataset)
    path = general_utils.get_results_filepath(str(out), "perfect", "custom_sae")
    assert os.path.basename(path) == "perfect_custom_sae_eval_results.json" and os.path.exists(path)
    data = json.load(open(path))
    assert data == json.loads(json.dumps(res["perfect_custom_sae"], default=str))

    # SAE-Bench's top-level fields, and nothing else
    base_fields = {f.name for f in dataclasses.fields(BaseEvalOutput)}
    assert set(data) == base_fields
    assert data["eval_type_id"] == "hierarchy"
    assert (data["sae_lens_release_id"], data["sae_lens_id"]) == ("perfect", "custom_sae")
    assert data["sae_cfg_dict"]["architecture"] == "hierarchical"
    assert data["eval_config"]["n_eval_prompts"] == 32
    TypeAdapter(HierarchyEvalOutput).validate_python(data)  # the file validates as the output class

    m = data["eval_result_metrics"]["hierarchy"]
    assert m["tree_source"] == "native" and m["n_levels"] == 3
    assert m["hierarchical_consistency_score"] == 1.0
    assert m["necessity"] == 1.0 and m["coverage"] == 1.0
    assert m["hamming_distance"] == 0.0 and m["hamming_per_token"] == 0.0
    assert abs(m["consistency_kl"]) < 1e-5
    assert m["n_edges"] == 8 + 16 and m["n_parents"] == 4 + 8
    # 32 prompts x 32 tokens, BOS left out, half held out
    assert m["n_tokens"] == round(32 * (CTX - 1) * 0.5)
    rows = data["eval_result_details"]
    assert [r["level"] for r in rows] == [0, 1, 2]
    assert [r["n_latents"] for r in rows] == [4, 8, 16]
    assert rows[0]["hierarchical_consistency_score"] == rows[1]["hierarchical_consistency_score"] == 1.0
    assert rows[2]["n_parents"] == 0 and rows[2]["hierarchical_consistency_score"] is None


def test_dead_leaves_give_zero_coverage_at_level_1(tiny_model, token_dataset, tmp_path):
    sae = perfect_hsae()
    with torch.no_grad():
        sae.b_enc[sae.level_slices[2]] = -100.0  # leaves never fire
    res = hierarchy.run_eval(config(), [("deadleaves", sae)], "cpu", str(tmp_path),
                             model=tiny_model, dataset=token_dataset)
    data = res["deadleaves_custom_sae"]
    rows = data["eval_result_details"]
    assert rows[0]["coverage"] == 1.0 and rows[0]["hierarchical_consistency_score"] == 1.0
    assert rows[1]["coverage"] == 0.0 and rows[1]["hierarchical_consistency_score"] == 0.0
    assert rows[1]["n_edges_scored"] == 0  # necessity is undefined where no child fires
    m = data["eval_result_metrics"]["hierarchy"]
    assert m["hierarchical_consistency_score"] == pytest.approx((4 * 1.0 + 8 * 0.0) / 12)
    assert m["coverage"] == pytest.approx(4 / 12)
    # every firing level-1 parent mismatches the OR of its (silent) children
    assert rows[1]["hamming_distance"] > 0.3


def test_flat_sae_is_scored_on_its_posthoc_tree():
    from sae_bench.sae_bench_utils import general_utils

    sae, planted = nested_flat_sae()
    general_utils.load_and_format_sae("flat", sae, "cpu")
    x = torch.randn(4000, D_MODEL, generator=torch.Generator().manual_seed(1))
    overall, per_level, tree = hierarchy.compute_hierarchy_metrics(sae, x, config(tree_fit_fraction=0.0))
    assert tree.source == "posthoc" and overall["tree_source"] == "posthoc"
    assert torch.equal(tree.parent_index, planted)
    on = sae.encode(x) > 0
    P = planted.numel() // 2
    coverage = [(on[:, P + i] & on[:, i]).sum().double() / on[:, i].sum() for i in range(P)]
    assert overall["coverage"] == pytest.approx(float(torch.stack(coverage).mean()), abs=1e-9)
    assert overall["necessity"] == 1.0  # each child's bias is lower: it fires only with its parent
    assert overall["n_edges"] == P and [r["level"] for r in per_level] == [0, 1]
    # The same SAE scored with tree_source="native" is refused: it has no tree.
    with pytest.raises(ValueError, match="native"):
        hierarchy.compute_hierarchy_metrics(sae, x, config(tree_source="native"))


def test_chunked_level_kl_equals_one_consistency_kl_call(monkeypatch):
    torch.manual_seed(0)
    sae = perfect_hsae()
    with torch.no_grad():  # children no longer copy their parent: a non-zero KL
        sae.W_enc[:, sae.level_slices[1].start:].normal_()
    x = torch.randn(700, D_MODEL)
    acts = sae.encode(x).detach()
    tree = common.sae_tree(sae, None)
    norms = sae.W_dec.detach().norm(dim=-1)
    expected = float(metrics.consistency_kl(acts, tree.parent_index, norms))
    monkeypatch.setattr(hierarchy, "CHUNK", 128)  # several chunks of unequal counted tokens
    per_level = hierarchy.level_kls(iter(acts.split(128)), tree, norms)
    assert expected > 0.01
    assert sum(per_level.values()) == pytest.approx(expected, rel=1e-5)
    assert set(per_level) == {0, 1}


def test_release_and_id_pairs_go_through_saebench_loader(tiny_model, token_dataset, tmp_path, monkeypatch):
    """A (release, sae_id) pair is loaded by SAE-Bench's load_and_format_sae (the download is
    replaced by a local copy here: no Hub), which folds decoder norms; results are named
    <release>_<sae_id>."""
    from sae_lens import SAE

    sae = perfect_hsae()
    with torch.no_grad():
        sae.W_dec[sae.level_slices[0]].mul_(3.0)  # non-unit rows, as a raw checkpoint may have
    sae.save_model(tmp_path / "saved")
    calls = []

    def from_pretrained(release, sae_id, device="cpu", **kw):
        calls.append((release, sae_id))
        return SAE.load_from_disk(tmp_path / "saved", device=device), {}, None

    monkeypatch.setattr(SAE, "from_pretrained_with_cfg_and_sparsity", staticmethod(from_pretrained))
    res = hierarchy.run_eval(config(), [("hsae-release", "blocks.0/res")], "cpu", str(tmp_path / "out"),
                             model=tiny_model, dataset=token_dataset)
    assert calls == [("hsae-release", "blocks.0/res")]
    assert os.path.exists(tmp_path / "out" / "hsae-release_blocks.0_res_eval_results.json")
    data = res["hsae-release_blocks.0/res"]
    assert data["sae_lens_id"] == "blocks.0/res"
    assert data["eval_result_metrics"]["hierarchy"]["hierarchical_consistency_score"] == 1.0
    # force_rerun=False skips an existing result, as SAE-Bench's evals do
    again = hierarchy.run_eval(config(), [("hsae-release", "blocks.0/res")], "cpu", str(tmp_path / "out"),
                               model=tiny_model, dataset=token_dataset)
    assert again == {}


def test_committed_schema_equals_generated():
    from sae_lens_hierarchical.evals import generate_json_schemas as gen

    path = os.path.join(os.path.dirname(hierarchy.__file__), "eval_output_schema_hierarchy.json")
    assert json.load(open(path)) == gen.schema(HierarchyEvalOutput)
    assert HierarchyEvalOutput.eval_type_id == "hierarchy"  # what SAE-Bench's generator names files by


def test_module_cli_evaluates_a_saved_sae(tiny_model, tmp_path, monkeypatch):
    """`python -m sae_lens_hierarchical.evals.hierarchy.main --sae_path ...` (in process; the
    model loader is pointed at the tiny model), on offline text ('pydoc')."""
    from sae_lens_hierarchical import models

    perfect_hsae().save_model(tmp_path / "saved")
    monkeypatch.setattr(models, "load_model", lambda name, **kw: tiny_model)
    out = tmp_path / "out"
    hierarchy.main(["--sae_path", f"mine={tmp_path / 'saved'}", "--dataset_name", "pydoc",
                    "--n_eval_prompts", "8", "--context_size", str(CTX), "--output_folder", str(out),
                    "--device", "cpu"])
    data = json.load(open(out / "mine_custom_sae_eval_results.json"))
    assert data["eval_config"]["dataset_name"] == "pydoc"
    assert data["eval_config"]["model_name"] == MODEL_NAME  # taken from the SAE's metadata
    assert data["eval_result_metrics"]["hierarchy"]["hierarchical_consistency_score"] == 1.0
