"""The dose of concept steering. `search_dose` finds the edge of the fluency budget: the
largest dose on a rising ladder whose answers to held-out tuning prompts keep perplexity and
repetition within a budget of the unsteered answers', refined by bisection. `choose_dose` then
steers at the dose within budget whose tuning answers show the concept most often (the smaller
of equals), which is the edge only when the concept keeps rising up to it: past the dose that
shows the concept best, more only costs fluency. Perplexity is the fair one of the report:
every answer under the unsteered model given the prompt that asks for the concept, so no
answer is charged for being on topic."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.generation import decode, encode_prompts, generate_tokens
from activations.model import HookedModel
from sae.base import SAE

from ..interventions import Positions
from ..measure import AnswerFluency, Fluency, answer_fluency, generation_fluency, share
from .config import PROMPTING, REQUEST, TUNING_PROMPTS, ConceptConfig, ConceptMode
from .lexicon import lexicon_scores
from .search import ConceptFeature, ConceptSearch, concept_steering


class DosePoint(NamedTuple):
    dose: float
    fluency: Fluency
    within_budget: bool
    concept_frequency: float = float("nan")
    """Share of the answers with a lexicon word, the request's words not counted (`choose_dose`)."""
    confidence: float = float("nan")
    """Share of paired bootstrap resamples of the prompts in which the point is within budget (`budget_confidence`)."""


@dataclass
class DoseSearch:
    dose: float | None
    """The dose chosen: `search_dose`'s largest dose within budget; `choose_dose`'s, the one within
    budget whose answers show the concept most often (the smaller of equals). None when even the
    smallest failed."""
    base: Fluency
    """The unsteered answers' fluency on the same prompts."""
    points: list[DosePoint]
    """Every dose tried, in the order tried."""
    budget: float
    repetition_floor: float
    unsteered_frequency: float = float("nan")
    """The unsteered answers' concept frequency on the same prompts (`choose_dose`)."""
    prompting: DosePoint | None = None
    """The prompted answers on the same prompts (dose 0), scored the same way (`choose_dose`)."""
    edge: float | None = None
    """The largest dose within budget (`search_dose`'s choice)."""

    @property
    def chosen(self) -> DosePoint | None:
        """The point at the chosen dose (None when no dose passed)."""
        return next((p for p in self.points if p.dose == self.dose), None) if self.dose is not None else None

    def to_dict(self) -> dict:
        point = lambda p: {"dose": p.dose, **p.fluency._asdict(), "within_budget": p.within_budget,  # noqa: E731
                           "concept_frequency": p.concept_frequency, "confidence": p.confidence}
        return {"dose": self.dose, "edge": self.edge, "base": self.base._asdict(), "budget": self.budget, "repetition_floor": self.repetition_floor,
                "unsteered_frequency": self.unsteered_frequency, "prompting": None if self.prompting is None else point(self.prompting),
                "points": [point(p) for p in self.points]}


def within_budget(fluency: Fluency, base: Fluency, budget: float, repetition_floor: float = 0.0) -> bool:
    """Both perplexity and repetition at most `budget` x the unsteered answers' (repetition
    counted from at least `repetition_floor`). The fields may also be tensors [n] of as many
    resamples (`budget_confidence`): then a bool tensor [n]."""
    floor = base.repetition.clamp_min(repetition_floor) if isinstance(base.repetition, Tensor) else max(base.repetition, repetition_floor)
    return (fluency.perplexity <= budget * base.perplexity) & (fluency.repetition <= budget * floor)


def budget_confidence(steered: AnswerFluency, base: Fluency, budget: float, repetition_floor: float = 0.0,
                      n_resamples: int = 1000, seed: int = 0) -> float:
    """How sure the prompts make `within_budget`: the share of bootstrap resamples of the steered
    answers [n] (prompts drawn with replacement) that are within budget of the unsteered answers'
    `base` fluency, the budget's reference, held fixed. At the budget's edge it is about 0.5; far
    below it, near 1. (Resampling the unsteered answers too, paired by prompt, made even doses
    that changed nothing look unsure: repetition comes from a few looping answers, and a ratio
    of two such means swings.)"""
    if len(steered.nll) == 0:
        raise ValueError("no steered answers to resample")
    rows = _resample_rows(len(steered.nll), n_resamples, seed)
    return share(within_budget(_resampled(steered, rows), base, budget, repetition_floor))


def _resample_rows(n: int, n_resamples: int, seed: int) -> Tensor:
    """Bootstrap rows [resamples, n]: `n` answers drawn with replacement, seeded."""
    if n == 0:
        raise ValueError("no answers to resample")
    return torch.randint(n, (n_resamples, n), generator=torch.Generator().manual_seed(seed))


def _resampled(answers: AnswerFluency, rows: Tensor) -> Fluency:
    """The aggregate fluency of each resample of `answers` (`rows` [resamples, n]): tensors [resamples]."""
    nll, n_tokens = answers.nll.double()[rows].sum(1), answers.n_tokens.double()[rows].sum(1).clamp_min(1)
    return Fluency((nll / n_tokens).exp(), answers.repetition.double()[rows].mean(1))  # type: ignore[arg-type]


