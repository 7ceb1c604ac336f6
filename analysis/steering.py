"""Steering: change what a model says by editing SAE features while it generates, and
measure the effect without a judge model.

Interventions act at the SAE's hook (`sae.cfg.hook_name`) on activations x [batch, pos, d_in],
with f = sae.encode(x) and W_dec[i] the decoder row of feature i:

    clamp   f_i <- v     x' = decode(f') + (x - decode(f)) = x + (v - f_i) W_dec[i]
    ablate  f_i <- 0     x' = x - f_i W_dec[i]
    add                  x' = x + alpha W_dec[i]

so the SAE's error term x - decode(f) always passes through: only the named features change,
and clamping a feature to its own current value returns x exactly. Several interventions (on
distinct features) apply together; their changes add up.

Semantics, checked by tests/test_steering.py:

* **Strengths** are in units of the feature's max observed activation (`unit="max"`, the
  default: `v = strength * max_activation[i]`, likewise `alpha`) or absolute (`unit="absolute"`).
  Max activations come from the feature atlas (`analysis.atlas.load_atlas(path).max_activation`)
  or from `feature_stats` below.
* **Every position** of every forward pass is edited, the generated tokens included, with or
  without the KV cache (the two give the same tokens) — **except absolute position 0**, the
  BOS / attention sink (`<|endoftext|>` before plain prompts, `<|im_start|>` opening the chat
  template). Its norm is far above the rest, the SAE never saw it in training (the workbench
  excludes it from the store, training and metrics), so its encoding means nothing and an edit
  there mostly disturbs the sink every later token attends to. `analysis.evaluate` leaves
  position 0 untouched when splicing for the same reason. Positions are read from the model's
  own inputs (position ids or the KV-cache length), so steps that feed one new token are steered.
* **Hooks are scoped**: `steer(model, steering)` is a context manager; everything it attaches
  is removed on exit, even when the block raises.

Measurement (no judge model), all under the *unsteered* model:

* concept score: the feature's own activation when the generated text (alone, after the BOS
  token; not the prompt, so a prompt that names the concept does not count) is re-read, and
  optionally a label predicate `predicate(tokens [batch, seq]) -> bool [batch, seq]`;
* fluency: perplexity of each generation given its prompt, and its repetition rate;
* side effects: KL(unsteered || steered) per token on neutral text;
* `sweep` over strengths -> `SweepResult`, written as JSON + standalone plotly HTML;
* `causal_check`: ablating a feature where it fires lowers the log-probability of the tokens
  its logit effects (W_dec[i] @ W_U, through the final norm's weight) promote.
"""
from __future__ import annotations

import math
import operator
import textwrap
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import boundary_token_id
from activations.model import cache_kwarg, hf_hooks, hook_module, hook_width, kv_cache_of, logits_with_edit, run_to_hooks, unembedding, validate_hook
from activations.store import atomic_write_bytes, atomic_write_json
from sae.base import SAE

from .metrics import cross_entropy, kl_per_token, repetition_rate

Mode = Literal["clamp", "add", "ablate"]
Unit = Literal["max", "absolute"]
MODES: tuple[str, ...] = ("clamp", "add", "ablate")
Predicate = Callable[[Tensor], Tensor]
"""A label predicate: token ids [batch, seq] -> bool [batch, seq], true where the label says
the feature should fire."""

NEUTRAL_PROMPTS = [
    # Everyday requests that name no particular topic, for measuring steering on "unrelated" prompts.
    "Tell me about your weekend.", "What should I do this afternoon?", "Write a short story about a robot.",
    "Give me three tips for staying healthy.", "Describe your ideal day.", "What is the capital of France?",
    "Explain how a bicycle works.", "Write a poem about the morning.", "What makes a good friend?",
    "How do I make a cup of tea?", "Tell me a fun fact.", "What is your favourite colour and why?",
    "Describe a walk in the city.", "How can I learn a new language?", "Write a letter to a neighbour.",
    "What do you think about rainy days?", "Summarise the plot of a famous novel.", "How do airplanes stay in the air?",
    "Plan a birthday party for a child.", "Why do people keep diaries?", "Describe the room you are in.",
    "What is the best way to start the morning?", "Give advice to a new student.", "Tell me about an interesting job.",
]


