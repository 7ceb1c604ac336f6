"""A feature graph as files: Neuronpedia-style graph JSON, and one standalone offline HTML
page (hook columns, token-position rows, edge width by weight) whose nodes open their
feature card (label, top contexts, logit effects) and link to the SAE's dashboard page.

Model text reaches the page only as JSON inside a <script> (`safe_json`) and is put into the
page with `textContent`, never as markup.
"""
from __future__ import annotations

import html
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from activations.hooks import hook_layer
from activations.io import atomic_write_bytes, atomic_write_json
from activations.store import sha256_file

from ..dashboard.builder import safe_json
from .feature_graph import FeatureGraph
from .nodes import Node

if TYPE_CHECKING:
    from ..features.atlas import Atlas
    from ..features.labels import Labels

FEATURE_TYPES = {"token": "embedding", "feature": "residual sae feature", "error": "sae reconstruction error"}
"""Neuronpedia's feature_type of each node kind (the target's: `GraphTarget.neuronpedia_type`)."""


def _finite(obj: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def feature_cards(graph: FeatureGraph, n_examples: int = 4, n_logits: int = 6) -> dict[str, dict[str, Any]]:
    """{node id: card} for the graph's feature nodes, from each SAE's atlas and labels when
    `saewb analyze` wrote them (<sae>/atlas/, <sae>/atlas/labels.json); fills `Node.label`."""
    from ..features.monitor import label_text

    cards, loaded = {}, {}
    for node in graph.nodes:
        index = node.stack_index
        if node.kind != "feature" or index >= len(graph.sae_paths) or not graph.sae_paths[index]:
            continue
        sae_dir = Path(graph.sae_paths[index])
        if index not in loaded:
            loaded[index] = _atlas_and_labels(str(sae_dir / "atlas"), atlas_key(sae_dir))
        atlas, labels = loaded[index]
        card = {"hook": graph.hooks[index], "feature": node.feature, "label": label_text(labels, node.feature) if labels else ""}
        node.label = node.label or card["label"]
        if atlas is not None:
            card |= _atlas_card(atlas, node.feature, n_examples, n_logits)
            page = sae_dir / "dashboard" / "features" / f"{node.feature}.html"
            card["dashboard"] = str(page) if page.exists() else None
        cards[node.id] = card
    return cards


def _atlas_card(atlas: Atlas, feature: int, n_examples: int, n_logits: int) -> dict[str, Any]:
    """A feature's density, max activation, top examples and promoted tokens, from its atlas."""
    vocab = atlas.vocab
    ids, values = atlas.logit_tokens("top")
    return {"density": float(atlas.density[feature]), "max_activation": float(atlas.max_activation[feature]),
            "examples": [{"tokens": [vocab.get(t, "?") for t in ex["tokens"]], "acts": [round(a, 3) for a in ex["acts"]],
                          "max_index": ex["max_index"]} for ex in atlas.examples(feature)[:n_examples]],
            "logits": [[vocab.get(int(t), "?"), round(float(v), 3)] for t, v in zip(ids[feature][:n_logits], values[feature][:n_logits])]}


class AtlasKey(NamedTuple):
    """What an SAE's cached atlas and labels depend on, by content (sha256; None: no such file)."""

    weights: str | None
    """sae_weights.safetensors: a retrained SAE in the same folder has other weights."""
    atlas: str | None
    """atlas/atlas.json (written last by `saewb analyze`: it changes with every atlas)."""
    labels: str | None
    """atlas/labels.json."""


def atlas_key(sae_dir: Path) -> AtlasKey:
    """The content of the SAE's weights, atlas.json and labels.json."""
    files = (sae_dir / "sae_weights.safetensors", sae_dir / "atlas" / "atlas.json", sae_dir / "atlas" / "labels.json")
    return AtlasKey(*(sha256_file(f) if f.exists() else None for f in files))


class AtlasAndLabels(NamedTuple):
    atlas: Atlas | None
    labels: Labels | None


@lru_cache(maxsize=16)
def _atlas_and_labels(atlas_dir: str, key: AtlasKey) -> AtlasAndLabels:
    """(atlas, labels) of one SAE, each None when not written; cached while the SAE's weights and
    the files are unchanged (`key`), so tracing many prompts through one stack reads each atlas once."""
    from ..features.atlas import load_atlas
    from ..features.labels import load_labels

    folder = Path(atlas_dir)
    return AtlasAndLabels(load_atlas(folder) if key.atlas is not None else None,
                          load_labels(folder / "labels.json") if key.labels is not None else None)


def neuronpedia_json(graph: FeatureGraph, model_name: str | None = None, slug: str = "saewb-graph") -> dict[str, Any]:
    """The graph in the shape of Neuronpedia's attribution-graph JSON (metadata, nodes, links)."""
    def layer_of(n: Node) -> str:
        if n.kind == "token":
            return "E"
        if n.kind == "target":
            return graph.target.neuronpedia_layer()
        return str(hook_layer(graph.hooks[n.stack_index]))

    nodes = [{"node_id": n.id, "jsNodeId": n.id, "feature": n.feature, "layer": layer_of(n), "ctx_idx": n.position,
              "feature_type": graph.target.neuronpedia_type if n.kind == "target" else FEATURE_TYPES[n.kind],
              "clerp": n.label or (repr(n.token) if n.kind == "token" else ""), "influence": n.attribution, "activation": n.activation,
              "is_target_logit": n.kind == "target", "token": n.token} for n in graph.nodes]
    return _finite({
        "metadata": {"slug": slug, "scan": model_name, "prompt": graph.prompt, "prompt_tokens": graph.tokens, "hooks": graph.hooks,
                     "target": graph.target.text, "node_threshold": graph.config.get("max_feature_nodes"),
                     "info": {"generator": "saewb trace", "faithfulness": graph.faithfulness, "metric": graph.metric,
                              "sign_agreement": graph.interventions.sign_agreement, "correlation": graph.interventions.correlation,
                              "replacement_score": graph.scores.get("replacement"), "completeness_score": graph.scores.get("completeness")}},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": ""},
        "nodes": nodes,
        "links": [{"source": e.source, "target": e.target, "weight": e.weight, "direct": e.direct} for e in graph.edges],
    })


def write_graph(graph: FeatureGraph, out: str | Path, model_name: str | None = None,
                cards: dict[str, dict[str, Any]] | None = None) -> tuple[Path, Path, Path]:
    """<out>.graph.json (the typed graph), <out>.neuronpedia.json and the standalone <out>.html."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cards = feature_cards(graph) if cards is None else cards
    # links relative to the page, so the folder can move with its runs (the caller's cards stay as they are)
    cards = {node: card | ({"dashboard": os.path.relpath(card["dashboard"], out.parent)} if card.get("dashboard") else {})
             for node, card in cards.items()}
    graph_path, np_path, html_path = (out.with_name(out.name + suffix) for suffix in (".graph.json", ".neuronpedia.json", ".html"))
    atomic_write_json(graph_path, _finite(graph.to_dict()))
    atomic_write_json(np_path, neuronpedia_json(graph, model_name, slug=out.name))
    atomic_write_bytes(html_path, graph_html(graph, cards).encode())
    return graph_path, np_path, html_path


def graph_html(graph: FeatureGraph, cards: dict[str, dict[str, Any]] | None = None) -> str:
    """One offline page: the graph as SVG, a summary, the strongest chain, and node cards on click."""
    data = _finite({"graph": graph.to_dict(), "cards": cards or {}, "chain": [n.id for n in graph.chain()],
                    "summary": graph.summary()})
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape('Feature graph: ' + graph.prompt)}</title>"
            f"<style>{_CSS}</style></head><body><header><h2 id='title'></h2><p id='summary'></p></header>"
            f"<div id='wrap'><div id='canvas'></div><aside id='card'><p class='hint'>Click a node for its card.</p></aside></div>"
            f"<h3>Strongest chain</h3><ol id='chain'></ol>"
            f"<script id='graph-data' type='application/json'>{safe_json(data)}</script><script>{_JS}</script></body></html>\n")


_CSS = """
body{font:14px system-ui,sans-serif;margin:16px;color:#222}header p{color:#444;max-width:1100px;white-space:pre-line}
#wrap{display:flex;gap:16px;align-items:flex-start}#canvas{overflow:auto;border:1px solid #ddd;max-width:75vw}
#card{width:360px;min-width:300px;border:1px solid #ddd;padding:10px;position:sticky;top:8px;font-size:13px}
.hint{color:#888}.tok{font-family:monospace;white-space:pre;padding:0 1px;border-radius:2px}
.ex{margin:4px 0;line-height:1.6}table.logits td{padding:0 6px;font-family:monospace}
svg text{font:11px system-ui,sans-serif}circle{cursor:pointer}circle.sel{stroke:#000;stroke-width:2.5}
line.dim{opacity:.08}circle.dim{opacity:.25}
"""

# The renderer: every piece of model text goes in through textContent (or an SVG text node).
_JS = r"""
const D = JSON.parse(document.getElementById('graph-data').textContent);
const G = D.graph, cards = D.cards, NS = 'http://www.w3.org/2000/svg';
const el = (tag, attrs = {}, text) => { const e = document.createElement(tag); for (const k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; return e; };
const sv = (tag, attrs = {}) => { const e = document.createElementNS(NS, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); return e; };
document.getElementById('title').textContent = 'Feature graph: ' + JSON.stringify(G.prompt) + ' \u2192 ' + G.target.text;
document.getElementById('summary').textContent = D.summary;
const nPos = G.tokens.length, nCols = G.hooks.length + 2, colW = 120, rowH = 56, padLeft = 150, padTop = 40, perRow = 8, dot = 12;
const col = n => n.kind === 'token' ? 0 : n.kind === 'target' ? nCols - 1 : n.layer + 1;
const cells = {}, place = {};
for (const n of G.nodes) { const key = col(n) + ':' + n.position; (cells[key] = cells[key] || []).push(n); }
// each position's row is as tall as its fullest cell needs (rows of `perRow` dots), so no cell spills into the next
const lines8 = new Array(nPos).fill(1);
for (const key in cells) { const p = Number(key.split(':')[1]); lines8[p] = Math.max(lines8[p], Math.ceil(cells[key].length / perRow)); }
const rowTop = [], rowHeight = lines8.map(k => Math.max(rowH, k * dot + 32));
let yAt = padTop; for (let p = 0; p < nPos; p++) { rowTop.push(yAt); yAt += rowHeight[p]; }
for (const key in cells) {
  const list = cells[key].sort((a, b) => Math.abs(b.attribution) - Math.abs(a.attribution));
  list.forEach((n, k) => { const [c, p] = key.split(':').map(Number);
    place[n.id] = [padLeft + c * colW + (k % perRow) * dot - 42, rowTop[p] + Math.floor(k / perRow) * dot - 12]; });
}
const num = v => Number.isFinite(v) ? v : 0, fmt = (v, n) => Number.isFinite(v) ? v.toPrecision(n) : 'n/a';
const maxAttr = G.nodes.filter(n => n.kind !== 'target').reduce((m, n) => Math.max(m, Math.abs(num(n.attribution))), 1e-12);
const maxW = G.edges.reduce((m, e) => Math.max(m, Math.abs(num(e.weight))), 1e-12);
const svg = sv('svg', {width: padLeft + nCols * colW, height: yAt + 20});
const heads = ['tokens', ...G.hooks.map(h => h.replace('.hook_resid_', ' ').replace('blocks.', 'L')), 'target'];
heads.forEach((h, c) => { const t = sv('text', {x: padLeft + c * colW - 40, y: 16}); t.textContent = h; svg.appendChild(t); });
G.tokens.forEach((tok, p) => { const t = sv('text', {x: 4, y: rowTop[p] + 4}); t.textContent = p + ' ' + JSON.stringify(tok); svg.appendChild(t);
  const below = rowTop[p] + rowHeight[p] - 24;
  svg.appendChild(sv('line', {x1: padLeft - 50, x2: padLeft + nCols * colW, y1: below, y2: below, stroke: '#f0f0f0'})); });
const lines = [];
for (const e of G.edges) {
  const a = place[e.source], b = place[e.target]; if (!a || !b) continue;
  const l = sv('line', {x1: a[0], y1: a[1], x2: b[0], y2: b[1], stroke: num(e.weight) > 0 ? '#2563eb' : '#dc2626',
    'stroke-width': (0.3 + 5 * Math.abs(num(e.weight)) / maxW).toFixed(2), opacity: 0.55});
  const t = sv('title'); t.textContent = e.source + ' \u2192 ' + e.target + ': weight ' + fmt(e.weight, 3) + ', direct ' + fmt(e.direct, 3);
  l.appendChild(t); l.dataset.s = e.source; l.dataset.t = e.target; svg.appendChild(l); lines.push(l);
}
const colour = {token: '#16a34a', feature: '#7c3aed', error: '#9ca3af', target: '#ea580c'};
const circles = {};
for (const n of G.nodes) {
  const [x, y] = place[n.id];
  const r = n.kind === 'target' ? 9 : 2.5 + 6 * Math.sqrt(Math.abs(num(n.attribution)) / maxAttr);
  const c = sv('circle', {cx: x, cy: y, r: r.toFixed(2), fill: colour[n.kind]});
  const t = sv('title'); t.textContent = n.id + (n.label ? ' ' + n.label : '') + ' (attribution ' + fmt(n.attribution, 3) + ')';
  c.appendChild(t); c.addEventListener('click', () => select(n)); svg.appendChild(c); circles[n.id] = c;
}
document.getElementById('canvas').appendChild(svg);
function select(n) {
  for (const id in circles) circles[id].classList.toggle('sel', id === n.id);
  const linked = new Set([n.id]);
  for (const l of lines) { const on = l.dataset.s === n.id || l.dataset.t === n.id; l.classList.toggle('dim', !on); if (on) { linked.add(l.dataset.s); linked.add(l.dataset.t); } }
  for (const id in circles) circles[id].classList.toggle('dim', !linked.has(id));
  const card = document.getElementById('card'); card.replaceChildren();
  const name = n.kind === 'feature' ? G.hooks[n.layer] + ' #' + n.feature : n.kind === 'error' ? G.hooks[n.layer] + ' error' : n.kind;
  card.appendChild(el('h3', {}, name));
  card.appendChild(el('p', {}, 'position ' + n.position + ' ' + JSON.stringify(n.token) + ' | activation ' + fmt(n.activation, 3) + ' | attribution ' + fmt(n.attribution, 3)));
  const info = cards[n.id];
  if (n.kind === 'target') card.appendChild(el('p', {}, 'target ' + G.target.text + '; metric: ' + JSON.stringify(G.metric)));
  if (!info) { if (n.kind === 'error') card.appendChild(el('p', {}, 'The error node: what the SAE at this hook does not reconstruct here, plus the departure from their held-out means of the features that are not active here.')); return; }
  card.appendChild(el('p', {}, 'label: ' + (info.label || '(none)')));
  if (info.density !== undefined) card.appendChild(el('p', {}, 'density ' + (100 * info.density).toFixed(3) + '% | max activation ' + fmt(info.max_activation, 3)));
  if (info.dashboard) { const a = el('a', {href: info.dashboard, target: '_blank'}, 'open the dashboard page'); card.appendChild(el('p')).appendChild(a); }
  if (info.examples) { card.appendChild(el('h4', {}, 'top contexts'));
    for (const ex of info.examples) { const row = el('div', {class: 'ex'}); const m = Math.max(1e-9, ...ex.acts);
      ex.tokens.forEach((tok, k) => { const s = el('span', {class: 'tok'}, tok); s.style.background = 'rgba(234,88,12,' + (Math.max(0, ex.acts[k]) / m * 0.8).toFixed(2) + ')'; row.appendChild(s); });
      card.appendChild(row); } }
  if (info.logits) { card.appendChild(el('h4', {}, 'promotes'));
    const t = el('table', {class: 'logits'}); for (const [tok, v] of info.logits) { const r = el('tr'); r.appendChild(el('td', {}, JSON.stringify(tok))); r.appendChild(el('td', {}, v.toFixed(2))); t.appendChild(r); }
    card.appendChild(t); }
}
const byId = Object.fromEntries(G.nodes.map(n => [n.id, n]));
for (const id of D.chain) { const n = byId[id]; const li = el('li');
  const words = n.kind === 'token' ? 'token ' + JSON.stringify(n.token) : n.kind === 'target' ? 'target ' + G.target.text
    : n.kind === 'error' ? G.hooks[n.layer] + ' error at ' + JSON.stringify(n.token) : G.hooks[n.layer] + ' #' + n.feature + ' at ' + JSON.stringify(n.token) + ': ' + (n.label || 'unlabelled');
  const a = el('a', {href: '#'}, words); a.addEventListener('click', ev => { ev.preventDefault(); select(n); }); li.appendChild(a);
  document.getElementById('chain').appendChild(li); }
"""
