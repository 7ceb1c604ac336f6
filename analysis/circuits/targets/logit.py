"""A token's logit less the mean logit; and `logit_target`, which makes it (or a logit difference) from text."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

from activations.model import token_strings

from .base import LogitsTarget, register
from .logit_diff import LogitDiffTarget

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from activations.model import HookedModel


@register
@dataclass(frozen=True, kw_only=True)
class LogitTarget(LogitsTarget):
    kind = "logit"

    def metric(self, logits: Tensor) -> Tensor:
        return logits[:, self.token] - logits.mean(-1)


def single_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The id of `text`, which must be one token (a clear error naming its pieces otherwise)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        pieces = token_strings(tokenizer, ids)
        raise ValueError(f"target {text!r} is {len(ids)} tokens {pieces} for this tokenizer; a logit target must be one token "
                         f"(try {pieces[0]!r}, or mind the leading space)" if ids else f"target {text!r} is no token at all")
    return ids[0]


class TokenRank(NamedTuple):
    rank: int
    """1 when the token is the model's top next token."""
    probability: float
    top: str
    """The model's top next token."""


def next_token_rank(model: HookedModel, prompt: str, token: int, position: int = -1) -> TokenRank:
    """Where `token` ranks among the clean model's next tokens after `prompt` (BOS prepended) at `position`."""
    from activations.generation import encode_prompts
    from activations.model import logits_with_edit

    tokens = encode_prompts(model.tokenizer, [prompt])[0][None].to(next(model.parameters()).device)
    logits = logits_with_edit(model, tokens)[0, position % tokens.shape[1]].float()
    rank = int((logits > logits[token]).sum()) + 1
    return TokenRank(rank, float(logits.softmax(-1)[token]), token_strings(model.tokenizer, [int(logits.argmax())])[0])


def logit_target(tokenizer: PreTrainedTokenizerBase, text: str, contrast: str | None = None,
                 position: int = -1) -> LogitTarget | LogitDiffTarget:
    """The logit of the one-token `text` (less the mean logit), or its difference to `contrast`'s."""
    token = single_token(tokenizer, text)
    if contrast is None:
        return LogitTarget(token=token, position=position, text=text)
    return LogitDiffTarget(token=token, contrast=single_token(tokenizer, contrast), position=position, text=f"{text} - {contrast}")
