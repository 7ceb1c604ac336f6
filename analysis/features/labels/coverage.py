"""The label coverage report: how much of the SAE its labels explain, by kind, measured on the
report part of the held-out text, as one standalone HTML page (plotly inlined, opens offline).

    write_coverage_report(labels, "runs/default/sae/topk_k32_4608/atlas/labels_coverage.html")
"""
from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from activations.io import atomic_write_bytes

from .store import Labels


def coverage_figure(labels: Labels) -> go.Figure:
    """Report-part F1 of each live feature's chosen compact label, stacked by kind: strong
    firings (the label chosen by strong F1) and all firings (chosen by all-firing F1)."""
    live = [entry for entry in labels.features if entry is not None]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("strong firings (activation > max / 4)", "all firings (activation > 0)"))
    kinds = sorted({entry.best.kind for entry in live} | {entry.best_all_firings.kind for entry in live})
    for col, (pick, metric) in enumerate(((lambda e: e.best, "strong_f1"), (lambda e: e.best_all_firings, "f1")), start=1):
        for kind in kinds:
            values = [getattr(pick(e).scores, metric) or 0.0 for e in live if pick(e).kind == kind and pick(e).scores is not None]
            fig.add_trace(go.Histogram(x=values, name=kind, legendgroup=kind, showlegend=col == 1,
                                       xbins=dict(start=0, end=1.0001, size=0.05)), row=1, col=col)
        fig.add_vline(x=0.5, line_dash="dash", line_color="grey", row=1, col=col)
    fig.update_layout(barmode="stack", height=420, title="Held-out F1 of each feature's label (report part), by kind")
    fig.update_xaxes(title_text="F1", range=[0, 1])
    fig.update_yaxes(title_text="features", col=1)
    return fig


def _examples_table(labels: Labels) -> str:
    summary = labels.summary
    rows = []
    for feature in (summary.unexplained_examples or []) if summary else []:
        entry = labels.entry(feature)
        if entry is None:
            continue
        best = entry.best
        strong = best.scores.strong_f1 if best.scores and best.scores.strong_f1 is not None else float("nan")
        rows.append(f"<tr><td>{feature}</td><td>{html.escape(best.kind)}</td><td>{html.escape(best.text)}</td><td>{strong:.2f}</td>"
                    f"<td>{entry.held_out_fires or 0}</td></tr>")
    return ("<table><tr><th>feature</th><th>kind</th><th>best compact label</th><th>strong F1</th><th>firings</th></tr>"
            + "".join(rows) + "</table>")


def coverage_report(labels: Labels, title: str = "Label coverage") -> str:
    """The page: headline shares (report part, with the selection part beside them), the F1
    distributions by kind, and examples of unexplained features."""
    s = labels.summary
    if s is None:
        raise ValueError("these labels have no summary (hand-written?): score them with `saewb analyze` first")
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    headline = (
        f"<ul><li>compact label with strong-firing F1 &ge; 0.5: <b>{pct(s.share_strong_f1_at_least_half)}</b> of {s.live_features:,} live "
        f"features (on the selection part it was chosen on: {pct(s.selection_share_strong)})</li>"
        f"<li>compact label with all-firing F1 &ge; 0.5: <b>{pct(s.share_of_live_with_f1_at_least_half)}</b> "
        f"(selection part: {pct(s.selection_share_all)})</li>"
        f"<li>reported apart, never counted: a lookup table (&gt; 16 tokens) with strong F1 &ge; 0.5: {pct(s.lookup_share_strong)}</li>"
        + (f"<li>were every semantic ball compact, not only those of &le; 64 tokens: {pct(s.any_ball_share_strong)} strong, "
           f"{pct(s.any_ball_share_all)} all-firing</li>" if s.any_ball_share_strong is not None else "")
        + f"<li>unexplained (no compact label with strong F1 &ge; 0.5): {s.unexplained:,}</li></ul>"
    )
    by_count = sorted((s.strong_kind_counts or {}).items(), key=lambda kv: -kv[1])
    counts = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:,}</td></tr>" for k, v in by_count)
    figure = coverage_figure(labels).to_html(full_html=False, include_plotlyjs="inline")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{headline}{figure}<h2>Kinds of the labels with strong F1 &ge; 0.5</h2>"
            f"<table><tr><th>kind</th><th>features</th></tr>{counts}</table>"
            f"<h2>Unexplained features, a sample</h2>{_examples_table(labels)}</body></html>")


def write_coverage_report(labels: Labels, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, coverage_report(labels).encode())
    return path


__all__ = ["coverage_figure", "coverage_report", "write_coverage_report"]
