"""token-set: the current token is one of a few tokens.

The tokens are chosen greedily on the atlas text by P(fire | token), and the prefix of that
ranking with the best F1 there is kept (at most `LabelConfig.max_tokens` tokens).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..atlas import Atlas
from .base import Label, LabelContext, LabelKind, Predicate, quote, register, token_membership

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(kw_only=True)
class TokenLabel(Label):
    """A label whose predicate reads a set of token ids (token-set, logit and llm labels)."""

    tokens: list[int] = field(default_factory=list)
    """Token ids: the current token (token-set, llm) or the next one (logit) is one of them."""

    def __post_init__(self):
        self.tokens = [int(t) for t in self.tokens]


@register
class TokenSetKind(LabelKind):
    name = "token-set"
    rank = 10
    label_class = TokenLabel

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        max_tokens = context.cfg.max_tokens
        frequency, fire_count = atlas.token_frequency.numpy(), atlas.fire_count.numpy()
        out = []
        for i in atlas.live_features:
            ids, counts, _ = atlas.feature_tokens(i)
            ids, counts = ids.numpy(), counts.numpy().astype(np.float64)
            precision = counts / np.maximum(frequency[ids], 1)
            order = np.lexsort((-counts, -precision))[:max_tokens * 4]
            tp, fp = np.cumsum(counts[order]), np.cumsum(frequency[ids[order]] - counts[order])
            f1 = 2 * tp / (2 * tp + fp + (fire_count[i] - tp))
            best = int(np.argmax(f1[:max_tokens])) + 1
            out.append(self.make(atlas, i, tokens=ids[order[:best]].tolist()))
        return out

    def compile(self, labels: Sequence[TokenLabel], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        return token_membership([label.tokens for label in labels])

    def render(self, label: TokenLabel, atlas: Atlas) -> str:
        return f"tokens {quote(atlas.vocab, label.tokens)}"
