"""The analysis stage: everything that reads a trained SAE back against its model.

    evaluation/   metrics, held-out evaluation (FVU, L0, dead/dense, CE recovered, KL), report
    features/     feature atlas, labels, monitoring and concept search, Neuronpedia export
    dashboard/    the static offline HTML feature browser
    steering/     interventions, their measurement, dose-response sweeps, causal check
    cli.py        the `saewb` command line (`run` composes every stage)
"""
from .evaluation import EvalConfig, EvalResult, evaluate, summary_line, write_results
from .evaluation.metrics import ce_loss_recovered, dead_fraction, dense_fraction, explained_variance, fvu, kl_per_token, l0

__all__ = ["EvalConfig", "EvalResult", "evaluate", "summary_line", "write_results",
           "ce_loss_recovered", "dead_fraction", "dense_fraction", "explained_variance", "fvu", "kl_per_token", "l0"]
