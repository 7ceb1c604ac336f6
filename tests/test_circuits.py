"""Feature graphs through a stack of SAEs (analysis/circuits) on the tiny random models: every
edge and node attribution against a finite difference computed here with plain TransformerLens
hooks, identity SAEs (error nodes only) against the model's own gradient, ablation against a
hand-written mean ablation, the bad inputs a user meets, the exports, matching, and the CLI."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from activations.corpus import CorpusConfig
from activations.generation import encode_prompts
from analysis.circuits.export import graph_html, neuronpedia_json, write_graph
from analysis.circuits.graph import FeatureGraph, GraphConfig, feature_target, logit_target, stack_means, trace
from analysis.circuits.matching import layer_matches, match_saes
from analysis.circuits.runner import ResidualRunner
from analysis.circuits.stack import SAEStack, load_stack, write_stack_manifest
from sae import ARCHITECTURES, SAEConfig

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
PROMPT = "the cat sat on"
EVERYTHING = GraphConfig(max_feature_nodes=100_000, min_node_share=0.0, edge_share=1.0, max_edges=10 ** 7, n_check_edges=6, budgets=[],
                         ig_steps=0)  # plain grad x term: the finite differences below check it exactly


def relu_sae(hook: str, d_in: int = 32, d_sae: int = 48, seed: int = 0, model_name: str = "tiny", b_enc: float = 0.0):
    """A random ReLU SAE (about half its features fire on any input)."""
    sae = ARCHITECTURES["standard"](SAEConfig(architecture="standard", d_in=d_in, d_sae=d_sae, hook_name=hook,
                                              model_name=model_name, context_size=32), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.fill_(b_enc)
    return sae.eval()


@pytest.fixture(scope="module")
def tiny_stack():
    return SAEStack([relu_sae(h, seed=i) for i, h in enumerate(HOOKS)], [None, None])


@pytest.fixture(scope="module")
def means(tiny_model, tiny_stack, text_corpus):
    corpus = CorpusConfig(source=str(text_corpus), split="heldout", context_len=32)
    return stack_means(tiny_model, tiny_stack, corpus, n_tokens=1500)


@pytest.fixture(scope="module")
def full_graph(tiny_model, tiny_stack, means) -> FeatureGraph:
    target = logit_target(tiny_model.tokenizer, " ")
    return trace(tiny_model, tiny_stack, PROMPT, target, EVERYTHING, means=means)


def tokens_of(model, prompt=PROMPT):
    return encode_prompts(model.tokenizer, [prompt])[0][None]


def run_with_added(model, tokens, hook: str, position: int, vector, read: str | None = None):
    """The model with `vector` added at (hook, position): (logits [1 P V], the activation at `read` [1 P d])."""
    seen = {}

    def add(act, hook):
        act = act.clone()
        act[0, position] += vector
        return act

    def keep(act, hook):
        seen["x"] = act.detach().clone()

    hooks = [(hook, add)] + ([(read, keep)] if read else [])
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return logits, seen.get("x")


def metric_of(logits, token: int):
    last = logits[0, -1]
    return float(last[token] - last.mean())


def central_difference(f, h: float = 1e-2) -> float:
    return (f(h) - f(-h)) / (2 * h)


def parse(node_id: str):
    """(layer, position, feature or None) of a node id: T{p}, E{i}_{p}, F{i}_{j}_{p}."""
    if node_id.startswith("T"):
        return -1, int(node_id[1:]), None
    if node_id.startswith("E"):
        i, p = node_id[1:].split("_")
        return int(i), int(p), None
    i, j, p = node_id[1:].split("_")
    return int(i), int(p), int(j)


def term_of(graph_nodes, node_id, model, tokens, stack, means):
    """The vector a node adds to the residual at its hook (recomputed here, not read from the graph)."""
    layer, p, j = parse(node_id)
    with torch.no_grad():
        if layer < 0:
            emb = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")[1]["blocks.0.hook_resid_pre"][0]
            return "blocks.0.hook_resid_pre", p, emb[p] - means.embed
        hook = stack.hooks[layer]
        x = model.run_with_cache(tokens, names_filter=hook)[1][hook][0]
        sae = stack.saes[layer]
        acts = sae.encode(x)
        acts[0] = 0
        delta = (acts - means.features[layer]) * (acts > 0)
        if j is not None:
            return hook, p, delta[p, j] * sae.W_dec[j]
        return hook, p, (x - means.resid[layer] - delta @ sae.W_dec)[p]


def downstream_value(node_id, x_at_hook, stack, grads=None):
    """The value an edge into `node_id` moves: a feature's pre-activation (its encoder's reading)."""
    layer, q, j = parse(node_id)
    with torch.no_grad():
        return float(stack.saes[layer].pre_acts(x_at_hook[0, q])[j])


def test_the_runner_composes_to_the_models_hooks_and_logits(tiny_model, tiny_bridge):
    from activations.model import run_to_hooks

    for model in (tiny_model, tiny_bridge):
        runner = ResidualRunner(model)
        tokens = tokens_of(model, "qwx zq wx")
        hooks = run_to_hooks(model, tokens, [f"blocks.{i}.hook_resid_post" for i in range(2)])
        emb, after0, after1 = runner.walk(tokens, [1, 2])
        torch.testing.assert_close(after0, hooks["blocks.0.hook_resid_post"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(after1, hooks["blocks.1.hook_resid_post"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(runner.blocks(after0, 1, 2), after1, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            logits = model(tokens) if model is tiny_model else model.original_model(input_ids=tokens).logits
        torch.testing.assert_close(runner.logits(after1), logits, atol=1e-4, rtol=1e-4)


def test_edge_attributions_match_finite_differences(tiny_model, tiny_stack, means, full_graph):
    """direct(u -> d) is d's value's derivative along u's term; measured here by nudging u's term
    with a plain hook and reading d's pre-activation at the next hook."""
    model, stack, graph = tiny_model, tiny_stack, full_graph
    tokens = tokens_of(model)
    by_kind = {}
    for e in graph.edges:
        kind = (e.source[0], e.target[0])
        by_kind.setdefault(kind, []).append(e)
    assert {("T", "F"), ("F", "F"), ("E", "F"), ("F", "t"), ("E", "t")} <= set(by_kind)
    checked = 0
    for kind, edges in by_kind.items():
        if kind[1] == "E":
            continue  # an error node's value is target-gradient units; the node sums below cover it
        for e in sorted(edges, key=lambda e: -abs(e.direct))[:3]:
            hook, p, term = term_of(graph.nodes, e.source, model, tokens, stack, means)
            if e.target == "target":
                token = graph.target.token
                measured = central_difference(lambda h: metric_of(run_with_added(model, tokens, hook, p, h * term)[0], token))  # noqa: B023
            else:
                read = stack.hooks[parse(e.target)[0]]
                measured = central_difference(lambda h: downstream_value(e.target, run_with_added(model, tokens, hook, p, h * term, read)[1], stack))  # noqa: B023
            assert measured == pytest.approx(e.direct, rel=2e-2, abs=2e-3 * max(1.0, abs(e.direct))), (e.source, e.target)
            checked += 1
    assert checked >= 10
    assert max(abs(e.direct) for e in by_kind[("F", "F")]) > 1e-2  # the edges are not all ~0


