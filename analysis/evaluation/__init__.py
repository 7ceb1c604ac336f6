"""Evaluation: pure metric functions (`metrics.py`), the held-out evaluation of an SAE
spliced into its model (`evaluate.py`), the standalone plotly report (`report.py`), feature
absorption (`absorption.py`), and the `evaluate` command (`cli.py`)."""
from .evaluate import EvalConfig, EvalResult, evaluate, evaluate_many, summary_line, write_results
from .metrics import ce_loss_recovered, dead_fraction, dense_fraction, explained_variance, fvu, kl_per_token, l0

__all__ = ["EvalConfig", "EvalResult", "evaluate", "evaluate_many", "summary_line", "write_results",
           "ce_loss_recovered", "dead_fraction", "dense_fraction", "explained_variance", "fvu", "kl_per_token", "l0"]
