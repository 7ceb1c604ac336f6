"""Gradient x activation: a node's term dotted with the target's gradient at the prompt. In an
unpruned graph the weights out of a node then sum to its attribution (the chain rule)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import AttributionMethod, register

if TYPE_CHECKING:
    from ..config import GraphConfig
    from ..decompose import CleanRun, Gradients


@register
class GradientTimesActivation(AttributionMethod):
    name = "gradient_x_activation"

    def gradients(self, run: CleanRun, cfg: GraphConfig) -> Gradients:
        return run.gradients