def test_node_attributions_match_finite_differences_and_sum_over_out_edges(tiny_model, tiny_stack, means, full_graph):
    model, stack, graph = tiny_model, tiny_stack, full_graph
    tokens, token = tokens_of(model), graph.target.token
    nodes = [n for n in graph.nodes if n.kind != "target"]
    for n in sorted(nodes, key=lambda n: -abs(n.attribution))[:8]:
        hook, p, term = term_of(graph.nodes, n.id, model, tokens, stack, means)
        measured = central_difference(lambda h: metric_of(run_with_added(model, tokens, hook, p, h * term)[0], token))  # noqa: B023
        assert measured == pytest.approx(n.attribution, rel=2e-2, abs=2e-3), n.id
    # with every node kept, the weights out of a node sum to its attribution (the chain rule, exactly)
    out = {}
    for e in graph.edges:
        out[e.source] = out.get(e.source, 0.0) + e.weight
    for n in nodes:
        assert out.get(n.id, 0.0) == pytest.approx(n.attribution, rel=1e-3, abs=1e-5), n.id


def test_identity_saes_reduce_the_graph_to_the_models_gradient(tiny_model, text_corpus):
    """SAEs that never fire: every node is an error node (or a token) and its attribution is the
    model's own gradient at the hook times (activation - held-out mean)."""
    model = tiny_model
    stack = SAEStack([relu_sae(h, seed=i, b_enc=-1e4) for i, h in enumerate(HOOKS)], [None, None])
    corpus = CorpusConfig(source=str(text_corpus), split="heldout", context_len=32)
    means = stack_means(model, stack, corpus, n_tokens=1000)
    target = logit_target(model.tokenizer, " ")
    graph = trace(model, stack, PROMPT, target, EVERYTHING, means=means)
    assert {n.kind for n in graph.nodes} == {"token", "error", "target"}
    tokens = tokens_of(model)
    for layer, hook in enumerate(["blocks.0.hook_resid_pre", *HOOKS]):
        leaf = {}

        def capture(act, hook):
            leaf["x"] = act.detach().clone().requires_grad_(True)  # noqa: B023  (called within this iteration)
            return leaf["x"]  # noqa: B023

        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, capture)])
            grad = torch.autograd.grad(logits[0, -1, target.token] - logits[0, -1].mean(), leaf["x"])[0][0]
        mean = means.embed if layer == 0 else means.resid[layer - 1]
        expected = ((leaf["x"][0] - mean) * grad).sum(-1).detach()
        for p in range(1, tokens.shape[1]):
            node = graph.node(f"T{p}" if layer == 0 else f"E{layer - 1}_{p}")
            assert node.attribution == pytest.approx(float(expected[p]), rel=1e-3, abs=1e-5)
    # keeping every node gives back the clean run
    assert graph.metric["full"] == pytest.approx(graph.metric["clean"], abs=1e-4)


