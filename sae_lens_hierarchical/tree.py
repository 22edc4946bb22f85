"""The tree: each latent's parent one level up, how it is learned, and the parent gate.

A tree is a LongTensor `parent[d_sae]`: -1 for roots (level 0) and for latents outside the
tree (a deeper latent that co-fires with no parent often enough), else the index of a latent
in the level above. Levels are contiguous slices of the latent axis, roots first.

* `fixed_parents`: the seed design's layout, children contiguous, w_l / w_{l-1} per parent.
* `CoFiring` + `learned_parents`: the learned tree. Over a window of training steps, count how
  often each latent fires together with each latent one level up; each latent then takes as
  parent its most specific ancestor: the least frequent latent one level up that fires on at
  least half of its firings (else the one it co-fires with most, or none below `min_cofire`).
  Branching is uneven: a parent keeps whatever children choose it.
* `gate`: zero every latent whose parent is off, level by level (the hard gate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def level_of_latents(level_widths: Sequence[int]) -> torch.Tensor:
    """LongTensor [d_sae]: the level of each latent."""
    return torch.repeat_interleave(torch.arange(len(level_widths)), torch.tensor(list(level_widths)))


def _starts(level_widths: Sequence[int]) -> list[int]:
    out = [0]
    for w in level_widths[:-1]:
        out.append(out[-1] + w)
    return out


def fixed_parents(level_widths: Sequence[int]) -> torch.Tensor:
    """The contiguous layout: latent i of level l has parent i // b_l of level l-1."""
    starts = _starts(level_widths)
    parts = [torch.full((level_widths[0],), -1, dtype=torch.long)]
    for level in range(1, len(level_widths)):
        b = level_widths[level] // level_widths[level - 1]
        parts.append(starts[level - 1] + torch.arange(level_widths[level]) // b)
    return torch.cat(parts)


def no_parents(level_widths: Sequence[int]) -> torch.Tensor:
    """Every latent outside the tree: where a learned tree starts before its first assignment."""
    return torch.full((sum(level_widths),), -1, dtype=torch.long)


class CoFiring:
    """Co-firing counts of each latent with every latent one level up, over a window of steps."""

    def __init__(self, level_widths: Sequence[int]):
        self.level_widths = list(level_widths)
        self.starts = _starts(self.level_widths)
        self.reset()

    def reset(self) -> None:
        # per child level l >= 1: co[l] [n_l, n_{l-1}], fired[l] [n_l]
        self.co: dict[int, torch.Tensor] = {}
        self.fired: dict[int, torch.Tensor] = {}
        self.parent_fired: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}  # per child level (all equal): the window's tokens

    @torch.no_grad()
    def add(self, acts: torch.Tensor) -> None:
        """Count one batch of activations [..., d_sae] (on = act > 0)."""
        on = (acts.reshape(-1, acts.shape[-1]) > 0).to(acts.dtype if acts.is_floating_point() else torch.float)
        for level in range(1, len(self.level_widths)):
            child = on[:, self.starts[level] : self.starts[level] + self.level_widths[level]]
            parent = on[:, self.starts[level - 1] : self.starts[level - 1] + self.level_widths[level - 1]]
            co, fired, parent_fired = child.T @ parent, child.sum(0), parent.sum(0)
            tokens = torch.tensor(float(on.shape[0]), dtype=torch.float64, device=on.device)
            if level in self.co:
                self.co[level] += co.to(self.co[level])
                self.fired[level] += fired.to(self.fired[level])
                self.parent_fired[level] += parent_fired.to(self.parent_fired[level])
                self.tokens[level] = self.tokens.get(level, torch.zeros_like(tokens)) + tokens
            else:
                self.co[level], self.fired[level] = co.double(), fired.double()
                self.parent_fired[level], self.tokens[level] = parent_fired.double(), tokens

    def state(self) -> dict[str, torch.Tensor]:
        """The counts as named tensors (for a training checkpoint)."""
        out = {}
        for level in self.co:
            out[f"co_l{level}"] = self.co[level]
            out[f"fired_l{level}"] = self.fired[level]
            out[f"parentfired_l{level}"] = self.parent_fired[level]
            if level in self.tokens:
                out[f"tokens_l{level}"] = self.tokens[level]
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        by_kind = {"co": self.co, "fired": self.fired, "parentfired": self.parent_fired, "tokens": self.tokens}
        for name, value in state.items():
            kind, level = name.rsplit("_l", 1)
            by_kind[kind][int(level)] = value.double()


SPECIFIC = 0.5
"""A parent candidate must fire on at least this share of its child's firings; among candidates the
least frequent one is taken (the most specific ancestor, as the post-hoc co-firing tree does)."""


@torch.no_grad()
def learned_parents(counts: CoFiring, current: torch.Tensor, min_cofire: float) -> torch.Tensor:
    """Each latent's new parent from the co-firing `counts`.

    Among the latents one level up that fire on at least half of the latent's firings
    (P(parent on | latent on) >= 0.5), the least frequent one: the most specific ancestor. The
    plain argmax of P(parent | latent) picks whichever parent fires most often, and an always-on
    latent then becomes everyone's parent. When no latent reaches 0.5, the one with the highest
    P(parent | latent) if that is at least `min_cofire`, else none (-1). Latents that never fired
    in the window keep their `current` parent.
    """
    parent = current.clone()
    for level, co in counts.co.items():
        fired = counts.fired[level]
        start, n = counts.starts[level], counts.level_widths[level]
        p_parent = co / fired.clamp(min=1).unsqueeze(-1)  # [n_l, n_{l-1}]
        parent_rate = counts.parent_fired[level]  # [n_{l-1}] firings of each candidate
        specific = torch.where(p_parent >= SPECIFIC, -parent_rate.unsqueeze(0), torch.tensor(-torch.inf))
        best, arg = p_parent.max(-1)
        choice = torch.where(torch.isfinite(specific).any(-1), specific.argmax(-1), arg)
        ok = torch.isfinite(specific).any(-1) | (best >= min_cofire)
        new = torch.where(ok, choice + counts.starts[level - 1], torch.full_like(arg, -1))
        parent[start : start + n] = torch.where(fired > 0, new.to(parent), current[start : start + n])
    return parent


