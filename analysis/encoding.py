"""Read a model's activations at an SAE's hook and encode them: the one place the analysis
stage runs "model to the hook, then SAE", and the one rule for the sink position.

Position 0 of every context is the BOS / attention sink. The store leaves it out by default
(`exclude_bos` in its manifest, recorded in the SAE's `training_data`), so the SAE never saw
it and its encoding means nothing there: `first_position(sae)` is where analysis starts.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from activations.model import HookedModel, run_to_hooks
from sae.base import SAE


def first_position(sae: SAE) -> int:
    """1 unless the SAE was trained with position 0 kept (`saewb harvest --keep-bos`)."""
    return 0 if sae.training_data.get("exclude_bos") is False else 1


class Encoded(NamedTuple):
    x: Tensor
    """Activations at the SAE's hook [batch pos d_in] (float32)."""
    f: Tensor
    """Feature activations [batch pos d_sae]; zero before `first_position(sae)`."""


@torch.no_grad()
def encode_contexts(model: HookedModel, sae: SAE, tokens: Tensor, autocast: str = "none") -> Encoded:
    """Run `model` on tokens [batch pos] up to `sae.cfg.hook_name` and encode with `sae`."""
    hook = sae.cfg.hook_name
    x = run_to_hooks(model, tokens, [hook], autocast=autocast)[hook]
    x = x.reshape(*x.shape[:2], -1)
    if x.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} but {hook} has width {x.shape[-1]}")
    f = sae.encode(x)
    f[:, :first_position(sae)] = 0
    return Encoded(x, f)