def concept_ratio(frequency, unsteered, n_prompts: int):
    """A concept frequency over the unsteered one, a zero counted as one answer in `n_prompts` (a lower bound), rounded
    to 9 decimals so that 5 answers in 24 over 1 is 5x. Floats, or tensors [m] of as many resamples."""
    if isinstance(frequency, Tensor):
        return (frequency / unsteered.clamp_min(1 / n_prompts)).round(decimals=9)
    return round(frequency / max(unsteered, 1 / n_prompts), 9)


class VerdictConfidence(NamedTuple):
    within_budget: float
    """Share of paired resamples of the prompts in which the condition is within budget of the unsteered answers."""
    meets_ratio: float
    """Share in which it is within budget and its concept frequency is at least `min_ratio` x the unsteered one."""


def paired_confidence(condition: AnswerFluency, unsteered: AnswerFluency, budget: float, repetition_floor: float = 0.0,
                      present: Tensor | None = None, unsteered_present: Tensor | None = None, min_ratio: float = 5.0,
                      n_resamples: int = 1000, seed: int = 0) -> VerdictConfidence:
    """How surely a report's prompts decide its verdict: the prompts drawn with replacement, the condition's answers and
    the unsteered ones by the same prompts (paired), and the verdict taken on each resample. `present` [n] and
    `unsteered_present` [n] (bool: the answer has a lexicon word) give the share that also reaches `min_ratio` x the
    unsteered concept frequency (a zero counted as one answer in n, as the report's ratio). A verdict decided by one or
    two looping answers reads near 0.5; the expected number of concepts that pass on prompts like these is the sum of
    `meets_ratio` over concepts."""
    n = len(condition.nll)
    if len(unsteered.nll) != n:
        raise ValueError(f"paired answers needed: {n} against {len(unsteered.nll)} unsteered")
    rows = _resample_rows(n, n_resamples, seed)
    within = within_budget(_resampled(condition, rows), _resampled(unsteered, rows), budget, repetition_floor)
    if present is None or unsteered_present is None:
        return VerdictConfidence(share(within), float("nan"))
    ratio = concept_ratio(present.double()[rows].mean(1), unsteered_present.double()[rows].mean(1), n)
    return VerdictConfidence(share(within), share(within & (ratio >= min_ratio)))


def search_dose(measure: Callable[[float], Fluency], base: Fluency, doses: Sequence[float], budget: float = 2.0, refine: int = 2,
                repetition_floor: float = 0.0, confidence: Callable[[float], float] | None = None,
                min_confidence: float = 0.0) -> DoseSearch:
    """The largest dose whose `measure(dose)` stays within budget (and, given `confidence`, whose
    `confidence(dose)`, called after `measure(dose)`, is at least `min_confidence`): try the rising
    `doses` until one fails, then bisect (geometric midpoints) `refine` times between the last
    that passed and the first that failed. Assumes the cost grows with the dose, as it does on average."""
    points: list[DosePoint] = []

    def trial(dose: float) -> bool:
        fluency = measure(dose)
        sure = confidence(dose) if confidence is not None else float("nan")
        ok = within_budget(fluency, base, budget, repetition_floor) and (confidence is None or sure >= min_confidence)
        points.append(DosePoint(dose, fluency, ok, confidence=sure))
        return ok

    passed, failed = None, None
    for dose in doses:
        if trial(dose):
            passed = dose
        else:
            failed = dose
            break
    if failed is not None:
        lo = passed if passed is not None else failed / 4
        for _ in range(refine):
            mid = math.sqrt(lo * failed)
            if trial(mid):
                lo = passed = mid
            else:
                failed = mid
    return DoseSearch(passed, base, points, budget, repetition_floor, edge=passed)


def best_dose(points: Sequence[DosePoint]) -> float | None:
    """The dose within budget whose answers show the concept most often, the smaller of equals (None: none within budget).
    Past the smallest dose that shows the concept best, more only costs fluency: the larger of equals steered food at 0.24
    where 0.15 and 0.2 showed it as often, and its report answers went over on repetition (docs/results.md).
    When no dose shows the concept at all, the edge: the most the budget allows is the best chance on other prompts."""
    passed = [p for p in points if p.within_budget]
    if not passed:
        return None
    if max(p.concept_frequency for p in passed) <= 0:
        return max(p.dose for p in passed)
    return max(passed, key=lambda p: (p.concept_frequency, -p.dose)).dose


