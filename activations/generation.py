"""Text generation from a TransformerLens model, greedy or seeded sampling, with the KV
cache on Hugging Face models (left padding, explicit position ids) and TransformerLens'
own cache on HookedTransformer. An `edit` (e.g. `analysis.steering.Steering`) is attached
for the whole generation, so every forward pass, generated tokens included, sees it."""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from .corpus import boundary_token_id
from .model import HookedModel, cache_kwarg, hf_model_of, hook_module

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Edit(Protocol):
    """Something that edits one hook's activations while attached (`analysis.steering.Steering`).
    If it has `generating(prompt_lengths)`, a context manager, each batch is decoded inside it,
    so the edit can tell prompt positions from generated ones."""

    hook_name: str

    def attached(self, model: HookedModel) -> AbstractContextManager: ...


@dataclass
class GenerationConfig:
    max_new_tokens: int = 40
    """Tokens generated per prompt (fewer where a stop token ends a row)."""
    temperature: float = 0.0
    """0: greedy decoding; > 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    seed: int = 0
    """Seed of the sampling generator; every `generate_tokens` call starts from it, so the
    steered and unsteered runs of a comparison draw the same random numbers."""
    chat: bool = False
    """Wrap each prompt as a user turn of the tokenizer's chat template (else: BOS + prompt)."""
    use_cache: bool = True
    """Reuse keys/values between steps (same tokens as recomputing; much faster)."""
    batch_size: int = 16
    """Prompts decoded together (left-padded on Hugging Face models)."""
    stop_at_eos: bool = True
    """End a row at the tokenizer's end-of-text / end-of-turn tokens (not included in the output)."""

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], chat: bool = False) -> list[Tensor]:
    """Token ids [len] per prompt. Plain prompts start with the corpus' context-start token
    (`<|endoftext|>` on SmolLM2, as every training context does); chat prompts are the user
    turn of the tokenizer's chat template with the assistant turn opened."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use plain prompts (chat=False)")
    out = []
    for prompt in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = [boundary_token_id(tokenizer)] + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def decode(tokenizer: PreTrainedTokenizerBase, tokens: Tensor) -> str:
    """Text of the token ids tokens [n_new] (a generation), special tokens dropped."""
    return tokenizer.decode(tokens.tolist(), skip_special_tokens=True)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-text and end-of-turn tokens that end a generation."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {vocab.get(t) for t in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>")}
    return sorted(int(i) for i in ids if i is not None)


def _sample(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator) -> Tensor:
    """Next token [batch] from logits [batch, vocab]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / cfg.temperature).softmax(-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p  # keep tokens until top_p is reached
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Decoder:
    """Shared decoding loop; subclasses provide one forward step on either backend."""

    def __init__(self, cfg: GenerationConfig, generator: torch.Generator, stop: Tensor, pad: int):
        self.cfg, self.generator, self.stop, self.pad = cfg, generator, stop, pad

    def run(self, prompts: list[Tensor]) -> list[Tensor]:
        """New tokens [n_new] per prompt [len], cut before the first stop token."""
        cfg = self.cfg
        self.start(prompts)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.stop.device)
        new = []
        for _ in range(cfg.max_new_tokens):
            token = _sample(self.step(), cfg, self.generator)
            if cfg.stop_at_eos:
                token = torch.where(done, torch.full_like(token, self.pad), token)
                done |= torch.isin(token, self.stop)
            new.append(token)
            self.append(token)
            if cfg.stop_at_eos and bool(done.all()):
                break
        tokens = torch.stack(new, 1).cpu()
        out = []
        for row in tokens:
            stops = torch.isin(row, self.stop.cpu()).nonzero() if cfg.stop_at_eos else []
            out.append(row[: int(stops[0])] if len(stops) else row)
        return out


