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
        indices, valid = self._batch_top_k(pre.detach().relu())
        values = self.gather_pre_acts(x, pre, indices).relu() * valid
        return self.topk_training_forward(x, pre, values, indices)

    @torch.no_grad()
    def _batch_top_k(self, acts: Tensor) -> tuple[Tensor, Tensor]:
        """The k * batch largest of `acts` [batch, d_sae] as per-row (indices, kept) [batch, width],
        padded to the row that keeps most, so decoding stays sparse (an embedding bag). A top-k
        over all batch * d_sae values is slow on CPU, so a strided sample sets a lower bound
        expected to pass ~1.5x the kept count, and the exact top-k runs over those candidates
        (over everything when the bound lets fewer than k through)."""
        batch, k = acts.shape[0], self.cfg.k * acts.shape[0]
        flat = acts.flatten()
        stride = 17  # coprime with usual widths, so the sample covers every latent column
        sample = flat[::stride]
        bound = sample.topk(min(len(sample), int(1.5 * k / stride) + 1)).values[-1]
        candidates = torch.nonzero(flat >= bound).squeeze(1)  # ascending: row-major order
        if len(candidates) < k:
            candidates = torch.arange(flat.numel(), device=acts.device)
        kept_values, chosen = flat[candidates].topk(k, sorted=False)
        positions = candidates[chosen.sort().values]  # kept flat positions, row by row
        n = self.threshold_batches.item()  # running mean of the smallest kept activation
        self.threshold.copy_((self.threshold * n + kept_values.min().clamp_min(0)) / (n + 1))
        self.threshold_batches += 1
        rows, cols = positions // acts.shape[1], positions % acts.shape[1]
        counts = torch.bincount(rows, minlength=batch)
        slot = torch.arange(k, device=acts.device) - (counts.cumsum(0) - counts)[rows]
        width = max(int(counts.max()), 1)
        indices = torch.zeros(batch, width, dtype=torch.long, device=acts.device)
        kept = torch.zeros(batch, width, dtype=torch.bool, device=acts.device)
        indices[rows, slot] = cols
        kept[rows, slot] = True
        return indices, kept

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.expand(self.cfg.d_sae).clone().float().cpu()}

    def load_extra_tensors(self, state: dict[str, Tensor]) -> None:
        if "threshold" in state:
            self.threshold.copy_(state["threshold"].flatten()[0])
