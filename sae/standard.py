"""ReLU SAE with an L1 penalty weighted by decoder norm (Towards Monosemanticity, April
2024 update): loss = ||x - x_hat||^2 + lambda * sum_i f_i ||W_dec[i]||. The weighting
stops the decoder norm from shrinking to dodge the penalty."""
from __future__ import annotations

from torch import Tensor

from .base import SAE, TrainOutput, register


@register("standard")
class StandardSAE(SAE):
    sae_lens_architecture = "standard"

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def training_forward(self, x: Tensor, sparsity_scale: float = 1.0) -> TrainOutput:
        pre = self.pre_acts(x)
        f = self.activation(pre)
        x_hat = self.decode(f)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        penalty = sparsity_scale * self.cfg.l1_coefficient * l1
        return TrainOutput(mse + penalty, x_hat, (f > 0).any(0), (f > 0).float().sum(-1).mean(), mse, penalty, pre)
