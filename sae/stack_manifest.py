"""`<folder>/stack.json`: the SAEs trained from one multi-hook harvest (the chain preset), one
per hook, listed in residual-stream order. `analysis.circuits.stack.load_stack` reads it."""
from __future__ import annotations

from pathlib import Path

from activations.hooks import residual_depth
from activations.io import atomic_write_json

from .base import load_sae

STACK_FILE = "stack.json"


def write_stack_manifest(folder: Path, sae_paths: list[Path]) -> Path:
    """<folder>/stack.json: {"saes": {hook: path}} in layer order (the shape of train_summary.json)."""
    saes = sorted(((load_sae(p).cfg.hook_name, Path(p)) for p in sae_paths), key=lambda hp: residual_depth(hp[0]))
    path = Path(folder) / STACK_FILE
    atomic_write_json(path, {"saes": {hook: str(p) for hook, p in saes}})
    return path


__all__ = ["STACK_FILE", "write_stack_manifest"]
