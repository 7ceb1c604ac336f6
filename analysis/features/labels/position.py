"""position: the token is among the first positions of its context (position <= p, with p
fitted on the atlas text: the p <= `LabelConfig.max_position` of best F1 there)."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..atlas import Atlas
from .base import Label, LabelContext, LabelKind, Predicate, register

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(kw_only=True)
class PositionLabel(Label):
    max_position: int | None = None
    """The label holds at positions 0..max_position of a context."""


@register
class PositionKind(LabelKind):
    name = "position"
    rank = 40
    label_class = PositionLabel

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        max_position = context.cfg.max_position
        counts = atlas.position_count.double()  # [d_sae, ctx_len]
        # F1 of "position <= p" on the atlas text, for every p at once (position 0 is never counted)
        tp = counts[:, 1:max_position + 1].cumsum(1)
        predicted = atlas.n_contexts * torch.arange(1, max_position + 1, dtype=torch.float64)
        f1 = 2 * tp / (predicted + counts.sum(1, keepdim=True))
        best = (f1.argmax(1) + 1).tolist()
        return [self.make(atlas, i, max_position=best[i]) for i in atlas.live_features]

    def compile(self, labels: Sequence[PositionLabel], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        missing = [label.feature for label in labels if label.max_position is None]
        if missing:
            raise ValueError(f"position label(s) of feature(s) {missing[:10]} have no max_position; rebuild them with `saewb analyze`")
        limit = torch.tensor([int(label.max_position) for label in labels], dtype=torch.long)

        def predicate(tokens: Tensor) -> Tensor:
            """tokens [batch pos] -> bool [batch pos label]: position <= the label's max_position."""
            b, n = tokens.shape
            return (torch.arange(n, device=tokens.device)[None, :, None] <= limit.to(tokens.device)).expand(b, n, len(labels))
        return predicate

    def render(self, label: PositionLabel, atlas: Atlas) -> str:
        return f"position <= {label.max_position}"

    def from_json(self, record: Mapping, feature: int) -> Label:
        label = super().from_json(record, feature)
        # labels.json files written before "max_position" was saved hold it only in the text
        legacy = re.fullmatch(r"position <= (\d+)", label.text) if label.max_position is None else None
        if legacy:
            label.max_position = int(legacy[1])
        return label
