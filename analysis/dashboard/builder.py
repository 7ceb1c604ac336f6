"""Static HTML dashboards of a feature atlas: opens offline from file://, no server.

    build_dashboard(load_atlas("runs/default/atlas"), "runs/default/dashboard", labels=load_labels(...))
    saewb dashboard --atlas runs/default/atlas --labels labels.json

The bundle:

    index.html              searchable (also `index.html?q=...`), sortable table of features +
                            the log-density histogram, the atlas summary and the labels' card
    features/<id>.html      one small stub page per feature: its data as JSON + the shared renderer
    assets/plotly.min.js    plotly, written once for the whole bundle (no CDN)
    assets/vocab.js         display strings of the token ids the pages refer to
    assets/style.css, common.js, index.js, feature.js   (copied from analysis/dashboard/assets/)

Pages are rendered in the browser from JSON, so a 4,608-feature bundle is tens of MB rather
than one plotly figure per page. Model and corpus text only ever reaches the DOM through
`textContent`, and JSON embedded in pages has `<`, `>`, `&` escaped, so token strings such
as `</script>` stay text. Feature pages are written to a staging folder that replaces
features/ when all are done, other files atomically; index.html is written last, so its
presence marks a complete bundle.
"""
from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from activations.io import atomic_write_bytes

from ..features.atlas import Atlas
from ..features.labels import FeatureLabels, Label, Labels, LabelSummary, check_labels

ASSETS = Path(__file__).with_name("assets")
ASSET_FILES = ("style.css", "common.js", "index.js", "feature.js")
QUANTILE_GROUPS = 4
"""The uniform sample of activating contexts (strongest first) is split into this many activation quantiles."""
PER_QUANTILE = 5
"""Contexts shown per quantile group (evenly spaced within it)."""
N_RANDOM = 5
"""Random activating contexts shown (sampled contexts not already shown in a quantile group)."""
N_FEATURE_TOKENS = 12
"""Tokens the feature fires on most often, listed on its page (5 of them in the index)."""

# Inline, first thing in <head>: records script errors and failed asset loads (capture phase)
# in a visible banner and in <html data-errors>, where headless-browser tests read them.
_ERROR_RECORDER = (
    "<script>window.SAEWB_ERRORS=[];addEventListener('error',function(e){"
    "var t=e.target,m=e.message||('could not load '+((t&&(t.src||t.href))||'a resource'));"
    "SAEWB_ERRORS.push(m);document.documentElement.setAttribute('data-errors',SAEWB_ERRORS.join(' | '));"
    "if(window.SAEWB&&SAEWB.showErrors)SAEWB.showErrors();},true);</script>"
)


def build_dashboard(atlas: Atlas, out_dir: str | Path, labels: Labels | dict | None = None, features: list[int] | None = None) -> Path:
    """Write the dashboard bundle of `features` (default: all) to `out_dir`; returns the path
    of its index.html. `labels`: the SAE's `Labels` (`analysis.features.labels`), or the
    labels.json object they are saved as; pages embed each feature's labels.json entry."""
    out = Path(out_dir)
    features = sorted({atlas.check_feature(i) for i in (range(atlas.d_sae) if features is None else features)})
    labels = None if labels is None else check_labels(labels, atlas.d_sae)
    (out / "assets").mkdir(parents=True, exist_ok=True)
    (out / "index.html").unlink(missing_ok=True)  # rewritten last: marks a complete bundle
    _write_assets(out / "assets")

    # Pages go to a staging folder that replaces features/ at the end: readers never see a
    # half-written page, stale pages of an earlier build go with it, and thousands of small
    # files need no fsync each.
    staging = Path(tempfile.mkdtemp(prefix=".features-", dir=out))
    in_bundle = set(features)
    used_tokens: set[int] = set()
    try:
        for position, i in enumerate(tqdm(features, desc="dashboard pages", unit="page")):
            data = feature_data(atlas, i, labels, in_bundle)
            data["prev"] = features[position - 1] if position > 0 else None
            data["next"] = features[position + 1] if position + 1 < len(features) else None
            used_tokens |= _token_ids(data)
            best = labels.best(i) if labels is not None else None
            title = f"Feature {i}" + (f" · {best.text}" if best is not None else "")
            (staging / f"{i}.html").write_bytes(_page(title, data, "feature.js", root="../"))
        vocab = {str(t): atlas.vocab.get(t, f"<id {t}>") for t in sorted(used_tokens)}
        atomic_write_bytes(out / "assets" / "vocab.js", f"window.SAEWB_VOCAB={safe_json(vocab)};\n".encode())
        staging.chmod(0o755)
        _replace_dir(staging, out / "features")
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    index = index_data(atlas, features, labels)
    path = out / "index.html"
    atomic_write_bytes(path, _page(f"Feature atlas · {atlas.hook_name}", index, "index.js", root=""))
    return path


