"""The concept search: candidates proposed by some scores, every registered score computed
for them (`scores/`), ranked, and the best with a positive concept gain steered together."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from activations.generation import encode_prompts
from activations.model import HookedModel
from sae.base import SAE

from ..interventions import Intervention, Steering
from ..measure import residual_norm
from .config import TUNING_PROMPTS, ConceptConfig
from .lexicon import Lexicon, neighbour_lexicon
from .scores import SCORES, CandidateInputs

if TYPE_CHECKING:
    from ...features.atlas import Atlas
    from ...features.labels import Labels

STEERED_BY = "trial"
"""The score that decides which ranked candidates are steered (a positive value) and their
weights (the value over the best steered one's): the trial score, measured the way the
features are used. When no trial shows the concept, the concept gain decides instead."""
FALLBACK = "concept_gain"


@dataclass
class ConceptFeature:
    """One candidate of a concept search. Its scores read as attributes too: `c.concept_gain`
    is `c.scores["concept_gain"]`."""

    feature: int
    scores: dict[str, float]
    """Every registered candidate score (`SCORES`) by name: input_score, fire_rate, contrast,
    logit_z, output_score, concept_gain, ..."""
    combined: float
    """Ranking score: the mean of the scores that count in the ranking (`CandidateScore.in_ranking`:
    input score, answer contrast, concept gain), each over its best candidate (negatives as 0)."""
    weight: float = 0.0
    """Share of the dose this feature gets when steered (its concept gain over the best one); 0 if not steered."""
    label: str = ""
    density: float = 0.0

    def __getattr__(self, name: str) -> float:
        scores = self.__dict__.get("scores")
        if scores is not None and name in scores:
            return scores[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute or score {name!r}")

    def to_dict(self) -> dict:
        """Flat: the feature, each score under its name, then the ranking fields."""
        return {"feature": self.feature, **self.scores, "combined": self.combined, "weight": self.weight, "label": self.label,
                "density": self.density}

    @classmethod
    def from_dict(cls, row: dict) -> ConceptFeature:
        """The inverse of `to_dict` (a saved search, e.g. a bench summary's)."""
        fields = {"feature", "combined", "weight", "label", "density"}
        return cls(int(row["feature"]), {k: float(v) for k, v in row.items() if k not in fields}, float(row["combined"]),
                   float(row.get("weight", 0.0)), str(row.get("label", "")), float(row.get("density", 0.0)))


@dataclass
class ConceptSearch:
    concept: str
    lexicon: Lexicon
    ranked: list[ConceptFeature]
    """Every candidate, best first."""
    residual_norm: float = float("nan")
    """The residual stream's typical norm at the SAE's hook on the search's prompts (the unit of "add" doses)."""

    @property
    def steered(self) -> list[ConceptFeature]:
        return [c for c in self.ranked if c.weight > 0]

    @property
    def top_input(self) -> ConceptFeature:
        """The feature a search by input alone would steer (`saewb monitor --find`'s first)."""
        return max(self.ranked, key=lambda c: (c.input_score, c.fire_rate))

    def to_dict(self) -> dict:
        return {"concept": self.concept, "lexicon": {"words": list(self.lexicon.words), "source": self.lexicon.source},
                "residual_norm": self.residual_norm, "ranked": [c.to_dict() for c in self.ranked]}

    @classmethod
    def from_dict(cls, saved: dict) -> ConceptSearch:
        """The inverse of `to_dict`: a saved search, to steer its features again (e.g. on other report prompts)."""
        lexicon = Lexicon(saved["concept"], tuple(saved["lexicon"]["words"]), saved["lexicon"].get("source", "given"))
        return cls(saved["concept"], lexicon, [ConceptFeature.from_dict(row) for row in saved["ranked"]], float(saved["residual_norm"]))


def _best(score: Tensor, usable: Tensor, n: int) -> Tensor:
    """The `n` features [n] with the highest `score` [d_sae] among the `usable` ones (unusable
    ones only where fewer are usable)."""
    return torch.where(usable, score, torch.full_like(score, -math.inf)).topk(n).indices


class Candidates(NamedTuple):
    features: list[int]
    """The best usable features of each proposing score, in rank order, each once."""
    scores: dict[str, Tensor]
    """Every registered score of them [n_candidates], by name."""


def _score_candidates(inputs: CandidateInputs, usable: Tensor) -> Candidates:
    """The candidates of a search and their scores."""
    everywhere = {name: s.score(inputs, None) for name, s in SCORES.items() if s.proposes}  # [d_sae] each
    proposed = [f for scores in everywhere.values() for f in _best(scores, usable, inputs.cfg.n_candidates).tolist()]
    candidates = [f for f in dict.fromkeys(proposed) if usable[f]]
    values = {name: everywhere[name][candidates] if name in everywhere else s.score(inputs, candidates) for name, s in SCORES.items()}
    return Candidates(candidates, values)


def _rank(candidates: Candidates, atlas: Atlas, labels: Labels | None, n_features: int) -> list[ConceptFeature]:
    """The candidates, best `combined` first, with the steered ones weighted."""
    from ...features.monitor import label_text

    values = candidates.scores
    parts = [values[name] for name, s in SCORES.items() if s.in_ranking]
    combined = sum(part.clamp_min(0) / part.clamp_min(0).max().clamp_min(1e-12) for part in parts) / len(parts)
    ranked = [ConceptFeature(f, {name: float(v[n]) for name, v in values.items()}, float(combined[n]), label=label_text(labels, f),
                             density=float(atlas.density[f]))
              for n, f in enumerate(candidates.features)]
    ranked.sort(key=lambda c: -c.combined)
    by = STEERED_BY if any(c.scores.get(STEERED_BY, 0.0) > 0 for c in ranked) else FALLBACK
    chosen = sorted((c for c in ranked if c.scores.get(by, 0.0) > 0), key=lambda c: -c.scores[by])[:n_features]
    top = max((c.scores[by] for c in chosen), default=0.0)
    for c in chosen:
        c.weight = c.scores[by] / top
    return ranked


def search_concept(concept: str, model: HookedModel, sae: SAE, atlas: Atlas, labels: Labels | None = None, lexicon: Lexicon | None = None,
                   prompts: Sequence[str] | None = None, cfg: ConceptConfig | None = None) -> ConceptSearch:
    """Rank features for steering toward `concept` by what they read and what they write (every
    registered `CandidateScore`). Without a `lexicon`, the concept word's embedding neighbours
    (`neighbour_lexicon`, independent of the features) are used and shown in the result. `prompts` (default `TUNING_PROMPTS`) are read for the
    answer and output sides."""
    from ...features.monitor import input_selectivity

    cfg = cfg or ConceptConfig()
    selectivity = input_selectivity(concept, model, sae, atlas)
    usable = (atlas.max_activation > 0) & (atlas.density <= cfg.max_density)
    if lexicon is None:
        lexicon = neighbour_lexicon(concept, model)
    prompts = list(prompts or TUNING_PROMPTS)
    norm = residual_norm(model, sae.cfg.hook_name, encode_prompts(model.tokenizer, prompts, cfg.generation.chat))
    inputs = CandidateInputs(concept, model, sae, atlas, lexicon.token_ids(model.tokenizer), prompts, cfg, selectivity, lexicon, norm)
    return ConceptSearch(concept, lexicon, _rank(_score_candidates(inputs, usable), atlas, labels, cfg.n_features), norm)


def concept_steering(sae: SAE, features: Sequence[ConceptFeature], dose: float, max_activation: Tensor, cfg: ConceptConfig | None = None,
                     residual_norm: float | None = None) -> Steering:
    """The steering of `features` at `dose`, by `cfg.mode` at `cfg.positions`:

    * clamp / clamp_at_least: each feature to (at least) dose x its weight x its max activation [d_sae];
    * add: the weighted sum of the features' unit decoder directions, scaled to a vector of norm
      dose x `residual_norm` (each feature's alpha in "norm" units: dose x weight / |sum|)."""
    cfg = cfg or ConceptConfig()
    if not features:
        raise ValueError("no feature to steer: no candidate raised the concept's tokens (try other lexicon words)")
    if cfg.mode != "add":
        return Steering(sae, [Intervention(c.feature, cfg.mode, dose * c.weight) for c in features], max_activation,
                        positions=cfg.positions)
    ids = torch.tensor([c.feature for c in features])
    weights = torch.tensor([c.weight for c in features])
    directions = sae.W_dec.detach()[ids].float().cpu()
    combined = float((weights @ (directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12))).norm())
    return Steering(sae, [Intervention(c.feature, "add", dose * c.weight / max(combined, 1e-12), "norm") for c in features],
                    max_activation, residual_norm, cfg.positions)


def ranking_table(features: Sequence[ConceptFeature]) -> str:
    """Plain text: one row per feature, a column per registered score (`SCORES`), its weight and label."""
    head = ["feature", *(s.header for s in SCORES.values()), "weight"]
    rows = [[str(c.feature), *(format(c.scores[name], s.spec) for name, s in SCORES.items()), f"{c.weight:.2f}"] for c in features]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    labels = ["label", *(c.label[:60] for c in features)]
    return "\n".join(" ".join(cell.rjust(w) for cell, w in zip(row, widths)) + "  " + label for row, label in zip([head, *rows], labels))


__all__ = ["STEERED_BY", "Candidates", "ConceptFeature", "ConceptSearch", "concept_steering", "ranking_table", "search_concept"]