def test_ablation_matches_a_hand_written_mean_ablation(tiny_model, tiny_stack, means, full_graph):
    graph, tokens = full_graph, tokens_of(tiny_model)
    assert graph.metric["full"] == pytest.approx(graph.metric["clean"], abs=1e-4)  # every node kept: the clean run
    assert graph.faithfulness == pytest.approx(1.0, abs=1e-3)

    def to_mean(i):
        def edit(act, hook):
            act = act.clone()
            act[0, 1:] = means.resid[i]
            return act
        return edit

    with torch.no_grad():
        logits = tiny_model.run_with_hooks(tokens, fwd_hooks=[(h, to_mean(i)) for i, h in enumerate(HOOKS)])
    assert graph.metric["empty"] == pytest.approx(metric_of(logits, graph.target.token), abs=1e-4)
    assert abs(graph.metric["clean"] - graph.metric["empty"]) > 0.05  # the check can fail


def test_pruned_graph_budget_and_interventions(tiny_model, tiny_stack, means):
    cfg = GraphConfig(max_feature_nodes=25, n_check_edges=5, budgets=[10, 20])
    graph = trace(tiny_model, tiny_stack, PROMPT, logit_target(tiny_model.tokenizer, " ", contrast="a"), cfg, means=means)
    assert graph.counts()["feature"] == 25 and graph.target.kind == "logit_diff"  # the budget counts feature nodes only
    ids = {n.id for n in graph.nodes}
    assert 0 < len(graph.edges) and all(e.source in ids and e.target in ids for e in graph.edges)
    positions = {n.id: n.position for n in graph.nodes}
    assert all(positions[e.source] <= positions[e.target] for e in graph.edges)  # causal: no edge from a later position
    # the graph alone, ablated by hand: at each hook, the held-out mean plus the kept features (re-encoded
    # from this run's residual) plus the kept error nodes, recomputed from this run's residual or frozen
    # at their clean values, positions >= 1
    kept = {(n.stack_index, n.position, n.feature) for n in graph.nodes if n.kind in ("feature", "error")}
    assert any(f is None for _, _, f in kept)  # error nodes are kept beside the 25 features
    tokens = tokens_of(tiny_model)
    clean = {h: x[0] for h, x in tiny_model.run_with_cache(tokens, names_filter=HOOKS)[1].items()}

    def graph_only(i, recompute: bool):
        sae = tiny_stack.saes[i]

        def error_of(x):
            acts = sae.encode(x)
            return x - means.resid[i] - ((acts - means.features[i]) * (acts > 0)) @ sae.W_dec

        def edit(act, hook):
            acts = sae.encode(act[0])
            error = error_of(act[0]) if recompute else error_of(clean[HOOKS[i]])
            out = act.clone()
            for p in range(1, act.shape[1]):
                mask = torch.tensor([(i, p, j) in kept for j in range(sae.cfg.d_sae)])
                out[0, p] = means.resid[i] + ((acts[p] - means.features[i]) * (acts[p] > 0) * mask) @ sae.W_dec + \
                    (error[p] if (i, p, None) in kept else 0)
            return out
        return edit

    for key, recompute in (("graph", True), ("graph_frozen", False)):
        with torch.no_grad():
            logits = tiny_model.run_with_hooks(tokens, fwd_hooks=[(h, graph_only(i, recompute)) for i, h in enumerate(HOOKS)])
        last = logits[0, -1]
        assert graph.metric[key] == pytest.approx(float(last[graph.target.token] - last[graph.target.contrast]), abs=1e-4), key
    assert graph.metric["graph"] != pytest.approx(graph.metric["graph_frozen"], abs=1e-4)  # the two definitions differ here
    assert set(graph.metric["nodes_top"]) == {"top10", "top20"} and graph.metric["nodes_top"]["top10"] == 10
    assert "faithfulness_top10" in graph.metric and "faithfulness_graph_no_errors" in graph.metric
    # the intervention check: each distinct edge once per dose, predicted = (dose - 1) x direct
    rows, doses = graph.interventions.edges, cfg.check_doses
    distinct = {(r["source"], r["target"]) for r in rows}
    assert len(rows) == len(doses) * len(distinct) and {r["dose"] for r in rows} == set(doses)
    types = {r["edge_type"] for r in rows}
    assert {"feature->feature", "feature->target", "token->feature"} <= types
    assert all(sum(kind == t for _, _, kind in {(r["source"], r["target"], r["edge_type"]) for r in rows}) <= 5 for t in types)
    for r in rows:
        edge = next(e for e in graph.edges if (e.source, e.target) == (r["source"], r["target"]))
        assert r["predicted"] == pytest.approx((r["dose"] - 1) * edge.direct)
    # one feature -> feature ablation measured by hand: the upstream term removed at its hook, the downstream
    # feature's activation (after its nonlinearity) read at the next hook
    r = next(r for r in rows if r["dose"] == 0 and r["edge_type"] == "feature->feature")
    hook, p, term = term_of(graph.nodes, r["source"], tiny_model, tokens, tiny_stack, means)
    layer, q, j = parse(r["target"])
    read = tiny_stack.hooks[layer]
    before = run_with_added(tiny_model, tokens, hook, p, 0 * term, read)[1]
    after = run_with_added(tiny_model, tokens, hook, p, -term, read)[1]
    with torch.no_grad():
        measured = float(tiny_stack.saes[layer].encode(after[0, q])[j] - tiny_stack.saes[layer].encode(before[0, q])[j])
    assert r["measured"] == pytest.approx(measured, rel=1e-3, abs=1e-5)
    headline = graph.interventions.by_type["feature->feature"]["x0"]
    assert graph.interventions.sign_agreement == headline["sign_agreement"] and 0 <= headline["sign_agreement"] <= 1
    assert "replacement score" in graph.summary() and 0 <= graph.scores["replacement"] <= 1


