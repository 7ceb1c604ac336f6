"""Inference chains: how the features of one layer build those of the next, up to the answer.

    stack.py      SAEStack: SAEs on residual hooks of one model, in layer order; the per-layer report
    runner.py     ResidualRunner: the residual stream from one hook to the next (or to the logits), with gradients
    graph.py      trace(): the feature graph of a prompt for a target, pruned and checked (faithfulness, interventions)
    export.py     the graph as typed JSON, Neuronpedia graph JSON and a standalone offline HTML view
    matching.py   which features are the same: across two SAEs (widths, seeds) and across the layers of a stack
"""
