"""dense: the feature fires everywhere (the predicate holds at every position)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..atlas import Atlas
from .base import Label, LabelContext, LabelKind, Predicate, register

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@register
class DenseKind(LabelKind):
    name = "dense"
    rank = 50

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        return [self.make(atlas, i) for i in atlas.live_features]

    def compile(self, labels: Sequence[Label], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        def predicate(tokens: Tensor) -> Tensor:
            """tokens [batch pos] -> bool [batch pos label], all True (a broadcast view)."""
            return torch.ones(1, 1, 1, dtype=torch.bool, device=tokens.device).expand(*tokens.shape, len(labels))
        return predicate

    def render(self, label: Label, atlas: Atlas) -> str:
        return f"dense: fires on {float(atlas.density[label.feature]):.0%} of tokens"
