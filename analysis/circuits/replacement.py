"""The local replacement model of one prompt (circuit-tracer's construction, Ameisen et al. 2025): every MLP replaced
by its skip transcoder plus an error term, attention patterns and normalisation scales frozen at the prompt's own
values. Given the transcoders' codes, what remains is linear in the residual stream, so a feature's effect on another
(an edge) is an exact product of matrices, with no gradient approximation left in it.

    replacement = ReplacementModel(model, transcoders)
    clean = replacement.clean_run(tokens)                      # the real model's forward, with what is frozen
    resid, mlp_inputs = replacement.forward(clean, injections, live=False)

Per block L, position p >= 1 (position 0, the attention sink, keeps its own MLP output: it is the same for every
prompt):

    x       <- x + o_proj(pattern_L @ v_proj(x * r1_L * w1_L))          (attention, pattern_L and r1_L frozen)
    m_in    =  x * r2_L * w2_L                                           (the MLP's input, r2_L frozen)
    mlp_out =  f_L @ W_dec + b_dec + m_in @ W_skip + error_L             (f_L = topk(m_in @ W_enc + b_enc) or frozen)
    x       <- x + mlp_out + injection_{L+1}

with r = 1 / rms the norms' frozen scales and error_L = the real MLP's output minus the transcoder's, on the clean
prompt: with every error kept the replacement reproduces the model's logits (tests/test_transcoder_graph.py). An
`injection` (batch, n_layers + 1, pos, d_model) of zeros, with gradients, is where gradients are read: index 0 is the
embedding, index L + 1 the residual after block L, where a block-L feature's decoder vector lands.

Supports Llama-family Hugging Face models (SmolLM2, Llama, Qwen2, Mistral) under a `TransformerBridge`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from activations.hooks import transcoder_hooks
from activations.model import HookedModel, hf_hooks, hf_model_of, model_mismatch
from sae import load_sae
from sae.transcoder import TRANSCODERS_FILE, SkipTranscoder, transcoder_paths


def _raw(module: nn.Module) -> nn.Module:
    """The Hugging Face module under a TransformerBridge wrapper (or the module itself)."""
    return getattr(module, "original_component", module)


@dataclass
class TranscoderSet:
    """One skip transcoder per block of a model, in block order: a full replacement of its MLPs."""

    transcoders: list[SkipTranscoder]
    paths: list[str]

    def __post_init__(self) -> None:
        for layer, tc in enumerate(self.transcoders):
            if not isinstance(tc, SkipTranscoder):
                raise ValueError(f"{self.paths[layer]} is a {tc.cfg.architecture}, not a skip transcoder")
            if (tc.cfg.hook_name, tc.cfg.hook_name_out) != transcoder_hooks(layer):
                raise ValueError(f"{self.paths[layer]} maps {tc.cfg.hook_name} -> {tc.cfg.hook_name_out}; block {layer} needs "
                                 f"{transcoder_hooks(layer)}: a replacement model needs one transcoder for every block, in order")

    def __len__(self) -> int:
        return len(self.transcoders)

    @property
    def model_name(self) -> str:
        return self.transcoders[0].cfg.model_name

    def check_model(self, model: HookedModel) -> None:
        """A clear error unless the transcoders were trained on `model` and replace each of its blocks' MLP."""
        problem = model_mismatch(self.model_name, model)
        if problem:
            raise ValueError(f"the transcoders {problem}")
        if len(self) != int(model.cfg.n_layers):
            raise ValueError(f"{len(self)} transcoders for a model of {model.cfg.n_layers} blocks: the replacement model "
                             "replaces every MLP (saewb transcoders trains them all by default)")

    def to(self, device: torch.device | str) -> TranscoderSet:
        for tc in self.transcoders:
            tc.to(device)
        return self


def load_transcoders(folder: str | Path) -> TranscoderSet:
    """The transcoders listed in <folder>/transcoders.json (or in <folder>/transcoders/transcoders.json)."""
    listed = transcoder_paths(folder)
    if list(listed) != list(range(len(listed))):
        raise ValueError(f"{folder} lists blocks {list(listed)}: a replacement model needs every block from 0")
    paths = [str(p) for p in listed.values()]
    return TranscoderSet([load_sae(p) for p in paths], paths)