# ---------------------------------------------------------------------------- page data
def feature_data(atlas: Atlas, i: int, labels: Labels | None, in_bundle: set[int]) -> dict:
    """Everything the page of feature `i` shows, as plain JSON (token ids, not strings:
    pages share assets/vocab.js). Its label is the feature's labels.json entry (None: none)."""
    entry = labels.entry(i) if labels is not None else None
    fire_count = int(atlas.fire_count[i])
    data = {
        "id": i, "n_features": atlas.d_sae, "n_tokens": atlas.n_tokens, "fire_count": fire_count,
        "density": fire_count / atlas.n_tokens, "max": float(atlas.max_activation[i]), "mean": float(atlas.mean_activation[i]),
        "label": _label_entry(entry), "meta": _meta(atlas),
        "logits": {
            side: [[int(t), round(float(v), 4)] for t, v in zip(ids[i], values[i], strict=True)]
            for side, (ids, values) in (("top", atlas.logit_tokens("top")), ("bottom", atlas.logit_tokens("bottom")))
        },
        "neighbours": {
            kind: [_neighbour(int(j), float(s), labels, in_bundle) for j, s in zip(ids[i], scores[i], strict=True) if j >= 0]
            for kind, (ids, scores) in (("decoder", atlas.neighbours("decoder")), ("coact", atlas.neighbours("coact")))
        },
    }
    if fire_count == 0:
        return data | {"dead": True}

    samples = atlas.examples(i, "sample")
    groups = np.array_split(np.arange(len(samples)), min(QUANTILE_GROUPS, len(samples)))
    shown = [g[np.unique(np.linspace(0, len(g) - 1, min(PER_QUANTILE, len(g))).round().astype(int))] for g in groups]
    rest = sorted(set(range(len(samples))) - {int(k) for g in shown for k in g})
    random = np.random.default_rng(i).choice(rest, size=min(N_RANDOM, len(rest)), replace=False) if rest else []
    ids, counts, act_sums = atlas.feature_tokens(i)
    frequency = atlas.token_frequency
    edges, hist = atlas.hist_edges.tolist(), atlas.hist[i].tolist()
    nonzero = [b for b, c in enumerate(hist) if c]
    lo, hi = nonzero[0], nonzero[-1] + 1
    return data | {
        "dead": False,
        "top": [_example(e) for e in atlas.examples(i, "top")],
        "quantiles": [
            {"rank_from": int(g[0]), "rank_to": int(g[-1]), "n_sample": len(samples), "examples": [_example(samples[k]) for k in sel]}
            for g, sel in zip(groups, shown, strict=True)
        ],
        "random": [_example(samples[k]) for k in sorted(int(k) for k in random)],
        "hist": {"edges": [round(e, 6) for e in edges[lo:hi + 1]], "counts": hist[lo:hi]},
        "tokens": [
            [int(t), int(c), round(float(s) / int(c), 4), int(frequency[t])]
            for t, c, s in zip(ids[:N_FEATURE_TOKENS], counts[:N_FEATURE_TOKENS], act_sums[:N_FEATURE_TOKENS], strict=True)
        ],
    }


def index_data(atlas: Atlas, features: list[int], labels: Labels | dict | None = None) -> dict:
    """The index table (one row per bundled feature) plus what the density histogram and
    summary need (over all features of the atlas, bundled or not)."""
    labels = None if labels is None else check_labels(labels, atlas.d_sae)
    density = atlas.density.tolist()
    max_act, mean_act = atlas.max_activation.tolist(), atlas.mean_activation.tolist()
    rows = []
    for i in features:
        label = labels.best(i) if labels is not None else None
        top_tokens = [atlas.vocab.get(t, f"<id {t}>") for t in atlas.feature_tokens(i)[0][:5].tolist()]
        rows.append([
            i, round(math.log10(density[i]), 3) if density[i] > 0 else None, round(max_act[i], 4), round(mean_act[i], 4),
            *((label.text, label.name or None, label.kind, _f1(label), _f1(label, "strong_f1")) if label else (None,) * 5), top_tokens,
        ])
    return {
        "meta": _meta(atlas), "summary": atlas.summary(), "labelled": labels is not None,
        "label_card": label_card(labels.summary) if labels is not None and labels.summary is not None else None,
        "columns": ["id", "log10_density", "max", "mean", "label", "name", "kind", "f1", "strong_f1", "top_tokens"], "rows": rows,
        "log10_density": [round(math.log10(d), 4) for d in density if d > 0],
    }


