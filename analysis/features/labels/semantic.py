"""semantic: the current token lies near the feature's tokens in the model's own token space,
e.g. `tokens near "God" "Lord" "Father" (embedding cos >= 0.42; 37 tokens)`.

The rule: a token holds when its vector, a row of the input embedding W_E ("embedding") or a
column of the unembedding W_U ("unembedding"), has cosine >= `radius` with a prototype
direction, the weighted mean of the unit vectors of a few `prototype_tokens`. Unlike a
token set it reaches tokens the atlas never saw. The set of tokens within the radius is
worked out once over the whole vocabulary when the label is made and stored with it
(`tokens`), so the predicate is a plain token lookup that needs no model.

How candidates are found, per space and for all live features at once (chunks of features):
  * prototype: the feature's tokens in the atlas weighted by activation sum x precision
    (= mean activation over the token's occurrences x its firings: tokens it fires on
    strongly, often and reliably), the top `MAX_LISTED_TOKENS` of them (those weighing at
    least `PROTOTYPE_SHARE` of the heaviest);
  * cosine of every vocabulary vector with every prototype (one matmul per chunk), and the
    nearest `MAX_SET_TOKENS` tokens of each (a larger ball is not a neighbourhood);
  * the radius with the best F1 on the atlas's exact counts: a token t inside adds
    TP = the feature's firings on t and FP = occurrences of t - TP, FN = firings - TP. So
    only tokens the atlas saw move the F1; the cut goes midway between the last seen token
    kept and the next seen one, and every unseen token between them is in the set;
  * a candidate is kept where it earns its scoring time: its atlas F1 beats the token-set
    label's estimate by `BEAT_MARGIN`, or it reaches unseen tokens while losing at most
    `UNSEEN_SLACK` (held-out text may hold those tokens). One candidate per space at most;
    with tied embeddings (W_U = W_E.T) the unembedding space is skipped as the same one.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from activations.model import HookedModel, embedding, unembedding

from ..atlas import Atlas
from .base import MAX_LISTED_TOKENS, Label, LabelContext, LabelKind, Predicate, quote, register, token_membership
from .token_set import ranked_prefixes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Space = Literal["embedding", "unembedding"]
SPACES: tuple[Space, ...] = ("embedding", "unembedding")


@dataclass(kw_only=True)
class SemanticLabel(Label):
    """A label whose predicate is a cosine ball around a prototype in a token space."""

    space: str = "embedding"
    """Which token vectors: "embedding" (rows of W_E) or "unembedding" (columns of W_U)."""
    prototype_tokens: list[int] = field(default_factory=list)
    """Token ids (at most `MAX_LISTED_TOKENS`, heaviest first) whose weighted mean unit vector is the prototype."""
    radius: float = 1.0
    """Cosine threshold: the label holds on tokens whose vector has cosine >= radius with the prototype."""
    tokens: list[int] = field(default_factory=list)
    """Every vocabulary id within the radius, nearest first: worked out once when the label is made."""

    def __post_init__(self) -> None:
        self.prototype_tokens = [int(t) for t in self.prototype_tokens]
        self.tokens = [int(t) for t in self.tokens]
        self.radius = float(self.radius)


class Neighbourhood(NamedTuple):
    """The best cosine ball of one feature in one space (`neighbourhoods`)."""

    feature: int
    prototype_tokens: list[int]
    """Heaviest first."""
    radius: float
    tokens: list[int]
    """Every vocabulary id with cosine >= radius, nearest first."""
    f1: float
    """On the atlas's exact counts."""
    n_unseen: int
    """Tokens of the set that never occur in the atlas text."""


def token_vectors(model: HookedModel, space: Space) -> Tensor:
    """The token vectors of `space`, one row per token id: [d_vocab, d_model]."""
    if space == "embedding":
        return embedding(model)
    if space == "unembedding":
        return unembedding(model)[0].T  # columns of W_U [d_model, d_vocab]
    raise ValueError(f"unknown token space {space!r}: choose one of {SPACES}")


