"""The report of concept steering: answers to neutral prompts unsteered, prompted, steered and
both, each scored by the lexicon, the steered features' readout and fluency, all under the
unsteered model, and all the same way:

* **concept score**: the share of answers with a lexicon word, never counting the words of the
  request itself (`Lexicon.without_request`), so a prompted answer that only echoes "talk
  about the sea" scores nothing; the share with any lexicon word is kept beside it;
* **fluency (fair)**: perplexity of every condition's answers given the prompt that *asks* for
  the concept, so an on-topic answer is not charged for its topic and an off-topic one is; and
  the repetition of every answer (one too short to judge counts as 1), held to the budget from
  `repetition_floor`;
* **today's verdict**, beside it: perplexity given each condition's own prompt (steered answers
  after the neutral prompt), without the repetition floor;
* **how surely the prompts decide it**: the share of paired bootstrap resamples of the prompts in
  which the fair verdict holds (`dose.paired_confidence`), since one or two looping answers can
  carry the repetition budget's edge.
"""
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
from ..measure import AnswerFluency, Fluency, answer_fluency, feature_readout, generation_fluency, share
from .config import PROMPTING, REQUEST, ConceptConfig
from .dose import concept_ratio, paired_confidence, within_budget
from .lexicon import lexicon_scores
from .search import ConceptFeature, ConceptSearch, concept_steering


@dataclass
class ConceptPoint:
    condition: str
    """"unsteered", "prompting", "steering", "prompting + steering", or another named condition."""
    dose: float | None
    lexicon_frequency: float
    """Share of answers with a lexicon word other than the request's own words: the concept score."""
    lexicon_frequency_any_word: float
    """Share of answers with any lexicon word, the request's words included (echoes count)."""
    lexicon_rate: float
    """Mean lexicon words (request's words excluded) per word."""
    feature_frequency: float
    """Share of answers on which a steered feature, re-read by the unsteered model, exceeds 0.25x its max."""
    perplexity: float
    """Under the unsteered model, given the prompt that asks for the concept (every condition alike)."""
    perplexity_given_own_prompt: float
    """Given the prompt the answer was generated from (the neutral one unless prompted): today's verdict's figure."""
    repetition: float
    """Mean repeated-trigram rate, every answer counted (too short to judge: 1)."""
    within_budget: bool
    """The fair verdict: perplexity given the concept prompt and repetition (from the floor) both
    within the budget of the unsteered answers', scored the same way."""
    within_budget_own_prompt: bool
    """Today's verdict: perplexity given the condition's own prompt and repetition, without the floor."""
    ratio: float
    """lexicon_frequency over the unsteered one (a zero counted as one answer: a lower bound)."""
    ratio_any_word: float
    """lexicon_frequency_any_word over the unsteered one, likewise: the second echo rule's ratio. An answer to a
    neutral prompt was not asked for the concept, so there its own word is no echo."""
    texts: list[str]
    budget_confidence: float = float("nan")
    """Share of paired bootstrap resamples of the prompts (this condition's and the unsteered answers drawn by the same
    prompts) in which the fair verdict is within budget (`dose.paired_confidence`)."""
    confidence_5x: float = float("nan")
    """Share of those resamples in which it is within budget and at >= 5x the unsteered concept frequency."""
    within_budget_pooled: bool | None = None
    """A second verdict: as `within_budget`, with the repetition budget 2x the unsteered rate pooled over these prompts'
    unsteered answers and the `reference` ones (other neutral prompts: the tuning prompts'), so that one or two loops
    in the report's own unsteered answers do not set it. None without a reference."""


class ExtraCondition(NamedTuple):
    """A further steered condition of a report: other features at their own dose, of the report's
    SAE or of another dictionary at the same hook (e.g. `mean_difference.direction_dictionary`)."""

    features: Sequence[ConceptFeature]
    dose: float
    sae: SAE | None = None
    """The dictionary the features belong to (None: the report's SAE)."""
    residual_norm: float | None = None
    """The unit of its "add" doses (None: the report's search's)."""
    max_activation: Tensor | None = None
    """Its features' max activations [d_sae] (None: the report's)."""


class _Run(NamedTuple):
    prompts: list[Tensor]
    """Token ids [len] of each prompt."""
    steering: Steering | None
    dose: float | None


