"""`FeatureGraph`: the typed result of `trace`, its summary, its strongest chain, and its JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .faithfulness import passes
from .nodes import Edge, InterventionCheck, Node
from .targets import GraphTarget, target_from_json


@dataclass
class FeatureGraph:
    prompt: str
    tokens: list[str]
    target: GraphTarget
    hooks: list[str]
    """The hooks the graph has nodes at (the stack's, up to a feature target's)."""
    nodes: list[Node]
    edges: list[Edge]
    metric: dict[str, Any]
    """The target metric: clean, all ablated (empty), the graph alone with its error nodes
    recomputed (graph) or frozen (graph_frozen), its features with no / every error node, every
    node kept (full), each smaller budget; and the faithfulness of each (`faithfulness.py`)."""
    faithfulness: float
    """(graph - empty) / (clean - empty) with error nodes recomputed in the ablated run: the
    share of the target metric the graph alone keeps; NaN when the span is within noise."""
    interventions: InterventionCheck
    seconds: float
    """The time `trace` took (not the model's load or the held-out means)."""
    config: dict[str, Any]
    sae_paths: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    """circuit-tracer's replacement and completeness scores (`scores.py`)."""

    def node(self, node_id: str) -> Node:
        return self._by_id()[node_id]

    def _by_id(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def counts(self) -> dict[str, int]:
        """Nodes of each kind."""
        return {k: sum(n.kind == k for n in self.nodes) for k in ("token", "feature", "error", "target")}

    @property
    def passes(self) -> bool:
        """|1 - faithfulness| <= 0.2 (errors recomputed; False when undefined)."""
        return passes(self.faithfulness)

    def error_share(self) -> float:
        """The error nodes' share of the kept feature and error nodes' total |attribution|."""
        inner = [n for n in self.nodes if n.kind in ("feature", "error")]
        total = sum(abs(n.attribution) for n in inner)
        return sum(abs(n.attribution) for n in inner if n.kind == "error") / total if total > 0 else float("nan")

    def summary(self) -> str:
        kinds, m = self.counts(), self.metric
        def faithful(key: str) -> str:
            return f"{m[key]:.1%}" if key in m and m[key] == m[key] else "undefined"

        checks = self.interventions
        checked = len({(r["source"], r["target"]) for r in checks.edges})
        lines = [
            f"{kinds['feature']} feature nodes, {kinds['error']} error nodes ({self.error_share():.0%} of the kept |attribution|), "
            f"{kinds['token']} tokens, 1 target; {len(self.edges)} edges; traced in {self.seconds:.1f} s",
            f"target {self.target.text!r}: clean {m['clean']:.3f}, all ablated {m['empty']:.3f}, graph alone {m['graph']:.3f}",
            f"faithfulness {faithful('faithfulness_graph')} with error nodes recomputed ({'passes' if self.passes else 'fails'} "
            f"|1 - F| <= 0.2); {faithful('faithfulness_graph_frozen')} with them frozen at their clean values; features with no "
            f"error node {faithful('faithfulness_graph_no_errors')}, with every error node {faithful('faithfulness_graph_all_errors')}",
            f"replacement score {self.scores.get('replacement', float('nan')):.2f}, completeness {self.scores.get('completeness', float('nan')):.2f}"
            + (f" (whole graph, {self.scores['whole_features']} features: {self.scores['replacement_whole']:.2f} and "
               f"{self.scores['completeness_whole']:.2f}, {self.scores['whole_seconds']:.0f} s)" if "replacement_whole" in self.scores else ""),
            f"{checked} distinct edges checked: feature -> feature, upstream ablated: sign agreement {checks.sign_agreement:.0%}, "
            f"rank correlation {checks.correlation:.2f}"]
        return "\n".join(lines)

    def chain(self, through_features: bool = True, readable_share: float = 0.25) -> list[Node]:
        """The strongest path into the target: from the target, the incoming edge of largest
        |weight| at each step, back to a token (or a node with no kept inputs). With
        `through_features`, a step takes the strongest edge out of a feature or token when it
        carries at least `readable_share` of the strongest edge's |weight|, so the chain reads as
        features where they carry a fair part; otherwise it goes through the error node."""
        by_id, incoming = self._by_id(), {}
        for e in self.edges:
            incoming.setdefault(e.target, []).append(e)
        path, current, seen = [], next(n for n in self.nodes if n.kind == "target"), set()
        while current.id not in seen:
            seen.add(current.id)
            path.append(current)
            edges = incoming.get(current.id)
            if not edges:
                break
            strongest = max(edges, key=lambda e: abs(e.weight))
            readable = [e for e in edges if by_id[e.source].kind != "error"] if through_features else []
            best_readable = max(readable, key=lambda e: abs(e.weight)) if readable else None
            if best_readable is not None and abs(best_readable.weight) >= readable_share * abs(strongest.weight):
                strongest = best_readable
            current = by_id[strongest.source]
        return path[::-1]

    def chain_text(self) -> str:
        """The strongest chain in words, from the node labels."""
        def words(n: Node) -> str:
            if n.kind == "token":
                return f"token {n.token!r} (pos {n.position})"
            if n.kind == "error":
                return f"[{self.hooks[n.stack_index]} error at {n.token!r}]"
            if n.kind == "target":
                return f"=> {self.target.text!r}"
            return f"{self.hooks[n.stack_index].split('.hook')[0]} #{n.feature} at {n.token!r} \"{n.label or 'unlabelled'}\""
        return "\n  -> ".join(words(n) for n in self.chain())

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "tokens": self.tokens, "target": self.target.to_json(), "hooks": self.hooks,
                "nodes": [n.to_json() for n in self.nodes], "edges": [asdict(e) for e in self.edges], "metric": self.metric,
                "faithfulness": self.faithfulness, "interventions": asdict(self.interventions), "seconds": self.seconds,
                "config": self.config, "sae_paths": self.sae_paths, "scores": self.scores}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureGraph:
        return cls(d["prompt"], d["tokens"], target_from_json(d["target"]), d["hooks"], [Node.from_json(n) for n in d["nodes"]],
                   [Edge(**e) for e in d["edges"]], d["metric"], d["faithfulness"], InterventionCheck(**d["interventions"]),
                   d["seconds"], d["config"], d.get("sae_paths", []), d.get("scores", {}))


__all__ = ["FeatureGraph"]
