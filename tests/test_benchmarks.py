"""The synthetic benchmark (benchmarks/synthetic_hierarchy.py): its protocol (no contestant sees
the answer), its results files, and the `quick` profile end to end (the pipeline, not the quality)."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("synthetic_hierarchy", ROOT / "benchmarks" / "synthetic_hierarchy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while being built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--profile quick` run (about a minute and a half on one core), shared by the tests below."""
    out = tmp_path_factory.mktemp("quick")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "synthetic_hierarchy.py"), "--quick", "--jobs", "1", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "synthetic_quick.json").read_text()), (out / "synthetic_quick.md").read_text(), proc.stdout


def test_quick_profile_writes_every_metric_for_every_contestant_at_both_l0s(quick_run):
    data, md, stdout = quick_run
    rows = data["rows"]
    assert {r["contestant"] for r in rows} == {"hierarchical", "hierarchical (truth's shape)", "batchtopk",
                                               "matryoshka_batchtopk", "topk", "standard"}
    assert sorted({r["l0_factor"] for r in rows}) == [1.0, 1.6] and len(rows) == 12
    for r in rows:
        for key in ("f1", "mcc", "edge_recall", "absorption_gap", "explained_variance", "l0", "dead",
                    "p_parent_given_child", "p_child_given_parent", "hamming", "mcc_level_0",
                    "sec_per_step", "step_ratio_vs_batchtopk"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (r["contestant"], key)
        assert 0 <= r["mcc"] <= 1 and 0 <= r["edge_recall"] <= 1
        assert r["tree"] == ("native" if r["contestant"].startswith("hierarchical") else "post-hoc")
    hsae = [r for r in rows if r["contestant"] == "hierarchical"]
    assert all(r["tree_edges"] > 0 for r in hsae)  # the default tree was learned (every 100 steps)
    assert all(len(r["level_l0"]) == 3 and abs(sum(r["level_l0"]) - r["l0"]) < 0.05 for r in hsae)
    assert "| hierarchical (n=1) |" in md and "| hierarchical (truth's shape) (n=1) |" in md
    assert "### Targets (`hierarchical`" in md and "### Targets" in stdout


def test_no_hsae_setting_comes_from_the_truth(quick_run):
    """k is the flat contestants' k at every L0; the generic HSAE is the library's default config
    on the 1:4:16 split of the width (only the truth's-shape row has the truth's levels)."""
    from sae_lens_hierarchical import HierarchicalTrainingSAEConfig

    bench = _bench()
    data, _, _ = quick_run
    p = bench.PROFILES["quick"]
    for factor in (1.0, 1.6):
        by = {r["contestant"]: r for r in data["rows"] if r["l0_factor"] == factor}
        k = by["batchtopk"]["config"]["k"]
        assert by["matryoshka_batchtopk"]["config"]["k"] == k
        assert {r["d_sae"] for r in by.values()} == {p.d_sae}
        hsae, shaped = by["hierarchical"]["config"], by["hierarchical (truth's shape)"]["config"]
        assert hsae["k"] == shaped["k"] == k and hsae["k_per_level"] is None
        assert hsae["level_widths"] == bench.generic_level_widths(p.d_sae) == [3, 11, 46]
        assert shaped["level_widths"] == bench.truth_shape_widths(p) == [4, 12, 44]
        default = HierarchicalTrainingSAEConfig(d_in=p.hidden_dim, d_sae=p.d_sae, level_widths=[3, 11, 46], k=k)
        assert hsae == json.loads(json.dumps(default.to_dict(), default=str))  # nothing else set
        assert abs(k - round(by["batchtopk"]["true_l0"] * factor, 2)) < 0.1 * k  # the truth's L0 x the factor


def test_results_metadata_reproduces_the_run(quick_run):
    bench = _bench()
    meta = quick_run[0]["meta"]
    assert meta["profile_name"] == "quick"
    assert meta["profile"] == json.loads(json.dumps(dataclasses.asdict(bench.PROFILES["quick"])))
    assert meta["profile"]["training_samples"] == 60_000 and meta["seeds"] == [0]
    assert meta["command"].startswith("python benchmarks/synthetic_hierarchy.py --quick --jobs 1 --out ")
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", meta["commit"]), meta["commit"]
    assert meta["hsae_overrides"] == {} and meta["ablations"] == {}


def test_generic_tree_depends_on_the_width_alone():
    bench = _bench()
    assert bench.generic_level_widths(21) == [1, 4, 16]
    assert bench.generic_level_widths(192) == [9, 37, 146]
    assert bench.generic_level_widths(4096) == [195, 780, 3121]
    for d in (3, 60, 1000, 16_384):
        assert sum(bench.generic_level_widths(d)) == d
    with pytest.raises(ValueError, match="too small"):
        bench.generic_level_widths(2)


def test_gpu_profile_builds_the_published_synthsaebench_16k_world():
    """The GPU anchor (SynthSAEBench-16k) is built offline from its published config; its
    orthogonalisation takes an hour on a CPU, so only the config and the SAE configs are checked."""
    bench = _bench()
    p = bench.PROFILES["gpu"]
    cfg = bench.synthetic_model_cfg(p, seed=0)
    assert (cfg.num_features, cfg.hidden_dim) == (16_384, 768)
    h = cfg.hierarchy
    assert (h.total_root_nodes, h.branching_factor, h.max_depth) == (128, 4, 3)
    assert h.scale_children_by_parent and h.mutually_exclusive_portion == 1.0
    assert cfg.correlation.rank == 25 and cfg.bias == 0.5 and cfg.seed == 42
    assert 128 * 85 + p.n_outside == cfg.num_features  # 128 roots x (1 + 4 + 16 + 64), the rest outside
    hsae = bench.sae_cfg(p, "hierarchical", 34.8)
    flat = bench.sae_cfg(p, "batchtopk", 34.8)
    assert hsae.d_sae == flat.d_sae == 4096 and hsae.k == flat.k == 34.8
    assert hsae.level_widths == [195, 780, 3121] and hsae.k_per_level is None
    assert bench.sae_cfg(p, "hierarchical_truth_shape", 34.8).level_widths == [128, 512, 3456]
    assert bench.sae_cfg(p, "matryoshka_batchtopk", 34.8).matryoshka_widths == [195, 975, 4096]


def test_anchor4k_profile_is_the_16k_generator_at_a_quarter_of_the_size():
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
    assert bench.sae_cfg(p, "hierarchical", 16.0).level_widths == [49, 195, 780]
    assert bench.truth_shape_widths(p) == [32, 128, 864]


def test_default_profile_runs_both_l0s_on_three_seeds():
    p = _bench().PROFILES["default"]
    assert tuple(p.l0_factors) == (1.0, 1.6) and tuple(p.seeds) == (0, 1, 2) and p.d_sae == 192


def test_hsae_and_ablation_fields_are_checked_before_any_training(capsys):
    bench = _bench()
    cases = [(["--hsae", "n_free=8"], "removed in 0.2"),
             (["--hsae", "k=3"], "the same for every contestant"),
             (["--ablation", "x:l2_coeficient=0.2"], "did you mean 'l2_coefficient'"),
             (["--ablation", "x:gate=soft"], "expected one of 'none', 'hard'"),
             (["--ablation", "nokeys"], "expected NAME:KEY=VALUE"),
             (["--ablation", "fixed:tree=fixed"], "a fixed tree needs each width to be a multiple")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            bench.main(["--profile", "quick", *extra])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, extra
    name, fields = bench.parse_ablation("per-level:k_per_level=[1,2,3],allow_nonincreasing_sparsity=true")
    assert name == "hierarchical[per-level]" and fields["k_per_level"] == [1, 2, 3]
    cfg = bench.hsae_config(16, 60, 6.0, [3, 11, 46], fields)  # k_per_level: proportions of k
    assert cfg.k_per_level == pytest.approx([1.0, 2.0, 3.0]) and cfg.k == 6.0


def test_a_synthsaebench_world_is_built_once_then_loaded_from_the_cache(tmp_path):
    """SAELens's save / load_from_disk round trip: the loaded world samples exactly what the
    built one does; another config gets its own entry; no half-written entry is left."""
    bench = _bench()
    p = bench.Profile(n_roots=2, branching=2, n_outside=5, hidden_dim=8, depth=3, world="synthsaebench",
                      d_sae=40, training_samples=1_024, seeds=(0,), world_cache=str(tmp_path))
    built = bench.build_world(p, seed=0)
    assert [d.name.startswith("synthsaebench_") for d in tmp_path.iterdir()] == [True]
    loaded = bench.build_world(p, seed=1)  # one world for every SAE seed
    assert torch.equal(built.feature_dict.feature_vectors, loaded.feature_dict.feature_vectors)
    torch.manual_seed(3)
    a = built.sample(256)
    torch.manual_seed(3)
    assert torch.equal(a, loaded.sample(256))
    assert bench.truth_l0(built, n=2_000) == bench.truth_l0(loaded, n=2_000)  # seeded: every process agrees
    p.hidden_dim = 12
    assert bench.build_world(p, seed=0).cfg.hidden_dim == 12
    assert len(list(tmp_path.iterdir())) == 2 and not list(tmp_path.glob(".*"))


def _fake_results(bench, seeds, factor_rows, command="python benchmarks/synthetic_hierarchy.py --profile default"):
    rows = [{"contestant": c, "seed": s, "l0_factor": f, "k": 5.0 * f, "d_sae": 192, "f1": f1 + s / 100}
            for s in seeds for f, c, f1 in factor_rows]
    meta = {"profile_name": "default", "profile": json.loads(json.dumps(dataclasses.asdict(bench.PROFILES["default"]))),
            "seeds": list(seeds), "command": command, "commit": "a" * 40, "machine": "m", "date": "d", "wall_seconds": 60}
    meta["profile"]["seeds"] = list(seeds)
    return {"meta": meta, "rows": rows}


def test_merge_combines_one_seed_result_files_into_one_report(tmp_path):
    """One seed per command, then one table: the merged file holds every row, the union of the
    seeds and each source's command and commit; files of different profiles are refused."""
    bench = _bench()
    spec = [(1.0, "hierarchical", 0.5), (1.0, "batchtopk", 0.4), (1.6, "hierarchical", 0.6)]
    parts = []
    for i, seeds in enumerate(([0], [1, 2])):
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(_fake_results(bench, seeds, spec, command=f"cmd {i}")))
    assert bench.main(["--merge", *map(str, parts), "--out", str(tmp_path), "--tag", "merged"]) == 0
    merged = json.loads((tmp_path / "synthetic_default_merged.json").read_text())
    assert len(merged["rows"]) == 9 and merged["meta"]["seeds"] == [0, 1, 2]
    assert merged["meta"]["profile"]["seeds"] == [0, 1, 2]
    assert [s["command"] for s in merged["meta"]["sources"]] == ["cmd 0", "cmd 1"]
    assert merged["meta"]["sources"][1]["seeds"] == [1, 2] and merged["meta"]["commit"] == "a" * 40
    md = (tmp_path / "synthetic_default_merged.md").read_text()
    assert f"| hierarchical (n=3) | {bench._fmt([0.5, 0.51, 0.52])} |" in md and "cmd 1" in md
    other = _fake_results(bench, [3], spec)
    other["meta"]["profile"]["training_samples"] = 5
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different profiles"):
        bench.main(["--merge", str(parts[0]), str(tmp_path / "other.json"), "--out", str(tmp_path)])
    old = {"meta": {"profile": "default", "command": "x"}, "rows": []}  # a 0.1 results file
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="0.1 benchmark"):
        bench.main(["--merge", str(parts[0]), str(tmp_path / "old.json"), "--out", str(tmp_path)])