class _HFDecoder(_Decoder):
    """Hugging Face model (under a TransformerBridge): left padding, explicit position ids
    and an HF DynamicCache."""

    def __init__(self, hf_model, *args):
        super().__init__(*args)
        self.model = hf_model

    def start(self, prompts: list[Tensor]) -> None:
        """Left-pad prompts [len] into ids [batch, pos]; each row's positions count from its first real token."""
        device = self.stop.device
        n = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), n), self.pad, dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.ids)
        for r, p in enumerate(prompts):
            self.ids[r, n - len(p):] = p.to(device)
            self.mask[r, n - len(p):] = 1
        self.pos = (self.mask.cumsum(-1) - 1).clamp_min(0)  # first real token at position 0
        self.feed_ids, self.feed_pos = self.ids, self.pos
        if self.cfg.use_cache:
            from transformers import DynamicCache

            self.cache = DynamicCache()
        else:
            self.cache = None

    def step(self) -> Tensor:
        """Next-token logits [batch, d_vocab]."""
        out = self.model(input_ids=self.feed_ids, attention_mask=self.mask, position_ids=self.feed_pos,
                         use_cache=self.cache is not None, logits_to_keep=1, **{cache_kwarg(self.model): self.cache})
        return out.logits[:, -1]

    def append(self, token: Tensor) -> None:
        """Extend every row by token [batch]."""
        next_pos = self.pos[:, -1:] + 1
        self.ids = torch.cat([self.ids, token[:, None]], 1)
        self.mask = torch.cat([self.mask, torch.ones_like(token[:, None])], 1)
        self.pos = torch.cat([self.pos, next_pos], 1)
        self.feed_ids, self.feed_pos = (token[:, None], next_pos) if self.cache is not None else (self.ids, self.pos)


class _TLDecoder(_Decoder):
    """TransformerLens model on prompts of equal length: HookedTransformer with its own KV
    cache, other models (a bridge steered at a hook without an HF fast path) by recomputing."""

    def __init__(self, model: HookedModel, *args):
        super().__init__(*args)
        self.model = model

    def start(self, prompts: list[Tensor]) -> None:
        """Stack prompts [len] (all of one length) into ids [batch, pos]."""
        from transformer_lens import HookedTransformer
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        self.ids = torch.stack(prompts).to(self.stop.device)
        self.hooked = isinstance(self.model, HookedTransformer)
        self.cache = None
        if self.cfg.use_cache and self.hooked:
            self.cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.stop.device, len(prompts))
        self.feed = self.ids

    def step(self) -> Tensor:
        """Next-token logits [batch, d_vocab]."""
        if self.hooked:  # an explicit all-ones mask: the tokenizer's pad id may equal BOS
            return self.model(self.feed, attention_mask=torch.ones_like(self.feed), past_kv_cache=self.cache)[:, -1]
        return self.model(self.feed)[:, -1]

    def append(self, token: Tensor) -> None:
        """Extend every row by token [batch]."""
        self.ids = torch.cat([self.ids, token[:, None]], 1)
        self.feed = token[:, None] if self.cache is not None else self.ids


@torch.no_grad()
def generate_tokens(model: HookedModel, prompts: Sequence[Tensor], cfg: GenerationConfig | None = None, edit: Edit | None = None) -> list[Tensor]:
    """Continue each prompt (token ids [len]); returns the new token ids [n_new] per prompt,
    with `edit` (e.g. an `analysis.steering.Steering`) attached to every forward pass when
    given. Greedy or seeded sampling per `cfg`."""
    cfg = cfg or GenerationConfig()
    device = next(model.parameters()).device
    tokenizer = model.tokenizer
    stop = torch.tensor(stop_token_ids(tokenizer), device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else boundary_token_id(tokenizer)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    hf = hf_model_of(model) is not None and (edit is None or hook_module(model, edit.hook_name) is not None)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if hf:
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    else:  # no padding on this path: batch prompts of equal length
        batches = []
        for i in order:
            if batches and len(prompts[batches[-1][0]]) == len(prompts[i]) and len(batches[-1]) < cfg.batch_size:
                batches[-1].append(i)
            else:
                batches.append([i])
    results: list[Tensor | None] = [None] * len(prompts)
    with ExitStack() as stack:
        if edit is not None:
            stack.enter_context(edit.attached(model))
        for batch in batches:
            decoder = (_HFDecoder(hf_model_of(model), cfg, generator, stop, pad) if hf else _TLDecoder(model, cfg, generator, stop, pad))
            lengths = [len(prompts[i]) for i in batch]
            with edit.generating(lengths) if hasattr(edit, "generating") else nullcontext():
                for i, tokens in zip(batch, decoder.run([prompts[i] for i in batch])):
                    results[i] = tokens
    return results
