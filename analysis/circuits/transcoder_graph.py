"""Feature graphs on the transcoder basis: nodes are the features of every block's skip transcoder, one error node per
block and position, the prompt's tokens and the target; edges are exact direct effects in the prompt's frozen local
replacement model (`replacement.py`), as in circuit-tracer (Ameisen et al. 2025).

    graph = trace_transcoders(model, load_transcoders("runs/tc"), "The capital of France is", logit_target(tok, " Paris"))

**Baseline.** Every node is measured from what removing it leaves (`GraphConfig.transcoder_ablation`): with "mean"
(the default, as on the residual basis) a feature's held-out mean activation and its block's held-out mean error
(`means.transcoder_means`); with "zero" nothing. A feature inactive on the prompt is not a node: its departure from
its mean (-mean x its decoder row) joins its block's error node, so nodes still add up to the real MLP output.

**Attribution.** A node's term is what it adds to the residual stream beyond its baseline: a feature's activation
less its mean, times its decoder row (after its block), an error node's vector less its mean, a token's embedding. Its attribution is that term dotted with the
target's gradient in the replacement with the features live (TopK on the replacement's own MLP inputs, so the
gradient runs through every active feature): its total effect on the target, every path included, to first order.
Nodes are ranked by their share of their layer's total |attribution| (as on the residual basis: `pruning.py`. A share
of the whole graph's total, tried on the tuning prompts, leaves only about 33 features above `min_node_share`; neither
ranking gives a faithful graph with the transcoders this CPU can train: docs/results.md) and kept up to `max_feature_nodes` features; error nodes ranked above the last kept feature are
kept and counted apart.

**Edges.** The direct effect of a source on a kept feature is its term dotted with the gradient of that feature's
pre-activation in the replacement with every feature frozen at its clean activation: the path through attention (its
patterns frozen), norms (their scales frozen), the skip terms and the residual stream, and no other feature. It is
exact, not a first-order estimate: the frozen replacement is linear in its injections. Into the target, the same with
the target metric. An edge's weight is its direct effect times the downstream node's gradient on the target.

**Checks.**
- Faithfulness, in the real model (attention and norms live) with each MLP's output replaced by its transcoder's
  features kept in the graph, recomputed from the run's own MLP input, plus the graph's error nodes: recomputed there
  (the MLP's real output less the transcoder's, Marks et al.) as the headline, frozen at their clean values beside it,
  and the bounds with no error node and with every one. Removing a node sets it to its baseline; "empty" keeps only
  the baselines and the transcoders' bias and skip terms.
- circuit-tracer's replacement and completeness scores (`scores.py`) on the kept nodes and every edge between them;
  with `GraphConfig.whole_graph_scores`, also as circuit-tracer computes them, on the whole graph before pruning (every
  active feature, every error node and every token).
- The edge check: the upstream node's term is scaled by each dose in the real model, every other feature and error frozen at
  its clean value, and the downstream feature's activation (its transcoder's TopK on the live MLP input) or the target
  is read: what the frozen attention and norms leave out shows up here.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import NamedTuple

import torch
from torch import Tensor

from activations.generation import encode_prompts
from activations.hooks import act_name
from activations.model import HookedModel, token_strings

from .config import GraphConfig
from .faithfulness import faithfulness_share
from .feature_graph import FeatureGraph
from .graph import check_prompt
from .interventions import HEADLINE_TYPE, intervention_check, strongest_by_type
from .means import TranscoderMeans, transcoder_means
from .nodes import TARGET_ID, Edge, EdgeCheck, InterventionCheck, Node
from .pruning import Candidate, budget_of, hook_candidates, prune_edges, ranking
from .replacement import CleanPrompt, ReplacementModel, TranscoderSet
from .scores import GraphScores, adjacency_scores, graph_scores
from .targets import GraphTarget, LogitsTarget


class _Attribution(NamedTuple):
    candidates: list[Candidate]
    """Every active feature and every error node (positions >= 1), largest |attribution| first."""
    kept: list[Candidate]
    gradient: Tensor
    """[n_layers + 1 pos d_model] the target's gradient at each injection point, features live."""
    token_attribution: Tensor
    """[pos]"""


