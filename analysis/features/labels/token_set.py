"""token-set: the current token is one of a few tokens.

The tokens are chosen greedily on the atlas text by P(fire | token); the prefixes of that
ranking with the best F1 there on all firings and on strong ones (at most
`LabelConfig.max_tokens` tokens) are the compact candidates, and the best prefix of up to
`LOOKUP_TOKENS` tokens is a lookup-table candidate, reported apart.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..atlas import Atlas
from .base import MAX_LISTED_TOKENS, STRONG_SHARE, Label, LabelContext, LabelKind, Predicate, quote, register, token_membership

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


LOOKUP_TOKENS = 64
"""Longest token set tried as a lookup table (stored and shown, but not compact, so never counted)."""


@dataclass(kw_only=True)
class TokenLabel(Label):
    """A label whose predicate reads a set of token ids (token-set, logit and llm labels)."""

    tokens: list[int] = field(default_factory=list)
    """Token ids: the current token (token-set, llm) or the next one (logit) is one of them."""

    def __post_init__(self) -> None:
        self.tokens = [int(t) for t in self.tokens]


def ranked_prefixes(atlas: Atlas, feature: int, limit: int) -> tuple[np.ndarray, ...]:
    """The feature's firing tokens ranked by P(fire | token) on the atlas text (ties: more
    firings first), cut at `limit`: (ids [n], counts [n], activation sums [n], order [m] into
    them, cumulative false positives [m] and F1 [m] of each prefix of the ranking)."""
    frequency, fire_count = atlas.token_frequency.numpy(), atlas.fire_count.numpy()
    ids, counts, act_sums = (t.numpy() for t in atlas.feature_tokens(feature))
    counts = counts.astype(np.float64)
    order = np.lexsort((-counts, -counts / np.maximum(frequency[ids], 1)))[:limit]
    tp, fp = np.cumsum(counts[order]), np.cumsum(frequency[ids[order]] - counts[order])
    return ids, counts, act_sums, order, fp, 2 * tp / np.maximum(2 * tp + fp + (fire_count[feature] - tp), 1)


@register
class TokenSetKind(LabelKind):
    name = "token-set"
    rank = 10
    label_class = TokenLabel

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        """Per live feature, tokens ranked by P(fire | token) on the atlas text, and the prefixes
        of that ranking with the best F1 there: on all firings and on the (estimated) strong
        ones, each at most `max_tokens` long, plus a longer lookup table (not compact)."""
        max_tokens = context.cfg.max_tokens
        max_activation = atlas.max_activation.numpy()
        out = []
        for i in atlas.live_features:
            ids, counts, act_sums, order, fp, f1 = ranked_prefixes(atlas, i, LOOKUP_TOKENS * 4)
            # strong firings (activation > max / 4), estimated per token from its mean activation
            strong = np.where(act_sums[order] / np.maximum(counts[order], 1) > STRONG_SHARE * max_activation[i], counts[order], 0.0)
            strong_tp = np.cumsum(strong)
            strong_f1 = 2 * strong_tp / np.maximum(2 * strong_tp + fp + (strong.sum() - strong_tp), 1)
            sizes = {int(np.argmax(f1[:max_tokens])) + 1, int(np.argmax(strong_f1[:max_tokens])) + 1}
            if len(order) > max_tokens:
                sizes.add(int(np.argmax(f1[:LOOKUP_TOKENS])) + 1)  # may exceed max_tokens: a lookup table, shown apart
            out += [self.make(atlas, i, tokens=ids[order[:n]].tolist()) for n in sorted(sizes)]
        return out

    def is_compact(self, label: TokenLabel) -> bool:
        return len(label.tokens) <= MAX_LISTED_TOKENS

    def compile(self, labels: Sequence[TokenLabel], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        return token_membership([label.tokens for label in labels])

    def render(self, label: TokenLabel, atlas: Atlas) -> str:
        return f"tokens {quote(atlas.vocab, label.tokens)}"