def test_recomputed_error_nodes_follow_an_upstream_ablation(tiny_model, tiny_stack, means):
    """Ablate one feature at the first hook and keep every other node. With error nodes
    recomputed, the second hook's error node is the edited run's own: the residual there is what
    the model computes from the edited first hook, less the departures of features that only the
    edit switched on (they are not nodes of the graph, so they sit at their means). With error
    nodes frozen, the second hook gets its clean error back instead."""
    from analysis.circuits.decompose import clean_run, frozen
    from analysis.circuits.faithfulness import ablated_metrics
    from analysis.circuits.pruning import rank_nodes

    target = logit_target(tiny_model.tokenizer, " ")
    tokens = tokens_of(tiny_model)
    with frozen(tiny_model, *tiny_stack.saes):
        run = clean_run(ResidualRunner(tiny_model), tiny_stack, target, tokens[0], means)
        ranking = rank_nodes(run, run.gradients, EVERYTHING)
        dropped = next(c for c in ranking.candidates if c.stack_index == 0 and c.feature is not None)
        keep = [c for c in ranking.candidates if c != dropped]
        everything, recomputed, frozen_errors = ablated_metrics(run, [ranking.candidates, keep, keep], 8,
                                                                ["recomputed", "recomputed", "frozen"])
    assert everything == pytest.approx(run.metric, abs=1e-4)  # every node kept: the clean run
    hook, p, term = term_of([], f"F0_{dropped.feature}_{dropped.position}", tiny_model, tokens, tiny_stack, means)
    sae, mean_x, mean_f = tiny_stack.saes[1], means.resid[1], means.features[1]
    clean_x1 = run.terms[1].x

    def departures(x):
        acts = sae.encode(x)
        return (acts - mean_f) * (acts > 0)

    def second_hook(recompute: bool):
        def edit(act, hook):
            dep, clean_dep = departures(act[0]), departures(clean_x1)
            error = act[0] - mean_x - dep @ sae.W_dec if recompute else clean_x1 - mean_x - clean_dep @ sae.W_dec
            out = act.clone()
            out[0, 1:] = (mean_x + (dep * (clean_dep != 0)) @ sae.W_dec + error)[1:]  # clean_dep != 0: the clean run's active features
            return out
        return edit

    def remove_term(act, hook):
        act = act.clone()
        act[0, p] -= term
        return act

    for value, recompute in ((recomputed, True), (frozen_errors, False)):
        with torch.no_grad():
            logits = tiny_model.run_with_hooks(tokens, fwd_hooks=[(hook, remove_term), (HOOKS[1], second_hook(recompute))])
        assert value == pytest.approx(metric_of(logits, target.token), abs=1e-4), recompute
    assert abs(frozen_errors - recomputed) > 1e-3


def test_bad_graph_settings_get_a_clear_error():
    with pytest.raises(ValueError, match="check_doses"):
        GraphConfig(check_doses=[0.0, 1.0])
    with pytest.raises(ValueError, match="max_feature_nodes must be >= 1"):
        GraphConfig(max_feature_nodes=0)


def test_faithfulness_is_undefined_when_ablation_barely_moves_the_target():
    from analysis.circuits.faithfulness import faithfulness_share, passes

    assert faithfulness_share({"clean": 3.00, "empty": 2.98}, 2.0, min_span=0.1) != faithfulness_share({"clean": 3.0, "empty": 2.98}, 2.0, 0.1)
    assert faithfulness_share({"clean": 10.0, "empty": 2.0}, 8.0, min_span=0.1) == pytest.approx(0.75)
    assert not passes(float("nan")) and passes(1.15) and not passes(1.38) and not passes(0.71)


def test_replacement_and_completeness_scores_on_a_hand_built_graph():
    """Token t -> feature a and error e at hook 0; a and e -> feature b at hook 1; b -> target.
    Shares into b: a 3/4, e 1/4. Influence on the target: b 1, a 3/4, e 1/4, t 3/4 (through a only).
    Replacement = 0.75 / (0.75 + 0.25). Completeness, each node weighted by its influence (the
    target by 1): b (weight 1) takes 1/4 of its input from e; the target, a, and the sources t and
    e none -> (1 + 3/4 + 3/4 + 1/4 + 3/4) / (1 + 1 + 3/4 + 1/4 + 3/4)."""
    from analysis.circuits.nodes import Edge, Node
    from analysis.circuits.scores import graph_scores

    nodes = [Node("token", -1, 1, None, 1, 1), Node("feature", 0, 1, 5, 1, 1), Node("error", 0, 1, None, 1, 1),
             Node("feature", 1, 1, 7, 1, 1), Node("target", 2, 1, None, 1, 1)]
    t, a, e, b, target = (n.id for n in nodes)
    edges = [Edge(t, a, 0, 2.0), Edge(t, e, 0, 9.0), Edge(a, b, 0, -3.0), Edge(e, b, 0, 1.0), Edge(b, target, 0, 0.5)]
    scores = graph_scores(nodes, edges)
    assert scores.replacement == pytest.approx(0.75)
    assert scores.completeness == pytest.approx((1 + 0.75 + 0.75 + 0.25 + 0.75) / 3.75)
    assert graph_scores(nodes, [Edge(t, a, 0, 2.0), Edge(a, b, 0, 1.0), Edge(b, target, 0, 1.0)]).replacement == 1.0


