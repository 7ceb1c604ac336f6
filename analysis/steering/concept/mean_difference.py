"""The mean-difference baseline of concept steering (DiffMean, the strongest representation-steering
method of AxBench, Wu et al. 2025): no dictionary, one direction per concept.

    v = mean of the hook's activations on the model's answers when the prompt asks for the concept
      - mean on its answers to the same prompts unprompted

(answer tokens only, each read after its own prompt: `measure.answer_activations`). It is read
from the tuning prompts, so the report prompts decide nothing. It steers as a one-latent
dictionary (`direction_dictionary`): a `StandardSAE` whose decoder row is v / |v| and whose
input offset is the unprompted mean, so its latent reads relu(v/|v| . (x - unprompted mean)).
Steering it by "add" in "norm" units adds dose x the residual stream's typical norm along v,
exactly as the SAE features' push is scaled (`search.concept_steering`); the same dose search,
ways and report apply unchanged. It is what an SAE feature choice must beat: the features can
only approximate a direction the model's own answers give directly, but they say what they are.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from activations.generation import GenerationConfig, encode_prompts
from activations.model import MODEL_NAME_ATTR, HookedModel
from sae import make_config
from sae.base import SAE
from sae.standard import StandardSAE

from ..measure import Fluency, answer_activations, residual_norm
from .config import PROMPTING, TUNING_PROMPTS, ConceptConfig
from .dose import DoseSearch, choose_dose
from .lexicon import Lexicon
from .report import ExtraCondition
from .search import ConceptFeature, ConceptSearch

LABEL = "mean difference: answers asked for the concept less unprompted answers"


class MeanDifference(NamedTuple):
    asked: Tensor
    """[d] mean activation on the answers asked for the concept."""
    unprompted: Tensor
    """[d] mean activation on the unprompted answers."""
    max_projection: float
    """The largest projection of an asked answer's token on the unit direction, from the unprompted mean."""

    @property
    def direction(self) -> Tensor:
        """[d]: asked - unprompted."""
        return self.asked - self.unprompted


@torch.no_grad()
def mean_difference(model: HookedModel, hook_name: str, concept: str, prompts: Sequence[str],
                    generation: GenerationConfig | None = None) -> MeanDifference:
    """The mean activation [d] at `hook_name` over the answer tokens of the model's answers to
    `prompts` asking for `concept` (`PROMPTING`), less over its answers to `prompts` as they are.
    `max_projection`: the largest projection of an asked answer's token on the unit direction,
    from the unprompted mean (the one-latent dictionary's "max activation")."""
    generation = generation or GenerationConfig(chat=True)
    asked = answer_activations(model, hook_name, [PROMPTING.format(prompt=p, concept=concept) for p in prompts], generation)
    unprompted = answer_activations(model, hook_name, list(prompts), generation)

    def mean(acts: list[Tensor]) -> Tensor:
        rows = torch.cat(acts)  # [tokens, d]
        if not len(rows):
            raise ValueError("the model gave no answer tokens to average: every answer stopped at once")
        return rows.double().mean(0).float()

    asked_mean, unprompted_mean = mean(asked), mean(unprompted)
    unit = (asked_mean - unprompted_mean) / (asked_mean - unprompted_mean).norm().clamp_min(1e-12)
    projection = float(((torch.cat(asked) - unprompted_mean) @ unit).max())
    return MeanDifference(asked_mean, unprompted_mean, projection)


def direction_dictionary(difference: MeanDifference, hook_name: str, model_name: str | None = None) -> SAE:
    """A one-latent `StandardSAE` at `hook_name` whose encoder and decoder rows are the unit
    direction and whose input offset is the unprompted mean: steering it adds along the
    direction, and its latent reads how far a token lies along it."""
    direction = difference.direction.float()
    if not float(direction.norm()) > 0:
        raise ValueError("the mean difference is zero: the answers asked for the concept read the same as the others")
    unit = direction / direction.norm()
    fields = {"d_in": len(unit), "d_sae": 1, "hook_name": hook_name}
    if model_name:
        fields["model_name"] = model_name
    sae = StandardSAE(make_config("standard", **fields))
    with torch.no_grad():
        sae.W_enc.copy_(unit[:, None])
        sae.W_dec.copy_(unit[None])
        sae.b_enc.zero_()
        sae.b_dec.copy_(difference.unprompted.float())
    return sae.eval()


def mean_difference_search(model: HookedModel, hook_name: str, concept: str, lexicon: Lexicon, prompts: Sequence[str] | None = None,
                           cfg: ConceptConfig | None = None) -> tuple[SAE, ConceptSearch, Tensor]:
    """The mean-difference direction of `concept` at `hook_name`, read from `prompts` (default
    `TUNING_PROMPTS`), as (its one-latent dictionary, a `ConceptSearch` that steers its one latent
    at full weight, its max activation [1]): ready for `choose_dose` and `compare_concept`'s
    `ExtraCondition`."""
    cfg = cfg or ConceptConfig()
    prompts = list(prompts or TUNING_PROMPTS)
    difference = mean_difference(model, hook_name, concept, prompts, cfg.generation)
    sae = direction_dictionary(difference, hook_name, getattr(model, MODEL_NAME_ATTR, None))
    norm = residual_norm(model, hook_name, encode_prompts(model.tokenizer, prompts, cfg.generation.chat))
    latent = ConceptFeature(0, {}, 1.0, weight=1.0, label=LABEL)
    return sae, ConceptSearch(concept, lexicon, [latent], norm), torch.tensor([max(difference.max_projection, 1e-6)])


def mean_difference_condition(model: HookedModel, hook_name: str, concept: str, lexicon: Lexicon, prompts: Sequence[str] | None = None,
                              cfg: ConceptConfig | None = None, base: Fluency | None = None) -> tuple[DoseSearch, ExtraCondition | None]:
    """The mean-difference baseline, ready for a report: its direction read from `prompts` (default
    `TUNING_PROMPTS`), its dose chosen on them by `choose_dose` with `cfg`'s positions (always
    "add": a direction is pushed, not clamped), and the report's condition at that dose (None
    when no dose was within budget). `base`: the unsteered tuning answers' fluency, when measured."""
    cfg = replace(cfg or ConceptConfig(), mode="add")
    sae, search, max_activation = mean_difference_search(model, hook_name, concept, lexicon, prompts, cfg)
    found = choose_dose(model, sae, search, max_activation, prompts, cfg, base=base)
    condition = None if found.dose is None else ExtraCondition(search.steered, found.dose, sae, search.residual_norm, max_activation)
    return found, condition


__all__ = ["LABEL", "MeanDifference", "direction_dictionary", "mean_difference", "mean_difference_condition", "mean_difference_search"]
