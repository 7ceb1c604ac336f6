"""Plotly figures built from computed results (never from models), saved as standalone HTML."""
from __future__ import annotations

import html

import plotly.graph_objects as go
from plotly.subplots import make_subplots


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


def evaluation_report(result, records: list[dict], title: str) -> str:
    """One standalone HTML page: metrics table, training curves and density histogram."""
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float) else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in vars(result).items() if k != "log10_feature_density"
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


def steering_sweep_figure(result) -> go.Figure:
    """Dose-response curves of a `analysis.steering.SweepResult`: concept score, fluency
    (perplexity, repetition) and side effects (KL on neutral text) against strength, one line
    per series; conditions without a strength (the unsteered baseline, prompting) are
    horizontal dashed lines."""
    fig = make_subplots(rows=1, cols=3, specs=[[{}, {"secondary_y": True}, {}]],
                        subplot_titles=("concept (re-read by the unsteered model)", "fluency cost", "side effects on neutral text"))
    curves = [  # (column, field, label, secondary y)
        (1, "concept_activation", "mean activation", False), (1, "concept_frequency", "concept frequency", False),
        (1, "predicate_frequency", "label predicate frequency", False), (1, "predicate_rate", "label predicate rate", False),
        (2, "perplexity", "perplexity", False),
        (2, "repetition", "repetition rate", True), (3, "kl", "KL per token", False),
    ]
    series = list(dict.fromkeys(p.series for p in result.points))
    colors = ["#444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    strengths = [p.strength for p in result.points if p.strength is not None]
    lo, hi = (min(strengths), max(strengths)) if strengths else (0.0, 1.0)
    for s_idx, name in enumerate(series):
        points = sorted((p for p in result.points if p.series == name), key=lambda p: (p.strength is None, p.strength or 0))
        color = colors[s_idx % len(colors)]
        for col, key, label, secondary in curves:
            values = [getattr(p, key) for p in points]
            if all(v is None for v in values):
                continue
            dash = {"concept_frequency": "dot", "predicate_frequency": "dashdot", "predicate_rate": "longdash", "repetition": "dot"}.get(key)
            if points[0].strength is None:  # a condition without strength: a level line
                x, y, mode, dash = [lo, hi], [values[0]] * 2, "lines", "dash" if dash is None else "longdashdot"
            else:
                x, y, mode = [p.strength for p in points], values, "lines+markers"
            fig.add_trace(go.Scatter(x=x, y=y, mode=mode, name=f"{name}: {label}", legendgroup=name,
                                     line=dict(color=color, dash=dash)), row=1, col=col, secondary_y=secondary if col == 2 else None)
    unit = "x max activation" if result.unit == "max" else "absolute"
    fig.update_xaxes(title_text=f"strength ({unit})")
    fig.update_yaxes(title_text="perplexity", type="log", row=1, col=2, secondary_y=False)
    fig.update_yaxes(title_text="repetition rate", row=1, col=2, secondary_y=True)
    fig.update_layout(height=450, title=f"Steering features {result.features} ({result.mode})")
    return fig


def steering_report(result, title: str) -> str:
    """One standalone HTML page: the dose-response figure and example generations per
    condition (model text HTML-escaped)."""
    rows = "".join(
        f"<tr><td>{html.escape(p.series)}</td><td>{'' if p.strength is None else f'{p.strength:g}'}</td>"
        f"<td>{html.escape(' / '.join(' '.join(e.split()) for e in p.examples))}</td></tr>"
        for p in result.points
    )
    prompts = "".join(f"<li>{html.escape(p)}</li>" for p in result.prompts)
    figure = steering_sweep_figure(result).to_html(full_html=False, include_plotlyjs="inline")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td{border:1px solid #ccc;padding:3px 8px;vertical-align:top}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>{figure}<h2>Example generations</h2>"
        f"<table><tr><th>condition</th><th>strength</th><th>first generations</th></tr>{rows}</table>"
        f"<h2>Prompts</h2><ol>{prompts}</ol></body></html>"
    )
