"""Tree accessors shared by the inference and the training SAE (`tree_parent` is a buffer of both),
and the checksum both write when they save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sae_lens_hierarchical import state_io
from sae_lens_hierarchical.tree import children_of, level_of_latents, path_to


class TreeAccess:
    """`parent_index`, `latent_levels`, `level_slices`, `children(j)`, `path(j)`: what the evals,
    the reports and a user walking the tree read."""

    cfg: Any
    tree_parent: torch.Tensor

    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """SAELens's save, plus the tensors' checksum in cfg.json (`state_io.write_checksum`)."""
        paths = super().save_model(path)  # type: ignore[misc]
        state_io.write_checksum(*paths)
        return paths

    @property
    def n_levels(self) -> int:
        return len(self.cfg.level_widths)

    @property
    def level_slices(self) -> list[slice]:
        return self.cfg.level_slices

    @property
    def parent_index(self) -> torch.Tensor:
        """LongTensor [d_sae]: each latent's parent, -1 for roots and for latents outside the tree."""
        return self.tree_parent

    @property
    def latent_levels(self) -> torch.Tensor:
        """LongTensor [d_sae]: the level of each latent."""
        return level_of_latents(self.cfg.level_widths).to(self.tree_parent.device)

    @property
    def outside_tree(self) -> torch.Tensor:
        """BoolTensor [d_sae]: latents below the roots that have no parent."""
        return (self.tree_parent < 0) & (self.latent_levels > 0)

    def level_of(self, j: int) -> int:
        if not 0 <= j < self.cfg.d_sae:
            raise IndexError(f"latent {j} is outside the SAE (d_sae={self.cfg.d_sae})")
        return int(self.latent_levels[j])

    def tree_children(self, j: int) -> list[int]:
        """The latents whose parent is j."""
        self.level_of(j)  # range check
        return children_of(self.tree_parent, j)

    def children(self, j: int | None = None) -> Any:  # type: ignore[override]
        """Latent j's children; called without j it is nn.Module.children() (the sub-modules),
        which torch itself relies on, so both meanings share the name."""
        if j is None:
            return nn.Module.children(self)  # type: ignore[arg-type]
        return self.tree_children(j)

    def path(self, j: int) -> list[int]:
        """Latents from the root down to latent j (inclusive)."""
        self.level_of(j)
        return path_to(self.tree_parent, j)
