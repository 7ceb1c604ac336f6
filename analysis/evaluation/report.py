"""Plotly figures built from computed results (never from models), saved as standalone HTML."""
from __future__ import annotations

import html
from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from .evaluate import EvalResult


def training_curves(records: list[dict]) -> go.Figure:
    fig = make_subplots(rows=1, cols=3, subplot_titles=("FVU (batch)", "L0", "dead fraction"))
    for name in sorted({r["sae"] for r in records}):
        rows = [r for r in records if r["sae"] == name]
        tokens = [r["tokens"] for r in rows]
        for col, key in enumerate(("fvu", "l0", "dead_fraction"), start=1):
            fig.add_trace(go.Scatter(x=tokens, y=[r[key] for r in rows], name=name, legendgroup=name, showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(title_text="training tokens")
    fig.update_layout(height=380, title="Training curves")
    return fig


def density_histogram(log10_density: list[float]) -> go.Figure:
    fig = go.Figure(go.Histogram(x=log10_density, nbinsx=60))
    fig.update_layout(
        title="Feature density (dead features at -10)", xaxis_title="log10 firing frequency on held-out tokens",
        yaxis_title="features", height=380,
    )
    return fig


def evaluation_report(result: EvalResult, records: list[dict], title: str) -> str:
    """One standalone HTML page: metrics table, training curves and density histogram."""
    shown = {k: v for k, v in vars(result).items() if k not in ("log10_feature_density", "metrics")} | result.metrics
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{f'{v:.4f}' if isinstance(v, float) else html.escape(str(v))}</td></tr>"
        for k, v in shown.items()
    )
    figures = [density_histogram(result.log10_feature_density)]
    if records:
        figures.insert(0, training_curves(records))
    body = "".join(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False) for i, fig in enumerate(figures))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td{border:1px solid #ccc;padding:3px 8px}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><table>{rows}</table>{body}</body></html>"
    )
