"""The training SAE: SAELens's Matryoshka BatchTopK SAE whose latents form a learned tree.

Read top to bottom:

1. Encode as BatchTopK does, with one L0 budget `k` shared by every latent, so the split of the
   budget over the levels is learned (or, seed ablation, one BatchTopK per level with
   `k_per_level`; optionally the hard parent gate).
2. Reconstruct as the Matryoshka SAE does: each level's prefix x_hat_{<=l} must reconstruct x
   on its own (weighted by `level_recon_weights`; by default not the roots alone), which keeps
   coarse latents in the early levels and stops children from absorbing their parents.
3. Give every latent a parent: `tree_parent` is re-learned every `tree_every` steps, by
   default the most similar decoder direction among the latents one level up that fire with it
   (`schedule.TreeSchedule`). The consistency losses (`losses`; off by default, the seed
   design's terms) ask a parent to fire, with at least the summed strength of its children,
   wherever a child fires.

Everything else (aux-k for dead latents, the learned inference threshold, decoder-norm
rescaling, norm folding) is SAELens's. Saved for inference it becomes a `HierarchicalSAE`:
a JumpReLU SAE with the threshold BatchTopK learned, plus the tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE
from typing_extensions import override

from sae_lens_hierarchical import losses, state_io
from sae_lens_hierarchical.config import HierarchicalTrainingSAEConfig
from sae_lens_hierarchical.integrations.distributed import min_over_ranks
from sae_lens_hierarchical.projections import FactoredRows
from sae_lens_hierarchical.schedule import TreeSchedule, pop_schedule_state
from sae_lens_hierarchical.tree import fixed_parents, gate, no_parents
from sae_lens_hierarchical.tree_access import TreeAccess


class NonFiniteTrainingError(ValueError):
    """A training step met NaN/inf activations or losses; raised before the weights change."""


class HierarchicalTrainingSAE(TreeAccess, FactoredRows, MatryoshkaBatchTopKTrainingSAE):
    """Training hierarchical SAE (architecture "hierarchical")."""

    cfg: HierarchicalTrainingSAEConfig  # type: ignore[assignment]
    tree_parent: torch.Tensor
    topk_threshold: torch.Tensor

    def __init__(self, cfg: HierarchicalTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        widths = cfg.level_widths or []
        tree = fixed_parents(widths) if cfg.tree == "fixed" else no_parents(widths)
        self.register_buffer("tree_parent", tree.to(self.W_dec.device))
        # One learned inference threshold per level (all equal under the shared budget), in
        # double precision for the moving average, as SAELens's BatchTopK keeps its one.
        self.register_buffer("topk_threshold", torch.zeros(len(widths), dtype=torch.double, device=self.W_dec.device))
        self.schedule = TreeSchedule(cfg)
        self._pending_threshold_acts: torch.Tensor | None = None
        if cfg.projection_rank is not None:
            self.factor_weights()

    # --- 1. encode ----------------------------------------------------------------------------
    @override
    def get_activation_fn(self) -> Any:
        return self._select

    def _select(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """BatchTopK over every latent (or per level), then the hard gate if configured."""
        cfg = self.cfg
        widths = cfg.level_widths or []
        if cfg.k_per_level is None:
            acts = BatchTopK(cfg.k)(hidden_pre)
        else:
            acts = torch.cat(
                [BatchTopK(k)(pre) for pre, k in zip(hidden_pre.split(widths, dim=-1), cfg.k_per_level, strict=True)],
                dim=-1,
            )
        if cfg.gate == "hard":
            acts = gate(acts, self.tree_parent, widths)
        return acts

    @override
    def update_topk_threshold(self, acts_topk: torch.Tensor) -> None:
        # SAELens's BatchTopK step calls this before the losses are checked; the update waits
        # for `training_forward_pass`, so a refused (non-finite) step leaves no trace.
        self._pending_threshold_acts = acts_topk.detach()

    @torch.no_grad()
    def _update_thresholds(self, acts_topk: torch.Tensor) -> None:
        """Move each level's threshold towards the smallest activation it kept (the whole SAE's
        smallest under a shared budget, so every level's threshold is the same)."""
        # The first update starts the average at its first target (SAELens's starts at 0 and needs
        # hundreds of steps to get there: a short run's saved SAE then fires several times k).
        lr = self.cfg.topk_threshold_lr if bool((self.topk_threshold > 0).any()) else 1.0
        # (min_over_ranks: the minimum over every data-parallel rank's batch; in one process, the batch's)
        if self.cfg.k_per_level is None:  # one budget: one minimum, the same for every level
            low = min_over_ranks(acts_topk[acts_topk > 0])
            if low is not None:
                self.topk_threshold.mul_(1 - lr).add_(lr * low)
            return
        for level, acts in enumerate(acts_topk.split(self.cfg.level_widths or [], dim=-1)):
            low = min_over_ranks(acts[acts > 0])
            if low is not None:
                self.topk_threshold[level] = (1 - lr) * self.topk_threshold[level] + lr * low

    # --- 2 and 3. the training step -----------------------------------------------------------
    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self.schedule.before_step(self)  # re-assign the learned tree before this step uses it
        out = super().training_forward_pass(step_input)  # BatchTopK, aux-k, Matryoshka prefixes
        self._weight_prefix_losses(out)
        self._add_consistency_losses(out)
        check_finite(out, self.schedule.steps_done)  # before anything this step changes
        if self._pending_threshold_acts is not None:
            self._update_thresholds(self._pending_threshold_acts)
            self._pending_threshold_acts = None
        self.schedule.after_step(out.feature_acts, self.training)
        out.metrics["topk_threshold"] = self.topk_threshold.max()  # (SAELens logs one scalar)
        if step_input.is_logging_step:
            out.metrics.update(self._level_metrics(out.feature_acts))
        return out

    @override
    def _iterable_decode(self, feature_acts: torch.Tensor, include_outer_loss: bool = False) -> Any:
        """SAELens's prefix decoding; with `prefix_b_dec_grad: false` every prefix sees b_dec
        detached (same values), so b_dec's gradient comes from the full reconstruction only.
        (Our BatchTopK selection gives dense activations, so SAELens's sparse branch is not needed.)"""
        if self.cfg.prefix_b_dec_grad:
            yield from super()._iterable_decode(feature_acts, include_outer_loss)
            return
        if self.cfg.rescale_acts_by_decoder_norm:
            feature_acts = feature_acts * (1 / self.W_dec.norm(dim=-1))
        widths = self.cfg.matryoshka_widths if include_outer_loss else self.cfg.matryoshka_widths[:-1]
        decoded, prev = self.b_dec.detach(), 0
        for width in widths:
            decoded = feature_acts[:, prev:width] @ self.W_dec[prev:width] + decoded
            prev = width
            yield width, self.run_time_activation_norm_fn_out(decoded)

    def _weight_prefix_losses(self, out: TrainStepOutput) -> None:
        """SAELens's Matryoshka adds every prefix loss with weight 1: re-weight them (and the
        full reconstruction) by `level_recon_weights`."""
        weights = self.cfg.level_recon_weights or []
        names = [f"inner_mse_loss_{w}" for w in self.cfg.matryoshka_widths[:-1]] + ["mse_loss"]
        for name, w in zip(names, weights, strict=True):
            if w != 1.0:
                out.loss = out.loss + (w - 1.0) * out.losses[name]
                out.losses[name] = w * out.losses[name]

    def _add_consistency_losses(self, out: TrainStepOutput) -> None:
        cfg = self.cfg
        zero = out.loss.new_zeros(())
        has_edges = bool((self.tree_parent >= 0).any())
        kl = l2 = zero
        if has_edges and cfg.kl_coefficient > 0:
            kl = cfg.kl_coefficient * losses.consistency_kl(
                out.feature_acts, self.tree_parent, None, levels=self.latent_levels
            )
        l2_on = cfg.l2_until_step is None or self.schedule.steps_done < cfg.l2_until_step
        if has_edges and cfg.l2_coefficient > 0 and l2_on:
            l2 = cfg.l2_coefficient * losses.consistency_l2(
                out.feature_acts,
                out.hidden_pre,
                self.tree_parent,
                children_grad=cfg.l2_children_grad,
                # each parent's floor: its level's inference threshold
                threshold=self.topk_threshold[self.latent_levels] if cfg.l2_target == "threshold" else None,
                one_sided=cfg.l2_target == "children_sum_floor",
            )
        out.losses["kl_consistency_loss"] = kl
        out.losses["l2_consistency_loss"] = l2
        out.loss = out.loss + kl + l2

    @torch.no_grad()
    def _level_metrics(self, acts: torch.Tensor) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for level, a in enumerate(acts.split(self.cfg.level_widths or [], dim=-1)):
            metrics[f"l0_level_{level}"] = (a > 0).sum(-1).float().mean().item()
            metrics[f"threshold_level_{level}"] = self.topk_threshold[level].item()
        metrics["tree_edges"] = float((self.tree_parent >= 0).sum())
        return metrics

    # --- saving and loading -------------------------------------------------------------------
    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        state_dict.update(self.schedule.state_dict())  # a checkpoint resumes the schedule exactly

    @override
    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        paths = super().save_inference_model(path)
        state_io.write_checksum(*paths)
        return paths

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        as_saved = dict(state_dict)  # the tensors below are replaced, never changed in place
        schedule = pop_schedule_state(state_dict)
        if schedule:
            self.schedule.load_state_dict(schedule)
        state_io.inference_to_training_state(state_dict, self.cfg)
        self.factor_state(state_dict)  # a saved (flat) SAE into factored rows, when projected
        state_io.check_loaded_state(self, state_dict)
        state_io.verify_checksum(self.cfg, as_saved)  # after the checks that name a cause

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        self.flat_state(state_dict)  # factored rows (projection_rank) are saved flat
        # TopK's step folds the decoder norms into the encoder (rescale_acts_by_decoder_norm);
        # BatchTopK's own step expects one scalar threshold, so the per-level ones are turned
        # into the JumpReLU per-latent threshold here.
        TopKTrainingSAE.process_state_dict_for_saving_inference(self, state_dict)
        pop_schedule_state(state_dict)  # (SAELens's step above adds the checkpoint extras)
        state_io.training_to_inference_thresholds(state_dict, self.cfg)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        if not self.factored:
            return super().fold_activation_norm_scaling_factor(scaling_factor)
        # SAELens's fold writes into W_enc / W_dec, which are views here: scale the factors.
        self.scale_input_space(scaling_factor)
        self.b_dec.data /= scaling_factor
        if self.cfg.rescale_acts_by_decoder_norm:
            self.topk_threshold /= scaling_factor
        self.cfg.normalize_activations = "none"
        return None

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        if self.factored:
            raise NotImplementedError(
                "fold_W_dec_norm on factored rows (projection_rank): save the SAE for "
                "inference (save_inference_model), which folds the norms"
            )
        super().fold_W_dec_norm()

    @override
    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        hists = super().log_histograms()
        norms = self.W_dec.detach().float().norm(dim=1)
        for level, sl in enumerate(self.cfg.level_slices):
            hists[f"weights/W_dec_norms_level_{level}"] = norms[sl].cpu().numpy()
        return hists