def test_targets_check_compares_the_generic_hsae_at_every_l0():
    bench = _bench()

    def row(c, f, **m):
        base = dict(f1=0.5, mcc=0.5, edge_recall=0.2, absorption_gap=0.01, explained_variance=0.9)
        return {"contestant": c, "l0_factor": f, "seed": 0, **{**base, **m}}

    rows = [row("hierarchical", f, f1=0.6, mcc=0.6, edge_recall=0.5, explained_variance=0.89) for f in (1.0, 1.6)]
    rows += [row(c, f) for c in ("batchtopk", "matryoshka_batchtopk") for f in (1.0, 1.6)]
    checks, ok = bench.targets_check(rows)
    assert ok and len(checks) == 10 and {c["l0_factor"] for c in checks} == {1.0, 1.6}
    rows[1] = row("hierarchical", 1.6, f1=0.6, mcc=0.6, edge_recall=0.5, explained_variance=0.85, absorption_gap=0.05)
    checks, ok = bench.targets_check(rows)
    assert not ok
    failed = {(c["l0_factor"], c["target"]) for c in checks if not c["ok"]}
    assert failed == {(1.6, "absorption_gap <= 0.02"), (1.6, "explained_variance >= BatchTopK's - 0.02")}
    # a truth's-shape row that beats everything does not count for the generic HSAE
    rows = [r for r in rows if r["contestant"] != "hierarchical"] + [row("hierarchical (truth's shape)", 1.0, f1=1.0)]
    assert not bench.targets_check(rows)[1]
    assert "NOT all met" in bench.targets_markdown(rows)


