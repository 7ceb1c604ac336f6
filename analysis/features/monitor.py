"""Prompt-centric views: which features fire on which tokens of a text, and which features
fire most selectively on a concept (how a user finds "the feature for X").

Texts are read like training contexts: behind the `<|endoftext|>` sink token, which is never
reported (position 0 is excluded everywhere in the workbench).
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import boundary_token_id
from activations.model import HookedModel, token_strings
from sae.base import SAE

from ..encoding import encode_contexts
from .atlas import Atlas
from .labels import Labels, check_labels

if TYPE_CHECKING:
    import plotly.graph_objects as go


@dataclass
class TokenFeatures:
    token: str
    features: list[int]
    """Strongest features on this token, strongest first."""
    values: list[float]
    labels: list[str]
    """Display text of each feature's best label ("" without one)."""


def label_text(labels: Labels | None, feature: int) -> str:
    """The display text of the feature's best label, "" without one."""
    label = labels.best(feature) if labels is not None else None
    return label.text if label is not None else ""


@torch.no_grad()
def feature_activations(text: str | list[str], model: HookedModel, sae: SAE, autocast: str = "none") -> tuple[Tensor, Tensor]:
    """(token ids [batch, pos], activations [batch, pos, d_sae]) of `text` read behind the sink;
    position 0 (the sink) has activations 0. Several texts are right-padded with the sink."""
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(t.strip() for t in texts):
        raise ValueError("empty text: nothing to monitor")
    sink = boundary_token_id(model.tokenizer)
    return activations_of_ids([[sink] + model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], model, sae, autocast)


@torch.no_grad()
def activations_of_ids(rows: list[list[int]], model: HookedModel, sae: SAE, autocast: str = "none") -> tuple[Tensor, Tensor]:
    """Token id rows (each starting with the sink) -> (tokens [batch, pos], activations
    [batch, pos, d_sae]); rows are right-padded, which a causal model never looks at."""
    sink = boundary_token_id(model.tokenizer)
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [sink] * (width - len(r)) for r in rows])
    device = next(model.parameters()).device
    f = encode_contexts(model, sae.to(device), tokens.to(device), autocast).f.cpu()
    for n, r in enumerate(rows):
        f[n, len(r):] = 0
    return tokens, f


def monitor(text: str, model: HookedModel, sae: SAE, labels: Labels | dict | None = None, top_k: int = 5) -> list[TokenFeatures]:
    """For each token of `text`, its `top_k` strongest features with their labels (`labels`:
    of this SAE, or its labels.json object)."""
    if labels is not None:
        labels = check_labels(labels, sae.cfg.d_sae)
    tokens, f = feature_activations(text, model, sae)
    values, ids = f[0, 1:].topk(min(top_k, f.shape[-1]), dim=-1)
    strings = token_strings(model.tokenizer, tokens[0, 1:].tolist())
    out = []
    for token, vals, feats in zip(strings, values.tolist(), ids.tolist(), strict=True):
        live = [(v, i) for v, i in zip(vals, feats, strict=True) if v > 0]
        out.append(TokenFeatures(token, [i for _, i in live], [round(v, 3) for v, _ in live], [label_text(labels, i) for _, i in live]))
    return out


def monitor_table(rows: list[TokenFeatures], max_activation: Tensor | None = None) -> str:
    """Plain-text view: one line per token; `max_activation` [d_sae] adds each value's share of its feature's max."""
    lines = []
    for row in rows:
        shown = ", ".join(
            f"#{i} {v:.2f}"
            + (f" ({v / float(max_activation[i]):.0%} of max)" if max_activation is not None and max_activation[i] > 0 else "")
            + (f" [{label[:40]}]" if label else "")
            for i, v, label in zip(row.features, row.values, row.labels, strict=True)
        )
        lines.append(f"{row.token!r:>16}  {shown}")
    return "\n".join(lines)


