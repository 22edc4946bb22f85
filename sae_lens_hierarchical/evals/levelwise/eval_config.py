"""Config of the levelwise eval (the standard metrics broken down per level of the tree)."""

from pydantic import Field
from pydantic.dataclasses import dataclass

from sae_lens_hierarchical.evals.base_config import TreeEvalConfig


@dataclass
class LevelwiseEvalConfig(TreeEvalConfig):
    tree_fit_fraction: float = Field(
        default=0.5,
        title="Tree Fit Fraction",
        description=(
            "Fraction of the tokens a post-hoc tree is fitted on; the metrics use the other "
            "tokens (for native trees too). 0 fits and scores on all tokens."
        ),
    )
    run_sparse_probing: bool = Field(
        default=True,
        title="Run Sparse Probing",
        description=(
            "Run SAE-Bench's sparse probing once per level with only that level's latents. "
            "Its datasets are read with datasets.load_dataset (the Hub, or a local folder of "
            "the same name under the working directory); when they cannot be read the step is "
            "skipped and the reason recorded."
        ),
    )
    sparse_probing_dataset_names: list[str] = Field(
        default_factory=lambda: ["LabHC/bias_in_bios_class_set1"],
        title="Sparse Probing Datasets",
        description="SAE-Bench sparse-probing dataset names (see SparseProbingEvalConfig.dataset_names).",
    )
    probe_train_set_size: int = Field(default=4000, title="Probe Train Set Size", description="Probe train set size.")
    probe_test_set_size: int = Field(default=1000, title="Probe Test Set Size", description="Probe test set size.")
    probe_context_length: int = Field(
        default=128, title="Probe Context Length", description="Tokens per probing text (longer texts are cut)."
    )
    probe_k_values: list[int] = Field(
        default_factory=lambda: [1, 2, 5],
        title="Probe K Values",
        description="Numbers of latents the k-sparse probes may use; each must be one of 1, 2, 5, 10, 20, 50.",
    )
    probe_sae_batch_size: int = Field(
        default=125, title="Probe SAE Batch Size", description="SAE batch size while probing."
    )
    run_autointerp: bool = Field(
        default=True,
        title="Run Autointerp",
        description=(
            "Score a sample of each level's latents with SAE-Bench's autointerp "
            "(override_latents) when an LLM judge is configured: an API key in the environment "
            "variable autointerp_api_key_env (or api_key= to run_eval). Otherwise skipped."
        ),
    )
    autointerp_api_key_env: str = Field(
        default="OPENAI_API_KEY",
        title="Autointerp API Key Variable",
        description=(
            "Environment variable holding the judge's API key. SAE-Bench's autointerp calls "
            "gpt-4o-mini through the openai client, which also honours OPENAI_BASE_URL "
            "(an OpenAI-compatible server)."
        ),
    )
    autointerp_latents_per_level: int = Field(
        default=10,
        title="Autointerp Latents per Level",
        description="Latents judged per level, drawn at random among the level's live latents.",
    )
