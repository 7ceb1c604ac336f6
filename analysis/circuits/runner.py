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

import torch
from torch import Tensor, nn

from activations.model import HookedModel


class ResidualRunner:
    """resid [batch pos d_model] at "after `start` blocks" -> after `stop` blocks, or -> logits."""

    def __init__(self, model: HookedModel):
        self.model = model
        hf = getattr(model, "original_model", None)
        base = getattr(hf, "model", None) if hf is not None else None
        if base is not None and hasattr(base, "layers") and hasattr(base, "rotary_emb") and hasattr(base, "embed_tokens"):
            self.kind, self.hf, self.base = "hf", hf, base
        elif hasattr(model, "blocks") and hasattr(model, "unembed") and hasattr(model, "input_to_embed"):
            self.kind = "tl"
        else:
            raise NotImplementedError(f"no residual runner for {type(model).__name__} ({type(hf).__name__ if hf is not None else 'no HF model'}): "
                                      "feature graphs support Llama-family Hugging Face models and TransformerLens HookedTransformers")
        self.n_layers = int(model.cfg.n_layers)
        self._positions: dict[tuple, tuple] = {}

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [batch pos] -> the residual stream before block 0 [batch pos d_model]."""
        if self.kind == "hf":
            return self.base.embed_tokens(tokens)
        return self.model.input_to_embed(tokens)[0]

    def _rotary(self, resid: Tensor) -> tuple:
        key = (resid.shape[1], resid.dtype, resid.device)
        if key not in self._positions:
            n_pos = resid.shape[1]
            position_ids = torch.arange(n_pos, device=resid.device)[None]
            cos_sin = self.base.rotary_emb(resid[:1], position_ids=position_ids)
            # an additive causal mask works for both eager and SDPA attention
            mask = torch.full((n_pos, n_pos), torch.finfo(resid.dtype).min, device=resid.device, dtype=resid.dtype).triu(1)[None, None]
            self._positions = {key: (position_ids, cos_sin, mask)}
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
        position_ids, cos_sin, mask = self._rotary(resid)
        batch_mask = mask.expand(resid.shape[0], 1, -1, -1)
        for layer in self.base.layers[start:stop]:
            out = layer(resid, attention_mask=batch_mask, position_ids=position_ids, position_embeddings=cos_sin, use_cache=False)
            resid = out[0] if isinstance(out, tuple) else out
        return resid

    def walk(self, tokens: Tensor, layers: list[int]) -> Iterator[Tensor]:
        """tokens [batch pos] -> the embedding, then the residual after each entry of `layers`
        (ascending numbers of blocks): the read-only pass through a stack. Yields [batch pos d_model]."""
        resid = self.embed(tokens)
        yield resid
        start = 0
        for layer in layers:
            resid = self.blocks(resid, start, layer)
            start = layer
            yield resid

    def logits(self, resid: Tensor) -> Tensor:
        """The final residual [batch pos d_model] -> logits [batch pos d_vocab]."""
        if self.kind == "tl":
            return self.model.unembed(self.model.ln_final(resid))
        return self.hf.lm_head(self.base.norm(resid))

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())
