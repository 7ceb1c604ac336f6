"""Steering measurement, all under the *unsteered* model (no judge model):

* feature readout (`feature_readout`): the steered features' own activation when the generated
  text (alone, after the BOS token; not the prompt, so a prompt that names the concept does not
  count) is re-read, and optionally a label predicate `predicate(tokens [batch pos]) -> bool
  [batch pos]`;
* fluency (`generation_fluency`): perplexity of each generation given its prompt, and its
  repetition rate;
* side effects (`kl_on_text`): KL(unsteered || steered) per token on neutral text;
* what the model holds while it answers (`answer_activations`): a hook's activations on the
  tokens of its own answers, each read after its prompt.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import boundary_token_id
from activations.generation import GenerationConfig, decode, encode_prompts, generate_tokens
from activations.model import HookedModel, logits_with_edit, run_to_hooks
from sae.base import SAE

from ..encoding import encode_contexts, first_position
from ..evaluation.metrics import answer_repetition, cross_entropy, kl_per_token
from .interventions import Steering, TokenPredicate, check_compatible, check_features


class SideBySide(NamedTuple):
    prompt: str
    unsteered: str
    """The unsteered model's continuation."""
    steered: str
    """The continuation with the steering applied (same seed)."""


def compare(model: HookedModel, prompts: Sequence[str], steering: Steering, cfg: GenerationConfig | None = None) -> list[SideBySide]:
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


class FeatureStats(NamedTuple):
    max_activation: Tensor
    """[d_sae] largest activation of each feature on the tokens read."""
    frequency: Tensor
    """[d_sae] share of the tokens on which each feature fires."""
    n_tokens: int
    """Tokens read (position 0 of every context excluded)."""


@torch.no_grad()
def share(mask: Tensor) -> float:
    """The share of True in a bool `mask` [n], exactly count / n (a float32 mean makes 5 of 24
    read 0.2083333284, and 5x one answer in 24 then falls short of 5)."""
    return int(mask.sum()) / max(mask.numel(), 1)


def feature_stats(sae: SAE, model: HookedModel, tokens: Tensor, batch_size: int = 8) -> FeatureStats:
    """Max activation and firing frequency of every feature over `tokens` [n_contexts, pos]
    (position 0 excluded), one forward pass per batch that stops after the hooked layer.
    A stand-in for the feature atlas' `max_activation` until one is built."""
    check_compatible(model, sae)
    device = next(model.parameters()).device
    sae = sae.to(device)
    top = torch.zeros(sae.cfg.d_sae, device=device)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    n = 0
    for b in tqdm(range(0, len(tokens), batch_size), desc="feature stats"):
        f = encode_contexts(model, sae, tokens[b:b + batch_size].to(device)).f[:, first_position(sae):].flatten(0, 1)
        top = torch.maximum(top, f.max(0).values)
        fires += (f > 0).sum(0)
        n += len(f)
    return FeatureStats(top.cpu(), (fires.double() / max(n, 1)).float().cpu(), n)


@torch.no_grad()
@torch.no_grad()
def answer_activations(model: HookedModel, hook_name: str, prompts: Sequence[str], cfg: GenerationConfig | None = None) -> list[Tensor]:
    """The model's answers to `prompts` (generated per `cfg`; default greedy chat answers), read
    back: the activations [n_new, d] at `hook_name` on each answer's tokens, after its own
    prompt (the prompt's positions left out). An answer that stopped at once gives [0, d]."""
    cfg = cfg or GenerationConfig(chat=True)
    device = next(model.parameters()).device
    tokens = encode_prompts(model.tokenizer, list(prompts), cfg.chat)
    read = []
    for prompt, answer in zip(tokens, generate_tokens(model, tokens, cfg)):
        context = torch.cat([prompt, answer.cpu()])[None].to(device)  # [1, pos]
        acts = run_to_hooks(model, context, [hook_name])[hook_name]
        read.append(acts.reshape(1, context.shape[1], -1)[0, len(prompt):].float().cpu())
    return read


