"""Same seed, same weights; an interrupted run resumed from its last checkpoint ends identical.

All on CPU, through SAELens's own runners, compared bit for bit (torch.equal):
* `hsae train` (the synthetic runner) twice with one seed gives identical SAEs, another seed
  a different one (SAELens never seeds torch; the CLI does, from the config's `seed`);
* LanguageModelSAETrainingRunner, seeded with `seed_everything(cfg.seed)` twice: identical;
* the same runner killed in a training step after two periodic checkpoints (an exception
  stands for the crash; SAELens's own Ctrl-C handler is not used, see resume.py), then resumed
  with `resume_from_checkpoint=find_checkpoint(<its checkpoint folder>)`, ends with the
  weights, thresholds, tree, tree schedule and saved output of the uninterrupted run, for the
  learned tree (re-assigned every 3 steps: both checkpoints fall inside a co-firing window, whose
  counts travel in the checkpoint with the schedule's step count), the gated fixed tree and the
  projected one (per-parent factors). The data stream is made resumable the way resume.py
  documents (activations_mixing_fraction 0, buffer = one training batch = one LLM batch).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_hierarchical  # noqa: F401
from sae_lens_hierarchical import HierarchicalTrainingSAE, cli
from sae_lens_hierarchical.integrations.resume import find_checkpoint, seed_everything

D, CTX, VOCAB, PROMPTS = 16, 16, 50, 4
BATCH = PROMPTS * CTX  # tokens per training step = one LLM batch = the whole mixing buffer
STEPS = 12


@pytest.fixture(autouse=True)
def one_thread_and_signals():
    """One intra-op thread (tiny models on a shared CPU); SAELens's runner installs its own
    SIGINT/SIGTERM handlers, which are put back afterwards."""
    threads, handlers = torch.get_num_threads(), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for s, h in handlers.items():
        signal.signal(s, h)


def state(sae) -> dict[str, torch.Tensor]:
    """Every tensor of the SAE, and its tree schedule (steps counted, co-firing counts)."""
    out = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    out.update(sae.schedule.state_dict())
    return out


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


# ----------------------------------------------------------------------------------------------
# hsae train: same seed, same weights


def test_cli_same_seed_same_weights_other_seed_differs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {
        "synthetic_model": {"num_features": 52, "hidden_dim": 16,
                            "firing_probability": {"generator_name": "zipfian", "exponent": 0.5,
                                                   "max_prob": 0.3, "min_prob": 0.02},
                            "hierarchy": {"total_root_nodes": 4, "branching_factor": 3, "max_depth": 2,
                                          "compensate_probabilities": True},
                            "seed": 0},
        "sae": {"d_in": 16, "d_sae": 52, "level_widths": [4, 12, 36], "k": 6, "tree_every": 3},
        "training_samples": 2000, "batch_size": 200, "lr": 0.003, "eval_samples": 0,
        "checkpoint_path": None, "output_path": "out",
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    runs = []
    for seed in (7, 7, 8):
        torch.randn(3)  # whatever the global RNG held before: the seed decides
        sae, out = cli.train("cfg.yaml", [f"seed={seed}", f"output_path=out{len(runs)}"])
        runs.append(load_file(str(Path(out) / "sae_weights.safetensors")))
    assert_identical(runs[0], runs[1])
    assert not torch.equal(runs[0]["W_dec"], runs[2]["W_dec"])


# ----------------------------------------------------------------------------------------------
# LanguageModelSAETrainingRunner: same seed; interrupted + resumed == uninterrupted


@pytest.fixture(scope="module")
def tiny_lm() -> HookedTransformer:
    return HookedTransformer(HookedTransformerConfig(
        d_model=D, d_head=8, n_heads=2, n_layers=1, n_ctx=CTX, d_vocab=VOCAB, act_fn="gelu",
        normalization_type="LN", seed=0, device="cpu"))


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    g = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"tokens": torch.randint(0, VOCAB, (200, CTX), generator=g).tolist()})


# The default design (a learned tree by direction among co-firing latents, re-assigned every 3
# of the 12 steps: its co-firing counts are state a checkpoint must carry), the tree by decoder
# direction alone (no counts) and two ablations of the seed design with their own state: the
# hard gate on a fixed tree, per-parent factors.
SAES = {
    "learned": {"tree_every": 3},
    "decoder": {"tree_every": 3, "tree_assign": "decoder"},
    "gated": {"tree": "fixed", "gate": "hard"},
    "projected": {"tree": "fixed", "projection_rank": 4},
}


def sae_fields(design: str = "learned") -> dict:
    return {"architecture": "hierarchical", "d_in": D, "d_sae": 84, "level_widths": [4, 16, 64], "k": 7,
            **SAES[design]}


def lm_cfg(tmp_path: Path, name: str, sae: dict | None = None, **kw) -> LanguageModelSAERunnerConfig:
    d = {
        "sae": sae or sae_fields(),
        "logger": {"log_to_wandb": False}, "model_name": "tiny", "hook_name": "blocks.0.hook_resid_post",
        "dataset_path": "", "is_dataset_tokenized": True, "streaming": False, "context_size": CTX,
        "prepend_bos": False, "training_tokens": STEPS * BATCH, "train_batch_size_tokens": BATCH,
        "store_batch_size_prompts": PROMPTS, "n_batches_in_buffer": BATCH // CTX,
        "activations_mixing_fraction": 0.0, "lr": 3e-3, "device": "cpu", "seed": 3,
        "n_checkpoints": 2, "checkpoint_path": str(tmp_path / name / "checkpoints"),
        "output_path": str(tmp_path / name / "out"), "verbose": False,
    }
    d.update(kw)
    return LanguageModelSAERunnerConfig.from_dict(d)


def run_lm(cfg, tiny_lm, dataset) -> dict[str, torch.Tensor]:
    seed_everything(cfg.seed)
    sae = LanguageModelSAETrainingRunner(cfg, override_model=tiny_lm, override_dataset=dataset).run()
    return state(sae)


def test_lm_runner_same_seed_same_weights(tiny_lm, dataset, tmp_path):
    a = run_lm(lm_cfg(tmp_path, "a", n_checkpoints=0), tiny_lm, dataset)
    torch.randn(5)  # disturb the global RNG in between
    b = run_lm(lm_cfg(tmp_path, "b", n_checkpoints=0), tiny_lm, dataset)
    assert_identical(a, b)
    c = run_lm(lm_cfg(tmp_path, "c", n_checkpoints=0, seed=4), tiny_lm, dataset)
    assert not torch.equal(a["W_dec"], c["W_dec"])


@pytest.mark.parametrize("design", list(SAES))
def test_interrupted_run_resumed_from_last_checkpoint_matches_uninterrupted(
        design, tiny_lm, dataset, tmp_path, monkeypatch):
    sae = sae_fields(design)
    uninterrupted = run_lm(lm_cfg(tmp_path, "full", sae), tiny_lm, dataset)
    full_out = load_file(str(tmp_path / "full" / "out" / "sae_weights.safetensors"))

    # The process dies during step 10: periodic checkpoints were written after steps 4 and 8
    # (n_checkpoints=2 over 12 steps, named by the samples seen: 5 and 9 batches).
    original = HierarchicalTrainingSAE.training_forward_pass

    def crashing(self, step_input):
        if step_input.n_training_steps == 10:
            raise RuntimeError("simulated crash")
        return original(self, step_input)

    monkeypatch.setattr(HierarchicalTrainingSAE, "training_forward_pass", crashing)
    cfg = lm_cfg(tmp_path, "interrupted", sae)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_lm(cfg, tiny_lm, dataset)
    monkeypatch.setattr(HierarchicalTrainingSAE, "training_forward_pass", original)
    written = sorted(int(p.name) for p in Path(cfg.checkpoint_path).iterdir())
    assert written == [5 * BATCH, 9 * BATCH]
    last = find_checkpoint(cfg.checkpoint_path)  # the run's checkpoint folder -> newest
    assert last.name == str(9 * BATCH)
    late = load_file(str(last / "sae_weights.safetensors"))
    early = load_file(str(Path(cfg.checkpoint_path) / str(5 * BATCH) / "sae_weights.safetensors"))
    # The schedule's own step count travels with the checkpoint (SAELens's label is one lower).
    assert int(early["_schedule_steps"]) == 5 and int(late["_schedule_steps"]) == 9
    if design == "decoder":
        # The tree by decoder direction reads the weights: nothing counted, a tree all the same.
        assert not any(k.startswith("_schedule_co") for k in late)
        assert (late["tree_parent"] >= 0).any()
    elif design == "learned":
        # Re-assigned before steps 3, 6 and 9 (0-based): the first checkpoint holds the counts of
        # steps 3-4, the second those of steps 6-8, which the tree is re-assigned from next.
        for ck in (early, late):
            assert {"_schedule_co_l1", "_schedule_co_l2", "_schedule_fired_l1", "_schedule_fired_l2"} <= set(ck)
            assert ck["_schedule_fired_l2"].sum() > 0 and ck["_schedule_co_l2"].sum() > 0
            assert (ck["tree_parent"] >= 0).any()  # assigned at least once already
    else:
        # A fixed tree counts no co-firing; its tree is the fixed layout throughout.
        assert not any(k.startswith("_schedule_co") for k in late)
        torch.testing.assert_close(late["tree_parent"], uninterrupted["tree_parent"])
    if design == "projected":
        assert "dec_basis_l1" in late and "W_dec" not in late  # the factors are the checkpoint's weights

    resumed = run_lm(lm_cfg(tmp_path, "resumed", sae, resume_from_checkpoint=str(last)), tiny_lm, dataset)
    assert_identical(uninterrupted, resumed)
    resumed_out = load_file(str(tmp_path / "resumed" / "out" / "sae_weights.safetensors"))
    assert_identical(full_out, resumed_out)

    if design in ("learned", "decoder"):
        # Resuming from the first checkpoint, inside another re-assignment window: same end.
        early_dir = Path(cfg.checkpoint_path) / str(5 * BATCH)
        from_early = run_lm(lm_cfg(tmp_path, "resumed-early", sae, resume_from_checkpoint=str(early_dir)),
                            tiny_lm, dataset)
        assert_identical(uninterrupted, from_early)
