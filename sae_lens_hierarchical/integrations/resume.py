"""Seeding and checkpoint look-up: what same-seed and resumed runs need beyond SAELens.

Seeding. SAELens's runners never seed torch: `LanguageModelSAERunnerConfig.seed` only seeds
dataset shuffles, so the SAE's initial weights and the activation buffer's shuffles follow
whatever the global RNG holds. `seed_everything(seed)` seeds Python, NumPy and torch (all
devices); `hsae train` calls it with the config's `seed` before it builds a runner, and
library users call it themselves before building one.

Resuming. `LanguageModelSAETrainingRunner` resumes from `resume_from_checkpoint`: the
optimizer, LR scheduler, dead-latent counters, dataset position and the SAE's weights and
buffers (a hierarchical SAE's per-level thresholds, its tree-fit phase and, inside the
tree-fit window, its co-firing counts). SAELens writes each periodic checkpoint (every
`training_tokens / (n_checkpoints + 1)` tokens) to `<checkpoint_path>/<n_training_samples>/`
(`checkpoint_path` gets a random suffix per run). Its Ctrl-C handler saves no weights (and in
6.54 fails writing into a directory it never creates), so the last periodic checkpoint is the
one to resume from; `hsae train` prints it on Ctrl-C. `find_checkpoint(path)` accepts a
checkpoint directory or a run's checkpoint folder and returns the newest complete checkpoint.

SAELens 6.54 also saves its step counter before incrementing it, so a resumed run labels
every step one lower than the uninterrupted run did; a hierarchical SAE's checkpoint records
the steps it trained and corrects for this where the step matters to it (tree fitting).

Bit-identical resumption also needs the activation stream after the checkpoint to be the
same, and SAELens does not checkpoint its mixing buffer: the resumed run refills it from the
dataset position. The stream is identical when the buffer holds exactly one training batch
and is not shuffled: `activations_mixing_fraction: 0` and `n_batches_in_buffer *
context_size == store_batch_size_prompts * context_size == train_batch_size_tokens`
(tests/test_reproducibility.py). With a larger or shuffled buffer a resumed run continues
on the same data distribution and dataset position, but not the same batches.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHECKPOINT_FILES = (
    "cfg.json",
    "sae_weights.safetensors",
    "trainer_state.pt",
    "activations_store_state.safetensors",
)


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy (when installed) and torch on every device."""
    import torch

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        pass
    torch.manual_seed(seed)


def _missing(directory: Path) -> list[str]:
    return [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]


def damage(directory: Path) -> str | None:
    """Why a checkpoint directory that has every file cannot be read (a truncated or corrupted
    file, e.g. from a run killed while writing), or None. Opens the safetensors files (their
    header must cover the file exactly) and checks the CRCs of trainer_state.pt (a zip archive)."""
    import zipfile

    from safetensors import safe_open

    for name in CHECKPOINT_FILES:
        path = directory / name
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(path), framework="pt"):
                    pass  # opening checks the header against the file's length
            elif name.endswith(".pt"):
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad is not None:
                    return f"{path} is damaged (entry {bad} fails its checksum)"
            else:
                json.loads(path.read_text())
        except Exception as e:  # each library raises its own type for a damaged file
            return f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated'})"
    return None


def find_checkpoint(path: str | Path, report: bool = True) -> Path:
    """The checkpoint to resume from: `path` itself, or the newest complete one inside it.

    A newest checkpoint that is incomplete or damaged is skipped for the newest good one (said
    on stdout when `report`). Raises FileNotFoundError naming the directory and the files it
    lacks, or the file that is damaged.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a directory)")
    if not _missing(path):
        why = damage(path)
        if why is not None:
            raise FileNotFoundError(f"checkpoint {path} is damaged: {why}")
        return path

    def key(p: Path) -> tuple[int, float]:
        return (int(p.name) if p.name.isdigit() else -1, p.stat().st_mtime)

    subdirs = sorted((p for p in path.iterdir() if p.is_dir()), key=key, reverse=True)
    skipped: list[str] = []
    for candidate in subdirs:
        missing = _missing(candidate)
        why = f"missing {', '.join(missing)}" if missing else damage(candidate)
        if why is None:
            if skipped and report:
                print(f"resume: skipped {'; '.join(skipped)}; resuming from {candidate}", flush=True)
            return candidate
        skipped.append(f"{candidate.name} ({why})")
    where = f"; its sub-directories are unusable too ({'; '.join(skipped)})" if skipped else ""
    raise FileNotFoundError(
        f"checkpoint {path} is incomplete: missing {', '.join(_missing(path))}{where}. "
        "SAELens writes complete checkpoints when n_checkpoints > 0 (a Ctrl-C leaves a partial "
        "directory without weights)"
    )