def _runs(sae: SAE, search: ConceptSearch, neutral: list[Tensor], asked: list[Tensor], max_activation: Tensor, dose: float | None,
          cfg: ConceptConfig, extra: dict[str, ExtraCondition]) -> dict[str, _Run]:
    """The conditions of a report by name, in the order they are reported."""
    runs = {"unsteered": _Run(neutral, None, None), "prompting": _Run(asked, None, None)}
    if dose is not None and search.steered:
        steering = concept_steering(sae, search.steered, dose, max_activation, cfg, search.residual_norm)
        runs["steering"] = _Run(neutral, steering, dose)
        runs["prompting + steering"] = _Run(asked, steering, dose)
    for name, condition in extra.items():
        steering = concept_steering(condition.sae or sae, condition.features, condition.dose,
                                    max_activation if condition.max_activation is None else condition.max_activation, cfg,
                                    search.residual_norm if condition.residual_norm is None else condition.residual_norm)
        runs[name] = _Run(neutral, steering, condition.dose)
    return runs


def _pooled(base: Fluency, n: int, reference_repetition: float, n_reference: int) -> float:
    """The mean repetition of `n` unsteered answers (`base`) and `n_reference` others (mean `reference_repetition`) together."""
    if n_reference < 0 or not reference_repetition >= 0:
        raise ValueError(f"a reference is (mean repetition >= 0, answers >= 0), got ({reference_repetition}, {n_reference})")
    return (base.repetition * n + reference_repetition * n_reference) / (n + n_reference)


@torch.no_grad()
def compare_concept(model: HookedModel, sae: SAE, search: ConceptSearch, prompts: Sequence[str], max_activation: Tensor, dose: float | None,
                    cfg: ConceptConfig | None = None, extra: dict[str, ExtraCondition] | None = None,
                    reference: tuple[float, int] | None = None) -> list[ConceptPoint]:
    """Answers to `prompts` unsteered, prompted (`PROMPTING`), steered with the search's features at
    `dose`, prompted and steered, and under each `extra` condition (name -> `ExtraCondition`),
    all scored the same way under the unsteered model; `max_activation` [d_sae]. `reference`: (mean
    repetition, number) of unsteered answers to other neutral prompts (e.g. the dose search's
    `DoseSearch.base.repetition` and its prompt count), pooled with these prompts' unsteered answers
    for the second verdict, `ConceptPoint.within_budget_pooled`."""
    cfg = cfg or ConceptConfig()
    tok = model.tokenizer
    neutral = encode_prompts(tok, list(prompts), cfg.generation.chat)
    asked = encode_prompts(tok, [PROMPTING.format(prompt=p, concept=search.concept) for p in prompts], cfg.generation.chat)
    echo_free = search.lexicon.without_request(REQUEST.format(concept=search.concept))
    runs = _runs(sae, search, neutral, asked, max_activation, dose, cfg, extra or {})
    feature_ids = [c.feature for c in search.steered] or [search.top_input.feature]
    points: list[ConceptPoint] = []
    base: Fluency | None = None
    base_own: Fluency | None = None
    base_answers: AnswerFluency | None = None
    base_present = torch.zeros(0, dtype=torch.bool)
    base_frequency = base_any_word = 0.0
    for name, (tokens, steering, d) in tqdm(runs.items(), desc=f"conditions ({search.concept})", leave=False):
        generated = generate_tokens(model, tokens, cfg.generation, steering)
        texts = [decode(tok, g) for g in generated]
        lex = lexicon_scores(texts, echo_free)
        answers = answer_fluency(model, asked, generated)
        fluency = answers.aggregate()
        own = fluency if tokens is asked else generation_fluency(model, tokens, generated)
        base, base_own, base_answers = base or fluency, base_own or own, base_answers or answers
        frequency, any_word = share(lex.present), share(lexicon_scores(texts, search.lexicon).present)
        if name == "unsteered":
            base_frequency, base_any_word, base_present = frequency, any_word, lex.present
        sure = paired_confidence(answers, base_answers, cfg.budget, cfg.repetition_floor, lex.present, base_present)
        pooled = None if reference is None else within_budget(fluency, base._replace(repetition=_pooled(base, len(prompts), *reference)),
                                                              cfg.budget, cfg.repetition_floor)
        points.append(ConceptPoint(
            name, d, frequency, any_word, float(lex.rate.mean()),
            share(feature_readout(model, sae, feature_ids, generated, max_activation, threshold=0.25).present),
            fluency.perplexity, own.perplexity, fluency.repetition,
            within_budget(fluency, base, cfg.budget, cfg.repetition_floor), within_budget(own, base_own, cfg.budget),
            concept_ratio(frequency, base_frequency, len(prompts)), concept_ratio(any_word, base_any_word, len(prompts)), texts,
            sure.within_budget, sure.meets_ratio, pooled))
    return points


__all__ = ["ConceptPoint", "ExtraCondition", "compare_concept"]
