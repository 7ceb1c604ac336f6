"""`Labels`: every feature's labels and their held-out scores, as labels.json holds them.

labels.json (written by `save_labels`, read by `load_labels` and the dashboard's JavaScript):

    {"summary": {...}, "config": {...}, "scored_on": {"corpus", "first_context", "n_contexts"},
     "features": [null (no label) or {"feature": i, <best label's record>, "held_out_fires": n,
                                      "candidates": [<label record>, ...]}, one per SAE feature]}

A label record is `Label.to_json`: {"kind", "label" (the display text), "f1", "precision",
"recall", "recall_by_quartile", "fpr_random", "fpr_hard", then the kind's parameters, e.g.
"tokens", "patterns", "max_position"}.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from activations.corpus import CorpusConfig
from activations.io import atomic_write_bytes

from .base import Label


@dataclass
class FeatureLabels:
    """The labels of one feature."""

    best: Label
    """The compact candidate with the best strong-firing F1 on the selection part (the first
    listed of equals); its `scores` are those of the report part."""
    candidates: list[Label] = field(default_factory=list)
    """Every scored candidate, best first (empty if the file kept none)."""
    held_out_fires: int | None = None
    """Positions of the report part the feature fired on."""
    best_all: Label | None = None
    """The compact candidate with the best all-firing F1 on the selection part (None: `best`)."""

    @property
    def best_all_firings(self) -> Label:
        return self.best_all or self.best

    @property
    def feature(self) -> int:
        return self.best.feature

    def to_json(self) -> dict:
        out = {"feature": self.feature, **self.best.to_json()}
        if self.held_out_fires is not None:
            out["held_out_fires"] = self.held_out_fires
        if self.candidates:
            out["candidates"] = [c.to_json() for c in self.candidates]
            if self.best_all is not None and self.best_all in self.candidates:
                out["best_all_firings"] = self.candidates.index(self.best_all)  # index into "candidates"
        return out

    @classmethod
    def from_json(cls, record: Mapping, feature: int) -> FeatureLabels:
        candidates = record.get("candidates") or []
        if not isinstance(candidates, list):
            raise ValueError("\"candidates\" is not a list")
        fires = record.get("held_out_fires")
        read = [Label.from_json(c, feature) for c in candidates]
        index = record.get("best_all_firings")
        best_all = read[index] if isinstance(index, int) and 0 <= index < len(read) else None
        return cls(Label.from_json(record, feature), read, None if fires is None else int(fires), best_all)


@dataclass
class LabelSummary:
    """How well the features are labelled, over the whole SAE (saved under the names in the
    fields' "json" metadata where they differ). Fields a hand-written file lacks are None."""

    held_out_positions: int | None = None
    """Positions scored (position 0 of each context excluded)."""
    positions_by_part: dict[str, int] | None = None
    """Of those, the positions of the selection part and of the report part (split by document)."""
    live_features: int | None = None
    """Features with a label (they fire in the atlas)."""
    scored_features: int | None = None
    """Live features that fired on the scoring text."""
    best_f1_at_least_half: int | None = field(default=None, metadata={"json": "best_f1_at_least_0.5"})
    """Live features whose compact label chosen by all-firing F1 has report-part F1 >= 0.5."""
    share_of_live_with_f1_at_least_half: float | None = field(default=None, metadata={"json": "share_of_live_with_f1_at_least_0.5"})
    """That count over `live_features`."""
    median_best_f1: float | None = None
    """Median over live features of that label's report-part all-firing F1."""
    best_kind_counts: dict[str, int] | None = field(default=None, metadata={"json": "best_kind_counts_at_f1_0.5"})
    """Kind of that label, counted over scored features with F1 >= 0.5."""
    share_strong_f1_at_least_half: float | None = field(default=None, metadata={"json": "share_of_live_with_strong_f1_at_least_0.5"})
    """Share of live features whose best compact label (chosen on the selection part by
    strong-firing F1) has report-part strong-firing F1 >= 0.5: the headline figure."""
    median_best_strong_f1: float | None = None
    """Median over live features of that label's report-part strong-firing F1."""
    strong_kind_counts: dict[str, int] | None = field(default=None, metadata={"json": "strong_kind_counts_at_f1_0.5"})
    """Kind of the best label, counted over features with report strong F1 >= 0.5."""
    selection_share_strong: float | None = None
    """The headline share measured on the selection part the labels were chosen on: its excess
    over the report part's is the selection gain."""
    selection_share_all: float | None = None
    """The same for the all-firing share."""
    lookup_share_strong: float | None = None
    """Reported apart, never counted: the share whose best non-compact candidate (a large
    lookup table) reaches report strong F1 >= 0.5."""
    any_ball_share_strong: float | None = None
    """The headline share were every semantic label compact whatever its ball's size (the rule
    before balls were capped at `SemanticKind.MAX_COMPACT_BALL` tokens), beside the headline."""
    any_ball_share_all: float | None = None
    """The same for the all-firing share."""
    semantic_ball_sizes: dict[str, float] | None = None
    """Tokens in the ball of each feature's best semantic candidate (by selection strong F1),
    over features where it reaches report strong F1 >= 0.5: count, median, quartiles, and how
    many hold more than 64 and 200 tokens."""
    unexplained: int | None = None
    """Live features with no compact label of report strong F1 >= 0.5."""
    unexplained_examples: list[int] | None = None
    """Some of them (feature ids), for a look in the dashboard."""
    atlas_tokens: int | None = None
    """Tokens of the atlas the labels were made from."""
    other: dict = field(default_factory=dict)
    """Entries this version does not know, kept as read."""

    def to_json(self) -> dict:
        out = {_json_name(f): getattr(self, f.name) for f in fields(self) if f.name != "other" and getattr(self, f.name) is not None}
        return out | self.other

    @classmethod
    def from_json(cls, record: Mapping) -> LabelSummary:
        if not isinstance(record, Mapping):
            raise ValueError("\"summary\" is not an object")
        names = {_json_name(f): f.name for f in fields(cls) if f.name != "other"}
        return cls(**{names[k]: v for k, v in record.items() if k in names}, other={k: v for k, v in record.items() if k not in names})


def _json_name(f: Field) -> str:
    return f.metadata.get("json") or f.name


@dataclass
class ScoredOn:
    """The held-out text the labels were scored on: contexts after the atlas's."""

    corpus: CorpusConfig
    first_context: int
    """First scoring context (the atlas read the ones before)."""
    n_contexts: int

    def to_json(self) -> dict:
        return {"corpus": asdict(self.corpus), "first_context": self.first_context, "n_contexts": self.n_contexts}

    @classmethod
    def from_json(cls, record: Mapping) -> ScoredOn:
        known = {f.name for f in fields(CorpusConfig)}
        corpus = CorpusConfig(**{k: v for k, v in dict(record["corpus"]).items() if k in known})
        return cls(corpus, int(record["first_context"]), int(record["n_contexts"]))


@dataclass
class Labels:
    """Labels of every feature of one SAE: `labels.best(i)`, `labels.candidates(i)`; `len` is
    the number of features, and iterating gives each feature's best label (None: unlabelled)."""

    features: list[FeatureLabels | None]
    """One entry per SAE feature (None: dead in the atlas, so no candidate)."""
    summary: LabelSummary | None = None
    config: dict | None = None
    """The `LabelConfig` as saved (`saved_config`: no secret)."""
    scored_on: ScoredOn | None = None

    def __len__(self) -> int:
        return len(self.features)

    def __iter__(self) -> Iterator[Label | None]:
        return (None if entry is None else entry.best for entry in self.features)

    def entry(self, feature: int) -> FeatureLabels | None:
        if not 0 <= int(feature) < len(self.features):
            raise IndexError(f"feature {feature} out of range: these labels have {len(self.features)} features "
                             f"(0..{len(self.features) - 1})")
        return self.features[int(feature)]

    def best(self, feature: int) -> Label | None:
        """The feature's best label (None if it has none)."""
        entry = self.entry(feature)
        return None if entry is None else entry.best

    def candidates(self, feature: int) -> list[Label]:
        """Every scored candidate of the feature, best first."""
        entry = self.entry(feature)
        return [] if entry is None else entry.candidates

    def to_json(self) -> dict:
        out: dict = {}
        if self.summary is not None:
            out["summary"] = self.summary.to_json()
        if self.config is not None:
            out["config"] = self.config
        if self.scored_on is not None:
            out["scored_on"] = self.scored_on.to_json()
        out["features"] = [None if entry is None else entry.to_json() for entry in self.features]
        return out

    @classmethod
    def from_json(cls, data: Any, source: str | Path = "labels") -> Labels:
        """`Labels` of a labels.json object; a ValueError naming `source` if it is not one."""
        features = data.get("features") if isinstance(data, Mapping) else None
        if not isinstance(features, list):
            raise ValueError(f"{source}: not a labels file (no \"features\" list); rebuild it with `saewb analyze`")
        entries = []
        for i, record in enumerate(features):
            try:
                entries.append(None if record is None else FeatureLabels.from_json(record, i))
            except (ValueError, TypeError, KeyError) as error:
                raise ValueError(f"{source}: the entry of feature {i} is not a label ({error}); rebuild it with `saewb analyze`") from None
        try:
            summary = None if data.get("summary") is None else LabelSummary.from_json(data["summary"])
            scored_on = None if data.get("scored_on") is None else ScoredOn.from_json(data["scored_on"])
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{source}: unreadable summary or scored_on ({error}); rebuild it with `saewb analyze`") from None
        return cls(entries, summary, data.get("config"), scored_on)


def save_labels(labels: Labels, path: str | Path) -> Path:
    """Write labels.json (`Labels.to_json`): one line per feature rather than indented, which
    halves the file (every feature keeps all its scored candidates)."""
    path = Path(path)
    data = (labels if isinstance(labels, Labels) else Labels.from_json(labels)).to_json()
    features = data.pop("features")
    head = json.dumps(data, indent=1)[:-2] + ",\n" if data else "{\n"  # the other keys, then "features" one record per line
    body = ",\n".join(json.dumps(f, separators=(",", ":")) for f in features)
    atomic_write_bytes(path, f'{head} "features": [\n{body}\n]}}\n'.encode())
    return path


def check_labels(labels: Labels | Mapping, d_sae: int, source: str | Path = "labels") -> Labels:
    """`labels` (a `Labels`, or a labels.json object, read) if it has one entry (or null) per
    feature of a `d_sae`-feature SAE; else a ValueError naming `source` (labels of another SAE
    would be read at the wrong features)."""
    if isinstance(labels, Labels):
        n = len(labels)
    else:
        features = labels.get("features") if isinstance(labels, Mapping) else None
        if not isinstance(features, list):
            raise ValueError(f"{source}: not a labels file (no \"features\" list); rebuild it with `saewb analyze`")
        n = len(features)
    if n != d_sae:
        raise ValueError(f"{source} has {n} feature entries but the SAE has {d_sae} features: "
                         "these are labels of another SAE; rebuild them with `saewb analyze --sae <this SAE>`")
    return labels if isinstance(labels, Labels) else Labels.from_json(labels, source)


def load_labels(path: str | Path, d_sae: int | None = None) -> Labels:
    """Read labels.json; with `d_sae`, check it labels an SAE of that many features (`check_labels`)."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); rebuild it with `saewb analyze`") from None
    return Labels.from_json(data, path) if d_sae is None else check_labels(data, d_sae, path)


__all__ = ["FeatureLabels", "LabelSummary", "Labels", "ScoredOn", "check_labels", "load_labels", "save_labels"]
