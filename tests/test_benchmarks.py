"""Smoke test of the synthetic benchmark's `--quick` profile: the pipeline, not the quality."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_benchmark_quick_profile_writes_all_metrics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "synthetic_hierarchy.py"), "--quick",
         "--jobs", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "synthetic_quick.json").read_text())
    rows = data["rows"]
    assert {r["contestant"] for r in rows} == {
        "hierarchical", "batchtopk", "matryoshka_batchtopk", "topk", "standard"}
    assert data["meta"]["machine"]
    for r in rows:
        for key in ("f1", "mcc", "edge_recall", "explained_variance", "l0", "hcs",
                    "sec_per_step", "step_ratio_vs_batchtopk"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (r["contestant"], key)
        assert 0 <= r["mcc"] <= 1 and 0 <= r["edge_recall"] <= 1
    hier = next(r for r in rows if r["contestant"] == "hierarchical")
    assert hier["hcs"] > 0  # native tree: children only fire under their parents
    md = (tmp_path / "synthetic_quick.md").read_text()
    assert "| hierarchical (n=1) |" in md and "step_ratio_vs_batchtopk" in md


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("synthetic_hierarchy", ROOT / "benchmarks" / "synthetic_hierarchy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while being built
    spec.loader.exec_module(mod)
    return mod


def test_gpu_profile_builds_the_published_synthsaebench_16k_world():
    """The GPU anchor (SynthSAEBench-16k) is built offline from its published config; its
    orthogonalisation takes an hour on a CPU, so only the config and tree are checked here."""
    bench = _bench()
    p = bench.PROFILES["gpu"]
    cfg = bench.synthetic_model_cfg(p, seed=0)
    assert (cfg.num_features, cfg.hidden_dim) == (16_384, 768)
    h = cfg.hierarchy
    assert (h.total_root_nodes, h.branching_factor, h.max_depth) == (128, 4, 3)
    assert h.scale_children_by_parent and h.mutually_exclusive_portion == 1.0
    assert cfg.correlation.rank == 25 and cfg.bias == 0.5 and cfg.seed == 42
    # 128 roots x (1 + 4 + 16 + 64) tree features + the rest outside any tree.
    assert 128 * 85 + p.n_free == cfg.num_features
    hsae = bench.sae_cfg("hierarchical", bench.sae_shape(p, "match"), p.l0, [4.0, 8.0, 12.0], 768, p.hsae)
    flat = bench.sae_cfg("batchtopk", bench.sae_shape(p, "match"), p.l0, [4.0, 8.0, 12.0], 768, {},
                         flat_width=p.flat_width)
    assert flat.d_sae == 4096 and flat.k == 25
    assert hsae.level_widths == [128, 512, 2048]  # the truth's top three levels
    assert hsae.d_sae == 4096 and hsae.n_free == 1408  # the tree's 2,688 + free latents
    assert abs(sum(hsae.k_per_level) + hsae.k_free - 25) < 0.05


def test_anchor4k_profile_is_the_16k_generator_at_a_quarter_of_the_size():
    """The CPU stand-in for the GPU anchor: the same generator settings, a quarter of the
    features, dimensions and SAE width, and the anchor's L0 over the truth's."""
    bench = _bench()
    big = bench.synthetic_model_cfg(bench.PROFILES["gpu"], seed=0)
    p = bench.PROFILES["anchor4k"]
    small = bench.synthetic_model_cfg(p, seed=0)
    assert (small.num_features, small.hidden_dim) == (16_384 // 4, 768 // 4)
    assert small.hierarchy.total_root_nodes == 32
    for name in ("firing_probability", "correlation", "orthogonalization", "mean_firing_magnitudes",
                 "std_firing_magnitudes", "bias", "seed"):
        assert getattr(small, name) == getattr(big, name), name
    assert {k: v for k, v in vars(small.hierarchy).items() if k != "total_root_nodes"} == \
        {k: v for k, v in vars(big.hierarchy).items() if k != "total_root_nodes"}
    hsae = bench.sae_cfg("hierarchical", bench.sae_shape(p, "match"), p.l0, [4.0, 3.6, 3.6], 192, p.hsae)
    assert hsae.d_sae == p.flat_width == 1024 and hsae.level_widths == [32, 128, 512]
    assert abs(hsae.k_free - 0.31 * p.l0) < 0.05
    # An ablation can give the HSAE its own tree; the width follows it.
    own = bench.sae_cfg("hierarchical", bench.sae_shape(p, "match"), p.l0, [4.0, 3.6, 3.6], 192,
                        dict(p.hsae, level_widths=[40, 160, 640], n_free=184, free_l0_share=0.11))
    assert own.level_widths == [40, 160, 640] and own.d_sae == 1024


def test_a_synthsaebench_world_is_built_once_then_loaded_from_the_cache(tmp_path):
    """SAELens's save / load_from_disk round trip: the loaded world samples exactly what the
    built one does; another config gets its own entry; no half-written entry is left."""
    bench = _bench()
    p = bench.Profile(n_roots=2, branching=2, n_free=5, hidden_dim=8, training_samples=1_024,
                      seeds=[0], shapes=["match"], l0_factors=[1.0], depth=3, world="synthsaebench",
                      world_cache=tmp_path)
    built = bench.build_world(p, seed=0)
    assert [d.name.startswith("synthsaebench_") for d in tmp_path.iterdir()] == [True]
    loaded = bench.build_world(p, seed=1)  # one world for every SAE seed
    assert torch.equal(built.feature_dict.feature_vectors, loaded.feature_dict.feature_vectors)
    torch.manual_seed(3)
    a = built.sample(256)
    torch.manual_seed(3)
    assert torch.equal(a, loaded.sample(256))
    p.hidden_dim = 12
    assert bench.build_world(p, seed=0).cfg.hidden_dim == 12
    assert len(list(tmp_path.iterdir())) == 2 and not list(tmp_path.glob(".*"))


def test_merge_combines_one_seed_result_files_into_one_report(tmp_path):
    """One seed per GPU command, then one table: --merge of two halves of a committed result
    gives the same means as the whole, and refuses files of different profiles."""
    whole = json.loads((ROOT / "benchmarks" / "results" / "synthetic_default_1m.json").read_text())
    halves = []
    for i, seeds in enumerate(([0], [1, 2])):
        part = {"meta": dict(whole["meta"], command=f"part {i}"),
                "rows": [r for r in whole["rows"] if r["seed"] in seeds]}
        halves.append(tmp_path / f"part{i}.json")
        halves[-1].write_text(json.dumps(part))
    bench = _bench()
    assert bench.main(["--merge", *map(str, halves), "--out", str(tmp_path), "--tag", "merged"]) == 0
    merged = json.loads((tmp_path / "synthetic_default_merged.json").read_text())
    assert len(merged["rows"]) == len(whole["rows"])
    md = (tmp_path / "synthetic_default_merged.md").read_text()
    f1 = [r["f1"] for r in whole["rows"] if r["contestant"] == "hierarchical" and r["shape"] == "match"
          and r["l0_factor"] == 1.0]
    assert len(f1) == 3 and f"| hierarchical (n=3) | {bench._fmt(f1)} |" in md
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"meta": dict(whole["meta"], profile="quick"), "rows": []}))
    with pytest.raises(SystemExit, match="profiles"):
        bench.main(["--merge", str(halves[0]), str(other), "--out", str(tmp_path)])


def test_a_deeper_truth_than_the_hsae_runs_end_to_end():
    """A 4-level truth (depth 3, as SynthSAEBench), a fixed L0 and a separate flat width: the
    GPU profile's code paths on a world small enough for CI."""
    bench = _bench()
    p = bench.Profile(n_roots=3, branching=2, n_free=6, hidden_dim=16, training_samples=8_192,
                      seeds=[0], shapes=["match"], l0_factors=[1.0], eval_samples=2_000,
                      batch_size=512, depth=3, hsae_widths=[4, 8, 16], flat_width=32, l0=3.0)
    torch.set_num_threads(1)
    rows = {c: bench.run_one(p, c, "match", 0, 1.0) for c in ("hierarchical", "batchtopk")}
    assert rows["hierarchical"]["d_sae"] == 28 and rows["batchtopk"]["d_sae"] == 32
    for r in rows.values():
        assert abs(r["l0"] - 3.0) < 0.5, r["l0"]
        assert 0 <= r["mcc"] <= 1 and math.isfinite(r["explained_variance"])
        assert "mcc_level_3" in r  # the truth's fourth level is scored too


