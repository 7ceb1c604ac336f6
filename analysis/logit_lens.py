"""The logit lens of SAE features: what each decoder row writes to the logits, read through
the final norm's scale and the unembedding (`W_dec[i] @ W_U`, after the final norm
when the model folds it). The one home of this rule: the atlas's logit effects and concept
steering's output-side scores both call it."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from activations.model import HookedModel, unembedding
from sae.base import SAE


@torch.no_grad()
def logit_lens(sae: SAE, model: HookedModel, features: Sequence[int] | Tensor | slice | None = None) -> Tensor:
    """Logit effects [n_features d_vocab] of the decoder rows `features` (all when None)
    through the final norm's scale (its per-token normalisation does not change directions)."""
    W_U, scale = unembedding(model)  # [d_model d_vocab], [d_model] or None
    rows = sae.W_dec.detach() if features is None else sae.W_dec.detach()[features if isinstance(features, slice) else list(features)]
    rows = rows.to(W_U.device, W_U.dtype)
    return (rows if scale is None else rows * scale) @ W_U


__all__ = ["logit_lens"]
