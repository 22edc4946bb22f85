"""`hsae browse`: a static site to walk an SAE's tree from coarse concepts down to refinements.

One page per live latent (its path from the root, children, firing density, activation
histogram, top-activating contexts with the firing token highlighted, the top positive and
negative logits of its decoder direction, its share of the reconstruction along its path, and
the parent-child statistics of its edge) and an index: the tree, collapsible, with a search box
(by latent id, or by token text), a per-level summary and the run's headline metrics.

A hierarchical SAE is shown on its own tree; any other SAE on its level post-hoc tree (the one
`hsae eval`'s hierarchy eval scores it with), labelled as such. The site opens from `file://`:
pages are plain HTML, the index reads its data from a `<script>` file (browsers refuse `fetch`
on `file://`), and the script and style sheet are copied next to it. Nothing is fetched from the
network. It is written into a temporary folder and moved into place at the end, so an
interrupted or failed build leaves no partial site.

    hsae browse hsae_runs/demo --out hsae_runs/demo/browse        # every SAE of a demo run
    hsae browse path/to/sae --model smollm2-135m --out site          # one saved SAE
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_lens_hierarchical.evals import common

ASSETS = Path(__file__).parent / "browse_assets"
N_CONTEXTS = 10
N_LOGITS = 8
N_BINS = 24
WINDOW = (12, 4)  # tokens shown before / after the firing token


class BrowseError(ValueError):
    """The input cannot be browsed; the message names the folder, file or latent."""


@dataclass
class Activations:
    """An SAE's activations over the text, kept sparse (an SAE's L0 is small)."""

    rows: torch.Tensor  # Long[E] token index (into the flattened [n_prompts * ctx] tokens)
    cols: torch.Tensor  # Long[E] latent
    vals: torch.Tensor  # Float[E]
    n_tokens: int  # tokens counted (special tokens are not)
    d_sae: int

    def dense_chunks(self, tokens: torch.Tensor | None = None, chunk: int = 4096) -> Iterator[torch.Tensor]:
        """Dense [chunk, d_sae] blocks of the activations of `tokens` (sorted token indices;
        default: every token that fires), in order. `rows` is sorted (`encode_sparse` writes
        token by token), so each block is one slice of it."""
        tokens = torch.unique(self.rows) if tokens is None else tokens
        for s in range(0, tokens.numel(), chunk):
            ids = tokens[s : s + chunk]
            lo, hi = torch.searchsorted(self.rows, ids[0]), torch.searchsorted(self.rows, ids[-1], right=True)
            block = torch.zeros(ids.numel(), self.d_sae)
            block[torch.searchsorted(ids, self.rows[lo:hi]), self.cols[lo:hi]] = self.vals[lo:hi]
            yield block


class _Chunks:
    def __init__(self, acts: Activations):
        self.acts = acts

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.acts.dense_chunks()


@dataclass
class SiteInputs:
    """What a site is built from: the SAE, the model, the held-out tokens and their activations
    at the SAE's hook (shared by every SAE of a run, computed once)."""

    model: Any
    tokens: torch.Tensor  # [n_prompts, ctx]
    x: torch.Tensor  # [n_prompts * ctx, d_in]
    keep: torch.Tensor  # Bool[n_prompts * ctx]: not a special token
    token_text: dict[int, str] = field(default_factory=dict)

    def text(self, token_id: int) -> str:
        if token_id not in self.token_text:
            tok = getattr(self.model, "tokenizer", None)
            self.token_text[token_id] = str(tok.decode([token_id])) if tok is not None else f"<{token_id}>"
        return self.token_text[token_id]


@torch.no_grad()
def read_text(model: Any, tokens: torch.Tensor, hook_name: str, batch_prompts: int = 8) -> SiteInputs:
    """The model's activations at `hook_name` on `tokens`, batched with a progress bar."""
    parts = []
    for s in tqdm(range(0, tokens.shape[0], batch_prompts), desc="browse: reading the text", unit="batch"):
        parts.append(common.hook_activations(model, tokens[s : s + batch_prompts], hook_name, batch_prompts))
    x = torch.cat(parts)
    return SiteInputs(model, tokens.cpu(), x.reshape(-1, x.shape[-1]), common.non_special(model, tokens).reshape(-1))