def test_the_post_activation_edge_check_catches_a_planted_wrong_sign(tiny_model, tiny_stack, means, full_graph):
    from analysis.circuits.decompose import clean_run, frozen
    from analysis.circuits.interventions import check_edges

    cfg = dataclasses.replace(EVERYTHING, n_check_edges=10)
    nodes = {n.id: n for n in full_graph.nodes}
    with frozen(tiny_model, *tiny_stack.saes):
        run = clean_run(ResidualRunner(tiny_model), tiny_stack, full_graph.target, tokens_of(tiny_model)[0], means)
        honest = check_edges(run, full_graph.edges, nodes, cfg)
        planted = [dataclasses.replace(e, direct=-e.direct) if (nodes[e.source].kind, nodes[e.target].kind) == ("feature", "feature") else e
                   for e in full_graph.edges]
        caught = check_edges(run, planted, nodes, cfg)
    assert honest.sign_agreement >= 0.8
    assert caught.sign_agreement == pytest.approx(1 - honest.sign_agreement)
    assert caught.correlation == pytest.approx(-honest.correlation)
    assert caught.by_type["feature->target"] == honest.by_type["feature->target"]  # only the planted type changes


def test_feature_target_and_chain(tiny_model, tiny_stack, means, full_graph):
    target = feature_target(tiny_stack, HOOKS[1], int(full_graph.nodes[-2].feature or 0))
    graph = trace(tiny_model, tiny_stack, PROMPT, target, GraphConfig(max_feature_nodes=60, n_check_edges=3, budgets=[]), means=means)
    assert graph.hooks == HOOKS[:1] and {n.stack_index for n in graph.nodes if n.kind == "feature"} <= {0}
    chain = full_graph.chain()
    assert chain[-1].kind == "target" and chain[0].kind == "token"
    assert all(n.kind != "error" for n in chain)  # the full graph has feature inputs everywhere
    assert full_graph.chain(through_features=False)[-1].kind == "target"
    assert "=> ' '" in full_graph.chain_text()
    # the typed graph round-trips through its JSON
    again = FeatureGraph.from_dict(json.loads(json.dumps(full_graph.to_dict())))
    assert again.edges == full_graph.edges and again.nodes == full_graph.nodes


def test_bad_input_gets_a_clear_error(tiny_model, tiny_stack, tiny_bridge, means):
    tokenizer = tiny_model.tokenizer
    with pytest.raises(ValueError, match="is 3 tokens"):
        logit_target(tokenizer, " Pa")
    with pytest.raises(ValueError, match="longer than the limit of 64"):
        trace(tiny_model, tiny_stack, "x" * 80, logit_target(tokenizer, " "), means=means)
    with pytest.raises(ValueError, match="longer than the limit of 10"):
        trace(tiny_model, tiny_stack, PROMPT, logit_target(tokenizer, " "), GraphConfig(max_prompt_tokens=10), means=means)
    with pytest.raises(ValueError, match="hooks out of order"):
        SAEStack([relu_sae(HOOKS[1]), relu_sae(HOOKS[0])], [None, None])
    with pytest.raises(ValueError, match="not a residual-stream hook"):
        SAEStack([relu_sae("blocks.0.hook_mlp_out")], [None])
    with pytest.raises(ValueError, match="different models"):
        SAEStack([relu_sae(HOOKS[0], model_name="a"), relu_sae(HOOKS[1], model_name="b")], [None, None])
    other = SAEStack([relu_sae(h, d_in=576, d_sae=16) for h in HOOKS], [None, None])
    with pytest.raises(ValueError, match="another model"):
        other.check_model(tiny_model)
    with pytest.raises(ValueError, match="trained on another model"):
        SAEStack([relu_sae(h, model_name="HuggingFaceTB/SmolLM2-135M-Instruct") for h in HOOKS], [None, None]).check_model(tiny_bridge)
    with pytest.raises(ValueError, match="out of range"):
        feature_target(tiny_stack, HOOKS[1], 48)
    with pytest.raises(ValueError, match="not a hook of the stack"):
        feature_target(tiny_stack, "blocks.5.hook_resid_post", 0)


def test_exports_escape_model_text(tiny_model, tiny_stack, means, tmp_path):
    prompt = "a</script><b>x"
    graph = trace(tiny_model, tiny_stack, prompt, logit_target(tiny_model.tokenizer, " "), GraphConfig(max_feature_nodes=30, budgets=[]), means=means)
    page = graph_html(graph)
    assert "</script><b>" not in page and "<b>x" not in page
    paths = write_graph(graph, tmp_path / "g")
    assert [p.name for p in paths] == ["g.graph.json", "g.neuronpedia.json", "g.html"]
    np_json = json.loads(paths[1].read_text())
    assert {"metadata", "nodes", "links", "qParams"} <= set(np_json) and np_json["metadata"]["prompt"] == prompt
    assert {n["node_id"] for n in np_json["nodes"]} == {n.id for n in graph.nodes}
    assert any(n["is_target_logit"] for n in np_json["nodes"]) and neuronpedia_json(graph)["links"]
    assert FeatureGraph.from_dict(json.loads(paths[0].read_text())).n_nodes == graph.n_nodes


