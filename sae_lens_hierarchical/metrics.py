"""Hierarchy metrics for sparse autoencoders.

Everything here is a plain torch function, so it scores a native hierarchical SAE (whose tree
is its own `parent_index`) and a flat SAE (whose tree comes from `posthoc_tree`) the same way.

- trees: `posthoc_tree`, `posthoc_tree_from_counts`, `cooccurrence_counts`, `tree_levels`,
  `parent_index_from_hierarchy` (sae_lens.synthetic ground truth -> parent index)
- the level post-hoc tree (the same-way-built tree for every SAE): `level_posthoc_tree`,
  `density_levels`, `ratio_level_widths`
- consistency: `hierarchical_consistency` (necessity, coverage, HCS, Hamming; Luo et al. 2026);
  the consistency KL is `losses.consistency_kl`, the training loss itself
- ground-truth recovery on synthetic data: `match_latents_to_features`, `edge_recall`,
  `per_level_mcc`, `absorption_gap`, `mean_absorption_gap`

Conventions. Shapes are written jaxtyping-style in comments: N tokens, d_sae latents, d model
width, n_feat ground-truth features, E edges. A latent is "on" for a token when its activation
is > 0 (bool inputs are taken as already on/off). A tree is a LongTensor `parent_index[d_sae]`
with -1 for roots. Results meant for JSON are plain python floats/ints/lists/dicts; an
undefined average (nothing to average over) is None in dicts and nan where a float is returned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from sae_lens_hierarchical.losses import consistency_kl  # noqa: F401  (one KL for training and metrics)
from sae_lens_hierarchical.tree import tree_levels

# A tensor [N, d_sae] or an iterable of [n_i, d_sae] chunks (e.g. batches straight from an
# activation store), so that N can be far larger than what fits in memory at once.
ActsLike = Tensor | Iterable[Tensor]


# ----------------------------------------------------------------------------------------------
# helpers


def _on_chunks(acts: ActsLike, chunk_size: int, device: torch.device | str | None) -> Iterator[Tensor]:
    """Yield bool "on" masks [n, d_sae] chunk by chunk, on `device` (None: where they are)."""
    pieces = acts.reshape(-1, acts.shape[-1]).split(chunk_size) if isinstance(acts, Tensor) else acts
    for a in pieces:
        a = a.reshape(-1, a.shape[-1])
        if device is not None:
            a = a.to(device)
        yield a if a.dtype == torch.bool else a > 0


def _default_device(acts: ActsLike, device: torch.device | str | None) -> torch.device | str | None:
    """The device to compute on: the one asked for, else the tensor's own."""
    if device is not None:
        return device
    return acts.device if isinstance(acts, Tensor) else None


def _mean_or_none(x: Tensor) -> float | None:
    """Mean of a 1-D tensor as a python float, None when empty (JSON-able, unlike nan)."""
    return float(x.double().mean()) if x.numel() > 0 else None


def _nan_to_none(x: Tensor) -> list[float | None]:
    """A 1-D tensor as a list with nan -> None (JSON-able)."""
    return [None if math.isnan(v) else v for v in x.tolist()]