@torch.no_grad()
def encode_sparse(sae: Any, inputs: SiteInputs, chunk: int = 2048) -> Activations:
    rows, cols, vals = [], [], []
    idx = inputs.keep.nonzero().flatten()
    for s in range(0, idx.numel(), chunk):
        ids = idx[s : s + chunk]
        a = common.encode(sae, inputs.x[ids])
        r, c = a.nonzero(as_tuple=True)
        rows.append(ids[r])
        cols.append(c)
        vals.append(a[r, c])
    cat = torch.cat if rows else (lambda _parts: torch.zeros(0))
    return Activations(cat(rows).long(), cat(cols).long(), cat(vals).float(), int(idx.numel()), int(sae.cfg.d_sae))


# ----------------------------------------------------------------------------------------------
# What the pages show


def tree_of(sae: Any, acts: Activations) -> common.Tree:
    """The SAE's own tree, or its level post-hoc tree (a flat SAE's)."""
    if common.is_hierarchical(sae):
        return common.native_tree(sae)
    return common.level_posthoc_tree(sae, _Chunks(acts))


@torch.no_grad()
def level_summary(sae: Any, inputs: SiteInputs, acts: Activations, tree: common.Tree) -> list[dict[str, Any]]:
    """Per level: width, L0 (active latents per token), dead latents, and the explained variance
    of the reconstruction from levels <= l alone (prefix EV)."""
    levels = tree.levels
    counts = torch.bincount(acts.cols, minlength=acts.d_sae)
    kept = inputs.keep.nonzero().flatten()
    x = inputs.x[kept]
    total = float(((x - x.mean(0)) ** 2).sum())
    resid = [0.0] * tree.n_levels
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    for s, dense in zip(range(0, kept.numel(), 2048), acts.dense_chunks(kept, 2048)):
        xb = inputs.x[kept[s : s + 2048]].to(device, dtype)
        for level in range(tree.n_levels):
            x_hat = sae.decode((dense * (levels <= level).float()).to(device, dtype))
            resid[level] += float(((xb - x_hat) ** 2).sum())
    return [
        {
            "level": level,
            "width": int((levels == level).sum()),
            "l0": float(counts[levels == level].sum()) / max(acts.n_tokens, 1),
            "dead": int(((counts == 0) & (levels == level)).sum()),
            "prefix_ev": 1 - resid[level] / total if total > 0 else None,
        }
        for level in range(tree.n_levels)
    ]


def edge_stats(tree: common.Tree, acts: Activations) -> tuple[torch.Tensor, torch.Tensor]:
    """P(parent on | child on) and P(child on | parent on) of every latent's edge (NaN for roots)."""
    d = acts.d_sae
    counts = torch.bincount(acts.cols, minlength=d).double()
    parent = tree.parent_index
    keys = torch.sort(acts.rows * d + acts.cols).values
    has_parent = parent[acts.cols] >= 0
    q = acts.rows[has_parent] * d + parent[acts.cols[has_parent]]
    pos = torch.searchsorted(keys, q).clamp(max=max(keys.numel() - 1, 0))
    hit = (keys[pos] == q) if keys.numel() else torch.zeros_like(q, dtype=torch.bool)
    co = torch.zeros(d, dtype=torch.float64).index_add(0, acts.cols[has_parent], hit.double())
    p_parent = torch.full((d,), float("nan"), dtype=torch.float64)
    p_child = torch.full((d,), float("nan"), dtype=torch.float64)
    child = (parent >= 0).nonzero().flatten()
    p_parent[child] = co[child] / counts[child].clamp(min=1)
    p_child[child] = co[child] / counts[parent[child]].clamp(min=1)
    return p_parent, p_child