def choose_dose(model: HookedModel, sae: SAE, search: ConceptSearch, max_activation: Tensor, prompts: Sequence[str] | None = None,
                cfg: ConceptConfig | None = None, features: Sequence[ConceptFeature] | None = None,
                base: Fluency | None = None) -> DoseSearch:
    """`search_dose` for the search's steered features (or `features`) on held-out tuning prompts (default `TUNING_PROMPTS`),
    answers scored given the prompts that ask for the concept; the dose chosen is the one within budget whose answers show
    the concept most often (the smaller of equals), `edge` the largest within budget. `base`: the unsteered answers' fluency, scored the same way,
    when an earlier search measured it (`DoseSearch.base`)."""
    cfg = cfg or ConceptConfig()
    features = list(features if features is not None else search.steered)
    prompts = list(prompts or TUNING_PROMPTS)
    tok = model.tokenizer
    tokens = encode_prompts(tok, prompts, cfg.generation.chat)
    asked = encode_prompts(tok, [PROMPTING.format(prompt=p, concept=search.concept) for p in prompts], cfg.generation.chat)
    lexicon = search.lexicon.without_request(REQUEST.format(concept=search.concept))

    def concept_frequency(generated: list[Tensor]) -> float:
        return share(lexicon_scores([decode(tok, g) for g in generated], lexicon).present)

    unsteered = generate_tokens(model, tokens, cfg.generation)
    base = base or generation_fluency(model, asked, unsteered)
    frequencies: dict[float, float] = {}
    answers: dict[float, AnswerFluency] = {}
    bar = tqdm(total=len(cfg.doses) + cfg.refine, desc="dose search", leave=False)

    def measure(dose: float) -> Fluency:
        steering = concept_steering(sae, features, dose, max_activation, cfg, search.residual_norm)
        generated = generate_tokens(model, tokens, cfg.generation, steering)
        answers[dose] = answer_fluency(model, asked, generated)
        result = answers[dose].aggregate()
        frequencies[dose] = concept_frequency(generated)
        bar.update()
        bar.set_postfix(dose=f"{dose:.2g}", ppl=f"{result.perplexity:.2f}", rep=f"{result.repetition:.3f}", concept=f"{frequencies[dose]:.2f}")
        return result

    def confidence(dose: float) -> float:
        return budget_confidence(answers[dose], base, cfg.budget * cfg.margin, cfg.repetition_floor)

    try:
        found = search_dose(measure, base, cfg.doses, cfg.budget * cfg.margin, cfg.refine, cfg.repetition_floor, confidence, cfg.confidence)
    finally:
        bar.close()
    prompted = generate_tokens(model, asked, cfg.generation)
    prompted_fluency = generation_fluency(model, asked, prompted)
    found.points = [p._replace(concept_frequency=frequencies[p.dose]) for p in found.points]
    found.dose = best_dose(found.points)
    found.unsteered_frequency = concept_frequency(unsteered)
    found.prompting = DosePoint(0.0, prompted_fluency, within_budget(prompted_fluency, base, cfg.budget * cfg.margin, cfg.repetition_floor),
                                concept_frequency(prompted))
    return found


Way = tuple[ConceptMode, Positions]
"""How a concept is steered: a mode and the positions it edits (`ConceptConfig.mode`, `.positions`)."""


def way_name(way: Way) -> str:
    return f"{way[0]}:{way[1]}"


def parse_way(text: str) -> Way:
    """"mode:positions" (e.g. "add:generated") -> (mode, positions), checked by `ConceptConfig`."""
    mode, _, positions = text.partition(":")
    cfg = ConceptConfig(mode=mode, positions=positions or "all")  # type: ignore[arg-type]  # validates both
    return cfg.mode, cfg.positions


@dataclass
class WayChoice:
    way: Way
    """The chosen mode and positions."""
    dose: DoseSearch
    """Its dose search on the tuning prompts."""
    tried: dict[str, DoseSearch]
    """Every way's dose search, by `way_name`."""

    def config(self, cfg: ConceptConfig) -> ConceptConfig:
        """`cfg` steering the chosen way."""
        return replace(cfg, mode=self.way[0], positions=self.way[1])


def choose_way(model: HookedModel, sae: SAE, search: ConceptSearch, max_activation: Tensor, ways: Sequence[Way],
               prompts: Sequence[str] | None = None, cfg: ConceptConfig | None = None) -> WayChoice:
    """`choose_dose` for each of `ways` on the tuning prompts, and the way whose chosen dose shows
    the concept in the most tuning answers (ties: the lower perplexity; a way where no dose
    passed is never chosen unless none passed). Every way steers the same features, so only
    the mode and positions are compared. Choose on tuning prompts only: the report prompts must
    not decide it."""
    cfg = cfg or ConceptConfig()
    if not ways:
        raise ValueError("no steering way to choose from")
    tried: dict[str, DoseSearch] = {}
    base: Fluency | None = None
    for way in ways:
        found = choose_dose(model, sae, search, max_activation, prompts, replace(cfg, mode=way[0], positions=way[1]), base=base)
        base = found.base
        tried[way_name(way)] = found

    def merit(way: Way) -> tuple[float, float]:
        point = tried[way_name(way)].chosen
        return (-1.0, 0.0) if point is None else (point.concept_frequency, -point.fluency.perplexity)

    best = max(ways, key=merit)  # max keeps the first of equals: list the default way first
    return WayChoice(tuple(best), tried[way_name(best)], tried)  # type: ignore[arg-type]


__all__ = ["DosePoint", "DoseSearch", "VerdictConfidence", "Way", "WayChoice", "best_dose", "budget_confidence", "choose_dose", "concept_ratio", "choose_way",
           "paired_confidence", "parse_way", "search_dose", "way_name", "within_budget"]
