"""End to end through SAELens's own runners: train, watch the loss fall, save, reload.

Two routes, each at the default design (a learned tree) and two ablations of the seed design
(the hard gate on a fixed tree; per-parent subspaces, `projection_rank`):

* `LanguageModelSAETrainingRunner` with a config built by `LanguageModelSAERunnerConfig.from_dict`
  (the `sae:` section names `architecture: hierarchical`), a tiny random HookedTransformer and
  an in-memory dataset of random tokens (no network);
* `SyntheticSAERunner` on a SAELens synthetic model with a 3-level ground-truth hierarchy.

Reload contract checked on fresh inputs: the HSAE trains with BatchTopK over the batch but infers
per token with the learned per-level thresholds (a JumpReLU SAE), so the reload is checked
against a reference implementation of that rule on the trained SAE's pre-activations (relu,
keep what passes the level's threshold, then the hard gate parent by parent when the SAE gates),
plus: same class, the same tree, per-token (batch-independent), and a second load is
bit-identical to the first.
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TrainingSAE,
)
from sae_lens.synthetic import HierarchyConfig, SyntheticModelConfig, ZipfianFiringProbabilityConfig
from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from sae_lens_hierarchical import (
    HierarchicalSAE,
    HierarchicalTrainingSAE,
    HierarchicalTrainingSAEConfig,
)

# The default design and two seed-design ablations with their own inference path (the gate)
# or their own weights (per-parent factors, saved flat).
DESIGNS = {
    "learned": {},
    "gated": {"tree": "fixed", "gate": "hard"},
    "projected": {"tree": "fixed", "projection_rank": 4},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these tiny models: on a small shared CPU torch's default pool
    makes each step tens of times slower under contention. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mse_log(monkeypatch):
    """Record the mse_loss of every training step, whoever built the SAE (runner or test)."""
    log: list[float] = []
    original = HierarchicalTrainingSAE.training_forward_pass

    def recording(self, step_input):
        out = original(self, step_input)
        log.append(out.losses["mse_loss"].item())
        return out

    monkeypatch.setattr(HierarchicalTrainingSAE, "training_forward_pass", recording)
    return log


def assert_loss_falls(log: list[float], n_steps: int, factor: float) -> None:
    assert len(log) == n_steps
    first = sum(log[:5]) / 5
    tail = log[-max(1, n_steps // 5):]
    last = sum(tail) / len(tail)
    assert last < factor * first, f"mse did not fall: first steps {first:.4f}, last 20% {last:.4f}"


def reference_threshold_encode(trained: HierarchicalTrainingSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inference rule of a trained HSAE, written out: per level, relu, keep pre-activations
    above the level's learned threshold; with the hard gate, level by level, zero a latent whose
    parent (one level up) is off. Returns (activations, reconstruction with unit decoder rows)."""
    _, pre = trained.encode_with_hidden_pre(x)
    outs: list[torch.Tensor] = []
    parent = trained.tree_parent
    for level, sl in enumerate(trained.level_slices):
        z = pre[:, sl].relu() * (pre[:, sl] > trained.topk_threshold[level].to(pre.dtype))
        if trained.cfg.gate == "hard" and level > 0:
            above = trained.level_slices[level - 1]
            par = parent[sl]
            parent_on = torch.ones_like(z, dtype=torch.bool)
            has = par >= 0
            parent_on[:, has] = outs[level - 1][:, par[has] - above.start] > 0
            z = z * parent_on
        outs.append(z)
    acts = torch.cat(outs, dim=-1)
    unit = trained.W_dec / trained.W_dec.norm(dim=-1, keepdim=True)  # rescale_acts_by_decoder_norm
    return acts, acts @ unit + trained.b_dec