@torch.no_grad()
def similar_parents(
    rows: torch.Tensor,
    level_widths: Sequence[int],
    unassigned: float,
    counts: CoFiring | None = None,
    min_lift: float = 0.0,
) -> torch.Tensor:
    """Each latent's parent by direction rather than co-firing (Luo et al. 2026): the latent one
    level up whose row (encoder or decoder direction, `rows` [d_sae, d]) has the highest cosine
    with its own. Per level, the `unassigned` share of latents with the lowest best cosine keep no
    parent. Unlike co-firing, this can tie a child to a parent that does not (yet) fire with it
    (the hope: a necessity loss then undoes absorption; on SmolLM2 it did not, docs/benchmarks.md).

    With co-firing `counts` (the hybrid rule), a latent chooses by cosine only among the latents
    one level up that fire on at least half of its firings, when there are any; latents with no
    such candidate fall back to the plain rule and are the first left outside the tree. With
    `min_lift` > 0 a candidate must also fire on the latent's firings at least `min_lift` times
    as often as on all tokens, so a latent that fires everywhere is no one's candidate.
    """
    unit = torch.nn.functional.normalize(rows.float(), dim=-1)
    starts = _starts(level_widths)
    parent = no_parents(level_widths).to(rows.device)
    for level in range(1, len(level_widths)):
        child = unit[starts[level] : starts[level] + level_widths[level]]
        above = unit[starts[level - 1] : starts[level - 1] + level_widths[level - 1]]
        score = child @ above.T  # cosines, in [-1, 1]
        if counts is not None and level in counts.co:
            p_parent = counts.co[level] / counts.fired[level].clamp(min=1).unsqueeze(-1)
            candidate = p_parent >= SPECIFIC
            if min_lift > 0:
                rate = counts.parent_fired[level] / counts.tokens[level].clamp(min=1)
                candidate &= p_parent >= min_lift * rate.unsqueeze(0)
            score = score + 2 * candidate.to(score)  # a co-firing candidate beats any other
        best, arg = score.max(-1)
        keep = torch.ones_like(best, dtype=torch.bool)
        n_out = int(unassigned * best.numel())
        if n_out > 0:
            keep[best.argsort()[:n_out]] = False
        parent[starts[level] : starts[level] + level_widths[level]] = torch.where(keep, arg + starts[level - 1], -1)
    return parent


def gate(acts: torch.Tensor, parent: torch.Tensor, level_widths: Sequence[int]) -> torch.Tensor:
    """Zero every latent whose parent is off, level by level from the roots (so a latent whose
    grandparent is off goes too). Latents without a parent are never gated. acts [..., d_sae]."""
    starts = _starts(level_widths)
    levels = list(acts.split(list(level_widths), dim=-1))
    for level in range(1, len(level_widths)):
        par = parent[starts[level] : starts[level] + level_widths[level]]
        above = levels[level - 1]
        on = torch.cat([above > 0, above.new_ones(*above.shape[:-1], 1, dtype=torch.bool)], dim=-1)
        local = torch.where(par >= 0, par - starts[level - 1], above.shape[-1])  # no parent -> "on"
        levels[level] = levels[level] * on[..., local]
    return torch.cat(levels, dim=-1)


def children_of(parent: torch.Tensor, j: int) -> list[int]:
    """The latents whose parent is j."""
    return (parent == j).nonzero().flatten().tolist()


def path_to(parent: torch.Tensor, j: int) -> list[int]:
    """Latents from the root of j's tree down to j (inclusive)."""
    parents = parent.tolist()
    out = [int(j)]
    while parents[out[-1]] >= 0:
        out.append(parents[out[-1]])
    return out[::-1]


def tree_levels(parent_index: torch.Tensor) -> torch.Tensor:
    """Depth of every node (roots 0) by pointer doubling, so O(d_sae log depth) work.

    parent_index: Long[d_sae], -1 for roots.
    Returns Long[d_sae]. Raises ValueError on out-of-range parents or cycles.
    """
    p = parent_index.long()
    d = p.numel()
    if d and ((p < -1) | (p >= d)).any():
        raise ValueError("parent_index entries must be -1 or a valid latent index")
    # Invariant: anc[i] is the ancestor depth[i] edges above i, or -1 once depth[i] is i's full depth.
    anc = p.clone()
    depth = (p >= 0).long()
    for _ in range(max(d, 1).bit_length() + 1):
        has = anc >= 0
        if not has.any():
            return depth
        a = anc.clamp(min=0)
        depth, anc = torch.where(has, depth + depth[a], depth), torch.where(has, anc[a], anc)
    if (anc >= 0).any():  # after log2(d)+1 doublings only nodes on or under a cycle still have ancestors
        raise ValueError("parent_index contains a cycle")
    return depth
