"""What every attribution method shares: the `AttributionMethod` base class and the registry.

A method is one file in this package: an `AttributionMethod` subclass under `@register`. It
gives, at the embedding and at each hook, the gradient a node's term is dotted with; a node's
attribution is that product (`analysis.circuits.pruning.candidates`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ..config import GraphConfig
    from ..decompose import CleanRun, Gradients


class AttributionMethod(ABC):
    name: ClassVar[str]
    """Registered name (`ATTRIBUTIONS`), the value of `GraphConfig.attribution`."""

    @abstractmethod
    def gradients(self, run: CleanRun, cfg: GraphConfig) -> Gradients:
        """The gradients [P d] the node terms are dotted with: at the embedding (token nodes)
        and at each hook the graph has (feature and error nodes)."""


ATTRIBUTIONS: dict[str, AttributionMethod] = {}
"""Registered attribution methods by name (filled by `@register` as this package's modules are imported)."""


def register(cls: type[AttributionMethod]) -> type[AttributionMethod]:
    """Class decorator: registers one instance of an `AttributionMethod` subclass under `cls.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name in ATTRIBUTIONS:
        raise ValueError(f"an attribution method needs a new, non-empty `name` (got {name!r}; registered: {sorted(ATTRIBUTIONS)})")
    ATTRIBUTIONS[name] = cls()
    return cls


__all__ = ["ATTRIBUTIONS", "AttributionMethod", "register"]
