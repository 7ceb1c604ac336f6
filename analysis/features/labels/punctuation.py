"""punctuation: the current token is punctuation, whitespace or the boundary token (a
heuristic class; one candidate per live feature)."""
from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from activations.model import token_strings

from ..atlas import Atlas
from .base import Label, LabelContext, LabelKind, Predicate, register

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def is_punctuation(text: str) -> bool:
    """Whether a token's text is empty or whitespace, only punctuation, or `<|endoftext|>`."""
    stripped = text.strip()
    return stripped == "" or all(c in string.punctuation for c in stripped) or text == "<|endoftext|>"


@register
class PunctuationKind(LabelKind):
    name = "punctuation"
    rank = 30

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        return [self.make(atlas, i) for i in atlas.live_features]

    def compile(self, labels: Sequence[Label], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        if tokenizer is None:
            raise ValueError("a punctuation label needs the tokenizer to build its predicate")
        table = torch.tensor([is_punctuation(s) for s in token_strings(tokenizer, list(range(len(tokenizer))))])

        def predicate(tokens: Tensor) -> Tensor:
            """tokens [batch pos] -> bool [batch pos label], the same for every label."""
            t = table.to(tokens.device)
            hit = t[tokens.long().clamp(0, len(t) - 1)] & (tokens < len(t))  # an id past the tokenizer's vocabulary: no
            return hit[..., None].expand(*tokens.shape, len(labels))
        return predicate

    def render(self, label: Label, atlas: Atlas) -> str:
        return "punctuation / whitespace / boundary tokens"
