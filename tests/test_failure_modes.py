"""Failure modes: each fails with a message naming the file, tensor or field at fault.

Loading (through SAELens's own entry points: SAE.load_from_disk, TrainingSAE.load_from_disk,
the Hugging Face loader): truncated or corrupted sae_weights.safetensors, NaN weights, missing
files, cfg.json that is not JSON, has invalid fields, fields of the removed 0.1 design or an
unknown architecture, or fields whose shapes (or tree) do not match the weights; a training
checkpoint loaded as an inference SAE. Training: NaN/inf activations or a non-finite loss stop
the run with the step named, before any weight changes. CLI: wrong value types, unreadable files
and bad resume checkpoints exit 2 with the key named, before anything is built.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from builders import inputs, step, training_sae, warm_up
from sae_lens import SAE, TrainingSAE
from safetensors.torch import load_file, save_file

import sae_lens_hierarchical  # noqa: F401
from sae_lens_hierarchical import HierarchicalSAELoadError, NonFiniteTrainingError, cli

W = "sae_weights.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A trained tiny HSAE (learned tree, with edges) saved for inference (cfg.json +
    sae_weights.safetensors)."""
    d = tmp_path_factory.mktemp("saved") / "sae"
    sae = training_sae("learned")
    warm_up(sae, n=12)  # past tree_every: the tree has edges
    assert (sae.tree_parent >= 0).any()
    sae.save_inference_model(str(d))
    assert type(SAE.load_from_disk(str(d))).__name__ == "HierarchicalSAE"
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A training checkpoint (SAELens's save_model: per-level thresholds, the schedule's state)
    of the projected design, whose weights are per-parent factors."""
    d = tmp_path_factory.mktemp("ckpt") / "ckpt"
    sae = training_sae("projected")
    warm_up(sae, n=5)
    sae.save_model(str(d))
    assert type(TrainingSAE.load_from_disk(str(d))).__name__ == "HierarchicalTrainingSAE"
    return d


def copy(saved: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    return d


def edit_cfg(d: Path, **changes) -> None:
    cfg = json.loads((d / "cfg.json").read_text())
    cfg.update(changes)
    (d / "cfg.json").write_text(json.dumps(cfg))


LOADERS = {
    "SAE.load_from_disk": lambda p: SAE.load_from_disk(str(p)),
    "TrainingSAE.load_from_disk": lambda p: TrainingSAE.load_from_disk(str(p)),
}


# ----------------------------------------------------------------------------------------------
# damaged or missing files


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_file_is_named(damage, loader, saved, tmp_path):
    d = copy(saved, tmp_path)
    data = (d / W).read_bytes()
    (d / W).write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13" * 200)
    with pytest.raises(HierarchicalSAELoadError) as exc:
        LOADERS[loader](d)
    assert str(d / W) in str(exc.value) and "truncated or corrupted" in str(exc.value)


def test_nan_weights_are_refused_naming_the_tensor(saved, tmp_path):
    d = copy(saved, tmp_path)
    tensors = load_file(str(d / W))
    tensors["W_dec"][1, 3] = float("nan")
    tensors["W_dec"][2, 0] = float("inf")
    save_file(tensors, str(d / W))
    with pytest.raises(HierarchicalSAELoadError, match=r"sae_weights.safetensors: tensor 'W_dec' holds 2 NaN/inf"):
        SAE.load_from_disk(str(d))


@pytest.mark.parametrize("missing", ["cfg.json", W, "directory"])
def test_missing_files_are_named(missing, saved, tmp_path):
    d = copy(saved, tmp_path)
    if missing == "directory":
        shutil.rmtree(d)
    else:
        (d / missing).unlink()
    with pytest.raises(FileNotFoundError) as exc:
        SAE.load_from_disk(str(d))
    assert str(d / ("cfg.json" if missing == "directory" else missing)) in str(exc.value)


def test_cfg_json_that_is_not_json_is_named(saved, tmp_path):
    d = copy(saved, tmp_path)
    (d / "cfg.json").write_text('{"architecture": "hierarchical", ')
    with pytest.raises(json.JSONDecodeError, match=str(d / "cfg.json")):
        SAE.load_from_disk(str(d))


# ----------------------------------------------------------------------------------------------
# cfg.json that does not fit the weights, or names something unknown


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("changes, field", [
    ({"gate": "soft"}, "gate='soft'"),
    ({"level_widths": [4, 16, 48], "branching": None}, "d_sae=84"),  # widths do not add up
    ({"variant": "softmax"}, "its config has ['variant']"),  # a field of the removed 0.1 design
    ({"n_free": 8, "k_free": 1.0}, "its config has ['k_free', 'n_free']"),
])
def test_invalid_cfg_fields_are_named_with_the_file(changes, field, loader, saved, tmp_path):
    d = copy(saved, tmp_path)
    edit_cfg(d, **changes)
    with pytest.raises(HierarchicalSAELoadError) as exc:
        LOADERS[loader](d)
    assert str(d / "cfg.json") in str(exc.value) and field in str(exc.value)


# Fields only the training config has (the inference SAE never reads them): the training
# loader refuses invalid ones, naming field and value.
TRAINING_FIELDS = [
    ({"k_per_level": [2, 3]}, "k_per_level=[2, 3]"),  # one k short
    ({"k": 0}, "k=0"),
    ({"tree": "random"}, "tree='random'"),
]


@pytest.mark.parametrize("changes, field", TRAINING_FIELDS)
def test_invalid_training_fields_are_named_by_the_training_loader(changes, field, saved, tmp_path):
    d = copy(saved, tmp_path)
    edit_cfg(d, **changes)
    with pytest.raises(ValueError) as exc:
        TrainingSAE.load_from_disk(str(d))
    assert field in str(exc.value)


@pytest.mark.parametrize("changes, field", TRAINING_FIELDS[:1])
def test_invalid_training_fields_are_named_with_the_file(changes, field, saved, tmp_path):
    d = copy(saved, tmp_path)
    edit_cfg(d, **changes)
    with pytest.raises(HierarchicalSAELoadError) as exc:
        TrainingSAE.load_from_disk(str(d))
    assert str(d / "cfg.json") in str(exc.value) and field in str(exc.value)


def test_unknown_architecture_variant_is_named(saved, tmp_path):
    d = copy(saved, tmp_path)
    edit_cfg(d, architecture="hierarchical_v2")
    with pytest.raises(HierarchicalSAELoadError) as exc:
        SAE.load_from_disk(str(d))
    msg = str(exc.value)
    assert str(d / "cfg.json") in msg and "architecture='hierarchical_v2'" in msg


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("changes, tensor", [
    ({"d_in": 8}, re.escape("'b_dec' has shape [16] but cfg.json (d_in=8, d_sae=84")),
    # Same d_sae, other levels: the flat weights fit, the saved tree does not (a latent of the
    # old level 1 with a parent is now a root).
    ({"level_widths": [12, 24, 48], "branching": None, "n_roots": None},
     r"'tree_parent' gives latent \d+ \(level 0\) the parent \d+; a level-0 latent's parent must be -1"),
])
def test_cfg_shapes_that_do_not_match_the_weights_are_named(changes, tensor, loader, saved, tmp_path):
    d = copy(saved, tmp_path)
    edit_cfg(d, **changes)
    with pytest.raises(HierarchicalSAELoadError) as exc:
        LOADERS[loader](d)
    assert re.search("sae_weights.safetensors: tensor " + tensor, str(exc.value)), str(exc.value)


@pytest.mark.parametrize("changes, tensor", [
    ({"d_in": 8}, "'b_dec' has shape [16] but cfg.json (d_in=8, d_sae=84"),
    ({"projection_rank": 2}, "'dec_basis_l1' has shape [4, 4, 16] but cfg.json (d_in=16, d_sae=84, "
     "level_widths=[4, 16, 64]) implies [4, 2, 16]"),
])
def test_checkpoint_shapes_that_do_not_match_the_cfg_are_named(changes, tensor, checkpoint, tmp_path):
    d = copy(checkpoint, tmp_path)
    edit_cfg(d, **changes)
    with pytest.raises(HierarchicalSAELoadError) as exc:
        TrainingSAE.load_from_disk(str(d))
    assert "sae_weights.safetensors: tensor " + tensor in str(exc.value)


def test_projection_rank_none_against_factored_weights_lists_the_tensors(checkpoint, tmp_path):
    d = copy(checkpoint, tmp_path)
    edit_cfg(d, projection_rank=None)
    with pytest.raises(HierarchicalSAELoadError, match=r"missing tensors \['W_dec', 'W_enc'\].*unexpected tensors \['W_dec_l0', 'W_enc_l0', 'dec_basis_l1'"):
        TrainingSAE.load_from_disk(str(d))


def test_training_checkpoint_with_a_mismatched_cfg_is_named(tmp_path):
    sae = training_sae("learned")
    warm_up(sae, n=12)
    sae.save_model(str(tmp_path / "ckpt"))  # the training format (unfolded, per-level thresholds)
    # As an inference SAE a checkpoint is refused, whatever its cfg.json says.
    with pytest.raises(HierarchicalSAELoadError, match="sae_weights.safetensors is a training checkpoint"):
        SAE.load_from_disk(str(tmp_path / "ckpt"))
    edit_cfg(tmp_path / "ckpt", d_in=8)
    with pytest.raises(HierarchicalSAELoadError, match=r"tensor 'b_dec' has shape \[16\] but cfg.json \(d_in=8"):
        TrainingSAE.load_from_disk(str(tmp_path / "ckpt"))
    # A learned tree is not the fixed layout a cfg.json with tree: fixed promises.
    edit_cfg(tmp_path / "ckpt", d_in=16, tree="fixed")
    with pytest.raises(HierarchicalSAELoadError, match="'tree_parent' is not the fixed layout but cfg.json has tree: fixed"):
        TrainingSAE.load_from_disk(str(tmp_path / "ckpt"))


def test_huggingface_loader_names_the_damaged_cached_file(saved, tmp_path, monkeypatch):
    """The Hub route reads through the same checks; only the download is replaced."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    d = copy(saved, tmp_path)
    (d / W).write_bytes((d / W).read_bytes()[:100])

    def local_download(repo_id, filename, **kwargs):
        path = tmp_path / filename
        if not path.exists():
            from huggingface_hub.utils import EntryNotFoundError

            raise EntryNotFoundError(filename)
        return str(path)

    monkeypatch.setattr(loaders, "hf_hub_download", local_download)
    with pytest.raises(HierarchicalSAELoadError, match=str(d / W)):
        SAE.from_pretrained("some-org/some-repo", "copy")


