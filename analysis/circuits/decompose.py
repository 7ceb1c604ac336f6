"""The prompt's clean run, split into nodes: at each hook of the stack the graph has, the
residual x = mean + delta @ W_dec + error (positions >= first), and the target's gradient
there. Every later step of a trace (attribution, edges, faithfulness, interventions) reads
this one `CleanRun`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae import SAE

from ..encoding import first_position
from .means import StackMeans
from .runner import ResidualRunner
from .stack import SAEStack
from .targets import GraphTarget


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters without gradients for the duration (only activations need them)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class HookTerms:
    """One hook's decomposition on the prompt: x = mean + delta @ W_dec + error, positions >= first."""

    def __init__(self, sae: SAE, x: Tensor, mean_x: Tensor, mean_f: Tensor, first: int) -> None:
        self.sae, self.first = sae, first
        self.W_dec = sae.W_dec.detach().float()  # [d_sae d]
        self.mean_x, self.mean_f = mean_x, mean_f  # [d], [d_sae]
        self.x = x  # [P d]
        self.acts, self.delta, self.error = self.split(x)  # [P d_sae], [P d_sae], [P d]
        self.acts[:first] = 0
        self.delta[:first] = 0
        self.error[:first] = 0
        self.active = self.acts > 0  # [P d_sae]

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Residuals x [..., P, d] -> (activations, departures of the active features from their
        means [..., P, d_sae], the error term [..., P, d]): x = mean + departures @ W_dec + error."""
        acts = self.sae.encode(x)
        delta = (acts - self.mean_f) * (acts > 0)
        return acts, delta, x - self.mean_x - delta @ self.W_dec

    def error_of(self, x: Tensor) -> Tensor:
        """The error term of residuals x [..., P, d] (active sets recomputed)."""
        return self.split(x)[2]


class Gradients(NamedTuple):
    """Gradients of the target, each [P d]: at the embedding and at each hook the graph has."""

    embed: Tensor
    hooks: list[Tensor]


@dataclass
class CleanRun:
    """The prompt's clean run, split into nodes, with the target's gradient at every hook."""

    runner: ResidualRunner
    stack: SAEStack
    target: GraphTarget
    tokens: Tensor
    """[P] the prompt, BOS included."""
    position: int
    """The target's position (>= 0)."""
    first: int
    """The first position with nodes (1: position 0, the attention sink, has none)."""
    emb: Tensor
    """[P d] the prompt's embedding."""
    emb_term: Tensor
    """[P d] the token nodes' terms: the embedding less the mean embedding (zero before `first`)."""
    mean_emb: Tensor
    """[d] the held-out mean embedding."""
    terms: list[HookTerms]
    """The decomposition at each hook the graph has."""
    gradients: Gradients
    """The target's gradient at the prompt."""
    metric: float
    """The clean target metric."""

    @property
    def n_hooks(self) -> int:
        """Hooks of the stack the graph has nodes at, from the first."""
        return len(self.terms)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> list[int]:
        """Blocks before each hook of the stack."""
        return self.stack.depths


def clean_run(runner: ResidualRunner, stack: SAEStack, target: GraphTarget, tokens: Tensor, means: StackMeans) -> CleanRun:
    """tokens [P] -> the clean pass with gradients of the target at every hook, decomposed."""
    first = first_position(stack.saes[0])
    position = target.position % len(tokens)
    n_hooks, depths = target.n_hooks(stack), stack.depths
    emb = runner.embed(tokens[None]).detach().requires_grad_(True)
    resid, start, xs = emb, 0, []
    for i in range(n_hooks):
        resid = runner.blocks(resid, start, depths[i])
        xs.append(resid)
        start = depths[i]
    metric = target.value(runner, stack, resid, start, position)[0]
    grad_emb, *grads = (g[0].detach() for g in torch.autograd.grad(metric, [emb, *xs]))  # [P d] each
    device = tokens.device
    terms = [HookTerms(stack.saes[i], xs[i][0].detach().float(), means.resid[i].to(device), means.features[i].to(device), first)
             for i in range(n_hooks)]
    mean_emb = means.embed.to(device)
    emb_term = emb[0].detach() - mean_emb
    emb_term[:first] = 0
    return CleanRun(runner, stack, target, tokens, position, first, emb[0].detach(), emb_term, mean_emb, terms,
                    Gradients(grad_emb, grads), float(metric.detach()))


__all__ = ["CleanRun", "Gradients", "HookTerms", "clean_run", "frozen"]
