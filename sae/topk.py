"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token. AuxK is
applied by the trainer (see `sae.common.auxk_loss`)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import SAE, TrainOutput, register


@register("topk")
class TopKSAE(SAE):
    sae_lens_architecture = "topk"

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def training_forward(self, x: Tensor, sparsity_scale: float = 1.0) -> TrainOutput:
        pre = self.selective_pre_acts(x)
        indices = pre.topk(self.cfg.k, dim=-1).indices
        return self.topk_training_forward(x, pre, self.gather_pre_acts(x, pre, indices).relu(), indices)

    def sae_lens_config(self) -> dict:
        return super().sae_lens_config() | {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