def test_matching_finds_the_same_features(tiny_model, text_corpus):
    a = relu_sae(HOOKS[0], seed=3)
    b = relu_sae(HOOKS[0], seed=3, d_sae=48)
    perm = torch.randperm(48)
    with torch.no_grad():  # b: a's features in another order, a third of them replaced by fresh directions
        b.W_dec.copy_(a.W_dec[perm])
        b.W_enc.copy_(a.W_enc[:, perm])
        b.W_dec[:16] = relu_sae(HOOKS[0], seed=9).W_dec[:16]
    result = match_saes(a, b, threshold=0.9)
    moved = set(perm[:16].tolist())
    kept = [i for i in range(48) if i not in moved]
    assert result.share_matched == pytest.approx(32 / 48)
    inverse = torch.argsort(perm)
    assert all(int(result.best_index[i]) == int(inverse[i]) for i in kept)
    with pytest.raises(ValueError, match="different widths"):
        match_saes(a, relu_sae(HOOKS[0], d_in=16))
    # across layers: the same SAE at both hooks persists feature for feature
    same = SAEStack([relu_sae(HOOKS[0], seed=3), relu_sae(HOOKS[1], seed=3)], [None, None])
    layers = layer_matches(tiny_model, same, threshold=0.9, n_tokens=600,
                           corpus=str(text_corpus))
    row = layers.rows[0]
    assert row["persist"] + row["vanish"] == row["live_from"] and row["persist"] + row["appear"] == row["live_to"]
    assert row["persist"] >= min(row["live_from"], row["live_to"]) - 2 and row["median_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert layers.chains and len(layers.chains[0]) == 2 and "persist" in layers.table()


def test_matching_compares_per_dimension_scaled_saes_where_they_learnt():
    """Two unrelated SAEs trained with per-dimension scaling on a hook with one huge dimension: folded back, every decoder
    row points along that dimension, so raw cosines call them the same; compared in their training space they are not."""
    from sae import SAEConfig
    from sae.topk import TopKSAE

    gen = torch.Generator().manual_seed(0)
    scale = [0.01] + [1.0] * 15  # dimension 0 spreads 100x the others
    saes = []
    for _ in range(2):
        sae = TopKSAE(SAEConfig(architecture="topk", d_in=16, d_sae=64, k=4))
        with torch.no_grad():
            sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1))
        sae.fold_input_scale(scale)
        saes.append(sae)
    raw = match_saes(*saes, threshold=0.7)
    assert raw.share_matched > 0.9 and raw.chance_cosine > 0.9 and "overstate" in raw.summary()
    for sae in saes:
        sae.training_data = {"input_scale_per_dimension": scale}
    scaled = match_saes(*saes, threshold=0.7)
    assert scaled.space == "per-dimension standardised" and scaled.chance_cosine < 0.4 and scaled.share_matched < 0.3
    assert "overstate" not in scaled.summary()


def test_stack_manifest_and_the_trace_cli(tiny_llama_dir, tmp_path, capsys):
    """`saewb run --hooks A B` trains one SAE per hook into a stack; `saewb trace` and `saewb match` read it."""
    from analysis import cli
    from tests.test_user_corpus import write_user_corpus

    corpus = write_user_corpus(tmp_path / "docs.jsonl")
    out = tmp_path / "run"
    cli.main(["run", "--preset", "smoke", "--model", tiny_llama_dir, "--device", "cpu", "--corpus", str(corpus), "--out", str(out),
              "--hooks", *HOOKS, "--context-len", "32", "--n-tokens", "4000", "--train-tokens", "4000", "--d-sae", "64", "--k", "4",
              "--batch-size", "256", "--eval-tokens", "100000", "--ce-contexts", "8"])
    manifest = json.loads((out / "sae" / "stack.json").read_text())
    assert list(manifest["saes"]) == HOOKS
    stack = load_stack(out / "sae")
    assert stack.hooks == HOOKS and (out / "sae" / "stack_report.html").exists()
    assert len(json.loads((out / "sae" / "stack_eval.json").read_text())) == 2
    printed = capsys.readouterr().out
    assert "| blocks.1.hook_resid_post |" in printed  # the per-layer table

    cli.main(["trace", "--model", tiny_llama_dir, "--device", "cpu", "--sae", str(out / "sae"), "--prompt", "qwx zq",
              "--target", "w", "--max-feature-nodes", "30", "--name", "demo"])
    printed = capsys.readouterr().out
    assert "faithfulness" in printed and "strongest chain" in printed
    graph = json.loads((out / "sae" / "traces" / "demo.graph.json").read_text())
    assert 0 < sum(n["kind"] == "feature" for n in graph["nodes"]) <= 30
    page = (out / "sae" / "traces" / "demo.html").read_text()
    assert '"examples"' in page and '"dashboard"' in page  # node cards from the atlas, linked to the dashboard
    assert (out / "sae" / "means.safetensors").exists()
    with pytest.raises(SystemExit, match="is 2 tokens"):
        cli.main(["trace", "--model", tiny_llama_dir, "--device", "cpu", "--sae", str(out / "sae"), "--prompt", "qwx", "--target", "qw"])
    cli.main(["match", "--model", tiny_llama_dir, "--device", "cpu", "--sae", str(out / "sae"), "--coact-tokens", "500", "--corpus", str(corpus)])
    assert "persist" in capsys.readouterr().out
    write_stack_manifest(tmp_path, [manifest["saes"][h] for h in reversed(HOOKS)])  # written in layer order whatever the input order
    assert list(json.loads((tmp_path / "stack.json").read_text())["saes"]) == HOOKS