def label_card(summary: LabelSummary) -> dict:
    """What the index's label card shows of the labels' summary (report part): the headline
    shares, the features with a label of F1 >= 0.5 by label kind (rows [kind, strong-firing,
    all-firing], most first), and some unexplained features (ids, linked to their pages)."""
    strong, every = summary.strong_kind_counts or {}, summary.best_kind_counts or {}
    kinds = sorted(set(strong) | set(every), key=lambda kind: (-strong.get(kind, 0), -every.get(kind, 0), kind))
    return {
        "live_features": summary.live_features, "strong_share": summary.share_strong_f1_at_least_half,
        "all_share": summary.share_of_live_with_f1_at_least_half,
        "kinds": [[kind, strong.get(kind, 0), every.get(kind, 0)] for kind in kinds],
        "unexplained": summary.unexplained, "unexplained_examples": list(summary.unexplained_examples or []),
    }


def _label_entry(entry: FeatureLabels | None) -> dict | None:
    """The feature's labels.json entry, each label marked compact or not (lookup tables are shown apart)."""
    if entry is None:
        return None
    out = entry.to_json()
    out["compact"] = entry.best.compact
    for record, label in zip(out.get("candidates", []), entry.candidates, strict=False):
        record["compact"] = label.compact
    return out


def _example(example: dict) -> dict:
    """One context window: value at the maximum, token ids, activations (3 decimals: stored in fp16), max index."""
    return {
        "value": round(example["value"], 4), "context": example["context"], "tokens": example["tokens"],
        "acts": [round(a, 3) if a else 0 for a in example["acts"]], "max_index": example["max_index"],
    }


def _neighbour(j: int, score: float, labels: Labels | None, in_bundle: set[int]) -> dict:
    label = labels.best(j) if labels is not None else None
    return {"id": j, "score": round(score, 4), "label": label.text if label else None, "f1": _f1(label, "strong_f1") if label else None,
            "page": j in in_bundle}


def _meta(atlas: Atlas) -> dict:
    return {"model_name": atlas.model_name, "hook_name": atlas.hook_name, "sae_path": atlas.sae_path, "d_sae": atlas.d_sae,
            "n_tokens": atlas.n_tokens, "n_contexts": atlas.n_contexts}


def _f1(label: Label, metric: str = "f1") -> float | None:
    """The label's report-part score (`metric`: "f1" on all firings, "strong_f1")."""
    return getattr(label.scores, metric) if label.scores is not None else None


def _token_ids(data: dict) -> set[int]:
    """Token ids a feature page refers to (its share of assets/vocab.js)."""
    ids = {t for side in data["logits"].values() for t, _ in side}
    for example in data.get("top", []) + data.get("random", []) + [e for q in data.get("quantiles", []) for e in q["examples"]]:
        ids.update(example["tokens"])
    ids.update(row[0] for row in data.get("tokens", []))
    return ids


# ---------------------------------------------------------------------------- writing
def safe_json(obj: object) -> str:
    """JSON that can sit inside <script> (and a .js file): no `<`, `>`, `&` or JS line separators."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _page(title: str, data: dict, renderer: str, root: str) -> bytes:
    """A stub page: data as JSON, shared CSS/JS from assets/ (`root` = path to the bundle root)."""
    vocab = f'<script src="{root}assets/vocab.js"></script>' if renderer == "feature.js" else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{_ERROR_RECORDER}'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f'<link rel="stylesheet" href="{root}assets/style.css"></head><body><main id="app"></main>'
        f'<script id="saewb-data" type="application/json">{safe_json(data)}</script>'
        f'<script src="{root}assets/plotly.min.js"></script>{vocab}'
        f'<script src="{root}assets/common.js"></script><script src="{root}assets/{renderer}"></script></body></html>\n'
    ).encode()


def _write_assets(assets: Path) -> None:
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs().encode()
    target = assets / "plotly.min.js"
    if not target.exists() or target.stat().st_size != len(plotly_js) or target.read_bytes() != plotly_js:
        atomic_write_bytes(target, plotly_js)
    for name in ASSET_FILES:
        atomic_write_bytes(assets / name, (ASSETS / name).read_bytes())


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` in for `target` (two renames; the old folder is deleted afterwards)."""
    old = target.with_name(f".{target.name}-old-{os.getpid()}")
    if target.exists():
        target.replace(old)
    new.replace(target)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["build_dashboard", "feature_data", "index_data", "label_card"]
