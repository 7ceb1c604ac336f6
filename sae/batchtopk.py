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
        pre = self.selective_pre_acts(x)
        with torch.no_grad():
            # the k * batch largest activations of the whole batch, as per-row (indices, kept)
            # padded to the row that keeps most, so decoding stays sparse (an embedding bag)
            relu = pre.detach().relu()
            kept_values, flat_indices = relu.flatten().topk(self.cfg.k * x.shape[0])
            smallest = kept_values[-1].clamp_min(0)  # running mean of the smallest kept activation
            n = self.threshold_batches.item()
            self.threshold.copy_((self.threshold * n + smallest) / (n + 1))
            self.threshold_batches += 1
            kept = torch.zeros(relu.numel(), dtype=torch.bool, device=x.device).scatter_(0, flat_indices, True).view_as(relu)
            width = max(int(kept.sum(1).max()), 1)
            indices = relu.masked_fill(~kept, -1.0).topk(width, dim=1).indices  # kept latents first in every row
            valid = kept.gather(1, indices)
        values = self.gather_pre_acts(x, pre, indices).relu() * valid
        return self.topk_training_forward(x, pre, values, indices)

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.expand(self.cfg.d_sae).clone().float().cpu()}

    def load_extra_tensors(self, state: dict[str, Tensor]) -> None:
        if "threshold" in state:
            self.threshold.copy_(state["threshold"].flatten()[0])
