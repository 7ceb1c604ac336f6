"""The intervention check of a graph's top edges out of features: the upstream feature is
ablated to its mean and clamped up (its term doubled), the model runs on to the downstream
node's hook, and the measured change of the downstream value is compared with the predicted
one (-direct, +direct)."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .config import GraphConfig
from .decompose import CleanRun
from .nodes import Edge, EdgeCheck, InterventionCheck, Node

INTERVENTIONS: tuple[tuple[float, Literal["ablate", "clamp"]], ...] = ((-1.0, "ablate"), (1.0, "clamp"))
"""(multiple of the feature's term added, name): ablate removes it, clamp doubles it."""


@torch.no_grad()
def check_edges(run: CleanRun, edges: list[Edge], nodes: dict[str, Node], cfg: GraphConfig) -> InterventionCheck:
    """Ablate / clamp up the upstream feature of the top `cfg.n_check_edges` edges out of
    features (`nodes`: the graph's, by id); compare the measured change of the downstream value
    with the predicted one."""
    rows: list[EdgeCheck] = []
    for e in [e for e in edges if nodes[e.source].kind == "feature"][:cfg.n_check_edges]:
        up, down = nodes[e.source], nodes[e.target]
        d, p = run.terms[up.stack_index], up.position
        step = d.delta[p, up.feature] * d.W_dec[up.feature]  # the feature's term [d]
        clean = _downstream_clean(run, down)
        for sign, intervention in INTERVENTIONS:
            x = d.x.clone()
            x[p] = x[p] + sign * step
            measured = _downstream_value(run, down, x[None], up.stack_index) - clean
            rows.append(EdgeCheck(source=e.source, target=e.target, intervention=intervention, predicted=sign * e.direct,
                                  measured=measured))
    if not rows:
        return InterventionCheck([], float("nan"), float("nan"))
    pred = torch.tensor([r["predicted"] for r in rows], dtype=torch.float64)
    meas = torch.tensor([r["measured"] for r in rows], dtype=torch.float64)
    agree = float(((pred.sign() == meas.sign()) | ((pred.abs() < 1e-9) & (meas.abs() < 1e-9))).double().mean())  # 36/40 is 0.9
    corr = float(torch.corrcoef(torch.stack([pred, meas]))[0, 1]) if len(rows) > 2 else float("nan")
    return InterventionCheck(rows, agree, corr)


def _downstream_clean(run: CleanRun, node: Node) -> float:
    """The downstream node's value on the clean prompt."""
    if node.kind == "target":
        return run.metric
    d, q = run.terms[node.stack_index], node.position
    if node.feature is None:
        return float(run.gradients.hooks[node.stack_index][q] @ d.error[q])
    return float(d.sae.pre_acts(d.x[q])[node.feature])


def _downstream_value(run: CleanRun, node: Node, x_up: Tensor, i_up: int) -> float:
    """The downstream node's value when the residual at hook `i_up` is x_up [1 P d] (the model runs on from there)."""
    if node.kind == "target":
        return float(run.target.value(run.runner, run.stack, x_up, run.depths[i_up], run.position)[0])
    d, q = run.terms[node.stack_index], node.position
    y = run.runner.blocks(x_up, run.depths[i_up], run.depths[node.stack_index])[0]
    if node.feature is None:
        return float(run.gradients.hooks[node.stack_index][q] @ d.error_of(y)[q])
    return float(d.sae.pre_acts(y[q])[node.feature])


__all__ = ["INTERVENTIONS", "check_edges"]