def residual_norm(model: HookedModel, hook_name: str, prompts: Sequence[Tensor], batch_size: int = 16) -> float:
    """The residual stream's typical norm at `hook_name`: the median L2 norm of its activation
    [d] over every real position of `prompts` (token ids [len] each) but position 0, the
    attention sink whose norm is far above the rest. The unit of `unit="norm"` strengths."""
    from activations.model import run_to_hooks

    device = next(model.parameters()).device
    norms = []
    for b in range(0, len(prompts), batch_size):
        tokens, real = right_pad(prompts[b:b + batch_size], boundary_token_id(model.tokenizer))
        real[:, 0] = False
        acts = run_to_hooks(model, tokens.to(device), [hook_name])[hook_name].cpu()  # [b, pos, d]
        norms.append(acts.norm(dim=-1)[real])
    norms = torch.cat(norms) if norms else torch.zeros(0)
    if not len(norms):
        raise ValueError("residual_norm needs prompts with at least two tokens")
    return float(norms.median())


class Padded(NamedTuple):
    ids: Tensor
    """[n max_len] token ids, right-padded."""
    real: Tensor
    """[n max_len] bool: where `ids` holds a real token."""


def right_pad(seqs: Sequence[Tensor], pad: int) -> Padded:
    """Token id sequences [len] each as one right-padded batch and its mask of real tokens."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = True
    return Padded(ids, mask)


class FeatureReadout(NamedTuple):
    activation: Tensor
    """[n] mean activation of the features over the generated tokens (relative to each
    feature's max activation when one is given); NaN for an empty generation."""
    present: Tensor
    """[n] bool: some feature exceeds `threshold` on at least one generated token."""
    predicate_rate: Tensor | None
    """[n] share of generated tokens where the label predicate holds (None without one)."""


@torch.no_grad()
def feature_readout(model: HookedModel, sae: SAE, features: Sequence[int], generated: Sequence[Tensor],
                    max_activation: Tensor | None = None, threshold: float = 0.0, predicate: TokenPredicate | None = None,
                    batch_size: int = 16) -> FeatureReadout:
    """How much each generation [n_new] expresses `features`: the text (after the BOS token,
    without its prompt) is re-read by the unsteered model and encoded by the SAE. With
    `max_activation` [d_sae], activations and `threshold` are in units of each feature's max."""
    features = check_features(features, sae.cfg.d_sae)
    device = next(model.parameters()).device
    sae = sae.to(device)
    ids = torch.tensor(list(features), dtype=torch.long)
    scale = max_activation[ids].clamp_min(1e-12) if max_activation is not None else torch.ones(len(ids))
    bos = boundary_token_id(model.tokenizer)
    act, present, pred = [], [], []
    for b in range(0, len(generated), batch_size):
        seqs = [torch.cat([torch.tensor([bos]), g.cpu()]) for g in generated[b:b + batch_size]]
        tokens, mask = right_pad(seqs, bos)
        mask[:, 0] = False
        f = (encode_contexts(model, sae, tokens.to(device)).f[..., ids.to(device)] / scale.to(device)).cpu()  # [b, pos, n_feat]
        f = f.masked_fill(~mask[..., None], 0)
        n_tok = mask.sum(1)
        act.append(f.mean(-1).sum(1) / n_tok.clamp_min(1) + torch.where(n_tok > 0, 0.0, float("nan")))
        present.append((f > threshold).any(-1).any(-1))
        if predicate is not None:
            hits = predicate(tokens.to(device)).cpu().bool() & mask
            pred.append(hits.sum(1) / n_tok.clamp_min(1))
    return FeatureReadout(torch.cat(act), torch.cat(present), torch.cat(pred) if predicate is not None else None)


class GenerationNLL(NamedTuple):
    nll: Tensor
    """[n] summed negative log-likelihood of each generation's tokens."""
    n_tokens: Tensor
    """[n] generated tokens of each."""


@torch.no_grad()
def generation_nll(model: HookedModel, prompts: Sequence[Tensor], generated: Sequence[Tensor], batch_size: int = 8) -> GenerationNLL:
    """Summed negative log-likelihood of each generation [n_new] given its prompt [len] under
    the unsteered model."""
    device = next(model.parameters()).device
    pad = boundary_token_id(model.tokenizer)
    nll, counts = [], []
    for b in range(0, len(prompts), batch_size):
        seqs = [torch.cat([p.cpu(), g.cpu()]) for p, g in zip(prompts[b:b + batch_size], generated[b:b + batch_size])]
        tokens, mask = right_pad(seqs, pad)
        is_new = torch.zeros_like(mask)
        for r, (p, g) in enumerate(zip(prompts[b:b + batch_size], generated[b:b + batch_size])):
            is_new[r, len(p):len(p) + len(g)] = True
        ce = cross_entropy(logits_with_edit(model, tokens.to(device)), tokens.to(device)).cpu()  # [b, pos-1] predicts tokens[:, 1:]
        nll.append((ce * is_new[:, 1:]).sum(1))
        counts.append(is_new.sum(1))
    return GenerationNLL(torch.cat(nll), torch.cat(counts))


class Fluency(NamedTuple):
    perplexity: float
    """exp(mean NLL per generated token) under the unsteered model, given the prompts; NaN
    when nothing was generated."""
    repetition: float
    """Mean repeated-trigram rate of the generations, every answer counted: one too short to
    judge (under 3 tokens) counts as 1 (`answer_repetition`); NaN without any generation."""


class AnswerFluency(NamedTuple):
    """The fluency of each answer, for statistics over answers (`Fluency` is their aggregate)."""

    nll: Tensor
    """[n] summed negative log-likelihood of each answer under the unsteered model, given its prompt."""
    n_tokens: Tensor
    """[n] tokens of each answer."""
    repetition: Tensor
    """[n] repeated-trigram rate of each answer (one under 3 tokens: 1)."""

    def aggregate(self, rows: Tensor | None = None) -> Fluency:
        """The `Fluency` of the answers `rows` [m] (indices, repeats allowed; default all)."""
        nll, n_tokens, repetition = (self.nll, self.n_tokens, self.repetition) if rows is None else (
            self.nll[rows], self.n_tokens[rows], self.repetition[rows])
        total = int(n_tokens.sum())
        return Fluency(math.exp(float(nll.sum()) / total) if total else float("nan"),
                       float(repetition.mean()) if len(repetition) else float("nan"))


@torch.no_grad()
def answer_fluency(model: HookedModel, prompts: Sequence[Tensor], generated: Sequence[Tensor], batch_size: int = 8) -> AnswerFluency:
    """Per answer: NLL under the unsteered model given its prompt [len], token count and repetition of generations [n_new]."""
    nll, n_tokens = generation_nll(model, prompts, generated, batch_size)
    return AnswerFluency(nll, n_tokens, torch.tensor([answer_repetition(g.tolist()) for g in generated], dtype=torch.float64))


@torch.no_grad()
def generation_fluency(model: HookedModel, prompts: Sequence[Tensor], generated: Sequence[Tensor], batch_size: int = 8) -> Fluency:
    """Perplexity under the unsteered model and repetition of generations [n_new] of prompts [len]:
    the fluency cost of steering, read the same way by sweeps and concept steering."""
    return answer_fluency(model, prompts, generated, batch_size).aggregate()


@torch.no_grad()
def kl_on_text(model: HookedModel, steering: Steering, tokens: Tensor, batch_size: int = 8) -> float:
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


__all__ = [
    "share",
    "AnswerFluency", "FeatureReadout", "FeatureStats", "Fluency", "GenerationNLL", "Padded", "SideBySide", "answer_activations", "answer_fluency", "compare", "feature_readout", "feature_stats",
    "format_side_by_side", "generation_fluency", "generation_nll", "kl_on_text", "residual_norm", "right_pad",
]