class _Space(NamedTuple):
    """A token space as `neighbourhoods` searches it."""

    unit: Tensor
    """[vocab d_model] unit token vectors (only ids the atlas's counts can name)."""
    freq: Tensor
    """[vocab] occurrences of each token in the atlas (fp64)."""
    k: int
    """Nearest tokens looked at per prototype: one past the largest set (or the whole vocabulary)."""
    capped: bool
    """Whether the `k`-th token is past the largest set (never inside a ball), not the vocabulary's end."""


class _Entries(NamedTuple):
    """The (feature, token) counts of a chunk of features: the atlas's CSR slice, each [n]."""

    owner: Tensor
    """Row of the entry's feature in the chunk."""
    ids: Tensor
    counts: Tensor
    """Firings on the token (fp32: exact below 2^24)."""
    acts: Tensor
    """Activation sum on the token (fp32)."""


class _Cut(NamedTuple):
    """The best radius of each feature of a chunk, each [chunk] (on the CPU)."""

    ok: Tensor
    """Whether the feature has a ball at all."""
    radius: Tensor
    size: Tensor
    """Tokens inside: a prefix of the nearest ones."""
    unseen: Tensor
    """Tokens inside that the atlas never saw."""
    f1: Tensor
    """On the atlas's counts."""


@torch.no_grad()
def neighbourhoods(atlas: Atlas, vectors: Tensor, features: Sequence[int], max_set: int, chunk: int = 256,
                   max_prototype: int = MAX_LISTED_TOKENS, prototype_share: float = 0.0) -> list[Neighbourhood | None]:
    """The best cosine ball of each of `features` (live, ascending) around its prototype among
    token `vectors` [d_vocab, d_model], by F1 on the atlas's counts, with at most `max_set`
    tokens; None for a feature without one. Runs on the device of `vectors`, `chunk`
    features at a time (a [chunk, d_vocab] cosine matrix bounds the memory)."""
    features = [int(f) for f in features]
    if any(b <= a for a, b in pairwise(features)):
        raise ValueError("features must be ascending and distinct")
    frequency = atlas.token_frequency
    n_vocab = min(len(vectors), len(frequency))  # padded rows of W (past the tokenizer) never occur
    k = min(max_set + 1, n_vocab)  # one past the largest set: the floor no radius may go below
    space = _Space(torch.nn.functional.normalize(vectors[:n_vocab].float(), dim=-1), frequency[:n_vocab].to(vectors.device, torch.float64),
                   k, k == max_set + 1)
    # per chunk: its (feature, token) values; zeroed after each use
    dense = torch.zeros(min(chunk, len(features)), n_vocab, device=vectors.device)
    out: list[Neighbourhood | None] = []
    for start in range(0, len(features), chunk):
        fs = torch.tensor(features[start:start + chunk], dtype=torch.long)
        out += _chunk_neighbourhoods(atlas, space, fs, dense[:len(fs)], max_prototype, prototype_share)
    return out


def _entries(atlas: Atlas, fs: Tensor, n_vocab: int, device: torch.device) -> _Entries:
    """The (feature, token) counts of the ascending features `fs`: one contiguous CSR slice
    (dead features between are empty), tokens past the space's `n_vocab` rows left out."""
    ptr = atlas.tensors["token_count_ptr"]
    lo, hi = int(ptr[fs[0]]), int(ptr[fs[-1] + 1])
    owner = torch.repeat_interleave(torch.arange(len(fs)), ptr[fs + 1] - ptr[fs]).to(device)
    ids = atlas.token_counts["ids"][lo:hi].to(device, torch.long)
    counts = atlas.token_counts["counts"][lo:hi].to(device, torch.float32)
    acts = atlas.token_counts["act_sums"][lo:hi].to(device, torch.float32)
    if hi > lo and int(ids.max()) >= n_vocab:  # tokens past the rows of the vectors have no place in this space
        inside = ids < n_vocab
        owner, ids, counts, acts = owner[inside], ids[inside], counts[inside], acts[inside]
    return _Entries(owner, ids, counts, acts)


