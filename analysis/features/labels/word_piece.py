"""word-piece: "a word continued" or "the start of a word", read from token strings.

A *continuation* is a token whose text starts with a letter or digit (no leading space, not
punctuation) right after a token whose text ends with a letter or digit ("ributed" after
"Cont"); position 0 never is one. A *word start* is a token whose text is a space followed by
a letter (" cat"). A label may also require the previous token to be one of a few tokens P
("a word continued after " Is"").

Candidates come from the firings inside each feature's example windows, weighted to stand
for all its firings (`context.example_firings`). A feature whose firings are mostly
continuations (or mostly word starts) gets the plain rule and, where a few previous tokens
explain the firings better, the rule after P, P chosen greedily by estimated F1 on the atlas
text (`context.best_prefix`); each only if its estimated F1 is not negligible. At most 2
candidates per feature, of the one rule (continuation or start) that fits it better.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from activations.model import token_strings

from ..atlas import Atlas
from .base import MAX_LISTED_TOKENS, Label, LabelContext, LabelKind, Predicate, per_tokenizer, register, token_membership
from .context import Bigrams, best_prefix, example_firings, listed, previous_token, supported

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WHICH = ("continuation", "start")
STARTS_ALNUM, ENDS_ALNUM, WORD_START = range(3)
"""Columns of `piece_table`."""

@per_tokenizer
def piece_table(tokenizer: PreTrainedTokenizerBase) -> Tensor:
    """[len(tokenizer), 3] bool per token id: its text starts with a letter or digit
    (STARTS_ALNUM), ends with one (ENDS_ALNUM), is a space then a letter (WORD_START).
    Built once per vocabulary (decoding the 49k SmolLM2 pieces takes a moment) and cached."""
    strings = token_strings(tokenizer, list(range(len(tokenizer))))
    return torch.tensor([(s[:1].isalnum(), s[-1:].isalnum(), s[:1] == " " and s[1:2].isalpha()) for s in strings],
                        dtype=torch.bool).view(len(strings), 3)


def piece_flags(table: Tensor, tokens: Tensor) -> Tensor:
    """The `piece_table` row of each token id: tokens [...] -> bool [..., 3] (all False for an
    id past the tokenizer's vocabulary)."""
    ids = tokens.long()
    known = (ids >= 0) & (ids < len(table))
    return table.to(tokens.device)[ids.clamp(0, len(table) - 1)] & known[..., None]


def rules(before: Tensor, here: Tensor) -> dict[str, Tensor]:
    """Where each rule holds, from the `piece_flags` [..., 3] of the previous token and of the
    token itself: {"continuation": bool [...], "start": bool [...]}. The one definition of both."""
    return {"continuation": here[..., STARTS_ALNUM] & before[..., ENDS_ALNUM], "start": here[..., WORD_START]}


def pair_rules(table: Tensor, previous: np.ndarray, current: np.ndarray) -> dict[str, np.ndarray]:
    """`rules` of (previous[k], current[k]) token pairs [k]."""
    held = rules(piece_flags(table, torch.from_numpy(previous)), piece_flags(table, torch.from_numpy(current)))
    return {which: h.numpy() for which, h in held.items()}


@dataclass(kw_only=True)
class WordPieceLabel(Label):
    which: Literal["continuation", "start"] = "continuation"
    """"continuation": a word continued here; "start": a word starts here."""
    previous: list[int] = field(default_factory=list)
    """Token ids P: the token before is one of them as well (empty: any token)."""

    def __post_init__(self) -> None:
        if self.which not in WHICH:
            raise ValueError(f"a word-piece label is a {' or a '.join(WHICH)}, not {self.which!r}")
        self.previous = [int(t) for t in self.previous]


@register
class WordPieceKind(LabelKind):
    name = "word-piece"
    rank = 16
    label_class = WordPieceLabel

    MOSTLY: ClassVar[float] = 0.8
    """Share of a feature's (weighted) example firings the rule must hold on."""
    MIN_SUPPORT: ClassVar[int] = 2
    """A previous token is listed only if at least this many example firings follow it."""
    MIN_COVERAGE: ClassVar[float] = 0.5
    """"... after P" needs P before at least this share of the example firings (unweighted)."""
    MIN_ESTIMATED_F1: ClassVar[float] = 0.1
    """Candidates estimated below this F1 on the atlas text are not worth scoring (most
    tokens are word starts or continuations, so the plain rule suits dense features only)."""

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        table = piece_table(context.model.tokenizer)
        firings, bigrams = example_firings(atlas), Bigrams(atlas)
        fire_count = atlas.fire_count.double().numpy()
        # where each rule holds on the atlas text, from its bigrams: in all, and after each token
        after = {which: np.bincount(bigrams.previous, weights=bigrams.counts * holds, minlength=bigrams.vocab_size)
                 for which, holds in pair_rules(table, bigrams.previous, bigrams.current).items()}
        total = {which: float(a.sum()) for which, a in after.items()}
        fired = pair_rules(table, firings.previous, firings.current)  # which rule each example firing satisfies

        out = []
        for i in atlas.live_features:
            sl = slice(int(firings.ptr[i]), int(firings.ptr[i + 1]))
            previous, weight = firings.previous[sl], firings.weight[sl]
            if len(previous) == 0:
                continue
            shares = {which: float(weight[h[sl]].sum() / weight.sum()) for which, h in fired.items()}
            which = max(WHICH, key=shares.get)
            if shares[which] < self.MOSTLY:
                continue
            h, fires = fired[which][sl], float(fire_count[i])
            tp = min(float(weight[h].sum()), total[which])
            f1_plain = 2 * tp / (total[which] + fires)
            if f1_plain >= self.MIN_ESTIMATED_F1:
                out.append(self.make(atlas, i, which=which))
            ids, tp = supported(previous[h], weight[h], self.MIN_SUPPORT)
            P, f1_after = best_prefix(ids, tp, after[which][ids], fires)
            if P and f1_after >= self.MIN_ESTIMATED_F1 and f1_after > f1_plain and (h & np.isin(previous, P)).mean() >= self.MIN_COVERAGE:
                out.append(self.make(atlas, i, which=which, previous=P))
        return out

    def compile(self, labels: Sequence[WordPieceLabel], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        if tokenizer is None:
            raise ValueError("a word-piece label needs the tokenizer to build its predicate")
        table = piece_table(tokenizer)
        continuation = torch.tensor([label.which == "continuation" for label in labels], dtype=torch.bool)
        before = token_membership([label.previous for label in labels])
        any_previous = torch.tensor([not label.previous for label in labels], dtype=torch.bool)

        def predicate(tokens: Tensor) -> Tensor:
            """tokens [batch pos] -> bool [batch pos label]: the label's rule holds here (and the
            previous token is in its P, when it has one)."""
            flags = piece_flags(table, tokens)  # [batch pos 3]
            flags_before = torch.cat([torch.zeros_like(flags[:, :1]), flags[:, :-1]], dim=1)  # position 0: nothing before, no continuation
            held = rules(flags_before, flags)
            rule = torch.where(continuation.to(tokens.device), held["continuation"][..., None], held["start"][..., None])
            return rule & (previous_token(tokens, before, len(labels)) | any_previous.to(tokens.device))
        return predicate

    def render(self, label: WordPieceLabel, atlas: Atlas) -> str:
        text = "a word continued" if label.which == "continuation" else "the start of a word"
        return f"{text} after {listed(atlas.vocab, label.previous)}" if label.previous else text

    def is_compact(self, label: WordPieceLabel) -> bool:
        return len(label.previous) <= MAX_LISTED_TOKENS
