"""The answer side: how much more a feature fires on the model's own answers when the prompt
asks for the concept (`PROMPTING`) than on its unprompted answers: what the model represents
while it talks about the concept."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from activations.generation import GenerationConfig
from activations.model import HookedModel
from sae.base import SAE

from ...measure import answer_activations
from ..config import PROMPTING
from .base import CandidateInputs, CandidateScore, of_features, register


@torch.no_grad()
def answer_contrast(model: HookedModel, sae: SAE, concept: str, prompts: Sequence[str], max_activation: Tensor,
                    generation: GenerationConfig | None = None) -> Tensor:
    """[d_sae] mean activation (x max activation [d_sae]) of every feature on the model's answers
    to `prompts` when each asks for the concept (`PROMPTING`), less on its unprompted answers.
    Answer tokens only, each read after its own prompt (`measure.answer_activations`)."""
    generation = generation or GenerationConfig(chat=True)
    device = next(model.parameters()).device
    sae = sae.to(device)
    scale = max_activation.clamp_min(1e-12).to(device)

    def mean_on_answers(texts: list[str]) -> Tensor:
        total, count = torch.zeros(sae.cfg.d_sae, device=device), 0
        for x in answer_activations(model, sae.cfg.hook_name, texts, generation):  # [n_new, d_in] each
            total += (sae.encode(x.to(device)) / scale).sum(0)
            count += len(x)
        return (total / max(count, 1)).cpu()

    return mean_on_answers([PROMPTING.format(prompt=p, concept=concept) for p in prompts]) - mean_on_answers(list(prompts))


@register
class AnswerContrast(CandidateScore):
    """Mean activation (x max) on answers asked to talk about the concept, less on unprompted answers."""

    name = "contrast"
    rank = 30
    header = "contrast"
    spec = ".3f"
    proposes = True
    in_ranking = True

    def score(self, inputs: CandidateInputs, features: Sequence[int] | None) -> Tensor:
        contrast = answer_contrast(inputs.model, inputs.sae, inputs.concept, inputs.prompts, inputs.atlas.max_activation,
                                   inputs.cfg.generation)
        return of_features(contrast, features)


__all__ = ["AnswerContrast", "answer_contrast"]
