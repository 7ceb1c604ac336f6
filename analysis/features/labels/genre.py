"""genre: the feature fires throughout texts of one kind (a document genre: the King James
Bible, Python documentation), e.g. `in text like "thee" "unto" "hath" "LORD"`.

The rule, on token ids alone: at position p, at least `min_hits` of the tokens at positions
<= p of this context are in the label's set of distinctive tokens (a causal prefix count;
every occurrence counts, repeats too).

How candidates are found:
  * document-level firing: in its random activating examples the feature fires on a large
    share of the window around the maximum (`MIN_WINDOW_FILL`, the maximum itself left
    out), and density / that share, an estimate of the share of atlas contexts it fires in,
    is a minority (`MAX_CONTEXT_SHARE`). Only such features get a candidate, so scoring
    cost stays low;
  * distinctive tokens: of the feature's example contexts (top and random), the tokens found
    in at least `MIN_CONTEXT_SHARE` of them and `MIN_LIFT` times as often as in atlas
    contexts at large (shares of contexts that contain the token, so one repeated name
    does not dominate), ranked by share x log(lift);
  * the set (the first 4, 8 or `MAX_LISTED_TOKENS` of that ranking, `SET_SIZES`) and
    `min_hits` (`MIN_HITS`), by F1 estimated on the atlas's own text: the predicted
    positions are counted exactly over all atlas contexts; recall = the feature's firings at
    each position (exact, `Atlas.position_count`) weighted by the share of its random
    example contexts where the label holds at that position (whole contexts, not just the
    windows, which rarely reach the first positions where `min_hits` matters), and
    TP = recall x the feature's firings.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..atlas import Atlas, ExampleTable
from .base import MAX_LISTED_TOKENS, Label, LabelContext, LabelKind, Predicate, quote, register, token_membership

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(kw_only=True)
class GenreLabel(Label):
    tokens: list[int] = field(default_factory=list)
    """The distinctive tokens, most distinctive first."""
    min_hits: int = 1
    """The label holds once this many of the context's tokens so far are in `tokens`."""

    def __post_init__(self) -> None:
        self.tokens = [int(t) for t in self.tokens]
        self.min_hits = int(self.min_hits)


class _Occurrences(NamedTuple):
    """Where each token occurs in the atlas contexts: the flat indices (context * ctx_len +
    position) of token t are flat[ptr[t]:ptr[t + 1]], ascending."""

    flat: np.ndarray
    ptr: np.ndarray

    @staticmethod
    def of(tokens: Tensor) -> _Occurrences:
        """tokens [n_contexts ctx_len] -> their occurrences."""
        ids = tokens.flatten().numpy()
        order = np.argsort(ids, kind="stable")
        return _Occurrences(order, np.searchsorted(ids[order], np.arange(int(ids.max()) + 2)))


def prefix_hits(member: Tensor) -> Tensor:
    """Running count of member tokens at positions <= p: bool [batch pos ...] -> int32 [batch pos ...]."""
    return member.cumsum(1, dtype=torch.int32)