def test_step_costs_interleave_the_contestants_and_keep_the_fastest_round(monkeypatch):
    bench = _bench()
    p = bench.PROFILES["quick"]
    clock = iter([3.0, 2.0, 1.0, 2.0])  # round 1: hsae 3 s, batchtopk 2 s; round 2: 1 s, 2 s
    seen = []

    def fake_cost(sae, d, batch, device, n=20):
        seen.append(type(sae).__name__)
        return {"sec_per_step": next(clock)}

    real_cost = bench.step_cost
    monkeypatch.setattr(bench, "step_cost", fake_cost)
    cfgs = {"hierarchical": bench.sae_cfg(p, "hierarchical", 2.0), "batchtopk": bench.sae_cfg(p, "batchtopk", 2.0)}
    costs = bench.step_costs(cfgs, batch=8, device="cpu", rounds=2)
    assert seen == ["HierarchicalTrainingSAE", "BatchTopKTrainingSAE"] * 2
    assert costs["hierarchical"]["sec_per_step"] == 1.0
    assert costs["hierarchical"]["step_ratio_vs_batchtopk"] == pytest.approx(0.5)
    real = real_cost(bench.get_sae_training_class("hierarchical")[0](cfgs["hierarchical"]), 24, 16, "cpu", n=2)
    assert real["sec_per_step"] > 0


def test_a_deeper_truth_than_the_hsae_runs_end_to_end():
    """A 4-level truth (depth 3, as SynthSAEBench): the GPU profile's code paths on a world small
    enough for CI; every contestant at the same width and the truth's L0."""
    bench = _bench()
    p = bench.Profile(n_roots=3, branching=2, n_outside=6, hidden_dim=16, depth=3, d_sae=32,
                      training_samples=8_192, eval_samples=2_000, batch_size=512, seeds=(0,), l0_factors=(1.0,))
    rows = {c: bench.run_one(p, c, 0, 1.0) for c in ("hierarchical", "batchtopk")}
    assert rows["hierarchical"]["d_sae"] == rows["batchtopk"]["d_sae"] == 32
    assert rows["hierarchical"]["widths"] == bench.generic_level_widths(32)
    assert rows["hierarchical"]["k"] == rows["batchtopk"]["k"]
    for r in rows.values():
        assert abs(r["l0"] - r["k"]) < 0.5, (r["l0"], r["k"])
        assert 0 <= r["mcc"] <= 1 and math.isfinite(r["explained_variance"])
        assert "mcc_level_3" in r  # the truth's fourth level is scored too
