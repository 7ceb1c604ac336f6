"""Inference chains: how the features of one layer build those of the next, up to the answer.

    stack.py          SAEStack: SAEs on residual hooks of one model, in layer order; the per-layer report
    runner.py         ResidualRunner: the residual stream from one hook to the next (or to the logits), with gradients
    graph.py          trace(): the feature graph of a prompt for a target, pruned and checked (the method, in its docstring)
    replacement.py    the transcoder basis: TranscoderSet (one skip transcoder per MLP) and the prompt's frozen local
                      replacement model (attention patterns and norm scales frozen, errors kept: the model's logits)
    transcoder_graph.py  trace_transcoders(): the graph on the transcoder basis, exact edges in the replacement
    config.py         GraphConfig (trace's settings) and MatchConfig (matching's), each a flag
    targets/          what a graph explains, one kind per file: logit, logit difference, feature (GraphTarget, TARGETS)
    attribution/      node attribution methods, one per file: integrated gradients, gradient x activation (ATTRIBUTIONS)
    means.py          held-out means the decomposition is relative to, cached by content (the SAEs' weights)
    decompose.py      the prompt's clean run split into nodes at every hook, with the target's gradients (CleanRun)
    pruning.py        node ranking and the graph's nodes; edge pruning
    edges.py          the edges between kept nodes of neighbouring hooks
    faithfulness.py   the target with everything outside the graph mean-ablated (error nodes recomputed, and frozen)
    scores.py         circuit-tracer's replacement and completeness scores
    interventions.py  scale the upstream node of the top edges of each type: measured (post-activation) against predicted
    nodes.py          the records: Node, Edge, EdgeCheck, InterventionCheck
    feature_graph.py  FeatureGraph: the result, its summary, strongest chain and JSON
    export.py         the graph as typed JSON, Neuronpedia graph JSON and a standalone offline HTML view
    matching.py       which features are the same: across two SAEs (widths, seeds) and across the layers of a stack
    cli.py            `saewb trace` and `saewb match`
"""