# ============================================================================ interventions
def _feature_id(feature) -> int:
    if isinstance(feature, bool):
        raise ValueError(f"feature id must be an integer, got {feature!r}")
    try:
        return operator.index(feature)
    except TypeError:
        raise ValueError(f"feature id must be an integer, got {feature!r}") from None


def check_features(features: Sequence[int], d_sae: int) -> list[int]:
    """`features` as ints if every one is a feature id of a `d_sae`-feature SAE (0..d_sae - 1,
    no wrap-around for negative ids); else a ValueError naming the bad ids and the range."""
    ids = [_feature_id(f) for f in features]
    out_of_range = [i for i in ids if not 0 <= i < d_sae]
    if out_of_range:
        raise ValueError(f"feature(s) {out_of_range} out of range: this SAE has {d_sae} features (ids 0..{d_sae - 1})")
    return ids


@dataclass(frozen=True)
class Intervention:
    feature: int
    """Feature (latent) id in the SAE."""
    mode: Mode = "clamp"
    """clamp: f_i <- v; add: x += alpha W_dec[i]; ablate: f_i <- 0 (strength ignored)."""
    strength: float = 1.0
    """v for clamp, alpha for add, in `unit`s."""
    unit: Unit = "max"
    """"max": multiples of the feature's max observed activation; "absolute": raw values."""

    def __post_init__(self):
        object.__setattr__(self, "feature", _feature_id(self.feature))
        if self.feature < 0:
            raise ValueError(f"feature {self.feature} is out of range: feature ids are 0 or more (and below the SAE's d_sae)")
        if self.mode not in MODES:
            raise ValueError(f"unknown steering mode {self.mode!r}: choose one of {MODES}")
        if self.unit not in ("max", "absolute"):
            raise ValueError(f"unknown strength unit {self.unit!r}: choose 'max' or 'absolute'")
        if not math.isfinite(self.strength):
            raise ValueError(f"steering strength must be finite, got {self.strength}")