def test_oracle_init_places_the_true_tree_in_the_slots():
    """The diagnostic start at the truth: each root slot holds a true root, its child slots
    that root's children, spare roots and free latents the features outside the tree."""
    bench = _bench()
    from sae_lens.registry import get_sae_training_class
    from sae_lens.synthetic import SyntheticModel

    from sae_lens_hierarchical import metrics as M

    p = bench.Profile(n_roots=3, branching=2, n_free=6, hidden_dim=16, training_samples=8_192,
                      seeds=[0], shapes=["wider"], l0_factors=[1.0], eval_samples=2_000, batch_size=512,
                      hsae={"n_free": 2, "free_l0_share": 0.1})
    synth = SyntheticModel(bench.synthetic_model_cfg(p, 0), device="cpu")
    gt_parent = M.parent_index_from_hierarchy(synth.hierarchy.roots, synth.cfg.num_features)
    gt_levels = bench.ground_truth_levels(gt_parent)
    widths = bench.sae_shape(p, "wider")  # 4 roots for the truth's 3
    cfg = bench.sae_cfg("hierarchical", widths, 3.0, [1.0, 1.0, 1.0], 16, p.hsae)
    sae = get_sae_training_class("hierarchical")[0](cfg)
    bench.oracle_init_(sae, synth, gt_parent, gt_levels)
    V = synth.feature_dict.feature_vectors.float()
    V = V / V.norm(dim=-1, keepdim=True)
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    match = (W @ V.T).max(-1)
    feat = match.indices
    assert [int(gt_levels[f]) for f in feat[:4]] == [0, 0, 0, -1]  # 3 true roots, then a free feature
    # Below the true roots every slot holds the true child of its parent's feature; the spare
    # root's children (a free feature has none) keep their random init.
    under_true = [j for j in range(4, cfg.tree_size) if sae.path(j)[0] < 3]
    assert len(under_true) == 3 * 2 + 3 * 2 * 2
    assert torch.allclose(match.values[under_true], torch.ones(len(under_true)), atol=1e-5)
    for child in under_true:
        assert int(gt_parent[feat[child]]) == int(feat[int(sae.parent_index[child])])
    spare = [j for j in range(4, cfg.tree_size) if sae.path(j)[0] == 3]
    assert (match.values[spare] < 0.99).all()
    assert [int(gt_levels[f]) for f in feat[cfg.tree_size:]] == [-1, -1]  # free latents: free features
    assert torch.allclose(match.values[cfg.tree_size:], torch.ones(2), atol=1e-5)
    assert bench.sae_cfg("hierarchical", widths, 3.0, [1.0] * 3, 16, {**p.hsae, "oracle_init": True}).d_sae == cfg.d_sae


