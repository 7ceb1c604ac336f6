"""How much of the target a graph keeps: the target metric with every node outside it
mean-ablated at every hook, as a share of the way from everything ablated to the clean prompt.
The kept features are recomputed by their SAE from the ablated run's residual; kept error
nodes keep their clean value."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .config import GraphConfig
from .decompose import CleanRun
from .pruning import Candidate, Ranking, budget_of


class Faithfulness(NamedTuple):
    metric: dict[str, Any]
    """The target metric: clean, all ablated (empty), graph alone, every node kept (full), per
    smaller budget (topN, faithfulness_topN), and the node count of each budget (nodes_top)."""
    faithfulness: float
    """(graph - empty) / (clean - empty)."""


def faithfulness(run: CleanRun, ranking: Ranking, cfg: GraphConfig) -> Faithfulness:
    """The graph alone, every node kept, nothing kept, and the smaller budgets of `cfg.budgets`."""
    n_tokens = run.n_pos - run.first
    keep_sets = {"graph": ranking.kept, "full": ranking.candidates, "empty": []} | \
        {f"top{b}": ranking.ranked[:budget_of(run, b)] for b in cfg.budgets}
    values = ablated_metrics(run, list(keep_sets.values()), cfg.batch_rows)
    metric: dict[str, Any] = {"clean": run.metric} | dict(zip(keep_sets, values))
    span = metric["clean"] - metric["empty"]
    share = (metric["graph"] - metric["empty"]) / span if abs(span) > 1e-9 else float("nan")
    metric |= {f"faithfulness_{k}": (v - metric["empty"]) / span if abs(span) > 1e-9 else float("nan")
               for k, v in metric.items() if k.startswith("top")}
    metric["nodes_top"] = {f"top{b}": max(n_tokens + 1, min(b, n_tokens + 1 + len(ranking.ranked))) for b in cfg.budgets}  # tokens + target
    return Faithfulness(metric, share)


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
def ablated_metrics(run: CleanRun, keep_sets: list[list[Candidate]], batch_rows: int) -> list[float]:
    """The target metric with every node outside each keep set mean-ablated at every hook."""
    runner, values = run.runner, []
    for b in range(0, len(keep_sets), batch_rows):
        sets = keep_sets[b:b + batch_rows]
        masks = _masks(run, sets)
        resid, start = runner.embed(run.tokens[None]).expand(len(sets), -1, -1), 0
        for i, d in enumerate(run.terms):
            x = runner.blocks(resid, start, run.depths[i])
            start = run.depths[i]
            acts = d.sae.encode(x)
            delta = (acts - d.mean_f) * (acts > 0) * masks.features[i]
            new = d.mean_x + delta @ d.W_dec + masks.errors[i] * d.error
            resid = torch.cat([x[:, :run.first], new[:, run.first:]], dim=1)
        values += run.target.value(runner, run.stack, resid, start, run.position).tolist()
    return values


__all__ = ["Faithfulness", "ablated_metrics", "faithfulness"]
