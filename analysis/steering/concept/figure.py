"""The dose-response figure of concept steering: the concept's frequency and the fluency cost
against the dose, steering and prompting on one plot (standalone plotly HTML)."""
from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from activations.io import atomic_write_bytes

from .dose import DoseSearch


def dose_response_figure(search: DoseSearch, concept: str, dose_unit: str) -> go.Figure:
    """Top: share of answers showing the concept (lexicon, request's words not counted) at each
    dose tried, prompting and the unsteered answers as lines. Bottom: perplexity (given the
    concept prompt) and repetition over the unsteered answers', with the budget. Filled markers:
    within budget."""
    points = sorted(search.points, key=lambda p: p.dose)
    doses = [p.dose for p in points]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=(f"'{concept}' in the answers", "fluency cost (x unsteered)"))
    symbols = ["circle" if p.within_budget else "circle-open" for p in points]
    fig.add_trace(go.Scatter(x=doses, y=[p.concept_frequency for p in points], mode="lines+markers", name="steering",
                             marker=dict(symbol=symbols, size=9), line=dict(color="#1f77b4")), row=1, col=1)
    lines = [("unsteered", search.unsteered_frequency, "dot", "#7f7f7f")]
    if search.prompting is not None:
        lines.append(("prompting", search.prompting.concept_frequency, "dash", "#d62728"))
    for name, value, dash, color in lines:
        fig.add_trace(go.Scatter(x=[min(doses), max(doses)], y=[value, value], mode="lines", name=name, line=dict(dash=dash, color=color)),
                      row=1, col=1)
    base_rep = max(search.base.repetition, search.repetition_floor)
    fig.add_trace(go.Scatter(x=doses, y=[p.fluency.perplexity / search.base.perplexity for p in points], mode="lines+markers",
                             name="perplexity (given the concept prompt)", marker=dict(symbol=symbols, size=9), line=dict(color="#2ca02c")),
                  row=2, col=1)
    fig.add_trace(go.Scatter(x=doses, y=[p.fluency.repetition / base_rep for p in points], mode="lines+markers", name="repetition",
                             marker=dict(symbol=symbols, size=9), line=dict(color="#9467bd", dash="dot")), row=2, col=1)
    if search.prompting is not None:
        fig.add_trace(go.Scatter(x=[min(doses), max(doses)], y=[search.prompting.fluency.perplexity / search.base.perplexity] * 2,
                                 mode="lines", name="prompting perplexity", line=dict(dash="dash", color="#d62728")), row=2, col=1)
    fig.add_trace(go.Scatter(x=[min(doses), max(doses)], y=[search.budget] * 2, mode="lines", name="budget",
                             line=dict(color="black", width=1)), row=2, col=1)
    fig.update_xaxes(type="log", title_text=f"dose ({dose_unit})", row=2, col=1)
    fig.update_yaxes(title_text="share of answers", range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="x unsteered", type="log", row=2, col=1)
    chosen = "none within budget" if search.dose is None else f"chosen dose {search.dose:.3g}"
    fig.update_layout(title=f"Steering toward '{concept}': dose-response on the tuning prompts ({chosen})", height=650,
                      template="plotly_white")
    return fig


def write_dose_response(search: DoseSearch, concept: str, dose_unit: str, path: str | Path) -> Path:
    """The figure as one standalone HTML file (plotly inlined, works offline)."""
    body = dose_response_figure(search, concept, dose_unit).to_html(full_html=False, include_plotlyjs="inline")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(concept)}: dose-response</title></head>"
            f"<body>{body}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, page.encode())
    return path


__all__ = ["dose_response_figure", "write_dose_response"]
