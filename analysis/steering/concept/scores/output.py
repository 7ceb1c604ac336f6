"""The output side, after Arad, Mueller & Belinkov 2025 ("SAEs are good for steering if you
select the right features"): each candidate is clamped to `amplify` x its max activation in one
forward pass over short chat prompts, and the next-token distribution at the start of the
answer is read. Two scores come from those passes: the output score (the mass the feature's
own logit-lens tokens gain) and the concept gain (the lexicon's gain against matched controls),
which ranks the candidates and weighs the steered ones."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import boundary_token_id
from activations.generation import encode_prompts
from activations.model import HookedModel, logits_with_edit
from sae.base import SAE

from ....logit_lens import logit_lens
from ...interventions import Intervention, Steering, check_compatible, check_features
from ...measure import right_pad
from .base import CandidateInputs, CandidateScore, register


class OutputScores(NamedTuple):
    output_score: Tensor
    """[n] Arad et al. 2025's output score at the answer's first position, the feature
    amplified: of its own top logit-lens tokens, the most probable one's probability times
    (1 - its rank / |V|), averaged over the prompts (`arad_output_score`)."""
    concept_gain: Tensor
    """[n] gain in log P(next token is a lexicon token), nats, under the same amplification,
    less the gain of control tokens as likely as the lexicon's before it (any large edit
    flattens the distribution and lifts every unlikely token; that is not the concept)."""
    delta_confidence: Tensor
    """[n] Δ token confidence (after Wang et al. 2025, arXiv 2510.03659): how much more probable
    the amplified model's most likely next token becomes than it was unamplified, averaged
    over the prompts: how much the feature moves what the model is about to say."""


def arad_output_score(logprobs: Tensor, promoted: Tensor) -> Tensor:
    """Output score [batch] from next-token log-probabilities [batch, d_vocab] under the
    amplified feature and its promoted (top logit-lens) tokens [top_k]: for the most probable
    of those tokens, (1 - rank / |V|) x its probability, rank 0 being the most likely token."""
    best = logprobs[:, promoted].max(-1)  # [batch]
    rank = (logprobs > best.values[:, None]).sum(-1)  # tokens strictly more likely
    return (1 - rank.float() / logprobs.shape[-1]) * best.values.exp()


def matched_controls(logprobs: Tensor, token_ids: Tensor) -> Tensor:
    """For each token of `token_ids`, the next-less-likely token under `logprobs` [d_vocab]
    that is not one of them (the next-more-likely at the bottom of the ranking): a control set
    with the same starting probabilities. Needs fewer tokens than half the vocabulary."""
    order = logprobs.argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    taken = set(token_ids.tolist())
    controls = []
    for r in sorted(rank[token_ids].tolist()):
        below = (q for q in range(r + 1, len(order)) if int(order[q]) not in taken)
        above = (q for q in range(r - 1, -1, -1) if int(order[q]) not in taken)  # the least likely tokens have none below
        q = next(below, None)
        q = next(above) if q is None else q
        taken.add(int(order[q]))
        controls.append(int(order[q]))
    return torch.tensor(controls, dtype=torch.long)


@torch.no_grad()
def output_scores(model: HookedModel, sae: SAE, features: Sequence[int], prompts: Sequence[Tensor], max_activation: Tensor,
                  concept_ids: Sequence[int], amplify: float = 2.0, top_k: int = 20) -> OutputScores:
    """Amplify each feature alone (clamp to `amplify` x its max activation [d_sae], every position
    but 0) in one forward pass over `prompts` (token ids [len] each, e.g. chat prompts with the
    answer opened), and read the next-token distribution at each prompt's last position."""
    features = check_features(features, sae.cfg.d_sae)
    check_compatible(model, sae)
    device = next(model.parameters()).device
    sae = sae.to(device)
    tokens, real = right_pad(prompts, boundary_token_id(model.tokenizer))  # a causal model never reads the right padding
    last = real.sum(1) - 1
    tokens, rows = tokens.to(device), torch.arange(len(prompts))

    def next_logprobs(edit: Steering | None) -> Tensor:  # [n_prompts, d_vocab]
        logits = logits_with_edit(model, tokens, sae.cfg.hook_name if edit else None, edit)
        return logits[rows, last.to(device)].float().log_softmax(-1).cpu()

    clean = next_logprobs(None)
    concept = torch.tensor(list(concept_ids), dtype=torch.long)
    control = matched_controls(clean.mean(0), concept)
    promoted = logit_lens(sae, model, features).topk(top_k, dim=-1).indices.cpu()  # [n, top_k]

    def lexicon_margin(lp: Tensor) -> Tensor:  # [n_prompts] log P(lexicon) - log P(controls)
        return lp[:, concept].logsumexp(-1) - lp[:, control].logsumexp(-1)

    clean_margin = lexicon_margin(clean)
    out, gain, confidence = [], [], []
    for f, top in zip(tqdm(features, desc="output scores", leave=False), promoted):
        lp = next_logprobs(Steering(sae, Intervention(f, "clamp", amplify), max_activation))
        out.append(float(arad_output_score(lp, top).mean()))
        gain.append(float((lexicon_margin(lp) - clean_margin).mean()))
        confidence.append(float(delta_token_confidence(clean, lp).mean()))
    return OutputScores(torch.tensor(out), torch.tensor(gain), torch.tensor(confidence))