def check_finite(out: TrainStepOutput, step: int) -> None:
    """One device sync per step, before backward and before the weights move: NaN/inf inputs or
    losses stop training with the step and the culprit named. Non-finite activations always
    reach the loss through the MSE, so checking the loss suffices."""
    if bool(torch.isfinite(out.loss)):
        return
    x = out.sae_in
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.reshape(-1, x.shape[-1]).any(-1)
        raise NonFiniteTrainingError(
            f"HierarchicalTrainingSAE: training step {step}: the activation batch holds "
            f"{int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} inf values "
            f"({int(rows.sum())} of {rows.numel()} activation vectors); the step is refused before "
            "it reaches the weights. Check the model's dtype (fp16 overflow) and the hook, or filter "
            "the activations; a run with n_checkpoints > 0 can be resumed with resume_from_checkpoint."
        )
    names = [name for name, value in out.losses.items() if not bool(torch.isfinite(value))]
    raise NonFiniteTrainingError(
        f"HierarchicalTrainingSAE: training step {step}: the loss is {float(out.loss.detach())} "
        f"(non-finite terms: {', '.join(names) or 'their sum overflowed'}) although the activations "
        "are finite; the step is refused before it reaches the weights. Lower lr or the loss "
        "coefficients, or check the activations' scale."
    )
