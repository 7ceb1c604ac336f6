"""The intervention check of a graph's edges: the upstream node's term is scaled (ablated to
its mean, halved, doubled: `GraphConfig.check_doses`), the model runs on to the downstream
node's hook, and the measured change of the downstream value is compared with the one the
edge predicts, (dose - 1) x direct effect.

- **Post-activation.** A downstream feature's value is its activation after its SAE's
  nonlinearity (TopK selection included), so an intervention that switches it off or on is
  measured as such; the edge predicts the change of its pre-activation, which is the change of
  the activation while the feature stays on. An error node's value is the target's gradient
  at its hook dotted with its (recomputed) error; the target's, the target metric.
- **Distinct edges, by type.** The strongest `n_check_edges` edges of each type
  (token / feature / error -> feature / error / target) are each checked once per dose. Edges
  into the target pass only through the final norm and unembedding and agree almost by
  construction, so the headline is the feature -> feature edges.
- **Rank correlation.** Spearman's correlation of predicted and measured changes over the
  distinct edges, one dose at a time (pooling doses would pair each edge with its own mirror
  image and reward sign agreement alone).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from scipy.stats import spearmanr
from torch import Tensor

from .config import GraphConfig
from .decompose import CleanRun
from .nodes import Edge, EdgeCheck, InterventionCheck, Node

HEADLINE_TYPE = "feature->feature"
"""The edge type the headline sign agreement and rank correlation are taken on."""
HEADLINE_DOSE = 0.0
"""The dose of the headline: the upstream node ablated to its mean."""


def edge_type(up: Node, down: Node) -> str:
    return f"{up.kind}->{down.kind}"


@torch.no_grad()
def check_edges(run: CleanRun, edges: list[Edge], nodes: dict[str, Node], cfg: GraphConfig) -> InterventionCheck:
    """Scale the upstream node of the strongest `cfg.n_check_edges` edges of each type by each
    of `cfg.check_doses` (`nodes`: the graph's, by id); compare the measured change of the
    downstream value with the predicted one."""
    doses = [float(d) for d in cfg.check_doses]
    rows: list[EdgeCheck] = []
    for kind, picked in strongest_by_type(edges, nodes, cfg.n_check_edges).items():
        for e in picked:
            up, down = nodes[e.source], nodes[e.target]
            changes = _measured_changes(run, up, down, doses)
            rows += [EdgeCheck(source=e.source, target=e.target, edge_type=kind, dose=dose, predicted=(dose - 1.0) * e.direct,
                               measured=change) for dose, change in zip(doses, changes)]
    return intervention_check(rows)


def strongest_by_type(edges: list[Edge], nodes: dict[str, Node], n: int, types: set[str] | None = None) -> dict[str, list[Edge]]:
    """{edge type: its `n` strongest edges by |weight|} (only `types`, when given)."""
    chosen: dict[str, list[Edge]] = {}
    for e in sorted(edges, key=lambda e: -abs(e.weight)):
        kind = edge_type(nodes[e.source], nodes[e.target])
        if (types is None or kind in types) and len(chosen.setdefault(kind, [])) < n:
            chosen[kind].append(e)
    return chosen


def intervention_check(rows: list[EdgeCheck]) -> InterventionCheck:
    """The check of the measured rows: every type summarised, the headline on feature -> feature edges, ablated."""
    by_type = summarize(rows)
    headline = by_type.get(HEADLINE_TYPE, {}).get(_dose_key(HEADLINE_DOSE), {})
    return InterventionCheck(rows, headline.get("sign_agreement", float("nan")), headline.get("rank_correlation", float("nan")), by_type)


def _dose_key(dose: float) -> str:
    return f"x{dose:g}"


def summarize(rows: list[EdgeCheck]) -> dict[str, dict[str, dict[str, float]]]:
    """{edge type: {"x<dose>": {n_edges, sign_agreement, rank_correlation}}} of checked rows."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    groups: dict[tuple[str, float], list[EdgeCheck]] = {}
    for r in rows:
        groups.setdefault((r["edge_type"], r["dose"]), []).append(r)
    for (kind, dose), group in sorted(groups.items()):
        predicted, measured = [r["predicted"] for r in group], [r["measured"] for r in group]
        out.setdefault(kind, {})[_dose_key(dose)] = {"n_edges": len(group), "sign_agreement": sign_agreement(predicted, measured),
                                                    "rank_correlation": rank_correlation(predicted, measured)}
    return out


def sign_agreement(predicted: list[float], measured: list[float], tol: float = 1e-9) -> float:
    """Share of pairs whose signs agree (both within `tol` of 0 counts as agreeing)."""
    if not predicted:
        return float("nan")
    agree = [(p > 0) == (m > 0) and (p < 0) == (m < 0) or (abs(p) < tol and abs(m) < tol)
             for p, m in zip(predicted, measured)]
    return sum(agree) / len(agree)


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation; NaN for fewer than 3 pairs or a constant side."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    value = float(spearmanr(a, b).statistic)
    return value if math.isfinite(value) else float("nan")


def _upstream(run: CleanRun, node: Node) -> tuple[Tensor, Tensor, int]:
    """(the residual [P d] the node's term is part of, its term [d], blocks before it)."""
    p = node.position
    if node.kind == "token":
        return run.emb, run.emb_term[p], 0
    d = run.terms[node.stack_index]
    term = d.error[p] if node.kind == "error" else d.delta[p, node.feature] * d.W_dec[node.feature]
    return d.x, term, run.depths[node.stack_index]


def _measured_changes(run: CleanRun, up: Node, down: Node, doses: list[float]) -> list[float]:
    """The downstream node's value with the upstream term scaled by each dose, less its value
    with the term as it is (both through the same blocks)."""
    x, term, start = _upstream(run, up)
    scales = torch.tensor([1.0, *doses], device=x.device)  # row 0: unchanged
    xs = x[None].repeat(len(scales), 1, 1)
    xs[:, up.position] += (scales - 1.0)[:, None] * term
    values = _downstream_values(run, down, xs, start)
    return (values[1:] - values[0]).tolist()


def _downstream_values(run: CleanRun, node: Node, xs: Tensor, start: int) -> Tensor:
    """The downstream node's value [n] for residuals xs [n P d] after `start` blocks."""
    if node.kind == "target":
        return run.target.value(run.runner, run.stack, xs, start, run.position)
    d, q = run.terms[node.stack_index], node.position
    y = run.runner.blocks(xs, start, run.depths[node.stack_index])[:, q]  # [n d]
    if node.kind == "error":
        return d.error_of(y) @ run.gradients.hooks[node.stack_index][q]
    return d.sae.encode(y)[:, node.feature]


def headline(check: InterventionCheck) -> dict[str, Any]:
    """The numbers a bench reports: the headline and, per type at the headline dose, sign agreement and rank correlation."""
    key = _dose_key(HEADLINE_DOSE)
    return {"sign_agreement": check.sign_agreement, "rank_correlation": check.correlation,
            "by_type": {kind: doses.get(key, {}) for kind, doses in check.by_type.items()}}


__all__ = ["HEADLINE_DOSE", "HEADLINE_TYPE", "check_edges", "edge_type", "headline", "intervention_check", "rank_correlation",
           "sign_agreement", "strongest_by_type", "summarize"]
