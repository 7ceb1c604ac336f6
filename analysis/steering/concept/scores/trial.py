"""The trial score: each of the most promising candidates steered alone, the way it will be
used (the search's mode, positions and a fixed trial dose), in short answers to a few tuning
prompts; the score is the share of answers that show the concept (a lexicon word, the
request's words not counted) without looping. It measures the feature where it is used, over
every generated position, not at the first answer token only, and it decides which candidates
are steered (`STEERED_BY`) and their weights."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.generation import GenerationConfig, decode, encode_prompts, generate_tokens
from analysis.evaluation.metrics import answer_repetition

from ...interventions import Intervention, Steering
from ...measure import share
from ..config import REQUEST
from ..lexicon import lexicon_scores
from .base import CandidateInputs, CandidateScore, register
from .logit_lens_z import lexicon_logit_z
from .output import amplified

LOOPING = 0.2
"""An answer repeating more than this share of its trigrams does not count for the concept."""


def trial_order(gain: Tensor, logit_z: Tensor, n: int) -> list[int]:
    """Indices of the `n` candidates to try: the best half by concept gain [c], then the best by
    logit-lens push [c] not already taken."""
    order = list(dict.fromkeys(gain.argsort(descending=True)[:max(1, n // 2)].tolist()))
    for i in logit_z.argsort(descending=True).tolist():
        if len(order) >= n:
            break
        if i not in order:
            order.append(i)
    return order


def trial_steering(inputs: CandidateInputs, feature: int) -> Steering:
    """The steering of one candidate alone at the trial dose, in the search's mode and positions."""
    cfg, sae = inputs.cfg, inputs.sae
    dose = cfg.dose_of_trial
    if cfg.mode == "add":
        return Steering(sae, Intervention(feature, "add", dose, "norm"), inputs.atlas.max_activation, inputs.residual_norm, cfg.positions)
    return Steering(sae, Intervention(feature, cfg.mode, dose), inputs.atlas.max_activation, positions=cfg.positions)


@register
class TrialScore(CandidateScore):
    """Share of short steered answers that show the concept without looping, over the unsteered
    answers' share (the best few candidates only; NaN for the others). Decides the steered features."""

    name = "trial"
    rank = 70
    header = "trial"
    spec = ".2f"

    def score(self, inputs: CandidateInputs, features: Sequence[int] | None) -> Tensor:
        if features is None:
            raise ValueError("the trial score is measured for candidates only")
        features = list(features)
        out = torch.full((len(features),), float("nan"))
        if inputs.lexicon is None or not features:
            return out
        gain = amplified(inputs, features).concept_gain
        logit_z = lexicon_logit_z(inputs.sae, inputs.model, inputs.concept_ids)[features]
        tok = inputs.model.tokenizer
        cfg = inputs.cfg
        prompts = encode_prompts(tok, inputs.prompts[:cfg.trial_prompts], cfg.generation.chat)
        generation = GenerationConfig(**{**vars(cfg.generation), "max_new_tokens": cfg.trial_tokens})
        lexicon = inputs.lexicon.without_request(REQUEST.format(concept=inputs.concept))

        def shows_concept(generated: list[Tensor]) -> float:
            shows = lexicon_scores([decode(tok, g) for g in generated], lexicon).present
            fluent = torch.tensor([answer_repetition(g.tolist()) <= LOOPING for g in generated])
            return share(shows & fluent)

        unsteered = shows_concept(generate_tokens(inputs.model, prompts, generation))
        for i in tqdm(trial_order(gain, logit_z, cfg.n_trials), desc="trials", leave=False):
            out[i] = shows_concept(generate_tokens(inputs.model, prompts, generation, trial_steering(inputs, features[i]))) - unsteered
        return out


__all__ = ["LOOPING", "TrialScore", "trial_order", "trial_steering"]
