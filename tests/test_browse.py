"""`hsae browse`: the site's content (tiny real model, real SAEs) and its behaviour in a real
headless Chromium (Debian's `chromium`, driven by Playwright; those tests skip, saying why, on a
machine without one: `.ci/run` installs it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "evals"))
from conftest import (  # noqa: E402
    HOOK,
    build_model,
    make_words,
    nested_flat_sae,
    random_token_rows,
    save_word_tokenizer,
    trained_hsae,
)

from sae_lens_hierarchical import browse, cli  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, a trained HSAE and a flat SAE, saved; their sites built from 16 prompts."""
    tmp = tmp_path_factory.mktemp("browse")
    model = build_model(save_word_tokenizer(tmp / "tok", make_words()))
    torch.manual_seed(0)
    hsae = trained_hsae(tmp, steps=30)
    flat, _ = nested_flat_sae()
    inputs = browse.read_text(model, random_token_rows(16), HOOK, 8)
    sites = {
        "hsae": browse.build_site(hsae, inputs, tmp / "site_hsae", name="hsae", headline={"ce_loss_score": 0.91}),
        "flat": browse.build_site(flat, inputs, tmp / "site_flat", name="flat"),
    }
    return {"model": model, "hsae": hsae, "flat": flat, "inputs": inputs, "sites": sites, "tmp": tmp}


def index_data(site: Path) -> dict:
    text = (site.parent / "data" / "index.js").read_text()
    return json.loads(text.removeprefix("window.HSAE_INDEX = ").rstrip().rstrip(";"))


# ----------------------------------------------------------------------------------------------
# content


@pytest.mark.parametrize("name", ["hsae", "flat"])
def test_one_page_per_live_latent_and_none_for_dead_ones(world, name):
    site = world["sites"][name]
    data = index_data(site)
    live = {j for j, c in enumerate(data["count"]) if c > 0}
    pages = {int(p.stem) for p in (site.parent / "latents").glob("*.html")}
    assert pages == live and 0 < len(live) <= data["d_sae"]
    assert data["n_live"] == len(live)
    # the counts are the SAE's own firing on the counted tokens
    sae = world[name]
    x = world["inputs"].x[world["inputs"].keep]
    fired = (sae.encode(x) > 0).sum(0)
    assert data["count"] == fired.tolist()


def test_the_hsae_is_shown_on_its_own_tree_and_the_flat_sae_on_a_labelled_posthoc_tree(world):
    h, f = index_data(world["sites"]["hsae"]), index_data(world["sites"]["flat"])
    assert h["tree"] == "native" and h["parent"] == world["hsae"].tree_parent.tolist()
    assert f["tree"] == "level post-hoc" and "post-hoc" in f["tree_label"] and "flat SAE" in f["tree_label"]
    assert any(p >= 0 for p in f["parent"])  # the planted nesting is found
    assert h["headline"] == {"ce_loss_score": 0.91}
    assert [r["level"] for r in h["levels"]] == [0, 1, 2]
    assert sum(r["width"] for r in h["levels"]) == h["d_sae"]
    assert all(0 <= r["dead"] <= r["width"] for r in h["levels"])
    evs = [r["prefix_ev"] for r in h["levels"]]
    assert evs[-1] >= evs[0] - 1e-6  # more levels reconstruct at least as well


def test_a_latent_page_shows_path_children_contexts_logits_and_edge(world):
    site = world["sites"]["hsae"]
    data = index_data(site)
    child = next(j for j, p in enumerate(data["parent"]) if p >= 0 and data["count"][j] > 0 and data["count"][p] > 0)
    page = (site.parent / "latents" / f"{child}.html").read_text()
    parent = data["parent"][child]
    assert f"<a href='{parent}.html'>#{parent}</a> › " in page  # breadcrumbs through the parent
    assert page.count("<mark>") == min(10, data["count"][child])  # one highlighted token per context
    assert "Logit lens" in page and "raises" in page and "lowers" in page
    assert f"Edge to parent #{parent}" in page and "P(parent on | this on)" in page
    assert "Path attribution" in page
    assert "<svg class=\"hist\"" in page
    parent_page = (site.parent / "latents" / f"{parent}.html").read_text()
    assert f"<a href='{child}.html'>#{child}</a>" in parent_page


def test_the_edge_statistics_are_the_cofiring_frequencies(world):
    site = world["sites"]["hsae"]
    data = index_data(site)
    sae = world["hsae"]
    x = world["inputs"].x[world["inputs"].keep]
    on = sae.encode(x) > 0
    child = next(j for j, p in enumerate(data["parent"]) if p >= 0 and data["count"][j] > 0)
    parent = data["parent"][child]
    both = float((on[:, child] & on[:, parent]).sum())
    page = (site.parent / "latents" / f"{child}.html").read_text()
    expected = both / float(on[:, child].sum())
    assert f"<tr><td>P(parent on | this on)</td><td>{expected:.3g}</td></tr>" in page


