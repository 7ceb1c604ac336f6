"""Steering interventions: edit SAE features at the SAE's hook while the model runs.

Interventions act at the SAE's hook (`sae.cfg.hook_name`) on activations x [batch, pos, d_in],
with f = sae.encode(x) and W_dec[i] the decoder row of feature i:

    clamp           f_i <- v            x' = decode(f') + (x - decode(f)) = x + (v - f_i) W_dec[i]
    clamp_at_least  f_i <- max(f_i, v)  x' = x + relu(v - f_i) W_dec[i]   (never lowers a feature)
    ablate          f_i <- 0            x' = x - f_i W_dec[i]
    add                                 x' = x + alpha W_dec[i]

so the SAE's error term x - decode(f) always passes through: only the named features change,
and clamping a feature to its own current value returns x exactly. Several interventions (on
distinct features) apply together; their changes add up. A plain clamp pulls a feature *down*
wherever it already fires above v (say, once the concept's word is in the text); clamp_at_least
is the clamp for steering toward something.

Semantics, checked by tests/test_steering.py:

* **Strengths** are in units of the feature's max observed activation (`unit="max"`, the
  default: `v = strength * max_activation[i]`, likewise `alpha`), absolute (`unit="absolute"`),
  or of the residual stream's typical norm at the hook (`unit="norm"`: `v` or `alpha` is
  `strength * residual_norm / ||W_dec[i]||`, so the feature's decoded vector has norm
  `strength * residual_norm`; `measure.residual_norm` measures it). Max activations come
  from the feature atlas (`analysis.features.atlas.load_atlas(path).max_activation`) or from
  `feature_stats`.
* **Positions** (`Steering(..., positions=...)`): "all" edits every position of every forward
  pass, the prompt and the generated tokens, with or without the KV cache (the two give the
  same tokens); "prompt" only the prompt's positions (the last of them predicts the first
  answer token; with the KV cache the generated tokens then read the edited prompt only
  through attention, as in SAE Lens' steering tutorial); "generated" only the positions of
  generated tokens (the first answer token is predicted unsteered); "opening" the prompt and the
  answer's first `OPENING_TOKENS` tokens, then no more: the push sets the answer's topic, and the
  model goes on from what it has written (a push held over the whole answer makes greedy answers
  loop); "fading" the prompt at full strength and the answer with the push halving every
  `FADING_HALF_LIFE` tokens (weight 0.5 ** (t / half-life) at answer token t = 0, 1, ...): held
  long enough to keep the topic, weak by the time greedy answers start to loop. `generate_tokens` tells
  the steering each row's prompt length; in a pass with no prompt length given (e.g.
  `logits_with_edit` on a prompt) every position counts as prompt. In every case **absolute
  position 0 is left alone**, the
  BOS / attention sink (`<|endoftext|>` before plain prompts, `<|im_start|>` opening the chat
  template). Its norm is far above the rest, the SAE never saw it in training (the workbench
  excludes it from the store, training and metrics), so its encoding means nothing and an edit
  there mostly disturbs the sink every later token attends to. `analysis.evaluation.evaluate` leaves
  position 0 untouched when splicing for the same reason. Positions are read from the model's
  own inputs (position ids or the KV-cache length), so steps that feed one new token are steered.
* **Hooks are scoped**: `steer(model, steering)` is a context manager; everything it attaches
  is removed on exit, even when the block raises.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from activations.model import HookedModel, hf_hooks, hf_model_of, hook_module, hook_width, kv_cache_of, validate_hook
from sae.base import SAE

Mode = Literal["clamp", "clamp_at_least", "add", "ablate"]
"""How an intervention changes its feature (the table above)."""
MODES: tuple[Mode, ...] = get_args(Mode)
Unit = Literal["max", "absolute", "norm"]
"""What a strength is measured in: multiples of the feature's max activation, raw values, or
shares of the residual stream's typical norm (the decoded vector's norm)."""
UNITS: tuple[Unit, ...] = get_args(Unit)
Positions = Literal["all", "prompt", "generated", "opening", "fading"]
"""Which positions a steering edits (position 0 never)."""
POSITIONS: tuple[Positions, ...] = get_args(Positions)
OPENING_TOKENS = 8
"""Answer tokens steered with positions="opening" (after the prompt)."""
FADING_HALF_LIFE = 16.0
"""Answer tokens over which the push of positions="fading" halves (1 at the first answer token, 0.18 at the 40th)."""
TokenPredicate = Callable[[Tensor], Tensor]
"""One label's predicate: token ids [batch pos] -> bool [batch pos], true where the label says
the feature should fire (`analysis.features.labels.label_predicate`)."""


def _feature_id(feature: object) -> int:
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
    """clamp: f_i <- v; clamp_at_least: f_i <- max(f_i, v); add: x += alpha W_dec[i]; ablate:
    f_i <- 0 (strength ignored)."""
    strength: float = 1.0
    """v for the clamps, alpha for add, in `unit`s."""
    unit: Unit = "max"
    """"max": multiples of the feature's max observed activation; "absolute": raw values;
    "norm": shares of the residual stream's typical norm (the decoded vector's norm)."""

    def __post_init__(self):
        object.__setattr__(self, "feature", _feature_id(self.feature))
        if self.feature < 0:
            raise ValueError(f"feature {self.feature} is out of range: feature ids are 0 or more (and below the SAE's d_sae)")
        if self.mode not in MODES:
            raise ValueError(f"unknown steering mode {self.mode!r}: choose one of {MODES}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown strength unit {self.unit!r}: choose one of {UNITS}")
        if not math.isfinite(self.strength):
            raise ValueError(f"steering strength must be finite, got {self.strength}")


class Steering:
    """Interventions on one SAE, resolved to absolute values; call it on activations at the
    SAE's hook. Attach it to a model with `steer`, or pass it as the edit of
    `activations.model.logits_with_edit` (a full forward pass from position 0)."""

    def __init__(self, sae: SAE, interventions: Intervention | Sequence[Intervention], max_activation: Tensor | None = None,
                 residual_norm: float | None = None, positions: Positions = "all"):
        if positions not in POSITIONS:
            raise ValueError(f"unknown steering positions {positions!r}: choose one of {POSITIONS}")
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
        needs_norm = [iv.feature for iv in interventions if iv.unit == "norm" and iv.mode != "ablate"]
        if needs_norm and not (residual_norm is not None and math.isfinite(residual_norm) and residual_norm > 0):
            raise ValueError(f"unit='norm' for feature(s) {needs_norm} needs residual_norm > 0, the residual stream's typical norm at "
                             f"{sae.cfg.hook_name} (`analysis.steering.measure.residual_norm`); got {residual_norm}")
        decoder_norms = sae.W_dec.detach().float().norm(dim=-1).cpu()

        def value(iv: Intervention) -> float:
            if iv.mode == "ablate":
                return 0.0
            if iv.unit == "norm":
                return iv.strength * float(residual_norm) / max(float(decoder_norms[iv.feature]), 1e-12)
            return iv.strength * (float(max_activation[iv.feature]) if iv.unit == "max" else 1.0)

        self.sae = sae
        self.hook_name = sae.cfg.hook_name
        self.interventions = tuple(interventions)
        self.values = {iv.feature: value(iv) for iv in interventions}
        """Absolute value per feature: the clamp target, the added alpha, or 0 for ablation."""
        self.positions: Positions = positions
        """Which positions are edited: "all", "prompt", "generated", "opening" or "fading" (position 0 never)."""
        self.residual_norm = residual_norm
        sets = [iv for iv in interventions if iv.mode in ("clamp", "ablate")]
        at_least = [iv for iv in interventions if iv.mode == "clamp_at_least"]
        adds = [iv for iv in interventions if iv.mode == "add"]
        ids = lambda ivs: torch.tensor([iv.feature for iv in ivs], dtype=torch.long)  # noqa: E731
        values = lambda ivs: torch.tensor([self.values[iv.feature] for iv in ivs])  # noqa: E731
        self._set_ids, self._set_values = ids(sets), values(sets)
        self._floor_ids, self._floor_values = ids(at_least), values(at_least)
        self._add_ids, self._add_values = ids(adds), values(adds)
        self.pass_positions: Tensor | None = None
        """Absolute positions [batch or 1, pos] of the current forward pass, set by `steer`;
        None means the pass starts at position 0."""
        self.prompt_lengths: Tensor | None = None
        """Each row's prompt length [batch] in the generation under way (set by
        `activations.generation.generate_tokens`); None: every position is prompt."""

    def __repr__(self) -> str:
        parts = ", ".join(f"{iv.mode} {iv.feature}" + ("" if iv.mode == "ablate" else f" = {self.values[iv.feature]:.3g}")
                          for iv in self.interventions)
        where = "" if self.positions == "all" else f", {self.positions} positions"
        return f"Steering({self.hook_name}: {parts}{where})"

    def attached(self, model: HookedModel) -> AbstractContextManager[Steering]:
        """`steer(model, self)`: the edit applied to every forward pass inside the block."""
        return steer(model, self)

    def __call__(self, x: Tensor) -> Tensor:
        """Steered activations: x [batch, pos, d_in] (trailing dims are flattened) -> same shape and dtype."""
        shape = x.shape
        h = x.reshape(shape[0], shape[1], -1).float()
        w_dec = self.sae.W_dec
        delta = torch.zeros((), device=h.device)
        if len(self._set_ids) or len(self._floor_ids):
            f = self.sae.encode(h)
            if len(self._set_ids):
                ids = self._set_ids.to(h.device)
                delta = delta + (self._set_values.to(h.device) - f[..., ids]) @ w_dec[ids].float()  # [batch, pos, d_in]
            if len(self._floor_ids):
                ids = self._floor_ids.to(h.device)
                delta = delta + (self._floor_values.to(h.device) - f[..., ids]).clamp_min(0) @ w_dec[ids].float()
        if len(self._add_ids):
            ids = self._add_ids.to(h.device)
            delta = delta + self._add_values.to(h.device) @ w_dec[ids].float()
        weight = self._position_weights(shape[0], shape[1], h.device)  # [batch or 1, pos]
        return (h + weight[..., None] * delta).to(x.dtype).reshape(shape)

    def _position_weights(self, batch: int, n_pos: int, device: torch.device) -> Tensor:
        """float [batch or 1, pos] in [0, 1]: how much of the edit each position of this pass gets (0: untouched)."""
        pos = self.pass_positions
        if pos is None or pos.shape[-1] != n_pos or pos.shape[0] not in (1, batch):
            pos = torch.arange(n_pos, device=device)[None]
        pos = pos.to(device)
        steered = pos > 0
        if self.positions == "all":
            return steered.float()
        lengths = self.prompt_lengths
        if lengths is None:
            is_prompt = torch.ones_like(steered)
        elif len(lengths) != batch:
            raise ValueError(f"a pass of {batch} rows while generating from {len(lengths)} prompts")
        else:
            is_prompt = pos < lengths.to(device)[:, None]  # [batch, pos]
        if lengths is None or self.positions in ("prompt", "generated"):
            return (steered & (is_prompt if self.positions != "generated" else ~is_prompt)).float()
        answer_token = (pos - lengths.to(device)[:, None]).clamp_min(0)  # 0 in the prompt and at the first answer token
        if self.positions == "opening":
            return (steered & (answer_token < OPENING_TOKENS)).float()
        return steered * 0.5 ** (answer_token / FADING_HALF_LIFE)  # fading

    @contextmanager
    def generating(self, prompt_lengths: Sequence[int]) -> Iterator[Steering]:
        """Within the block, the rows of every pass are prompts of these lengths followed by
        generated tokens (their positions counted from each row's first real token)."""
        self.prompt_lengths = torch.tensor(list(prompt_lengths), dtype=torch.long)
        try:
            yield self
        finally:
            self.prompt_lengths = None


def check_compatible(model: HookedModel, sae: SAE) -> None:
    """Clear errors for a hook the model lacks, or an SAE whose d_in is not the hook's width."""
    hook = sae.cfg.hook_name
    validate_hook(model, hook)
    width = hook_width(model, hook)
    if width != sae.cfg.d_in:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} does not match {hook}, which has width {width} on this model")


