"""Stage 2: sparse autoencoders, one file per architecture, and their trainer.

How to add an architecture: write sae/<name>.py with a `SAEConfig` subclass (its fields, and
`architecture: str = "<name>"`) and an `SAE` subclass under `@register`; this package imports
every module in sae/ but the shared ones below, so nothing else needs editing."""
import importlib
import pkgutil

from .base import ARCHITECTURES, SAE, TrainOutput, load_sae, make_config
from .config import SAEConfig

_SHARED_MODULES = {"base", "checkpoint", "cli", "common", "config", "metrics_log", "on_the_fly", "stack_manifest", "stream", "trainer"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")  # registers its architecture

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "TrainOutput", "load_sae", "make_config"]
