"""The main job (`hsae demo`) end to end at tiny size: a random 2-layer model with a word-level
tokenizer and a few made-up documents stand in for SmolLM2 and Shakespeare, so the run takes
seconds. Checked: the report folder's files and what they say, not the SAEs' quality.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from lm_builders import WORDS, documents, tiny_lm
from sae_lens_hierarchical import cli, main_job

N_DOCS, CTX = 6, 16


def tiny_model(tmp: Path):
    return tiny_lm(tmp, d_model=16, n_layers=2, n_ctx=CTX, name="tiny-demo")


def tiny_config(out: Path, **kw) -> main_job.DemoConfig:
    base = dict(
        out=str(out), model="tiny-demo", layer=1, heldout_every=3, context_size=CTX, tokens=2048,
        batch_tokens=128, lr=3e-3, n_roots=2, branching=[2, 2], k_per_level=[1, 1, 1], n_free=4, k_free=1.0,
        dead_feature_window=5, norm_batches=2, eval_prompts=8, eval_batch_prompts=4,
        core_recon_batches=1, core_sparsity_batches=2, path_latents=1, full_report=False,
        tree_prompts=8, tree_roots=2, tree_children=2, tree_grandchildren=1, snippets=2, seed=0,
    )
    base.update(kw)
    return main_job.DemoConfig(**base)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("demo")
        model = tiny_model(tmp / "tok")
        out = main_job.run_demo(tiny_config(tmp / "report"), model=model, texts=documents(N_DOCS),
                                command="hsae demo --test")
        yield out
    finally:
        torch.set_num_threads(before)


def test_report_folder_has_every_file(demo_out):
    for name in ("hsae", "batchtopk"):
        for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
            assert (demo_out / "saes" / name / f).is_file(), (name, f)
    assert (demo_out / "saes" / "runner_cfg.json").is_file()
    for f in ("summary.md", "tree.md", "results.json"):
        assert (demo_out / f).is_file(), f
    pngs = {p.name for p in (demo_out / "plots").glob("*.png")}
    assert {"summary_per_level_l0.png", "summary_per_level_prefix_ev.png", "summary_ev_vs_l0.png"} <= pngs
    for png in (demo_out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for ev in ("core", "hierarchy", "levelwise", "path_attribution"):
        files = sorted((demo_out / "evals" / ev).glob("*_eval_results.json"))
        assert len(files) == 2, (ev, files)


def test_saes_reload_at_matched_width_and_l0(demo_out):
    from sae_lens import SAE

    hsae = SAE.load_from_disk(str(demo_out / "saes" / "hsae"))
    flat = SAE.load_from_disk(str(demo_out / "saes" / "batchtopk"))
    assert type(hsae).__name__ == "HierarchicalSAE"
    assert hsae.cfg.level_widths == [2, 4, 8]
    assert hsae.cfg.d_sae == flat.cfg.d_sae == 18 and hsae.cfg.n_free == 4  # 14 in the tree + 4 free
    assert sum(hsae.cfg.k_per_level) + hsae.cfg.k_free == 4
    runner = json.loads((demo_out / "saes" / "runner_cfg.json").read_text())
    assert runner["saes"]["batchtopk"]["k"] == 4
    assert hsae.cfg.metadata.hook_name == flat.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(5, 16)
    assert hsae.decode(hsae.encode(x)).shape == (5, 16)


def test_summary_has_command_machine_times_and_both_columns(demo_out):
    md = (demo_out / "summary.md").read_text()
    assert "hsae demo --test" in md
    assert "| metric | hsae | batchtopk |" in md
    for row in ("| L0 |", "| explained variance (SAE-Bench) |", "| CE loss score |",
                "| hierarchical consistency (HCS) |", "| roots-only explained variance |"):
        assert row in md, row
    assert "load average" in md and "cores" in md
    assert "| train |" in md and "| total |" in md
    assert "![" in md and "plots/summary_ev_vs_l0.png" in md
    data = json.loads((demo_out / "results.json").read_text())
    assert data["machine"]["cores"] >= 1
    assert data["timings_s"]["total"] > 0
    assert set(data["status"]) == {"core", "hierarchy", "levelwise", "path_attribution"}
    assert all(v == "ok" for v in data["status"].values())
    for name in ("hsae", "batchtopk"):
        core = data["metrics"][name]["core"]
        assert math.isfinite(core["l0"]) and math.isfinite(core["explained_variance"])
    # The HSAE is scored on its own tree, the flat SAE on its post-hoc one.
    assert data["metrics"]["hsae"]["hierarchy"]["tree_source"] == "native"
    assert data["metrics"]["batchtopk"]["hierarchy"]["tree_source"] == "posthoc"
    rows = data["levels"]["hsae"]["levelwise"]
    assert [(r["level"], r["free_latents"]) for r in rows] == [(0, False), (1, False), (2, False), (3, True)]
    assert rows[3]["n_latents"] == 4 and data["metrics"]["hsae"]["levelwise"]["n_levels"] == 3


def test_tree_md_lists_roots_children_and_marked_snippets(demo_out):
    md = (demo_out / "tree.md").read_text()
    assert md.startswith("# The learned tree")
    assert "## 1. Root " in md
    assert "«" in md and "»" in md  # a marked token in a snippet
    data = json.loads((demo_out / "results.json").read_text())
    tree = data["tree"]
    assert 1 <= len(tree) <= 2
    for root in tree:
        assert root["level"] == 0 and 0 < root["frequency"] <= 1
        assert root["snippets"], root
        text, value = root["snippets"][0]
        assert "«" in text and value > 0
        words = text.replace("«", " ").replace("»", " ").split()
        assert set(words) <= set(WORDS) | {"<eos>"}  # decoded text, not token ids
        for child in root["children"]:
            assert child["level"] == 1
            assert child["index"] in range(2 + 2 * root["index"], 2 + 2 * root["index"] + 2)
            assert f"**{root['index']} › {child['index']}**" in md


def test_split_texts_holds_out_every_nth_document():
    docs = [f"doc{i}" for i in range(10)]
    train, held = main_job.split_texts(docs, 5)
    assert held == ["doc4", "doc9"] and len(train) == 8
    train, held = main_job.split_texts(["x" * 100], 10)
    assert len(train[0]) == 90 and len(held[0]) == 10


def test_sae_configs_match_width_and_l0():
    cfgs = main_job.sae_configs(32, [4, 16, 64], [2, 3, 4], main_job.CONTESTANTS)
    assert list(cfgs) == ["hsae", "batchtopk", "matryoshka", "topk"]
    assert {c.d_sae for c in cfgs.values()} == {84}
    assert cfgs["batchtopk"].k == 9 and cfgs["topk"].k == 9 and cfgs["matryoshka"].k == 9
    assert cfgs["matryoshka"].matryoshka_widths == [4, 20, 84]
    assert cfgs["hsae"].level_widths == [4, 16, 64]
    fast = main_job.sae_configs(32, [4, 16, 64], [2, 3, 4], main_job.CONTESTANTS, threshold_lr=0.05)
    assert [fast[n].topk_threshold_lr for n in ("hsae", "batchtopk", "matryoshka")] == [0.05] * 3
    assert cfgs["batchtopk"].topk_threshold_lr == 0.01  # SAELens's default unless asked


def test_demo_cli_parses_and_refuses_bad_levels(capsys):
    rc = cli.main(["demo", "--branching", "4,4", "--k", "4,8", "--out", "unused"])
    assert rc == 2
    assert "--k has 2 values" in capsys.readouterr().err
    # k/width must fall with depth: 16/64 < 64/256 does not.
    rc = cli.main(["demo", "--k", "16,64,4", "--out", "unused"])
    assert rc == 2
    assert "k_per_level" in capsys.readouterr().err


def test_demo_hsae_options_reach_the_config_and_bad_ones_are_named(capsys):
    import argparse

    from sae_lens_hierarchical import main_job

    parser = main_job.add_parser(argparse.ArgumentParser().add_subparsers())
    cfg = main_job.config_from_args(parser.parse_args(["--hsae", "reseat_every=50", "--hsae", "kl_coefficient=0"]))
    assert cfg.hsae_options == {"reseat_every": 50, "kl_coefficient": 0}
    hsae_cfg = main_job.sae_configs(64, cfg.level_widths, cfg.k_per_level, cfg.contestants, cfg.hsae_options)["hsae"]
    assert hsae_cfg.reseat_every == 50 and hsae_cfg.kl_coefficient == 0
    assert cli.main(["demo", "--hsae", "reseat_evry=3", "--out", "unused"]) == 2
    assert "did you mean 'reseat_every'" in capsys.readouterr().err
    assert cli.main(["demo", "--hsae", "reseat_every", "--out", "unused"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["demo", "--hsae", "reseat_every=1", "--out", "unused"]) == 2
    assert "reseat_every=1 is invalid" in capsys.readouterr().err


def test_demo_free_latent_flags(capsys):
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    p = main_job.add_parser(sub)
    cfg = main_job.config_from_args(p.parse_args([]))
    assert (cfg.n_free, cfg.k_free, cfg.d_sae, cfg.l0) == (336, 2.4, 1680, 26.4)
    tree_only = main_job.config_from_args(p.parse_args(["--n-free", "0"]))
    assert (tree_only.k_free, tree_only.d_sae, tree_only.l0) == (0.0, 1344, 24.0)
    rc = cli.main(["demo", "--n-free", "0", "--k-free", "2", "--out", "unused"])
    assert rc == 2 and "--k-free 2 needs --n-free > 0" in capsys.readouterr().err
    rc = cli.main(["demo", "--n-free", "8", "--k-free", "9", "--out", "unused"])
    assert rc == 2 and "k_free=9.0 is invalid" in capsys.readouterr().err