class _Baseline(NamedTuple):
    """What a removed node is set to, and the error nodes measured from it."""

    codes: Tensor
    """[n_layers d_sae] each feature's value when removed (its held-out mean, or 0)."""
    errors: Tensor
    """[n_layers d_model] each block's error when removed (its held-out mean, or 0)."""
    active: Tensor
    """[n_layers pos d_sae] the features active on the prompt: the candidates."""
    node_errors: Tensor
    """[n_layers pos d_model] each error node's clean value: the transcoder's miss plus the departures of the features
    inactive on the prompt (-baseline x decoder row), so that codes and errors add up to the real MLP output."""

    def whole_codes(self, codes: Tensor) -> Tensor:
        """codes [.. n_layers pos d_sae] at the active features, the baseline elsewhere."""
        return torch.where(self.active, codes, self.codes[:, None])


def _baseline(rm: ReplacementModel, clean: CleanPrompt, means: TranscoderMeans | None) -> _Baseline:
    n_layers, _, d_sae = clean.codes.shape
    device = clean.codes.device
    if means is None:
        codes = torch.zeros(n_layers, d_sae, device=device)
        errors = torch.zeros(n_layers, clean.embed.shape[-1], device=device)
    else:
        codes, errors = means.codes.to(device), means.errors.to(device)
    active = clean.codes != 0
    inactive = torch.stack([((~active[layer]) * codes[layer]) @ tc.W_dec.detach()
                            for layer, tc in enumerate(rm.transcoders.transcoders)])  # [n_layers pos d_model]
    inactive[:, 0] = 0
    return _Baseline(codes, errors, active, clean.errors - inactive)


def _metric(target: LogitsTarget, logits: Tensor, position: int) -> Tensor:
    return target.metric(logits[:, position])


def _attribute(rm: ReplacementModel, clean: CleanPrompt, base: _Baseline, target: LogitsTarget, position: int,
               cfg: GraphConfig) -> _Attribution:
    injections = rm.zero_injections(clean)
    resid, _ = rm.forward(clean, injections, live=True)
    (gradient,) = torch.autograd.grad(_metric(target, rm.logits(clean, resid), position).sum(), injections)
    gradient = gradient[0].detach()
    candidates = []
    for layer, tc in enumerate(rm.transcoders.transcoders):
        departure = clean.codes[layer] - base.codes[layer]  # [pos d_sae]
        feature_attr = departure * (gradient[layer + 1] @ tc.W_dec.detach().T)  # [pos d_sae]
        error_attr = ((base.node_errors[layer] - base.errors[layer]) * gradient[layer + 1]).sum(-1)  # [pos]
        candidates += hook_candidates(layer, feature_attr, base.active[layer], error_attr, first=1)
    ranked = ranking(candidates, cfg)
    token_attribution = (clean.embed * gradient[0]).sum(-1)
    return _Attribution(ranked.candidates, ranked.kept, gradient, token_attribution)


def _term(rm: ReplacementModel, clean: CleanPrompt, base: _Baseline, node: Node) -> tuple[int, Tensor]:
    """(the injection index its term enters at, the term [d_model]: what it adds beyond its baseline) of a token,
    feature or error node."""
    p, layer = node.position, node.stack_index
    if node.kind == "token":
        return 0, clean.embed[p]
    if node.kind == "error":
        return layer + 1, base.node_errors[layer, p] - base.errors[layer]
    tc = rm.transcoders.transcoders[layer]
    return layer + 1, (clean.codes[layer, p, node.feature] - base.codes[layer, node.feature]) * tc.W_dec[node.feature].detach()


