"""Prompt-centric views: which features fire on which tokens of a text, and which features
fire most selectively on a concept (how a user finds "the feature for X").

Texts are read like training contexts: behind the `<|endoftext|>` sink token, which is never
reported (position 0 is excluded everywhere in the workbench).
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import torch
from torch import Tensor

from activations.corpus import boundary_token_id
from activations.model import HookedModel, token_strings
from sae.base import SAE

from ..encoding import encode_contexts
from .atlas import Atlas
from .labels import Labels, check_labels


@dataclass
class TokenFeatures:
    token: str
    features: list[int]
    """Strongest features on this token, strongest first."""
    values: list[float]
    labels: list[str]
    """Display text of each feature's best label ("" without one)."""


def _label_text(labels: Labels | None, feature: int) -> str:
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
    for token, vals, feats in zip(strings, values.tolist(), ids.tolist()):
        live = [(v, i) for v, i in zip(vals, feats) if v > 0]
        out.append(TokenFeatures(token, [i for _, i in live], [round(v, 3) for v, _ in live], [_label_text(labels, i) for _, i in live]))
    return out


def monitor_table(rows: list[TokenFeatures], max_activation: Tensor | None = None) -> str:
    """Plain-text view: one line per token; `max_activation` [d_sae] adds each value's share of its feature's max."""
    lines = []
    for row in rows:
        shown = ", ".join(
            f"#{i} {v:.2f}" + (f" ({v / float(max_activation[i]):.0%} of max)" if max_activation is not None and max_activation[i] > 0 else "")
            + (f" [{label[:40]}]" if label else "")
            for i, v, label in zip(row.features, row.values, row.labels)
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
        tip = "\n".join(f"#{i}: {v:.2f} {label}" for i, v, label in zip(row.features, row.values, row.labels)) or "no feature"
        shown = row.token.replace("\n", "↵\n")
        spans.append(f'<span class="tok" style="background: rgba(255,120,0,{strength:.2f})" title="{html.escape(tip)}">{html.escape(shown)}</span>')
        cells = "".join(f"<td>#{i} {v:.2f} <small>{html.escape(label)}</small></td>" for i, v, label in zip(row.features, row.values, row.labels))
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


@torch.no_grad()
def find_features(query: str, model: HookedModel, sae: SAE, atlas: Atlas, labels: Labels | dict | None = None, n: int = 10, max_occurrences: int = 64) -> list[dict]:
    """Features that fire most selectively on `query`.

    Occurrences: every place the query's tokens (with or without a leading space) appear in
    the atlas's held-out contexts, up to `max_occurrences`, plus a few template sentences
    (so rare concepts still have evidence). At each occurrence the feature's activation is
    its maximum over the query's tokens. Score = r * log2(r / density), with r the share of
    occurrences it fires on and density its firing rate on all atlas tokens: high when a
    feature fires on the concept reliably and rarely elsewhere."""
    if not query.strip():
        raise ValueError("empty concept query")
    if atlas.d_sae != sae.cfg.d_sae:
        raise ValueError(f"the atlas is of a {atlas.d_sae}-feature SAE, not this one ({sae.cfg.d_sae} features); rebuild it with `saewb analyze`")
    if labels is not None:
        labels = check_labels(labels, sae.cfg.d_sae)
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
        occurrences = [acts[start:stop].amax(0) for acts, (_, start, stop) in zip(f, windows)]
    n_corpus = len(occurrences)
    texts = [t.format(q=query.strip()) for t in TEMPLATES]
    tokens, f = feature_activations(texts, model, sae)
    sink = boundary_token_id(model.tokenizer)
    query_ids = set(model.tokenizer(" " + query.strip(), add_special_tokens=False)["input_ids"]) | set(model.tokenizer(query.strip(), add_special_tokens=False)["input_ids"])
    for row, acts in zip(tokens, f):
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
    mean_act = acts.mean(0)
    order = torch.argsort(score * 1000 + mean_act / atlas.max_activation.clamp_min(1e-6), descending=True)[:n]
    out = []
    for i in order.tolist():
        label = labels.best(i) if labels is not None else None
        out.append({
            "feature": i, "score": round(float(score[i]), 4), "fire_rate_on_query": round(float(rate[i]), 4),
            "density": float(atlas.density[i]), "mean_act_on_query": round(float(mean_act[i]), 4),
            "max_activation": round(float(atlas.max_activation[i]), 4),
            "label": label.text if label else "", "label_f1": label.scores.f1 if label and label.scores else None,
            "occurrences": len(occurrences), "corpus_occurrences": n_corpus,
        })
    return out


__all__ = ["TokenFeatures", "activations_of_ids", "feature_activations", "find_features", "monitor", "monitor_html", "monitor_table"]