def test_other_architectures_pass_through_untouched(tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    StandardSAE(StandardSAEConfig(d_in=4, d_sae=8)).save_model(str(tmp_path / "std"))
    (tmp_path / "std" / W).write_bytes(b"\x13" * 50)
    with pytest.raises(Exception) as exc:
        SAE.load_from_disk(str(tmp_path / "std"))
    assert not isinstance(exc.value, HierarchicalSAELoadError)


# ----------------------------------------------------------------------------------------------
# NaN / inf during training: a clear error before the weights change


def snapshot(sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}




@pytest.mark.parametrize("design", ["learned", "gated"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_raise_naming_the_step(bad, design):
    sae = training_sae(design)
    x = inputs(64)
    x[3, 5] = bad
    x[10, 0] = bad
    before = {k: v.detach().clone() for k, v in sae.named_parameters()}
    with pytest.raises(NonFiniteTrainingError) as exc:
        step(sae, x)
    msg = str(exc.value)
    assert re.search(r"training step \d+: ", msg) and "2 of 64 activation vectors" in msg
    assert ("2 NaN" in msg) if bad != bad else ("2 inf" in msg)
    after = {k: v.detach().clone() for k, v in sae.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_refused_step_is_named_from_0_and_leaves_no_trace():
    sae = training_sae("learned")
    x = inputs(64)
    x[3, 5] = float("nan")
    before = snapshot(sae)
    with pytest.raises(NonFiniteTrainingError) as exc:
        step(sae, x)
    assert "training step 0" in str(exc.value)  # SAELens's numbering: the first step is 0
    after = snapshot(sae)
    assert all(torch.equal(before[k], after[k]) for k in before)  # thresholds untouched too
    assert sae.schedule.steps_done == 0 and not sae.schedule.counts.co


def test_non_finite_loss_from_finite_inputs_raises():
    sae = training_sae("learned")
    with pytest.raises(NonFiniteTrainingError, match=r"the loss is (inf|nan).*non-finite terms: mse_loss"):
        step(sae, inputs(32) * 1e30)  # squares overflow float32


@pytest.mark.parametrize("exact_step", [False, True])
def test_nan_batch_stops_a_runner_with_finite_weights(exact_step, tmp_path, monkeypatch):
    """Through SAELens's trainer: step 3's batch holds a NaN; the run stops there, naming it,
    and every weight is still finite (SAELens alone would carry on with NaN weights)."""
    from sae_lens import LoggingConfig
    from sae_lens.synthetic import SyntheticModelConfig, ZipfianFiringProbabilityConfig
    from sae_lens.synthetic import training as synth_training
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig

    monkeypatch.chdir(tmp_path)
    original_next = synth_training.SyntheticActivationIterator.__next__
    calls = {"n": 0}

    def next_with_nan(self):
        batch = original_next(self)
        calls["n"] += 1
        if calls["n"] == 4:  # the batch of training step 3
            batch = batch.clone()
            batch[0, 0] = float("nan")
        return batch

    monkeypatch.setattr(synth_training.SyntheticActivationIterator, "__next__", next_with_nan)
    sae = training_sae("learned")
    cfg = SyntheticSAERunnerConfig(
        synthetic_model=SyntheticModelConfig(
            num_features=32, hidden_dim=16,
            firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.02),
            seed=0),
        sae=sae.cfg, training_samples=1000, batch_size=100, lr=3e-3, eval_samples=0,
        checkpoint_path=None, output_path=None, logger=LoggingConfig(log_to_wandb=False),
    )
    step_named = "training step 3" if exact_step else r"training step \d+"
    with pytest.raises(NonFiniteTrainingError, match=step_named + ": the activation batch holds 1 NaN"):
        SyntheticSAERunner(cfg, override_sae=sae).run()
    assert all(torch.isfinite(p).all() for p in sae.parameters())


# ----------------------------------------------------------------------------------------------
# bad CLI input: exit 2 naming the key, before anything is built


def tiny_synthetic_config() -> dict:
    return {
        "synthetic_model": {"num_features": 52, "hidden_dim": 16,
                            "firing_probability": {"generator_name": "zipfian", "exponent": 0.5,
                                                   "max_prob": 0.3, "min_prob": 0.02},
                            "seed": 0},
        "sae": {"d_in": 16, "d_sae": 52, "level_widths": [4, 12, 36], "k": 6},
        "training_samples": 4000, "batch_size": 500, "lr": 0.003, "eval_samples": 1000,
        "checkpoint_path": None, "output_path": "runs/tiny",
    }


def lm_config() -> dict:
    return {"sae": {"d_in": 16, "d_sae": 84, "level_widths": [4, 16, 64], "k": 7},
            "model_name": "tiny-stories-1M", "hook_name": "blocks.0.hook_resid_post", "dataset_path": "x",
            "output_path": "runs/lm"}


@pytest.fixture
def no_training(monkeypatch):
    from sae_lens import LanguageModelSAETrainingRunner
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner

    def boom(*args, **kwargs):
        raise AssertionError("a runner was built: the config should have been rejected first")

    monkeypatch.setattr(LanguageModelSAETrainingRunner, "__init__", boom)
    monkeypatch.setattr(SyntheticSAERunner, "__init__", boom)


@pytest.mark.parametrize("override, message", [
    ("lr=fast", "lr='fast' is invalid: expected a number"),
    ("training_samples=lots", "training_samples='lots' is invalid: expected an integer"),
    ("batch_size=2.5", "batch_size=2.5 is invalid: expected an integer"),
    ("sae.k_per_level=[1,two,3]", "sae.k_per_level=[1, 'two', 3] is invalid: expected a list of numbers"),
    ("sae.k=lots", "sae.k='lots' is invalid: expected a number"),
    ("sae.tree=3", "sae.tree=3 is invalid: expected one of 'learned', 'fixed'"),
    ("sae.gate=soft", "sae.gate='soft' is invalid: expected one of 'none', 'hard'"),
    ("logger.log_to_wandb=maybe", "logger.log_to_wandb='maybe' is invalid: expected true/false"),
    ("synthetic_model.hidden_dim=[16]", "synthetic_model.hidden_dim=[16] is invalid: expected an integer"),
    ("seed=abc", "seed='abc' is invalid: expected an integer"),
    ("lr.value=3", "'lr' is not a section"),
])
def test_wrong_value_types_exit_2_naming_the_key(override, message, tmp_path, monkeypatch, capsys,
                                                 no_training):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_synthetic_config()))
    assert cli.main(["train", "cfg.yaml", "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_yaml_numbers_written_as_text_are_read_as_numbers(tmp_path, monkeypatch, no_training):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_synthetic_config()))
    cfg = cli.load_runner_config("cfg.yaml", ["lr=3e-3", "training_samples=4e3"])
    assert cfg.lr == 0.003 and cfg.training_samples == 4000


@pytest.mark.parametrize("content, message", [
    ("a: [1,\n", "not valid YAML"),
    (None, "cannot be read as a YAML file"),  # a directory
])
def test_unreadable_config_exits_2(content, message, tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    if content is None:
        (tmp_path / "cfg.yaml").mkdir()
    else:
        (tmp_path / "cfg.yaml").write_text(content)
    assert cli.main(["train", "cfg.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hsae: error: cfg.yaml") and message in err and "Traceback" not in err


def test_bad_resume_checkpoint_exits_2_naming_what_is_missing(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(lm_config()))
    assert cli.main(["train", "cfg.yaml", "--set", "resume_from_checkpoint=nowhere"]) == 2
    assert "resume_from_checkpoint: checkpoint nowhere does not exist" in capsys.readouterr().err
    partial = tmp_path / "ck" / "4096"  # what a Ctrl-C leaves: no weights, no trainer state
    partial.mkdir(parents=True)
    (partial / "activations_store_state.safetensors").write_bytes(b"")
    assert cli.main(["train", "cfg.yaml", "--set", "resume_from_checkpoint=ck/4096"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint ck/4096 is incomplete: missing cfg.json, sae_weights.safetensors, trainer_state.pt" in err


def write_checkpoint(done: Path) -> None:
    """The four files of a checkpoint, readable (find_checkpoint skips damaged ones)."""
    done.mkdir(parents=True, exist_ok=True)
    (done / "cfg.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(done / "sae_weights.safetensors"))
    save_file({"n": torch.zeros(1)}, str(done / "activations_store_state.safetensors"))
    torch.save({"step": 1}, done / "trainer_state.pt")


def test_ctrl_c_exits_130_naming_the_checkpoint_to_resume_from(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a language-model run: SAELens's own handler then fails writing its interrupt
    checkpoint (6.54); hsae reports the interruption and the last complete checkpoint."""
    import sae_lens
    from safetensors import SafetensorError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**lm_config(), "checkpoint_path": "ck"}))

    class InterruptedRunner:
        def __init__(self, cfg, *args, **kwargs):
            self.cfg = cfg
            # what `hsae train` reads before run(): it starts b_dec at the activations' mean
            self.model = self.sae = None
            self.activations_store = SimpleNamespace(dataset=None)

        def run(self):
            for n in (1024, 2048):  # two periodic checkpoints, then the partial interrupt one
                done = Path(self.cfg.checkpoint_path) / str(n)
                done.mkdir(parents=True)
                write_checkpoint(done)
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise SafetensorError("Error while serializing: I/O error")  # noqa: B904  (as SAELens 6.54 does)

    monkeypatch.setattr(sae_lens, "LanguageModelSAETrainingRunner", InterruptedRunner)
    monkeypatch.setattr(cli.pipeline, "mean_activation", lambda *_args, **_kwargs: None)  # no model here
    assert cli.main(["train", "cfg.yaml"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("hsae: interrupted: the last complete checkpoint is ck/")
    assert "/2048; resume with: hsae train cfg.yaml --set resume_from_checkpoint=ck/" in err
