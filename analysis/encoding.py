"""Read a model's activations at an SAE's hook and encode them: the one place the analysis
stage runs "model to the hook, then SAE", and the one rule for the sink position.

The activations come from `HookActivations`: read from the held-out store the harvest wrote
(`saewb harvest --heldout-tokens`, which `saewb run` sets) for the contexts it holds, so each
held-out token goes through the model once for every stage, and computed by the model for
any other text.

Position 0 of every context is the BOS / attention sink. The store leaves it out by default
(`exclude_bos` in its manifest, recorded in the SAE's `training_data`), so the SAE never saw
it and its encoding means nothing there: `first_position(sae)` is where analysis starts.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor

from activations.model import HookedModel, run_to_hooks
from activations.store import ActivationStore
from sae.base import SAE

log = logging.getLogger(__name__)


def first_position(sae: SAE) -> int:
    """1 unless the SAE was trained with position 0 kept (`saewb harvest --keep-bos`)."""
    return 0 if sae.training_data.get("exclude_bos") is False else 1


class Encoded(NamedTuple):
    x: Tensor
    """Activations at the SAE's hook [batch pos d_in] (float32)."""
    f: Tensor
    """Feature activations [batch pos d_sae]; zero before `first_position(sae)`."""


class HookActivations:
    """Activations at one hook for consecutive held-out contexts: read from `store` (a held-out
    store, `activations.store.heldout_store`) for the contexts it holds, computed by `model`
    for the others. Row r of the caller's text is context `first_context + r` of the store; a
    batch whose tokens differ from the store's (the corpus changed on disk since the harvest)
    is computed by the model, with a warning, and so is every later one."""

    def __init__(self, model: HookedModel, hook: str, store: ActivationStore | None = None, first_context: int = 0,
                 autocast: str = "none", first_position: int = 1):
        if store is not None and (store.hook_name != hook or bool(store.manifest["exclude_bos"]) != (first_position == 1)):
            store = None  # another hook, or the SAE reads the position the store left out
        self.model, self.hook, self.store, self.first_context, self.autocast = model, hook, store, first_context, autocast
        self.first_position = first_position
        self.read_from_store = 0
        """Contexts served from the store so far."""

    def resolve_precision(self, autocast: str, tokens: Tensor, n_contexts: int) -> str:
        """The precision of the activations of the text's first `n_contexts` rows: the store's, when it
        holds them all (no model pass, no probe), else `autocast` resolved on tokens [batch pos], the first rows
        (`activations.precision.resolve_autocast`); kept for the model's passes."""
        if self.holds(0, n_contexts):
            self.autocast = str(self.store.manifest.get("autocast", "none"))
        else:
            from activations.precision import resolve_autocast

            self.autocast = resolve_autocast(autocast, self.model, tokens, [self.hook], self.first_position)
        return self.autocast

    def held(self, n_contexts: int) -> int:
        """How many of the first `n_contexts` rows the store holds."""
        return 0 if self.store is None else max(0, min(n_contexts, self.store.n_contexts - self.first_context))

    def holds(self, start: int, n: int) -> bool:
        """Whether the store holds rows `start` .. `start + n` of the text."""
        return self.store is not None and self.held(start + n) == start + n

    @torch.no_grad()
    def __call__(self, tokens: Tensor, start: int) -> Tensor:
        """Activations [batch pos d_in] float32 of rows `start` .. of the text, tokens [batch pos]."""
        device = tokens.device
        if self.holds(start, len(tokens)):
            stored_tokens, acts = self.store.contexts(self.first_context + start, len(tokens))
            if torch.equal(stored_tokens.to(device), tokens.to(stored_tokens.dtype)):
                self.read_from_store += len(tokens)
                return acts.to(device)
            log.warning("%s holds other text than the rows analysed from %d on (the corpus changed since the harvest?): "
                        "computing the activations with the model", self.store.path, start)
            self.store = None
        x = run_to_hooks(self.model, tokens, [self.hook], autocast=self.autocast)[self.hook]
        return x.reshape(*x.shape[:2], -1).float()


@torch.no_grad()
def encode_activations(sae: SAE, x: Tensor) -> Encoded:
    """Encode activations x [batch pos d_in] at the SAE's hook; features zero before `first_position(sae)`."""
    if x.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} but {sae.cfg.hook_name} has width {x.shape[-1]}")
    f = sae.encode(x)
    f[:, :first_position(sae)] = 0
    return Encoded(x, f)


@torch.no_grad()
def encode_contexts(model: HookedModel, sae: SAE, tokens: Tensor, autocast: str = "none") -> Encoded:
    """Run `model` on tokens [batch pos] up to `sae.cfg.hook_name` and encode with `sae`."""
    return encode_activations(sae, HookActivations(model, sae.cfg.hook_name, autocast=autocast)(tokens, 0))
