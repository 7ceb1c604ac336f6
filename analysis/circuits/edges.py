"""The edges of a feature graph, between kept nodes of neighbouring hooks (tokens before the
first hook, the target after the last).

An edge u -> d's direct effect is the gradient of d's value through the blocks between the
two hooks, times u's term: d's value is its pre-activation (its encoder's reading of the
residual); for an error node, the target gradient at d's hook dotted with its error vector.
Its weight is the direct effect times d's gradient on the target. Gradients are taken at the
prompt's own activations.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .config import GraphConfig
from .decompose import CleanRun
from .nodes import TARGET_ID, Edge, node_id
from .pruning import Candidate


class Effect(NamedTuple):
    """The direct effect of an upstream node on a downstream node's value."""

    source: str
    """Id of the upstream node."""
    direct: float


def graph_edges(run: CleanRun, kept: list[Candidate], cfg: GraphConfig) -> list[Edge]:
    """Every edge between the kept nodes, the prompt's tokens and the target (`prune_edges` cuts them)."""
    by_hook: dict[int, list[Candidate]] = {}
    for c in kept:
        by_hook.setdefault(c.stack_index, []).append(c)
    grads, edges = run.gradients.hooks, []
    for i in range(run.n_hooks):
        downstream = by_hook.get(i, [])
        if not downstream:
            continue
        G = _readout_gradients(run, i, downstream, cfg.batch_rows)  # [n P d]
        for row, d in enumerate(downstream):
            gain = 1.0 if d.feature is None else float(grads[i][d.position] @ run.terms[i].W_dec[d.feature])  # d's gradient on the target
            for effect in _upstream_effects(run, G[row], d.position, i, by_hook.get(i - 1, [])):
                edges.append(Edge(effect.source, d.id, effect.direct * gain, effect.direct))
    return edges + _target_edges(run, kept)


def _target_edges(run: CleanRun, kept: list[Candidate]) -> list[Edge]:
    """The last hook's nodes feed the target directly: grad x term at the prompt."""
    edges, last = [], run.n_hooks - 1
    for c in kept:
        if c.stack_index == last:
            d, p = run.terms[last], c.position
            term = d.error[p] if c.feature is None else d.delta[p, c.feature] * d.W_dec[c.feature]
            direct = float(run.gradients.hooks[last][p] @ term)
            edges.append(Edge(c.id, TARGET_ID, direct, direct))
    return edges


def _readouts(run: CleanRun, i: int, downstream: list[Candidate]) -> Tensor:
    """What each downstream node at hook i reads from the residual there [n d]: its encoder
    column for a feature; for an error node, the gradient of (target gradient . error)."""
    d, rows = run.terms[i], []
    err_read = None
    for c in downstream:
        if c.feature is not None:
            rows.append(d.sae.W_enc.detach()[:, c.feature].float())
            continue
        if err_read is None:
            x = d.x.clone().requires_grad_(True)
            with torch.enable_grad():
                err_read = torch.autograd.grad((d.error_of(x) * run.gradients.hooks[i]).sum(), x)[0]
        rows.append(err_read[c.position])
    return torch.stack(rows)


def _readout_gradients(run: CleanRun, i: int, downstream: list[Candidate], batch_rows: int) -> Tensor:
    """d(downstream value)/d(residual at the hook before i, the embedding for i = 0) for every
    downstream node [n P d]."""
    read = _readouts(run, i, downstream)
    upstream = run.emb if i == 0 else run.terms[i - 1].x  # [P d]
    start, stop = (0 if i == 0 else run.depths[i - 1]), run.depths[i]
    positions = torch.tensor([c.position for c in downstream], device=read.device)
    out = []
    for b in range(0, len(downstream), batch_rows):
        rows = slice(b, b + batch_rows)
        x = upstream[None].expand(len(read[rows]), -1, -1).clone().requires_grad_(True)
        with torch.enable_grad():
            y = run.runner.blocks(x, start, stop)
            picked = y[torch.arange(len(x)), positions[rows]]  # [n d]
            out.append(torch.autograd.grad((picked * read[rows]).sum(), x)[0])
    return torch.cat(out)


def _upstream_effects(run: CleanRun, G: Tensor, q: int, i: int, upstream: list[Candidate]) -> Iterator[Effect]:
    """The direct effect of every kept node at the hook before i (tokens before hook 0) at
    positions <= q (attention is causal: later positions have no effect), given the gradient
    G [P d] there of the downstream node at position q."""
    if i == 0:
        effects = (G * run.emb_term).sum(-1)  # [P]
        for p in range(run.first, q + 1):
            yield Effect(node_id("token", -1, p), float(effects[p]))
        return
    up = run.terms[i - 1]
    for c in upstream:
        p = c.position
        if p > q:
            continue
        if c.feature is None:
            yield Effect(c.id, float(G[p] @ up.error[p]))
        else:
            yield Effect(c.id, float(up.delta[p, c.feature] * (G[p] @ up.W_dec[c.feature])))


__all__ = ["Effect", "graph_edges"]
