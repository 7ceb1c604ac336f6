"""The fastest precision for the model's forward pass on the machine at hand, measured rather
than assumed: bf16 autocast is about 2x faster than fp32 on some CPUs with AVX-512 bf16 and
slower on others (and on GPUs it depends on the card), so `autocast="auto"` times both on the
stage's own first batch and keeps the faster one, provided bf16 stays accurate.

The accuracy check is the same for every choice: the activations under bf16 against fp32 on
that batch, as a share of their variance (an FVU-like error; positions before `first` are left
out, as the sink is everywhere else). Above `max_error`, fp32 is kept whatever the speed.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from .model import HookedModel, run_to_hooks

Autocast = Literal["none", "bf16"]
AUTOCASTS: tuple[Autocast, ...] = ("none", "bf16")
log = logging.getLogger(__name__)
MAX_BF16_ERROR = 1e-3
"""Largest relative error (squared error over variance, per hook) bf16 activations may have to be chosen."""


class PrecisionProbe(NamedTuple):
    choice: Autocast
    """The autocast setting to run with."""
    tokens_per_s: dict[str, float]
    """Forward throughput of each setting on the probe batch (best of the repeats)."""
    bf16_error: float
    """Largest over hooks of sum((bf16 - fp32)^2) / sum((fp32 - mean)^2) on the probe batch."""

    def describe(self) -> str:
        rates = ", ".join(f"{k} {v:,.0f} tok/s" for k, v in self.tokens_per_s.items())
        return f"precision: {'bf16 autocast' if self.choice == 'bf16' else 'fp32'} ({rates}; bf16 relative error {self.bf16_error:.1e})"


def _timed(model: HookedModel, tokens: torch.Tensor, hooks: Sequence[str], autocast: Autocast, repeats: int) -> tuple[float, dict]:
    """(best tokens/s over `repeats` after one warm-up, the activations {hook: [batch pos d]})."""
    acts = run_to_hooks(model, tokens, list(hooks), autocast)  # warm-up (kernel selection, caches)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        acts = run_to_hooks(model, tokens, list(hooks), autocast)
        if tokens.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return tokens.numel() / best, acts


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """sum((approx - exact)^2) / sum((exact - mean(exact))^2) over rows of [... d] activations."""
    exact, approx = exact.reshape(-1, exact.shape[-1]).double(), approx.reshape(-1, approx.shape[-1]).double()
    variance = (exact - exact.mean(0)).pow(2).sum()
    return float((approx - exact).pow(2).sum() / variance.clamp_min(1e-30))


def probe_precision(model: HookedModel, tokens: torch.Tensor, hooks: Sequence[str], first: int = 1, repeats: int = 2,
                    max_error: float = MAX_BF16_ERROR) -> PrecisionProbe:
    """Time the forward to `hooks` on tokens [batch pos] in fp32 and under bf16 autocast; the
    faster one, unless bf16's activations differ from fp32's by more than `max_error`."""
    rates, acts = {}, {}
    for setting in AUTOCASTS:
        rates[setting], acts[setting] = _timed(model, tokens, hooks, setting, repeats)
    error = max(relative_error(acts["bf16"][h][:, first:], acts["none"][h][:, first:]) for h in hooks)
    choice: Autocast = "bf16" if rates["bf16"] > rates["none"] and error <= max_error else "none"
    return PrecisionProbe(choice, rates, error)


def check_autocast(setting: str) -> None:
    if setting not in ("auto", *AUTOCASTS):
        raise ValueError(f"autocast must be 'auto', 'none' or 'bf16', got {setting!r}")


def resolve_autocast(setting: str, model: HookedModel, tokens: torch.Tensor, hooks: Sequence[str], first: int = 1) -> Autocast:
    """`setting` itself when it is "none" or "bf16"; for "auto", the probe's choice on tokens
    [batch pos] (logged with its measurements)."""
    check_autocast(setting)
    if setting != "auto":
        return setting  # type: ignore[return-value]
    probe = probe_precision(model, tokens, hooks, first)
    log.info(probe.describe())
    return probe.choice


MIN_TRAINING_PROBE_WEIGHTS = 2**20
"""Encoders with fewer weights than this train in fp32 without a probe: at that size bf16's casts cost what its matmuls save."""
SAE_MATMUL_SPEEDUP = 1.2
"""bf16 autocast trains an SAE only when its encoder matmul is at least this much faster than fp32."""
_TRAINING_CHOICES: dict[tuple, Autocast] = {}


def training_autocast(batch: int, d_in: int, d_sae: int, device: torch.device, repeats: int = 3) -> Autocast:
    """The precision an SAE of `d_in` x `d_sae` trains in on `device`: bf16 autocast when the
    encoder's matmul [batch d_in] @ [d_in d_sae] runs at least SAE_MATMUL_SPEEDUP x faster under
    it than in fp32 (best of `repeats` after a warm-up), else fp32; fp32 for small encoders.
    Measured once per shape and device in a process. The accuracy check is the training's own:
    held-out FVU of bf16 and fp32 runs on the same batches (bench/train_throughput.py: equal to
    4 digits at 1M tokens)."""
    if d_in * d_sae < MIN_TRAINING_PROBE_WEIGHTS:
        return "none"
    key = (batch, d_in, d_sae, str(device))
    if key not in _TRAINING_CHOICES:
        x, w = torch.randn(batch, d_in, device=device), torch.randn(d_in, d_sae, device=device)
        seconds = {}
        for setting in AUTOCASTS:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting == "bf16"):
                x @ w  # warm-up
                best = float("inf")
                for _ in range(repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    x @ w
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - started)
            seconds[setting] = best
        _TRAINING_CHOICES[key] = "bf16" if seconds["none"] >= SAE_MATMUL_SPEEDUP * seconds["bf16"] else "none"
        log.info("training precision: %s (encoder matmul fp32 %.1f ms, bf16 autocast %.1f ms)",
                 "bf16 autocast" if _TRAINING_CHOICES[key] == "bf16" else "fp32", 1e3 * seconds["none"], 1e3 * seconds["bf16"])
    return _TRAINING_CHOICES[key]


__all__ = ["AUTOCASTS", "MAX_BF16_ERROR", "Autocast", "PrecisionProbe", "probe_precision", "relative_error", "resolve_autocast", "check_autocast",
           "training_autocast"]
