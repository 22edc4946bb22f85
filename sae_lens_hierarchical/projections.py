"""Seed design (ablation): each parent owns a learned subspace in which its children live.

With `projection_rank: r` (and the fixed tree), every parent p of level l-1 owns a rank-r basis,
and its children's encoder columns and decoder rows are codes in it (as in H-SAE):

    W_dec[c] = d_c @ U_p    (d_c: [r], U_p: [r, d_in])
    W_enc[:, c] = P_p @ e_c (P_p: [d_in, r], e_c: [r])

The flat `W_enc` / `W_dec` stay readable (SAELens, SAE-Bench and the folds use them) as views
built from the factors, so the rest of the model is unchanged; saving for inference writes the
flat matrices, so a saved SAE is an ordinary `HierarchicalSAE`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FLAT = ("W_enc", "W_dec")


def factor_names(n_levels: int) -> list[str]:
    names = ["W_enc_l0", "W_dec_l0"]
    for level in range(1, n_levels):
        names += [f"enc_basis_l{level}", f"enc_codes_l{level}", f"dec_basis_l{level}", f"dec_codes_l{level}"]
    return names


class FactoredRows:
    """Mixin for the training SAE: the flat weights as views of per-parent subspaces."""

    cfg: Any
    _parameters: dict[str, Any]

    @property
    def factored(self) -> bool:
        return "W_dec_l0" in self._parameters

    @property
    def W_dec(self) -> torch.Tensor:  # type: ignore[override]
        if "W_dec" in self._parameters:
            return self._parameters["W_dec"]
        if not self.factored:
            raise AttributeError("W_dec")  # (not built yet: lets nn.Module register the parameter)
        return torch.cat([self._level_rows(lv, "dec") for lv in range(len(self.cfg.level_widths))])

    @property
    def W_enc(self) -> torch.Tensor:  # type: ignore[override]
        if "W_enc" in self._parameters:
            return self._parameters["W_enc"]
        if not self.factored:
            raise AttributeError("W_enc")
        return torch.cat([self._level_rows(lv, "enc") for lv in range(len(self.cfg.level_widths))]).T

    def _level_rows(self, level: int, kind: str) -> torch.Tensor:
        """Level `level`'s decoder rows (kind "dec") or encoder columns as rows ("enc"), [n_l, d_in]."""
        if level == 0:
            w = self._parameters[f"W_{kind}_l0"]
            return w if kind == "dec" else w.T
        codes, basis = self._parameters[f"{kind}_codes_l{level}"], self._parameters[f"{kind}_basis_l{level}"]
        if kind == "dec":  # codes [p, b, r], basis [p, r, d]
            return torch.einsum("pbr,prd->pbd", codes, basis).flatten(0, 1)
        return torch.einsum("pdr,prb->pbd", basis, codes).flatten(0, 1)  # basis [p, d, r], codes [p, r, b]

    @torch.no_grad()
    def factor_weights(self) -> None:
        """Replace the flat parameters by per-parent factors (called once, after init)."""
        cfg = self.cfg
        widths, r = cfg.level_widths, cfg.projection_rank
        W_dec = self._parameters.pop("W_dec").detach()
        self._parameters.pop("W_enc")
        rows = W_dec.split(widths)
        kw = {"dtype": W_dec.dtype, "device": W_dec.device}
        if W_dec.is_meta:  # built to be loaded into (SAELens's load_from_disk): shapes only
            d = cfg.d_in
            self._parameters["W_dec_l0"] = nn.Parameter(torch.empty(widths[0], d, **kw))
            self._parameters["W_enc_l0"] = nn.Parameter(torch.empty(d, widths[0], **kw))
            for level in range(1, len(widths)):
                n_par, b = widths[level - 1], widths[level] // widths[level - 1]
                for name, shape in (
                    (f"dec_basis_l{level}", (n_par, r, d)),
                    (f"dec_codes_l{level}", (n_par, b, r)),
                    (f"enc_basis_l{level}", (n_par, d, r)),
                    (f"enc_codes_l{level}", (n_par, r, b)),
                ):
                    self._parameters[name] = nn.Parameter(torch.empty(*shape, **kw))
            return
        self._parameters["W_dec_l0"] = nn.Parameter(rows[0].clone())
        self._parameters["W_enc_l0"] = nn.Parameter(rows[0].T.contiguous().clone())
        parent_dirs = nn.functional.normalize(rows[0].float(), dim=-1)
        for level in range(1, len(widths)):
            n_par, b = widths[level - 1], widths[level] // widths[level - 1]
            # An orthonormal basis per parent whose first row is the parent's direction, so the
            # parent's direction is always reachable by its children.
            raw = torch.randn(n_par, cfg.d_in, r)
            raw[:, :, 0] = parent_dirs
            basis = torch.linalg.qr(raw).Q.transpose(1, 2)  # [n_par, r, d]
            sign = torch.sign((basis[:, 0] * parent_dirs).sum(-1)).view(-1, 1, 1)
            basis[:, :1] = basis[:, :1] * sign
            norm = rows[level].norm(dim=-1).mean()
            codes = nn.functional.normalize(torch.randn(n_par, b, r), dim=-1) * norm
            for name, value in (
                (f"dec_basis_l{level}", basis),
                (f"dec_codes_l{level}", codes),
                (f"enc_basis_l{level}", basis.transpose(1, 2)),
                (f"enc_codes_l{level}", codes.transpose(1, 2)),
            ):
                self._parameters[name] = nn.Parameter(value.contiguous().to(**kw))
            parent_dirs = nn.functional.normalize(torch.einsum("pbr,prd->pbd", codes, basis).flatten(0, 1), dim=-1)

    @torch.no_grad()
    def scale_input_space(self, s: float) -> None:
        """Fold x -> x*s into the factors: encoder side times s, decoder side divided by s."""
        for level in range(len(self.cfg.level_widths)):
            enc, dec = ("W_enc_l0", "W_dec_l0") if level == 0 else (f"enc_codes_l{level}", f"dec_codes_l{level}")
            self._parameters[enc].mul_(s)
            self._parameters[dec].div_(s)

    def flat_state(self, state_dict: dict[str, Any]) -> None:
        """Replace the factor tensors of a state dict by the flat W_enc / W_dec they build."""
        if not self.factored:
            return
        for name in factor_names(len(self.cfg.level_widths)):
            state_dict.pop(name, None)
        state_dict["W_enc"] = self.W_enc.detach().contiguous().clone()
        state_dict["W_dec"] = self.W_dec.detach().clone()

    def factor_state(self, state_dict: dict[str, Any]) -> None:
        """Replace flat W_enc / W_dec in a state dict (a saved inference SAE) by the factors this
        SAE holds: each parent's children rows are fitted with their top-r singular vectors,
        exact for rows saved from factors (they span at most r dimensions)."""
        if not self.factored or "W_dec" not in state_dict:
            return
        widths, r = self.cfg.level_widths, self.cfg.projection_rank
        for kind, flat in (("dec", state_dict.pop("W_dec")), ("enc", state_dict.pop("W_enc").T)):
            rows = flat.split(widths)
            state_dict[f"W_{kind}_l0"] = rows[0].contiguous() if kind == "dec" else rows[0].T.contiguous()
            for level in range(1, len(widths)):
                n_par = widths[level - 1]
                vecs = rows[level].reshape(n_par, -1, flat.shape[-1]).double()
                basis = torch.linalg.svd(vecs, full_matrices=False).Vh[:, :r]  # [p, r, d]
                if basis.shape[1] < r:  # fewer children than r: pad with orthogonal directions
                    pad = torch.zeros(n_par, r - basis.shape[1], basis.shape[2], dtype=basis.dtype)
                    basis = torch.cat([basis, pad], dim=1)
                codes = vecs @ basis.transpose(1, 2)  # [p, b, r]
                dtype = flat.dtype
                if kind == "dec":
                    state_dict[f"dec_basis_l{level}"] = basis.to(dtype).contiguous()
                    state_dict[f"dec_codes_l{level}"] = codes.to(dtype).contiguous()
                else:
                    state_dict[f"enc_basis_l{level}"] = basis.transpose(1, 2).to(dtype).contiguous()
                    state_dict[f"enc_codes_l{level}"] = codes.transpose(1, 2).to(dtype).contiguous()
