"""The `hsae` command line: help, a tiny real training run, and config errors caught up front.

Three runs go through a real subprocess (`hsae --help`, one training run, one error exit);
the other error cases call `cli.main(argv)` in process, which returns the exit status, with
both runners' constructors patched to fail so any attempt to load a model or train shows up.
A language-model config trains in process on a tiny random model (handed to SAELens's runner):
`hsae train` starts the SAE's decoder bias at the activations' mean, and not when resuming.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sae_lens_hierarchical import HierarchicalSAE, cli, pipeline

# One intra-op thread: on a small shared CPU, torch's default thread pool makes these tiny
# steps tens of times slower under contention (spinning threads), not faster.
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def tiny_synthetic_config() -> dict:
    """A few-thousand-sample synthetic run: 4 roots x 3 x 3 in 16 dimensions."""
    return {
        "synthetic_model": {
            "num_features": 52,
            "hidden_dim": 16,
            "firing_probability": {"generator_name": "zipfian", "exponent": 0.5,
                                   "max_prob": 0.3, "min_prob": 0.02},
            "hierarchy": {"total_root_nodes": 4, "branching_factor": 3, "max_depth": 2,
                          "compensate_probabilities": True},
            "seed": 0,
        },
        "sae": {"d_in": 16, "d_sae": 52, "level_widths": [4, 12, 36], "k": 6},
        "training_samples": 4000,
        "batch_size": 500,
        "lr": 0.003,
        "eval_samples": 1000,
        "checkpoint_path": None,
        "output_path": "runs/tiny",
    }


def lm_config() -> dict:
    """A LanguageModelSAERunnerConfig YAML (gpt2 from the Hub): only ever validated here."""
    return {
        "sae": {"d_in": 768, "d_sae": 4672, "level_widths": [64, 512, 4096], "k": 28},
        "model_name": "gpt2",
        "hook_name": "blocks.6.hook_resid_post",
        "dataset_path": "NeelNanda/pile-10k",
        "context_size": 128,
        "training_tokens": 1_000_000,
        "output_path": "runs/lm",
    }


def write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> str:
    (tmp_path / name).write_text(yaml.safe_dump(cfg))
    return name


def hsae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_lens_hierarchical", *args],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180,
    )


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if anything tries to build a runner (load a model, a dataset, train)."""
    from sae_lens import LanguageModelSAETrainingRunner
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner

    def boom(*args, **kwargs):
        raise AssertionError("a runner was built: the config should have been rejected first")

    monkeypatch.setattr(LanguageModelSAETrainingRunner, "__init__", boom)
    monkeypatch.setattr(SyntheticSAERunner, "__init__", boom)


def only_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# help


