"""What every label kind shares: the `Label` dataclass, its `Scores`, the `LabelKind` base
class and the registry of kinds.

A label kind is one file in this package: a `LabelKind` subclass under `@register`, and, if
its predicate reads parameters (token ids, a position, patterns), a `Label` subclass whose
fields hold them. The kind makes candidate labels from the atlas (`candidates`), says where
a label holds (`compile`, vectorised over many labels; `predicate` for one), and writes its
display text (`render`). Scoring (`score.py`), steering (`label_predicate`) and labels.json
(`store.py`) only ever go through these methods, so each rule is written once.
"""
from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor

from activations.model import vocabulary_key

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from activations.model import HookedModel
    from sae.base import SAE

    from ..atlas import Atlas
    from .config import LabelConfig

MAX_LISTED_TOKENS = 16
"""Most tokens a compact label lists in one clause."""
STRONG_SHARE = 0.25
"""Strong firings: activation above this share of the feature's max activation."""

Predicate = Callable[[Tensor], Tensor]
"""Compiled predicates of several labels: token ids [batch pos] -> bool [batch pos label]."""


# ---------------------------------------------------------------------------- labels
@dataclass(kw_only=True)
class Scores:
    """How well a label predicts its feature on one part of the held-out text (the scoring
    text comes after the atlas's). Two ways: *all firings* (activation > 0 is a positive) and
    *strong firings* (activation > 1/4 of the feature's max is a positive, weaker firings
    are left out of the score, non-firing positions are negatives). Labels read from a
    hand-written labels.json may carry only some fields."""

    f1: float
    """Harmonic mean of precision and recall over all firings (position 0 excluded)."""
    precision: float | None = None
    """P(fires | predicate)."""
    recall: float | None = None
    """P(predicate | fires)."""
    strong_f1: float | None = None
    """F1 on strong firings (weak firings neither positives nor negatives)."""
    strong_precision: float | None = None
    """P(fires strongly | predicate, not firing weakly)."""
    strong_recall: float | None = None
    """P(predicate | fires strongly)."""
    recall_by_quartile: list[float | None] | None = None
    """Recall among firings with activation / max activation in [0, .25), [.25, .5), [.5, .75),
    [.75, 1]; None for a quartile without firings."""
    fpr_random: float | None = None
    """False-positive rate on random negatives (every non-firing scored position)."""
    fpr_hard: float | None = None
    """False-positive rate on hard negatives (non-firing positions whose token the feature fires
    on in the atlas); None when the scoring text had none. Measured with `fpr_random`."""

    def to_json(self) -> dict:
        out: dict[str, Any] = {"f1": self.f1}
        for name in ("precision", "recall", "strong_f1", "strong_precision", "strong_recall", "recall_by_quartile", "fpr_random"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.fpr_random is not None:  # null fpr_hard means "no hard negatives", so it is written
            out["fpr_hard"] = self.fpr_hard
        return out

    @classmethod
    def from_json(cls, record: Mapping) -> Scores | None:
        if record.get("f1") is None:
            return None
        quartiles = record.get("recall_by_quartile", record.get("recall_by_quantile"))  # older files: recall_by_quantile
        return cls(f1=record["f1"], precision=record.get("precision"), recall=record.get("recall"), strong_f1=record.get("strong_f1"),
                   strong_precision=record.get("strong_precision"), strong_recall=record.get("strong_recall"), recall_by_quartile=quartiles,
                   fpr_random=record.get("fpr_random"), fpr_hard=record.get("fpr_hard"))


@dataclass(kw_only=True)
class Label:
    """One label of one feature: a predicate over token positions that says where the feature
    fires. A kind with parameters subclasses this and adds them as fields (saved in labels.json
    under their own names, and never read back from the display text)."""

    kind: str
    """Registered name of its `LabelKind` (`KINDS`)."""
    feature: int
    """The SAE feature it labels."""
    text: str = ""
    """Display text (`LabelKind.render`), saved as "label"."""
    scores: Scores | None = None
    """Scores on the report part of the held-out text; None until scored."""
    selection: Scores | None = None
    """Scores on the selection part, on which each feature's label was chosen (so
    `scores` is not inflated by the choice); None until scored."""
    name: str = ""
    """A readable name beside the rule (e.g. "deity words"); shown, never scored."""

    @property
    def compact(self) -> bool:
        """Whether its kind counts it as readable at a glance (`LabelKind.is_compact`)."""
        kind = KINDS.get(self.kind)
        return kind is not None and kind.is_compact(self)

    @property
    def params(self) -> dict[str, Any]:
        """The kind's parameters: the fields a subclass adds."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _BASE_FIELDS}

    def to_json(self) -> dict:
        """Its labels.json record: kind, label (the text), the scores, then the parameters
        (empty ones left out). The feature is the record's place in the file, not a field."""
        out = {"kind": self.kind, "label": self.text, **({"name": self.name} if self.name else {}),
               **(self.scores.to_json() if self.scores else {})}
        if self.selection is not None:
            out["selection"] = self.selection.to_json()
        for name, value in self.params.items():
            if value is not None and value != [] and value != "":
                out[name] = _jsonable(value)
        return out

    @staticmethod
    def from_json(record: Mapping, feature: int) -> Label:
        """The label of a labels.json record, as its kind reads it; a kind this version does
        not know is read as a plain `Label` (shown, but with no predicate)."""
        if not isinstance(record, Mapping) or not isinstance(record.get("kind"), str):
            raise ValueError(f"not a label record (no \"kind\"): {str(record)[:120]}")
        kind = KINDS.get(record["kind"])
        if kind is None:
            return Label(kind=record["kind"], feature=feature, text=str(record.get("label", "")), scores=Scores.from_json(record),
                         selection=Scores.from_json(record.get("selection") or {}), name=str(record.get("name", "")))
        return kind.from_json(record, feature)


_BASE_FIELDS = {f.name for f in fields(Label)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------- kinds
class LabelContext(NamedTuple):
    """What candidate makers may use beside the atlas."""

    sae: SAE
    """The SAE the atlas describes."""
    model: HookedModel
    """Its model, for kinds that re-run text."""
    cfg: LabelConfig
    """The labelling config (each kind reads its own fields)."""


class LabelKind(ABC):
    """One kind of label. Subclass it in a file of this package and put `@register` above the
    class; `score.label_features`, `label_predicate` and labels.json then know the kind."""

    name: ClassVar[str]
    """Registered name, saved as each label's "kind"."""
    rank: ClassVar[int]
    """Where this kind's labels are listed among a feature's candidates (lower first, unique);
    of candidates with equal held-out F1, the first listed is the feature's best label."""
    label_class: ClassVar[type[Label]] = Label
    """The dataclass of this kind's labels: `Label`, or a subclass with the fields `compile` reads."""

    @abstractmethod
    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        """Candidate labels for the atlas's live features, made from the atlas's text only
        (they are scored on other text)."""

    @abstractmethod
    def compile(self, labels: Sequence[Label], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        """The predicates of `labels` (all of this kind) at once, as a function token ids
        [batch pos] -> bool [batch pos label]: where each label says its feature fires.
        `tokenizer`: for kinds whose rule reads token strings."""

    @abstractmethod
    def render(self, label: Label, atlas: Atlas) -> str:
        """The display text of `label` (token strings from `atlas.vocab`)."""

    def is_compact(self, label: Label) -> bool:
        """Whether a person can read `label` at a glance: at most `MAX_LISTED_TOKENS` listed
        tokens per clause and at most two clauses (AND / OR / AFTER), or a rule with a short
        rendering. Only compact labels count in the summary; others are stored, shown and
        reported apart."""
        return True

    def predicate(self, label: Label, tokens: Tensor, tokenizer: PreTrainedTokenizerBase | None = None) -> Tensor:
        """Where `label` holds on token ids `tokens` [batch pos]: bool [batch pos]."""
        return self.compile([label], tokenizer)(tokens)[..., 0]

    def make(self, atlas: Atlas, feature: int, **params) -> Label:
        """A new label of this kind for `feature` with its parameters, its text rendered."""
        label = self.label_class(kind=self.name, feature=int(feature), **params)
        label.text = self.render(label, atlas)
        return label

    def from_json(self, record: Mapping, feature: int) -> Label:
        """The label of its labels.json record (`Label.to_json`); parameters it lacks take
        their defaults."""
        names = {f.name for f in fields(self.label_class)} - _BASE_FIELDS
        params = {name: record[name] for name in names if name in record}
        return self.label_class(kind=self.name, feature=int(feature), text=str(record.get("label", "")),
                                scores=Scores.from_json(record), selection=Scores.from_json(record.get("selection") or {}),
                                name=str(record.get("name", "")), **params)


KINDS: dict[str, LabelKind] = {}
"""Registered label kinds by name, in `rank` order (filled by `@register` as this package's
modules are imported)."""


def register(cls: type[LabelKind]) -> type[LabelKind]:
    """Class decorator: registers one instance of a `LabelKind` subclass under `cls.name`."""
    name, rank = getattr(cls, "name", None), getattr(cls, "rank", None)
    if not isinstance(name, str) or not name or name in KINDS:
        raise ValueError(f"a label kind needs a new, non-empty `name` (got {name!r}; registered: {sorted(KINDS)})")
    if not isinstance(rank, int) or any(kind.rank == rank for kind in KINDS.values()):
        raise ValueError(f"label kind {name!r} needs an int `rank` no other kind has (taken: {sorted(k.rank for k in KINDS.values())})")
    kinds = sorted([*KINDS.values(), cls()], key=lambda kind: kind.rank)
    KINDS.clear()
    KINDS.update((kind.name, kind) for kind in kinds)
    return cls


def label_predicate(label: Label | Mapping, tokenizer: PreTrainedTokenizerBase | None = None) -> Callable[[Tensor], Tensor]:
    """The predicate of one label (a `Label`, or its labels.json record) as a function token
    ids [batch pos] -> bool [batch pos]: where the label says its feature fires. The same
    rule its kind scored it with (`LabelKind.compile`); used to score steered text
    (`analysis.steering`). `tokenizer`: needed by kinds that read token strings (punctuation)."""
    if not isinstance(label, Label):
        label = Label.from_json(label, int(label.get("feature", -1)) if isinstance(label, Mapping) else -1)
    kind = KINDS.get(label.kind)
    if kind is None:
        raise ValueError(f"no predicate for a label of kind {label.kind!r}")
    compiled = kind.compile([label], tokenizer)
    return lambda tokens: compiled(tokens)[..., 0]


# ---------------------------------------------------------------------------- shared helpers
def quote(vocab: Mapping[int, str], ids: Iterable[int]) -> str:
    """Token strings of `ids`, JSON-quoted and space-separated (for display texts)."""
    return " ".join(json.dumps(vocab.get(int(t), f"<{int(t)}>"), ensure_ascii=False) for t in ids)


def token_membership(sets: Sequence[Sequence[int]]) -> Predicate:
    """Token ids [batch pos] -> bool [batch pos set]: whether each token is in each of `sets`.
    One lookup table over the tokens the sets name (a sorted list, searched), so it costs
    one gather per call whatever the vocabulary size."""
    used = torch.tensor(sorted({int(t) for s in sets for t in s}), dtype=torch.long)
    table = torch.zeros(len(used) + 1, len(sets), dtype=torch.bool)  # last row: a token no set names
    members = torch.tensor([int(t) for s in sets for t in s], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(sets)), torch.tensor([len(s) for s in sets], dtype=torch.long))
    table[torch.searchsorted(used, members), owner] = True

    def predicate(tokens: Tensor) -> Tensor:
        """tokens [batch pos] -> bool [batch pos set]."""
        if len(used) == 0:
            return torch.zeros(*tokens.shape, len(sets), dtype=torch.bool, device=tokens.device)
        u, tokens = used.to(tokens.device), tokens.long().contiguous()
        row = torch.searchsorted(u, tokens).clamp_max(len(u) - 1)
        row = torch.where(u[row] == tokens, row, len(u))
        return table.to(tokens.device)[row]
    return predicate


class _ByVocabulary:
    """A tokenizer that compares and hashes by its `vocabulary_key` (what `per_tokenizer` caches on)."""

    __slots__ = ("key", "tokenizer")

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer, self.key = tokenizer, vocabulary_key(tokenizer)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByVocabulary) and self.key == other.key


T = TypeVar("T")


def per_tokenizer(build: Callable[[PreTrainedTokenizerBase], T]) -> Callable[[PreTrainedTokenizerBase], T]:
    """Decorator: `build(tokenizer)`, a lookup over a whole vocabulary, made once per vocabulary
    and cached (the last 4) by `vocabulary_key`, so a tokenizer loaded twice shares it and a
    changed vocabulary gets its own."""
    cached = functools.lru_cache(maxsize=4)(lambda by: build(by.tokenizer))

    @functools.wraps(build)
    def lookup(tokenizer: PreTrainedTokenizerBase) -> T:
        return cached(_ByVocabulary(tokenizer))
    return lookup


__all__ = ["KINDS", "MAX_LISTED_TOKENS", "STRONG_SHARE", "Label", "LabelContext", "LabelKind", "Predicate", "Scores", "label_predicate",
           "per_tokenizer", "quote", "register", "token_membership", "vocabulary_key"]
