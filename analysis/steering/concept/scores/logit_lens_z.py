"""The logit-lens side, before any forward pass: how far above its average logit effect a
feature's decoder row pushes the lexicon's tokens."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from activations.model import HookedModel, unembedding
from sae.base import SAE

from .base import CandidateInputs, CandidateScore, of_features, register


def lexicon_logit_z(sae: SAE, model: HookedModel, token_ids: Sequence[int]) -> Tensor:
    """[d_sae] how far above its average logit effect each feature pushes the lexicon's
    tokens, in standard deviations of its effects over the vocabulary (the logit-lens side,
    before any forward pass)."""
    W_U, scale = unembedding(model)
    W_U = W_U.float() if scale is None else (W_U.float() * scale.float()[:, None])
    mean_all = W_U.mean(1)  # [d_model]
    cov = torch.cov(W_U)  # [d_model, d_model]: the variance of d @ W_U over tokens is d C d
    mean_lex = W_U[:, list(token_ids)].mean(1)
    w_dec = sae.W_dec.detach().float().to(W_U.device)
    std = ((w_dec @ cov) * w_dec).sum(1).clamp_min(1e-12).sqrt()
    return ((w_dec @ (mean_lex - mean_all)) / std).cpu()


@register
class LogitLensZ(CandidateScore):
    """Logit-lens push on the lexicon's tokens, in standard deviations (proposes candidates;
    not a part of the ranking: the concept gain measures the same push through the model)."""

    name = "logit_z"
    rank = 40
    header = "logit z"
    spec = "+.2f"
    proposes = True

    def score(self, inputs: CandidateInputs, features: Sequence[int] | None) -> Tensor:
        return of_features(lexicon_logit_z(inputs.sae, inputs.model, inputs.concept_ids), features)


__all__ = ["LogitLensZ", "lexicon_logit_z"]
