"""The dashboard bundle: escaping of hostile model text, and rendering in headless Chromium."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
import torch

from activations.corpus import CorpusConfig
from analysis.dashboard import build_dashboard
from analysis.dashboard.builder import index_data
from analysis.features.atlas import AtlasConfig, build_atlas
from tests.test_atlas import tiny_sae

# Token strings and labels a model or corpus could produce; none may reach a page as markup.
HOSTILE_TOKENS = {
    ord("a"): "<script>alert(1)</script>",
    ord("t"): "\"quoted\" & 'single'",
    ord(" "): "</script><img src=x onerror=alert(2)>",
}
HOSTILE_LABEL = "<b onmouseover=alert(3)>bold</b> & \"q\""
MARKER = "zebra-marker"
DEAD = 5
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def atlas(tiny_model, text_corpus, tmp_path_factory):
    sae = tiny_sae()
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e3  # one feature that never fires
    cfg = AtlasConfig(corpus=CorpusConfig(source=str(text_corpus), context_len=32), n_tokens=31 * 24, batch_contexts=8,
                      top_n=5, n_samples=8, window_left=6, window_right=2, coact_every=1, autocast="none", device="cpu")
    atlas = build_atlas(sae, tiny_model, cfg)
    atlas.vocab.update(HOSTILE_TOKENS)
    assert int(atlas.tensors["fire_count"][DEAD]) == 0
    atlas.save(tmp_path_factory.mktemp("atlas") / "atlas")
    return atlas


@pytest.fixture(scope="module")
def labels(atlas):
    live = [i for i in range(atlas.d_sae) if atlas.tensors["fire_count"][i] > 0]
    features = [None] * atlas.d_sae
    for i in live:
        text = MARKER if i == live[0] else f"{HOSTILE_LABEL} {i}"
        features[i] = {
            "feature": i, "label": text, "kind": "token-set", "f1": 0.5, "precision": 0.6, "recall": 0.4,
            "recall_by_quartile": [0.1, 0.2, None, 0.9], "fpr_random": 0.001, "fpr_hard": None, "held_out_fires": 12,
            "candidates": [{"kind": "token-set", "label": text, "f1": 0.5, "precision": 0.6, "recall": 0.4},
                           {"kind": "logit", "label": HOSTILE_LABEL, "f1": 0.1, "precision": 0.1, "recall": 0.1}],
        }
    return {"summary": {"share_of_live_with_f1_at_least_0.5": 1.0, "note": HOSTILE_LABEL}, "features": features}


@pytest.fixture(scope="module")
def bundle(atlas, labels, tmp_path_factory):
    index = build_dashboard(atlas, tmp_path_factory.mktemp("dash") / "bundle", labels=labels)
    return index.parent


def test_bundle_layout(atlas, bundle):
    pages = sorted(int(p.stem) for p in (bundle / "features").glob("*.html"))
    assert pages == list(range(atlas.d_sae))
    assert (bundle / "assets" / "plotly.min.js").stat().st_size > 1_000_000
    # plotly is written once: every page refers to the shared file, none embeds it
    for page in [bundle / "index.html", *(bundle / "features").glob("*.html")]:
        text = page.read_text()
        assert "assets/plotly.min.js" in text and len(text) < 200_000 and 'src="http' not in text


def test_hostile_text_is_escaped_everywhere(atlas, bundle):
    hostile = [*HOSTILE_TOKENS.values(), HOSTILE_LABEL]
    for path in bundle.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            for s in hostile:
                assert s not in text, f"{s!r} unescaped in {path.relative_to(bundle)}"
    # ... and the strings are there, escaped (so the check above is not vacuous)
    assert json.dumps(HOSTILE_TOKENS[ord("a")]).replace("<", "\\u003c").replace(">", "\\u003e") in (bundle / "assets" / "vocab.js").read_text()
    live = int(torch.nonzero(atlas.tensors["fire_count"]).flatten()[1])
    assert html.escape(f"{HOSTILE_LABEL} {live}") in (bundle / "features" / f"{live}.html").read_text()


def test_subset_without_labels_replaces_old_pages(atlas, tmp_path):
    build_dashboard(atlas, tmp_path, features=list(range(10)))
    index = build_dashboard(atlas, tmp_path, features=[2, 1, 2])
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["1.html", "2.html"]
    data = json.loads(re.search(r'id="saewb-data" type="application/json">(.*?)</script>', (tmp_path / "features" / "1.html").read_text()).group(1))
    assert data["label"] is None and data["prev"] is None and data["next"] == 2
    assert all(n["page"] == (n["id"] in (1, 2)) for kind in ("decoder", "coact") for n in data["neighbours"][kind])
    assert '"labelled":false' in index.read_text()
    with pytest.raises(ValueError, match="feature entries"):
        build_dashboard(atlas, tmp_path, labels={"features": [None] * 3})


def test_cli_dashboard(atlas, tmp_path, capsys):
    from analysis.cli import main

    atlas_dir = tmp_path / "atlas"
    atlas.save(atlas_dir)
    main(["dashboard", "--atlas", str(atlas_dir), "--out", str(tmp_path / "run"), "--top-n", "3"])
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "dashboard" / "index.html").as_uri() in out
    densest = atlas.density.argsort(descending=True)[:3].tolist()
    assert sorted(int(p.stem) for p in (tmp_path / "run" / "dashboard" / "features").glob("*.html")) == sorted(densest)


# ---------------------------------------------------------------------------- headless Chromium
chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)")


def render(url: str, profile) -> str:
    """The DOM after the page's scripts ran (errors land in <html data-errors>)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    result = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-2000:]
    dom = result.stdout
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert "data-errors" not in html_tag, f"JavaScript errors on {url}: {html.unescape(html_tag)}"
    return dom


