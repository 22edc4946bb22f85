"""Each script in examples/ runs at --tiny size in a fresh process and prints what it promises."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["train_synthetic.py", "train_transformerlens.py", "walk_tree.py"]
# One intra-op thread: on a small shared CPU, torch's default thread pool makes these tiny
# steps tens of times slower under contention (spinning threads), not faster.
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FLOAT = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def run_example(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def value(out: str, name: str) -> float:
    m = re.search(rf"^\s*{re.escape(name)}:\s+{FLOAT}\s*$", out, re.M)
    assert m, f"no '{name}: <number>' line in:\n{out}"
    return float(m.group(1))


def saved_path(out: str) -> Path:
    lines = [ln for ln in out.splitlines() if ln.startswith("Saved SAE to: ")]
    assert len(lines) == 1, out
    path = Path(lines[0].removeprefix("Saved SAE to: ").strip())
    assert (path / "cfg.json").exists() and (path / "sae_weights.safetensors").exists()
    assert json.loads((path / "cfg.json").read_text())["architecture"] == "hierarchical"
    return path


def tree_lines(out: str, depth: int, name: str) -> list[re.Match]:
    pat = re.compile(rf"^{' ' * 4 * depth}{name} (\d+)  freq {FLOAT}  \|W_dec\| {FLOAT}"
                     rf"(?:  cos\(parent\) ([-+]\d+\.\d+))?$")
    return [m for m in map(pat.match, out.splitlines()) if m]


def check_tree(out: str, n_roots: int, shown_per_node: int) -> None:
    roots = tree_lines(out, 0, "root")
    children = tree_lines(out, 1, "child")
    grandchildren = tree_lines(out, 2, "grandchild")
    assert len(roots) == n_roots, out
    assert len(children) == n_roots * shown_per_node
    assert len(grandchildren) == n_roots * shown_per_node ** 2
    for m in roots + children + grandchildren:
        assert 0.0 <= float(m.group(2)) <= 1.0  # a frequency
    for m in children + grandchildren:
        assert -1.0 <= float(m.group(4)) <= 1.0  # a cosine
    # path(leaf) walks from one of the printed roots down three levels.
    m = re.search(r"^path\((\d+)\) = \[(\d+), (\d+), (\d+)\]  \(levels \[0, 1, 2\]\)$", out, re.M)
    assert m, out
    leaf, root, mid, last = map(int, m.groups())
    assert last == leaf and root in {int(r.group(1)) for r in roots}
    assert mid in {int(c.group(1)) for c in children}


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_has_docstring_tiny_and_out(script):
    source = (EXAMPLES / script).read_text()
    doc = ast.get_docstring(ast.parse(source))
    assert doc and len(doc.splitlines()) > 3
    assert 'add_argument("--tiny"' in source and 'add_argument("--out"' in source


def test_train_synthetic_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_example("train_synthetic.py", "--tiny", "--out", str(tmp_path / "synth"), cwd=tmp_path)
    assert 0.0 < value(out, "mcc") <= 1.0
    assert value(out, "explained_variance") <= 1.0
    # batchtopk with k = [1, 2, 3]: on average at most 6 active latents per input
    assert 0.0 < value(out, "sae_l0") <= 6.0 + 1e-6
    assert value(out, "true_l0") > 0.0
    assert value(out, "dead_latents") >= 0
    per_level = re.search(rf"mcc per level:\s+L0={FLOAT}\s+L1={FLOAT}\s+L2={FLOAT}", out)
    assert per_level and all(0.0 <= float(v) <= 1.0 for v in per_level.groups())
    path = saved_path(out)
    assert path == (tmp_path / "synth").resolve()
    assert (path / "eval_stats.json").exists()


def test_train_transformerlens_tiny_then_walk_its_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_example("train_transformerlens.py", "--tiny", "--out", str(tmp_path / "lm"), cwd=tmp_path)
    assert "reloaded HierarchicalSAE from disk" in out
    assert value(out, "explained_variance") <= 1.0
    l0 = re.search(rf"l0 per level:\s+L0={FLOAT}\s+L1={FLOAT}\s+L2={FLOAT}", out)
    assert l0 and float(l0.group(1)) > 0.0
    path = saved_path(out)
    assert path == (tmp_path / "lm").resolve()
    assert (path / "sparsity.safetensors").exists() and (path / "runner_cfg.json").exists()

    # The walk of an LM run reads its frequencies from sparsity.safetensors.
    tree = run_example("walk_tree.py", str(path), "--n-roots", "2", "--max-children", "2", cwd=tmp_path)
    assert "training-time densities (sparsity.safetensors)" in tree
    check_tree(tree, n_roots=2, shown_per_node=2)


def test_walk_tree_tiny_trains_then_walks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_example("walk_tree.py", "--tiny", "--out", str(tmp_path / "walk"), "--n-roots", "3",
                      cwd=tmp_path)
    assert (tmp_path / "walk" / "cfg.json").exists()
    assert (tmp_path / "walk" / "sae_weights.safetensors").exists()
    assert "HierarchicalSAE at" in out and "widths [4, 12, 36]" in out
    assert "fresh samples of the run's synthetic model" in out
    assert "active latents whose parent is off: 0" in out  # the hard gate
    check_tree(out, n_roots=3, shown_per_node=3)  # branching 3, all children shown
