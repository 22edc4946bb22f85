"""The hierarchy eval: consistency numbers that are known in advance, SAE-Bench's output format.

* a hand-built perfect tree (children copy their parent's encoder) scores HCS = necessity =
  coverage = 1, Hamming 0, KL 0, on a real tiny HookedTransformer and an in-memory
  pretokenized dataset, written to SAE-Bench's file name with SAE-Bench's top-level fields;
* the same tree with dead leaves: level-1 parents get coverage 0, so HCS = (4*1 + 8*0)/12;
* a flat SAE with planted nesting: the post-hoc tree is the planted one and coverage equals
  P(child on | parent on) counted by hand, as does p_child_given_parent;
* the level post-hoc tree (levels by density, parent = the latent one level up with the
  highest P(parent | latent)) recovers planted parents of flat SAEs, with given widths and with
  the default 1:4:16;
* a planted native tree is scored on both trees (here the same tree: the same numbers);
* a hard-gated native tree has necessity exactly 1, while its level post-hoc tree is fitted
  independently on the fit tokens and scored on the held-out ones;
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
from conftest import (
    CTX,
    D_MODEL,
    MODEL_NAME,
    hsae,
    load_json,
    nested_flat_sae,
    perfect_hsae,
    planted_features,
    planted_sae,
)
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
    data = load_json(path)
    assert data == json.loads(json.dumps(res["perfect_custom_sae"], default=str))

    # SAE-Bench's top-level fields, and nothing else
    base_fields = {f.name for f in dataclasses.fields(BaseEvalOutput)}
    assert set(data) == base_fields
    assert data["eval_type_id"] == "hierarchy"
    assert (data["sae_lens_release_id"], data["sae_lens_id"]) == ("perfect", "custom_sae")
    assert data["sae_cfg_dict"]["architecture"] == "hierarchical"
    assert data["eval_config"]["n_eval_prompts"] == 32
    TypeAdapter(HierarchyEvalOutput).validate_python(data)  # the file validates as the output class

    assert set(data["eval_result_metrics"]) == {"hierarchy", "level_posthoc"}
    m = data["eval_result_metrics"]["hierarchy"]
    assert m["tree_source"] == "native" and m["n_levels"] == 3
    assert m["hierarchical_consistency_score"] == 1.0
    assert m["necessity"] == 1.0 and m["coverage"] == 1.0 and m["p_child_given_parent"] == 1.0
    assert m["n_outside_tree"] == 0
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
    assert all(r["outside_tree_latents"] == 0 for r in rows) and "free_latents" not in rows[0]
    # the level post-hoc tree: the SAE's own level widths, every latent below the roots fires
    lp = data["eval_result_metrics"]["level_posthoc"]
    assert lp["level_posthoc_level_widths"] == [4, 8, 16]
    assert lp["level_posthoc_n_edges"] == 8 + 16
    assert 0.0 <= lp["level_posthoc_necessity"] <= 1.0 and lp["level_posthoc_hamming_per_token"] >= 0.0
    assert set(data["eval_result_unstructured"]["level_posthoc_per_level"]) <= {"0", "1"}


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
    res = hierarchy.compute_hierarchy_metrics(sae, x, config(tree_fit_fraction=0.0))
    overall, per_level, tree = res.overall, res.per_level, res.tree
    assert tree.source == "posthoc" and overall["tree_source"] == "posthoc"
    assert torch.equal(tree.parent_index, planted)
    on = sae.encode(x) > 0
    P = planted.numel() // 2
    coverage = [(on[:, P + i] & on[:, i]).sum().double() / on[:, i].sum() for i in range(P)]
    assert overall["coverage"] == pytest.approx(float(torch.stack(coverage).mean()), abs=1e-9)
    # one child per parent: P(child | parent) of each edge is its parent's coverage
    assert overall["p_child_given_parent"] == pytest.approx(overall["coverage"], abs=1e-12)
    assert overall["necessity"] == 1.0  # each child's bias is lower: it fires only with its parent
    assert overall["n_edges"] == P and [r["level"] for r in per_level] == [0, 1]
    assert overall["n_outside_tree"] == 0
    # default level post-hoc widths of a flat SAE: 1:4:16 of d_sae = 8
    assert res.level_posthoc["level_posthoc_level_widths"] == metrics.ratio_level_widths(8) == [1, 2, 5]
    # The same SAE scored with tree_source="native" is refused: it has no tree.
    with pytest.raises(ValueError, match="native"):
        hierarchy.compute_hierarchy_metrics(sae, x, config(tree_source="native"))


def test_density_levels_and_ratio_widths():
    counts = torch.tensor([5, 0, 9, 9, 1, 3, 0])
    # densest first, ties to the lower index, never-firing latents last
    assert metrics.density_levels(counts, [2, 2, 3]).tolist() == [1, 2, 0, 0, 2, 1, 2]
    with pytest.raises(ValueError, match="adding up"):
        metrics.density_levels(counts, [2, 2])
    assert metrics.ratio_level_widths(21) == [1, 4, 16]
    assert metrics.ratio_level_widths(16384) == [780, 3121, 12483]
    with pytest.raises(ValueError, match="too small"):
        metrics.ratio_level_widths(2)


def test_level_posthoc_tree_never_firing_latents_have_no_parent():
    on = torch.zeros(50, 6, dtype=torch.bool)
    on[:30, 0] = True  # root
    on[:20, 1] = True  # under 0
    on[40:45, 2] = True  # fires, but never with a latent one level up
    parent, levels = metrics.level_posthoc_tree(on, [1, 2, 3])
    assert levels.tolist() == [0, 1, 1, 2, 2, 2]
    assert parent.tolist() == [-1, 0, -1, -1, -1, -1]  # latents 3..5 never fire; 2 co-fires with nothing
    # chunks read twice: a one-shot iterator gives the same tree
    p2, l2 = metrics.level_posthoc_tree(iter(on.split(7)), [1, 2, 3])
    assert torch.equal(parent, p2) and torch.equal(levels, l2)


# A planted 3-level tree of 21 features: 1 root, 4 children, 16 grandchildren (1:4:16).
PLANTED_PARENT = torch.tensor([-1] + [0] * 4 + [1 + i // 4 for i in range(16)])
PLANTED_LEVELS = torch.tensor([0] + [1] * 4 + [2] * 16)


def _shuffled_planted(seed: int = 0, within_levels: bool = False):
    """The planted features as latents in a random order (within each level only, for a
    hierarchical SAE whose levels are contiguous): (x, magnitudes, directions, parent, levels)
    in that latent order, so nothing about latent order gives the tree away."""
    g = torch.Generator().manual_seed(seed)
    if within_levels:
        perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(4, generator=g),
                          5 + torch.randperm(16, generator=g)])
    else:
        perm = torch.randperm(21, generator=g)
    inv = torch.argsort(perm)  # new index of each planted feature
    parent = torch.where(PLANTED_PARENT >= 0, inv[PLANTED_PARENT.clamp(min=0)], -1)[perm]
    x, mags, q = planted_features(PLANTED_PARENT, [0.8] + [0.45] * 20, n=6000, d_in=24, seed=seed + 3)
    return x, mags[:, perm], q[perm], parent, PLANTED_LEVELS[perm]


def test_level_posthoc_tree_recovers_planted_parents_of_flat_saes():
    # (a) the nested StandardSAE, widths given: parents are the 4 densest latents
    sae, planted = nested_flat_sae()
    x = torch.randn(4000, D_MODEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acts = sae.encode(x)
    parent, levels = metrics.level_posthoc_tree(acts, [4, 4])
    assert torch.equal(parent, planted) and levels.tolist() == [0] * 4 + [1] * 4
    res = hierarchy.compute_hierarchy_metrics(sae, x, config(posthoc_level_widths=[4, 4]))
    assert torch.equal(res.level_tree.parent_index, planted)
    with pytest.raises(ValueError, match="posthoc_level_widths"):
        hierarchy.compute_hierarchy_metrics(sae, x, config(posthoc_level_widths=[4, 5]))

    # (b) a flat JumpReLU SAE on planted 3-level features, default widths 1:4:16, through the eval
    xg, mags, q, parent, lv = _shuffled_planted()
    flat = planted_sae(q, flat=True)
    assert not common.is_hierarchical(flat)
    res = hierarchy.compute_hierarchy_metrics(flat, xg, config())
    assert torch.equal(res.level_tree.parent_index, parent)
    assert torch.equal(res.level_tree.levels, lv)
    lp = res.level_posthoc
    assert lp["level_posthoc_level_widths"] == [1, 4, 16] and lp["level_posthoc_n_edges"] == 20
    assert lp["level_posthoc_necessity"] == 1.0  # a planted child fires only with its parent
    # P(child | parent) and Hamming per token, counted by hand on the held-out tokens
    _, score_idx = common.split_fit_score(xg.shape[0], 0.5, 42)
    on = mags[score_idx] > 0
    kids = (parent >= 0).nonzero().flatten()
    p_cp = [(on[:, c] & on[:, parent[c]]).sum().double() / on[:, parent[c]].sum() for c in kids.tolist()]
    assert lp["level_posthoc_p_child_given_parent"] == pytest.approx(float(torch.stack(p_cp).mean()), abs=1e-9)
    parents = sorted(set(parent[kids].tolist()))
    mismatch = sum(float((on[:, p] ^ on[:, kids[parent[kids] == p]].any(-1)).double().mean()) for p in parents)
    assert lp["level_posthoc_hamming_per_token"] == pytest.approx(mismatch, abs=1e-9)


def test_planted_native_tree_is_scored_on_both_trees():
    """A hierarchical SAE whose native tree is the planted one: its level post-hoc tree (fitted
    with the SAE's own widths) recovers that tree, so both blocks report the same numbers."""
    x, _, q, native, lv = _shuffled_planted(seed=1, within_levels=True)
    assert torch.equal(lv, PLANTED_LEVELS)
    sae = planted_sae(q, level_widths=[1, 4, 16], parent=native)
    res = hierarchy.compute_hierarchy_metrics(sae, x, config())
    assert res.tree.source == "native" and torch.equal(res.tree.parent_index, native)
    assert res.level_tree.source == "level_posthoc"
    assert torch.equal(res.level_tree.parent_index, native)
    assert torch.equal(res.level_tree.levels, sae.latent_levels)
    o, lp = res.overall, res.level_posthoc
    assert o["necessity"] == lp["level_posthoc_necessity"] == 1.0
    assert o["p_child_given_parent"] == lp["level_posthoc_p_child_given_parent"]
    assert o["coverage"] == lp["level_posthoc_coverage"]
    assert o["hamming_per_token"] == lp["level_posthoc_hamming_per_token"] > 0
    assert o["n_edges"] == lp["level_posthoc_n_edges"] == 20
    assert 0.3 < o["p_child_given_parent"] < 0.6  # each child fires on 45% of its parent's tokens
    rows = {r["level"]: r for r in res.per_level}
    assert rows[0]["p_child_given_parent"] is not None and rows[2]["p_child_given_parent"] is None


def test_hard_gated_native_tree_has_necessity_one_and_an_independent_level_tree():
    """Hard gating makes P(parent | child) = 1 on the native tree by construction, whatever the
    data. The level post-hoc tree knows nothing of the gate: root 0 and its children fire on
    almost every token and root 1 almost never, so the densest latents are not the roots."""
    sae = hsae((4, 8, 16), gate="hard", seed=3)
    with torch.no_grad():
        sae.b_enc[0] = sae.b_enc[4] = sae.b_enc[5] = 2.5  # root 0 and its two children: dense
        sae.b_enc[1] = -2.5  # root 1: rare
    x = torch.randn(6000, D_MODEL, generator=torch.Generator().manual_seed(2))
    cfg = config()
    res = hierarchy.compute_hierarchy_metrics(sae, x, cfg)
    assert res.overall["necessity"] == 1.0
    assert res.overall["hierarchical_consistency_score"] < 1.0  # coverage is not forced
    lt = res.level_tree
    assert not torch.equal(lt.levels, sae.latent_levels)  # levels by density, not the SAE's slots
    assert int(lt.levels[4]) == 0 and int(lt.levels[1]) > 0
    # the level tree is the one fitted on the fit tokens, scored on the held-out ones
    fit_idx, score_idx = common.split_fit_score(x.shape[0], cfg.tree_fit_fraction, cfg.random_seed)
    with torch.no_grad():
        parent, levels = metrics.level_posthoc_tree(sae.encode(x[fit_idx]), [4, 8, 16])
        hc = metrics.hierarchical_consistency(sae.encode(x[score_idx]), parent, levels=levels)
    assert torch.equal(lt.parent_index, parent) and torch.equal(lt.levels, levels)
    lp = res.level_posthoc
    assert lp["level_posthoc_necessity"] == pytest.approx(hc["necessity"], abs=1e-12)
    assert lp["level_posthoc_necessity"] < 1.0
    assert lp["level_posthoc_hamming_per_token"] == pytest.approx(hc["hamming_per_token"], abs=1e-12)
    assert lp["level_posthoc_coverage"] == pytest.approx(hc["coverage"], abs=1e-12)


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
    assert load_json(path) == gen.schema(HierarchyEvalOutput)
    assert HierarchyEvalOutput.eval_type_id == "hierarchy"  # what SAE-Bench's generator names files by


def test_module_cli_evaluates_a_saved_sae(tiny_model, tmp_path, monkeypatch):
    """`python -m sae_lens_hierarchical.evals.hierarchy.main --sae_path ...` (in process; the
    model loader is pointed at the tiny model), on offline text ('pydoc')."""
    from sae_lens_hierarchical import models

    perfect_hsae().save_model(tmp_path / "saved")
    monkeypatch.setattr(models, "load_model", lambda *_, **__: tiny_model)
    out = tmp_path / "out"
    hierarchy.main(["--sae_path", f"mine={tmp_path / 'saved'}", "--dataset_name", "pydoc",
                    "--n_eval_prompts", "8", "--context_size", str(CTX), "--output_folder", str(out),
                    "--device", "cpu"])
    data = load_json(out / "mine_custom_sae_eval_results.json")
    args = hierarchy.arg_parser().parse_args(["--sae_path", "x", "--posthoc_level_widths", "1", "2", "5"])
    assert args.posthoc_level_widths == [1, 2, 5]
    assert data["eval_config"]["dataset_name"] == "pydoc"
    assert data["eval_config"]["model_name"] == MODEL_NAME  # taken from the SAE's metadata
    assert data["eval_result_metrics"]["hierarchy"]["hierarchical_consistency_score"] == 1.0