def _direct_effects(rm: ReplacementModel, clean: CleanPrompt, base: _Baseline, sources: list[Node], downstream: list[Node],
                    target: LogitsTarget, position: int, cfg: GraphConfig) -> Tensor:
    """[n_downstream n_sources] the exact direct effect of each source's term (token, feature or error node) on each
    downstream node (a feature's pre-activation, or the target metric) in the frozen replacement; 0 where the source
    cannot reach it (not an earlier block, or a later position).

    Downstream nodes go in batches of `cfg.batch_rows`, ordered by block and position, and each batch runs the replacement
    only up to its deepest block and over only the positions up to its last (the model is causal)."""
    where = [_term(rm, clean, base, n) for n in sources]
    index = torch.tensor([w[0] for w in where])
    positions = torch.tensor([n.position for n in sources])
    terms = torch.stack([w[1] for w in where])  # [n_sources d_model]
    layer_of = torch.tensor([-1 if n.kind == "token" else n.stack_index for n in sources])
    at_point: dict[tuple[int, int], list[int]] = {}  # the sources entering at each injection point (index, position)
    for s, (i, p) in enumerate(zip(index.tolist(), positions.tolist())):
        at_point.setdefault((i, p), []).append(s)
    points = [(i, p, torch.tensor(members)) for (i, p), members in at_point.items()]
    depth_of = [rm.n_layers if n.kind == "target" else n.stack_index for n in downstream]
    order = sorted(range(len(downstream)), key=lambda i: (depth_of[i], downstream[i].position))
    direct = torch.zeros(len(downstream), len(sources))
    for start in range(0, len(order), cfg.batch_rows):
        rows = order[start:start + cfg.batch_rows]
        batch = [downstream[i] for i in rows]
        short = clean.prefix(max(n.position for n in batch) + 1)
        deepest = max(depth_of[i] for i in rows)
        injections = rm.zero_injections(short, len(batch))
        resid, mlp_inputs = rm.forward(short, injections, live=False, stop=min(deepest + 1, rm.n_layers))
        values = []
        for b, n in enumerate(batch):
            if n.kind == "target":
                values.append(_metric(target, rm.logits(short, resid[b:b + 1]), n.position)[0])
            else:
                tc = rm.transcoders.transcoders[n.stack_index]
                values.append(mlp_inputs[n.stack_index][b, n.position] @ tc.W_enc[:, n.feature])
        (grads,) = torch.autograd.grad(torch.stack(values).sum(), injections)  # [batch n_layers + 1 short_pos d_model]
        depth = torch.tensor([depth_of[i] for i in rows])
        at = torch.tensor([n.position for n in batch])
        effect = torch.zeros(len(batch), len(sources))
        for i, p, members in points:  # one small product per injection point: [batch d_model] @ [d_model members]
            if p < short.n_pos and i <= deepest:  # a source at index i is block i - 1's
                effect[:, members] = (grads[:, i, p] @ terms[members].T).detach().cpu()
        allowed = (layer_of[None] < depth[:, None]) & (positions[None] <= at[:, None])
        direct[torch.tensor(rows)] = torch.where(allowed, effect, torch.zeros_like(effect))
    return direct


def _edges(rm: ReplacementModel, clean: CleanPrompt, base: _Baseline, nodes: list[Node], target: LogitsTarget,
           position: int, gradient: Tensor, cfg: GraphConfig) -> list[Edge]:
    """Every edge from a token, feature or error node into a kept feature or the target, with its exact direct effect."""
    sources = [n for n in nodes if n.kind in ("token", "feature", "error")]
    downstream = [n for n in nodes if n.kind == "feature"] + [n for n in nodes if n.kind == "target"]
    direct = _direct_effects(rm, clean, base, sources, downstream, target, position, cfg)
    edges = []
    for b, n in enumerate(downstream):
        if n.kind == "target":
            to_target = 1.0
        else:
            tc = rm.transcoders.transcoders[n.stack_index]
            to_target = float(gradient[n.stack_index + 1, n.position] @ tc.W_dec[n.feature].detach())
        for s in direct[b].nonzero().flatten().tolist():
            d = float(direct[b, s])
            edges.append(Edge(sources[s].id, n.id, d * to_target, d))
    return edges