def check_reload(output_path, trained: HierarchicalTrainingSAE, x: torch.Tensor) -> HierarchicalSAE:
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert (output_path / name).exists(), name
    saved_cfg = json.loads((output_path / "cfg.json").read_text())
    assert saved_cfg["architecture"] == "hierarchical"
    assert saved_cfg["level_widths"] == trained.cfg.level_widths
    assert saved_cfg["gate"] == trained.cfg.gate
    details = saved_cfg["metadata"]["training_architecture_details"]
    assert details["tree"] == trained.cfg.tree and details["k"] == trained.cfg.k
    assert details["projection_rank"] == trained.cfg.projection_rank

    loaded = SAE.load_from_disk(str(output_path))
    assert type(loaded) is HierarchicalSAE
    assert torch.equal(loaded.tree_parent, trained.tree_parent)
    assert (loaded.tree_parent >= 0).any(), "the saved tree has no edges"
    trained.eval()
    with torch.no_grad():
        acts = loaded.encode(x)
        recon = loaded.decode(acts)
        # Per-level thresholds carried over, and the per-token threshold rule reproduced.
        for level, sl in enumerate(loaded.level_slices):
            assert torch.all(loaded.threshold[sl] == loaded.threshold[sl.start])
            assert loaded.threshold[sl.start].item() == pytest.approx(
                trained.topk_threshold[level].item(), rel=1e-6)
        assert trained.topk_threshold.min() > 0, "the thresholds were never learned"
        ref, ref_recon = reference_threshold_encode(trained, x)
        torch.testing.assert_close(acts, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(recon, ref_recon, atol=1e-4, rtol=1e-5)
        # Inference is per token: a sub-batch encodes the same as inside the full batch.
        torch.testing.assert_close(loaded.encode(x[:7]), acts[:7], atol=1e-6, rtol=0)
        again = SAE.load_from_disk(str(output_path))
        assert type(again) is HierarchicalSAE
        for (n1, t1), (n2, t2) in zip(loaded.state_dict().items(), again.state_dict().items()):
            assert n1 == n2 and torch.equal(t1, t2), n1
        assert torch.equal(again.encode(x), acts)
    # The saved directory also loads back as a training SAE (to continue training), with its
    # tree and per-level thresholds (its training-only fields: see
    # test_training_fields_survive_reloading_as_a_training_sae).
    back = TrainingSAE.load_from_disk(str(output_path))
    assert type(back) is HierarchicalTrainingSAE
    assert torch.equal(back.tree_parent, trained.tree_parent)
    torch.testing.assert_close(
        back.topk_threshold, trained.topk_threshold.to(back.topk_threshold.dtype), atol=1e-6, rtol=1e-6)
    on = acts > 0
    if trained.cfg.gate == "hard":
        # The hard gate holds after reload: no active latent under an inactive parent.
        has = loaded.parent_index >= 0
        assert not (on[:, has] & ~on[:, loaded.parent_index[has]]).any()
    assert on.any(), "the reloaded SAE never fires"
    for sl in loaded.level_slices:
        assert on[:, sl].any(), "a level never fires"
    return loaded


# ----------------------------------------------------------------------------------------------
# LanguageModelSAETrainingRunner

D_MODEL, N_CTX, VOCAB = 32, 32, 200
HOOK = "blocks.0.hook_resid_post"
LM_BATCH, LM_STEPS = 256, 60


@pytest.fixture(scope="module")
def tiny_lm() -> HookedTransformer:
    return HookedTransformer(HookedTransformerConfig(
        d_model=D_MODEL, d_head=8, n_heads=4, n_layers=1, n_ctx=N_CTX, d_vocab=VOCAB,
        act_fn="gelu", normalization_type="LN", seed=0, device="cpu",
    ))


def random_tokens(n_rows: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n_rows, N_CTX), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("design", list(DESIGNS))
def test_lm_runner_from_dict_trains_saves_and_reloads(design, tiny_lm, mse_log, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    out = tmp_path / "out"
    cfg = LanguageModelSAERunnerConfig.from_dict({
        "sae": {
            "architecture": "hierarchical", "d_in": D_MODEL, "d_sae": 84,
            "level_widths": [4, 16, 64], "k": 7, "tree_every": 10, **DESIGNS[design],
        },
        "logger": {"log_to_wandb": False},
        "model_name": "tiny-random", "hook_name": HOOK,
        "dataset_path": "", "is_dataset_tokenized": True, "streaming": False,
        "context_size": N_CTX, "prepend_bos": False,
        "training_tokens": LM_STEPS * LM_BATCH, "train_batch_size_tokens": LM_BATCH,
        # buffer = n_batches_in_buffer * context_size tokens must hold one training batch
        "store_batch_size_prompts": 8, "n_batches_in_buffer": 16,
        "lr": 3e-3, "device": "cpu", "seed": 0, "n_checkpoints": 0, "checkpoint_path": None,
        "output_path": str(out), "verbose": False,
    })
    assert isinstance(cfg.sae, HierarchicalTrainingSAEConfig)
    dataset = Dataset.from_dict({"tokens": random_tokens(500, seed=1).tolist()})

    if design == "learned":
        # The runner builds the SAE from cfg.sae itself (the registry route).
        runner = LanguageModelSAETrainingRunner(cfg, override_model=tiny_lm, override_dataset=dataset)
        assert type(runner.sae) is HierarchicalTrainingSAE
    else:
        sae = HierarchicalTrainingSAE(cfg.sae)
        runner = LanguageModelSAETrainingRunner(
            cfg, override_model=tiny_lm, override_dataset=dataset, override_sae=sae)
        assert runner.sae is sae
    trained = runner.run()
    assert isinstance(trained, HierarchicalTrainingSAE)
    assert_loss_falls(mse_log, LM_STEPS, factor=0.75)
    assert (out / "runner_cfg.json").exists()

    with torch.no_grad():
        _, cache = tiny_lm.run_with_cache(random_tokens(8, seed=123), names_filter=HOOK)
    x = cache[HOOK].reshape(-1, D_MODEL)
    loaded = check_reload(out, trained, x)
    assert loaded.cfg.metadata.hook_name == HOOK
    assert loaded.cfg.metadata.model_name == "tiny-random"


# ----------------------------------------------------------------------------------------------
# SyntheticSAERunner

HIDDEN = 24
SYNTH_SAMPLES, SYNTH_BATCH = 50_000, 500


def synthetic_model_cfg() -> SyntheticModelConfig:
    # 4 roots x 3 x 3 (max_depth=2 is 3 levels): 4 + 12 + 36 = 52 features, indexed root-first.
    return SyntheticModelConfig(
        num_features=52, hidden_dim=HIDDEN,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.02),
        hierarchy=HierarchyConfig(total_root_nodes=4, branching_factor=3, max_depth=2,
                                  compensate_probabilities=True),
        std_firing_magnitudes=0.1, mean_firing_magnitudes=1.0, bias=False, seed=0,
    )


@pytest.mark.parametrize("design", list(DESIGNS))
def test_synthetic_runner_trains_saves_and_reloads(design, mse_log, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    sae_cfg = HierarchicalTrainingSAEConfig(
        d_in=HIDDEN, d_sae=52, level_widths=[4, 12, 36], k=6, tree_every=20, **DESIGNS[design],
    )
    sae = HierarchicalTrainingSAE(sae_cfg)
    cfg = SyntheticSAERunnerConfig(
        synthetic_model=synthetic_model_cfg(), sae=sae_cfg,
        training_samples=SYNTH_SAMPLES, batch_size=SYNTH_BATCH, lr=3e-3, eval_samples=5_000,
        checkpoint_path=None, output_path="out", logger=LoggingConfig(log_to_wandb=False),
    )
    result = SyntheticSAERunner(cfg, override_sae=sae).run()
    assert result.sae is sae
    assert_loss_falls(mse_log, SYNTH_SAMPLES // SYNTH_BATCH, factor=0.6)

    ev = result.final_eval
    assert ev is not None
    assert 0.0 < ev.mcc <= 1.0 and ev.explained_variance > 0.3
    assert (tmp_path / "out" / "eval_stats.json").exists()
    assert (tmp_path / "out" / "runner_config.json").exists()

    x = result.synthetic_model.sample(500)
    check_reload(tmp_path / "out", result.sae, x)


def density_opt_out_cfg() -> HierarchicalTrainingSAEConfig:
    """Per-level budgets (seed-design ablation) whose deeper levels are denser, allowed by the
    opt-out, plus non-default training fields."""
    return HierarchicalTrainingSAEConfig(
        d_in=HIDDEN, d_sae=52, level_widths=[4, 12, 36], k=21, k_per_level=[1, 4, 16],
        allow_nonincreasing_sparsity=True, tree="fixed", kl_coefficient=0.2, l2_coefficient=0.05,
        tree_every=7, level_recon_weights=[0.5, 1.0, 1.0],
    )


def test_density_opt_out_reloads_as_training_sae(tmp_path):
    """An SAE trained with allow_nonincreasing_sparsity (deeper levels denser) saves a cfg.json
    that rebuilds a valid training config; its training checkpoint keeps every training field."""
    sae = HierarchicalTrainingSAE(density_opt_out_cfg())
    sae.save_inference_model(str(tmp_path / "inf"))
    assert type(SAE.load_from_disk(str(tmp_path / "inf"))) is HierarchicalSAE
    back = TrainingSAE.load_from_disk(str(tmp_path / "inf"))
    assert type(back) is HierarchicalTrainingSAE
    sae.save_model(str(tmp_path / "ckpt"))
    resumed = TrainingSAE.load_from_disk(str(tmp_path / "ckpt"))
    assert type(resumed) is HierarchicalTrainingSAE and resumed.cfg.to_dict() == sae.cfg.to_dict()


TRAINING_FIELDS = ("k", "k_per_level", "allow_nonincreasing_sparsity", "tree", "tree_every", "kl_coefficient",
                   "l2_coefficient", "level_recon_weights", "projection_rank")


def test_training_fields_survive_reloading_as_a_training_sae(tmp_path):
    sae = HierarchicalTrainingSAE(density_opt_out_cfg())
    sae.save_inference_model(str(tmp_path))
    back = TrainingSAE.load_from_disk(str(tmp_path))
    assert {f: getattr(back.cfg, f) for f in TRAINING_FIELDS} == {f: getattr(sae.cfg, f) for f in TRAINING_FIELDS}