def test_integrated_gradients_are_complete_at_every_hook(tiny_model, tiny_stack, means):
    """With ig_steps, a hook's node attributions sum to the change of the target when that hook is
    moved to its held-out mean (the rest of the model running as it does), up to the quadrature."""
    target = logit_target(tiny_model.tokenizer, " ")
    graph = trace(tiny_model, tiny_stack, PROMPT, target, dataclasses.replace(EVERYTHING, ig_steps=48), means=means)
    tokens = tokens_of(tiny_model)
    clean, changes = graph.metric["clean"], []
    for layer, hook in enumerate(["blocks.0.hook_resid_pre", *HOOKS]):
        mean = means.embed if layer == 0 else means.resid[layer - 1]

        def to_mean(act, hook):
            act = act.clone()
            act[0, 1:] = mean  # noqa: B023  (called within this iteration)
            return act

        with torch.no_grad():
            moved = metric_of(tiny_model.run_with_hooks(tokens, fwd_hooks=[(hook, to_mean)]), target.token)
        kind = {"token"} if layer == 0 else {"feature", "error"}
        total = sum(n.attribution for n in graph.nodes if n.kind in kind and n.stack_index == layer - 1)
        assert total == pytest.approx(clean - moved, rel=1e-2, abs=1e-3), hook
        changes.append(abs(clean - moved))
    assert max(changes) > 0.05  # the check can fail


def test_attribution_methods_are_registered_and_ig_steps_0_is_gradient_x_activation(tiny_model, tiny_stack, means):
    from analysis.circuits.attribution import ATTRIBUTIONS

    assert {"gradient_x_activation", "integrated_gradients"} <= set(ATTRIBUTIONS)
    target = logit_target(tiny_model.tokenizer, " ")
    small = GraphConfig(max_feature_nodes=30, n_check_edges=3, budgets=[])
    by_steps = trace(tiny_model, tiny_stack, PROMPT, target, dataclasses.replace(small, ig_steps=0), means=means)
    by_name = trace(tiny_model, tiny_stack, PROMPT, target, dataclasses.replace(small, attribution="gradient_x_activation"), means=means)
    assert by_name.nodes == by_steps.nodes and by_name.edges == by_steps.edges
    integrated = trace(tiny_model, tiny_stack, PROMPT, target, small, means=means)
    assert [n.attribution for n in integrated.nodes] != [n.attribution for n in by_steps.nodes]
    with pytest.raises(ValueError, match="unknown attribution method"):
        trace(tiny_model, tiny_stack, PROMPT, target, dataclasses.replace(small, attribution="nope"), means=means)


def test_targets_are_registered_and_round_trip_through_json(tiny_model, tiny_stack, means):
    from analysis.circuits.targets import TARGETS, LogitTarget, target_from_json

    assert {"logit", "logit_diff", "feature"} <= set(TARGETS)
    graph = trace(tiny_model, tiny_stack, PROMPT, feature_target(tiny_stack, HOOKS[1], 3), GraphConfig(max_feature_nodes=20, budgets=[]), means=means)
    again = FeatureGraph.from_dict(json.loads(json.dumps(graph.to_dict())))
    assert again.target == graph.target and again.nodes == graph.nodes
    assert neuronpedia_json(graph)["nodes"][-1]["layer"] == "1"  # the block of the target feature's hook
    # a graph file written before the targets were classes: every kind's keys, unused ones null
    legacy = {"kind": "logit", "token": 5, "contrast": None, "layer": None, "feature": None, "position": -1, "text": " "}
    assert target_from_json(legacy) == LogitTarget(token=5, position=-1, text=" ")


def test_a_retrained_sae_invalidates_the_means_cache(tiny_model, text_corpus, tmp_path, monkeypatch):
    """The cache is keyed on the SAEs' weights, not their folders: retraining into the same
    folders measures the means again."""
    from analysis.circuits import means as means_module

    corpus = CorpusConfig(source=str(text_corpus), split="heldout", context_len=32)
    folders = [relu_sae(h, seed=i).save(tmp_path / f"sae{i}") for i, h in enumerate(HOOKS)]
    cache = tmp_path / "means.safetensors"
    before = stack_means(tiny_model, load_stack(folders), corpus, n_tokens=600, cache=cache)
    with monkeypatch.context() as patch:  # nothing changed: read from the cache, no pass over the text
        patch.setattr(means_module, "_measure", lambda *args: pytest.fail("measured again although nothing changed"))
        again = stack_means(tiny_model, load_stack(folders), corpus, n_tokens=600, cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(again.features + again.resid, before.features + before.resid))
    relu_sae(HOOKS[0], seed=7).save(folders[0])  # retrained into the same folder
    retrained = load_stack(folders)
    after = stack_means(tiny_model, retrained, corpus, n_tokens=600, cache=cache)
    assert not torch.equal(after.features[0], before.features[0])
    torch.testing.assert_close(after.features[0], stack_means(tiny_model, retrained, corpus, n_tokens=600).features[0])


