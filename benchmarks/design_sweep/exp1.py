import sys, json, time, tempfile, copy, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
torch.set_num_threads(1)
import sae_lens_hierarchical  # noqa
from sae_lens import SAE
from sae_lens.registry import get_sae_training_class
import lmx, proto
from sae_lens_hierarchical import models

TOK = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else 42
which = sys.argv[3].split(",") if len(sys.argv) > 3 else None
data = torch.load(lmx.cache_path("smollm2-135m", 3, 42, 1_228_800))
acts = data["acts"]
scale = (576 ** 0.5) / data["mean_norm"]
W = [64, 256, 1024]; K = 24.0
common = dict(d_in=576, d_sae=sum(W), normalize_activations="none")

def make(name):
    if name == "batchtopk":
        c = get_sae_training_class("batchtopk")[1](**common, k=K, topk_threshold_lr=0.05)
    elif name == "matryoshka":
        c = get_sae_training_class("matryoshka_batchtopk")[1](**common, k=K, topk_threshold_lr=0.05, matryoshka_widths=[64, 320, 1344])
    elif name == "hsae_old":
        c = get_sae_training_class("hierarchical")[1](**common, level_widths=W, k_per_level=[4, 8, 12], topk_threshold_lr=0.05)
    elif name.startswith("treemat"):
        kw = {}
        widths = W
        for part in name.split(":")[1:]:
            k, v = part.split("=")
            if k == "W":
                widths = [int(x) for x in v.split("/")]
                continue
            kw[k] = type(getattr(proto.TreeMatConfig, k, 0.0))(float(v)) if k not in ("l2_detach_children",) else v == "1"
        c = proto.TreeMatConfig(**common, k=K, topk_threshold_lr=0.05, level_widths=widths, **kw)
        return proto.TreeMatSAE(c)
    return get_sae_training_class(c.architecture())[0](c)

names = which or ["batchtopk", "matryoshka", "hsae_old", "treemat:l2_coefficient=0.01", "treemat:l2_coefficient=0.1"]
model = models.load_model("smollm2-135m")
rows = {}
for name in names:
    torch.manual_seed(SEED)
    sae = make(name)
    lmx.train(sae, acts, scale, TOK)
    tree = sae.tree_parent.clone() if hasattr(sae, "tree_parent") else None
    with tempfile.TemporaryDirectory() as d:
        sae.save_inference_model(d)
        inf = SAE.load_from_disk(d)
    feats_all = []
    enc = inf.encode
    def enc_keep(x):
        f = enc(x); feats_all.append(f.detach()); return f
    r = lmx.evaluate(inf, data, scale, model=model, n_prompts=int(os.environ.get('NP', 32)), encode=enc_keep)
    F = torch.cat(feats_all)
    n = len(F); fit, score = F[: n // 2] > 0, F[n // 2:] > 0
    par, lv = lmx.level_tree(fit, W)  # same widths for every SAE
    r["posthoc"] = lmx.hier_metrics(score, par, lv)
    if tree is not None:
        ww = sae.cfg.level_widths if hasattr(sae.cfg, "level_widths") and sae.cfg.level_widths else W
        lvn = torch.repeat_interleave(torch.arange(len(ww)), torch.tensor(ww))
        if name == "hsae_old":
            tree = inf.tree_parent.clone()
        r["native"] = lmx.hier_metrics(score, tree, lvn)
        cum = [0]
        for w in ww:
            cum.append(cum[-1] + w)
        sls = [slice(a, b) for a, b in zip(cum[:-1], cum[1:])]
        r["l0_per_level"] = [float((F[:, s] > 0).sum(1).float().mean()) for s in sls]
        r["dead_per_level"] = [float(((F[:, s] > 0).sum(0) == 0).float().mean()) for s in sls]
        r["root_density_top5"] = sorted([float(x) for x in (F[:, sls[0]] > 0).float().mean(0)], reverse=True)[:5]
    if os.environ.get("ABS"):
        with torch.no_grad():
            inf.fold_activation_norm_scaling_factor(scale)  # now reads raw activations
        inf.cfg.metadata.hook_name = data["hook"]
        inf.cfg.metadata.model_name = "smollm2-135m"
        t_abs = time.time()
        from sae_lens_hierarchical.evals.stock import run_cpu_absorption
        res = run_cpu_absorption([(name.replace(":", "_").replace("=", ""), inf)], model,
                                                str(lmx.CACHE / "abs_out" / name), n_words=8000, seed=1,
                                                artifacts_path=str(lmx.CACHE / "abs_art"))
        rr = next(iter(res.values()))["eval_result_metrics"]["mean"]
        r["absorption"] = rr["mean_absorption_fraction_score"]
        r["full_absorption"] = rr["mean_full_absorption_score"]
        r["abs_s"] = time.time() - t_abs
    r["train_s"] = sae.train_seconds
    toks = r.pop("_tokens")
    if tree is not None:
        r["tree_text"] = lmx.describe_tree(F, toks, tree, lvn, model.tokenizer)
        print(r["tree_text"])
    rows[name] = r
    print(name, json.dumps(r), flush=True)
json.dump(rows, open(lmx.CACHE / f"exp1_{TOK//1000}k_s{SEED}_{int(time.time())}.json", "w"), indent=1)
