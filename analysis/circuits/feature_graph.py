"""`FeatureGraph`: the typed result of `trace`, its summary, its strongest chain, and its JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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
    """clean, all ablated (empty), graph alone, every node kept (full), and per smaller budget."""
    faithfulness: float
    """(graph - empty) / (clean - empty): the share of the target metric the graph alone keeps."""
    interventions: InterventionCheck
    seconds: float
    config: dict[str, Any]
    sae_paths: list[str] = field(default_factory=list)

    def node(self, node_id: str) -> Node:
        return self._by_id()[node_id]

    def _by_id(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def summary(self) -> str:
        kinds = {k: sum(n.kind == k for n in self.nodes) for k in ("token", "feature", "error", "target")}
        m = self.metric
        checked = len({(r["source"], r["target"]) for r in self.interventions.edges})
        return (f"{self.n_nodes} nodes ({kinds['feature']} features, {kinds['error']} errors, {kinds['token']} tokens, 1 target), "
                f"{len(self.edges)} edges, {self.seconds:.1f} s | target {self.target.text!r}: clean {m['clean']:.3f}, "
                f"all ablated {m['empty']:.3f}, graph alone {m['graph']:.3f} -> faithfulness {self.faithfulness:.1%} | "
                f"top-{checked} edges (ablate and clamp each): sign agreement {self.interventions.sign_agreement:.0%}, "
                f"correlation {self.interventions.correlation:.3f}")

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
                "config": self.config, "sae_paths": self.sae_paths}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureGraph:
        return cls(d["prompt"], d["tokens"], target_from_json(d["target"]), d["hooks"], [Node.from_json(n) for n in d["nodes"]],
                   [Edge(**e) for e in d["edges"]], d["metric"], d["faithfulness"], InterventionCheck(**d["interventions"]),
                   d["seconds"], d["config"], d.get("sae_paths", []))


__all__ = ["FeatureGraph"]