def monitor_html(rows: list[TokenFeatures], title: str = "Feature monitor", max_activation: Tensor | None = None) -> str:
    """Standalone page: the text with each token shaded by its strongest feature's activation
    (relative to that feature's `max_activation` [d_sae] when given), and the features listed on hover and below."""
    spans, table = [], []
    for n, row in enumerate(rows):
        strength = 0.0
        if row.features:
            top = row.features[0]
            scale = float(max_activation[top]) if max_activation is not None and max_activation[top] > 0 else max(row.values[0], 1e-6)
            strength = min(1.0, row.values[0] / scale)
        tip = "\n".join(f"#{i}: {v:.2f} {label}" for i, v, label in zip(row.features, row.values, row.labels, strict=True)) or "no feature"
        shown = row.token.replace("\n", "↵\n")
        spans.append(f'<span class="tok" style="background: rgba(255,120,0,{strength:.2f})" title="{html.escape(tip)}">'
                     f'{html.escape(shown)}</span>')
        cells = "".join(f"<td>#{i} {v:.2f} <small>{html.escape(label)}</small></td>"
                        for i, v, label in zip(row.features, row.values, row.labels, strict=True))
        table.append(f"<tr><td>{n + 1}</td><td><code>{html.escape(repr(row.token))}</code></td>{cells}</tr>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px} .text{white-space:pre-wrap;font-family:monospace;"
        "font-size:15px;line-height:1.8;border:1px solid #ddd;padding:1em} .tok{border-radius:3px} td{padding:2px 8px;"
        "border-bottom:1px solid #eee;font-size:13px} small{color:#666}</style></head><body>"
        f"<h2>{html.escape(title)}</h2><div class='text'>{''.join(spans)}</div><h3>Strongest features per token</h3>"
        f"<table>{''.join(table)}</table></body></html>"
    )


# ---------------------------------------------------------------------------- concept search
TEMPLATES = ("{q}", "The {q}.", "I thought about the {q} all day.", "She wrote a long letter about {q}.", "What do you know about {q}?")


class InputSelectivity(NamedTuple):
    score: Tensor
    """[d_sae] r * log2(r / density): high when a feature fires on the concept reliably and rarely elsewhere."""
    fire_rate: Tensor
    """[d_sae] r, the share of the concept's occurrences a feature fires on."""
    mean_activation: Tensor
    """[d_sae] mean activation over the occurrences."""
    n_occurrences: int
    n_corpus: int
    """Occurrences found in the atlas's held-out text (the rest are template sentences)."""


@torch.no_grad()
def input_selectivity(query: str, model: HookedModel, sae: SAE, atlas: Atlas, max_occurrences: int = 64) -> InputSelectivity:
    """How selectively every feature fires on `query` (the input side of a concept).

    Occurrences: every place the query's tokens (with or without a leading space) appear in
    the atlas's held-out contexts, up to `max_occurrences`, plus a few template sentences
    (so rare concepts still have evidence). At each occurrence the feature's activation is
    its maximum over the query's tokens. Score = r * log2(r / density), with r the share of
    occurrences it fires on and density its firing rate on all atlas tokens."""
    if not query.strip():
        raise ValueError("empty concept query")
    if atlas.d_sae != sae.cfg.d_sae:
        raise ValueError(f"the atlas is of a {atlas.d_sae}-feature SAE, not this one ({sae.cfg.d_sae} features); "
                         "rebuild it with `saewb analyze`")
    windows = []
    for variant in dict.fromkeys((" " + query.strip(), query.strip())):
        ids = torch.tensor(model.tokenizer(variant, add_special_tokens=False)["input_ids"])
        tokens = atlas.tokens.long()
        if len(ids) == 0 or len(ids) >= tokens.shape[1]:
            continue
        match = (tokens.unfold(1, len(ids), 1) == ids).all(-1)  # [contexts, positions]
        for ctx, start in torch.nonzero(match).tolist():
            if start >= 1 and len(windows) < max_occurrences:
                windows.append((tokens[ctx, :start + len(ids)].tolist(), start, start + len(ids)))
    occurrences = []
    if windows:
        _, f = activations_of_ids([w for w, _, _ in windows], model, sae)
        occurrences = [acts[start:stop].amax(0) for acts, (_, start, stop) in zip(f, windows, strict=True)]
    n_corpus = len(occurrences)
    texts = [t.format(q=query.strip()) for t in TEMPLATES]
    tokens, f = feature_activations(texts, model, sae)
    sink = boundary_token_id(model.tokenizer)
    variants = (" " + query.strip(), query.strip())
    query_ids = {t for variant in variants for t in model.tokenizer(variant, add_special_tokens=False)["input_ids"]}
    for row, acts in zip(tokens, f, strict=True):
        on_query = torch.tensor([int(t) in query_ids and int(t) != sink for t in row])
        on_query[0] = False
        if on_query.any():
            occurrences.append(acts[on_query].amax(0))
    if not occurrences:
        raise ValueError(f"no occurrence of {query!r} could be read")
    acts = torch.stack(occurrences)  # [occurrences, d_sae]
    rate = (acts > 0).double().mean(0)
    density = atlas.density.clamp_min(1.0 / atlas.n_tokens)
    score = rate * torch.log2(rate.clamp_min(1e-12) / density)
    score = torch.where(rate > 0, score, torch.zeros_like(score))
    return InputSelectivity(score.float(), rate.float(), acts.mean(0), len(occurrences), n_corpus)