@dataclass
class CleanPrompt:
    """The real model's forward on one prompt, with what the replacement freezes and what its nodes are made of."""

    tokens: Tensor
    """[pos]"""
    embed: Tensor
    """[pos d_model] the embedding (the token nodes' terms)."""
    norm_scales: Tensor
    """[n_layers 2 pos 1]: 1 / rms of the attention's and the MLP's norm inputs."""
    final_scale: Tensor
    """[pos 1]: 1 / rms of the final norm's input."""
    patterns: Tensor
    """[n_layers heads pos pos]: the attention patterns."""
    mlp_inputs: Tensor
    """[n_layers pos d_model]"""
    mlp_outputs: Tensor
    """[n_layers pos d_model] the real MLPs' outputs."""
    codes: Tensor
    """[n_layers pos d_sae] the transcoders' feature activations (0 at position 0)."""
    errors: Tensor
    """[n_layers pos d_model] the real MLP's output minus the transcoder's (at position 0: the whole output)."""
    logits: Tensor
    """[pos d_vocab] the model's logits (its own forward, not the replacement's)."""

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    def prefix(self, n: int) -> CleanPrompt:
        """The same prompt cut to its first `n` positions. The model is causal, so the replacement's values at those
        positions, and every gradient into them, are the full prompt's: a read at position p < n needs only this."""
        if n >= self.n_pos:
            return self
        return CleanPrompt(self.tokens[:n], self.embed[:n], self.norm_scales[:, :, :n], self.final_scale[:n],
                           self.patterns[:, :, :n, :n], self.mlp_inputs[:, :n], self.mlp_outputs[:, :n], self.codes[:, :n],
                           self.errors[:, :n], self.logits[:n])


