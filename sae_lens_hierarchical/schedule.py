"""When the learned tree is re-assigned, from which counts, and how that survives a resume.

The schedule counts its own training steps rather than reading SAELens's step label (SAELens
6.54 saves its counter before incrementing it, so a resumed run labels every step one lower),
and a training checkpoint carries its step count and the co-firing counts of the current
window. A resumed run therefore re-assigns the tree at the same steps, from the same counts,
as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_lens_hierarchical.integrations import distributed
from sae_lens_hierarchical.tree import CoFiring, learned_parents, similar_parents

PREFIX = "_schedule_"  # checkpoint tensors of the schedule (never in an inference file)


class TreeSchedule:
    """Re-assigns a learned tree every `cfg.tree_every` steps from the co-firing of those steps."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.learned = cfg.tree == "learned"
        self.counts = CoFiring(cfg.level_widths)
        self.steps_done = 0

    def before_step(self, sae: Any) -> None:
        """Re-assign the tree when a window is complete (before the forward pass uses it)."""
        if not (self.learned and self.steps_done > 0 and self.steps_done % self.cfg.tree_every == 0):
            return
        assign = self.cfg.tree_assign
        if assign in ("encoder", "decoder"):  # from the weights, identical on every rank: nothing to reduce
            rows = sae.W_enc.detach().T if assign == "encoder" else sae.W_dec.detach()
            sae.tree_parent.copy_(similar_parents(rows, self.cfg.level_widths, self.cfg.tree_unassigned))
        elif self.counts.co:
            self.reduce_counts()
            if assign == "cofire":
                new = learned_parents(self.counts, sae.tree_parent, self.cfg.tree_min_cofire)
            else:  # "decoder_cofire"
                rows = sae.W_dec.detach()
                new = similar_parents(
                    rows, self.cfg.level_widths, self.cfg.tree_unassigned, self.counts, self.cfg.tree_min_lift
                )
            sae.tree_parent.copy_(new)
            self.counts.reset()

    def reduce_counts(self) -> None:
        """Sum the window's co-firing counts over data-parallel ranks (a no-op in one process)."""
        for t in self.counts.state().values():
            distributed.sum_(t)

    def share_counts(self) -> None:
        """After `reduce_counts` (or loading a checkpoint's global counts): each of N ranks keeps
        1/N of them, so the next reduction sums to the global counts again."""
        n = distributed.world_size()
        if n > 1:
            for t in self.counts.state().values():
                t.div_(n)

    def after_step(self, acts: torch.Tensor, training: bool) -> None:
        """Count this step's co-firing (training steps only)."""
        if not training:
            return
        if self.learned and self.cfg.tree_assign in ("cofire", "decoder_cofire"):
            self.counts.add(acts.detach())
        self.steps_done += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"{PREFIX}steps": torch.tensor(self.steps_done, dtype=torch.long)}
        out.update({f"{PREFIX}{k}": v.detach().clone() for k, v in self.counts.state().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps_done = int(state.get(f"{PREFIX}steps", torch.tensor(0)))
        self.counts.load({k[len(PREFIX) :]: v for k, v in state.items() if k != f"{PREFIX}steps"})
        self.share_counts()  # a checkpoint holds the global counts


def pop_schedule_state(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Take the schedule's tensors out of a (checkpoint) state dict."""
    return {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(PREFIX)]}