def _chunk_neighbourhoods(atlas: Atlas, space: _Space, fs: Tensor, table: Tensor, max_prototype: int,
                          prototype_share: float) -> list[Neighbourhood | None]:
    """`neighbourhoods` of the features `fs` [chunk], with `table` [chunk vocab] zeros to work in (left zeroed)."""
    e = _entries(atlas, fs, len(space.unit), table.device)
    # prototype: the top tokens by activation sum x precision, heaviest first (a top-k over a
    # dense [c, vocab] table costs less than sorting the chunk's entries by feature and weight)
    table[e.owner, e.ids] = e.acts * e.counts / space.freq[e.ids].float().clamp_min(1)
    weight, top = table.topk(min(max_prototype, len(space.unit)), dim=1)  # [c, m]
    keep = (weight > 0) & (weight >= prototype_share * weight[:, :1])  # a prefix of each row: weights descend
    proto = ((weight * keep)[:, :, None] * space.unit[top]).sum(1)  # [c, d_model]
    n_proto = keep.sum(1)
    proto = torch.nn.functional.normalize(proto, dim=-1)

    # cosine of every vocabulary vector with each prototype, the nearest k of each
    cos, near = (proto @ space.unit.T).topk(space.k, dim=1)  # [c, k], nearest first
    table[e.owner, e.ids] = e.counts  # every entry the weights took: no stale weight stays
    hits = table.gather(1, near).double()  # the feature's firings on each of the nearest tokens
    table[e.owner, e.ids] = 0
    fires = atlas.fire_count[fs].to(table.device, torch.float64)[:, None]
    cut = _best_cut(cos, hits, space.freq[near], fires, n_proto > 0, space.capped)
    top, n_proto, near = top.cpu(), n_proto.tolist(), near.cpu()
    return [Neighbourhood(int(fs[r]), top[r, :n_proto[r]].tolist(), float(cut.radius[r]), near[r, :int(cut.size[r])].tolist(),
                          float(cut.f1[r]), int(cut.unseen[r])) if cut.ok[r] else None for r in range(len(fs))]


def _best_cut(cos: Tensor, hits: Tensor, occurrences: Tensor, fires: Tensor, has_proto: Tensor, capped: bool) -> _Cut:
    """The radius of best atlas F1 around each prototype, from the cosines `cos` [c k] of its
    nearest tokens (nearest first), the feature's firings `hits` [c k] and the `occurrences`
    [c k] of those tokens, its firings `fires` [c 1]. `capped`: the k-th token is never inside."""
    tp = hits.cumsum(1)
    f1 = 2 * tp / (occurrences.cumsum(1) + fires)  # 2TP / (2TP + FP + FN), with TP + FP = occurrences
    # cosine of the next seen token after each position (floored by the (k)th token, or -1
    # when the whole vocabulary fits): a radius between the two keeps exactly this prefix of seen tokens
    seen = occurrences > 0
    below = torch.where(seen, cos, float("-inf"))
    if capped:
        below[:, -1] = cos[:, -1]  # never inside: the set would be too large
    below = torch.cat([below, torch.full((len(cos), 1), -1.0, device=cos.device)], dim=1)
    next_seen = below.flip(1).cummax(1).values.flip(1)[:, 1:]  # [c, k]
    # a cut can only be best right after a token the feature fires on, strictly above the next seen one
    cut = (hits > 0) & (cos > next_seen) & has_proto[:, None]
    if capped:
        cut[:, -1] = False
    best = torch.where(cut, f1, -1.0).argmax(1)
    rows = torch.arange(len(cos), device=cos.device)
    upper, lower = cos[rows, best], next_seen[rows, best]
    radius = (upper + lower) / 2
    radius = torch.where(radius > lower, radius, upper)  # float32 midpoint of neighbours may round onto the lower one
    inside = cos >= radius[:, None]
    return _Cut(*(t.cpu() for t in (cut[rows, best], radius, inside.sum(1), (inside & ~seen).sum(1), f1[rows, best])))


def token_set_f1(atlas: Atlas, features: Sequence[int], max_tokens: int) -> np.ndarray:
    """[len(features)] atlas F1 of each feature's compact token-set label (`token_set.ranked_prefixes`)."""
    out = np.zeros(len(features))
    for n, i in enumerate(features):
        f1 = ranked_prefixes(atlas, i, max_tokens)[-1]
        out[n] = float(f1.max()) if len(f1) else 0.0
    return out


