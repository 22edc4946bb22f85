"""Smoke test of benchmarks/lm_hierarchy.py at tiny size: all four contestants trained from one
model pass, evaluated, tabulated. A tiny random model and made-up text stand in for the offline
LMs and Shakespeare (the pipeline, not the quality)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from lm_builders import documents, tiny_lm

from sae_lens_hierarchical import main_job

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("lm_hierarchy", ROOT / "benchmarks" / "lm_hierarchy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lm_hierarchy"] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def test_profiles_cover_the_offline_and_hub_models():
    bench = load_benchmark()
    cpu = {(r.model, r.hook) for r in bench.PROFILES["cpu"].runs}
    assert cpu == {("smollm2-135m", "blocks.3.hook_resid_post"), ("gemma-3-270m", "blocks.6.hook_resid_post")}
    gpu = {(r.model, r.hook) for r in bench.PROFILES["gpu"].runs}
    assert gpu == {("gpt2", "blocks.8.hook_resid_pre"), ("gemma-2-2b", "blocks.12.hook_resid_post"),
                   ("gemma-2-2b", "blocks.19.hook_resid_post")}
    assert bench.CONTESTANTS == ["hierarchical", "batchtopk", "matryoshka_batchtopk", "topk"]


def test_tiny_run_trains_evaluates_and_tabulates_every_contestant(tmp_path):
    bench = load_benchmark()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_lm(tmp_path / "tok", d_model=16, n_layers=2, n_ctx=16, name="tiny-bench")
        train, held = main_job.split_texts(documents(6), 3)
        data = (main_job.pack(model, train, 16), main_job.pack(model, held, 16))
        run = bench.Run("tiny-bench", "blocks.1.hook_resid_post", [2, 4, 8], [1.0, 1.0, 1.0], tokens=1536,
                        context_size=16, batch_tokens=128, lr=3e-3, dead_feature_window=5, norm_batches=2,
                        eval_prompts=8, eval_batch_prompts=4, core_recon_batches=1, core_sparsity_batches=2,
                        path_latents=1)
        res = bench.run_one(run, bench.Profile(runs=[run]), tmp_path / "work", bench.CONTESTANTS,
                            model=model, data=data)
    finally:
        torch.set_num_threads(before)
    names = [r["contestant"] for r in res["rows"]]
    assert names == ["hsae", "batchtopk", "matryoshka", "topk"]
    assert all(v == "ok" for v in res["status"].values()) and set(res["status"]) == {
        "core", "hierarchy", "levelwise", "path_attribution"}
    for row in res["rows"]:
        for key in ("core_l0", "core_explained_variance", "hierarchy_hierarchical_consistency_score",
                    "sec_per_step"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["contestant"], key)
    assert res["rows"][0]["hierarchy_tree_source"] == "native"
    assert {r["hierarchy_tree_source"] for r in res["rows"][1:]} == {"posthoc"}
    assert res["rows"][1]["step_ratio_vs_batchtopk"] == pytest.approx(1.0)
    md = bench.markdown({"meta": {"profile": "tiny", "command": "x", "machine": main_job.machine_info(),
                                  "load_average": {"start": None, "end": None}, "wall_s": 1.0, "date": "today"},
                         "results": [res]})
    assert "## tiny-bench, `blocks.1.hook_resid_post`" in md
    for name in names:
        assert f"| {name} |" in md


def test_lm_seeds_reports_mean_and_sd_per_setting(tmp_path):
    import importlib.util
    import json as _json
    import sys as _sys
    from pathlib import Path as _Path

    root = _Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("lm_seeds", root / "benchmarks" / "lm_seeds.py")
    mod = importlib.util.module_from_spec(spec)
    _sys.modules["lm_seeds"] = mod
    spec.loader.exec_module(mod)
    files = []
    for seed, ce in ((1, 0.90), (2, 0.92), (3, 0.94)):
        row = {"contestant": "hsae", "core_ce_loss_score": ce, "core_kl_div_score": 0.8,
               "core_explained_variance": 0.85, "core_frac_alive": 0.5,
               "hierarchy_hierarchical_consistency_score": 0.6}
        f = tmp_path / f"s{seed}.json"
        f.write_text(_json.dumps({"meta": {"command": f"run {seed}"}, "results": [{"rows": [row]}]}))
        files.append(str(f))
    out = tmp_path / "seeds.md"
    assert mod.main([f"base={','.join(files)}", "--out", str(out)]) == 0
    md = out.read_text()
    assert "| base | hsae | 3 | 0.920 ± 0.020 | 0.800 ± 0.000 |" in md
    assert "`run 2`" in md
