"""Feature graphs: which features of a stack of residual SAEs a prompt activates, how each
layer's features feed the next, and how they produce the target (a logit, a logit
difference, or a downstream feature).

    graph = trace(model, stack, "The capital of France is", logit_target(tok, " Paris"))
    graph.faithfulness, graph.interventions.sign_agreement, graph.chain_text()

**The decomposition.** At every hook of the stack (layer i, position p >= 1; position 0, the
attention sink, is the same for every prompt and is left alone), the residual is split into
nodes that sum to it exactly:

    x_i[p] = mean_i + sum_{j active at (i, p)} (a_j - mean_j) W_dec[j] + error_i[p]

`mean_i` is the residual's mean over held-out text, `mean_j` the feature's mean activation there.
A feature node's term is its departure from its mean; the error node holds the rest (what the
SAE does not reconstruct, and the inactive features' departure from their means). Removing a
node's term is mean-ablating it; removing all of them puts the held-out mean in the residual.
Token nodes are the prompt's embeddings (less the mean embedding).

**Attribution (with the SAEs spliced in and their errors kept).** A node's attribution to the
target is its term dotted with the target's gradient at that hook (the real model's gradient,
since the nodes sum to the real residual). By default (`ig_steps`) the gradient is integrated
along the path that moves the whole hook from its held-out mean to the prompt's residual, the
rest of the model running as it does: the attributions at a hook then sum to the change of the
target when that hook is mean-ablated (Sundararajan et al. 2017; Marks et al. 2024 use it for the
same reason), which ranks nodes for the ablation below better than the gradient at the prompt
alone (on SmolLM2, median faithfulness 71% against 61% at 200 nodes; bench/inference_chains.py).
With `ig_steps=0` it is grad x term at the prompt.
An edge u -> d joins neighbouring hooks of the stack. Its direct effect is the gradient of d's
value through the blocks between the two hooks, times u's term: d's value is its
pre-activation, its own encoder's reading of the residual. For an error node, d's value is
the target gradient at d's hook dotted with its error vector. An edge's weight is its direct
effect times d's gradient on the target, so in an unpruned graph with `ig_steps=0` the weights
out of a node sum to that node's attribution. Edge gradients are taken at the prompt's own
activations.

**Pruning.** Nodes are ranked by their share of their layer's total |attribution| (each layer
is a full cut of the stream, so every layer needs its carriers), and the best are kept up to
`max_nodes`, tokens and target included. Edges between kept nodes are kept, strongest first,
until they carry `edge_share` of the total |weight|.

**Checks.** `faithfulness`: the target metric with every node outside the graph mean-ablated
at every hook, as a share of the way from everything ablated to the clean prompt. The kept
features are recomputed by their SAE from the ablated run's residual; kept error nodes keep
their clean value. `interventions`: for the top edges out of features, the upstream feature is
ablated to its mean and clamped up (its term doubled), the model runs to the next hook, and the
measured change of the downstream value is compared with the predicted one (-direct, +direct).

**Known failure modes.**
- The blocks between hooks are nonlinear (attention patterns, MLPs, norms). Gradients describe
  small changes; ablating a large term, or the whole graph at once, can move the model far from
  the point they were taken at. Faithfulness and the intervention check measure how far.
- Attributions describe the prompt's own activations, not other prompts'.
- TopK and JumpReLU features switch on and off; a kept feature can fall out of its SAE's top k
  when the run is ablated, and then contributes nothing.
- Edges join neighbouring hooks only. Paths through several hooks are chains of edges, so a
  feature's effect several layers on is carried by the features (and errors) in between.
- A large error node means the SAE does not explain that part of the computation.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import CorpusConfig, describe, heldout_corpus, load_contexts
from activations.generation import encode_prompts
from activations.io import atomic_save_safetensors
from activations.model import HookedModel, token_strings

from ..encoding import first_position
from .runner import ResidualRunner
from .stack import SAEStack


# ---------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """What the graph explains: a logit (less the mean logit), a logit difference, or a
    feature's pre-activation at one hook of the stack; at the prompt's last position by default."""

    kind: Literal["logit", "logit_diff", "feature"]
    token: int | None = None
    contrast: int | None = None
    layer: int | None = None
    """Stack index of a feature target."""
    feature: int | None = None
    position: int = -1
    text: str = ""


def _single_token(tokenizer, text: str) -> int:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        pieces = token_strings(tokenizer, ids)
        raise ValueError(f"target {text!r} is {len(ids)} tokens {pieces} for this tokenizer; a logit target must be one token "
                         f"(try {pieces[0]!r}, or mind the leading space)" if ids else f"target {text!r} is no token at all")
    return ids[0]


def logit_target(tokenizer, text: str, contrast: str | None = None, position: int = -1) -> Target:
    """The logit of the one-token `text` (less the mean logit), or its difference to `contrast`'s."""
    token = _single_token(tokenizer, text)
    if contrast is None:
        return Target("logit", token=token, position=position, text=text)
    return Target("logit_diff", token=token, contrast=_single_token(tokenizer, contrast), position=position, text=f"{text} - {contrast}")


