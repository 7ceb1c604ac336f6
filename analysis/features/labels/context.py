"""context: the current token given the one before. The label holds at position p when the
token at p - 1 is one of a few tokens P and (optionally) the token at p is one of a few
tokens C (no C: any token), e.g. `" States" after " United"` or `any token after "Is"`.
Position 0 never holds: it has no previous token.

Candidates come from the atlas's example windows (top and random activating contexts): every
firing inside them gives a (previous token, current token) pair. Each firing is weighted by
(the feature's exact firings on its current token over the whole atlas text) / (its example
firings on that token), so the pairs stand for all of the feature's firings, not just the
strongest contexts. P is chosen greedily by estimated P(fire | previous token), keeping the
prefix of best estimated F1 (like token_set.py), with the exact previous-token and bigram
counts of the atlas text as the denominators; then C given P the same way. A feature gets
"any token after P" and "C after P" (at most 2 candidates) only where P covers most of its
example firings and the estimated F1 is not negligible; "C after P" only where its estimate
beats "any token after P", and not where P adds nothing to C (that is the token-set label)
or C nothing to P.

`example_firings`, `Bigrams` and `best_prefix` are shared with word_piece.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..atlas import Atlas
from .base import MAX_LISTED_TOKENS, Label, LabelContext, LabelKind, Predicate, quote, register, token_membership

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# ---------------------------------------------------------------------------- shared with word_piece.py
class Firings(NamedTuple):
    """The distinct firing positions inside every feature's example windows, by feature:
    those of feature i are rows ptr[i]:ptr[i + 1]."""

    ptr: np.ndarray
    """[d_sae + 1] CSR offsets."""
    previous: np.ndarray
    """[n] token id at p - 1 (p >= 1 always: position 0 is never analysed)."""
    current: np.ndarray
    """[n] token id at p."""
    weight: np.ndarray
    """[n] float64: the firings of the whole atlas text each stands for (see the module docstring)."""

    def of(self, feature: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(previous, current, weight) of one feature's example firings."""
        sl = slice(int(self.ptr[feature]), int(self.ptr[feature + 1]))
        return self.previous[sl], self.current[sl], self.weight[sl]


def example_firings(atlas: Atlas) -> Firings:
    """Every firing position inside the example windows of the "top" and "sample" tables,
    deduplicated (windows of one context overlap, and the tables share contexts), with the
    tokens at p - 1 and p and a weight that corrects for the examples' bias to strong contexts."""
    tokens = atlas.tokens.long()  # [n_contexts, ctx_len]
    n_contexts, ctx_len = tokens.shape
    left = int(atlas.meta["config"]["window_left"])
    keys = []
    for kind in ("top", "sample"):
        table = atlas.example_table(kind)
        feature, slot, offset = torch.nonzero(table.window > 0, as_tuple=True)
        ctx, pos = table.context[feature, slot].long(), table.position[feature, slot].long() + offset - left
        inside = (ctx >= 0) & (pos >= 1) & (pos < ctx_len)
        keys.append(((feature * n_contexts + ctx) * ctx_len + pos)[inside])
    keys = torch.cat(keys).unique()  # sorted: by feature, then context and position
    feature, pos = keys // (n_contexts * ctx_len), keys % ctx_len
    ctx = keys // ctx_len % n_contexts
    previous, current = tokens[ctx, pos - 1], tokens[ctx, pos]

    # weight = exact firings of (feature, current token) / example firings of that pair
    vocab_size = int(tokens.max()) + 1  # the exact counts are of tokens of this text
    ptr = atlas.tensors["token_count_ptr"]
    exact_feature = torch.repeat_interleave(torch.arange(atlas.d_sae), ptr.diff())
    exact_keys = exact_feature * vocab_size + atlas.token_counts["ids"].long()
    order = exact_keys.argsort()
    exact_keys, exact_counts = exact_keys[order], atlas.token_counts["counts"][order].double()
    unique_pair, inverse, in_examples = (feature * vocab_size + current).unique(return_inverse=True, return_counts=True)
    row = torch.searchsorted(exact_keys, unique_pair).clamp_max(max(len(exact_keys) - 1, 0))
    exact = torch.where(exact_keys[row] == unique_pair, exact_counts[row], in_examples.double())
    weight = (exact / in_examples.double())[inverse]  # a pair the counts lack (none should: one pass made both) weighs 1
    feature_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(feature, minlength=atlas.d_sae).cumsum(0)])
    return Firings(feature_ptr.numpy(), previous.numpy(), current.numpy(), weight.numpy())