@torch.no_grad()
def logit_lens(sae: Any, model: Any, latents: Sequence[int], n: int = N_LOGITS) -> dict[int, tuple[list, list]]:
    """The tokens each decoder direction raises / lowers most through the unembedding."""
    W_U = getattr(model, "W_U", None)
    if W_U is None or not latents:
        return {}
    out: dict[int, tuple[list, list]] = {}
    W_U = W_U.float().cpu()
    idx = torch.tensor(list(latents))
    for s in range(0, idx.numel(), 256):
        part = idx[s : s + 256]
        logits = sae.W_dec.detach().float().cpu()[part] @ W_U
        top, bot = torch.topk(logits, n, dim=-1), torch.topk(-logits, n, dim=-1)
        for i, j in enumerate(part.tolist()):
            out[j] = (
                list(zip(top.indices[i].tolist(), top.values[i].tolist())),
                list(zip(bot.indices[i].tolist(), (-bot.values[i]).tolist())),
            )
    return out


@torch.no_grad()
def path_shares(
    sae: Any, tree: common.Tree, acts: Activations, top_rows: dict[int, list[int]]
) -> dict[int, list[float]]:
    """For each latent below a root: each node of its root-to-latent path's share of the path's
    reconstruction (projected on the token's full reconstruction), averaged over its top contexts."""
    W = sae.W_dec.detach().float().cpu()
    d_in = W.shape[1]
    tokens = sorted({r for rows in top_rows.values() for r in rows})
    if not tokens:
        return {}
    tok = torch.tensor(tokens)
    sel = torch.isin(acts.rows, tok)
    rows, cols, vals = acts.rows[sel], acts.cols[sel], acts.vals[sel]
    slot = torch.searchsorted(tok, rows)
    full = torch.zeros(tok.numel(), d_in).index_add(0, slot, vals.unsqueeze(-1) * W[cols])
    u = full / full.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    proj = vals * (W[cols] * u[slot]).sum(-1)  # each active latent's part along its token's reconstruction
    lookup = {(int(r), int(c)): float(p) for r, c, p in zip(rows, cols, proj)}
    out: dict[int, list[float]] = {}
    for j, rows_j in top_rows.items():
        path = tree.path(j)
        if len(path) < 2:
            continue
        shares = torch.zeros(len(path), dtype=torch.float64)
        used = 0
        for r in rows_j:
            contrib = torch.tensor([lookup.get((r, i), 0.0) for i in path], dtype=torch.float64)
            total = float(contrib.sum())
            if abs(total) > 1e-12:
                shares += contrib / total
                used += 1
        if used:
            out[j] = (shares / used).tolist()
    return out


# ----------------------------------------------------------------------------------------------
# Writing the site


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or v != v:
        return "–"
    return f"{v:.{digits}g}"


def _histogram_svg(values: torch.Tensor, bins: int = N_BINS) -> str:
    if values.numel() == 0:
        return ""
    hi = float(values.max())
    counts = torch.histc(values, bins=bins, min=0.0, max=hi if hi > 0 else 1.0)
    top = float(counts.max()) or 1.0
    w, h = 360, 90
    bw = w / bins
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{h - h * float(c) / top:.1f}" width="{bw - 1:.1f}" height="{h * float(c) / top:.1f}">'
        f"<title>{float(c):.0f} tokens at {i * hi / bins:.3g}–{(i + 1) * hi / bins:.3g}</title></rect>"
        for i, c in enumerate(counts)
    )
    return (
        f'<svg class="hist" viewBox="0 0 {w} {h + 14}" width="{w}" height="{h + 14}" role="img" '
        f'aria-label="activation histogram">{bars}<text x="0" y="{h + 12}">0</text>'
        f'<text x="{w}" y="{h + 12}" text-anchor="end">{hi:.3g}</text></svg>'
    )


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎")


def _esc(text: str) -> str:
    return html.escape(_one_line(text))


def _page(title: str, body: str, depth: int = 1) -> str:
    up = "../" * depth
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><link rel=stylesheet href='{up}assets/style.css'></head>"
        f"<body><main>{body}</main></body></html>"
    )


@dataclass
class _Latent:
    index: int
    level: int
    count: int
    contexts: list[tuple[int, float]]  # (token row, activation)
    hist: torch.Tensor
    top_tokens: list[tuple[str, float]]


