"""Prototype designs for issue 18 (not part of the package)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput


@dataclass
class TreeMatConfig(MatryoshkaBatchTopKTrainingSAEConfig):
    level_widths: list[int] = field(default_factory=list)
    l2_coefficient: float = 0.0
    kl_coefficient: float = 0.0
    tree_every: int = 50
    tree_start: int = 50
    tree_window: int = 50
    l2_detach_children: bool = False
    prefix_weight: float = 1.0
    l2_mask: float = 0.0  # 0: where parent or child on; 1: only where a child is on
    assign: float = 0.0  # 0 cofire P(p|c), 1 lift P(p|c)/P(p), 2 decoder cosine, 3 cofire*cos

    def __post_init__(self) -> None:
        cum = []
        for w in self.level_widths:
            cum.append((cum[-1] if cum else 0) + w)
        self.matryoshka_widths = cum
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return "treemat"


class TreeMatSAE(MatryoshkaBatchTopKTrainingSAE):
    cfg: TreeMatConfig

    def __init__(self, cfg: TreeMatConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.register_buffer("tree_parent", torch.full((cfg.d_sae,), -1, dtype=torch.long))
        self._co: dict[int, torch.Tensor] = {}
        self._cnt: dict[int, torch.Tensor] = {}
        self._pc: dict[int, torch.Tensor] = {}
        self._n = 0
        self._step = 0
        starts = [0] + cfg.matryoshka_widths
        self.slices = [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]

    @torch.no_grad()
    def _count(self, acts: torch.Tensor) -> None:
        on = (acts > 0).float()
        for lv in range(1, len(self.slices)):
            c, p = on[:, self.slices[lv]], on[:, self.slices[lv - 1]]
            co = c.T @ p
            if lv in self._co:
                self._co[lv] += co
                self._cnt[lv] += c.sum(0)
                self._pc[lv] += p.sum(0)
            else:
                self._co[lv], self._cnt[lv] = co, c.sum(0)
                self._pc[lv] = p.sum(0)
        self._n += on.shape[0]

    @torch.no_grad()
    def _assign(self) -> None:
        for lv in range(1, len(self.slices)):
            if lv not in self._co:
                continue
            sl, psl = self.slices[lv], self.slices[lv - 1]
            score = self._co[lv] / self._cnt[lv].clamp(min=1).unsqueeze(-1)
            mode = int(self.cfg.assign)
            if mode == 1:
                score = score / (self._pc[lv] / max(self._n, 1) + 1e-6)
            elif mode == 4:
                # the most specific parent: the least dense one with P(p|c) >= 0.5, else the max
                pfreq = self._pc[lv] / max(self._n, 1)
                ok = score >= 0.5
                spec = torch.where(ok, -pfreq.unsqueeze(0).expand_as(score), torch.full_like(score, -1e9))
                best_spec = spec.argmax(-1)
                fallback = score.argmax(-1)
                choice = torch.where(ok.any(-1), best_spec, fallback)
                score = torch.zeros_like(score).scatter(-1, choice.unsqueeze(-1), 1.0)
            elif mode in (2, 3):
                W = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
                cos = (W[sl] @ W[psl].T).clamp(min=0)
                score = cos if mode == 2 else score * cos
            best = score.argmax(-1) + psl.start
            seen = self._cnt[lv] > 0
            cur = self.tree_parent[sl]
            self.tree_parent[sl] = torch.where(seen, best, cur)
        self._co, self._cnt, self._pc, self._n = {}, {}, {}, 0

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        cfg = self.cfg
        if cfg.prefix_weight != 1.0:
            out = self._weighted_forward(step_input)
        else:
            out = super().training_forward_pass(step_input)
        step = self._step
        self._step += 1
        acts, pre = out.feature_acts, out.hidden_pre
        if step >= cfg.tree_start - cfg.tree_window:
            self._count(acts.detach())
        if step >= cfg.tree_start and (step - cfg.tree_start) % cfg.tree_every == 0:
            self._assign()
        assigned = bool((self.tree_parent >= 0).any())
        if assigned and cfg.l2_coefficient > 0:
            out.losses["l2_consistency"] = cfg.l2_coefficient * self._l2(acts, pre)
            out.loss = out.loss + out.losses["l2_consistency"]
        if assigned and cfg.kl_coefficient > 0:
            from sae_lens_hierarchical.metrics import consistency_kl

            lv = torch.zeros(cfg.d_sae, dtype=torch.long)
            for i, sl in enumerate(self.slices):
                lv[sl] = i
            out.losses["kl_consistency"] = cfg.kl_coefficient * consistency_kl(acts, self.tree_parent, None, levels=lv)
            out.loss = out.loss + out.losses["kl_consistency"]
        return out

    def _weighted_forward(self, step_input: TrainStepInput) -> TrainStepOutput:
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE

        base = BatchTopKTrainingSAE.training_forward_pass(self, step_input)
        for width, inner in self._iterable_decode(base.feature_acts, include_outer_loss=False):
            mse = self.mse_loss_fn(inner, step_input.sae_in).sum(-1).mean()
            base.losses[f"inner_mse_loss_{width}"] = self.cfg.prefix_weight * mse
            base.loss = base.loss + self.cfg.prefix_weight * mse
        return base

    def _l2(self, acts: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        child = (self.tree_parent >= 0).nonzero().squeeze(1)
        par = self.tree_parent[child]
        a_c = acts[:, child]
        if self.cfg.l2_detach_children:
            a_c = a_c.detach()
        s = torch.zeros(acts.shape[0], self.cfg.d_sae, device=acts.device, dtype=acts.dtype).index_add(1, par, a_c)
        parents = torch.unique(par)
        s_p = s[:, parents]
        a_p = acts[:, parents]
        relu_pre = pre[:, parents].relu()
        # parent value: its relu'd pre-activation wherever a child fires (so an absent parent
        # is pulled on), its selected activation elsewhere
        val = torch.where(s_p > 0, relu_pre, a_p)
        m = ((s_p > 0) if self.cfg.l2_mask == 1 else ((a_p > 0) | (s_p > 0))).to(acts.dtype)
        return (m * (val - s_p).pow(2)).sum(-1).mean()


def _strip_tree(self, state_dict):
    state_dict.pop("tree_parent", None)
    MatryoshkaBatchTopKTrainingSAE.process_state_dict_for_saving_inference(self, state_dict)


TreeMatSAE.process_state_dict_for_saving_inference = _strip_tree