class Bigrams:
    """Exact counts over the analysed positions of the atlas text (p >= 1): of each token as
    the previous token, and of each (previous, current) pair."""

    def __init__(self, atlas: Atlas):
        tokens = atlas.tokens.long()
        self.vocab_size = int(tokens.max()) + 1
        self.previous_frequency = torch.bincount(tokens[:, :-1].flatten(), minlength=self.vocab_size).double().numpy()
        """[vocab] positions whose previous token is t."""
        keys, counts = (tokens[:, :-1] * self.vocab_size + tokens[:, 1:]).flatten().unique(return_counts=True)
        self.keys, self.counts = keys.numpy(), counts.double().numpy()
        """Sorted bigram keys previous * vocab_size + current, and their counts."""

    @property
    def previous(self) -> np.ndarray:
        """[n_bigrams] previous token of each bigram key."""
        return self.keys // self.vocab_size

    @property
    def current(self) -> np.ndarray:
        """[n_bigrams] current token of each bigram key."""
        return self.keys % self.vocab_size

    def count(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray:
        """Occurrences of each (previous[k], current[k]) pair, [k] float64 (0 for unseen pairs)."""
        keys = np.asarray(previous, dtype=np.int64) * self.vocab_size + np.asarray(current, dtype=np.int64)
        row = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)  # an atlas context has >= 2 tokens: keys is not empty
        return np.where(self.keys[row] == keys, self.counts[row], 0.0)


def best_prefix(ids: np.ndarray, tp: np.ndarray, occurrences: np.ndarray, fires: float,
                limit: int = MAX_LISTED_TOKENS) -> tuple[list[int], float]:
    """Greedy token set: `ids` [n] ranked by estimated precision tp / occurrences (ties by tp),
    and the prefix of at most `limit` with the best estimated F1 = 2 tp / (predicted + fires).
    tp, occurrences: [n] estimated firings on / occurrences of each id's positions (disjoint).
    Returns (the chosen ids, their estimated F1); ([], 0.0) when nothing is estimated to fire."""
    tp = np.minimum(tp, occurrences)  # an estimate cannot exceed the positions counted
    keep = tp > 0
    ids, tp, occurrences = ids[keep], tp[keep], occurrences[keep]
    if len(ids) == 0 or fires <= 0:
        return [], 0.0
    order = np.lexsort((-tp, -tp / occurrences))[:limit]
    f1 = 2 * np.cumsum(tp[order]) / (np.cumsum(occurrences[order]) + fires)
    best = int(np.argmax(f1))
    return ids[order[:best + 1]].tolist(), float(f1[best])


