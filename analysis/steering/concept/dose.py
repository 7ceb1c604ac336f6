"""The dose of concept steering: the largest on a rising ladder whose answers to held-out
tuning prompts keep perplexity and repetition within a budget of the unsteered answers',
refined by bisection. Perplexity is the fair one of the report: every answer under the
unsteered model given the prompt that asks for the concept, so no answer is charged for being
on topic."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor
from tqdm.auto import tqdm

from activations.generation import encode_prompts, generate_tokens
from activations.model import HookedModel
from sae.base import SAE

from ..measure import Fluency, generation_fluency
from .config import PROMPTING, TUNING_PROMPTS, ConceptConfig
from .search import ConceptFeature, ConceptSearch, concept_steering


class DosePoint(NamedTuple):
    dose: float
    fluency: Fluency
    within_budget: bool


@dataclass
class DoseSearch:
    dose: float | None
    """The largest dose tried within budget; None when even the smallest failed."""
    base: Fluency
    """The unsteered answers' fluency on the same prompts."""
    points: list[DosePoint]
    """Every dose tried, in the order tried."""
    budget: float
    repetition_floor: float


def within_budget(fluency: Fluency, base: Fluency, budget: float, repetition_floor: float = 0.0) -> bool:
    """Both perplexity and repetition at most `budget` x the unsteered answers' (repetition
    counted from at least `repetition_floor`)."""
    return fluency.perplexity <= budget * base.perplexity and fluency.repetition <= budget * max(base.repetition, repetition_floor)


def search_dose(measure: Callable[[float], Fluency], base: Fluency, doses: Sequence[float], budget: float = 2.0, refine: int = 2,
                repetition_floor: float = 0.0) -> DoseSearch:
    """The largest dose whose `measure(dose)` stays within budget: try the rising `doses` until
    one fails, then bisect (geometric midpoints) `refine` times between the last that passed
    and the first that failed. Assumes the cost grows with the dose, as it does on average."""
    points: list[DosePoint] = []

    def trial(dose: float) -> bool:
        fluency = measure(dose)
        ok = within_budget(fluency, base, budget, repetition_floor)
        points.append(DosePoint(dose, fluency, ok))
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
    return DoseSearch(passed, base, points, budget, repetition_floor)


def choose_dose(model: HookedModel, sae: SAE, search: ConceptSearch, max_activation: Tensor, prompts: Sequence[str] | None = None,
                cfg: ConceptConfig | None = None, features: Sequence[ConceptFeature] | None = None,
                base: Fluency | None = None) -> DoseSearch:
    """`search_dose` for the search's steered features (or `features`) on held-out tuning prompts (default `TUNING_PROMPTS`),
    answers scored given the prompts that ask for the concept. `base`: the unsteered answers' fluency, scored the same way,
    when an earlier search measured it (`DoseSearch.base`)."""
    cfg = cfg or ConceptConfig()
    features = list(features if features is not None else search.steered)
    prompts = list(prompts or TUNING_PROMPTS)
    tokens = encode_prompts(model.tokenizer, prompts, cfg.generation.chat)
    asked = encode_prompts(model.tokenizer, [PROMPTING.format(prompt=p, concept=search.concept) for p in prompts], cfg.generation.chat)
    base = base or generation_fluency(model, asked, generate_tokens(model, tokens, cfg.generation))

    bar = tqdm(total=len(cfg.doses) + cfg.refine, desc="dose search", leave=False)

    def measure(dose: float) -> Fluency:
        steering = concept_steering(sae, features, dose, max_activation, cfg, search.residual_norm)
        result = generation_fluency(model, asked, generate_tokens(model, tokens, cfg.generation, steering))
        bar.update()
        bar.set_postfix(dose=f"{dose:.2g}", ppl=f"{result.perplexity:.2f}", rep=f"{result.repetition:.3f}")
        return result

    try:
        return search_dose(measure, base, cfg.doses, cfg.budget * cfg.margin, cfg.refine, cfg.repetition_floor)
    finally:
        bar.close()


__all__ = ["DosePoint", "DoseSearch", "choose_dose", "search_dose", "within_budget"]
