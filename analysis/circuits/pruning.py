"""Which nodes and edges a graph keeps.

Nodes are ranked by their share of their hook's total |attribution| (each hook is a full cut
of the stream, so every hook needs its carriers), and the best are kept up to
`max_feature_nodes` feature nodes; an error node ranked above the last kept feature is kept
too, and counted apart (as circuit-tracer counts), like the prompt's tokens and the target.
Edges between kept nodes are kept, strongest first, until they carry `edge_share` of the total |weight|.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .config import GraphConfig
from .decompose import CleanRun, Gradients
from .nodes import Edge, Node, NodeKind, node_id


class Candidate(NamedTuple):
    """A feature or error node before pruning."""

    share: float
    """Its share of its hook's total |attribution|."""
    stack_index: int
    position: int
    feature: int | None
    """None for the error node."""
    attribution: float

    @property
    def kind(self) -> NodeKind:
        return "error" if self.feature is None else "feature"

    @property
    def id(self) -> str:
        return node_id(self.kind, self.stack_index, self.position, self.feature)


class Ranking(NamedTuple):
    candidates: list[Candidate]
    """Every feature and error node, largest share first."""
    ranked: list[Candidate]
    """Those with at least `min_node_share`, in the same order."""
    kept: list[Candidate]
    """The graph's: the first of `ranked` that fit the node budget."""


def hook_candidates(stack_index: int, feature_attr: Tensor, active: Tensor, error_attr: Tensor, first: int) -> list[Candidate]:
    """One hook's (or transcoder layer's) feature and error nodes, each with its share of that hook's total
    |attribution|. feature_attr: [P d_sae]; active: [P d_sae] bool; error_attr: [P]; positions before `first` have
    no error node."""
    total = max(float(feature_attr[active].abs().sum() + error_attr[first:].abs().sum()), 1e-30)  # 0 when nothing reaches the target
    ps, js = active.nonzero(as_tuple=True)
    candidates = [Candidate(abs(a) / total, stack_index, p, j, a)
                  for p, j, a in zip(ps.tolist(), js.tolist(), feature_attr[ps, js].tolist())]
    return candidates + [Candidate(abs(float(error_attr[p])) / total, stack_index, p, None, float(error_attr[p]))
                         for p in range(first, error_attr.shape[0])]


def ranking(candidates: list[Candidate], cfg: GraphConfig) -> Ranking:
    """`candidates` ranked by share, cut at `min_node_share` and at the feature-node budget."""
    candidates = sorted(candidates, key=lambda c: -c.share)
    ranked = [c for c in candidates if c.share >= cfg.min_node_share]
    return Ranking(candidates, ranked, ranked[:budget_of(ranked, cfg.max_feature_nodes)])


def rank_nodes(run: CleanRun, grads: Gradients, cfg: GraphConfig) -> Ranking:
    """The feature and error nodes of every hook, attributed with `grads` (the attribution method's), ranked and cut."""
    candidates = []
    for i, d in enumerate(run.terms):
        feature_attr = d.delta * (grads.hooks[i] @ d.W_dec.T)  # [P d_sae]
        candidates += hook_candidates(i, feature_attr, d.active, (d.error * grads.hooks[i]).sum(-1), run.first)
    return ranking(candidates, cfg)


def budget_of(ranked: list[Candidate], max_feature_nodes: int) -> int:
    """How many of `ranked`, from the first, hold at most `max_feature_nodes` features (and no
    error node after the last of them)."""
    if max_feature_nodes <= 0:
        return 0
    n_features = 0
    for k, c in enumerate(ranked):
        if c.feature is not None:
            n_features += 1
            if n_features == max_feature_nodes:
                return k + 1
    return len(ranked)


def graph_nodes(run: CleanRun, kept: list[Candidate], grads: Gradients, strings: list[str]) -> list[Node]:
    """The graph's nodes: the prompt's tokens, the kept features and errors, the target."""
    token_attr = (run.emb_term * grads.embed).sum(-1)  # [P]
    nodes = [Node("token", -1, p, None, float(run.emb_term[p].norm()), float(token_attr[p]), strings[p])
             for p in range(run.first, run.n_pos)]
    for c in kept:
        d, p = run.terms[c.stack_index], c.position
        activation = float(d.error[p].norm()) if c.feature is None else float(d.acts[p, c.feature])
        nodes.append(Node(c.kind, c.stack_index, p, c.feature, activation, c.attribution, strings[p]))
    target = run.target
    nodes.append(Node("target", run.n_hooks, run.position, target.feature_id(), run.metric, run.metric, strings[run.position], target.text))
    return nodes


def prune_edges(edges: list[Edge], cfg: GraphConfig) -> list[Edge]:
    """The strongest edges, up to `max_edges`, until they carry `edge_share` of the total |weight|."""
    edges = sorted(edges, key=lambda e: -abs(e.weight))
    total = sum(abs(e.weight) for e in edges)
    kept, running = [], 0.0
    for e in edges[:cfg.max_edges]:
        if cfg.edge_share < 1 and total > 0 and running >= cfg.edge_share * total:
            break
        kept.append(e)
        running += abs(e.weight)
    return kept


__all__ = ["Candidate", "Ranking", "budget_of", "graph_nodes", "hook_candidates", "prune_edges", "rank_nodes", "ranking"]
