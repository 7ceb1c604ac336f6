"""BatchTopK SAE (Bussmann et al. 2024): during training keep the k * batch largest
activations across the whole batch; at inference use one threshold theta, estimated as the
running mean of the smallest kept activation, as a JumpReLU. Saved as SAE Lens `jumprelu`."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import SAE, TrainOutput, register


@register("batchtopk")
class BatchTopKSAE(SAE):
    sae_lens_architecture = "jumprelu"

    def __init__(self, cfg, generator=None):
        super().__init__(cfg, generator)
        self.register_buffer("threshold", torch.zeros(()))  # inference threshold theta
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.long))

    def activation(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold)

    def training_forward(self, x: Tensor, sparsity_scale: float = 1.0) -> TrainOutput:
        pre = self.pre_acts(x)
        flat_values, flat_indices = pre.relu().flatten().topk(self.cfg.k * x.shape[0])
        with torch.no_grad():  # running mean of the smallest kept activation
            smallest = flat_values[-1].clamp_min(0)
            n = self.threshold_batches.item()
            self.threshold.copy_((self.threshold * n + smallest) / (n + 1))
            self.threshold_batches += 1
        f = torch.zeros_like(pre).flatten().scatter(0, flat_indices, flat_values).view_as(pre)
        x_hat = self.decode(f)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        return TrainOutput(mse, x_hat, (f > 0).any(0), (f > 0).float().sum(-1).mean(), mse, x.new_zeros(()), pre)

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.expand(self.cfg.d_sae).clone().float().cpu()}

    def load_extra_tensors(self, state: dict[str, Tensor]) -> None:
        if "threshold" in state:
            self.threshold.copy_(state["threshold"].flatten()[0])
