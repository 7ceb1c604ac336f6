"""Stage 2: sparse autoencoders, one file per architecture, and their trainer."""
from . import batchtopk, jumprelu, standard, topk  # noqa: F401  (register architectures)
from .base import ARCHITECTURES, SAE, TrainOutput, load_sae
from .config import SAEConfig

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "TrainOutput", "load_sae"]
