"""Smoke test of the synthetic benchmark's `--quick` profile: the pipeline, not the quality."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
