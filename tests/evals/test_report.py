"""Results that SAE-Bench's graphing utilities load and plot, the comparison report, and `hsae eval`.

* SAE-Bench's own `get_eval_results` / `get_core_results` / `plot_results` read the stock-eval
  results of hierarchical SAEs as they read any other SAE's;
* `reporting.load_eval_results` gives exactly SAE-Bench's record for a core file, and also reads
  the plugin files (which SAE-Bench's loader refuses: it knows only its own evals), and
  SAE-Bench's `plot_2var_graph` plots them;
* `build_report` writes report.md whose image links resolve;
* `hsae eval` runs the plugin and stock evals over saved SAE folders and writes the report.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import CTX, WORDS, load_json, nested_flat_sae, perfect_hsae, write_bias_in_bios

from sae_lens_hierarchical import cli, reporting
from sae_lens_hierarchical.evals import run_all


@pytest.fixture(scope="module")
def results(tiny_model, token_dataset, tmp_path_factory):
    """Plugin and stock results of a hierarchical and a flat SAE in SAE-Bench's layout."""
    root = tmp_path_factory.mktemp("results")
    data_root = write_bias_in_bios(tmp_path_factory.mktemp("probedata"))
    flat, _ = nested_flat_sae()
    settings = run_all.RunSettings(
        dataset_name="in-memory", context_size=CTX, n_eval_prompts=32, batch_size_prompts=16, core_batches=2,
        meta_structure_steps=10, probe_train_set_size=40, probe_test_set_size=20, probe_context_length=16,
        probe_k_values=(1, 2), probe_data_dir=str(data_root), path_n_latents=2,
    )
    status = run_all.run_all_evals(
        [("hsae", perfect_hsae()), ("flat", flat)], tiny_model, str(root / "eval_results"),
        evals=run_all.DEFAULT_EVALS, dataset=token_dataset, settings=settings,
    )
    return root / "eval_results", status


def test_every_default_eval_ran(results):
    out, status = results
    assert status == {e: "ok" for e in run_all.DEFAULT_EVALS}
    for e in run_all.DEFAULT_EVALS:
        files = sorted(os.listdir(out / e))
        assert "hsae_custom_sae_eval_results.json" in files and "flat_custom_sae_eval_results.json" in files, e


def test_saebench_graphing_loads_and_plots_stock_results_of_hsaes(results, tmp_path):
    from sae_bench.sae_bench_utils import graphing_utils as gu

    out, _ = results
    probe_files = sorted(glob.glob(str(out / "sparse_probing" / "*_eval_results.json")))
    core_files = sorted(glob.glob(str(out / "core" / "*_eval_results.json")))
    loaded = gu.get_eval_results(probe_files)
    assert loaded["hsae_custom_sae"]["sae_class"] == "hierarchical"
    assert loaded["flat_custom_sae"]["sae_class"] == "standard"
    assert 0 <= loaded["hsae_custom_sae"]["sae_top_1_test_accuracy"] <= 1
    core = gu.get_core_results(core_files)
    assert set(core) == {"hsae_custom_sae", "flat_custom_sae"} and core["hsae_custom_sae"]["l0"] > 0
    markers, colors = gu.update_trainer_markers_and_colors(loaded, gu.TRAINER_MARKERS, gu.TRAINER_COLORS)
    base = str(tmp_path / "probing")
    gu.plot_results(probe_files, core_files, "sparse_probing", base, k=1,
                    trainer_markers=markers, trainer_colors=colors)
    for suffix in ("_2var_sae_type.png", "_2var_dict_size.png"):
        assert os.path.getsize(base + suffix) > 1000


def test_plugin_results_load_in_saebench_format_and_plot(results, tmp_path):
    from sae_bench.sae_bench_utils import graphing_utils as gu

    out, _ = results
    core_file = str(out / "core" / "hsae_custom_sae_eval_results.json")
    ours, theirs = reporting.load_eval_results([core_file]), gu.get_eval_results([core_file])
    assert {k: v for k, v in ours["hsae_custom_sae"].items() if k in theirs["hsae_custom_sae"]} == theirs["hsae_custom_sae"]
    assert set(theirs["hsae_custom_sae"]) <= set(ours["hsae_custom_sae"])

    hier_files = sorted(glob.glob(str(out / "hierarchy" / "*_eval_results.json")))
    with pytest.raises(ValueError, match="add the correct key"):
        gu.get_eval_results(hier_files)  # SAE-Bench's loader knows only its own evals
    recs = reporting.load_eval_results(hier_files)
    assert recs["hsae_custom_sae"]["hierarchical_consistency_score"] == 1.0
    assert recs["hsae_custom_sae"]["tree_source"] == "native" and recs["flat_custom_sae"]["tree_source"] == "posthoc"
    # the level post-hoc block is a second metric category with its own (prefixed) names, so
    # flattening the categories into one record keeps both trees' numbers
    for key in ("hsae_custom_sae", "flat_custom_sae"):
        assert recs[key]["necessity"] is not None and "level_posthoc_necessity" in recs[key]
        assert "p_child_given_parent" in recs[key] and "level_posthoc_hamming_per_token" in recs[key]
    assert recs["hsae_custom_sae"]["necessity"] == 1.0
    assert recs["hsae_custom_sae"]["level_posthoc_level_widths"] == [4, 8, 16]
    assert recs["flat_custom_sae"]["level_posthoc_level_widths"] == [1, 2, 5]
    lw = reporting.load_eval_results(sorted(glob.glob(str(out / "levelwise" / "*_eval_results.json"))))
    assert lw["hsae_custom_sae"]["outside_tree_l0_share"] == 0.0
    core = gu.get_core_results(sorted(glob.glob(str(out / "core" / "*_eval_results.json"))))
    for key in recs:
        recs[key].update(core[key])
    png = str(tmp_path / "hcs.png")
    gu.plot_2var_graph(recs, "hierarchical_consistency_score", output_filename=png, return_fig=True)
    assert os.path.getsize(png) > 1000