def test_level_budgets_cut_deeper_levels_more_below_the_true_l0():
    bench = _bench()
    true = [1.25, 1.2, 1.15]
    assert bench.level_budgets(true, 3.6) == pytest.approx(true)
    assert bench.level_budgets(true, 7.2) == pytest.approx([2 * x for x in true])
    low = bench.level_budgets(true, 2.4)
    assert sum(low) == pytest.approx(2.4)
    shares = [k / t for k, t in zip(low, true)]
    assert shares[0] > shares[1] > shares[2]  # roots keep the most of their budget


def test_step_costs_time_aux_k_on_dead_latents_and_report_it(monkeypatch):
    """The realistic-width step cost is measured twice, the second time with a fifth of the
    latents dead (aux-k runs, as in training), and both ratios reach the report."""
    bench = _bench()
    seen = []

    def fake_cost(sae, d, batch, device, n=20, dead_frac=0.0):
        seen.append((type(sae).__name__, dead_frac))
        # a stand-in for the clock: the HSAE 10% slower alive, 20% with dead latents
        slow = 1.0 if "Hierarchical" not in type(sae).__name__ else (1.2 if dead_frac else 1.1)
        return {"sec_per_step": slow * (2.0 if dead_frac else 1.0), "peak_mem_mb": 1.0}

    monkeypatch.setattr(bench, "WIDE_STEP", dict(d=16, widths=[2, 4, 8], level_l0=[1.0, 1.5, 2.0],
                                                 batch=8, n_free=6, free_l0_share=0.1))
    monkeypatch.setattr(bench, "step_cost", fake_cost)
    costs = bench.step_costs(bench.PROFILES["quick"], ["hierarchical", "batchtopk"], rounds=2, wide=True)
    assert {f for _, f in seen} == {0.0, bench.DEAD_FRAC} and len(seen) == 8
    assert costs["hierarchical"]["step_ratio_vs_batchtopk"] == pytest.approx(1.1)
    assert costs["hierarchical"]["step_ratio_dead_vs_batchtopk"] == pytest.approx(1.2)
    md = bench._wide_table({"step_cost_wide": costs, "step_cost_wide_shape": bench.WIDE_STEP})
    assert "20% of latents dead" in md and "| hierarchical | 1100.0 | 1.10 | 2400.0 | 1.20 |" in md
