"""Tiny models, tokenizers, datasets and SAEs for the eval tests (built here, no Hub).

* `tiny_model`: a 1-layer random HookedTransformer (d_model 16) with a word-level tokenizer
  over made-up lowercase words, saved to a temporary folder and reloaded with AutoTokenizer
  (TransformerLens reloads tokenizers by path).
* `token_dataset`: a pretokenized in-memory `datasets.Dataset` of random words, BOS first.
* `perfect_hsae()`: a hand-built hierarchical SAE (the fixed layout as its tree) whose children
  copy their parent's encoder column, so a child fires exactly when its parent does: a perfect
  tree (HCS 1, Hamming 0, KL 0) on any input.
* `nested_flat_sae()`: a flat StandardSAE with planted nesting (child = parent's encoder with
  a lower bias), whose post-hoc tree is known.
* `planted_features()` + `planted_sae()`: activations made of orthonormal features that fire
  down a planted tree, and an SAE (hierarchical, with any tree and gate, or flat) whose latent
  j reads and writes feature j, so latent j fires exactly when feature j does, with its
  magnitude, and reconstructs x exactly.
* `trained_hsae()`: a hierarchical SAE after a few training steps, saved for inference and
  loaded back.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from sae_lens.saes.sae import SAEMetadata, TrainStepInput

import sae_lens_hierarchical as h
from sae_lens_hierarchical.tree import fixed_parents

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


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def metadata(model_name: str = MODEL_NAME, hook: str = HOOK) -> SAEMetadata:
    return SAEMetadata(model_name=model_name, hook_name=hook, context_size=CTX, prepend_bos=True)


def hsae(widths: Sequence[int] = (4, 8, 16), d_in: int = D_MODEL, seed: int = 0, gate: str = "none",
         parent: torch.Tensor | None = None, **meta) -> h.HierarchicalSAE:
    """A HierarchicalSAE with unit-norm decoder rows, W_enc = W_dec.T, zero biases and
    thresholds, and `parent` (default: the fixed layout) as its tree."""
    torch.manual_seed(seed)
    cfg = h.HierarchicalSAEConfig(d_in=d_in, d_sae=sum(widths), level_widths=list(widths), gate=gate,
                                  metadata=metadata(**meta))
    sae = h.HierarchicalSAE(cfg)
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.zero_()
        sae.tree_parent.copy_(fixed_parents(list(widths)) if parent is None else parent)
    return sae


def perfect_hsae(widths=(4, 8, 16), d_in: int = D_MODEL, seed: int = 0, gate: str = "none", **meta) -> h.HierarchicalSAE:
    """Children share their parent's encoder column and bias: child on <=> parent on."""
    sae = hsae(widths, d_in, seed, gate, **meta)
    parent = sae.parent_index
    with torch.no_grad():
        for sl in sae.level_slices[1:]:  # level by level, so a grandchild copies the copied column
            for j in range(sl.start, sl.stop):
                sae.W_enc[:, j] = sae.W_enc[:, int(parent[j])]
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


def planted_features(parent: torch.Tensor, p_on: Sequence[float] | torch.Tensor, n: int = 4000, d_in: int | None = None,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens made of orthonormal features that fire down a planted tree.

    parent: Long[n_feat], each feature's parent (-1: it fires on its own); parents must come
        before their children. Feature j fires with probability p_on[j] where its parent fires
        (everywhere for parentless ones), with a magnitude uniform in [1, 2].
    Returns (x [n, d_in], magnitudes [n, n_feat] (0 where off), directions [n_feat, d_in]).
    """
    n_feat = parent.numel()
    d_in = d_in or n_feat
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d_in, d_in, generator=g)).Q[:, :n_feat].T.contiguous()  # [n_feat, d_in]
    p = torch.as_tensor(p_on, dtype=torch.float).expand(n_feat)
    on = torch.zeros(n, n_feat, dtype=torch.bool)
    for j in range(n_feat):
        own = torch.rand(n, generator=g) < p[j]
        on[:, j] = own if parent[j] < 0 else own & on[:, int(parent[j])]
    mags = (1 + torch.rand(n, n_feat, generator=g)) * on
    return mags @ q, mags, q


def planted_sae(directions: torch.Tensor, level_widths: Sequence[int] | None = None, parent: torch.Tensor | None = None,
                gate: str = "none", flat: bool = False, **meta):
    """An SAE whose latent j reads and writes feature j (W_enc = directions.T, W_dec = directions,
    zero biases, threshold 0.1): a HierarchicalSAE with `level_widths` and tree `parent`, or
    with flat=True a plain SAELens JumpReLU SAE (no tree)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    n_feat, d_in = directions.shape
    if flat:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=n_feat, metadata=metadata(**meta)))
    else:
        sae = hsae(level_widths, d_in, gate=gate, parent=parent, **meta)
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(0.1)
    return sae


def trained_hsae(tmp_path: Path, steps: int = 10) -> h.HierarchicalSAE:
    """A hierarchical SAE after a few training steps (learned tree re-assigned every 5 steps),
    saved for inference and loaded back."""
    from sae_lens import SAE

    torch.manual_seed(0)
    cfg = h.HierarchicalTrainingSAEConfig(d_in=D_MODEL, d_sae=84, level_widths=[4, 16, 64], k=6, tree_every=5)
    sae = h.HierarchicalTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=torch.randn(128, D_MODEL, generator=g), coefficients={}, dead_neuron_mask=None,
            n_training_steps=i, is_logging_step=False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    sae.save_inference_model(str(tmp_path / "trained"))
    loaded = SAE.load_from_disk(str(tmp_path / "trained"))
    loaded.cfg.metadata = metadata()
    return loaded
