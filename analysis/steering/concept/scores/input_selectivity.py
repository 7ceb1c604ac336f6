"""The input side: does the feature fire on the concept's word in text, and rarely elsewhere?
(`analysis.features.monitor.input_selectivity`, what `saewb monitor --find` ranks by.)"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import CandidateInputs, CandidateScore, of_features, register


@register
class InputScore(CandidateScore):
    """Input selectivity, bits: r log2(r / density), r the share of the concept word's
    occurrences the feature fires on."""

    name = "input_score"
    rank = 10
    header = "input"
    spec = ".2f"
    proposes = True
    in_ranking = True

    def score(self, inputs: CandidateInputs, features: Sequence[int] | None) -> Tensor:
        return of_features(inputs.selectivity.score, features)


@register
class FireRate(CandidateScore):
    """Share of the concept word's occurrences the feature fires on (shown, and the tie-break
    of `ConceptSearch.top_input`)."""

    name = "fire_rate"
    rank = 20
    header = "fires"
    spec = ".2f"

    def score(self, inputs: CandidateInputs, features: Sequence[int] | None) -> Tensor:
        return of_features(inputs.selectivity.fire_rate, features)