class ReplacementModel:
    """The frozen local replacement of a Llama-family model's prompts by its transcoders (see the module)."""

    def __init__(self, model: HookedModel, transcoders: TranscoderSet) -> None:
        hf = hf_model_of(model)
        base = getattr(hf, "model", None) if hf is not None else None
        if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
            raise NotImplementedError(f"the transcoder replacement supports Llama-family Hugging Face models under a TransformerBridge, "
                                      f"not {type(model).__name__}")
        transcoders.check_model(model)
        self.model, self.hf, self.base, self.transcoders = model, hf, base, transcoders
        self.n_layers = len(base.layers)
        attn = _raw(base.layers[0].self_attn)
        self.n_heads, self.n_kv = int(hf.config.num_attention_heads), int(hf.config.num_key_value_heads)
        self.head_dim = int(getattr(attn, "head_dim", hf.config.hidden_size // self.n_heads))

    # ------------------------------------------------------------------ the clean forward
    def _attention(self, layer: int, x_normed: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(attention output [batch pos d_model], pattern [batch heads pos pos]) of block `layer` on its normed input."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = _raw(self.base.layers[layer].self_attn)
        b, n, _ = x_normed.shape
        q = _raw(attn.q_proj)(x_normed).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = _raw(attn.k_proj)(x_normed).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = self.base.rotary_emb(x_normed, position_ids=position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / self.head_dim ** 0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x_normed.device).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self._attend(layer, x_normed, pattern), pattern

    def _attend(self, layer: int, x_normed: Tensor, pattern: Tensor) -> Tensor:
        """o_proj(pattern @ v_proj(x_normed)): x_normed [batch pos d_model], pattern [batch|1 heads pos pos]."""
        attn = _raw(self.base.layers[layer].self_attn)
        b, n, _ = x_normed.shape
        v = _raw(attn.v_proj)(x_normed).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        z = (pattern @ v).transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim)
        return _raw(attn.o_proj)(z)

    def _norm(self, norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """(1 / rms [.. 1], the normed x) of an RMSNorm."""
        norm = _raw(norm)
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return scale, x * scale * norm.weight

    @torch.no_grad()
    def clean_run(self, tokens: Tensor) -> CleanPrompt:
        """The prompt tokens [pos] through the real model, block by block, keeping what the replacement needs."""
        device = next(self.hf.parameters()).device
        tokens = tokens.to(device)
        positions = torch.arange(len(tokens), device=device)[None]
        embed = self.base.embed_tokens(tokens[None])
        x = embed
        scales, patterns, inputs, outputs, codes, errors = [], [], [], [], [], []
        for layer in range(self.n_layers):
            block = _raw(self.base.layers[layer])
            r1, normed = self._norm(block.input_layernorm, x)
            attn_out, pattern = self._attention(layer, normed, positions)
            x = x + attn_out
            r2, m_in = self._norm(block.post_attention_layernorm, x)
            m_out = _raw(block.mlp)(m_in)
            tc = self.transcoders.transcoders[layer]
            f = tc.encode(m_in[0])
            f[0] = 0
            error = m_out[0] - (tc.decode(f) + tc.skip(m_in[0]))
            error[0] = m_out[0, 0]
            x = x + m_out
            scales.append(torch.stack([r1[0], r2[0]]))
            patterns.append(pattern[0])
            inputs.append(m_in[0])
            outputs.append(m_out[0])
            codes.append(f)
            errors.append(error)
        final_scale, normed = self._norm(self.base.norm, x)
        logits = self.hf.lm_head(normed)[0]
        return CleanPrompt(tokens, embed[0], torch.stack(scales), final_scale[0], torch.stack(patterns), torch.stack(inputs),
                           torch.stack(outputs), torch.stack(codes), torch.stack(errors), logits)

    # ------------------------------------------------------------------ the replacement
    def zero_injections(self, clean: CleanPrompt, batch: int = 1) -> Tensor:
        """Zeros [batch n_layers + 1 pos d_model] with gradients: where `forward` adds to the stream and gradients are read."""
        return torch.zeros(batch, self.n_layers + 1, clean.n_pos, clean.embed.shape[-1], device=clean.embed.device, requires_grad=True)

    def forward(self, clean: CleanPrompt, injections: Tensor, live: bool = False, stop: int | None = None,
                codes: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """The replacement on `clean`'s prompt plus `injections` [batch n_layers + 1 pos d_model]: (the residual after
        block `stop` (default: the last) [batch pos d_model], each block's MLP input [batch pos d_model]).
        `live`: the features are the transcoders' TopK code of the replacement's own MLP input (gradients through the
        active ones); otherwise `codes` [n_layers pos d_sae] (default: the clean codes), constants."""
        stop = self.n_layers if stop is None else stop
        codes = clean.codes if codes is None else codes
        x = clean.embed[None] + injections[:, 0]
        first = torch.zeros(clean.n_pos, 1, dtype=torch.bool, device=x.device)
        first[0] = True
        mlp_inputs = []
        for layer in range(stop):
            block = _raw(self.base.layers[layer])
            r1, r2 = clean.norm_scales[layer]
            x = x + self._attend(layer, x * r1 * _raw(block.input_layernorm).weight, clean.patterns[layer][None])
            m_in = x * r2 * _raw(block.post_attention_layernorm).weight
            mlp_inputs.append(m_in)
            tc = self.transcoders.transcoders[layer]
            f = tc.encode(m_in) if live else codes[layer]
            mlp = tc.decode(f) + tc.skip(m_in) + clean.errors[layer]
            mlp = torch.where(first, clean.mlp_outputs[layer], mlp)
            x = x + mlp + injections[:, layer + 1]
        return x, mlp_inputs

    def logits(self, clean: CleanPrompt, resid: Tensor) -> Tensor:
        """The final residual [batch pos d_model] -> logits [batch pos d_vocab], the final norm's scale frozen."""
        return self.hf.lm_head(resid * clean.final_scale * _raw(self.base.norm).weight)

    # ------------------------------------------------------------------ the real model, MLPs spliced
    def spliced_logits(self, tokens: Tensor, mlp_out: Callable[[int, Tensor, Tensor], Tensor]) -> Tensor:
        """The real model's logits [batch pos d_vocab] on tokens [batch pos] (attention and norms live), each block's MLP
        output replaced by mlp_out(layer, its input [batch pos d_model], its real output [batch pos d_model])."""
        inputs: dict[int, Tensor] = {}
        edits: dict[str, Callable[[Tensor], Tensor | None]] = {}
        for layer in range(self.n_layers):
            into, out = transcoder_hooks(layer)
            edits[into] = lambda a, layer=layer: inputs.__setitem__(layer, a)
            edits[out] = lambda a, layer=layer: mlp_out(layer, inputs[layer], a)
        with hf_hooks(self.model, edits):
            return self.hf(input_ids=tokens, use_cache=False).logits


__all__ = ["TRANSCODERS_FILE", "CleanPrompt", "ReplacementModel", "TranscoderSet", "load_transcoders"]
