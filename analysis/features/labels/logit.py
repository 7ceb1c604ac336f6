"""logit: the NEXT token is one the feature's decoder direction promotes (logit lens: W_dec[i]
through the final norm's scale and the unembedding; its top `LabelConfig.n_logit_tokens`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..atlas import Atlas
from .base import Label, LabelContext, LabelKind, Predicate, quote, register, token_membership
from .token_set import TokenLabel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@register
class LogitKind(LabelKind):
    name = "logit"
    rank = 20
    label_class = TokenLabel

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        top = atlas.logit_tokens("top")[0][:, :context.cfg.n_logit_tokens]
        return [self.make(atlas, i, tokens=top[i].tolist()) for i in atlas.live_features]

    def compile(self, labels: Sequence[TokenLabel], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        following = token_membership([label.tokens for label in labels])

        def predicate(tokens: Tensor) -> Tensor:
            """tokens [batch pos] -> bool [batch pos label]: the next token is in the label's set."""
            b, n = tokens.shape  # the last position has no next token: False there
            last = torch.zeros(b, min(n, 1), len(labels), dtype=torch.bool, device=tokens.device)  # no next token
            return torch.cat([following(tokens[:, 1:]), last], dim=1)
        return predicate

    def render(self, label: TokenLabel, atlas: Atlas) -> str:
        return f"predicts {quote(atlas.vocab, label.tokens)}"
