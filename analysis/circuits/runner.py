"""Run a model's residual stream from one point to another, with gradients: the embedding, a
span of blocks, the final norm and unembedding, as separate calls. A feature graph needs this
to push many rows through only the few blocks between two SAEs of a stack.

Two layouts are supported: a `TransformerBridge` over a Hugging Face Llama-family model
(SmolLM2, Llama, Qwen2, Mistral: `model.layers` with rotary position embeddings), and a
TransformerLens `HookedTransformer`. `tests/test_circuits.py` checks that the pieces compose
to the model's own hook values and logits.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from activations.model import HookedModel, hf_model_of


class _Positions(NamedTuple):
    """What a Hugging Face decoder layer needs beside the residual, for one prompt length."""

    ids: Tensor
    """[1 pos] position ids."""
    cos_sin: tuple[Tensor, Tensor]
    """The rotary embedding's cos and sin [1 pos head_dim]."""
    mask: Tensor
    """[1 1 pos pos] additive causal mask."""


class ResidualRunner:
    """resid [batch pos d_model] at "after `start` blocks" -> after `stop` blocks, or -> logits."""

    def __init__(self, model: HookedModel) -> None:
        self.model = model
        hf = hf_model_of(model)
        base = getattr(hf, "model", None) if hf is not None else None
        if base is not None and hasattr(base, "layers") and hasattr(base, "rotary_emb") and hasattr(base, "embed_tokens"):
            self.kind, self.hf, self.base = "hf", hf, base
        elif hasattr(model, "blocks") and hasattr(model, "unembed") and hasattr(model, "input_to_embed"):
            self.kind = "tl"
        else:
            inner = type(hf).__name__ if hf is not None else "no HF model"
            raise NotImplementedError(f"no residual runner for {type(model).__name__} ({inner}): "
                                      "feature graphs support Llama-family Hugging Face models and TransformerLens HookedTransformers")
        self.n_layers = int(model.cfg.n_layers)
        self._positions: dict[tuple, _Positions] = {}

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [batch pos] -> the residual stream before block 0 [batch pos d_model]."""
        if self.kind == "hf":
            return self.base.embed_tokens(tokens)
        return self.model.input_to_embed(tokens)[0]

    def _rotary(self, resid: Tensor) -> _Positions:
        key = (resid.shape[1], resid.dtype, resid.device)
        if key not in self._positions:
            n_pos = resid.shape[1]
            position_ids = torch.arange(n_pos, device=resid.device)[None]
            cos_sin = self.base.rotary_emb(resid[:1], position_ids=position_ids)
            # an additive causal mask works for both eager and SDPA attention
            mask = torch.full((n_pos, n_pos), torch.finfo(resid.dtype).min, device=resid.device, dtype=resid.dtype).triu(1)[None, None]
            self._positions = {key: _Positions(position_ids, cos_sin, mask)}
        return self._positions[key]

    def blocks(self, resid: Tensor, start: int, stop: int) -> Tensor:
        """resid [batch pos d_model] after `start` blocks -> after `stop` blocks."""
        if not 0 <= start <= stop <= self.n_layers:
            raise ValueError(f"blocks {start}..{stop} outside the model's {self.n_layers}")
        if self.kind == "tl":
            for block in self.model.blocks[start:stop]:
                resid = block(resid)
            return resid
        if start == stop:
            return resid
        positions = self._rotary(resid)
        batch_mask = positions.mask.expand(resid.shape[0], 1, -1, -1)
        for layer in self.base.layers[start:stop]:
            out = layer(resid, attention_mask=batch_mask, position_ids=positions.ids, position_embeddings=positions.cos_sin,
                        use_cache=False)
            resid = out[0] if isinstance(out, tuple) else out
        return resid

    def walk(self, tokens: Tensor, depths: list[int]) -> Iterator[Tensor]:
        """tokens [batch pos] -> the embedding, then the residual after each entry of `depths`
        (ascending numbers of blocks): the read-only pass through a stack. Yields [batch pos d_model]."""
        resid = self.embed(tokens)
        yield resid
        start = 0
        for depth in depths:
            resid = self.blocks(resid, start, depth)
            start = depth
            yield resid

    def logits(self, resid: Tensor) -> Tensor:
        """The final residual [batch pos d_model] -> logits [batch pos d_vocab]."""
        if self.kind == "tl":
            return self.model.unembed(self.model.ln_final(resid))
        return self.hf.lm_head(self.base.norm(resid))