class Steering:
    """Interventions on one SAE, resolved to absolute values; call it on activations at the
    SAE's hook. Attach it to a model with `steer`, or pass it as the edit of
    `activations.model.logits_with_edit` (a full forward pass from position 0)."""

    def __init__(self, sae: SAE, interventions: Intervention | Sequence[Intervention], max_activation: Tensor | None = None):
        interventions = [interventions] if isinstance(interventions, Intervention) else list(interventions)
        if not interventions:
            raise ValueError("no interventions given")
        d_sae = sae.cfg.d_sae
        if not sae.cfg.hook_name:
            raise ValueError("the SAE's config names no hook_name, so there is nowhere to steer")
        seen: set[int] = set()
        for iv in interventions:
            if not 0 <= iv.feature < d_sae:
                raise ValueError(f"feature {iv.feature} is out of range: this SAE has {d_sae} features (ids 0..{d_sae - 1})")
            if iv.feature in seen:
                raise ValueError(f"feature {iv.feature} appears in more than one intervention; give each feature once")
            seen.add(iv.feature)
        needs_max = [iv.feature for iv in interventions if iv.unit == "max" and iv.mode != "ablate"]
        if needs_max:
            if max_activation is None:
                raise ValueError(
                    f"unit='max' for feature(s) {needs_max} needs max_activation [d_sae] (the atlas' "
                    "`load_atlas(path).max_activation`, or `feature_stats(sae, model, tokens).max_activation`); "
                    "or give strengths with unit='absolute'"
                )
            if tuple(max_activation.shape) != (d_sae,):
                raise ValueError(f"max_activation has shape {tuple(max_activation.shape)}, expected ({d_sae},) for this SAE")
            never = [f for f in needs_max if not float(max_activation[f]) > 0]
            if never:
                raise ValueError(f"feature(s) {never} never fired where max_activation was measured; use unit='absolute'")

        def value(iv: Intervention) -> float:
            if iv.mode == "ablate":
                return 0.0
            return iv.strength * (float(max_activation[iv.feature]) if iv.unit == "max" else 1.0)

        self.sae = sae
        self.hook_name = sae.cfg.hook_name
        self.interventions = tuple(interventions)
        self.values = {iv.feature: value(iv) for iv in interventions}
        """Absolute value per feature: the clamp target, the added alpha, or 0 for ablation."""
        sets = [iv for iv in interventions if iv.mode != "add"]
        adds = [iv for iv in interventions if iv.mode == "add"]
        self._set_ids = torch.tensor([iv.feature for iv in sets], dtype=torch.long)
        self._set_values = torch.tensor([self.values[iv.feature] for iv in sets])
        self._add_ids = torch.tensor([iv.feature for iv in adds], dtype=torch.long)
        self._add_values = torch.tensor([self.values[iv.feature] for iv in adds])
        self.positions: Tensor | None = None
        """Absolute positions [batch or 1, pos] of the current forward pass, set by `steer`;
        None means the pass starts at position 0."""

    def __repr__(self) -> str:
        parts = ", ".join(f"{iv.mode} {iv.feature}" + ("" if iv.mode == "ablate" else f" = {self.values[iv.feature]:.3g}") for iv in self.interventions)
        return f"Steering({self.hook_name}: {parts})"

    def __call__(self, x: Tensor) -> Tensor:
        """Steered activations: x [batch, pos, d_in] (trailing dims are flattened) -> same shape and dtype."""
        shape = x.shape
        h = x.reshape(shape[0], shape[1], -1).float()
        w_dec = self.sae.W_dec
        delta = torch.zeros((), device=h.device)
        if len(self._set_ids):
            ids = self._set_ids.to(h.device)
            current = self.sae.encode(h)[..., ids]  # [batch, pos, n_set]
            delta = (self._set_values.to(h.device) - current) @ w_dec[ids].float()
        if len(self._add_ids):
            ids = self._add_ids.to(h.device)
            delta = delta + self._add_values.to(h.device) @ w_dec[ids].float()
        steered = self._steered_positions(shape[0], shape[1], h.device)  # [batch or 1, pos]
        return torch.where(steered[..., None], h + delta, h).to(x.dtype).reshape(shape)

    def _steered_positions(self, batch: int, n_pos: int, device) -> Tensor:
        pos = self.positions
        if pos is None or pos.shape[-1] != n_pos or pos.shape[0] not in (1, batch):
            pos = torch.arange(n_pos, device=device)[None]
        return pos.to(device) > 0


def check_compatible(model, sae: SAE) -> None:
    """Clear errors for a hook the model lacks, or an SAE whose d_in is not the hook's width."""
    hook = sae.cfg.hook_name
    validate_hook(model, hook)
    width = hook_width(model, hook)
    if width != sae.cfg.d_in:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} does not match {hook}, which has width {width} on this model")


def _position_reader(model):
    """(module, reader): a top-level module whose every forward call we can see, and a
    function of its (args, kwargs) giving the absolute positions [batch or 1, pos] of the call."""
    if hasattr(model, "original_model"):
        def hf_positions(args, kwargs):
            if kwargs.get("position_ids") is not None:
                return kwargs["position_ids"]
            seq = kwargs.get("input_ids", args[0] if args else None)
            seq = seq if seq is not None else kwargs.get("inputs_embeds")
            if seq is None:
                return None
            past = kv_cache_of(kwargs)
            offset = past.get_seq_length() if past is not None else 0
            return torch.arange(seq.shape[1], device=seq.device)[None] + offset
        return model.original_model.base_model, hf_positions

    def tl_positions(args, kwargs):
        seq = args[0] if args else kwargs.get("input", kwargs.get("tokens"))
        if not isinstance(seq, Tensor) or seq.dim() < 2:
            return None
        past = kwargs.get("past_kv_cache")
        offset = past[0].past_keys.shape[1] if past is not None else 0
        return torch.arange(seq.shape[1], device=seq.device)[None] + offset
    return model, tl_positions