@torch.no_grad()
def find_features(query: str, model: HookedModel, sae: SAE, atlas: Atlas, labels: Labels | dict | None = None, n: int = 10,
                  max_occurrences: int = 64) -> list[dict]:
    """The `n` features that fire most selectively on `query` (`input_selectivity`), with
    their labels: what a feature *reads*. For steering, what it *writes* matters too:
    `analysis.steering.concept.search_concept` adds the output side."""
    if labels is not None:
        labels = check_labels(labels, sae.cfg.d_sae)
    sel = input_selectivity(query, model, sae, atlas, max_occurrences)
    score, rate, mean_act = sel.score, sel.fire_rate, sel.mean_activation
    order = torch.argsort(score.double() * 1000 + mean_act / atlas.max_activation.clamp_min(1e-6), descending=True)[:n]
    out = []
    for i in order.tolist():
        label = labels.best(i) if labels is not None else None
        out.append({
            "feature": i, "score": round(float(score[i]), 4), "fire_rate_on_query": round(float(rate[i]), 4),
            "density": float(atlas.density[i]), "mean_act_on_query": round(float(mean_act[i]), 4),
            "max_activation": round(float(atlas.max_activation[i]), 4),
            "label": label.text if label else "", "label_f1": label.scores.f1 if label and label.scores else None,
            "occurrences": sel.n_occurrences, "corpus_occurrences": sel.n_corpus,
        })
    return out


# ---------------------------------------------------------------------------- concept monitoring
@dataclass
class ConceptReadings:
    """How strongly each concept's features fire on each text."""

    texts: list[str]
    concepts: list[str]
    features: dict[str, list[int]]
    """Each concept's features (the input side of the concept search: what fires on the concept)."""
    score: Tensor
    """[n_texts, n_concepts] max over the text's tokens and the concept's features of activation / max activation."""
    per_feature: dict[str, Tensor]
    """concept -> [n_texts, n_features] max activation / max activation of each of its features."""
    top_token: list[list[str]]
    """[n_texts][n_concepts] the token where the concept's score peaks ("" where nothing fires)."""

    def table(self, width: int = 60) -> str:
        """Plain text: one row per text, one column per concept, then the mean and the share of texts where it fires."""
        head = f"{'text':<{width}} " + " ".join(f"{c[:12]:>12}" for c in self.concepts)
        rows = [head]
        for n, text in enumerate(self.texts):
            short = " ".join(text.split())
            short = short if len(short) <= width else short[:width - 1] + "…"
            rows.append(f"{short:<{width}} " + " ".join(f"{float(v):>12.2f}" for v in self.score[n]))
        rows.append(f"{'mean':<{width}} " + " ".join(f"{float(v):>12.2f}" for v in self.score.mean(0)))
        fire_share = (self.score > 0).float().mean(0)
        rows.append(f"{'share of texts where it fires':<{width}} " + " ".join(f"{float(v):>12.0%}" for v in fire_share))
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"concepts": self.concepts, "features": self.features, "texts": self.texts, "score": self.score.tolist(),
                "per_feature": {c: v.tolist() for c, v in self.per_feature.items()}, "top_token": self.top_token}


CONCEPT_FEATURES = 5
"""Features per concept a concept monitor watches (`concept_features`; `saewb monitor --concept-features`)."""


def concept_features(concept: str, model: HookedModel, sae: SAE, atlas: Atlas, n: int = CONCEPT_FEATURES,
                     max_density: float = 0.02) -> list[int]:
    """The `n` features that fire most selectively on `concept` (`input_selectivity`), dead and
    dense features left out: for monitoring, what a feature *reads* is what counts."""
    sel = input_selectivity(concept, model, sae, atlas)
    usable = (atlas.max_activation > 0) & (atlas.density <= max_density) & (sel.fire_rate > 0)
    score = torch.where(usable, sel.score, torch.full_like(sel.score, -float("inf")))
    chosen = score.topk(n).indices
    return [int(f) for f in chosen if usable[f]]


