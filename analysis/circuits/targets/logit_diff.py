"""The logit difference of two tokens: `token` - `contrast` (e.g. " are" - " is")."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import LogitsTarget, register


@register
@dataclass(frozen=True, kw_only=True)
class LogitDiffTarget(LogitsTarget):
    kind = "logit_diff"
    contrast: int
    """The token whose logit is subtracted."""

    def metric(self, logits: Tensor) -> Tensor:
        return logits[:, self.token] - logits[:, self.contrast]