def build_site(
    sae: Any,
    inputs: SiteInputs,
    out: str | Path,
    *,
    name: str,
    headline: dict[str, Any] | None = None,
    hook_name: str | None = None,
) -> Path:
    """Write the site of one SAE into `out` (replaced atomically); returns index.html's path."""
    out = Path(out)
    acts = encode_sparse(sae, inputs)
    counts = torch.bincount(acts.cols, minlength=acts.d_sae)
    live = counts.nonzero().flatten().tolist()
    if not live:
        raise BrowseError(
            f"{name}: no latent fires on the {acts.n_tokens} tokens read (a dead or untrained SAE, or "
            "text unlike its training data); nothing to browse"
        )
    tree = tree_of(sae, acts)
    levels = level_summary(sae, inputs, acts, tree)
    p_parent, p_child = edge_stats(tree, acts)

    # per-latent: top contexts (distinct tokens, highest activation), histogram, top tokens
    by_value = torch.argsort(acts.vals, descending=True, stable=True)
    order = by_value[torch.argsort(acts.cols[by_value], stable=True)]  # by latent, activation descending
    cols_sorted = acts.cols[order]
    starts = torch.searchsorted(cols_sorted, torch.arange(acts.d_sae))
    ends = torch.searchsorted(cols_sorted, torch.arange(acts.d_sae), right=True)
    flat_tokens = inputs.tokens.reshape(-1)
    latents: dict[int, _Latent] = {}
    for j in tqdm(live, desc=f"browse: {name}: latents", unit="latent", mininterval=2):
        sl = order[int(starts[j]) : int(ends[j])]
        rows, vals = acts.rows[sl], acts.vals[sl]
        ids, n = flat_tokens[rows].unique(return_counts=True)
        top = n.argsort(descending=True)[:5]
        latents[j] = _Latent(
            j,
            int(tree.levels[j]),
            int(counts[j]),
            list(zip(rows[:N_CONTEXTS].tolist(), vals[:N_CONTEXTS].tolist())),
            vals,
            [(inputs.text(int(ids[t])), float(n[t]) / rows.numel()) for t in top],
        )
    lens = logit_lens(sae, inputs.model, live)
    shares = path_shares(sae, tree, acts, {j: [r for r, _ in lat.contexts[:8]] for j, lat in latents.items()})

    children: dict[int, list[int]] = {}
    for j in range(acts.d_sae):
        p = int(tree.parent_index[j])
        if p >= 0:
            children.setdefault(p, []).append(j)
    native = common.is_hierarchical(sae)
    tree_label = (
        "its own learned tree"
        if native
        else "its level post-hoc tree (fitted on co-firing; a flat SAE has no tree of its own)"
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "latents").mkdir()
        (tmp / "data").mkdir()
        shutil.copytree(ASSETS, tmp / "assets")
        ctx = inputs.tokens.shape[1]
        for j, lat in tqdm(latents.items(), desc=f"browse: {name}: pages", unit="page", mininterval=2):
            page = _latent_page(
                inputs,
                tree,
                lat,
                latents,
                children,
                counts,
                acts.n_tokens,
                ctx,
                lens.get(j),
                shares.get(j),
                float(p_parent[j]),
                float(p_child[j]),
                name,
                tree_label,
            )
            (tmp / "latents" / f"{j}.html").write_text(page, encoding="utf-8")
        index = {
            "name": name,
            "architecture": sae.cfg.architecture(),
            "hook": hook_name or sae.cfg.metadata.hook_name,
            "model": getattr(sae.cfg.metadata, "model_name", None),
            "tree": "native" if native else "level post-hoc",
            "tree_label": tree_label,
            "d_sae": acts.d_sae,
            "n_tokens": acts.n_tokens,
            "n_live": len(live),
            "levels": levels,
            "headline": headline or {},
            # one row per latent: parent, level, firing count (0: dead), label (top tokens)
            "parent": tree.parent_index.tolist(),
            "level": tree.levels.tolist(),
            "count": counts.tolist(),
            "label": [
                _one_line(" ".join(t for t, _ in latents[j].top_tokens[:3])) if j in latents else ""
                for j in range(acts.d_sae)
            ],
            "search": [
                _one_line(" ".join(inputs.text(int(flat_tokens[r])) for r, _ in latents[j].contexts))
                if j in latents
                else ""
                for j in range(acts.d_sae)
            ],
        }
        (tmp / "data" / "index.js").write_text(
            "window.HSAE_INDEX = " + json.dumps(index, separators=(",", ":")) + ";\n", encoding="utf-8"
        )
        (tmp / "index.html").write_text(_index_page(name), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def _context_html(inputs: SiteInputs, row: int, value: float, ctx: int) -> str:
    flat = inputs.tokens.reshape(-1)
    prompt, pos = divmod(row, ctx)
    a, b = max(0, pos - WINDOW[0]), min(ctx, pos + WINDOW[1] + 1)
    base = prompt * ctx
    left = "".join(_esc(inputs.text(int(t))) for t in flat[base + a : base + pos])
    mid = _esc(inputs.text(int(flat[row])))
    right = "".join(_esc(inputs.text(int(t))) for t in flat[base + pos + 1 : base + b])
    return f"<li><span class=act>{value:.3g}</span><span class=ctx>{left}<mark>{mid}</mark>{right}</span></li>"


def _link(j: int, lat: _Latent | None, counts: torch.Tensor, n_tokens: int) -> str:
    if lat is None:
        return f"<span class=dead>#{j} (dead)</span>"
    label = " ".join(t for t, _ in lat.top_tokens[:3])
    return (
        f"<a href='{j}.html'>#{j}</a> <span class=label>{_esc(label)}</span> "
        f"<span class=density>{100 * int(counts[j]) / max(n_tokens, 1):.2f}%</span>"
    )


def _latent_page(
    inputs: SiteInputs,
    tree: common.Tree,
    lat: _Latent,
    latents: dict[int, _Latent],
    children: dict[int, list[int]],
    counts: torch.Tensor,
    n_tokens: int,
    ctx: int,
    lens: tuple[list, list] | None,
    shares: list[float] | None,
    p_parent: float,
    p_child: float,
    name: str,
    tree_label: str,
) -> str:
    j = lat.index
    path = tree.path(j)
    crumbs = " › ".join(f"<a href='{i}.html'>#{i}</a>" if i != j else f"<b>#{i}</b>" for i in path)
    outside = bool(tree.outside[j])
    kids = sorted(children.get(j, []), key=lambda c: -int(counts[c]))
    live_kids = [c for c in kids if c in latents]
    n_dead = len(kids) - len(live_kids)
    kid_html = "".join(f"<li>{_link(c, latents[c], counts, n_tokens)}</li>" for c in live_kids)
    kid_note = f"{len(kids)} children, {n_dead} of them dead" if kids else "no children"
    contexts = "".join(_context_html(inputs, r, v, ctx) for r, v in lat.contexts)
    tops = ", ".join(f"<code>{_esc(t)}</code> {100 * s:.0f}%" for t, s in lat.top_tokens)
    logits = ""
    if lens is not None:
        pos = "".join(f"<li><code>{_esc(inputs.text(t))}</code> {v:+.3g}</li>" for t, v in lens[0])
        neg = "".join(f"<li><code>{_esc(inputs.text(t))}</code> {v:+.3g}</li>" for t, v in lens[1])
        logits = (
            "<section><h2>Logit lens</h2><p>Decoder direction through the unembedding (W_dec · W_U).</p>"
            f"<div class=cols><div><h3>raises</h3><ol class=logits>{pos}</ol></div>"
            f"<div><h3>lowers</h3><ol class=logits>{neg}</ol></div></div></section>"
        )
    path_html = ""
    if shares is not None:
        rows = "".join(
            f"<tr><td><a href='{i}.html'>#{i}</a></td><td>{100 * s:.1f}%</td></tr>" for i, s in zip(path, shares)
        )
        path_html = (
            "<section><h2>Path attribution</h2><p>Share of the path's reconstruction (along the token's full "
            f"reconstruction) carried by each node, mean over the top contexts.</p><table>{rows}</table></section>"
        )
    edge = ""
    if path and len(path) > 1:
        edge = (
            f"<section><h2>Edge to parent #{path[-2]}</h2><table>"
            f"<tr><td>P(parent on | this on)</td><td>{_fmt(p_parent)}</td></tr>"
            f"<tr><td>P(this on | parent on)</td><td>{_fmt(p_child)}</td></tr></table></section>"
        )
    where = "outside the tree (no parent assigned)" if outside else f"level {lat.level}"
    body = (
        f"<nav><a href='../index.html'>{html.escape(name)}</a> · {crumbs}</nav>"
        f"<h1>Latent #{j}</h1>"
        f"<p class=facts>{where} · fires on <b>{100 * lat.count / max(n_tokens, 1):.3f}%</b> of {n_tokens} tokens "
        f"({lat.count}) · max activation {float(lat.hist.max()):.3g} · tree: {html.escape(tree_label)}</p>"
        f"<p>Fires mostly on {tops}</p>"
        f"<section><h2>Activations</h2>{_histogram_svg(lat.hist)}</section>"
        f"<section><h2>Top-activating contexts</h2><ol class=contexts>{contexts}</ol></section>"
        f"<section><h2>Children</h2><p>{kid_note}</p><ul class=children>{kid_html}</ul></section>"
        f"{edge}{path_html}{logits}"
    )
    return _page(f"#{j} · {name}", body)


def _index_page(name: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(name)} · feature tree</title><link rel=stylesheet href='assets/style.css'></head>"
        "<body><main><h1 id=title></h1><p id=about></p><div id=headline></div><div id=levels></div>"
        "<input id=search type=search placeholder='latent id or token text' aria-label=search>"
        "<ol id=results></ol><h2>The tree</h2><p class=hint>▸ expands a latent; children are sorted by "
        "firing frequency.</p><ul id=tree class=tree></ul></main>"
        "<script src='data/index.js'></script><script src='assets/app.js'></script></body></html>"
    )