def rows(dom: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr data-feature="(\d+)"', dom)]


@chromium
def test_index_renders_and_filters(atlas, bundle, labels, tmp_path):
    index = (bundle / "index.html").as_uri()
    dom = render(f"{index}?sort=log10_density&desc=1", tmp_path)
    assert sorted(rows(dom)) == list(range(atlas.d_sae)) and rows(dom)[0] == int(atlas.density.argmax())
    assert 'class="plot-container' in dom  # the density histogram was drawn by plotly
    marked = next(i for i, f in enumerate(labels["features"]) if f and f["label"] == MARKER)
    assert rows(render(f"{index}?q={MARKER}", tmp_path)) == [marked]
    assert rows(render(f"{index}?q={DEAD}", tmp_path))[0] == DEAD  # an id matches its feature


@chromium
def test_feature_page_highlights_contexts(atlas, bundle, tmp_path):
    # a live feature whose top contexts contain the hostile "a" token
    feature = next(i for i in range(atlas.d_sae) if atlas.tensors["fire_count"][i] > 0
                   and any(ord("a") in e["tokens"] for e in atlas.examples(i, "top")))
    dom = render((bundle / "features" / f"{feature}.html").as_uri(), tmp_path)
    hot = re.findall(r'<span class="tok hot[^>]*>', dom)
    assert len(hot) >= len(atlas.examples(feature, "top"))
    assert all(re.search(r'title="[^"]*activation [\d.]+"', tag) for tag in hot)  # the hover value
    alphas = [re.search(r"background: rgba?\(255, 120, 20(?:, ([\d.]+))?\)", tag).group(1) for tag in hot]
    assert max(float(a or 1) for a in alphas) == 1.0 and min(float(a or 1) for a in alphas) < 1  # intensity follows activation
    assert 'class="plot-container' in dom  # the activation histogram
    # the hostile token is shown as text, never as markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script>alert(1)" not in dom


@chromium
def test_dead_feature_page(bundle, tmp_path):
    dom = render((bundle / "features" / f"{DEAD}.html").as_uri(), tmp_path)
    assert "never fired" in dom and "Logit effects" in dom


# ---------------------------------------------------------------------------- the label card
def summarised(labels: dict, live: list[int]) -> dict:
    """The test labels with a summary as `saewb analyze` writes it (one kind name hostile)."""
    summary = {"held_out_positions": 260_100, "live_features": len(live), "scored_features": len(live), "best_f1_at_least_0.5": 7,
               "share_of_live_with_f1_at_least_0.5": 0.5, "median_best_f1": 0.42, "best_kind_counts_at_f1_0.5": {"semantic": 700, "token-set": 5},
               "share_of_live_with_strong_f1_at_least_0.5": 0.25, "median_best_strong_f1": 0.31,
               "strong_kind_counts_at_f1_0.5": {"semantic": 613, HOSTILE_LABEL: 2}, "selection_share_strong": 0.3, "selection_share_all": 0.55,
               "lookup_share_strong": 0.1, "unexplained": 40, "unexplained_examples": [live[0], live[1]], "atlas_tokens": 744}
    return {"summary": summary, "features": labels["features"]}


def test_label_card_data_is_the_headline_a_table_by_kind_and_example_ids(atlas, labels, tmp_path):
    live = torch.nonzero(atlas.tensors["fire_count"]).flatten().tolist()
    card = index_data(atlas, live, summarised(labels, live))["label_card"]
    assert card["strong_share"] == 0.25 and card["all_share"] == 0.5 and card["live_features"] == len(live)
    assert card["kinds"] == [["semantic", 613, 700], [HOSTILE_LABEL, 2, 0], ["token-set", 0, 5]]  # by strong-firing count
    assert card["unexplained_examples"] == live[:2] and card["unexplained"] == 40
    assert "held_out_positions" not in card and "label_summary" not in index_data(atlas, live, summarised(labels, live))
    index = build_dashboard(atlas, tmp_path / "bundle", labels=summarised(labels, live), features=[live[0]])
    assert HOSTILE_LABEL not in index.read_text()  # the kind name is JSON-escaped in the page
    assert index_data(atlas, live, None)["label_card"] is None


@chromium
def test_label_card_renders_like_the_other_cards(atlas, labels, tmp_path):
    live = torch.nonzero(atlas.tensors["fire_count"]).flatten().tolist()
    index = build_dashboard(atlas, tmp_path / "bundle", labels=summarised(labels, live), features=[live[0]])
    dom = render(index.as_uri(), tmp_path / "profile")
    start = dom.index('<div class="card-title">live features with a compact label</div>')
    card = dom[start:dom.index("</section>", start)]
    assert '<div class="card-value">25%</div>' in card and "(50% all-firing)" in card
    for raw in ("held out positions", "held_out", "kind counts", "share of live", "unexplained examples", "_"):
        assert raw not in card, f"{raw!r} in the label card: {card}"  # no summary key names
    kinds = re.findall(r"<tr><td>(.*?)</td><td class=\"num\">(\d+)</td><td class=\"num\">(\d+)</td></tr>", card)
    assert '<table class="card-table">' in card and kinds == [("semantic", "613", "700"), (html.escape(HOSTILE_LABEL, quote=False), "2", "0"),
                                                              ("token-set", "0", "5")]
    assert f'<a href="features/{live[0]}.html">{live[0]}</a>' in card  # an example with a page in the bundle is a link
    assert f"features/{live[1]}.html" not in card and f", {live[1]}" in card  # one without is plain text
    assert "<b onmouseover" not in dom