def delta_token_confidence(clean: Tensor, steered: Tensor) -> Tensor:
    """[batch] P_steered(t) - P_clean(t) for t the steered model's most likely next token, from
    log-probabilities [batch, d_vocab] without and with the edit."""
    top = steered.argmax(-1, keepdim=True)
    return (steered.gather(-1, top).exp() - clean.gather(-1, top).exp()).squeeze(-1)


def amplified(inputs: CandidateInputs, features: Sequence[int] | None) -> OutputScores:
    """`output_scores` of `features` (every feature when None) on the search's prompts, measured
    once per search."""
    features = range(inputs.sae.cfg.d_sae) if features is None else features

    def measure() -> OutputScores:
        prompts = encode_prompts(inputs.model.tokenizer, inputs.prompts, inputs.cfg.generation.chat)
        return output_scores(inputs.model, inputs.sae, features, prompts, inputs.atlas.max_activation, inputs.concept_ids,
                             inputs.cfg.amplify, inputs.cfg.top_k)
    return inputs.shared(("output side", tuple(features)), measure)


@register
class OutputScore(CandidateScore):
    """Arad et al.'s output score: its own top logit-lens token's rank-weighted probability when the feature is amplified (shown)."""

    name = "output_score"
    rank = 50
    header = "output"
    spec = "+.4f"

    def score(self, inputs: CandidateInputs, features: Sequence[int] | None) -> Tensor:
        return amplified(inputs, features).output_score


@register
class DeltaConfidence(CandidateScore):
    """Δ token confidence: how much more probable the amplified model's top next token becomes (shown)."""

    name = "delta_confidence"
    rank = 55
    header = "dconf"
    spec = "+.3f"

    def score(self, inputs: CandidateInputs, features: Sequence[int] | None) -> Tensor:
        return amplified(inputs, features).delta_confidence


@register
class ConceptGain(CandidateScore):
    """Nats of lexicon probability gained when amplified, against matched controls."""

    name = "concept_gain"
    rank = 60
    header = "gain"
    spec = "+.2f"
    in_ranking = True

    def score(self, inputs: CandidateInputs, features: Sequence[int] | None) -> Tensor:
        return amplified(inputs, features).concept_gain


__all__ = ["ConceptGain", "DeltaConfidence", "arad_output_score", "delta_token_confidence", "OutputScore", "OutputScores", "amplified", "matched_controls", "output_scores"]