def _whole_graph_scores(rm: ReplacementModel, clean: CleanPrompt, base: _Baseline, attribution: _Attribution, nodes: list[Node],
                        target: LogitsTarget, position: int, cfg: GraphConfig) -> GraphScores:
    """circuit-tracer's two scores as it computes them, on the whole graph before pruning: every active feature, every
    error node and every token, with every direct effect between them (one batched pass per `batch_rows` features)."""
    tokens = [n for n in nodes if n.kind == "token"]
    target_node = next(n for n in nodes if n.kind == "target")
    inner = [Node(c.kind, c.stack_index, c.position, c.feature, 0.0, c.attribution, "")
             for c in sorted(attribution.candidates, key=lambda c: (c.stack_index, c.position))]
    sources = tokens + inner
    downstream = [n for n in inner if n.kind == "feature"] + [target_node]
    direct = _direct_effects(rm, clean, base, sources, downstream, target, position, cfg)  # [down sources]
    everything = sources + [target_node]
    at = {n.id: k for k, n in enumerate(everything)}
    adjacency = torch.zeros(len(everything), len(everything))  # float32: 30 tokens make about 30,000 nodes
    for row, n in enumerate(downstream):
        adjacency[at[n.id], :len(sources)] = direct[row]
    del direct
    return adjacency_scores(adjacency, [n.kind for n in everything], in_place=True)


def _keep_masks(rm: ReplacementModel, clean: CleanPrompt, sets: list[list[Candidate]]) -> tuple[Tensor, Tensor]:
    """(features kept [n_sets n_layers pos d_sae], error nodes kept [n_sets n_layers pos 1]) of each set of candidates."""
    n_layers, n_pos, d_sae = clean.codes.shape
    features = torch.zeros(len(sets), n_layers, n_pos, d_sae, dtype=torch.bool, device=clean.codes.device)
    errors = torch.zeros(len(sets), n_layers, n_pos, 1, dtype=torch.bool, device=clean.codes.device)
    for i, kept in enumerate(sets):
        for c in kept:
            if c.feature is None:
                errors[i, c.stack_index, c.position] = True
            else:
                features[i, c.stack_index, c.position, c.feature] = True
    return features, errors


@torch.no_grad()
def _ablated_metrics(rm: ReplacementModel, clean: CleanPrompt, base: _Baseline, target: LogitsTarget, position: int,
                     sets: list[tuple[list[Candidate], str]]) -> list[float]:
    """The target metric in the real model with each MLP replaced by the set's kept features (recomputed), every other
    feature at its baseline, and error nodes ("recomputed", "frozen", "none" or "all" recomputed; a removed one at its
    baseline), one row per set."""
    features, errors = _keep_masks(rm, clean, [kept for kept, _ in sets])
    modes = [mode for _, mode in sets]

    def mlp_out(layer: int, m_in: Tensor, real: Tensor) -> Tensor:
        tc = rm.transcoders.transcoders[layer]
        f = tc.encode(m_in)
        skip = tc.skip(m_in)
        out = tc.decode(torch.where(features[:, layer], f, base.codes[layer])) + skip
        recomputed = real - tc.decode(torch.where(base.active[layer], f, base.codes[layer])) - skip
        removed = base.errors[layer]
        for row, mode in enumerate(modes):
            if mode == "recomputed":
                out[row] += torch.where(errors[row, layer], recomputed[row], removed)
            elif mode == "frozen":
                out[row] += torch.where(errors[row, layer], base.node_errors[layer], removed)
            elif mode == "all":
                out[row] += recomputed[row]
            else:
                out[row] += removed
        out[:, 0] = real[:, 0]
        return out

    tokens = clean.tokens[None].repeat(len(sets), 1)
    return _metric(target, rm.spliced_logits(tokens, mlp_out), position).tolist()


