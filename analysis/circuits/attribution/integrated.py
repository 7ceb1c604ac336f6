"""Integrated gradients (Sundararajan et al. 2017): the target's gradient averaged along the
straight path that moves one whole hook from its held-out mean to the prompt's residual, the
rest of the model running as it does. A hook's attributions then sum to the change of the
target when that hook is mean-ablated, up to the quadrature (`GraphConfig.ig_steps` midpoints)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..decompose import CleanRun, Gradients
from .base import AttributionMethod, register

if TYPE_CHECKING:
    from ..config import GraphConfig


@register
class IntegratedGradients(AttributionMethod):
    name = "integrated_gradients"

    def gradients(self, run: CleanRun, cfg: GraphConfig) -> Gradients:
        points = [run.emb, *(t.x for t in run.terms)]  # [P d] each
        means = [run.mean_emb, *(t.mean_x for t in run.terms)]
        starts = [0, *run.depths[:run.n_hooks]]
        embed, *hooks = (self._path_gradient(run, x, mean, start, cfg.ig_steps) for x, mean, start in zip(points, means, starts))
        return Gradients(embed, hooks)

    @staticmethod
    def _path_gradient(run: CleanRun, x: Tensor, mean: Tensor, start: int, steps: int) -> Tensor:
        """The target's gradient [P d] averaged along the path from `mean` ([d], or [P d] per
        position) to the point x [P d] after `start` blocks (positions >= first; midpoint rule)."""
        first = run.first
        alphas = (torch.arange(steps, dtype=torch.float32, device=x.device) + 0.5) / steps
        path = x[None].repeat(steps, 1, 1)
        mean = mean[first:] if mean.dim() == 2 else mean
        path[:, first:] = mean + alphas[:, None, None] * (x[first:] - mean)
        path.requires_grad_(True)
        with torch.enable_grad():
            value = run.target.value(run.runner, run.stack, path, start, run.position).sum()
            return torch.autograd.grad(value, path)[0].mean(0)
