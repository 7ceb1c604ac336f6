"""Attribution methods for feature graphs: one per file, each an `AttributionMethod` registered
in `ATTRIBUTIONS` (base.py): integrated.py (integrated gradients from the held-out mean, the
default) and gradient.py (gradient x activation at the prompt)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ATTRIBUTIONS, AttributionMethod, register
from .gradient import GradientTimesActivation
from .integrated import IntegratedGradients

if TYPE_CHECKING:
    from ..config import GraphConfig


def attribution_method(cfg: GraphConfig) -> AttributionMethod:
    """The method `cfg.attribution` names; `ig_steps <= 0` means gradient x activation (the
    meaning `--ig-steps 0` has always had)."""
    name = GradientTimesActivation.name if cfg.ig_steps <= 0 else cfg.attribution
    if name not in ATTRIBUTIONS:
        raise ValueError(f"unknown attribution method {name!r}; registered: {sorted(ATTRIBUTIONS)}")
    return ATTRIBUTIONS[name]


__all__ = ["ATTRIBUTIONS", "AttributionMethod", "GradientTimesActivation", "IntegratedGradients", "attribution_method", "register"]