@register
class SemanticKind(LabelKind):
    name = "semantic"
    rank = 12
    label_class = SemanticLabel

    MAX_SET_TOKENS: ClassVar[int] = 2000
    """Largest set tried: past it a ball is a region of the vocabulary, not a neighbourhood."""
    MAX_SET_SHARE: ClassVar[float] = 0.1
    """... nor past this share of the vocabulary (binds for small vocabularies only)."""
    MIN_SET_TOKENS: ClassVar[int] = 2
    """A one-token ball is a token-set label."""
    PROTOTYPE_SHARE: ClassVar[float] = 0.05
    """Prototype tokens weigh at least this share of the heaviest one (stragglers only blur it and lengthen the text)."""
    BEAT_MARGIN: ClassVar[float] = 0.02
    """Kept when its atlas F1 beats the token-set label's by this much ..."""
    UNSEEN_SLACK: ClassVar[float] = 0.05
    """... or when it reaches unseen tokens and loses at most this much to it: the atlas cannot show their gain,
    and the token set's atlas F1 is the more optimistic one (it picks each token on the atlas, the ball only a radius)."""
    MAX_COMPACT_BALL: ClassVar[int] = 64
    """A semantic label counts as compact (readable) only when its ball holds at most this many
    tokens: past it the prototypes shown no longer tell a reader what the predicate covers.
    Larger balls are stored, shown and scored, but reported apart, like lookup tables."""
    CHUNK_FEATURES: ClassVar[int] = 256
    """Features per cosine matmul: a [chunk, d_vocab] matrix (256 x 49,152 fp32 is 50 MB)."""

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        live = atlas.live_features
        if not live:
            return []
        baseline = token_set_f1(atlas, live, context.cfg.max_tokens)
        out: list[Label] = []
        spaces: dict[str, Tensor] = {}
        for space in SPACES:
            vectors = spaces[space] = token_vectors(context.model, space)
            if space == "unembedding" and _same(vectors, spaces["embedding"]):
                continue  # tied embeddings (SmolLM2): the unembedding space is the embedding space
            share = int(self.MAX_SET_SHARE * min(len(vectors), len(atlas.token_frequency)))
            max_set = min(self.MAX_SET_TOKENS, max(self.MIN_SET_TOKENS, share))
            found = neighbourhoods(atlas, vectors, live, max_set, self.CHUNK_FEATURES, MAX_LISTED_TOKENS, self.PROTOTYPE_SHARE)
            for nb, token_set in zip(found, baseline, strict=True):
                if nb is None or len(nb.tokens) < self.MIN_SET_TOKENS:
                    continue
                if nb.f1 >= token_set + self.BEAT_MARGIN or (nb.n_unseen > 0 and nb.f1 >= token_set - self.UNSEEN_SLACK):
                    out.append(self.make(atlas, nb.feature, space=space, prototype_tokens=nb.prototype_tokens, radius=nb.radius,
                                         tokens=nb.tokens))
        return out

    def compile(self, labels: Sequence[SemanticLabel], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        return token_membership([label.tokens for label in labels])

    def render(self, label: SemanticLabel, atlas: Atlas) -> str:
        near = quote(atlas.vocab, label.prototype_tokens)
        return f"tokens near {near} ({label.space} cos >= {label.radius:.2f}; {len(label.tokens)} tokens)"

    def is_compact(self, label: SemanticLabel) -> bool:
        return len(label.prototype_tokens) <= MAX_LISTED_TOKENS and len(label.tokens) <= self.MAX_COMPACT_BALL


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether two token-vector matrices are the same (tied weights: shared storage, or equal)."""
    return a.shape == b.shape and (a.data_ptr() == b.data_ptr() and a.stride() == b.stride() or torch.equal(a, b))


__all__ = ["SPACES", "Neighbourhood", "SemanticKind", "SemanticLabel", "neighbourhoods", "token_set_f1", "token_vectors"]