def test_console_script_help_exits_0(tmp_path):
    script = Path(sys.executable).parent / "hsae"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "sae_lens_hierarchical"]
    proc = subprocess.run([*cmd, "--help"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: hsae" in proc.stdout and "train" in proc.stdout


def test_train_help_mentions_config_set_and_check(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "config" in out and "--set" in out and "KEY=VALUE" in out and "--check" in out


def test_no_command_prints_help_and_returns_1(capsys):
    assert cli.main([]) == 1
    assert "train" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# a real (tiny) training run through the module entry point


def test_train_tiny_synthetic_yaml_saves_sae(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = write(tmp_path, tiny_synthetic_config())
    # --set applies before validation and reaches the saved config.
    proc = hsae("train", name, "--set", "sae.gate=hard", "--set", "sae.l2_coefficient=0.05",
                "--set", "training_samples=3000", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("Saved SAE to: ")]
    assert len(lines) == 1, proc.stdout
    out = Path(lines[0].removeprefix("Saved SAE to: ").strip())
    assert out == (tmp_path / "runs" / "tiny").resolve()
    assert (out / "cfg.json").exists() and (out / "sae_weights.safetensors").exists()
    saved = json.loads((out / "cfg.json").read_text())
    assert saved["architecture"] == "hierarchical" and saved["gate"] == "hard"
    assert saved["metadata"]["training_architecture_details"]["l2_coefficient"] == 0.05
    assert saved["metadata"]["training_architecture_details"]["k"] == 6
    runner_cfg = json.loads((out / "runner_config.json").read_text())
    assert runner_cfg["training_samples"] == 3000
    assert "final eval:" in proc.stdout

    from sae_lens import SAE

    loaded = SAE.load_from_disk(str(out))
    assert type(loaded) is HierarchicalSAE and loaded.cfg.gate == "hard"


# ----------------------------------------------------------------------------------------------
# errors: exit 2, the message names the key or field, nothing is built or written


def test_unknown_sae_key_exits_2_in_a_real_process(tmp_path):
    cfg = tiny_synthetic_config()
    cfg["sae"]["k_per_levl"] = [1, 2, 3]
    name = write(tmp_path, cfg)
    proc = hsae("train", name, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "'sae.k_per_levl'" in proc.stderr and "did you mean 'k_per_level'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert only_files(tmp_path) == [name]


@pytest.mark.parametrize(
    "make_bad, key, suggestion",
    [
        (lambda c: c.update(trainng_samples=c.pop("training_samples")), "trainng_samples", "training_samples"),
        (lambda c: c["sae"].update(projection_rnk=4), "sae.projection_rnk", "projection_rank"),
        (lambda c: c.update(logger={"log_to_wandbb": False}), "logger.log_to_wandbb", "log_to_wandb"),
        (lambda c: c["synthetic_model"].update(hidden_dimm=16), "synthetic_model.hidden_dimm", "hidden_dim"),
    ],
    ids=["top-level", "sae", "logger", "synthetic_model"],
)
def test_unknown_key_exits_2_with_suggestion(make_bad, key, suggestion, tmp_path, monkeypatch,
                                              capsys, no_training):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_synthetic_config()
    make_bad(cfg)
    name = write(tmp_path, cfg)
    assert cli.main(["train", name]) == 2
    err = capsys.readouterr().err
    assert f"unknown key {key!r}" in err and f"did you mean {suggestion!r}" in err
    assert only_files(tmp_path) == [name]  # no output directory: nothing ran


def test_unknown_key_in_lm_config_exits_2(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    cfg = lm_config()
    cfg["model_nme"] = cfg.pop("model_name")
    name = write(tmp_path, cfg)
    assert cli.main(["train", name]) == 2
    err = capsys.readouterr().err
    assert "'model_nme'" in err and "'model_name'" in err
    assert only_files(tmp_path) == [name]


def test_unknown_key_given_by_set_exits_2(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    name = write(tmp_path, tiny_synthetic_config())
    assert cli.main(["train", name, "--set", "sae.kl_coeficient=0.1"]) == 2
    err = capsys.readouterr().err
    assert "'sae.kl_coeficient'" in err and "'kl_coefficient'" in err


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["sae.k_per_level=[1,2,3,4]"], "k_per_level"),   # longer than n_levels
        (["sae.k_per_level=[1,2,2]"], "k_per_level"),     # does not sum to k=6
        (["sae.tree=softmax"], "tree"),
        (["sae.k=0"], "k"),
        (["sae.tree=fixed", "sae.level_widths=[4,10,38]"], "level_widths"),  # 10 is not a multiple of 4
        (["sae.projection_rank=4"], "projection_rank"),   # needs tree: fixed
        (["sae.d_sae=60"], "d_sae"),                      # != sum(level_widths)
        (["sae.variant=topk"], "variant"),                # a field of the removed 0.1 design
        (["sae.architecture=hierarchcal"], "architecture"),
    ],
)
def test_bad_value_exits_2_naming_the_field(overrides, field, tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    name = write(tmp_path, tiny_synthetic_config())
    assert cli.main(["train", name, *(a for o in overrides for a in ("--set", o))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hsae: error:") and field in err
    assert only_files(tmp_path) == [name]


def test_missing_file_exits_2(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "nope.yaml"]) == 2
    assert "nope.yaml: no such config file" in capsys.readouterr().err


def test_malformed_set_and_non_mapping_yaml_exit_2(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    name = write(tmp_path, tiny_synthetic_config())
    assert cli.main(["train", name, "--set", "lr"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert cli.main(["train", "list.yaml"]) == 2
    assert "mapping" in capsys.readouterr().err


@pytest.mark.parametrize("make_cfg", [tiny_synthetic_config, lm_config], ids=["synthetic", "lm"])
def test_check_validates_without_training(make_cfg, tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    name = write(tmp_path, make_cfg())
    assert cli.main(["train", name, "--check"]) == 0
    assert f"{name}: OK" in capsys.readouterr().out
    assert only_files(tmp_path) == [name]
    # --check still rejects a bad config.
    assert cli.main(["train", name, "--check", "--set", "sae.tree=nope"]) == 2


# ----------------------------------------------------------------------------------------------
# a language-model run: the decoder bias starts at the activations' mean (not when resuming)

D, CTX, VOCAB, PROMPTS = 16, 16, 50, 4
HOOK = "blocks.0.hook_resid_post"


def tiny_lm_config(tmp_path: Path, **kw) -> dict:
    """One training step (64 tokens) of a tiny random model's residual stream; the model and a
    dataset of random tokens are handed to the runner (`runner_with_tiny_model`)."""
    cfg = {
        "sae": {"d_in": D, "d_sae": 84, "level_widths": [4, 16, 64], "k": 6},
        # A name TransformerLens knows (config checks refuse unknown names); the runner is handed
        # the tiny random model below instead of loading it.
        "model_name": "tiny-stories-1M", "hook_name": HOOK, "dataset_path": "", "is_dataset_tokenized": True,
        "streaming": False, "context_size": CTX, "prepend_bos": False,
        "training_tokens": PROMPTS * CTX, "train_batch_size_tokens": PROMPTS * CTX,
        "store_batch_size_prompts": PROMPTS, "n_batches_in_buffer": PROMPTS,
        "activations_mixing_fraction": 0.0,
        # a tiny rate: after its one step b_dec is still within 1e-5 per coordinate of where it started
        "lr": 1e-6, "device": "cpu", "seed": 3, "n_checkpoints": 0, "checkpoint_path": None,
        "output_path": str(tmp_path / "out"), "verbose": False,
    }
    cfg.update(kw)
    return cfg


@pytest.fixture
def runner_with_tiny_model(monkeypatch):
    """`hsae train` builds SAELens's LanguageModelSAETrainingRunner by name; this one gets a tiny
    random HookedTransformer (no Hub) and 200 rows of random tokens. Returns (model, dataset)."""
    import sae_lens
    from datasets import Dataset
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(
        d_model=D, d_head=8, n_heads=2, n_layers=1, n_ctx=CTX, d_vocab=VOCAB, act_fn="gelu",
        normalization_type="LN", seed=0, device="cpu"))
    g = torch.Generator().manual_seed(1)
    dataset = Dataset.from_dict({"tokens": torch.randint(0, VOCAB, (200, CTX), generator=g).tolist()})
    base = sae_lens.LanguageModelSAETrainingRunner

    class Runner(base):  # type: ignore[misc, valid-type]
        def __init__(self, cfg, **kwargs):
            super().__init__(cfg, override_model=model, override_dataset=dataset, **kwargs)

    monkeypatch.setattr(sae_lens, "LanguageModelSAETrainingRunner", Runner)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, dataset
    torch.set_num_threads(threads)


@pytest.fixture
def b_dec_starts(monkeypatch):
    """Every call of pipeline.start_b_dec_at_mean (which still runs): [(SAE names, stats)]."""
    calls = []
    original = pipeline.start_b_dec_at_mean

    def recording(saes, stats):
        calls.append((sorted(saes), stats))
        return original(saes, stats)

    monkeypatch.setattr(pipeline, "start_b_dec_at_mean", recording)
    return calls


def test_train_lm_config_starts_b_dec_at_the_activation_mean(tmp_path, monkeypatch, runner_with_tiny_model,
                                                             b_dec_starts):
    """Checked both ways: start_b_dec_at_mean is called once with the activations' mean, and the
    saved SAE's b_dec (trained one step at lr 1e-6) is that mean, not SAELens's zero init."""
    from safetensors.torch import load_file

    model, dataset = runner_with_tiny_model
    monkeypatch.chdir(tmp_path)
    name = write(tmp_path, tiny_lm_config(tmp_path))
    assert cli.main(["train", name]) == 0
    mean, _norm = pipeline.mean_activation(model, dataset, HOOK, CTX)
    assert len(b_dec_starts) == 1
    (names, stats), = b_dec_starts
    assert names == ["sae"] and stats is not None
    torch.testing.assert_close(stats[0], mean)
    b_dec = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))["b_dec"]
    assert mean.abs().max() > 0.05  # a mean worth starting at
    assert b_dec.abs().max() > 0.05  # not SAELens's zero init (a step at lr 1e-6 moves it by ~1e-6)
    torch.testing.assert_close(b_dec, mean, atol=1e-5, rtol=0)


def test_train_lm_config_resumed_keeps_its_checkpoints_b_dec(tmp_path, monkeypatch, runner_with_tiny_model,
                                                             b_dec_starts):
    """A resumed run loads b_dec from its checkpoint: the mean start is skipped."""
    from sae_lens_hierarchical.integrations.resume import find_checkpoint

    monkeypatch.chdir(tmp_path)
    first = tiny_lm_config(tmp_path, training_tokens=2 * PROMPTS * CTX, n_checkpoints=1,
                           checkpoint_path=str(tmp_path / "ck"))
    name = write(tmp_path, first)
    assert cli.main(["train", name]) == 0
    assert len(b_dec_starts) == 1
    last = find_checkpoint(tmp_path / "ck")
    assert cli.main(["train", name, "--set", f"resume_from_checkpoint={last}",
                     "--set", f"output_path={tmp_path / 'resumed'}"]) == 0
    assert len(b_dec_starts) == 1  # not called again
    from safetensors.torch import load_file

    at_checkpoint = load_file(str(last / "sae_weights.safetensors"))["b_dec"]
    resumed = load_file(str(tmp_path / "resumed" / "sae_weights.safetensors"))["b_dec"]
    assert at_checkpoint.abs().max() > 0.05  # the first run's start at the mean
    torch.testing.assert_close(resumed, at_checkpoint, atol=1e-5, rtol=0)  # one more step at lr 1e-6
