"""Stage 3: analysis of trained SAEs (this stage: evaluation metrics and reports)."""
from .evaluate import EvalConfig, EvalResult, evaluate, summary_line, write_results
from .metrics import ce_loss_recovered, dead_fraction, dense_fraction, explained_variance, fvu, kl_per_token, l0

__all__ = [
    "EvalConfig", "EvalResult", "ce_loss_recovered", "dead_fraction", "dense_fraction", "evaluate",
    "explained_variance", "fvu", "kl_per_token", "l0", "summary_line", "write_results",
]