def test_a_retrained_sae_invalidates_the_atlas_cache(full_graph, tmp_path, monkeypatch):
    """Node cards read each SAE's atlas and labels once per content of its weights, atlas.json
    and labels.json, not per modification time."""
    import os

    from analysis.circuits.export import feature_cards
    from analysis.features import atlas as atlas_module
    from analysis.features import labels as labels_module

    reads = []
    monkeypatch.setattr(atlas_module, "load_atlas", lambda folder: reads.append("atlas"))  # None: cards without atlas data
    monkeypatch.setattr(labels_module, "load_labels", lambda path: reads.append("labels"))
    folder = relu_sae(HOOKS[0]).save(tmp_path / "sae0")
    (folder / "atlas").mkdir()
    (folder / "atlas" / "atlas.json").write_text("{}")
    labels = folder / "atlas" / "labels.json"
    labels.write_text('{"a": 1}')
    graph = FeatureGraph.from_dict(full_graph.to_dict())
    graph.sae_paths = [str(folder), ""]
    feature_cards(graph)
    feature_cards(graph)
    assert reads == ["atlas", "labels"]  # read once while nothing changes
    relu_sae(HOOKS[0], seed=5).save(folder)  # retrained into the same folder, the atlas files untouched
    feature_cards(graph)
    assert reads == ["atlas", "labels"] * 2
    stamp = labels.stat()
    labels.write_text('{"a": 2}')  # relabelled, with the old modification time
    os.utime(labels, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    feature_cards(graph)
    assert reads == ["atlas", "labels"] * 3


def test_run_trains_a_steering_sae_that_saewb_steer_finds(tiny_llama_dir, tmp_path, capsys):
    """`saewb run --steering-hook H` trains a second SAE at H into <out>/steering, no larger than
    the main one, from H's activations harvested in the main harvest's passes; `saewb steer --concept` without --sae steers with it (else with the main SAE, saying so)."""
    from analysis import cli
    from analysis.steering.cli import _run_sae_for_concepts
    from sae import load_sae
    from tests.test_user_corpus import write_user_corpus

    corpus = write_user_corpus(tmp_path / "docs.jsonl")
    out = tmp_path / "run"
    common = ["--preset", "smoke", "--model", tiny_llama_dir, "--device", "cpu", "--corpus", str(corpus), "--context-len", "32",
              "--n-tokens", "3000", "--train-tokens", "3000", "--d-sae", "64", "--k", "4", "--batch-size", "256", "--eval-tokens", "2000",
              "--ce-contexts", "4", "--skip-analysis"]
    args = cli.parse(["run", *common, "--out", str(out), "--hook", HOOKS[0], "--steering-hook", HOOKS[1]])
    stage = cli.steering_args(args)
    assert (stage.hook, stage.out, stage.n_tokens, stage.d_sae) == (HOOKS[1], out / "steering", 3000, 64)  # capped by the main stage
    assert cli.parse(["run"]).steering_hook == "blocks.23.hook_resid_post"  # the default preset's
    cli.main(["run", *common, "--out", str(out), "--hook", HOOKS[0], "--steering-hook", HOOKS[1]])
    found = _run_sae_for_concepts(out)
    assert load_sae(found).cfg.hook_name == HOOKS[1] and (out / "sae").exists()
    # its hook was harvested in the main stage's passes, into the main store's folder: no second harvest
    assert Path(load_sae(found).training_data["store"]) == out / "activations" / HOOKS[1]
    assert (out / "activations" / "heldout" / HOOKS[1] / "manifest.json").exists() and not (out / "steering" / "activations").exists()
    assert "steering SAE of" in capsys.readouterr().out
    alone = tmp_path / "alone"
    cli.main(["run", *common, "--out", str(alone), "--hook", HOOKS[0], "--steering-hook", "none"])
    assert not (alone / "steering").exists()
    assert load_sae(_run_sae_for_concepts(alone)).cfg.hook_name == HOOKS[0]
    assert "has no steering SAE" in capsys.readouterr().out


def test_trace_says_when_the_target_is_not_the_models_top_token(tiny_model):
    from activations.model import logits_with_edit
    from analysis.circuits.cli import top_token_note

    with torch.no_grad():
        logits = logits_with_edit(tiny_model, tokens_of(tiny_model))[0, -1]
    top, other = int(logits.argmax()), int(logits.argmin())
    decode = tiny_model.tokenizer.decode
    assert top_token_note(tiny_model, PROMPT, logit_target(tiny_model.tokenizer, decode([top]))) is None
    note = top_token_note(tiny_model, PROMPT, logit_target(tiny_model.tokenizer, decode([other])))
    assert note is not None and f"number {tiny_model.cfg.d_vocab}" in note