def _faithfulness(rm: ReplacementModel, clean: CleanPrompt, base: _Baseline, target: LogitsTarget, position: int,
                  attribution: _Attribution, cfg: GraphConfig) -> tuple[dict, float]:
    kept, everything = attribution.kept, attribution.candidates
    budgets = [b for b in cfg.budgets if b < cfg.max_feature_nodes]
    by_budget = [attribution.kept[:budget_of(attribution.kept, b)] for b in budgets]
    sets = [([], "none"), (everything, "recomputed"), (kept, "recomputed"), (kept, "frozen"), (kept, "none"), (kept, "all"),
            *((k, "recomputed") for k in by_budget)]
    values = _ablated_metrics(rm, clean, base, target, position, sets)
    clean_value = float(_metric(target, clean.logits[None], position)[0])
    metric = {"clean": clean_value, "empty": values[0], "full": values[1], "graph": values[2], "graph_frozen": values[3],
              "graph_no_errors": values[4], "graph_all_errors": values[5]}
    for b, value in zip(budgets, values[6:]):
        metric[f"top{b}"] = value
    for key in [k for k in metric if k not in ("clean", "empty")]:
        metric[f"faithfulness_{key}"] = faithfulness_share(metric, metric[key], cfg.min_span)
    metric["span_defined"] = metric["faithfulness_graph"] == metric["faithfulness_graph"]
    metric["active_features"] = sum(1 for c in everything if c.feature is not None)
    metric["nodes_top"] = {f"top{b}": sum(1 for c in k if c.feature is not None) for b, k in zip(budgets, by_budget)}
    return metric, metric["faithfulness_graph"]


@torch.no_grad()
def _check_edges(rm: ReplacementModel, clean: CleanPrompt, base: _Baseline, target: LogitsTarget, position: int,
                 edges: list[Edge], nodes: dict[str, Node], cfg: GraphConfig) -> InterventionCheck:
    """Scale the term (the departure from its baseline) of the upstream node of the strongest feature / error ->
    feature / target edges by each dose in the real model, every other feature and error frozen at its clean value;
    compare the downstream change with the prediction."""
    types = {HEADLINE_TYPE, "error->feature", "feature->target", "error->target"}
    picked = [e for group in strongest_by_type(edges, nodes, cfg.n_check_edges, types).values() for e in group]
    doses = [float(d) for d in cfg.check_doses]
    if not picked:
        return intervention_check([])
    rows = [(e, dose) for e in picked for dose in [1.0, *doses]]
    n_layers, n_pos, d_sae = clean.codes.shape
    codes = base.whole_codes(clean.codes)[None].repeat(len(rows), 1, 1, 1)
    error_scale = torch.ones(len(rows), n_layers, n_pos, 1, device=codes.device)
    for r, (e, dose) in enumerate(rows):
        up = nodes[e.source]
        if up.kind == "feature":
            mean = base.codes[up.stack_index, up.feature]
            codes[r, up.stack_index, up.position, up.feature] = mean + dose * (clean.codes[up.stack_index, up.position, up.feature] - mean)
        else:
            error_scale[r, up.stack_index, up.position] = dose
    reads: dict[int, Tensor] = {}

    def mlp_out(layer: int, m_in: Tensor, real: Tensor) -> Tensor:
        tc = rm.transcoders.transcoders[layer]
        reads[layer] = tc.encode(m_in)  # [rows pos d_sae] the live code, for the downstream features
        errors = base.errors[layer] + (base.node_errors[layer] - base.errors[layer]) * error_scale[:, layer]
        out = tc.decode(codes[:, layer]) + tc.skip(m_in) + errors
        out[:, 0] = real[:, 0]
        return out

    logits = rm.spliced_logits(clean.tokens[None].repeat(len(rows), 1), mlp_out)
    metric = _metric(target, logits, position)
    values = []
    for r, (e, _) in enumerate(rows):
        down = nodes[e.target]
        values.append(float(metric[r]) if down.kind == "target" else float(reads[down.stack_index][r, down.position, down.feature]))
    checks: list[EdgeCheck] = []
    per_edge = len(doses) + 1
    for k, e in enumerate(picked):
        base = values[k * per_edge]
        kind = f"{nodes[e.source].kind}->{nodes[e.target].kind}"
        for i, dose in enumerate(doses):
            checks.append(EdgeCheck(source=e.source, target=e.target, edge_type=kind, dose=dose, predicted=(dose - 1.0) * e.direct,
                                    measured=values[k * per_edge + 1 + i] - base))
    return intervention_check(checks)


