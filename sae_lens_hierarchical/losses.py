"""The consistency losses that tie each latent to its parent; the metrics use the same functions.

Both take activations in the units the reconstruction uses (a_j * ||W_dec[j]||: the TopK family's
`rescale_acts_by_decoder_norm`, or unit-norm decoder rows at inference) and a tree `parent`.

* `consistency_kl` (L_KL, docs/architecture.md): per token and parent level l, the distribution of activation
  mass over level l against the level-(l+1) mass pooled onto its parents.
* `consistency_l2` (Luo et al. 2026): on tokens where some child of a parent fires, the parent's
  activation should equal the sum of its children's (one_sided, the default through
  `l2_target`: at least that sum); the parent's value there is its ReLU'd pre-activation, so a
  parent that did not fire is pulled on (necessity) rather than the child off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_lens_hierarchical.tree import tree_levels


def consistency_kl(
    acts: Tensor,
    parent_index: Tensor,
    dec_norms: Tensor | None,
    eps: float = 1e-6,
    levels: Tensor | None = None,
) -> Tensor:
    """Hierarchical-consistency KL (L_KL, docs/architecture.md): differentiable, vectorised over latents.

    acts: activations [..., d_sae] (negative values are clamped to 0).
    parent_index: Long[d_sae], -1 for roots.
    dec_norms: [d_sae] decoder row norms ||W_dec[j]|| (None: all 1); gradients flow through it.
    eps: smoothing added to both distributions before the KL.
    levels: Long[d_sae] precomputed level per latent (default: tree depth, recomputed each
        call, so pass it in a training loop); a latent with level < 0 is left out entirely
        (e.g. free latents outside the tree).
    Returns a scalar: sum over parent levels l of the mean over tokens of KL(pi_l || pi~_l),
    where pi_l is the token's mass a_j * ||W_dec[j]|| over level-l latents normalised, and
    pi~_l is the level-(l+1) mass pooled onto parents, normalised. Tokens where either side
    has zero mass are skipped; 0 (still attached to the graph) if nothing counts.
    Smoothing: p = (pi + eps) / (1 + n_l eps), likewise q, so the KL is >= 0 and 0 iff pi = pi~.
    """
    d = acts.shape[-1]
    a = acts.reshape(-1, d).float()
    dev = a.device
    p = parent_index.to(dev).long()
    lv = tree_levels(p) if levels is None else levels.to(dev).long()
    m = a.clamp(min=0)
    if dec_norms is not None:
        m = m * dec_norms.to(device=dev, dtype=m.dtype)

    child = (p >= 0).nonzero().squeeze(1)
    par = p[child]
    keep = (lv[child] >= 0) & (lv[par] >= 0)
    child, par = child[keep], par[keep]
    if child.numel() == 0:
        return m.sum() * 0.0

    # Only levels that have children enter the sum; their latents (with or without children of
    # their own) form the support of pi_l. Level ids are compacted to 0..n_lv-1.
    parent_levels = torch.unique(lv[par])  # sorted
    is_plevel = torch.zeros(int(lv.max()) + 1, dtype=torch.bool, device=dev)
    is_plevel[parent_levels] = True
    node = ((lv >= 0) & is_plevel[lv.clamp(min=0)]).nonzero().squeeze(1)  # [K] latents on parent levels
    col = torch.full((d,), -1, dtype=torch.long, device=dev)
    col[node] = torch.arange(node.numel(), device=dev)
    lid = torch.searchsorted(parent_levels, lv[node])  # [K] compact level id of each node
    n_lv = parent_levels.numel()

    # index_select rather than fancy indexing: its backward is a fast index_add, not index_put.
    mp = m.index_select(1, node)  # [N, K] parent-level mass
    mc = torch.zeros_like(mp).index_add(1, col[par], m.index_select(1, child))  # [N, K] child mass pooled on parents
    S = torch.zeros(m.shape[0], n_lv, device=dev).index_add(1, lid, mp)  # [N, L'] level totals
    T = torch.zeros(m.shape[0], n_lv, device=dev).index_add(1, lid, mc)
    valid = (S > 0) & (T > 0)
    # Safe denominators: dividing by 0 on skipped tokens would put nan into the gradient.
    pi = mp / torch.where(S > 0, S, 1.0).index_select(1, lid)
    pt = mc / torch.where(T > 0, T, 1.0).index_select(1, lid)
    n_per = torch.bincount(lid, minlength=n_lv).to(m.dtype)
    p_s = (pi + eps) / (1 + eps * n_per[lid])
    term = p_s * (torch.log(pi + eps) - torch.log(pt + eps))  # normalisers cancel inside the log
    kl = torch.zeros_like(S).index_add(1, lid, term)  # [N, L'] KL per token and level
    kl = torch.where(valid, kl, 0.0)
    return (kl.sum(0) / valid.sum(0).clamp(min=1)).sum()


def consistency_l2(
    acts: Tensor,
    pre_acts: Tensor,
    parent: Tensor,
    children_grad: bool = True,
    threshold: Tensor | None = None,
    one_sided: bool = False,
) -> Tensor:
    """Mean over tokens of sum over parents p of (relu(pre_p) - sum_{c: parent c = p} a_c)^2,
    counted only where some child of p fires.

    acts: selected activations [N, d_sae]; pre_acts: the pre-activations they came from (same
    units). children_grad: False stops the gradient on the children's side, so only the parent
    moves (towards its children's sum); with it a child is also pushed down where its parent is
    lower, which lets the parent take over the child's direction (absorption, docs/benchmarks.md).
    threshold: [d_sae], each latent's inference threshold (same units). When given, a parent is
    only asked to reach it, (threshold - pre_p)_+^2: it must fire where a child fires, at whatever
    strength the reconstruction wants, and the children are not touched (children_grad unused).
    one_sided: only a parent below its children's sum is penalised, (sum a_c - relu(pre_p))_+^2:
    the children's sum is a floor, and a parent the reconstruction wants stronger is left alone.
    Returns a scalar (0 attached to the graph when the tree has no edges).
    """
    child = (parent >= 0).nonzero().squeeze(1)
    if child.numel() == 0:
        return acts.sum() * 0.0
    par = parent[child]
    parents, slot = torch.unique(par, return_inverse=True)
    pooled = acts.new_zeros(acts.shape[0], parents.numel()).index_add(1, slot, acts.index_select(1, child))
    on = (pooled > 0).to(acts.dtype)
    if threshold is not None:
        floor = threshold.to(pre_acts.dtype).index_select(0, parents)
        deficit = (floor - pre_acts.index_select(1, parents)).clamp(min=0)
        return (on * deficit.pow(2)).sum(-1).mean()
    value = pre_acts.index_select(1, parents).relu()
    if not children_grad:
        pooled = pooled.detach()
    gap = (pooled - value).clamp(min=0) if one_sided else value - pooled
    return (on * gap.pow(2)).sum(-1).mean()
