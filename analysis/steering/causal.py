"""Causal check: ablating a feature where it fires should lower the log-probability of
the tokens its logit effects (W_dec[i] @ W_U, through the final norm's weight) promote."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.model import HookedModel, logits_with_edit
from sae.base import SAE

from ..encoding import encode_contexts
from ..logit_lens import logit_lens
from .interventions import Intervention, Steering, check_compatible, check_features


class CausalCheck(NamedTuple):
    feature: int
    promoted_tokens: list[int]
    """The `top_k` token ids with the largest logit effect W_dec[i] @ W_U."""
    n_positions: int
    """Positions where the feature fires (position 0 excluded) that the check averages over."""
    logprob_clean: float
    """Mean log P(next token in the promoted set) at those positions, unsteered."""
    logprob_ablated: float
    """The same with the feature ablated (error term kept)."""
    delta: float
    """logprob_ablated - logprob_clean: negative when the feature promotes those tokens."""
    control_delta: float
    """The same change for a random token set of the same size (seeded): the baseline."""
    fraction_lowered: float
    """Share of the positions where ablation lowered the promoted set's probability."""


@torch.no_grad()
def causal_check(model: HookedModel, sae: SAE, feature: int, tokens: Tensor, top_k: int = 10, max_contexts: int = 32, batch_size: int = 8,
                 seed: int = 0) -> CausalCheck:
    """Ablate `feature` and measure, at the positions where it fires, how the log-probability
    of the tokens its logit effects promote changes. `tokens` [n_contexts, pos] are first read
    up to the hook only; the full clean and ablated passes run on at most `max_contexts` of
    the contexts where the feature fires."""
    (feature,) = check_features([feature], sae.cfg.d_sae)  # a negative id must not wrap around to another feature
    check_compatible(model, sae)
    device = next(model.parameters()).device
    sae = sae.to(device)
    hook = sae.cfg.hook_name
    effects = logit_lens(sae, model, [feature])[0]  # [d_vocab] logit effects as the atlas reads them
    promoted = effects.topk(top_k).indices
    control = torch.randperm(effects.numel(), generator=torch.Generator().manual_seed(seed))[:top_k].to(device)

    fires = []  # [n_contexts, pos] where the feature fires (position 0 never counts)
    for b in range(0, len(tokens), batch_size):
        fires.append((encode_contexts(model, sae, tokens[b:b + batch_size].to(device)).f[..., feature] > 0).cpu())
    fires = torch.cat(fires)
    chosen = fires.any(1).nonzero().squeeze(1)[:max_contexts]
    if not len(chosen):
        raise ValueError(f"feature {feature} never fires on the {tokens.numel()} tokens given; use more or other text")
    ablate = Steering(sae, Intervention(feature, "ablate"))
    clean_lp, ablated_lp, control_deltas = [], [], []
    for b in tqdm(range(0, len(chosen), batch_size), desc=f"causal check f{feature}"):
        idx = chosen[b:b + batch_size]
        batch, where = tokens[idx].to(device), fires[idx].to(device)
        clean = logits_with_edit(model, batch).float().log_softmax(-1)[where]  # [n_firing, vocab]
        ablated = logits_with_edit(model, batch, hook, ablate).float().log_softmax(-1)[where]
        clean_lp.append(clean[:, promoted].logsumexp(-1).cpu())
        ablated_lp.append(ablated[:, promoted].logsumexp(-1).cpu())
        control_deltas.append((ablated[:, control].logsumexp(-1) - clean[:, control].logsumexp(-1)).cpu())
    c, a = torch.cat(clean_lp), torch.cat(ablated_lp)
    return CausalCheck(feature, promoted.tolist(), len(c), float(c.mean()), float(a.mean()), float((a - c).mean()),
                       float(torch.cat(control_deltas).mean()), float((a < c).float().mean()))


__all__ = ["CausalCheck", "causal_check"]
