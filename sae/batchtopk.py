"""BatchTopK SAE (Bussmann et al. 2024): during training keep the k * batch largest
activations across the whole batch; at inference use one threshold theta, estimated as the
running mean of the smallest kept activation, as a JumpReLU. Saved as SAE Lens `jumprelu`.

It is TopK with the choice made across the batch, so it subclasses `TopKSAE`: k, AuxK and the
sparse training path are TopK's; inference, the SAE Lens export and the L0 bound differ."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import TrainOutput, register
from .topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    architecture: str = "batchtopk"


@register
class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKConfig
    cfg: BatchTopKConfig
    sae_lens_architecture = "jumprelu"
    sae_lens_loads = ("batchtopk",)

    def __init__(self, cfg: BatchTopKConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.register_buffer("threshold", torch.zeros(()))  # inference threshold theta
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.long))

    @property
    def max_active_latents(self) -> int:
        return min(self.cfg.d_sae, max(64, 2 * self.cfg.k))  # k on average: keep the strongest 2k (or 64)

    def activation(self, pre: Tensor) -> Tensor:
        """(... d_sae) -> (... d_sae), e.g. (batch pos d_sae): pre * H(pre - theta), one theta for every latent."""
        return pre * (pre > self.threshold)

    def training_forward(self, x: Tensor, sparsity_scale: float = 1.0, fast: bool = False) -> TrainOutput:
        """x (batch d_in); decodes the k * batch largest activations of the batch (and updates theta)."""
        pre, values, indices = self.batch_code(x, fast)
        return self.sparse_training_output(x, pre, values, indices, fast)

    def batch_code(self, x: Tensor, fast: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(pre (batch d_sae), values (batch width), indices (batch width)) of x (batch d_in):
        the k * batch largest ReLU'd pre-activations of the batch, per row in ascending latent
        order, padded with (latent 0, value 0); values carry the encoder's gradient."""
        pre = self.selective_pre_acts(x, fast)
        indices, valid = self._batch_top_k(pre.detach().relu())
        values = self.gather_pre_acts(x, pre, indices).relu() * valid
        return pre, values, indices

    @torch.no_grad()
    def _batch_top_k(self, acts: Tensor) -> tuple[Tensor, Tensor]:
        """The k * batch largest of `acts` (batch d_sae) as per-row (indices, kept) (batch width),
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

    def sae_lens_fields(self) -> dict:
        return {}  # SAE Lens reads it as a JumpReLU: no k

    def extra_tensors(self) -> dict[str, Tensor]:
        """The threshold theta, a scalar () repeated per latent (d_sae), as SAE Lens' JumpReLU reads it."""
        return {"threshold": self.threshold.expand(self.cfg.d_sae).clone().float().cpu()}

    def load_extra_tensors(self, state: dict[str, Tensor]) -> None:
        """theta () from the saved threshold (d_sae), whose entries are all equal (`extra_tensors`)."""
        if "threshold" in state:
            self.threshold.copy_(state["threshold"].flatten()[0])
