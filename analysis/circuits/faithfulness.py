"""How much of the target a graph keeps: the target metric with every node outside it
mean-ablated at every hook, as a share of the way from everything ablated to the clean prompt.

In the ablated run each hook's residual is rebuilt from its nodes: the held-out mean, plus
every kept feature re-encoded by its SAE from that run's own residual, plus every kept error
node. How a kept error node is rebuilt is the definition that matters, and both are reported:

- **recomputed** (the headline; Marks et al. 2024): the error of the ablated run's own residual,
  x - mean - (its active features' departures) @ W_dec. An error node then carries only what
  the ablated run itself leaves unexplained, never clean-run information.
- **frozen**: the error node's clean value, whatever the ablated run did upstream. It brings
  clean-run information back past the ablation, so it flatters the graph.

Beside them, two bounds on the graph's features: every error node ablated (the features alone
carry the target) and every error node kept (recomputed).

Faithfulness is (graph - empty) / (clean - empty). It is undefined (NaN) when mean-ablating
everything barely moves the target (|clean - empty| < `min_span` x max(|clean|, |empty|)),
since the ratio would divide by noise. A graph passes when |1 - F| <= `PASS_TOLERANCE`.
"""
from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .config import GraphConfig
from .decompose import CleanRun
from .pruning import Candidate, Ranking, budget_of

ErrorMode = Literal["recomputed", "frozen"]
PASS_TOLERANCE = 0.2
"""A graph passes when its faithfulness is within this of 1 (over 1 is as wrong as under)."""


class Faithfulness(NamedTuple):
    metric: dict[str, Any]
    """The target metric: clean, all ablated (empty), graph (errors recomputed), graph_frozen,
    graph_no_errors, graph_all_errors, every node kept (full), each smaller feature budget
    (topN), and the faithfulness of each (faithfulness_<key>); nodes_top: the feature nodes of
    each budget; span_defined: whether the ratio is defined; active_features: the features
    active at the graph's hooks and positions, every one a candidate node."""
    faithfulness: float
    """(graph - empty) / (clean - empty), error nodes recomputed; NaN when undefined."""


def faithfulness_share(metric: dict[str, float], value: float, min_span: float) -> float:
    """(value - empty) / (clean - empty), or NaN when the span is within noise (see the module)."""
    clean, empty = metric["clean"], metric["empty"]
    span = clean - empty
    if abs(span) < max(min_span * max(abs(clean), abs(empty)), 1e-9):
        return float("nan")
    return (value - empty) / span


def passes(faithfulness: float) -> bool:
    """|1 - F| <= PASS_TOLERANCE (False when undefined)."""
    return math.isfinite(faithfulness) and abs(1.0 - faithfulness) <= PASS_TOLERANCE


def faithfulness(run: CleanRun, ranking: Ranking, cfg: GraphConfig) -> Faithfulness:
    """The graph alone (both error definitions, and the two feature-only bounds), every node
    kept, nothing kept, and the smaller feature budgets of `cfg.budgets`."""
    kept = ranking.kept
    features = [c for c in kept if c.feature is not None]
    all_errors = [c for c in ranking.candidates if c.feature is None]
    keep_sets: dict[str, tuple[list[Candidate], ErrorMode]] = {
        "graph": (kept, "recomputed"), "graph_frozen": (kept, "frozen"), "graph_no_errors": (features, "recomputed"),
        "graph_all_errors": (features + all_errors, "recomputed"), "full": (ranking.candidates, "recomputed"), "empty": ([], "recomputed")}
    keep_sets |= {f"top{b}": (ranking.ranked[:budget_of(ranking.ranked, b)], "recomputed") for b in cfg.budgets}
    values = ablated_metrics(run, [s for s, _ in keep_sets.values()], cfg.batch_rows, [m for _, m in keep_sets.values()])
    metric: dict[str, Any] = {"clean": run.metric} | dict(zip(keep_sets, values))
    metric |= {f"faithfulness_{k}": faithfulness_share(metric, metric[k], cfg.min_span)
               for k in keep_sets if k not in ("full", "empty")}
    metric["span_defined"] = math.isfinite(metric["faithfulness_graph"])
    metric["active_features"] = sum(c.feature is not None for c in ranking.candidates)  # what a feature budget is a share of
    metric["nodes_top"] = {f"top{b}": sum(c.feature is not None for c in ranking.ranked[:budget_of(ranking.ranked, b)])
                           for b in cfg.budgets}
    return Faithfulness(metric, metric["faithfulness_graph"])


class _Masks(NamedTuple):
    """Per hook, which nodes each keep set keeps."""

    features: list[Tensor]
    """bool [sets P d_sae]."""
    errors: list[Tensor]
    """[sets P 1]: 1.0 where the error node is kept."""


def _masks(run: CleanRun, sets: list[list[Candidate]]) -> _Masks:
    device = run.tokens.device
    feature_masks = [torch.zeros(len(sets), run.n_pos, d.W_dec.shape[0], dtype=torch.bool, device=device) for d in run.terms]
    error_masks = [torch.zeros(len(sets), run.n_pos, 1, device=device) for _ in run.terms]
    for g, kept in enumerate(sets):
        for c in kept:
            if c.feature is None:
                error_masks[c.stack_index][g, c.position] = 1
            else:
                feature_masks[c.stack_index][g, c.position, c.feature] = True
    return _Masks(feature_masks, error_masks)


@torch.no_grad()
def ablated_metrics(run: CleanRun, keep_sets: list[list[Candidate]], batch_rows: int,
                    errors: list[ErrorMode] | ErrorMode = "recomputed") -> list[float]:
    """The target metric with every node outside each keep set mean-ablated at every hook; kept
    error nodes `errors` (per set, or one for all): recomputed from the ablated run's residual, or frozen at their clean value."""
    runner, values = run.runner, []
    modes = [errors] * len(keep_sets) if isinstance(errors, str) else list(errors)
    if len(modes) != len(keep_sets) or not set(modes) <= {"recomputed", "frozen"}:
        raise ValueError(f"errors: one of 'recomputed' / 'frozen' per keep set (got {errors!r})")
    for b in range(0, len(keep_sets), batch_rows):
        sets = keep_sets[b:b + batch_rows]
        masks = _masks(run, sets)
        recompute = torch.tensor([m == "recomputed" for m in modes[b:b + batch_rows]], device=run.tokens.device)[:, None, None]
        resid, start = runner.embed(run.tokens[None]).expand(len(sets), -1, -1), 0
        for i, d in enumerate(run.terms):
            x = runner.blocks(resid, start, run.depths[i])
            start = run.depths[i]
            _, departures, error = d.split(x)  # [sets P d_sae], [sets P d]
            error = torch.where(recompute, error, d.error)
            new = d.mean_x + (departures * masks.features[i]) @ d.W_dec + masks.errors[i] * error
            resid = torch.cat([x[:, :run.first], new[:, run.first:]], dim=1)
        values += run.target.value(runner, run.stack, resid, start, run.position).tolist()
    return values


__all__ = ["PASS_TOLERANCE", "ErrorMode", "Faithfulness", "ablated_metrics", "faithfulness", "faithfulness_share", "passes"]