def test_report_has_the_table_and_plots(results, tmp_path):
    out, status = results
    path = reporting.build_report(str(out), str(tmp_path / "report"), status=status)
    text = Path(path).read_text()
    assert "| hsae_custom_sae | hierarchical |" in text and "| flat_custom_sae | standard |" in text
    for header in ("HCS", "CE loss score", "probe top-1", "meta-SAE FVE", "root share (recon)"):
        assert header in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    names = {os.path.basename(p) for p in links}
    assert {"l0_vs_hierarchy_hierarchical_consistency_score.png", "l0_vs_core_ce_loss_score.png",
            "per_level_levelwise_l0.png", "per_level_hierarchy_hierarchical_consistency_score.png",
            "consistency_native_vs_posthoc.png", "hsae_custom_sae_path_attribution.png"} <= names
    for link in links:
        assert os.path.getsize(os.path.join(tmp_path / "report", link)) > 1000, link


def _saved_saes(tmp_path):
    hsae_dir, flat_dir = tmp_path / "hsae_run", tmp_path / "flat_run"
    perfect_hsae().save_model(hsae_dir)
    nested_flat_sae()[0].save_model(flat_dir)
    return hsae_dir, flat_dir


def test_hsae_eval_command_writes_the_report(tiny_model, tmp_path, monkeypatch, capsys):
    from sae_lens_hierarchical import models

    hsae_dir, flat_dir = _saved_saes(tmp_path)
    text_dir = tmp_path / "my_text_dataset"  # a local dataset folder with a text column
    text_dir.mkdir()
    rng = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (200,), generator=rng).tolist()) for _ in range(20)]
    pd.DataFrame({"text": docs}).to_parquet(text_dir / "train.parquet")
    probe_root = write_bias_in_bios(tmp_path / "probe_data")
    asked = []

    def load_model(name, device="cpu", dtype=torch.float32, **kw):
        asked.append(name)
        return tiny_model

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cmp"
    rc = cli.main([
        "eval", "--sae", f"hsae={hsae_dir}", "--sae", str(flat_dir), "--dataset", str(text_dir),
        "--output-dir", str(out), "--context-size", str(CTX), "--n-prompts", "16", "--batch-size", "8",
        "--core-batches", "2", "--meta-structure-steps", "10", "--probe-data-dir", str(probe_root),
        "--probe-train-size", "40", "--probe-test-size", "20", "--path-latents", "2", "--device", "cpu",
    ])
    assert rc == 0, capsys.readouterr().err
    assert asked == ["tiny-evals"]  # the SAEs' model_name, as no --model was given
    assert (out / "hierarchy" / "hsae_custom_sae_eval_results.json").exists()
    assert (out / "core" / "flat_run_custom_sae_eval_results.json").exists()  # named after its folder
    text = (out / "report.md").read_text()
    assert "| sparse_probing | ok |" in text and "hsae_custom_sae" in text and "flat_run_custom_sae" in text
    data = load_json(out / "levelwise" / "hsae_custom_sae_eval_results.json")
    assert data["eval_config"]["dataset_name"] == str(text_dir)
    assert data["eval_result_details"][0]["sparse_probing_top_1_test_accuracy"] is not None
    assert (out / "plots" / "consistency_native_vs_posthoc.png").exists()
    assert "Report:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["eval", "--output-dir", "x"], "no SAEs"),
    (["eval", "--sae", "missing_dir", "--output-dir", "x"], "not a directory"),
    (["eval", "--sae", "x", "--output-dir", "x", "--evals", "hierarchy,corre"], "did you mean 'core'"),
])
def test_hsae_eval_errors_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
