"""The analysis stage: everything that reads a trained SAE back against its model.

    evaluation/    metrics, held-out evaluation (FVU, L0, dead/dense, CE recovered, KL), report; `evaluate`
    features/      feature atlas, labels, monitoring and concept search, Neuronpedia export; `analyze`, `monitor`
    dashboard/     the static offline HTML feature browser; `dashboard`
    steering/      interventions, their measurement, dose-response sweeps, causal check, concept steering; `steer`
    circuits/      inference chains: SAE stacks, feature graphs of a prompt, matching features across SAEs; `trace`, `match`
    encoding.py    model to the hook, then the SAE (and the sink-position rule)
    logit_lens.py  what a feature's decoder row writes to the logits
    command.py     what every command shares (the command record, common flags, held-out text read once)
    cli.py         the `saewb` command line: collects each stage's `cli.py` commands; `run` composes every stage
"""
from .evaluation import EvalConfig, EvalResult, evaluate, summary_line, write_results
from .evaluation.metrics import ce_loss_recovered, dead_fraction, dense_fraction, explained_variance, fvu, kl_per_token, l0

__all__ = ["EvalConfig", "EvalResult", "evaluate", "summary_line", "write_results",
           "ce_loss_recovered", "dead_fraction", "dense_fraction", "explained_variance", "fvu", "kl_per_token", "l0"]