@torch.no_grad()
def monitor_concepts(texts: list[str], model: HookedModel, sae: SAE, atlas: Atlas, concepts: dict[str, list[int]], batch_size: int = 8,
                     max_tokens: int | None = None) -> ConceptReadings:
    """Read every text (behind the sink; at most `max_tokens` tokens, default the SAE's context
    length) and report each concept's strongest firing, in units of its features' max activation."""
    if not texts or not all(t.strip() for t in texts):
        raise ValueError("empty text: nothing to monitor")
    if not concepts or not all(concepts.values()):
        raise ValueError("each concept needs at least one feature")
    names = list(concepts)
    ids = torch.tensor([f for c in names for f in concepts[c]])
    scale = atlas.max_activation[ids].clamp_min(1e-12)
    limit = (max_tokens or sae.cfg.context_size or 128) - 1
    sink = boundary_token_id(model.tokenizer)
    rows = [[sink] + model.tokenizer(t, add_special_tokens=False)["input_ids"][:limit] for t in texts]
    best_values, best_pos, token_rows = [], [], []
    for b in tqdm(range(0, len(rows), batch_size), desc="monitor", disable=len(rows) <= batch_size):
        tokens, f = activations_of_ids(rows[b:b + batch_size], model, sae)
        rel = f[..., ids] / scale  # [batch, pos, n_ids]
        values, pos = rel.max(1)
        best_values.append(values)
        best_pos.append(pos)
        token_rows += tokens.tolist()
    values, pos = torch.cat(best_values), torch.cat(best_pos)  # [n_texts, n_ids]
    per_feature, score, top_token, start = {}, [], [[] for _ in texts], 0
    for c in names:
        k = len(concepts[c])
        v, p = values[:, start:start + k], pos[:, start:start + k]
        per_feature[c] = v
        best, which = v.max(1)
        score.append(best)
        for n in range(len(texts)):
            top_token[n].append(token_strings(model.tokenizer, [token_rows[n][int(p[n, which[n]])]])[0] if best[n] > 0 else "")
        start += k
    return ConceptReadings(list(texts), names, {c: list(concepts[c]) for c in names}, torch.stack(score, 1), per_feature, top_token)


def concept_heatmap(readings: ConceptReadings, title: str = "Concept monitor") -> go.Figure:
    """Plotly heatmap: texts down, concepts across, colour = the concept's strongest firing
    (x its features' max activation); hover shows the text and the token where it peaks."""
    import plotly.graph_objects as go

    short = [(" ".join(t.split())[:60] + ("…" if len(" ".join(t.split())) > 60 else "")) for t in readings.texts]
    hover = [[f"{html.escape(short[n])}<br>{html.escape(c)}: {float(readings.score[n, j]):.2f} "
               f"on {html.escape(repr(readings.top_token[n][j]))}"
              for j, c in enumerate(readings.concepts)] for n in range(len(readings.texts))]
    fig = go.Figure(go.Heatmap(z=readings.score.numpy(), x=readings.concepts, y=[f"{n + 1}. {html.escape(s)}" for n, s in enumerate(short)],
                               text=hover, hoverinfo="text", colorscale="Oranges", zmin=0, colorbar={"title": "x max act."}))
    fig.update_layout(title=title, height=max(300, 24 * len(short) + 150), yaxis={"autorange": "reversed"}, xaxis={"side": "top"})
    return fig


def concept_monitor_html(readings: ConceptReadings, title: str = "Concept monitor") -> str:
    """Standalone page: the heatmap, and a table of every text with its scores (model text escaped)."""
    figure = concept_heatmap(readings, title).to_html(full_html=False, include_plotlyjs="inline")
    feats = "".join(f"<li>{html.escape(c)}: features {', '.join(map(str, fs))}</li>" for c, fs in readings.features.items())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in readings.concepts)
    body = "".join(
        f"<tr><td>{n + 1}</td><td>{html.escape(t)}</td>" + "".join(
            f"<td>{float(readings.score[n, j]):.2f}<br>"
            f"<small>{html.escape(repr(readings.top_token[n][j])) if readings.top_token[n][j] else ''}</small></td>"
            for j in range(len(readings.concepts))) + "</tr>"
        for n, t in enumerate(readings.texts))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}small{color:#666}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><ul>{feats}</ul>{figure}<table><tr><th>#</th><th>text</th>{head}</tr>{body}</table></body></html>")


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of `scores` [n] for the bool labels `positive` [n] (ties count
    half): the chance a random positive text scores above a random negative one."""
    positive = positive.bool()
    pos, neg = scores[positive].double(), scores[~positive].double()
    if not len(pos) or not len(neg):
        raise ValueError("AUROC needs both positive and negative texts")
    greater = (pos[:, None] > neg[None]).double().sum()
    ties = (pos[:, None] == neg[None]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))



__all__ = ["CONCEPT_FEATURES", "ConceptReadings", "InputSelectivity", "TokenFeatures", "activations_of_ids", "auroc", "concept_features",
           "concept_heatmap", "concept_monitor_html", "feature_activations", "find_features", "input_selectivity", "monitor",
           "monitor_concepts", "monitor_html", "monitor_table"]