PositionsOf = Callable[[tuple, dict], Tensor | None]
"""A forward call's (args, kwargs) -> its absolute positions [batch or 1, pos] (None: unknown)."""


class PositionReader(NamedTuple):
    module: torch.nn.Module
    """A top-level module whose every forward call we can see."""
    positions: PositionsOf
    """The absolute positions of one of its calls."""


def _hf_positions(args: tuple, kwargs: dict) -> Tensor | None:
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"]
    seq = kwargs.get("input_ids", args[0] if args else None)
    seq = seq if seq is not None else kwargs.get("inputs_embeds")
    if seq is None:
        return None
    past = kv_cache_of(kwargs)
    offset = past.get_seq_length() if past is not None else 0
    return torch.arange(seq.shape[1], device=seq.device)[None] + offset


def _tl_positions(args: tuple, kwargs: dict) -> Tensor | None:
    seq = args[0] if args else kwargs.get("input", kwargs.get("tokens"))
    if not isinstance(seq, Tensor) or seq.dim() < 2:
        return None
    past = kwargs.get("past_kv_cache")
    offset = past[0].past_keys.shape[1] if past is not None else 0
    return torch.arange(seq.shape[1], device=seq.device)[None] + offset


def _position_reader(model: HookedModel) -> PositionReader:
    """Where to read the absolute positions of every forward pass of `model`: the base model
    of a Hugging Face model under a TransformerBridge, else the HookedTransformer itself."""
    hf = hf_model_of(model)
    return PositionReader(hf.base_model, _hf_positions) if hf is not None else PositionReader(model, _tl_positions)


@contextmanager
def steer(model: HookedModel, steering: Steering) -> Iterator[Steering]:
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

    def pre(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        steering.pass_positions = read(args, kwargs)

    def post(_module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        steering.pass_positions = None

    with ExitStack() as stack:
        stack.callback(setattr, steering, "pass_positions", None)
        for handle in (module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post, with_kwargs=True)):
            stack.callback(handle.remove)
        if hook_module(model, steering.hook_name) is not None:
            stack.enter_context(hf_hooks(model, {steering.hook_name: steering}))
        else:
            stack.enter_context(model.hooks(fwd_hooks=[(steering.hook_name, lambda act, hook: steering(act))]))
        yield steering


__all__ = [
    "FADING_HALF_LIFE", "MODES", "OPENING_TOKENS", "POSITIONS", "UNITS", "Intervention", "Mode", "Positions", "Steering", "TokenPredicate", "Unit", "check_compatible", "check_features", "steer",
]