def _harmonic(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise harmonic mean 2ab/(a+b), defined as 0 where a+b == 0."""
    s = a + b
    return torch.where(s > 0, 2 * a * b / s.clamp(min=1e-30), torch.zeros_like(s))


# ----------------------------------------------------------------------------------------------
# trees


def cooccurrence_counts(
    acts: ActsLike,
    chunk_size: int = 4096,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Firing counts and pairwise co-firing counts of all latents, accumulated over token chunks.

    acts: activations [N, d_sae] (or an iterable of [n_i, d_sae] chunks); on = act > 0.
    chunk_size: tokens per matmul when `acts` is one tensor; peak extra memory is about
        chunk_size * d_sae * 4 bytes on top of the result.
    device: where to compute (default: the tensor's device); chunks are moved there one by one.
    Returns (counts Long[d_sae], co Float[d_sae, d_sae] with co[q, c] = #tokens where q and c
    are both on, n_tokens). `co` is dense: d_sae**2 * 4 bytes, i.e. 1 GiB at d_sae = 16k, 4 GiB
    at 32k. Counts are exact integers in float32 up to 2**24 (~16.7M) tokens.
    """
    device = _default_device(acts, device)
    counts: Tensor | None = None
    co: Tensor | None = None
    n = 0
    for on in _on_chunks(acts, chunk_size, device):
        f = on.float()
        if co is None or counts is None:
            d = on.shape[1]
            co = torch.zeros(d, d, device=f.device)
            counts = torch.zeros(d, dtype=torch.long, device=f.device)
        co.addmm_(f.T, f)  # 0/1 products accumulate exactly in fp32 (also under TF32)
        counts += on.sum(0)
        n += on.shape[0]
    if co is None or counts is None:
        raise ValueError("cooccurrence_counts got no tokens")
    return counts, co, n


def posthoc_tree_from_counts(
    counts: Tensor,
    co: Tensor,
    tau: float = 0.5,
    min_count: int = 1,
) -> Tensor:
    """Post-hoc parent of every latent from precomputed (co-)firing counts.

    counts: Long[d_sae] tokens each latent is on.
    co: [d_sae, d_sae] co-firing counts, co[q, c] = #tokens with q and c both on.
    tau: a parent q must have P(q on | c on) = co[q, c] / counts[c] >= tau.
    min_count: latents on fewer than this many tokens count as dead: they are roots and never parents.
    Returns Long[d_sae]: parent of c = the least dense latent q that is strictly denser than c
    with P(q on | c on) >= tau (ties in density -> lower index); -1 if none or c is dead.
    """
    d = counts.numel()
    counts = counts.to(co.device).long()
    alive = counts >= max(int(min_count), 1)
    # Most specific ancestor = least dense candidate. Strict "denser" keeps the tree acyclic and
    # stops a grandparent (as certain as the parent given c, but denser) from winning.
    # One int64 key orders candidates by (count, index), so a min picks the lower index on ties.
    key = counts * d + torch.arange(d, device=co.device)
    no_key = torch.iinfo(torch.long).max
    parent = torch.full((d,), -1, dtype=torch.long, device=co.device)
    cnt64 = counts.double().clamp(min=1)
    step = max(1, (1 << 24) // max(d, 1))  # columns per block: keeps the [d, step] temporaries ~16M
    for s in range(0, d, step):
        e = min(d, s + step)
        # Division in float64 gives the correctly rounded ratio, so P == tau exactly counts as >= tau.
        cond = co[:, s:e].double() / cnt64[s:e] >= tau
        cond &= counts[:, None] > counts[None, s:e]
        cond &= alive[:, None]
        best, arg = torch.where(cond, key[:, None], no_key).min(0)
        parent[s:e] = torch.where((best < no_key) & alive[s:e], arg, -1)
    return parent


def posthoc_tree(
    acts: ActsLike,
    tau: float = 0.5,
    min_count: int = 1,
    chunk_size: int = 4096,
    device: torch.device | str | None = None,
) -> Tensor:
    """Parent index of a flat SAE's latents from co-firing (the post-hoc co-firing tree).

    acts: activations [N, d_sae] (or an iterable of chunks); on = act > 0.
    tau: minimum P(parent on | child on).
    min_count: latents on fewer tokens are dead: roots, and never anyone's parent.
    chunk_size: tokens per co-occurrence matmul.
    device: where to compute (default: the tensor's device).
    Returns Long[d_sae] with -1 for roots. Needs a dense d_sae x d_sae float32 matrix
    (1 GiB at d_sae = 16k); see `cooccurrence_counts`.
    """
    counts, co, _ = cooccurrence_counts(acts, chunk_size=chunk_size, device=device)
    return posthoc_tree_from_counts(counts, co, tau=tau, min_count=min_count)


def parent_index_from_hierarchy(roots: Sequence[Any], num_features: int) -> Tensor:
    """Ground-truth parent index from sae_lens.synthetic HierarchyNode trees.

    roots: the trees (e.g. `generate_hierarchy(...).roots`); any objects with `feature_index`
        (int or None) and `children` work.
    num_features: number of ground-truth features; features outside every tree are roots.
    Returns Long[num_features]. An organisational node (feature_index None) is transparent:
    its children get the nearest feature-bearing ancestor as parent.
    """
    parent = torch.full((num_features,), -1, dtype=torch.long)
    stack = [(r, -1) for r in roots]
    while stack:
        node, par = stack.pop()
        idx = getattr(node, "feature_index", None)
        if idx is not None:
            parent[idx] = par
            par = idx
        stack.extend((ch, par) for ch in getattr(node, "children", ()))
    return parent


# The level post-hoc tree: the same-way-built tree for every SAE (hierarchical or flat), so
# the numbers of Luo et al. 2026 (necessity, P(child | parent), Hamming) compare across SAEs.


def ratio_level_widths(d_sae: int, ratios: Sequence[float] = (1, 4, 16)) -> list[int]:
    """Level widths in proportion to `ratios` that add up to d_sae.

    Each level but the last gets round(d_sae * r / sum(ratios)) latents (at least 1); the last
    takes the rest. ratio_level_widths(21) == [1, 4, 16]; ratio_level_widths(16384) ==
    [780, 3121, 12483]. Raises ValueError when d_sae is too small to give every level a latent.
    """
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"ratios must be positive numbers, got {list(ratios)}")
    total = float(sum(ratios))
    widths = [max(1, round(d_sae * r / total)) for r in ratios[:-1]]
    last = d_sae - sum(widths)
    if last < 1:
        raise ValueError(f"d_sae={d_sae} is too small for {len(ratios)} levels in the ratio {list(ratios)}")
    return widths + [last]


def density_levels(counts: Tensor, level_widths: Sequence[int]) -> Tensor:
    """Level of each latent by firing density: the `level_widths[0]` latents that fire most
    are level 0, the next `level_widths[1]` level 1, and so on; ties go to the lower latent
    index, so latents that never fire fill the last levels in index order.

    counts: Long[d_sae] tokens each latent is on. Returns Long[d_sae] (on counts' device).
    """
    widths = [int(w) for w in level_widths]
    d = counts.numel()
    if not widths or any(w < 1 for w in widths) or sum(widths) != d:
        raise ValueError(f"level_widths {widths} must be integers >= 1 adding up to d_sae={d}")
    order = torch.sort(counts.long(), descending=True, stable=True).indices
    levels = torch.empty(d, dtype=torch.long, device=counts.device)
    levels[order] = torch.repeat_interleave(
        torch.arange(len(widths), device=counts.device), torch.tensor(widths, device=counts.device)
    )
    return levels


def _reiterable(acts: ActsLike) -> ActsLike:
    """`acts` as something that can be read twice: a one-shot iterator is kept as a list."""
    if isinstance(acts, Tensor):
        return acts
    return list(acts) if iter(acts) is acts else acts  # type: ignore[call-overload]


def level_posthoc_tree(
    on_fit: ActsLike,
    level_widths: Sequence[int],
    chunk_size: int = 4096,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """A tree with the given level widths, fitted on activations: (parent Long[d_sae], levels
    Long[d_sae]), built the same way for every SAE.

    on_fit: activations [N, d_sae] (on = act > 0; bool taken as on/off), or chunks of them. It
        is read twice; a one-shot iterator is materialised, a re-iterable object (a list, or one
        whose __iter__ restarts, e.g. re-encoding batches) is read twice as it is.
    level_widths: latents per level, roots first, adding up to d_sae (a hierarchical SAE's
        `cfg.level_widths`, or `ratio_level_widths(d_sae)` for a flat one).
    1. Levels by firing density on these tokens (`density_levels`).
    2. Each latent c below level 0 takes as parent the latent q one level up with the highest
       P(q on | c on) = co(q, c) / count(c) (ties: lower index); none (-1) when c never fires
       or no latent one level up ever fires with it.
    Memory: one [n_l, n_{l-1}] co-firing matrix per level pair, not d_sae x d_sae.
    """
    device = _default_device(on_fit, device)
    on_fit = _reiterable(on_fit)
    counts: Tensor | None = None
    for on in _on_chunks(on_fit, chunk_size, device):
        c = on.sum(0)
        counts = c if counts is None else counts + c.to(counts.device)
    if counts is None:
        raise ValueError("level_posthoc_tree got no tokens")
    levels = density_levels(counts, level_widths)
    members = [(levels == lv).nonzero().flatten() for lv in range(len(level_widths))]  # ascending index
    co: list[Tensor | None] = [None] * len(members)
    for on in _on_chunks(on_fit, chunk_size, device):
        on = on.to(counts.device)
        for lv in range(1, len(members)):
            block = on[:, members[lv]].float().T @ on[:, members[lv - 1]].float()  # [n_l, n_{l-1}]
            co[lv] = block if co[lv] is None else co[lv] + block  # type: ignore[operator]
    parent = torch.full_like(levels, -1)
    for lv in range(1, len(members)):
        block = co[lv]
        assert block is not None
        best, arg = block.max(-1)  # max of P(q | c) = argmax of co(q, c); first max = lower index
        parent[members[lv]] = torch.where(best > 0, members[lv - 1][arg], -1)
    return parent, levels


# ----------------------------------------------------------------------------------------------
# consistency


def hierarchical_consistency(
    acts: ActsLike,
    parent_index: Tensor,
    levels: Tensor | None = None,
    chunk_size: int = 4096,
    device: torch.device | str | None = None,
    return_per_node: bool = False,
) -> dict[str, Any]:
    """Necessity, coverage, HCS and Hamming distance of a tree on held-out activations.

    acts: activations [N, d_sae] (or an iterable of chunks); on = act > 0.
    parent_index: Long[d_sae], -1 for roots.
    levels: Long[d_sae] level of each latent for the per-level breakdown (default: tree depth).
    chunk_size: tokens per chunk.
    device: where to compute (default: the tensor's device).
    return_per_node: also return per-edge and per-parent lists (long for big SAEs).
    Returns a JSON-able dict:
      necessity   mean over edges p->c of P(p on | c on); edges whose child never fires are skipped
      coverage    mean over parents of P(some child of p on | p on); parents that never fire skipped
      hcs         mean over firing parents of harmonic_mean(mean necessity of p's edges, coverage(p));
                  a firing parent whose children never fire has coverage 0, hence HCS 0
      hamming     mean over parents of the fraction of tokens where on(p) != OR(on(children of p))
      hamming_per_token  the same fractions summed over parents = mean number of mismatching
                  parents per token (the number Luo et al. report)
      n_tokens, n_edges, n_parents, n_edges_scored, n_parents_scored
      per_level   {str(level): the same keys for parents at that level and their child edges}
    Undefined means (nothing scored) are None.
    """
    device = _default_device(acts, device)
    p = parent_index.long()
    if device is not None:
        p = p.to(device)
    lv = tree_levels(p) if levels is None else levels.long().to(p.device)
    d = p.numel()
    child = (p >= 0).nonzero().squeeze(1)  # [E] children, one edge each
    par = p[child]  # [E] their parents
    parents = torch.unique(par)  # [P] sorted
    slot = torch.full((d,), -1, dtype=torch.long, device=p.device)
    slot[parents] = torch.arange(parents.numel(), device=p.device)
    eslot = slot[par]  # [E] row of each edge's parent in the per-parent arrays

    E, P = child.numel(), parents.numel()
    n_c = torch.zeros(E, dtype=torch.long, device=p.device)  # child on
    n_pc = torch.zeros_like(n_c)  # child and parent on
    n_p = torch.zeros(P, dtype=torch.long, device=p.device)  # parent on
    n_p_any = torch.zeros_like(n_p)  # parent and some child on
    n_diff = torch.zeros_like(n_p)  # parent on XOR some child on
    n = 0
    for on in _on_chunks(acts, chunk_size, device):
        on = on.to(p.device)
        n += on.shape[0]
        if E == 0:
            continue
        onc, onp = on[:, child], on[:, par]
        n_c += onc.sum(0)
        n_pc += (onc & onp).sum(0)
        # OR of each parent's children = (number of children on) > 0, pooled by index_add.
        any_child = torch.zeros(on.shape[0], P, device=p.device).index_add_(1, eslot, onc.float()) > 0
        pon = on[:, parents]
        n_p += pon.sum(0)
        n_p_any += (pon & any_child).sum(0)
        n_diff += (pon ^ any_child).sum(0)

    # per edge: necessity (nan where the child never fires)
    nec = torch.where(n_c > 0, n_pc.double() / n_c.clamp(min=1), torch.nan)
    e_ok = n_c > 0
    # per parent: mean necessity of its scored edges, coverage, HCS, Hamming
    nec_sum = torch.zeros(P, dtype=torch.double, device=p.device).index_add_(0, eslot, torch.nan_to_num(nec))
    nec_cnt = torch.zeros(P, dtype=torch.double, device=p.device).index_add_(0, eslot, e_ok.double())
    p_nec = nec_sum / nec_cnt.clamp(min=1)  # 0 where no child fires; then coverage is 0 anyway
    cov = torch.where(n_p > 0, n_p_any.double() / n_p.clamp(min=1), torch.nan)
    p_ok = n_p > 0
    hcs = torch.where(p_ok, _harmonic(p_nec, torch.nan_to_num(cov)), torch.nan)
    ham = n_diff.double() / max(n, 1)

    def summary(e_mask: Tensor, p_mask: Tensor) -> dict[str, Any]:
        return {
            "necessity": _mean_or_none(nec[e_mask & e_ok]),
            "coverage": _mean_or_none(cov[p_mask & p_ok]),
            "hcs": _mean_or_none(hcs[p_mask & p_ok]),
            "hamming": _mean_or_none(ham[p_mask]),
            "hamming_per_token": float(ham[p_mask].sum()),
            "n_edges": int(e_mask.sum()),
            "n_parents": int(p_mask.sum()),
            "n_edges_scored": int((e_mask & e_ok).sum()),
            "n_parents_scored": int((p_mask & p_ok).sum()),
        }

    out: dict[str, Any] = {"n_tokens": n}
    out.update(summary(torch.ones_like(e_ok), torch.ones_like(p_ok)))
    p_level = lv[parents]
    out["per_level"] = {
        str(int(lv)): summary(p_level[eslot] == lv, p_level == lv) for lv in torch.unique(p_level).tolist()
    }
    if return_per_node:
        out["edges"] = {"child": child.tolist(), "parent": par.tolist(), "necessity": _nan_to_none(nec)}
        out["parents"] = {
            "parent": parents.tolist(),
            "coverage": _nan_to_none(cov),
            "hcs": _nan_to_none(hcs),
            "hamming": ham.tolist(),
        }
    return out


# ----------------------------------------------------------------------------------------------
# ground-truth recovery (synthetic data)


def match_latents_to_features(W_dec: Tensor, gt_vecs: Tensor) -> tuple[Tensor, Tensor]:
    """One-to-one Hungarian matching of SAE latents to ground-truth features on |cosine|.

    W_dec: decoder rows [d_sae, d].
    gt_vecs: ground-truth feature vectors [n_feat, d].
    Returns (latent_for_feature Long[n_feat], -1 where unmatched, i.e. when d_sae < n_feat;
    cos [n_feat] the |cosine| of each matched pair, 0 where unmatched), on W_dec's device.
    Same matching as sae_lens.synthetic's MCC; scipy's solver is O(n^3), fine up to a few 1000s.
    """
    from scipy.optimize import linear_sum_assignment

    w = torch.nn.functional.normalize(W_dec.detach().double().cpu(), dim=-1)
    g = torch.nn.functional.normalize(gt_vecs.detach().double().cpu(), dim=-1)
    sim = (g @ w.T).abs()  # [n_feat, d_sae]
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    lf = torch.full((g.shape[0],), -1, dtype=torch.long)
    cos = torch.zeros(g.shape[0], dtype=W_dec.dtype)
    lf[rows] = cols
    cos[rows] = sim[rows, cols].to(cos.dtype)
    return lf.to(W_dec.device), cos.to(W_dec.device)


def edge_recall(
    gt_parent_index: Tensor,
    latent_parent_index: Tensor,
    latent_for_feature: Tensor,
    min_cos: float = 0.0,
    cos: Tensor | None = None,
    allow_ancestor: bool = False,
) -> float:
    """Fraction of true parent->child edges recovered as parent->child in the learned tree.

    gt_parent_index: Long[n_feat] true parent of each feature, -1 for roots.
    latent_parent_index: Long[d_sae] learned (or post-hoc) parent of each latent.
    latent_for_feature: Long[n_feat] matched latent per feature, -1 if unmatched.
    min_cos: both features of an edge need a match with |cos| >= min_cos (requires `cos`).
    cos: [n_feat] match quality from `match_latents_to_features`.
    allow_ancestor: also count the edge when the parent's latent is any ancestor (not only the
        direct parent) of the child's latent.
    Returns recovered / all true edges: an edge with an unmatched or poorly matched end counts
    as missed. nan if the ground truth has no edges.
    """
    gp = gt_parent_index.long().cpu()
    lp = latent_parent_index.long().cpu()
    lf = latent_for_feature.long().cpu()
    c = (gp >= 0).nonzero().squeeze(1)
    if c.numel() == 0:
        return float("nan")
    lc, lpar = lf[c], lf[gp[c]]
    ok = (lc >= 0) & (lpar >= 0)
    if cos is not None:
        cs = cos.detach().cpu()
        ok &= (cs[c] >= min_cos) & (cs[gp[c]] >= min_cos)
    elif min_cos > 0:
        raise ValueError("min_cos > 0 needs the `cos` returned by match_latents_to_features")
    up = lp[lc.clamp(min=0)]  # learned parent of each child's latent
    hit = ok & (up == lpar)
    if allow_ancestor:
        tree_levels(lp)  # raises on cycles, so the walk below terminates
        while (up >= 0).any():
            up = torch.where(up >= 0, lp[up.clamp(min=0)], up)
            hit |= ok & (up >= 0) & (up == lpar)
    return float(hit.sum()) / c.numel()


def per_level_mcc(
    W_dec: Tensor,
    gt_vecs: Tensor,
    gt_levels: Tensor,
    latent_levels: Tensor | None = None,
) -> dict[str, float | None]:
    """Mean |cosine| of Hungarian-matched (latent, feature) pairs, broken down by true level.

    W_dec: decoder rows [d_sae, d].
    gt_vecs: ground-truth feature vectors [n_feat, d].
    gt_levels: Long[n_feat] true level of each feature (e.g. `tree_levels(gt_parent_index)`).
    latent_levels: Long[d_sae] level of each latent; if given, matching is done separately
        within each level (latents of level l only compete for features of level l).
    Returns {str(level): mean |cos| over that level's matched features (None if none matched),
    "all": the mean over all matched features}.
    """
    gl = gt_levels.long().cpu()
    out: dict[str, float | None] = {}
    if latent_levels is None:
        lf, cs = match_latents_to_features(W_dec, gt_vecs)
        lf, cs = lf.cpu(), cs.cpu()
        for lv in torch.unique(gl).tolist():
            out[str(lv)] = _mean_or_none(cs[(gl == lv) & (lf >= 0)])
        out["all"] = _mean_or_none(cs[lf >= 0])
        return out
    ll = latent_levels.long().to(W_dec.device)
    matched = []
    for lv in torch.unique(gl).tolist():
        lat = (ll == lv).nonzero().squeeze(1)
        feats = (gl == lv).nonzero().squeeze(1)
        if lat.numel() == 0:
            out[str(lv)] = None
            continue
        lf, cs = match_latents_to_features(W_dec[lat], gt_vecs[feats.to(gt_vecs.device)])
        cs = cs.cpu()[lf.cpu() >= 0]
        matched.append(cs)
        out[str(lv)] = _mean_or_none(cs)
    out["all"] = _mean_or_none(torch.cat(matched)) if matched else None
    return out


def absorption_gap(
    latent_acts_parent: Tensor,
    gt_parent_on: Tensor,
    gt_child_on: Tensor,
    min_support: int = 1,
) -> float:
    """Absorption gap of one parent latent: P(on | P on, C off) - P(on | P on, C on).

    latent_acts_parent: [N] activations of the latent matched to true parent P (on = > 0).
    gt_parent_on: Bool[N] true parent feature P fires.
    gt_child_on: Bool[N] true child feature C fires.
    min_support: tokens needed in each condition, else nan.
    Returns a float in [-1, 1]: 1 for a fully absorbed parent (fires for P only when C is off,
    C's latent took over), 0 for a healthy one that fires whenever P does.
    """
    on = latent_acts_parent if latent_acts_parent.dtype == torch.bool else latent_acts_parent > 0
    P, C = gt_parent_on.bool(), gt_child_on.bool()
    a, b = P & ~C, P & C
    need = max(int(min_support), 1)
    if int(a.sum()) < need or int(b.sum()) < need:
        return float("nan")
    return float(on[a].double().mean() - on[b].double().mean())


def mean_absorption_gap(
    acts: Tensor,
    gt_acts: Tensor,
    gt_parent_index: Tensor,
    latent_for_feature: Tensor,
    min_support: int = 10,
    chunk_size: int = 8192,
) -> float:
    """Absorption gap averaged over true edges (vectorised over edges, chunked over tokens).

    acts: SAE activations [N, d_sae] (on = > 0).
    gt_acts: ground-truth feature activations [N, n_feat] for the same tokens (on = != 0).
    gt_parent_index: Long[n_feat] true parent per feature, -1 for roots.
    latent_for_feature: Long[n_feat] matched latent per feature, -1 if unmatched.
    min_support: an edge counts only with >= this many tokens in both (P on, C off) and (P on, C on).
    chunk_size: tokens per chunk.
    Returns the mean gap over true edges whose parent and child are both matched and have
    enough support; nan if no edge qualifies.
    """
    gp = gt_parent_index.long().to(acts.device)
    lf = latent_for_feature.long().to(acts.device)
    c = (gp >= 0).nonzero().squeeze(1)
    p = gp[c]
    ok = (lf[c] >= 0) & (lf[p] >= 0)
    c, p = c[ok], p[ok]
    if c.numel() == 0:
        return float("nan")
    lat = lf[p]
    n_a = torch.zeros(c.numel(), dtype=torch.long, device=acts.device)  # P on, C off
    n_b, h_a, h_b = torch.zeros_like(n_a), torch.zeros_like(n_a), torch.zeros_like(n_a)
    for s in range(0, acts.shape[0], chunk_size):
        on = acts[s : s + chunk_size][:, lat] > 0
        g = gt_acts[s : s + chunk_size].to(acts.device)
        P, C = g[:, p] != 0, g[:, c] != 0
        A, B = P & ~C, P & C
        n_a += A.sum(0)
        n_b += B.sum(0)
        h_a += (on & A).sum(0)
        h_b += (on & B).sum(0)
    good = (n_a >= max(min_support, 1)) & (n_b >= max(min_support, 1))
    if not good.any():
        return float("nan")
    gap = h_a[good].double() / n_a[good] - h_b[good].double() / n_b[good]
    return float(gap.mean())
