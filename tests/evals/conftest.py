"""Tiny models, tokenizers, datasets and SAEs for the eval tests (built here, no Hub).

* `tiny_model`: a 1-layer random HookedTransformer (d_model 16) with a word-level tokenizer
  over made-up lowercase words, saved to a temporary folder and reloaded with AutoTokenizer
  (TransformerLens reloads tokenizers by path).
* `token_dataset`: a pretokenized in-memory `datasets.Dataset` of random words, BOS first.
* `perfect_hsae()`: a hand-built hierarchical SAE whose children copy their parent's encoder
  column, so a child fires exactly when its parent does: a perfect tree (HCS 1, Hamming 0,
  KL 0) on any input.
* `nested_flat_sae()`: a flat StandardSAE with planted nesting (child = parent's encoder with
  a lower bias), whose post-hoc tree is known.
"""

from __future__ import annotations

import random
import string
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (builders.py)

import sae_lens_hierarchical as h  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

D_MODEL = 16
CTX = 32
HOOK = "blocks.0.hook_resid_post"
MODEL_NAME = "tiny-evals"
SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_words(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7))))
    return sorted(words)


WORDS = make_words()


def save_word_tokenizer(path: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(str(path))
    return path


def build_model(tok_dir: Path, model_name: str = MODEL_NAME, d_model: int = D_MODEL, n_layers: int = 1, seed: int = 0,
                n_ctx: int = 32, normalization_type: str | None = "LN"):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return HookedTransformer(
        HookedTransformerConfig(
            d_model=d_model, d_head=8, n_heads=2, n_layers=n_layers, n_ctx=n_ctx, d_vocab=len(tok),
            act_fn="gelu", normalization_type=normalization_type, seed=seed, device="cpu",
            model_name=model_name,
        ),
        tokenizer=tok,
    )


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return save_word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


@pytest.fixture(scope="session")
def tiny_model(tokenizer_dir):
    return build_model(tokenizer_dir)


def random_token_rows(n: int, ctx: int = CTX, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(SPECIALS), len(SPECIALS) + len(WORDS), (n, ctx), generator=g)
    rows[:, 0] = 0  # <bos>
    return rows


@pytest.fixture(scope="session")
def token_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"tokens": random_token_rows(64).tolist()})


def metadata(model_name: str = MODEL_NAME, hook: str = HOOK) -> SAEMetadata:
    return SAEMetadata(model_name=model_name, hook_name=hook, context_size=CTX, prepend_bos=True)


def perfect_hsae(widths=(4, 8, 16), d_in: int = D_MODEL, seed: int = 0, **meta) -> h.HierarchicalSAE:
    """Children share their parent's encoder column and bias: child on <=> parent on."""
    torch.manual_seed(seed)
    cfg = h.HierarchicalSAEConfig(
        d_in=d_in, d_sae=sum(widths), level_widths=list(widths), variant="relu",
        projection_rank=None, metadata=metadata(**meta),
    )
    sae = h.HierarchicalSAE(cfg)
    with torch.no_grad():
        for level in range(1, len(widths)):
            b = widths[level] // widths[level - 1]
            parent = sae.level_W_enc(level - 1)
            sae.level_W_enc(level).copy_(parent.repeat_interleave(b, dim=1))
        sae.b_enc.zero_()
    return sae


def nested_flat_sae(n_parents: int = 4, d_in: int = D_MODEL, seed: int = 0, **meta):
    """StandardSAE: latents 0..P-1 are parents (orthonormal encoder columns, bias -0.8), latent
    P+i copies parent i's column with bias -1.6, so it fires on a strict subset of parent i's
    tokens. Decoder rows are unit-norm. Returns (sae, true parent_index)."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    d_sae = 2 * n_parents
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata(**meta)))
    q = torch.linalg.qr(torch.randn(d_in, d_in)).Q[:, :n_parents]
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([q, q], dim=1))
        sae.b_enc.copy_(torch.cat([torch.full((n_parents,), -0.8), torch.full((n_parents,), -1.6)]))
        w = torch.randn(d_sae, d_in)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.b_dec.zero_()
    parent = torch.cat([torch.full((n_parents,), -1), torch.arange(n_parents)])
    return sae, parent


BIOS_CLASSES = [0, 1, 2, 6, 9]  # SAE-Bench's LabHC/bias_in_bios_class_set1


def write_bias_in_bios(root: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> Path:
    """A local stand-in for LabHC/bias_in_bios at root/LabHC/bias_in_bios/{train,test}.parquet.

    Same schema as the real dataset (hard_text, profession, gender). Each profession's bios
    use words from its own part of the vocabulary, so the classes are learnable.
    `datasets.load_dataset("LabHC/bias_in_bios")` reads this folder when run from `root`.
    """
    import pandas as pd

    rng = random.Random(seed)
    per_class = len(WORDS) // (len(BIOS_CLASSES) + 1)

    def rows(n: int) -> list[dict]:
        out = []
        for ci, prof in enumerate(BIOS_CLASSES):
            own = WORDS[ci * per_class : (ci + 1) * per_class]
            shared = WORDS[len(BIOS_CLASSES) * per_class :]
            for gender in (0, 1):
                for _ in range(n):
                    text = " ".join(rng.choice(own if rng.random() < 0.5 else shared) for _ in range(12))
                    out.append({"hard_text": text, "profession": prof, "gender": gender})
        return out

    folder = root / "LabHC" / "bias_in_bios"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows(n_train)).to_parquet(folder / "train.parquet")
    pd.DataFrame(rows(n_test)).to_parquet(folder / "test.parquet")
    return root
