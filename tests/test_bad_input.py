"""Bad input never trains, overwrites or reports silently (each case reproduced from a hostile
first use: the silent ones first). Every error names the file / flag / field and the value,
exits 2 (usage) or 1 (fault) without a traceback, and happens before any model loads."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from builders import training_sae, warm_up
from safetensors.torch import load_file, save_file
from test_cli import lm_config, no_training, tiny_synthetic_config, write  # noqa: F401  (fixture)
from test_failure_modes import write_checkpoint

import sae_lens_hierarchical as h
from sae_lens_hierarchical import HierarchicalSAELoadError, cli, models, validation
from sae_lens_hierarchical.integrations.resume import find_checkpoint

W = "sae_weights.safetensors"


def fails(capsys, argv: list[str], *expected: str, code: int = 2) -> str:
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


# ----------------------------------------------------------------------------------------------
# 1. values: ranges, finite numbers, duplicate keys, nested typos, before anything loads


@pytest.mark.parametrize("make, override, expected", [
    (tiny_synthetic_config, "training_samples=-5", "training_samples=-5 is invalid: expected a finite number > 0"),
    (tiny_synthetic_config, "lr=0", "lr=0 is invalid: expected a finite number > 0"),
    (tiny_synthetic_config, "lr=-0.003", "lr=-0.003 is invalid"),
    (tiny_synthetic_config, "lr=.nan", "lr=nan is invalid"),
    (tiny_synthetic_config, "batch_size=0", "batch_size=0 is invalid"),
    (tiny_synthetic_config, "sae.k=0", "sae.k=0 is invalid"),
    (tiny_synthetic_config, "sae.l2_coefficient=-1", "sae.l2_coefficient=-1 is invalid: expected a finite number >= 0"),
    (tiny_synthetic_config, "sae.l2_until_step=-1", "sae.l2_until_step=-1 is invalid: expected a finite number >= 0"),
    (tiny_synthetic_config, "sae.tree_min_cofire=2", "sae.tree_min_cofire=2 is invalid: expected a number in [0, 1]"),
    (tiny_synthetic_config, "sae.level_widths=[4,0,48]", "every item must be a finite number > 0 (not 0)"),
    (tiny_synthetic_config, "synthetic_model.hierarchy.max_dept=2", "'synthetic_model.hierarchy.max_dept'; did you mean 'max_depth'?"),
    (tiny_synthetic_config, "synthetic_model.hierarchy.max_depth=two", "synthetic_model.hierarchy.max_depth='two' is invalid: expected an integer"),
    (tiny_synthetic_config, "synthetic_model.firing_probability.generator_name=zipf", "generator_name='zipf' is invalid: expected one of"),
    (lm_config, "training_tokens=-1", "training_tokens=-1 is invalid"),
    (lm_config, "train_batch_size_tokens=0", "train_batch_size_tokens=0 is invalid"),
    (lm_config, "context_size=0", "context_size=0 is invalid"),
    (lm_config, "model_name=gpt-2", "model_name='gpt-2' is not a model TransformerLens or the offline registry knows; did you mean 'gpt2'"),
    (lm_config, "model_name=smollm2-135m", "hook_name='blocks.6.hook_resid_post' is invalid"),  # lm_config hooks blocks.6 ...
])
@pytest.mark.usefixtures("no_training")
def test_bad_values_exit_2_before_anything_loads(make, override, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = make()
    if override.startswith("model_name=smollm2"):
        cfg["hook_name"] = "blocks.99.hook_resid_post"
        expected = "hook_name='blocks.99.hook_resid_post' is invalid: smollm2-135m has 30 layers"
    name = write(tmp_path, cfg)
    for argv in (["train", name, "--check", "--set", override], ["train", name, "--set", override]):
        fails(capsys, argv, f"hsae: error: {name}: ", expected)
    assert not (tmp_path / "runs").exists()


def test_a_layer_the_model_has_passes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = write(tmp_path, {**lm_config(), "model_name": "smollm2-135m", "hook_name": "blocks.29.hook_resid_post"})
    assert cli.main(["train", name, "--check"]) == 0


@pytest.mark.usefixtures("no_training")
def test_duplicate_yaml_keys_name_both_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = yaml.safe_dump(tiny_synthetic_config(), sort_keys=False)
    (tmp_path / "cfg.yaml").write_text(text + "lr: 0.5\n")
    line = text.splitlines().index("lr: 0.003") + 1
    n = len(text.splitlines()) + 1
    fails(capsys, ["train", "cfg.yaml", "--check"], f"cfg.yaml: key 'lr' appears twice (lines {line} and {n})")
    (tmp_path / "nested.yaml").write_text("sae:\n  k: 4\n  k: 5\n")
    fails(capsys, ["train", "nested.yaml"], "nested.yaml: key 'k' appears twice (lines 2 and 3)")


@pytest.mark.parametrize("flag, item", [("--set", "sae.k_per_level=[1,2"), ("--set", "noequals")])
@pytest.mark.usefixtures("no_training")
def test_malformed_overrides_name_the_flag_and_value(flag, item, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = write(tmp_path, tiny_synthetic_config())
    fails(capsys, ["train", name, flag, item], f"{flag} {item!r}")


@pytest.mark.parametrize("argv, expected", [
    (["--layer", "99"], "--layer=99 is invalid: smollm2-135m has 30 layers"),
    (["--model", "bogus-model"], "--model='bogus-model' is not a model"),
    (["--model", "smolm2-135m"], "did you mean 'smollm2-135m'"),
    (["--batch-tokens", "0"], "--batch-tokens 0 is invalid"),
    (["--context-size", "0"], "--context-size 0 is invalid"),
    (["--lr", "-1"], "--lr -1.0 is invalid"),
    (["--tokens", "-5"], "--tokens -5 is invalid"),
])
def test_demo_values_are_checked_before_the_model_loads(argv, expected, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_model)
    fails(capsys, ["demo", "--out", str(tmp_path / "d"), *argv], "hsae: error:", expected)
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------------------------
# 2. nothing overwritten or reused silently


@pytest.mark.usefixtures("no_training")
def test_train_refuses_an_output_path_holding_an_sae_unless_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = write(tmp_path, tiny_synthetic_config())
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "cfg.json").write_text("{}")
    fails(capsys, ["train", name, "--check"], "output_path 'runs/tiny' already holds a saved SAE (cfg.json)", "--overwrite")
    assert cli.main(["train", name, "--check", "--overwrite"]) == 0
    assert (tmp_path / "runs" / "tiny" / "cfg.json").read_text() == "{}"


def checkpoint_for(cfg_dict: dict, where: Path) -> Path:
    """A complete checkpoint whose SAE is the one `cfg_dict` describes."""
    from sae_lens import LanguageModelSAERunnerConfig

    runner_cfg = LanguageModelSAERunnerConfig.from_dict({**cfg_dict, "logger": {"log_to_wandb": False}})
    write_checkpoint(where)
    h.HierarchicalTrainingSAE(runner_cfg.sae).save_model(str(where))  # type: ignore[arg-type]
    return where


@pytest.mark.usefixtures("no_training")
def test_resuming_with_a_changed_budget_is_an_error_naming_the_field(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = {**lm_config(), "sae": {**lm_config()["sae"], "architecture": "hierarchical"}}
    ck = checkpoint_for(cfg, tmp_path / "ck" / "1024")
    name = write(tmp_path, {**cfg, "resume_from_checkpoint": str(ck)})
    assert cli.main(["train", name, "--check"]) == 0  # same config: fine
    fails(capsys, ["train", name, "--check", "--set", "sae.k=8"], "sae.k: 28 in the checkpoint, 8 now", "--allow-config-change")
    fails(capsys, ["train", name, "--check", "--set", "sae.k_per_level=[4,8,16]"], "sae.k_per_level: None in the checkpoint, [4, 8, 16] now")
    assert cli.main(["train", name, "--check", "--set", "sae.k=8", "--allow-config-change"]) == 0


# ----------------------------------------------------------------------------------------------
# 3. integrity: checksums, a missing tree, damaged checkpoints


@pytest.fixture
def saved(tmp_path) -> Path:
    d = tmp_path / "sae"
    sae = training_sae("learned")
    warm_up(sae, n=12)
    sae.save_inference_model(str(d))
    return d


def test_saved_saes_carry_a_checksum_that_refuses_changed_weights(saved):
    from sae_lens import SAE, TrainingSAE

    cfg = json.loads((saved / "cfg.json").read_text())
    dtype, _, digest = cfg["metadata"]["weights_sha256"].partition(":")
    assert dtype == "float32" and len(digest) == 64
    SAE.load_from_disk(str(saved))  # intact: loads
    tensors = load_file(str(saved / W))
    g = torch.Generator().manual_seed(0)
    tensors["W_dec"] = torch.randn(tensors["W_dec"].shape, generator=g)  # finite, right shape: only the checksum sees it
    save_file(tensors, str(saved / W))
    for loader in (SAE, TrainingSAE):
        with pytest.raises(HierarchicalSAELoadError, match="do not match the checksum cfg.json recorded"):
            loader.load_from_disk(str(saved))


def test_a_checksum_is_not_checked_after_a_dtype_cast(saved):
    from sae_lens import SAE

    assert SAE.load_from_disk(str(saved), dtype="float64").W_dec.dtype == torch.float64


def test_missing_tree_parent_of_a_learned_tree_is_an_error(saved):
    from sae_lens import SAE

    tensors = load_file(str(saved / W))
    del tensors["tree_parent"]
    save_file(tensors, str(saved / W))
    with pytest.raises(HierarchicalSAELoadError, match="no 'tree_parent' tensor, and cfg.json's tree was learned"):
        SAE.load_from_disk(str(saved))


def test_missing_tree_parent_of_a_fixed_tree_warns_and_rebuilds_it(tmp_path):
    from sae_lens import SAE

    d = tmp_path / "fixed"
    sae = training_sae("fixed")
    sae.save_inference_model(str(d))
    tensors = load_file(str(d / W))
    del tensors["tree_parent"]
    save_file(tensors, str(d / W))
    cfg = json.loads((d / "cfg.json").read_text())
    del cfg["metadata"]["weights_sha256"]  # (the tensors changed on purpose)
    (d / "cfg.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = SAE.load_from_disk(str(d))
    assert any("no 'tree_parent' tensor; cfg.json says tree: fixed" in str(w.message) for w in caught)
    assert torch.equal(loaded.tree_parent, sae.tree_parent)


def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(tmp_path, capsys):
    for n in (1024, 2048, 3072):
        write_checkpoint(tmp_path / "ck" / str(n))
    weights = tmp_path / "ck" / "3072" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])  # truncated while writing
    state = tmp_path / "ck" / "2048" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 2])
    assert find_checkpoint(tmp_path / "ck") == tmp_path / "ck" / "1024"
    said = capsys.readouterr().out
    assert "skipped 3072 (" in said and "sae_weights.safetensors cannot be read" in said
    assert "2048 (" in said and "trainer_state.pt" in said and said.rstrip().endswith("resuming from " + str(tmp_path / "ck" / "1024"))
    with pytest.raises(FileNotFoundError, match="checkpoint .*3072 is damaged: .*sae_weights.safetensors cannot be read"):
        find_checkpoint(tmp_path / "ck" / "3072")


# ----------------------------------------------------------------------------------------------
# 4. `hsae eval` inputs, exit codes, Ctrl-C


@pytest.mark.parametrize("cfg_text, expected", [
    ('{"d_in": 8}', "has no 'architecture' field"),
    ("[1, 2]", "must hold a JSON object of SAE config fields, not list"),
    ("null", "must hold a JSON object of SAE config fields, not NoneType"),
    ("{not json", "cfg.json is not valid JSON"),
])
def test_eval_names_the_sae_whose_cfg_json_is_bad(cfg_text, expected, saved, tmp_path, capsys):
    (saved / "cfg.json").write_text(cfg_text)
    fails(capsys, ["eval", "--sae", f"x={saved}", "--model", "smollm2-135m", "--output-dir", str(tmp_path / "o")],
          f"--sae x={saved}:", expected)


def test_eval_names_the_sae_with_nan_weights(tmp_path, capsys):
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    d = tmp_path / "flat"
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=16, k=2))
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    sae.save_inference_model(str(d))
    fails(capsys, ["eval", "--sae", str(d), "--model", "smollm2-135m", "--output-dir", str(tmp_path / "o")],
          f"--sae {d}:", "tensor 'W_dec' holds NaN/inf")


def test_eval_refuses_a_synthetic_sae_before_the_model_loads(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", lambda *_a, **_k: pytest.fail("the model loaded"))
    fails(capsys, ["eval", "--sae", str(saved), "--model", "smollm2-135m", "--output-dir", str(tmp_path / "o")],
          "names no hook_name (an SAE trained on synthetic data?)")


def test_ctrl_c_in_eval_exits_130_saying_what_is_kept(monkeypatch, capsys, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "evaluate", interrupted)
    err = fails(capsys, ["eval", "--sae", "x", "--output-dir", str(tmp_path)], "hsae: interrupted:", code=130)
    assert f"kept in {tmp_path}" in err


def test_an_unexpected_fault_exits_1_without_a_traceback_unless_debug(monkeypatch, capsys, tmp_path):
    def broken(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "evaluate", broken)
    fails(capsys, ["eval", "--sae", "x", "--output-dir", str(tmp_path)],
          "hsae: error: RuntimeError: disk on fire (run with --debug for the traceback)", code=1)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["eval", "--debug", "--sae", "x", "--output-dir", str(tmp_path)])


# ----------------------------------------------------------------------------------------------
# 5. no code runs from data


# (a pickled object in a probe file is refused: tests/evals/test_path_attribution.py)


def test_remote_dataset_code_runs_only_when_asked(monkeypatch):
    from sae_lens_hierarchical.evals.run_all import RunSettings

    assert RunSettings().trust_remote_code is False
    parser_args = []

    def capture(args):
        parser_args.append(args.trust_remote_code)
        return "report.md"

    monkeypatch.setattr(cli, "evaluate", capture)
    cli.main(["eval", "--sae", "x", "--output-dir", "o"])
    cli.main(["eval", "--sae", "x", "--output-dir", "o", "--trust-remote-code"])
    assert parser_args == [False, True]


def test_validation_reads_no_weights_for_an_offline_layer_count():
    assert validation.model_n_layers("smollm2-135m") == 30
    assert validation.model_n_layers("gemma-3-270m") == 18
    assert validation.model_n_layers("not-a-model") is None


@pytest.mark.parametrize("edit, expected", [
    (lambda _cfg: [1, 2], "must hold a JSON object of SAE config fields, not list"),
    (lambda _cfg: None, "must hold a JSON object of SAE config fields, not NoneType"),
    (lambda cfg: {k: v for k, v in cfg.items() if k != "architecture"}, "has no 'architecture' field"),
])
def test_library_loading_names_cfg_json(edit, expected, saved):
    from sae_lens import SAE

    cfg = json.loads((saved / "cfg.json").read_text())
    (saved / "cfg.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(HierarchicalSAELoadError, match=re.escape(f"{saved / 'cfg.json'}: {expected}")):
        SAE.load_from_disk(str(saved))


def test_training_load_of_rising_density_names_the_file(saved):
    """The training fields an inference cfg.json keeps are checked with the file named."""
    from sae_lens import TrainingSAE

    cfg = json.loads((saved / "cfg.json").read_text())
    cfg["metadata"]["training_architecture_details"]["k_per_level"] = [0.2, 0.8, 5.0]  # denser deeper (widths 4, 16, 64)
    (saved / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(HierarchicalSAELoadError, match=re.escape(f"{saved / 'cfg.json'} (metadata.training_architecture_details)")):
        TrainingSAE.load_from_disk(str(saved))