def supported(ids: np.ndarray, weight: np.ndarray, min_support: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of `ids` [n] seen at least `min_support` times, and the summed
    `weight` [n] of each (its estimated firings)."""
    unique, inverse, support = np.unique(ids, return_inverse=True, return_counts=True)
    keep = support >= min_support
    return unique[keep], np.bincount(inverse, weights=weight, minlength=len(unique))[keep]


def listed(vocab: dict[int, str], ids: Sequence[int]) -> str:
    """One token quoted, or several as a bracketed list: `" United"`, `["A", "B"]`."""
    if len(ids) == 1:
        return quote(vocab, ids)
    return "[" + ", ".join(quote(vocab, [t]) for t in ids) + "]"


def previous_token(tokens: Tensor, membership: Predicate, n_sets: int) -> Tensor:
    """Whether the token at p - 1 is in each set: tokens [batch pos] -> bool [batch pos set],
    False at position 0 (no previous token)."""
    b, n = tokens.shape
    first = torch.zeros(b, min(n, 1), n_sets, dtype=torch.bool, device=tokens.device)
    return torch.cat([first, membership(tokens[:, :-1])], dim=1)


# ---------------------------------------------------------------------------- the kind
@dataclass(kw_only=True)
class ContextLabel(Label):
    previous: list[int] = field(default_factory=list)
    """Token ids P: the token before the position is one of them."""
    current: list[int] = field(default_factory=list)
    """Token ids C: the token at the position is one of them (empty: any token)."""

    def __post_init__(self) -> None:
        self.previous = [int(t) for t in self.previous]
        self.current = [int(t) for t in self.current]


@register
class ContextKind(LabelKind):
    name = "context"
    rank = 15
    label_class = ContextLabel

    MIN_SUPPORT: ClassVar[int] = 2
    """A token is listed only if it is the previous (or current) token of at least this many
    example firings: a token seen once has a precision estimate of pure noise (often 1/1)."""
    MIN_COVERAGE: ClassVar[float] = 0.5
    """P must hold on at least this share of the feature's example firings (unweighted):
    otherwise the previous token does not explain the feature."""
    MIN_ESTIMATED_F1: ClassVar[float] = 0.1
    """Candidates estimated below this F1 on the atlas text are not worth scoring."""
    REDUNDANT: ClassVar[float] = 0.95
    """"C after P" is left out when it keeps this share of the positions of "any token after P"
    (C adds nothing) or of "tokens C" (P adds nothing: the token-set label says as much)."""

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        firings, bigrams = example_firings(atlas), Bigrams(atlas)
        fire_count, frequency = atlas.fire_count.double().numpy(), atlas.token_frequency.double().numpy()
        previous_frequency = bigrams.previous_frequency
        out = []
        for i in atlas.live_features:
            previous, current, weight = firings.of(i)
            if len(previous) == 0:
                continue
            fires = float(fire_count[i])
            ids, tp = supported(previous, weight, self.MIN_SUPPORT)
            P, f1_any = best_prefix(ids, tp, previous_frequency[ids], fires)
            after = np.isin(previous, P)
            if not P or after.mean() < self.MIN_COVERAGE:
                continue
            if f1_any >= self.MIN_ESTIMATED_F1:
                out.append(self.make(atlas, i, previous=P))
            # C given P: the current tokens of the firings after P, over their occurrences after P
            ids, tp = supported(current[after], weight[after], self.MIN_SUPPORT)
            pairs = bigrams.count(np.repeat(P, len(ids)), np.tile(ids, len(P))).reshape(len(P), len(ids))
            C, f1_pair = best_prefix(ids, tp, pairs.sum(0), fires)
            if not C or f1_pair < self.MIN_ESTIMATED_F1 or f1_pair <= f1_any:
                continue  # C only narrows P down where that is estimated to pay
            kept = bigrams.count(np.repeat(P, len(C)), np.tile(C, len(P))).sum()
            if kept < self.REDUNDANT * previous_frequency[P].sum() and kept < self.REDUNDANT * frequency[C].sum():
                out.append(self.make(atlas, i, previous=P, current=C))
        return out

    def compile(self, labels: Sequence[ContextLabel], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        before = token_membership([label.previous for label in labels])
        here = token_membership([label.current for label in labels])
        any_current = torch.tensor([not label.current for label in labels], dtype=torch.bool)

        def predicate(tokens: Tensor) -> Tensor:
            """tokens [batch pos] -> bool [batch pos label]: the previous token is in P and the
            current one in C (or C is empty)."""
            current_ok = here(tokens) | any_current.to(tokens.device)
            return previous_token(tokens, before, len(labels)) & current_ok
        return predicate

    def render(self, label: ContextLabel, atlas: Atlas) -> str:
        after = f"after {listed(atlas.vocab, label.previous)}"
        if not label.current:
            return f"any token {after}"
        if len(label.current) == 1:
            return f"{quote(atlas.vocab, label.current)} {after}"
        return f"tokens {listed(atlas.vocab, label.current)} {after}"

    def is_compact(self, label: ContextLabel) -> bool:
        return len(label.previous) <= MAX_LISTED_TOKENS and len(label.current) <= MAX_LISTED_TOKENS
