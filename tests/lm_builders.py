"""Tiny language models with real tokenizers, built offline, for the demo, pipeline and config tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]
WORDS = [
    "the", "king", "queen", "lord", "lady", "sword", "crown", "love", "death", "night", "day",
    "speak", "hath", "thou", "thee", "my", "your", "good", "noble", "sweet", "come", "go",
    "and", "of", "to", "is", "not", "what", "now", "here",
]


def documents(n_docs: int = 6, n_words: int = 700, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n_words)) for _ in range(n_docs)]


def word_tokenizer(folder: Path) -> Any:
    """A word-level tokenizer over WORDS (plus BOS/EOS/PAD/UNK), saved to `folder` and loaded
    back: TransformerLens re-instantiates tokenizers by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
    ).save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def tiny_lm(folder: Path, *, d_model: int = 16, n_layers: int = 2, n_ctx: int = 16,
            prepend_bos: bool = False, name: str = "tiny-lm") -> Any:
    """A random LayerNorm/GELU HookedTransformer with the word tokenizer."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = word_tokenizer(folder)
    return HookedTransformer(HookedTransformerConfig(
        d_model=d_model, d_head=8, n_heads=max(1, d_model // 8), n_layers=n_layers, n_ctx=n_ctx,
        d_vocab=len(tok), act_fn="gelu", normalization_type="LN", seed=0, device="cpu",
        model_name=name, default_prepend_bos=prepend_bos,
    ), tokenizer=tok)
