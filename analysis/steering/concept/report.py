"""The report of concept steering: answers to neutral prompts unsteered, prompted, steered and
both, each scored by the lexicon, the steered features' readout and fluency, all under the
unsteered model."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.generation import decode, encode_prompts, generate_tokens
from activations.model import HookedModel
from sae.base import SAE

from ..interventions import Steering
from ..measure import feature_readout, generation_fluency
from .config import PROMPTING, ConceptConfig
from .dose import within_budget
from .lexicon import lexicon_scores
from .search import ConceptFeature, ConceptSearch, concept_steering


@dataclass
class ConceptPoint:
    condition: str
    """"unsteered", "prompting", "steering", "prompting + steering", or another named condition."""
    dose: float | None
    lexicon_frequency: float
    """Share of answers with a lexicon word: the concept score."""
    lexicon_rate: float
    """Mean lexicon words per word."""
    feature_frequency: float
    """Share of answers on which a steered feature, re-read by the unsteered model, exceeds 0.25x its max."""
    perplexity: float
    """Under the unsteered model, given the neutral prompt."""
    perplexity_given_concept_prompt: float
    """The same answers given the prompt that asks for the concept: fluency without charging for the topic change."""
    repetition: float
    within_budget: bool
    """Perplexity and repetition both within the budget of the unsteered answers'."""
    ratio: float
    """lexicon_frequency over the unsteered one (a zero counted as one answer: a lower bound)."""
    texts: list[str]


class ExtraCondition(NamedTuple):
    """A further steered condition of a report: other features at their own dose."""

    features: Sequence[ConceptFeature]
    dose: float


class _Run(NamedTuple):
    prompts: list[Tensor]
    """Token ids [len] of each prompt."""
    steering: Steering | None
    dose: float | None


def _runs(sae: SAE, search: ConceptSearch, neutral: list[Tensor], asked: list[Tensor], max_activation: Tensor, dose: float | None,
          extra: dict[str, ExtraCondition]) -> dict[str, _Run]:
    """The conditions of a report by name, in the order they are reported."""
    runs = {"unsteered": _Run(neutral, None, None), "prompting": _Run(asked, None, None)}
    if dose is not None and search.steered:
        steering = concept_steering(sae, search.steered, dose, max_activation)
        runs["steering"] = _Run(neutral, steering, dose)
        runs["prompting + steering"] = _Run(asked, steering, dose)
    for name, (features, extra_dose) in extra.items():
        runs[name] = _Run(neutral, concept_steering(sae, features, extra_dose, max_activation), extra_dose)
    return runs


@torch.no_grad()
def compare_concept(model: HookedModel, sae: SAE, search: ConceptSearch, prompts: Sequence[str], max_activation: Tensor, dose: float | None,
                    cfg: ConceptConfig | None = None, extra: dict[str, ExtraCondition] | None = None) -> list[ConceptPoint]:
    """Answers to `prompts` unsteered, prompted (`PROMPTING`), steered with the search's features at
    `dose`, prompted and steered, and under each `extra` condition (name -> (features, dose)),
    all scored the same way under the unsteered model; `max_activation` [d_sae]."""
    cfg = cfg or ConceptConfig()
    tok = model.tokenizer
    neutral = encode_prompts(tok, list(prompts), cfg.generation.chat)
    asked = encode_prompts(tok, [PROMPTING.format(prompt=p, concept=search.concept) for p in prompts], cfg.generation.chat)
    runs = _runs(sae, search, neutral, asked, max_activation, dose, extra or {})
    feature_ids = [c.feature for c in search.steered] or [search.top_input.feature]
    points, base, base_frequency = [], None, 0.0
    for name, (tokens, steering, d) in tqdm(runs.items(), desc=f"conditions ({search.concept})", leave=False):
        generated = generate_tokens(model, tokens, cfg.generation, steering)
        texts = [decode(tok, g) for g in generated]
        lex = lexicon_scores(texts, search.lexicon)
        fluency = generation_fluency(model, tokens, generated)
        base = base or fluency
        frequency = float(lex.present.float().mean())
        base_frequency = frequency if name == "unsteered" else base_frequency
        points.append(ConceptPoint(
            name, d, frequency, float(lex.rate.mean()),
            float(feature_readout(model, sae, feature_ids, generated, max_activation, threshold=0.25).present.float().mean()),
            fluency.perplexity, generation_fluency(model, asked, generated).perplexity, fluency.repetition,
            within_budget(fluency, base, cfg.budget), frequency / max(base_frequency, 1 / len(prompts)), texts))
    return points


__all__ = ["ConceptPoint", "ExtraCondition", "compare_concept"]
