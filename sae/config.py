"""The one SAE config dataclass, shared by every architecture."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SAEConfig:
    architecture: str = "topk"
    """Registered architecture: see `sae.ARCHITECTURES` (topk, batchtopk, standard, jumprelu)."""
    d_in: int = 576
    """Width of the hooked activation."""
    d_sae: int = 4608
    """Number of latents (features)."""
    k: int = 32
    """Active latents per token (topk) or on average (batchtopk)."""
    l1_coefficient: float = 5.0
    """standard: weight of the decoder-norm-weighted L1 penalty (inputs normalised to ||x|| = sqrt(d_in))."""
    l0_coefficient: float = 0.05
    """jumprelu: weight of the (straight-through) L0 penalty."""
    jumprelu_init_threshold: float = 0.05
    """jumprelu: initial threshold theta (same for every latent)."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the rectangle kernel of the straight-through estimator."""
    hook_name: str = "blocks.8.hook_resid_post"
    model_name: str = "smollm2"
    context_size: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError("d_in and d_sae must be positive")
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae, got {self.k}")
