"""Data-parallel training on torch.distributed: `torchrun --nproc_per_node N -m sae_lens_hierarchical train CONFIG.yaml`.

Every rank runs SAELens's own runner on its shard of the token stream (`datasets`'
`split_dataset_by_node`), with the same seed, so every rank starts from the same weights. What
one process computes from the whole batch is computed from the global batch here, through
torch.distributed's collectives (no launcher and no reduction of our own):

| what | how it becomes global |
|---|---|
| gradients | averaged over ranks as each parameter's gradient is accumulated (before SAELens clips the global norm, so Adam sees the same step everywhere) |
| BatchTopK selection (HSAE, BatchTopK, Matryoshka) | each rank's top `k * global batch` candidates are gathered and the global k-th largest kept: the same set one process with the whole batch keeps |
| learned thresholds | the minimum kept activation is the minimum over ranks |
| dead-latent counters, firing frequencies | a latent fired if it fired on any rank; counts are summed |
| norm-scaling estimate | the mean activation norm over every rank's batches |
| the learned tree's co-firing counts | summed over ranks before each re-assignment and in every checkpoint |

Rank 0 alone writes checkpoints, the final SAE and wandb logs; every rank reads a checkpoint to
resume. Collectives time out after `HSAE_DIST_TIMEOUT_S` seconds (default 600), so a rank that
dies stops the others with an error instead of a hang. When not launched by torchrun
(`WORLD_SIZE` unset or 1) nothing here runs and the single-process path is unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init(device: str) -> str:
    """Join the process group torchrun describes; returns this rank's device ("cuda:<local rank>"
    for NCCL on GPUs, the configured device otherwise)."""
    if active():
        return device
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    timeout = datetime.timedelta(seconds=float(os.environ.get("HSAE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Collectives the patches use


def global_threshold(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The n_keep-th largest value of the concatenation of every rank's `flat` (equal sizes)."""
    local = torch.topk(flat.detach(), min(n_keep, flat.numel())).values
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.topk(torch.cat(parts), n_keep).values[-1]


def min_over_ranks(values: torch.Tensor) -> torch.Tensor | None:
    """The minimum of `values` over every rank (None when no rank has any)."""
    if not active():  # one process (the training hot path): no extra device sync
        return values.min().detach().double() if values.numel() else None
    local = values.min().detach().double() if values.numel() else torch.tensor(float("inf"), dtype=torch.double)
    local = local.to(values.device).reshape(1)
    dist.all_reduce(local, op=dist.ReduceOp.MIN)
    return local[0] if torch.isfinite(local[0]) else None


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ----------------------------------------------------------------------------------------------
# The patches, installed for the length of a run


_local_batchtopk: Any = None  # SAELens's own BatchTopK.forward, while patched
_in_train_step = False  # the global selection runs in training steps only (every rank takes them together)


def _batchtopk_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not _in_train_step:
        return _local_batchtopk(self, x)
    acts = x.relu()
    flat = acts.flatten()
    n_keep = int(self.k * acts.shape[:-1].numel() * world_size())
    threshold = global_threshold(flat, n_keep)
    keep = (flat >= threshold) & (flat > 0)
    return (flat * keep).reshape(acts.shape)


def _batchtopk_update_threshold(self: Any, acts_topk: torch.Tensor) -> None:
    lr = self.cfg.topk_threshold_lr
    with torch.autocast(self.topk_threshold.device.type, enabled=False):
        low = min_over_ranks(acts_topk[acts_topk > 0])
        if low is not None:
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * low.to(self.topk_threshold.dtype)


def _average_grads(sae: torch.nn.Module) -> None:
    n = world_size()

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)  # type: ignore[arg-type]
        p.grad.div_(n)  # type: ignore[union-attr]

    for p in sae.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)


@contextlib.contextmanager
def data_parallel() -> Iterator[None]:
    """Make SAELens's trainer data-parallel over the process group for the duration."""
    if not active():
        yield
        return
    from sae_lens.saes import batchtopk_sae
    from sae_lens.training import activation_scaler, sae_trainer

    trainer_init = sae_trainer.SAETrainer.__init__
    train_step = sae_trainer.SAETrainer._train_step
    save_checkpoint = sae_trainer.SAETrainer.save_checkpoint
    mean_norm = activation_scaler.ActivationScaler._calculate_mean_norm

    def init_(self: Any, *args: Any, **kwargs: Any) -> None:
        trainer_init(self, *args, **kwargs)
        _average_grads(self.sae)

    def step_(self: Any, sae: Any, sae_in: torch.Tensor) -> Any:
        global _in_train_step
        freq_before = self.act_freq_scores.clone()
        _in_train_step = True
        try:
            out = train_step(self, sae, sae_in)
        finally:
            _in_train_step = False
        # a latent fired if it fired on any rank: the smallest counter wins
        dist.all_reduce(self.n_forward_passes_since_fired, op=dist.ReduceOp.MIN)
        delta = self.act_freq_scores - freq_before
        dist.all_reduce(delta, op=dist.ReduceOp.SUM)
        self.act_freq_scores = freq_before + delta
        self.n_frac_active_samples += self.cfg.train_batch_size_samples * (world_size() - 1)
        # what is logged is the global batch's: each loss term averaged over ranks
        names = sorted(out.losses)
        values = torch.stack([out.loss.detach().float(), *(out.losses[k].detach().float() for k in names)])
        values = sum_(values) / world_size()
        out.loss = values[0]
        out.losses = dict(zip(names, values[1:]))
        return out

    def save_(self: Any, *args: Any, **kwargs: Any) -> None:
        schedule = getattr(self.sae, "schedule", None)
        if schedule is not None:
            schedule.reduce_counts()  # the checkpoint holds the global co-firing counts ...
        if rank() == 0:
            save_checkpoint(self, *args, **kwargs)
        if schedule is not None:
            schedule.share_counts()  # ... and each rank goes on with its share of them
        dist.barrier()

    def mean_norm_(self: Any, *args: Any, **kwargs: Any) -> float:
        local = torch.tensor([mean_norm(self, *args, **kwargs)], dtype=torch.double)
        return float(sum_(local)[0]) / world_size()

    patches = [
        (batchtopk_sae.BatchTopK, "forward", _batchtopk_forward),
        (batchtopk_sae.BatchTopKTrainingSAE, "update_topk_threshold", _batchtopk_update_threshold),
        (sae_trainer.SAETrainer, "__init__", init_),
        (sae_trainer.SAETrainer, "_train_step", step_),
        (sae_trainer.SAETrainer, "save_checkpoint", save_),
        (activation_scaler.ActivationScaler, "_calculate_mean_norm", mean_norm_),
    ]
    global _local_batchtopk
    _local_batchtopk = batchtopk_sae.BatchTopK.forward
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, fn in patches:
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def shard_runner(runner: Any) -> None:
    """Give this rank its shard of the runner's token stream (and no wandb / final save unless rank 0)."""
    from datasets.distributed import split_dataset_by_node

    store = runner.activations_store
    store.dataset = split_dataset_by_node(store.dataset, rank=rank(), world_size=world_size())
    store.iterable_sequences = store._iterate_tokenized_sequences()
    if rank() != 0:
        runner.cfg.logger.log_to_wandb = False
        runner.save_final_sae = lambda *_args, **_kwargs: None