def trace_transcoders(model: HookedModel, transcoders: TranscoderSet, prompt: str, target: GraphTarget,
                      cfg: GraphConfig | None = None, means: TranscoderMeans | None = None) -> FeatureGraph:
    """The pruned, checked feature graph of `prompt` for a logit or logit-difference `target` on the transcoder basis.
    `means`: the held-out means a removed node is set to with `cfg.transcoder_ablation` "mean" (measured here over
    `cfg.mean_tokens` when not given; `transcoder_means` caches them)."""
    cfg = cfg or GraphConfig()
    if not isinstance(target, LogitsTarget):
        raise ValueError(f"the transcoder basis explains targets read from the logits (logit, logit difference), not a {target.kind} "
                         "target; trace a feature target on the residual basis (--basis residual)")
    started = time.perf_counter()
    rm = ReplacementModel(model, transcoders)
    device = next(model.parameters()).device
    transcoders.to(device)
    tokens = encode_prompts(model.tokenizer, [prompt])[0].to(device)
    check_prompt(model, tokens, cfg)
    strings = token_strings(model.tokenizer, tokens.tolist())
    for tc in transcoders.transcoders:
        tc.requires_grad_(False)
    if cfg.transcoder_ablation == "mean" and means is None:
        means = transcoder_means(model, transcoders, n_tokens=cfg.mean_tokens)
    clean = rm.clean_run(tokens)
    base = _baseline(rm, clean, means if cfg.transcoder_ablation == "mean" else None)
    position = target.position % clean.n_pos
    attribution = _attribute(rm, clean, base, target, position, cfg)
    nodes = [Node("token", -1, p, None, float(clean.embed[p].norm()), float(attribution.token_attribution[p]), strings[p])
             for p in range(1, clean.n_pos)]
    for c in attribution.kept:
        value = float(base.node_errors[c.stack_index, c.position].norm()) if c.feature is None else float(clean.codes[c.stack_index, c.position, c.feature])
        nodes.append(Node(c.kind, c.stack_index, c.position, c.feature, value, c.attribution, strings[c.position]))
    clean_value = float(_metric(target, clean.logits[None], position)[0])
    nodes.append(Node("target", rm.n_layers, position, None, clean_value, clean_value, strings[position], target.text))
    every_edge = _edges(rm, clean, base, nodes, target, position, attribution.gradient, cfg)
    edges = prune_edges(every_edge, cfg)
    metric, faithful = _faithfulness(rm, clean, base, target, position, attribution, cfg)
    checks = _check_edges(rm, clean, base, target, position, edges, {n.id: n for n in nodes}, cfg)
    scores = graph_scores(nodes, every_edge)._asdict()
    scoring = 0.0
    if cfg.whole_graph_scores:
        t0 = time.perf_counter()
        whole = _whole_graph_scores(rm, clean, base, attribution, nodes, target, position, cfg)
        scoring = time.perf_counter() - t0
        scores |= {"replacement_whole": whole.replacement, "completeness_whole": whole.completeness,
                   "whole_features": sum(c.feature is not None for c in attribution.candidates), "whole_seconds": scoring}
    hooks = [act_name("mlp_out", layer) for layer in range(rm.n_layers)]
    assert nodes[-1].id == TARGET_ID
    return FeatureGraph(prompt, strings, target, hooks, nodes, edges, metric, faithful, checks, time.perf_counter() - started - scoring,
                        {**asdict(cfg), "basis": "transcoder"}, transcoders.paths, scores)


__all__ = ["trace_transcoders"]