def feature_target(stack: SAEStack, hook: str, feature: int, position: int = -1) -> Target:
    """Feature `feature` of the stack's SAE at `hook`, read by its encoder."""
    if hook not in stack.hooks:
        raise ValueError(f"{hook!r} is not a hook of the stack {stack.hooks}")
    layer = stack.hooks.index(hook)
    if layer == 0:
        raise ValueError("a feature target needs at least one SAE before it; pick a feature of a later hook")
    d_sae = stack.saes[layer].cfg.d_sae
    if not 0 <= feature < d_sae:
        raise ValueError(f"feature {feature} out of range: the SAE at {hook} has {d_sae} features (0..{d_sae - 1})")
    return Target("feature", layer=layer, feature=feature, position=position, text=f"{hook} #{feature}")


# ---------------------------------------------------------------------------------------- means
@dataclass
class StackMeans:
    """Held-out means the decomposition is relative to."""

    resid: list[Tensor]
    """[d_model] per hook of the stack."""
    features: list[Tensor]
    """[d_sae] per hook: mean activation, zeros included."""
    embed: Tensor
    """[d_model] mean token embedding."""
    n_tokens: int
    corpus: str


def stack_means(model: HookedModel, stack: SAEStack, corpus: CorpusConfig | None = None, n_tokens: int = 16_384,
                batch_contexts: int = 8, cache: str | Path | None = None) -> StackMeans:
    """Mean residual, feature activations and embedding over `n_tokens` held-out tokens (positions
    >= 1), one pass through the model; cached in `cache` (a safetensors file) when given."""
    corpus = corpus or heldout_corpus(stack.saes[0].training_data, None, stack.saes[0].cfg.context_size)
    key = {"model": str(stack.model_name), "hooks": json.dumps(stack.hooks), "n_tokens": str(n_tokens), "corpus": describe(corpus),
           "saes": json.dumps([str(p) for p in stack.paths])}
    if cache is not None and Path(cache).exists():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            if f.metadata() == key:
                t = load_file(str(cache))
                n = len(stack)
                return StackMeans([t[f"resid.{i}"] for i in range(n)], [t[f"features.{i}"] for i in range(n)], t["embed"], n_tokens, key["corpus"])
    runner = ResidualRunner(model)
    device = next(model.parameters()).device
    first = first_position(stack.saes[0])
    n_contexts = -(-n_tokens // (corpus.context_len - first))
    tokens = torch.from_numpy(load_contexts(corpus, model.tokenizer, max_contexts=n_contexts)).long()
    if len(tokens) == 0:
        raise ValueError(f"{describe(corpus)} is empty: no text for the held-out means")
    sums = [torch.zeros(stack.saes[0].cfg.d_in, dtype=torch.float64) for _ in stack.saes]
    fsums = [torch.zeros(s.cfg.d_sae, dtype=torch.float64) for s in stack.saes]
    esum, count = torch.zeros(stack.saes[0].cfg.d_in, dtype=torch.float64), 0
    with torch.no_grad():
        for b in tqdm(range(0, len(tokens), batch_contexts), desc="held-out means"):
            batch = tokens[b:b + batch_contexts].to(device)
            walk = runner.walk(batch, stack.layers)
            esum += next(walk)[:, first:].double().sum((0, 1)).cpu()
            for i, (sae, resid) in enumerate(zip(stack.saes, walk)):
                x = resid[:, first:].float()
                sums[i] += x.double().sum((0, 1)).cpu()
                fsums[i] += sae.encode(x).double().sum((0, 1)).cpu()
            count += batch[:, first:].numel()
    means = StackMeans([(s / count).float() for s in sums], [(s / count).float() for s in fsums], (esum / count).float(), count, key["corpus"])
    if cache is not None:
        tensors = {f"resid.{i}": t for i, t in enumerate(means.resid)} | {f"features.{i}": t for i, t in enumerate(means.features)}
        atomic_save_safetensors(tensors | {"embed": means.embed}, Path(cache), metadata=key)
    return means


# ---------------------------------------------------------------------------------------- the graph
@dataclass
class GraphConfig:
    max_nodes: int = 200
    """Most nodes in the graph, prompt tokens and the target included."""
    min_node_share: float = 0.002
    """Drop nodes carrying less than this share of their layer's total |attribution|."""
    edge_share: float = 0.98
    """Keep the strongest edges until they carry this share of the total |edge weight|."""
    max_edges: int = 2000
    """Most edges kept."""
    max_prompt_tokens: int = 64
    """Longest prompt accepted (tokens, BOS included)."""
    n_check_edges: int = 20
    """Top edges out of features checked by intervention (ablate, clamp up)."""
    mean_tokens: int = 16_384
    """Held-out tokens for the means that ablation uses."""
    batch_rows: int = 64
    """Rows per batched pass through a span of blocks (memory bound)."""
    budgets: list[int] = field(default_factory=lambda: [25, 50, 100])
    """Smaller node budgets whose faithfulness is also reported (same ranking)."""
    ig_steps: int = 8
    """Node attributions by integrated gradients with this many steps, one hook at a time, from
    the held-out mean to the prompt's residual (0: plain gradient x term at the prompt)."""


@dataclass
class Node:
    id: str
    kind: Literal["token", "feature", "error", "target"]
    layer: int
    """Stack index; -1 for tokens, len(stack) (or the target feature's hook) for the target."""
    position: int
    feature: int | None
    activation: float
    """Feature activation; the norm of the error / embedding term; the target metric."""
    attribution: float
    """The node's term dotted with the target's gradient (integrated from the mean with `ig_steps`):
    the change of the target the node accounts for, to first order (its removal: minus this)."""
    token: str = ""
    label: str = ""


@dataclass
class Edge:
    source: str
    target: str
    weight: float
    """Effect on the target metric carried along this edge (direct effect x the downstream node's gradient)."""
    direct: float
    """Effect on the downstream node's own value (pre-activation; target units for errors and the target)."""


@dataclass
class InterventionCheck:
    edges: list[dict]
    """Per checked edge: source, target, predicted and measured change for ablate and clamp."""
    sign_agreement: float
    correlation: float


@dataclass
class FeatureGraph:
    prompt: str
    tokens: list[str]
    target: Target
    hooks: list[str]
    nodes: list[Node]
    edges: list[Edge]
    metric: dict
    """clean, all ablated (empty), graph alone, every node kept (full), and per smaller budget."""
    faithfulness: float
    """(graph - empty) / (clean - empty): the share of the target metric the graph alone keeps."""
    interventions: InterventionCheck
    seconds: float
    config: dict
    sae_paths: list[str] = field(default_factory=list)

    def node(self, node_id: str) -> Node:
        return self._by_id()[node_id]

    def _by_id(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def summary(self) -> str:
        kinds = {k: sum(n.kind == k for n in self.nodes) for k in ("token", "feature", "error", "target")}
        m = self.metric
        return (f"{self.n_nodes} nodes ({kinds['feature']} features, {kinds['error']} errors, {kinds['token']} tokens, 1 target), "
                f"{len(self.edges)} edges, {self.seconds:.1f} s | target {self.target.text!r}: clean {m['clean']:.3f}, "
                f"all ablated {m['empty']:.3f}, graph alone {m['graph']:.3f} -> faithfulness {self.faithfulness:.1%} | "
                f"top-{len({(r['source'], r['target']) for r in self.interventions.edges})} edges (ablate and clamp each): sign agreement {self.interventions.sign_agreement:.0%}, "
                f"correlation {self.interventions.correlation:.3f}")

    def chain(self, through_features: bool = True, readable_share: float = 0.25) -> list[Node]:
        """The strongest path into the target: from the target, the incoming edge of largest
        |weight| at each step, back to a token (or a node with no kept inputs). With
        `through_features`, a step takes the strongest edge out of a feature or token when it
        carries at least `readable_share` of the strongest edge's |weight|, so the chain reads as
        features where they carry a fair part; otherwise it goes through the error node."""
        by_id, incoming = self._by_id(), {}
        for e in self.edges:
            incoming.setdefault(e.target, []).append(e)
        path, current, seen = [], next(n for n in self.nodes if n.kind == "target"), set()
        while current.id not in seen:
            seen.add(current.id)
            path.append(current)
            edges = incoming.get(current.id)
            if not edges:
                break
            strongest = max(edges, key=lambda e: abs(e.weight))
            readable = [e for e in edges if not e.source.startswith("E")] if through_features else []
            best_readable = max(readable, key=lambda e: abs(e.weight)) if readable else None
            if best_readable is not None and abs(best_readable.weight) >= readable_share * abs(strongest.weight):
                strongest = best_readable
            current = by_id[strongest.source]
        return path[::-1]

    def chain_text(self) -> str:
        """The strongest chain in words, from the node labels."""
        def words(n: Node) -> str:
            if n.kind == "token":
                return f"token {n.token!r} (pos {n.position})"
            if n.kind == "error":
                return f"[{self.hooks[n.layer]} error at {n.token!r}]"
            if n.kind == "target":
                return f"=> {self.target.text!r}"
            return f"{self.hooks[n.layer].split('.hook')[0]} #{n.feature} at {n.token!r} \"{n.label or 'unlabelled'}\""
        return "\n  -> ".join(words(n) for n in self.chain())

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "tokens": self.tokens, "target": asdict(self.target), "hooks": self.hooks,
                "nodes": [asdict(n) for n in self.nodes], "edges": [asdict(e) for e in self.edges], "metric": self.metric,
                "faithfulness": self.faithfulness, "interventions": asdict(self.interventions), "seconds": self.seconds,
                "config": self.config, "sae_paths": self.sae_paths}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureGraph":
        return cls(d["prompt"], d["tokens"], Target(**d["target"]), d["hooks"], [Node(**n) for n in d["nodes"]],
                   [Edge(**e) for e in d["edges"]], d["metric"], d["faithfulness"], InterventionCheck(**d["interventions"]),
                   d["seconds"], d["config"], d.get("sae_paths", []))


@contextmanager
def _frozen(*modules):
    """Parameters without gradients for the duration (only activations need them)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _Layer:
    """One hook's decomposition on the prompt: x = mean + delta @ W_dec + error, positions >= first."""

    def __init__(self, sae, x: Tensor, mean_x: Tensor, mean_f: Tensor, first: int):
        self.sae, self.first = sae, first
        self.W_dec = sae.W_dec.detach().float()
        self.mean_x, self.mean_f = mean_x, mean_f
        self.x = x  # [P d]
        acts = sae.encode(x)
        acts[:first] = 0
        self.active = acts > 0  # [P d_sae]
        self.acts = acts
        self.delta = (acts - mean_f) * self.active  # [P d_sae]
        self.error = x - mean_x - self.delta @ self.W_dec  # [P d]
        self.error[:first] = 0

    def error_of(self, x: Tensor) -> Tensor:
        """The error term of residuals x [..., P, d] (active sets recomputed)."""
        acts = self.sae.encode(x)
        delta = (acts - self.mean_f) * (acts > 0)
        return x - self.mean_x - delta @ self.W_dec


def _metric(target: Target, logits: Tensor) -> Tensor:
    """logits [batch d_vocab] at the target position -> [batch]."""
    if target.kind == "logit":
        return logits[:, target.token] - logits.mean(-1)
    return logits[:, target.token] - logits[:, target.contrast]


def check_prompt(model: HookedModel, tokens: Tensor, cfg: GraphConfig) -> None:
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    limit = min(cfg.max_prompt_tokens, n_ctx) if n_ctx else cfg.max_prompt_tokens
    if len(tokens) > limit:
        raise ValueError(f"the prompt is {len(tokens)} tokens (BOS included), longer than the limit of {limit} "
                         f"(GraphConfig.max_prompt_tokens={cfg.max_prompt_tokens}" + (f", the model's context {n_ctx}" if n_ctx else "") + ")")
    if len(tokens) < 2:
        raise ValueError("the prompt is empty: a graph needs at least one token after BOS")


def trace(model: HookedModel, stack: SAEStack, prompt: str, target: Target, cfg: GraphConfig | None = None,
          means: StackMeans | None = None, labels: dict | None = None) -> FeatureGraph:
    """The pruned, checked feature graph of `prompt` for `target` through `stack`."""
    cfg = cfg or GraphConfig()
    stack.check_model(model)
    started = time.perf_counter()
    device = next(model.parameters()).device
    stack.to(device)
    tokens = encode_prompts(model.tokenizer, [prompt])[0].to(device)
    check_prompt(model, tokens, cfg)
    means = means or stack_means(model, stack, n_tokens=cfg.mean_tokens)
    with _frozen(model, *stack.saes):
        return _trace(model, stack, prompt, tokens, target, cfg, means, labels or {}, started)


def _trace(model, stack, prompt, tokens, target, cfg, means, labels, started) -> FeatureGraph:
    runner = ResidualRunner(model)
    n_pos = len(tokens)
    pos = target.position % n_pos
    first = first_position(stack.saes[0])
    n_stack = target.layer if target.kind == "feature" else len(stack)  # hooks whose nodes the graph has
    layers = stack.layers
    mean_x = [m.to(tokens.device) for m in means.resid]
    mean_f = [m.to(tokens.device) for m in means.features]
    mean_emb = means.embed.to(tokens.device)

    # ---- the clean pass with gradients of the target at every hook
    emb = runner.embed(tokens[None]).detach().requires_grad_(True)
    resid, start, xs = emb, 0, []
    for i in range(n_stack):
        resid = runner.blocks(resid, start, layers[i])
        xs.append(resid)
        start = layers[i]
    metric = _target_value(runner, stack, target, resid, start, pos)[0]
    grad_emb, *grads = (g[0].detach() for g in torch.autograd.grad(metric, [emb, *xs]))  # [P d] each
    clean_metric = float(metric.detach())
    dec = [_Layer(stack.saes[i], xs[i][0].detach().float(), mean_x[i], mean_f[i], first) for i in range(n_stack)]
    emb_term = emb[0].detach() - mean_emb
    emb_term[:first] = 0

    # ---- node attributions (grad x term, or integrated gradients from the mean)
    strings = token_strings(model.tokenizer, tokens.tolist())
    if cfg.ig_steps > 0:
        grad_emb_attr, *attr_grads = _path_gradients(runner, stack, target, [emb[0].detach(), *(d.x for d in dec)],
                                                     [mean_emb, *mean_x], [0, *layers[:n_stack]], pos, first, cfg.ig_steps)
    else:
        grad_emb_attr, attr_grads = grad_emb, grads
    candidates = []  # (share, layer, position, feature or -1, attribution)
    for i, d in enumerate(dec):
        feature_attr = d.delta * (attr_grads[i] @ d.W_dec.T)  # [P d_sae]
        error_attr = (d.error * attr_grads[i]).sum(-1)  # [P]
        total = max(float(feature_attr.abs().sum() + error_attr[first:].abs().sum()), 1e-30)  # 0 when nothing reaches the target
        ps, js = d.active.nonzero(as_tuple=True)
        for p, j, a in zip(ps.tolist(), js.tolist(), feature_attr[ps, js].tolist()):
            candidates.append((abs(a) / total, i, p, j, a))
        for p in range(first, n_pos):
            candidates.append((abs(float(error_attr[p])) / total, i, p, -1, float(error_attr[p])))
    token_attr = (emb_term * grad_emb_attr).sum(-1)
    candidates.sort(key=lambda c: -c[0])
    n_tokens = n_pos - first
    budget = max(0, cfg.max_nodes - n_tokens - 1)
    ranked = [c for c in candidates if c[0] >= cfg.min_node_share]

    def node_id(i: int, p: int, j: int) -> str:
        return f"E{i}_{p}" if j < 0 else f"F{i}_{j}_{p}"

    nodes = [Node(f"T{p}", "token", -1, p, None, float(emb_term[p].norm()), float(token_attr[p]), strings[p]) for p in range(first, n_pos)]
    kept = ranked[:budget]
    for share, i, p, j, a in kept:
        if j < 0:
            nodes.append(Node(node_id(i, p, j), "error", i, p, None, float(dec[i].error[p].norm()), a, strings[p]))
        else:
            nodes.append(Node(node_id(i, p, j), "feature", i, p, j, float(dec[i].acts[p, j]), a, strings[p],
                              labels.get((i, j), "")))
    target_node = Node("target", "target", n_stack, pos, target.feature, clean_metric, clean_metric, strings[pos], target.text)
    nodes.append(target_node)

    # ---- edges between kept nodes of neighbouring hooks
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for _, i, p, j, _ in kept:
        by_layer.setdefault(i, []).append((p, j))
    edges = []
    for i in range(n_stack):
        downstream = by_layer.get(i, [])
        if not downstream:
            continue
        G = _readout_gradients(runner, stack, dec, grads, i, downstream, emb[0].detach() if i == 0 else dec[i - 1].x,
                               0 if i == 0 else layers[i - 1], layers[i], cfg.batch_rows)  # [n P d]
        for row, (q, j) in enumerate(downstream):
            gain = 1.0 if j < 0 else float(grads[i][q] @ dec[i].W_dec[j])  # d's gradient on the target
            for src, direct in _upstream_effects(G[row], q, i, dec, by_layer, emb_term, first):
                edges.append(Edge(src, node_id(i, q, j), direct * gain, direct))
    for share, i, p, j, a in kept:  # the last hook's nodes feed the target directly
        if i == n_stack - 1:
            d = dec[i]
            direct = float(grads[i][p] @ (d.error[p] if j < 0 else d.delta[p, j] * d.W_dec[j]))  # grad x term at the prompt
            edges.append(Edge(node_id(i, p, j), "target", direct, direct))
    edges = _prune_edges(edges, cfg)

    # ---- faithfulness: the graph alone, every node kept, nothing kept, smaller budgets
    keep_sets = {"graph": kept, "full": candidates, "empty": []} | {f"top{b}": ranked[:max(0, b - n_tokens - 1)] for b in cfg.budgets}
    values = _ablated_metrics(runner, stack, dec, target, tokens, list(keep_sets.values()), n_stack, pos, first, cfg.batch_rows)
    metric_values = {"clean": clean_metric} | dict(zip(keep_sets, values))
    span = metric_values["clean"] - metric_values["empty"]
    faithfulness = (metric_values["graph"] - metric_values["empty"]) / span if abs(span) > 1e-9 else float("nan")
    metric_values |= {f"faithfulness_{k}": (v - metric_values["empty"]) / span if abs(span) > 1e-9 else float("nan")
                      for k, v in metric_values.items() if k.startswith("top")}
    metric_values["nodes_top"] = {f"top{b}": max(n_tokens + 1, min(b, n_tokens + 1 + len(ranked))) for b in cfg.budgets}  # tokens + target always

    checks = _check_edges(runner, stack, dec, grads, target, edges, tokens, emb_term, layers, n_stack, pos, clean_metric, cfg)
    return FeatureGraph(prompt, strings, target, stack.hooks[:n_stack], nodes, edges, metric_values, faithfulness, checks,
                        time.perf_counter() - started, asdict(cfg), [str(p) if p is not None else "" for p in stack.paths])


def _target_value(runner, stack, target: Target, resid: Tensor, start: int, pos: int) -> Tensor:
    """The target metric [batch] from the residual after the last node hook (after `start` blocks)."""
    if target.kind == "feature":
        sae = stack.saes[target.layer]
        x = runner.blocks(resid, start, stack.layers[target.layer])
        return sae.pre_acts(x[:, pos])[:, target.feature]
    logits = runner.logits(runner.blocks(resid, start, runner.n_layers))
    return _metric(target, logits[:, pos])


def _path_gradients(runner, stack, target: Target, xs: list[Tensor], means: list[Tensor], starts: list[int], pos: int, first: int,
                    steps: int) -> list[Tensor]:
    """For each point xs[h] [P d] (the embedding, then each hook, after starts[h] blocks): the target's
    gradient averaged along the straight path from the held-out mean to xs[h] (positions >= first;
    midpoint rule), the rest of the model running as it does. Each is [P d]."""
    alphas = (torch.arange(steps, dtype=torch.float32, device=xs[0].device) + 0.5) / steps
    out = []
    for x, mean, start in zip(xs, means, starts):
        path = x[None].repeat(steps, 1, 1)
        mean = mean[first:] if mean.dim() == 2 else mean  # a mean per position [P d], or one [d]
        path[:, first:] = mean + alphas[:, None, None] * (x[first:] - mean)
        path.requires_grad_(True)
        with torch.enable_grad():
            value = _target_value(runner, stack, target, path, start, pos).sum()
            out.append(torch.autograd.grad(value, path)[0].mean(0))
    return out


def _readouts(stack, dec, grads, i: int, downstream: list[tuple[int, int]]) -> Tensor:
    """What each downstream node at hook i reads from the residual there [n d]: its encoder
    column for a feature; for an error node, the gradient of (target gradient . error)."""
    sae, rows = stack.saes[i], []
    err_read = None
    for q, j in downstream:
        if j >= 0:
            rows.append(sae.W_enc.detach()[:, j].float())
            continue
        if err_read is None:
            x = dec[i].x.clone().requires_grad_(True)
            with torch.enable_grad():
                err_read = torch.autograd.grad((dec[i].error_of(x) * grads[i]).sum(), x)[0]
        rows.append(err_read[q])
    return torch.stack(rows)


def _readout_gradients(runner, stack, dec, grads, i: int, downstream, upstream_resid: Tensor, start: int, stop: int,
                       batch_rows: int) -> Tensor:
    """d(downstream value)/d(residual after `start` blocks) for every downstream node [n P d]."""
    read = _readouts(stack, dec, grads, i, downstream)
    positions = torch.tensor([q for q, _ in downstream], device=read.device)
    out = []
    for b in range(0, len(downstream), batch_rows):
        rows = slice(b, b + batch_rows)
        x = upstream_resid[None].expand(len(read[rows]), -1, -1).clone().requires_grad_(True)
        with torch.enable_grad():
            y = runner.blocks(x, start, stop)
            picked = y[torch.arange(len(x)), positions[rows]]  # [n d]
            out.append(torch.autograd.grad((picked * read[rows]).sum(), x)[0])
    return torch.cat(out)


def _upstream_effects(G: Tensor, q: int, i: int, dec, by_layer, emb_term: Tensor, first: int):
    """(source id, direct effect) of every kept node at the hook before i (tokens before hook 0) at
    positions <= q (attention is causal: later positions have no effect), given the gradient G [P d]
    there of the downstream node at position q."""
    if i == 0:
        effects = (G * emb_term).sum(-1)
        for p in range(first, q + 1):
            yield f"T{p}", float(effects[p])
        return
    up = dec[i - 1]
    for p, j in by_layer.get(i - 1, []):
        if p > q:
            continue
        if j < 0:
            yield f"E{i - 1}_{p}", float(G[p] @ up.error[p])
        else:
            yield f"F{i - 1}_{j}_{p}", float(up.delta[p, j] * (G[p] @ up.W_dec[j]))


def _prune_edges(edges: list[Edge], cfg: GraphConfig) -> list[Edge]:
    edges = sorted(edges, key=lambda e: -abs(e.weight))
    total = sum(abs(e.weight) for e in edges)
    kept, running = [], 0.0
    for e in edges[:cfg.max_edges]:
        if cfg.edge_share < 1 and total > 0 and running >= cfg.edge_share * total:
            break
        kept.append(e)
        running += abs(e.weight)
    return kept


def _ablated_metrics(runner, stack, dec, target, tokens, keep_sets: list, n_stack: int, pos: int, first: int, batch_rows: int) -> list[float]:
    """The target metric with every node outside each keep set mean-ablated at every hook."""
    n_pos, values = len(tokens), []
    for b in range(0, len(keep_sets), batch_rows):
        sets = keep_sets[b:b + batch_rows]
        feature_masks = [torch.zeros(len(sets), n_pos, d.W_dec.shape[0], dtype=torch.bool, device=tokens.device) for d in dec]
        error_masks = [torch.zeros(len(sets), n_pos, 1, device=tokens.device) for _ in dec]
        for g, kept in enumerate(sets):
            for _, i, p, j, _ in kept:
                if j < 0:
                    error_masks[i][g, p] = 1
                else:
                    feature_masks[i][g, p, j] = True
        with torch.no_grad():
            resid, start = runner.embed(tokens[None]).expand(len(sets), -1, -1), 0
            for i in range(n_stack):
                x = runner.blocks(resid, start, stack.layers[i])
                start = stack.layers[i]
                d = dec[i]
                acts = d.sae.encode(x)
                delta = (acts - d.mean_f) * (acts > 0) * feature_masks[i]
                new = d.mean_x + delta @ d.W_dec + error_masks[i] * d.error
                resid = torch.cat([x[:, :first], new[:, first:]], dim=1)
            values += _target_value(runner, stack, target, resid, start, pos).tolist()
    return values


def _check_edges(runner, stack, dec, grads, target, edges, tokens, emb_term, layers, n_stack, pos, clean_metric, cfg) -> InterventionCheck:
    """Ablate / clamp up the upstream feature of the top edges out of features; compare the measured
    change of the downstream value at the next hook with the predicted one."""
    chosen = [e for e in edges if e.source.startswith("F")][:cfg.n_check_edges]
    rows = []
    for e in chosen:
        i, j, p = (int(v) for v in e.source[1:].split("_"))
        step = dec[i].delta[p, j] * dec[i].W_dec[j]  # the feature's term [d]
        for sign in (-1.0, 1.0):  # ablate to the mean; double the term
            rows.append((e, i, p, sign * step, sign * e.direct))
    measured = []
    for e, i, p, change, _ in rows:
        x = dec[i].x.clone()
        x[p] = x[p] + change
        with torch.no_grad():
            measured.append(_downstream_value(runner, stack, dec, grads, target, e.target, x[None], layers, i, pos) - _downstream_clean(dec, grads, e.target, clean_metric))
    out = [{"source": e.source, "target": e.target, "intervention": "ablate" if pred_sign < 0 else "clamp",
            "predicted": predicted, "measured": m} for (e, _, _, _, predicted), m, pred_sign in
           zip(rows, measured, [-1.0, 1.0] * len(chosen))]
    if not out:
        return InterventionCheck([], float("nan"), float("nan"))
    pred = torch.tensor([r["predicted"] for r in out], dtype=torch.float64)
    meas = torch.tensor([r["measured"] for r in out], dtype=torch.float64)
    agree = float(((pred.sign() == meas.sign()) | ((pred.abs() < 1e-9) & (meas.abs() < 1e-9))).double().mean())  # 36/40 is 0.9
    corr = float(torch.corrcoef(torch.stack([pred, meas]))[0, 1]) if len(out) > 2 else float("nan")
    return InterventionCheck(out, agree, corr)


def _parse(node_id: str) -> tuple[int, int, int]:
    """(layer, position, feature or -1) of a feature / error node id."""
    if node_id.startswith("E"):
        i, p = (int(v) for v in node_id[1:].split("_"))
        return i, p, -1
    i, j, p = (int(v) for v in node_id[1:].split("_"))
    return i, p, j


def _downstream_clean(dec, grads, node_id: str, clean_metric: float) -> float:
    if node_id == "target":
        return clean_metric
    i, q, j = _parse(node_id)
    if j < 0:
        return float(grads[i][q] @ dec[i].error[q])
    return float(dec[i].sae.pre_acts(dec[i].x[q])[j])


def _downstream_value(runner, stack, dec, grads, target, node_id: str, x_up: Tensor, layers, i_up: int, pos: int) -> float:
    """The downstream node's value when the residual at hook `i_up` is x_up [1 P d] (the model runs on from there)."""
    if node_id == "target":
        return float(_target_value(runner, stack, target, x_up, layers[i_up], pos)[0])
    i, q, j = _parse(node_id)
    y = runner.blocks(x_up, layers[i_up], layers[i])[0]
    if j < 0:
        return float(grads[i][q] @ dec[i].error_of(y)[q])
    return float(dec[i].sae.pre_acts(y[q])[j])
