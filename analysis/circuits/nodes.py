"""The records of a feature graph: its nodes, edges and intervention checks.

A node is typed by its fields (kind, stack index, position, feature); its id is built from
them (`node_id`) and is only ever an identifier, never parsed back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

NodeKind = Literal["token", "feature", "error", "target"]
TARGET_ID = "target"
"""The target node's id."""


def node_id(kind: NodeKind, stack_index: int, position: int, feature: int | None = None) -> str:
    """The id of a node: T{position} for a token, E{stack index}_{position} for an error node,
    F{stack index}_{feature}_{position} for a feature, "target" for the target."""
    if kind == "token":
        return f"T{position}"
    if kind == "error":
        return f"E{stack_index}_{position}"
    if kind == "feature":
        return f"F{stack_index}_{feature}_{position}"
    return TARGET_ID


@dataclass
class Node:
    kind: NodeKind
    stack_index: int
    """Index in the stack of the hook the node sits at; -1 for tokens (the embedding), the
    number of hooks the graph has for the target (saved as "layer" in the graph's JSON)."""
    position: int
    feature: int | None
    """The SAE feature of a feature node; a feature target's feature; None otherwise."""
    activation: float
    """Feature activation; the norm of the error / embedding term; the target metric."""
    attribution: float
    """The node's term dotted with the target's gradient (integrated from the mean by default):
    the change of the target the node accounts for, to first order (its removal: minus this)."""
    token: str = ""
    label: str = ""

    @property
    def id(self) -> str:
        return node_id(self.kind, self.stack_index, self.position, self.feature)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "layer": self.stack_index, "position": self.position, "feature": self.feature,
                "activation": self.activation, "attribution": self.attribution, "token": self.token, "label": self.label}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Node:
        return cls(record["kind"], record["layer"], record["position"], record["feature"], record["activation"], record["attribution"],
                   record.get("token", ""), record.get("label", ""))


@dataclass
class Edge:
    source: str
    """Id of the upstream node."""
    target: str
    """Id of the downstream node."""
    weight: float
    """Effect on the target metric carried along this edge (direct effect x the downstream node's gradient)."""
    direct: float
    """Effect on the downstream node's own value (pre-activation; target units for errors and the target)."""


class EdgeCheck(TypedDict):
    """One intervention on the upstream node of a checked edge (a JSON object in the graph's file)."""

    source: str
    target: str
    edge_type: str
    """"<upstream kind>-><downstream kind>", e.g. feature->feature."""
    dose: float
    """The multiple of the upstream node's term left in the residual (0: ablated to its mean; 2: doubled)."""
    predicted: float
    """The change of the downstream value the edge predicts: (dose - 1) x direct."""
    measured: float
    """The change measured by running the model on from the upstream hook (a feature: after its nonlinearity)."""


@dataclass
class InterventionCheck:
    edges: list[EdgeCheck]
    """Every checked edge at every dose."""
    sign_agreement: float
    """The headline: the share of the feature -> feature edges, upstream ablated, whose measured change has the predicted sign."""
    correlation: float
    """The headline: Spearman's rank correlation of predicted and measured changes on those edges."""
    by_type: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """{edge type: {"x<dose>": {n_edges, sign_agreement, rank_correlation}}}."""


__all__ = ["TARGET_ID", "Edge", "EdgeCheck", "InterventionCheck", "Node", "NodeKind", "node_id"]
