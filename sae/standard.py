"""ReLU SAE with an L1 penalty weighted by decoder norm (Towards Monosemanticity, April
2024 update): loss = ||x - x_hat||^2 + lambda * sum_i f_i ||W_dec[i]||. The weighting
stops the decoder norm from shrinking to dodge the penalty."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import SAE, TrainOutput, register
from .config import SAEConfig


@dataclass
class StandardConfig(SAEConfig):
    architecture: str = "standard"
    l1_coefficient: float = 5.0
    """Weight of the decoder-norm-weighted L1 penalty (inputs normalised to ||x|| = sqrt(d_in))."""

    @property
    def sparsity_tag(self) -> str:
        return f"l1_{self.l1_coefficient:g}"


@register
class StandardSAE(SAE):
    config_class = StandardConfig
    cfg: StandardConfig
    sae_lens_architecture = "standard"
    sae_lens_loads = ("standard",)
    sae_lens_pre_6_default = True

    def activation(self, pre: Tensor) -> Tensor:
        """(... d_sae) -> (... d_sae), e.g. (batch pos d_sae): relu(pre)."""
        return pre.relu()

    def training_forward(self, x: Tensor, sparsity_scale: float = 1.0, fast: bool = False) -> TrainOutput:
        """x (batch d_in); loss = ||x - x_hat||^2 + sparsity_scale * l1_coefficient * sum_i f_i ||W_dec[i]||."""
        pre = self.pre_acts(x, fast)
        f = self.activation(pre)
        x_hat = self.decode(f)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        penalty = sparsity_scale * self.cfg.l1_coefficient * l1
        return TrainOutput(mse + penalty, x_hat, (f > 0).any(0), (f > 0).float().sum(-1).mean(), mse, penalty, pre)
