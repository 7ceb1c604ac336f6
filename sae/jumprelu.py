"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope): f = pre * H(pre - theta) with a
learned per-latent threshold and an L0 penalty, trained by straight-through estimators
with a rectangle kernel of bandwidth eps.

theta is a plain parameter, not log(theta): under Adam a log parameterisation barely moves
theta, which left L0 flat for a year in a peer library."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import SAE, TrainOutput, register
from .config import SAEConfig


@dataclass
class JumpReLUConfig(SAEConfig):
    architecture: str = "jumprelu"
    l0_coefficient: float = 0.05
    """Weight of the (straight-through) L0 penalty."""
    jumprelu_init_threshold: float = 0.05
    """Initial threshold theta (same for every latent)."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of the straight-through estimator."""

    @property
    def sparsity_tag(self) -> str:
        return f"l0_{self.l0_coefficient:g}"


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """f = pre * H(pre - threshold): pre (batch d_sae), threshold (d_sae) -> (batch d_sae); the threshold's
    gradient is straight-through, by a rectangle kernel of width `bandwidth`."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, grad_threshold.sum(0), None


class _Step(torch.autograd.Function):
    """H(pre - threshold) (batch d_sae), summed into the L0 penalty: a zero gradient for pre, a
    straight-through one for threshold (d_sae) by the rectangle kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return torch.zeros_like(pre), grad_threshold.sum(0), None


@register
class JumpReLUSAE(SAE):
    config_class = JumpReLUConfig
    cfg: JumpReLUConfig
    sae_lens_architecture = "jumprelu"
    sae_lens_loads = ("jumprelu",)

    def __init__(self, cfg: JumpReLUConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold))  # (d_sae)

    def activation(self, pre: Tensor) -> Tensor:
        """(... d_sae) -> (... d_sae), e.g. (batch pos d_sae): pre * H(pre - theta), theta per latent."""
        return pre * (pre > self.threshold)

    def training_forward(self, x: Tensor, sparsity_scale: float = 1.0, fast: bool = False) -> TrainOutput:
        """x (batch d_in); loss = ||x - x_hat||^2 + sparsity_scale * l0_coefficient * L0 (straight-through)."""
        pre = self.pre_acts(x, fast)
        f = _JumpReLU.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        x_hat = self.decode(f)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        l0 = _Step.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        penalty = sparsity_scale * self.cfg.l0_coefficient * l0
        return TrainOutput(mse + penalty, x_hat, (f > 0).any(0), l0.detach(), mse, penalty, pre)

    @torch.no_grad()
    def post_step(self) -> None:
        super().post_step()
        self.threshold.clamp_(min=0.0)  # a negative threshold would let every latent fire