@register
class GenreKind(LabelKind):
    name = "genre"
    rank = 45
    label_class = GenreLabel

    MIN_WINDOW_FILL: ClassVar[float] = 0.3
    """Document-level: the feature fires on at least this share of its example windows' positions..."""
    MAX_CONTEXT_SHARE: ClassVar[float] = 0.5
    """... and, by density / that share, in at most this share of the atlas contexts."""
    MIN_EXAMPLE_CONTEXTS: ClassVar[int] = 3
    """Distinct example contexts needed to tell which tokens distinguish them."""
    MIN_CONTEXT_SHARE: ClassVar[float] = 0.3
    """A distinctive token is in at least this share of the feature's example contexts..."""
    MIN_LIFT: ClassVar[float] = 2.0
    """... and that share is at least this many times its share of all atlas contexts."""
    SET_SIZES: ClassVar[tuple[int, ...]] = (4, 8, MAX_LISTED_TOKENS)
    """How many of the most distinctive tokens the set may keep..."""
    MIN_HITS: ClassVar[tuple[int, ...]] = (1, 2, 3)
    """... and the `min_hits` tried: the pair of best estimated F1 on the atlas is kept."""

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        tokens = atlas.tokens.long()  # [n_contexts ctx_len]
        n_contexts = len(tokens)
        if n_contexts == 0 or not atlas.live_features:
            return []
        sample = atlas.example_table("sample")
        fill = self._window_fill(atlas, sample)
        density = atlas.density.float()
        context_share = density / fill.clamp_min(1e-9)
        document_level = (fill >= self.MIN_WINDOW_FILL) & (context_share <= self.MAX_CONTEXT_SHARE) & (atlas.fire_count > 0)
        features = torch.nonzero(document_level).flatten().tolist()
        if not features:
            return []

        # (context, token) pairs present, sorted by context then token: token document frequencies
        vocab = int(tokens.max()) + 1
        keys = np.unique((torch.arange(n_contexts)[:, None] * vocab + tokens[:, 1:]).flatten().numpy())
        pair_context, pair_token = keys // vocab, keys % vocab
        context_ptr = np.searchsorted(pair_context, np.arange(n_contexts + 1))
        share_all = np.bincount(pair_token, minlength=vocab) / n_contexts

        where = _Occurrences.of(tokens)
        top = atlas.example_table("top")
        out = []
        for i in features:
            sampled = np.unique(sample.context[i][(sample.values[i] > 0) & (sample.context[i] >= 0)].numpy())
            rows = np.unique(np.concatenate([top.context[i][(top.values[i] > 0) & (top.context[i] >= 0)].numpy(), sampled]))
            if len(rows) < self.MIN_EXAMPLE_CONTEXTS:
                continue
            present = np.concatenate([pair_token[context_ptr[r]:context_ptr[r + 1]] for r in rows])
            ids, n_in = np.unique(present, return_counts=True)
            share_in = n_in / len(rows)
            lift = share_in / share_all[ids]
            keep = (share_in >= self.MIN_CONTEXT_SHARE) & (lift >= self.MIN_LIFT)
            if not keep.any():
                continue
            score = share_in[keep] * np.log(lift[keep])
            ranked = ids[keep][np.argsort(-score, kind="stable")[:MAX_LISTED_TOKENS]]
            recall_rows = sampled if len(sampled) >= self.MIN_EXAMPLE_CONTEXTS else rows  # random examples: as the firings fall
            best = self._best_rule(atlas, i, where, ranked, recall_rows)
            if best is not None:
                size, min_hits = best
                out.append(self.make(atlas, i, tokens=ranked[:size].tolist(), min_hits=min_hits))
        return out

    @staticmethod
    def _window_positions(atlas: Atlas, table: ExampleTable) -> tuple[Tensor, Tensor]:
        """Positions of each example window [d_sae n window] and whether each lies inside its
        context, past the sink (bool, same shape)."""
        left, right = atlas.meta["config"]["window_left"], atlas.meta["config"]["window_right"]
        positions = table.position[..., None] + torch.arange(-left, right + 1)
        inside = (positions >= 1) & (positions < atlas.tokens.shape[1]) & (table.values > 0)[..., None] & (table.context >= 0)[..., None]
        return positions, inside

    def _window_fill(self, atlas: Atlas, sample: ExampleTable) -> Tensor:
        """[d_sae] share of the window positions (the maximum left out) the feature fires on,
        over its random activating examples."""
        left = atlas.meta["config"]["window_left"]
        _, inside = self._window_positions(atlas, sample)
        inside[..., left] = False  # the maximum always fires
        active = (sample.window.float() > 0) & inside
        return active.sum((1, 2)).float() / inside.sum((1, 2)).clamp_min(1).float()

    def _best_rule(self, atlas: Atlas, feature: int, where: _Occurrences, ranked: np.ndarray, rows: np.ndarray) -> tuple[int, int] | None:
        """(how many of the `ranked` tokens, min_hits) of best estimated F1 on the atlas text,
        among `SET_SIZES` x `MIN_HITS`; None where none predicts a firing. `rows`: the
        feature's random example contexts (or all its example contexts).

        Worked out from where the set's tokens occur (`where`), not position by position: the
        label holds in a context from its min_hits-th occurrence on."""
        n_contexts, ctx_len = atlas.tokens.shape
        pieces = [where.flat[where.ptr[t]:where.ptr[t + 1]] for t in ranked.tolist()]
        flat_all = np.concatenate(pieces)
        rank_all = np.repeat(np.arange(len(ranked)), [len(piece) for piece in pieces])
        # recall: the feature's firings per position (exact, over the whole atlas) times the share
        # of its example contexts where the label holds there (whole contexts: no window bias)
        at_position = atlas.position_count[feature].double().numpy().copy()
        at_position[0] = 0  # position 0 is never scored
        fires = float(atlas.fire_count[feature])
        best, best_f1 = None, 0.0
        for size in sorted({min(n, len(ranked)) for n in self.SET_SIZES}):
            flat = np.sort(flat_all[rank_all < size])
            context, position = flat // ctx_len, flat % ctx_len
            first = np.flatnonzero(np.r_[True, context[1:] != context[:-1]]) if len(flat) else np.zeros(0, dtype=np.int64)
            count = np.diff(np.r_[first, len(flat)])
            for k in self.MIN_HITS:
                has = count >= k
                start = np.full(n_contexts, ctx_len)  # per context: where the label starts to hold (ctx_len: never)
                start[context[first[has]]] = np.maximum(position[first[has] + k - 1], 1)
                predicted = float((ctx_len - start).sum())
                holds = np.bincount(start[rows], minlength=ctx_len + 1)[:ctx_len].cumsum() / len(rows)  # [ctx_len] share of rows
                recall = float((at_position * holds).sum()) / max(float(at_position.sum()), 1.0)
                f1 = 2 * recall * fires / max(predicted + fires, 1.0)
                if f1 > best_f1 + 1e-12:
                    best, best_f1 = (size, k), f1
        return best

    def compile(self, labels: Sequence[GenreLabel], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        member = token_membership([label.tokens for label in labels])
        need = torch.tensor([int(label.min_hits) for label in labels], dtype=torch.int32)

        def predicate(tokens: Tensor) -> Tensor:
            """tokens [batch pos] -> bool [batch pos label]: at least min_hits set tokens at positions <= p."""
            return prefix_hits(member(tokens)) >= need.to(tokens.device)
        return predicate

    def render(self, label: GenreLabel, atlas: Atlas) -> str:
        shown = f"in text like {quote(atlas.vocab, label.tokens)}"
        return shown if label.min_hits <= 1 else f"{shown} ({label.min_hits}+ of them so far)"

    def is_compact(self, label: GenreLabel) -> bool:
        return len(label.tokens) <= MAX_LISTED_TOKENS


__all__ = ["GenreKind", "GenreLabel", "prefix_hits"]