def test_a_failed_build_leaves_nothing_behind(world, monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(browse, "_index_page", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        browse.build_site(world["hsae"], world["inputs"], tmp_path / "site", name="hsae")
    assert list(tmp_path.iterdir()) == []


def test_an_sae_that_never_fires_is_refused_with_a_message(world, tmp_path):
    dead = world["hsae"].__class__(world["hsae"].cfg)
    with torch.no_grad():
        dead.threshold.fill_(1e9)
    with pytest.raises(browse.BrowseError, match="no latent fires on the .* tokens read"):
        browse.build_site(dead, world["inputs"], tmp_path / "site", name="dead")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, expected", [
    (["browse", "{tmp}", "--out", "{tmp}/site"], "neither a saved SAE folder (cfg.json) nor a run folder"),
    (["browse", "{tmp}", "--out", "{tmp}/site", "--prompts", "0"], "--prompts 0 is invalid"),
    (["browse", "{tmp}", "--out", "{tmp}/site", "--dataset", "wiki"], "--dataset 'wiki': allowed"),
])
def test_cli_bad_input_exits_2_with_a_message(argv, expected, tmp_path, capsys):
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "site").exists()


def test_cli_a_model_that_cannot_be_loaded_is_named(world, tmp_path, capsys, monkeypatch):
    from sae_lens_hierarchical import models

    def no_hub(name, **kwargs):  # a mock: the real gpt2 download needs the network this machine lacks
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    monkeypatch.setattr(models, "load_model", no_hub)
    saved = tmp_path / "hsae"
    world["hsae"].save_model(str(saved))
    assert cli.main(["browse", str(saved), "--out", str(tmp_path / "site"), "--model", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert "--model 'gpt2' cannot be loaded" in err
    assert not (tmp_path / "site").exists()


# ----------------------------------------------------------------------------------------------
# a real browser


def chromium_path() -> str | None:
    return os.environ.get("HSAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page():
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium, or set HSAE_CHROMIUM); .ci/run installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1100, "height": 900})
        pg.errors = []  # type: ignore[attr-defined]
        pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)  # type: ignore[attr-defined]
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))  # type: ignore[attr-defined]
        yield pg
        browser.close()


@pytest.mark.parametrize("name", ["hsae", "flat"])
def test_browser_index_renders_expands_and_searches(world, page, name, tmp_path):
    site = world["sites"][name]
    data = index_data(site)
    page.errors.clear()
    page.goto(site.as_uri())
    assert page.inner_text("#title") == f"{name}: {data['architecture']}"
    roots = page.locator("#tree > li[data-latent]")
    assert roots.count() == sum(1 for j, p in enumerate(data["parent"]) if p < 0 and data["level"][j] == 0 and data["count"][j] > 0)
    # expand the first root with live children: its children appear, sorted by frequency
    parent = next(
        int(roots.nth(i).get_attribute("data-latent")) for i in range(roots.count())
        if any(data["count"][c] > 0 for c, p in enumerate(data["parent"]) if p == int(roots.nth(i).get_attribute("data-latent")))
    )
    item = page.locator(f"#tree > li[data-latent='{parent}']")
    item.locator("> button.toggle").click()
    shown = [int(x) for x in item.locator("> ul > li").evaluate_all("els => els.map(e => e.dataset.latent)")]
    live = sorted((c for c, p in enumerate(data["parent"]) if p == parent and data["count"][c] > 0), key=lambda c: (-data["count"][c], c))
    assert shown == live
    item.locator("> button.toggle").click()
    assert item.locator("> ul").is_hidden()
    # search by id, then by a token of the top contexts
    page.fill("#search", str(parent))
    assert page.locator("#results li a").first.inner_text() == f"#{parent}"
    word = data["search"][parent].split()[0]
    page.fill("#search", word)
    hits = [h.removeprefix("#") for h in page.locator("#results li a").all_inner_texts()]
    assert str(parent) in hits or len(hits) == 50
    page.fill("#search", "zzzz-no-such-token")
    assert "no latent matches" in page.inner_text("#results")
    page.fill("#search", "")
    page.screenshot(path=str(tmp_path / f"index_{name}.png"))
    assert page.errors == []


def test_browser_latent_page_shows_contexts_with_the_highlighted_token(world, page, tmp_path):
    site = world["sites"]["hsae"]
    data = index_data(site)
    j = max(range(data["d_sae"]), key=lambda i: data["count"][i])
    page.errors.clear()
    page.goto((site.parent / "latents" / f"{j}.html").as_uri())
    assert page.inner_text("h1") == f"Latent #{j}"
    marks = page.locator(".contexts mark")
    assert marks.count() == min(10, data["count"][j])
    assert page.locator(".contexts mark").first.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
    assert re.search(r"fires on \d", page.inner_text(".facts"))
    page.locator("nav a").first.click()  # back to the index through the breadcrumbs
    assert page.url.endswith("/index.html")
    page.screenshot(path=str(tmp_path / "latent.png"))
    assert page.errors == []
