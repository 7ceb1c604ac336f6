"""Pure metric functions (tested against hand-computed values) and a streaming accumulator.

Definitions, as in the papers that use them:
  FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (variance about the mean, not about 0: the
        normalised MSE of Gao et al. 2024, "Scaling and evaluating sparse autoencoders")
  L0  = mean number of non-zero features per token
  dead fraction  = share of features that never fire on the evaluated tokens
  dense fraction = share of features firing on more than `DENSE_THRESHOLD` (10%) of them
  CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean), the zero-ablation baseline
        (Bricken et al. 2023, "Towards Monosemanticity"; SAELens' `ce_loss_score`)
  repetition rate = 1 - unique n-grams / n-grams of one generated text (one minus the
        distinct-n of Li et al. 2016, "A Diversity-Promoting Objective for Neural Conversation Models")
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """x, x_hat: [n, d]."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - FVU; x, x_hat: [n, d]."""
    return 1.0 - fvu(x, x_hat)


def l0(f: Tensor) -> float:
    """f: [n, d_sae]."""
    return float((f != 0).float().sum(-1).mean())


def dead_fraction(fire_counts: Tensor) -> float:
    """fire_counts: [d_sae] tokens on which each feature fired."""
    return float((fire_counts == 0).double().mean())


DENSE_THRESHOLD = 0.1
"""A feature is dense when it fires on more than this share of the tokens (evaluation and the atlas)."""


def dense_fraction(fire_counts: Tensor, n_tokens: int, threshold: float = DENSE_THRESHOLD) -> float:
    """Share of features whose fire_counts [d_sae] exceed `threshold` of `n_tokens`."""
    return float((fire_counts > threshold * n_tokens).double().mean())


def cross_entropy(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token CE per predicted position: logits [batch, pos, d_vocab], tokens [batch, pos] -> [batch, pos-1]."""
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return losses.view(tokens.shape[0], -1)


def kl_per_token(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p || q) per position: logits_p, logits_q [batch, pos, d_vocab] -> [batch, pos]."""
    logp, logq = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def repetition_rate(tokens: Iterable[int], n: int = 3) -> float:
    """Share of the n-grams in `tokens` (a sequence of ids) that repeat an earlier n-gram of
    the same sequence: 0 for text without repeats, towards 1 for a loop. NaN when the
    sequence is shorter than n (no n-gram to judge)."""
    ids = [int(t) for t in tokens]
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return float("nan")
    return 1.0 - len(set(grams)) / len(grams)


def answer_repetition(tokens: Iterable[int], n: int = 3) -> float:
    """`repetition_rate` of a generated answer, with an answer too short to judge (fewer than
    `n` tokens: often an edit that makes the model stop at once) counted as 1, a failure, so
    that no answer escapes the repetition check."""
    rate = repetition_rate(tokens, n)
    return 1.0 if math.isnan(rate) else rate


class ReconstructionStats:
    """Streams FVU, MSE, L0 and firing counts over batches without keeping them."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.sum_x: Tensor | None = None
        self.sum_sq = 0.0
        self.sum_err = 0.0
        self.sum_l0 = 0.0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)

    def update(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        """Add a batch: x, x_hat [n, d_in] and f [n, d_sae]."""
        x64 = x.double()
        self.sum_x = x64.sum(0) if self.sum_x is None else self.sum_x + x64.sum(0)
        self.sum_sq += float(x64.pow(2).sum())
        self.sum_err += float((x64 - x_hat.double()).pow(2).sum())
        active = f != 0
        self.sum_l0 += float(active.sum())
        self.fire_counts += active.sum(0).cpu()
        self.n += len(x)

    @property
    def fvu(self) -> float:
        total_variance = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        return self.sum_err / total_variance

    @property
    def mse(self) -> float:
        return self.sum_err / self.n

    @property
    def l0(self) -> float:
        return self.sum_l0 / self.n


HELD_OUT_METRICS: dict[str, Callable[[ReconstructionStats], float]] = {}
"""Metrics of the streamed held-out statistics that `evaluate` adds to `EvalResult.metrics`
(and so to eval.json and the report) by name; `@held_out_metric` registers one."""


def held_out_metric(fn: Callable[[ReconstructionStats], float]) -> Callable[[ReconstructionStats], float]:
    """Register `fn(stats) -> float` under its name (`HELD_OUT_METRICS`)."""
    HELD_OUT_METRICS[fn.__name__] = fn
    return fn


@held_out_metric
def ultralow_fraction(stats: ReconstructionStats) -> float:
    """Share of live features firing on fewer than 1 in 100,000 held-out tokens (at least once)."""
    live = stats.fire_counts > 0
    return float((live & (stats.fire_counts < stats.n / 1e5)).double().mean())

