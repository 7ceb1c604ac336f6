"""What every graph target shares: the `GraphTarget` base class and the registry of kinds.

A target kind is one file in this package: a frozen `GraphTarget` dataclass under
`@register`, whose fields say what it reads (a token, a feature) and whose `value` computes the
metric the graph explains from the residual stream after the graph's last hook. A kind read
from the logits subclasses `LogitsTarget` and only says how the logits give its metric.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import MISSING, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from ..runner import ResidualRunner
    from ..stack import SAEStack


@dataclass(frozen=True, kw_only=True)
class GraphTarget(ABC):
    """What a graph explains, at one position of the prompt (the last by default)."""

    kind: ClassVar[str]
    """Registered name (`TARGETS`), saved as "kind" in the graph's JSON."""
    neuronpedia_type: ClassVar[str] = "logit"
    """The target node's feature_type in Neuronpedia's graph JSON."""
    position: int = -1
    """Prompt position of the target (negative: from the end)."""
    text: str = ""
    """Display text."""

    @abstractmethod
    def value(self, runner: ResidualRunner, stack: SAEStack, resid: Tensor, start: int, position: int) -> Tensor:
        """The target metric [batch] from the residual [batch pos d_model] after `start` blocks
        (the graph's last hook), at prompt position `position` (>= 0)."""

    def n_hooks(self, stack: SAEStack) -> int:
        """How many hooks of the stack, from the first, the graph has nodes at (all by default)."""
        return len(stack)

    def feature_id(self) -> int | None:
        """The feature the target node shows (None unless the target is a feature)."""
        return None

    def neuronpedia_layer(self) -> str:
        """The target node's "layer" in Neuronpedia's graph JSON."""
        return "logits"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class LogitsTarget(GraphTarget):
    """A target read from the logits at its position (the model runs on to the end)."""

    token: int
    """The token whose logit the target reads."""

    @abstractmethod
    def metric(self, logits: Tensor) -> Tensor:
        """logits [batch d_vocab] -> the target metric [batch]."""

    def value(self, runner: ResidualRunner, stack: SAEStack, resid: Tensor, start: int, position: int) -> Tensor:
        return self.metric(runner.logits(runner.blocks(resid, start, runner.n_layers))[:, position])


TARGETS: dict[str, type[GraphTarget]] = {}
"""Registered target kinds by name (filled by `@register` as this package's modules are imported)."""


def register(cls: type[GraphTarget]) -> type[GraphTarget]:
    """Class decorator: registers a `GraphTarget` subclass under `cls.kind`."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind or kind in TARGETS:
        raise ValueError(f"a graph target needs a new, non-empty `kind` (got {kind!r}; registered: {sorted(TARGETS)})")
    TARGETS[kind] = cls
    return cls


LEGACY_KEYS = {"layer": "stack_index"}
"""JSON keys of graph files written before the target kinds were classes -> today's fields."""


def target_from_json(record: dict[str, Any]) -> GraphTarget:
    """The target of a graph's JSON (`GraphTarget.to_json`; older files: every kind's keys, unused ones null)."""
    cls = TARGETS.get(record.get("kind", ""))
    if cls is None:
        raise ValueError(f"unknown graph target kind {record.get('kind')!r}; registered: {sorted(TARGETS)}")
    names = {f.name for f in fields(cls)}
    values = {LEGACY_KEYS.get(k, k): v for k, v in record.items() if k != "kind"}
    missing = {f.name for f in fields(cls) if f.name not in values and f.default is MISSING and f.default_factory is MISSING}
    if missing:
        raise ValueError(f"a {cls.kind} target needs {sorted(missing)}; this record has {sorted(record)}")
    return cls(**{k: v for k, v in values.items() if k in names})


__all__ = ["TARGETS", "GraphTarget", "LogitsTarget", "register", "target_from_json"]
