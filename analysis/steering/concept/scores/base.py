"""What every candidate score of concept steering shares: the `CandidateScore` base class,
the registry of scores, and `CandidateInputs`, what a score may read.

A score is one file in this package: a `CandidateScore` subclass under `@register`. The
concept search (`search_concept`) computes every registered score for its candidates,
`ConceptFeature.scores` holds them by name, concept_<x>.json saves them and `saewb steer
--concept` prints one column each. A score may propose candidates (`proposes`) and may
count in the ranking (`in_ranking`); the others are shown only.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from torch import Tensor

if TYPE_CHECKING:
    from activations.model import HookedModel
    from sae.base import SAE

    from ....features.atlas import Atlas
    from ....features.monitor import InputSelectivity
    from ..config import ConceptConfig
    from ..lexicon import Lexicon

T = TypeVar("T")


@dataclass
class CandidateInputs:
    """What the scores of one concept search read."""

    concept: str
    """The concept word (or phrase) searched for."""
    model: HookedModel
    sae: SAE
    atlas: Atlas
    """The SAE's feature atlas: max activations [d_sae], densities [d_sae], its held-out text."""
    concept_ids: list[int]
    """The lexicon's token ids (`Lexicon.token_ids`)."""
    prompts: list[str]
    """Neutral tuning prompts (`TUNING_PROMPTS` by default), read for the answer and output sides."""
    cfg: ConceptConfig
    selectivity: InputSelectivity
    """`analysis.features.monitor.input_selectivity` of the concept, measured first: a derived
    lexicon starts from its best features."""
    lexicon: Lexicon | None = None
    """The concept's lexicon (the trial score counts its words in steered answers)."""
    residual_norm: float | None = None
    """The residual stream's typical norm at the SAE's hook on the prompts (the unit of "add" doses)."""
    _shared: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False)

    def shared(self, key: Hashable, compute: Callable[[], T]) -> T:
        """`compute()` the first time `key` is asked for in this search, its result after: scores
        read from one measurement (the output score and the concept gain, one amplified pass per
        candidate) run it once."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]


def of_features(values: Tensor, features: Sequence[int] | None) -> Tensor:
    """`values` [d_sae] at `features` ([len(features)]), or all of them when `features` is None."""
    return values if features is None else values[list(features)]


class CandidateScore(ABC):
    """One score of concept-steering candidates. Subclass it in a file of this package and put
    `@register` above the class; the search, concept_<x>.json and the CLI table then show it."""

    name: ClassVar[str]
    """Registered name: its key in `ConceptFeature.scores` and in concept_<x>.json."""
    rank: ClassVar[int]
    """Order (lower first, unique) in which scores are computed, propose candidates, add up in
    the ranking and are printed."""
    header: ClassVar[str]
    """Its column header in the ranking table (`ranking_table`)."""
    spec: ClassVar[str] = ".3f"
    """Format spec of its values in the ranking table."""
    proposes: ClassVar[bool] = False
    """True: computed for every feature first; its best `ConceptConfig.n_candidates` usable
    features join the candidates."""
    in_ranking: ClassVar[bool] = False
    """True: one of the parts of `ConceptFeature.combined` (each scaled to its best candidate,
    negatives as 0, then averaged)."""

    @abstractmethod
    def score(self, inputs: CandidateInputs, features: Sequence[int] | None) -> Tensor:
        """This score of each of `features` [len(features)]; of every feature [d_sae] when
        `features` is None (asked only of a score that `proposes`)."""


SCORES: dict[str, CandidateScore] = {}
"""Registered candidate scores by name, in `rank` order (filled by `@register` as this
package's modules are imported)."""


def register(cls: type[CandidateScore]) -> type[CandidateScore]:
    """Class decorator: registers one instance of a `CandidateScore` subclass under `cls.name`."""
    name, rank = getattr(cls, "name", None), getattr(cls, "rank", None)
    if not isinstance(name, str) or not name or name in SCORES:
        raise ValueError(f"a candidate score needs a new, non-empty `name` (got {name!r}; registered: {sorted(SCORES)})")
    if not isinstance(rank, int) or any(s.rank == rank for s in SCORES.values()):
        taken = sorted(s.rank for s in SCORES.values())
        raise ValueError(f"candidate score {name!r} needs an int `rank` no other score has (taken: {taken})")
    scores = sorted([*SCORES.values(), cls()], key=lambda s: s.rank)
    SCORES.clear()
    SCORES.update((s.name, s) for s in scores)
    return cls


__all__ = ["SCORES", "CandidateInputs", "CandidateScore", "of_features", "register"]