@contextmanager
def steer(model, steering: Steering) -> Iterator[Steering]:
    """Apply `steering` to every forward pass of `model` inside the block (any entry point:
    `model(...)`, the HF model's `generate`, `generate_tokens`). Everything attached is
    removed on exit, even when the block raises.

    On a `TransformerBridge` the edit is a forward hook on the Hugging Face module behind the
    TransformerLens hook name (`activations.model.hook_module`), so HF's fast forward pass and
    KV cache work; other hooks and HookedTransformer models use TransformerLens' own hooks."""
    check_compatible(model, steering.sae)
    device = next(model.parameters()).device
    steering.sae.to(device)
    module, read = _position_reader(model)

    def pre(_module, args, kwargs):
        steering.positions = read(args, kwargs)

    def post(_module, args, kwargs, output):
        steering.positions = None

    with ExitStack() as stack:
        stack.callback(setattr, steering, "positions", None)
        for handle in (module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post, with_kwargs=True)):
            stack.callback(handle.remove)
        if hook_module(model, steering.hook_name) is not None:
            stack.enter_context(hf_hooks(model, {steering.hook_name: steering}))
        else:
            stack.enter_context(model.hooks(fwd_hooks=[(steering.hook_name, lambda act, hook: steering(act))]))
        yield steering


# ============================================================================ generation
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


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = False) -> list[Tensor]:
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


def decode(tokenizer, tokens: Tensor) -> str:
    return tokenizer.decode(tokens.tolist(), skip_special_tokens=True)


def stop_token_ids(tokenizer) -> list[int]:
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
        """New tokens per prompt (1-D each), cut before the first stop token."""
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

    def start(self, prompts):
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
        out = self.model(input_ids=self.feed_ids, attention_mask=self.mask, position_ids=self.feed_pos,
                         use_cache=self.cache is not None, logits_to_keep=1, **{cache_kwarg(self.model): self.cache})
        return out.logits[:, -1]

    def append(self, token):
        next_pos = self.pos[:, -1:] + 1
        self.ids = torch.cat([self.ids, token[:, None]], 1)
        self.mask = torch.cat([self.mask, torch.ones_like(token[:, None])], 1)
        self.pos = torch.cat([self.pos, next_pos], 1)
        self.feed_ids, self.feed_pos = (token[:, None], next_pos) if self.cache is not None else (self.ids, self.pos)


class _TLDecoder(_Decoder):
    """TransformerLens model on prompts of equal length: HookedTransformer with its own KV
    cache, other models (a bridge steered at a hook without an HF fast path) by recomputing."""

    def __init__(self, model, *args):
        super().__init__(*args)
        self.model = model

    def start(self, prompts):
        from transformer_lens import HookedTransformer
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        self.ids = torch.stack(prompts).to(self.stop.device)
        self.hooked = isinstance(self.model, HookedTransformer)
        self.cache = None
        if self.cfg.use_cache and self.hooked:
            self.cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.stop.device, len(prompts))
        self.feed = self.ids

    def step(self) -> Tensor:
        if self.hooked:  # an explicit all-ones mask: the tokenizer's pad id may equal BOS
            return self.model(self.feed, attention_mask=torch.ones_like(self.feed), past_kv_cache=self.cache)[:, -1]
        return self.model(self.feed)[:, -1]

    def append(self, token):
        self.ids = torch.cat([self.ids, token[:, None]], 1)
        self.feed = token[:, None] if self.cache is not None else self.ids