# ----------------------------------------------------------------------------------------------
# Command line: a run folder (every SAE under saes/) or one SAE folder


def find_saes(path: str | Path) -> list[tuple[str, Path]]:
    """[(name, folder)] of the SAEs under `path`: `path` itself, or `path/saes/*` (a demo run)."""
    path = Path(path)
    if (path / "cfg.json").is_file():
        return [(path.name, path)]
    found = sorted(p.parent for p in (path / "saes").glob("*/cfg.json")) if (path / "saes").is_dir() else []
    if not found:
        raise BrowseError(f"{path}: neither a saved SAE folder (cfg.json) nor a run folder with saes/<name>/cfg.json")
    return [(p.name, p) for p in found]


def headline_metrics(run: Path, name: str) -> dict[str, Any]:
    """A demo run's headline metrics of SAE `name` (its results.json), else {}."""
    try:
        metrics = json.loads((run / "results.json").read_text())["metrics"][name]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return headline_from_metrics(metrics)


def headline_from_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one SAE's {eval: {metric: value}} (results.json's "metrics")."""
    wanted = {
        "core": ("ce_loss_score", "kl_div_score", "explained_variance", "l0", "frac_alive"),
        "hierarchy": ("necessity", "p_child_given_parent"),
    }
    return {
        key: metrics[section][key]
        for section, keys in wanted.items()
        for key in keys
        if isinstance(metrics.get(section), dict) and isinstance(metrics[section].get(key), (int, float))
    }


def site_index(out: Path, sites: list[tuple[str, Path]]) -> Path:
    """A page linking the sites of a run's SAEs."""
    items = "".join(f"<li><a href='{html.escape(n)}/index.html'>{html.escape(n)}</a></li>" for n, _ in sites)
    (out / "index.html").write_text(_page("SAEs", f"<h1>Feature trees</h1><ul>{items}</ul>", depth=0), encoding="utf-8")
    if not (out / "assets").exists():
        shutil.copytree(ASSETS, out / "assets")
    return out / "index.html"
