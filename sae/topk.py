"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, with AuxK
against dead latents (`sae.common.auxk_loss`). BatchTopK (`sae.batchtopk`) subclasses it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SAE, TrainOutput, register
from .common import auxk_loss, gather_pre_acts, sparse_decode
from .config import SAEConfig


@dataclass
class TopKConfig(SAEConfig):
    architecture: str = "topk"
    k: int = 32
    """Active latents per token (TopK) or per token on average (BatchTopK)."""

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae, got {self.k}")

    @property
    def sparsity_tag(self) -> str:
        return f"k{self.k}"


@register(default=True)
class TopKSAE(SAE):
    config_class = TopKConfig
    cfg: TopKConfig
    sweep_fields = ("k",)
    sae_lens_architecture = "topk"
    max_grad_norm = 1.0  # as SAE Lens: held-out FVU 0.0815 against 0.0863 unclipped at 1M tokens (docs/results.md)
    sae_lens_loads = ("topk",)

    @property
    def max_active_latents(self) -> int:
        return self.cfg.k

    def activation(self, pre: Tensor) -> Tensor:
        """(... d_sae) -> (... d_sae), e.g. (batch pos d_sae): topk(relu(pre), k)."""
        values, indices = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def training_forward(self, x: Tensor, sparsity_scale: float = 1.0, fast: bool = False) -> TrainOutput:
        """x (batch d_in); the code is decoded sparsely from its k latents per row."""
        pre = self.selective_pre_acts(x, fast)
        indices = pre.topk(self.cfg.k, dim=-1).indices
        return self.sparse_training_output(x, pre, self.gather_pre_acts(x, pre, indices).relu(), indices, fast)

    # ------------------------------------------------ shared with BatchTopK: gradients only through kept latents
    def selective_pre_acts(self, x: Tensor, fast: bool = False) -> Tensor:
        """Pre-activations (batch d_sae) of x (batch d_in) for a code whose gradient reaches only
        selected latents: with `fast`, no autograd graph (take gradients through
        `gather_pre_acts`); otherwise plain autograd."""
        if fast:
            with torch.no_grad():
                return self.pre_acts(x)
        return self.pre_acts(x)

    def gather_pre_acts(self, x: Tensor, pre: Tensor, indices: Tensor) -> Tensor:
        """pre.gather(1, indices) (batch k) with the encoder's gradient at those latents only;
        x (batch d_in), pre (batch d_sae) from `selective_pre_acts`."""
        return gather_pre_acts(pre, indices, x, self.W_enc, self.b_enc, self.input_offset)

    def sparse_training_output(self, x: Tensor, pre: Tensor, values: Tensor, indices: Tensor, fast: bool = False,
                               extra: Tensor | None = None) -> TrainOutput:
        """Training output decoded sparsely from (values, indices) (batch k); x (batch d_in) the target, pre (batch d_sae);
        `extra` (batch d_in) is added to the reconstruction (a transcoder's skip term)."""
        x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec, fast)
        if extra is not None:
            x_hat = x_hat + extra
        mse = (x - x_hat).pow(2).sum(-1).mean()
        active = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x.device)
        active[indices[values > 0]] = True
        l0 = (values > 0).float().sum(-1).mean()
        return TrainOutput(mse, x_hat, active, l0, mse, x.new_zeros(()), pre)

    def aux_loss(self, x: Tensor, out: TrainOutput, dead: Tensor, k_aux: int, fast: bool = False,
                 mean_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """AuxK (): the dead latents (bool (d_sae)) reconstruct the residual x - out.x_hat (batch d_in)."""
        return auxk_loss(x, out.x_hat, out.pre, dead, k_aux, self, fast, mean_over_ranks)

    # ------------------------------------------------ SAE Lens
    def sae_lens_fields(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def config_fields_from_sae_lens(cls, raw: dict) -> dict:
        return {"k": int(raw["k"])} if "k" in raw else {}