@torch.no_grad()
def generate_tokens(model, prompts: Sequence[Tensor], cfg: GenerationConfig | None = None, steering: Steering | None = None) -> list[Tensor]:
    """Continue each prompt (token ids [len]); returns the new token ids [n_new] per prompt,
    steered by `steering` when given. Greedy or seeded sampling per `cfg`."""
    cfg = cfg or GenerationConfig()
    device = next(model.parameters()).device
    tokenizer = model.tokenizer
    stop = torch.tensor(stop_token_ids(tokenizer), device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else boundary_token_id(tokenizer)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    hf = hasattr(model, "original_model") and (steering is None or hook_module(model, steering.hook_name) is not None)
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
        if steering is not None:
            stack.enter_context(steer(model, steering))
        for batch in batches:
            decoder = (_HFDecoder(model.original_model, cfg, generator, stop, pad) if hf else _TLDecoder(model, cfg, generator, stop, pad))
            for i, tokens in zip(batch, decoder.run([prompts[i] for i in batch])):
                results[i] = tokens
    return results


class SideBySide(NamedTuple):
    prompt: str
    unsteered: str
    """The unsteered model's continuation."""
    steered: str
    """The continuation with the steering applied (same seed)."""


def compare(model, prompts: Sequence[str], steering: Steering, cfg: GenerationConfig | None = None) -> list[SideBySide]:
    """Unsteered and steered continuations of each prompt, with the same decoding settings."""
    cfg = cfg or GenerationConfig()
    tokens = encode_prompts(model.tokenizer, prompts, cfg.chat)
    base = generate_tokens(model, tokens, cfg)
    steered = generate_tokens(model, tokens, cfg, steering)
    return [SideBySide(p, decode(model.tokenizer, b), decode(model.tokenizer, s)) for p, b, s in zip(prompts, base, steered)]


def format_side_by_side(rows: Sequence[SideBySide], width: int = 100, labels: tuple[str, str] = ("unsteered", "steered")) -> str:
    """Plain-text table: each prompt, then the two continuations in columns."""
    col = (width - 3) // 2
    lines = []
    for row in rows:
        lines += ["=" * width, textwrap.shorten("prompt: " + " ".join(row.prompt.split()), width), "-" * width,
                  f"{labels[0]:<{col}} | {labels[1]}"]
        left = textwrap.wrap(" ".join(row.unsteered.split()), col) or [""]
        right = textwrap.wrap(" ".join(row.steered.split()), col) or [""]
        for i in range(max(len(left), len(right))):
            lines.append(f"{left[i] if i < len(left) else '':<{col}} | {right[i] if i < len(right) else ''}")
    return "\n".join(lines)


# ============================================================================ measurement
class FeatureStats(NamedTuple):
    max_activation: Tensor
    """[d_sae] largest activation of each feature on the tokens read."""
    frequency: Tensor
    """[d_sae] share of the tokens on which each feature fires."""
    n_tokens: int
    """Tokens read (position 0 of every context excluded)."""


@torch.no_grad()
def feature_stats(sae: SAE, model, tokens: Tensor, batch_size: int = 8) -> FeatureStats:
    """Max activation and firing frequency of every feature over `tokens` [n_contexts, pos]
    (position 0 excluded), one forward pass per batch that stops after the hooked layer.
    A stand-in for the feature atlas' `max_activation` until one is built."""
    check_compatible(model, sae)
    device = next(model.parameters()).device
    sae = sae.to(device)
    hook = sae.cfg.hook_name
    top = torch.zeros(sae.cfg.d_sae, device=device)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    n = 0
    for b in tqdm(range(0, len(tokens), batch_size), desc="feature stats"):
        x = run_to_hooks(model, tokens[b:b + batch_size].to(device), [hook])[hook][:, 1:]
        f = sae.encode(x.reshape(-1, sae.cfg.d_in))
        top = torch.maximum(top, f.max(0).values)
        fires += (f > 0).sum(0)
        n += len(f)
    return FeatureStats(top.cpu(), (fires.double() / max(n, 1)).float().cpu(), n)


def _right_pad(seqs: Sequence[Tensor], pad: int) -> tuple[Tensor, Tensor]:
    """[n, max_len] ids and a bool mask of real tokens."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = True
    return ids, mask


class ConceptScores(NamedTuple):
    activation: Tensor
    """[n] mean activation of the features over the generated tokens (relative to each
    feature's max activation when one is given); NaN for an empty generation."""
    present: Tensor
    """[n] bool: some feature exceeds `threshold` on at least one generated token."""
    predicate_rate: Tensor | None
    """[n] share of generated tokens where the label predicate holds (None without one)."""


@torch.no_grad()
def concept_scores(model, sae: SAE, features: Sequence[int], generated: Sequence[Tensor], max_activation: Tensor | None = None,
                   threshold: float = 0.0, predicate: Predicate | None = None, batch_size: int = 16) -> ConceptScores:
    """How much each generation [n_new] expresses `features`: the text (after the BOS token,
    without its prompt) is re-read by the unsteered model and encoded by the SAE. With
    `max_activation`, activations and `threshold` are in units of each feature's max."""
    features = check_features(features, sae.cfg.d_sae)
    device = next(model.parameters()).device
    sae = sae.to(device)
    hook, ids = sae.cfg.hook_name, torch.tensor(list(features), dtype=torch.long)
    scale = max_activation[ids].clamp_min(1e-12) if max_activation is not None else torch.ones(len(ids))
    bos = boundary_token_id(model.tokenizer)
    act, present, pred = [], [], []
    for b in range(0, len(generated), batch_size):
        seqs = [torch.cat([torch.tensor([bos]), g.cpu()]) for g in generated[b:b + batch_size]]
        tokens, mask = _right_pad(seqs, bos)
        mask[:, 0] = False
        x = run_to_hooks(model, tokens.to(device), [hook])[hook]
        f = (sae.encode(x.reshape(*x.shape[:2], -1))[..., ids.to(device)] / scale.to(device)).cpu()  # [b, pos, n_feat]
        f = f.masked_fill(~mask[..., None], 0)
        n_tok = mask.sum(1)
        act.append(f.mean(-1).sum(1) / n_tok.clamp_min(1) + torch.where(n_tok > 0, 0.0, float("nan")))
        present.append((f > threshold).any(-1).any(-1))
        if predicate is not None:
            hits = predicate(tokens.to(device)).cpu().bool() & mask
            pred.append(hits.sum(1) / n_tok.clamp_min(1))
    return ConceptScores(torch.cat(act), torch.cat(present), torch.cat(pred) if predicate is not None else None)


@torch.no_grad()
def generation_nll(model, prompts: Sequence[Tensor], generated: Sequence[Tensor], batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """Summed negative log-likelihood [n] of each generation given its prompt under the
    unsteered model, and the number of generated tokens [n]."""
    device = next(model.parameters()).device
    pad = boundary_token_id(model.tokenizer)
    nll, counts = [], []
    for b in range(0, len(prompts), batch_size):
        seqs = [torch.cat([p.cpu(), g.cpu()]) for p, g in zip(prompts[b:b + batch_size], generated[b:b + batch_size])]
        tokens, mask = _right_pad(seqs, pad)
        is_new = torch.zeros_like(mask)
        for r, (p, g) in enumerate(zip(prompts[b:b + batch_size], generated[b:b + batch_size])):
            is_new[r, len(p):len(p) + len(g)] = True
        ce = cross_entropy(logits_with_edit(model, tokens.to(device)), tokens.to(device)).cpu()  # [b, pos-1] predicts tokens[:, 1:]
        nll.append((ce * is_new[:, 1:]).sum(1))
        counts.append(is_new.sum(1))
    return torch.cat(nll), torch.cat(counts)


@torch.no_grad()
def kl_on_text(model, steering: Steering, tokens: Tensor, batch_size: int = 8) -> float:
    """Side effects: mean KL(unsteered || steered) per predicted position on `tokens`
    [n_contexts, pos] (neutral text), position 0 (never steered) excluded."""
    check_compatible(model, steering.sae)
    device = next(model.parameters()).device
    steering.sae.to(device)
    kl = []
    for b in range(0, len(tokens), batch_size):
        batch = tokens[b:b + batch_size].to(device)
        clean = logits_with_edit(model, batch)
        steered = logits_with_edit(model, batch, steering.hook_name, steering)
        kl.append(kl_per_token(clean, steered)[:, 1:].flatten().cpu())
    return float(torch.cat(kl).mean())


# ============================================================================ dose-response sweep
@dataclass
class SweepConfig:
    features: list[int]
    """Features steered together at every strength."""
    mode: Mode = "clamp"
    strengths: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    unit: Unit = "max"
    threshold: float = 0.25
    """A generation shows the concept when a feature exceeds this (in `unit`s) on a generated token."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    n_examples: int = 3
    """Generations kept as text per strength, for the report."""

    def __post_init__(self):
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        if self.mode not in MODES:
            raise ValueError(f"unknown steering mode {self.mode!r}: choose one of {MODES}")
        if not self.features or not self.strengths:
            raise ValueError("a sweep needs at least one feature and one strength")


@dataclass
class SweepPoint:
    series: str
    """"unsteered", a steering mode, or another condition (e.g. "prompt")."""
    strength: float | None
    """In the sweep's unit; None for conditions without a strength."""
    concept_activation: float
    """Mean feature activation on the re-read generations (relative to max activation when known)."""
    concept_frequency: float
    """Share of generations where a feature exceeds the threshold on some token."""
    predicate_rate: float | None
    """Mean share of generated tokens matching the label predicate (None without one)."""
    predicate_frequency: float | None
    """Share of generations with at least one token matching the label predicate (None without one)."""
    perplexity: float
    """exp(mean NLL per generated token) under the unsteered model, given the prompts."""
    repetition: float
    """Mean repeated-trigram rate of the generations."""
    kl: float | None
    """Mean KL(unsteered || steered) per token on neutral text (None where not defined)."""
    n_generations: int
    examples: list[str]


def _nan_to_none(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def summarize(series: str, strength: float | None, tokenizer, generated: Sequence[Tensor], concept: ConceptScores,
              nll: Tensor, n_tokens: Tensor, kl: float | None, n_examples: int = 3) -> SweepPoint:
    """One point of a dose-response curve from per-generation scores."""
    reps = torch.tensor([repetition_rate(g.tolist()) for g in generated])
    total = int(n_tokens.sum())
    return SweepPoint(
        series=series, strength=strength,
        concept_activation=_nan_to_none(float(concept.activation.nanmean())),
        concept_frequency=float(concept.present.float().mean()),
        predicate_rate=None if concept.predicate_rate is None else float(concept.predicate_rate.mean()),
        predicate_frequency=None if concept.predicate_rate is None else float((concept.predicate_rate > 0).float().mean()),
        perplexity=_nan_to_none(math.exp(float(nll.sum()) / total) if total else float("nan")),
        repetition=_nan_to_none(float(reps.nanmean())), kl=_nan_to_none(kl), n_generations=len(generated),
        examples=[decode(tokenizer, g) for g in generated[:n_examples]],
    )


def score_condition(model, sae: SAE, series: str, strength: float | None, prompts: Sequence[Tensor], generated: Sequence[Tensor],
                    features: Sequence[int], max_activation: Tensor | None, threshold: float, kl: float | None,
                    predicate: Predicate | None = None, n_examples: int = 3, batch_size: int = 8) -> SweepPoint:
    """Concept, fluency and (given) side-effect scores of one set of generations."""
    concept = concept_scores(model, sae, features, generated, max_activation, threshold, predicate, batch_size)
    nll, n_tokens = generation_nll(model, prompts, generated, batch_size)
    return summarize(series, strength, model.tokenizer, generated, concept, nll, n_tokens, kl, n_examples)


@dataclass
class SweepResult:
    features: list[int]
    mode: str
    unit: str
    prompts: list[str]
    points: list[SweepPoint]
    """The unsteered baseline first, then one point per strength (and any extra conditions)."""
    neutral_text: str = ""
    """What the KL side effect was measured on (e.g. a corpus and split)."""

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(model, sae: SAE, prompts: Sequence[str], neutral_tokens: Tensor, cfg: SweepConfig, max_activation: Tensor | None = None,
          predicate: Predicate | None = None, neutral_text: str = "") -> SweepResult:
    """Dose-response: generate from `prompts` unsteered and at every strength of `cfg`,
    and score concept, fluency and side effects (KL on `neutral_tokens` [n, pos])."""
    check_features(cfg.features, sae.cfg.d_sae)  # before any generation
    check_compatible(model, sae)
    concept_max = max_activation if cfg.unit == "max" else None
    prompt_tokens = encode_prompts(model.tokenizer, prompts, cfg.generation.chat)
    score = lambda series, strength, generated, kl: score_condition(  # noqa: E731
        model, sae, series, strength, prompt_tokens, generated, cfg.features, concept_max, cfg.threshold, kl, predicate, cfg.n_examples)
    points = [score("unsteered", None, generate_tokens(model, prompt_tokens, cfg.generation), 0.0)]
    for strength in tqdm(cfg.strengths, desc=f"steering sweep ({cfg.mode})"):
        steering = Steering(sae, [Intervention(f, cfg.mode, strength, cfg.unit) for f in cfg.features], max_activation)
        generated = generate_tokens(model, prompt_tokens, cfg.generation, steering)
        points.append(score(cfg.mode, strength, generated, kl_on_text(model, steering, neutral_tokens)))
    return SweepResult(list(cfg.features), cfg.mode, cfg.unit, list(prompts), points, neutral_text)


def write_sweep(result: SweepResult, out_dir: str | Path, title: str = "Steering dose-response") -> tuple[Path, Path]:
    """Write `sweep.json` and the standalone `sweep.html` (three curves + example text)."""
    from .report import steering_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "sweep.json", out / "sweep.html"
    atomic_write_json(json_path, result.to_dict())
    atomic_write_bytes(html_path, steering_report(result, title).encode())
    return json_path, html_path


# ============================================================================ causal check
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
def causal_check(model, sae: SAE, feature: int, tokens: Tensor, top_k: int = 10, max_contexts: int = 32, batch_size: int = 8,
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
    W_U, norm_scale = unembedding(model)  # logit effects as the atlas reads them
    direction = sae.W_dec[feature].detach().to(W_U.device, W_U.dtype)
    effects = (direction if norm_scale is None else direction * norm_scale) @ W_U
    promoted = effects.topk(top_k).indices
    control = torch.randperm(effects.numel(), generator=torch.Generator().manual_seed(seed))[:top_k].to(device)

    fires = []  # [n_contexts, pos] where the feature fires (position 0 never counts)
    for b in range(0, len(tokens), batch_size):
        x = run_to_hooks(model, tokens[b:b + batch_size].to(device), [hook])[hook]
        fires.append((sae.encode(x.reshape(*x.shape[:2], -1))[..., feature] > 0).cpu())
    fires = torch.cat(fires)
    fires[:, 0] = False
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


__all__ = [
    "CausalCheck", "ConceptScores", "FeatureStats", "GenerationConfig", "Intervention", "MODES", "NEUTRAL_PROMPTS", "SideBySide", "Steering",
    "SweepConfig", "SweepPoint", "SweepResult", "causal_check", "check_compatible", "check_features", "compare", "concept_scores", "decode",
    "encode_prompts", "feature_stats", "format_side_by_side", "generate_tokens", "generation_nll", "kl_on_text",
    "score_condition", "steer", "stop_token_ids", "summarize", "sweep", "write_sweep",
]
