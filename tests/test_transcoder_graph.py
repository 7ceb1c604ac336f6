"""The transcoder replacement model and its feature graphs (`analysis/circuits/replacement.py`, `transcoder_graph.py`)
on the tiny Llama: the clean forward and the frozen replacement reproduce the model's logits; an edge is the finite
difference of the frozen replacement; faithfulness and the edge check come out of the real model; with the held-out
mean as every node's baseline, the same hold of departures from it."""
import json

import pytest
import torch

from activations.corpus import CorpusConfig
from activations.model import MODEL_NAME_ATTR
from analysis.circuits.graph import GraphConfig, logit_target
from analysis.circuits.means import TranscoderMeans, transcoder_means
from analysis.circuits.replacement import ReplacementModel, TranscoderSet, load_transcoders
from analysis.circuits.transcoder_graph import trace_transcoders
from sae.transcoder import SkipTranscoder, SkipTranscoderConfig

PROMPT = "qwx zq wx"


@pytest.fixture(scope="module")
def transcoders(tiny_bridge):
    """Random skip transcoders of both blocks (d_model 32, 64 latents, k 4): the error terms make any of them exact."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for layer in range(int(tiny_bridge.cfg.n_layers)):
        tc = SkipTranscoder(SkipTranscoderConfig.for_layer(layer, d_in=32, d_sae=64, k=4, model_name=getattr(tiny_bridge, MODEL_NAME_ATTR)), gen)
        with torch.no_grad():
            tc.W_enc.normal_(0, 0.5, generator=gen)
            tc.W_skip.normal_(0, 0.1, generator=gen)
            tc.b_enc.normal_(0, 0.1, generator=gen)
        out.append(tc)
    return TranscoderSet(out, [f"layer{i}" for i in range(len(out))])


def tokens_of(model, prompt=PROMPT):
    from activations.generation import encode_prompts
    return encode_prompts(model.tokenizer, [prompt])[0]


def logits_with_mlps(model, transcoders, output):
    """The tiny Llama's logits on PROMPT, by hand, with each block's MLP output replaced by output(layer, transcoder,
    the MLP's input) at positions >= 1 (position 0 keeps the real MLP)."""
    from activations.hooks import transcoder_hooks
    from activations.model import hf_hooks
    inputs, edits = {}, {}
    for layer, tc in enumerate(transcoders.transcoders):
        into, out = transcoder_hooks(layer)
        edits[into] = lambda a, layer=layer: inputs.__setitem__(layer, a)

        def replace(a, layer=layer, tc=tc):
            new = output(layer, tc, inputs[layer])
            new[:, 0] = a[:, 0]
            return new
        edits[out] = replace
    with torch.no_grad(), hf_hooks(model, edits):
        return model.original_model(input_ids=tokens_of(model)[None]).logits


def test_the_clean_run_and_the_frozen_replacement_reproduce_the_models_logits(tiny_bridge, transcoders):
    rm = ReplacementModel(tiny_bridge, transcoders)
    tokens = tokens_of(tiny_bridge)
    with torch.no_grad():
        logits = tiny_bridge.original_model(input_ids=tokens[None]).logits[0]
        clean = rm.clean_run(tokens)
        torch.testing.assert_close(clean.logits, logits, atol=1e-4, rtol=1e-4)
        for live in (False, True):
            resid, _ = rm.forward(clean, rm.zero_injections(clean).detach(), live=live)
            torch.testing.assert_close(rm.logits(clean, resid)[0], logits, atol=1e-4, rtol=1e-4)
        # the transcoders really are in it: without the error terms the logits move
        clean.errors[:, 1:] = 0
        resid, _ = rm.forward(clean, rm.zero_injections(clean).detach())
        assert (rm.logits(clean, resid)[0] - logits).abs().max() > 1e-2
    assert (clean.codes[:, 1:] > 0).sum(-1).le(4).all() and (clean.codes[:, 0] == 0).all()


def test_a_transcoder_edge_equals_the_finite_difference_of_the_frozen_replacement(tiny_bridge, transcoders):
    tokens = tokens_of(tiny_bridge)
    target = logit_target(tiny_bridge.tokenizer, "q")
    cfg = GraphConfig(max_feature_nodes=40, min_node_share=0.0, edge_share=1.0, max_edges=100_000, n_check_edges=3,
                      transcoder_ablation="zero")
    graph = trace_transcoders(tiny_bridge, transcoders, PROMPT, target, cfg)
    rm = ReplacementModel(tiny_bridge, transcoders)
    clean = rm.clean_run(tokens)
    by_id = {n.id: n for n in graph.nodes}
    feature_edges = [e for e in graph.edges if by_id[e.source].kind == "feature" and by_id[e.target].kind == "feature"]
    assert feature_edges
    for e in sorted(feature_edges, key=lambda e: -abs(e.direct))[:4]:
        up, down = by_id[e.source], by_id[e.target]

        def downstream_pre(scale: float, up=up, down=down) -> float:
            codes = clean.codes.clone()
            codes[up.stack_index, up.position, up.feature] *= scale
            with torch.no_grad():
                _, inputs = rm.forward(clean, rm.zero_injections(clean).detach(), codes=codes)
            tc = transcoders.transcoders[down.stack_index]
            return float(inputs[down.stack_index][0, down.position] @ tc.W_enc[:, down.feature])

        h = 0.5
        finite = (downstream_pre(1 + h) - downstream_pre(1 - h)) / (2 * h)
        assert finite == pytest.approx(e.direct, rel=1e-3, abs=1e-5)
        assert downstream_pre(0.0) - downstream_pre(1.0) == pytest.approx(-e.direct, rel=1e-3, abs=1e-5)  # exact: linear
    # into the target, too
    into_target = [e for e in graph.edges if e.target == "target" and by_id[e.source].kind == "feature"][0]
    up = by_id[into_target.source]
    codes = clean.codes.clone()
    codes[up.stack_index, up.position, up.feature] = 0
    with torch.no_grad():
        resid, _ = rm.forward(clean, rm.zero_injections(clean).detach(), codes=codes)
        ablated = float(target.metric(rm.logits(clean, resid)[:, -1])[0])
    assert ablated - graph.metric["clean"] == pytest.approx(-into_target.direct, rel=1e-3, abs=1e-5)


def test_transcoder_faithfulness_is_measured_in_the_real_model(tiny_bridge, transcoders):
    target = logit_target(tiny_bridge.tokenizer, "q")
    zero = {"transcoder_ablation": "zero"}
    every = trace_transcoders(tiny_bridge, transcoders, PROMPT, target, GraphConfig(max_feature_nodes=10_000, min_node_share=0.0, **zero))
    m = every.metric
    assert m["full"] == pytest.approx(m["clean"], abs=1e-4)  # every node kept, errors recomputed: the model itself
    assert m["graph"] == pytest.approx(m["clean"], abs=1e-4) and every.faithfulness == pytest.approx(1.0, abs=1e-3)
    small = trace_transcoders(tiny_bridge, transcoders, PROMPT, target, GraphConfig(max_feature_nodes=2, min_node_share=0.0, **zero))
    assert small.counts()["feature"] == 2
    assert small.metric["empty"] == pytest.approx(m["empty"], abs=1e-5)
    # "empty" by hand: every MLP replaced by its transcoder's bias and skip term
    logits = logits_with_mlps(tiny_bridge, transcoders, lambda layer, tc, m_in: tc.b_dec + tc.skip(m_in))
    assert float(target.metric(logits[:, -1])[0]) == pytest.approx(m["empty"], abs=1e-4)
    assert set(every.scores) == {"replacement", "completeness"}
    assert every.interventions.by_type  # the edge check ran, in the real model


def test_whole_graph_scores_are_the_pruned_graphs_when_every_node_is_kept(tiny_bridge, transcoders):
    """circuit-tracer scores the graph before pruning: with every active feature and error node kept (and every edge),
    the pruned graph is that graph, so both definitions agree; a 2-feature graph scores on its own nodes only."""
    target = logit_target(tiny_bridge.tokenizer, "q")
    keep_all = dict(min_node_share=0.0, edge_share=1.0, max_edges=1_000_000, transcoder_ablation="zero", whole_graph_scores=True)
    every = trace_transcoders(tiny_bridge, transcoders, PROMPT, target, GraphConfig(max_feature_nodes=10_000, **keep_all))
    s = every.scores
    active = int(sum(int((c != 0).sum()) for c in ReplacementModel(tiny_bridge, transcoders).clean_run(tokens_of(tiny_bridge)).codes))
    assert s["whole_features"] == every.counts()["feature"] == active
    assert 0 < s["replacement"] < 1 and s["replacement_whole"] == pytest.approx(s["replacement"], rel=1e-6)
    assert s["completeness_whole"] == pytest.approx(s["completeness"], rel=1e-6)
    assert f"whole graph, {active} features" in every.summary()
    small = trace_transcoders(tiny_bridge, transcoders, PROMPT, target, GraphConfig(max_feature_nodes=2, **keep_all)).scores
    assert small["whole_features"] == active and small["replacement_whole"] == pytest.approx(s["replacement_whole"], rel=1e-6)
    assert small["replacement"] != pytest.approx(s["replacement"], rel=1e-3)


def test_edges_do_not_depend_on_how_the_rows_are_batched_and_a_prefix_is_the_full_prompt_cut(tiny_bridge, transcoders):
    """Direct effects run the replacement per batch only up to its deepest block and over its positions up to the last:
    one row at a time (each on its own prefix) gives the edges of one batch over the whole prompt."""
    target = logit_target(tiny_bridge.tokenizer, "q")
    keep = dict(max_feature_nodes=30, min_node_share=0.0, edge_share=1.0, max_edges=1_000_000, transcoder_ablation="zero")
    one = trace_transcoders(tiny_bridge, transcoders, PROMPT, target, GraphConfig(batch_rows=1, **keep))
    whole = trace_transcoders(tiny_bridge, transcoders, PROMPT, target, GraphConfig(batch_rows=10_000, **keep))
    weights = lambda g: {(e.source, e.target): e.direct for e in g.edges}  # noqa: E731
    assert len(weights(one)) > 20 and weights(one).keys() == weights(whole).keys()
    for key, value in weights(whole).items():
        assert weights(one)[key] == pytest.approx(value, rel=1e-4, abs=1e-6)
    rm = ReplacementModel(tiny_bridge, transcoders)
    clean = rm.clean_run(tokens_of(tiny_bridge))
    cut = clean.prefix(clean.n_pos - 1)
    assert cut.n_pos == clean.n_pos - 1 and clean.prefix(clean.n_pos) is clean
    with torch.no_grad():
        full, full_inputs = rm.forward(clean, rm.zero_injections(clean).detach())
        short, short_inputs = rm.forward(cut, rm.zero_injections(cut).detach())
    torch.testing.assert_close(short, full[:, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short_inputs[-1], full_inputs[-1][:, :-1], atol=1e-5, rtol=1e-5)


def test_load_transcoders_and_refusals(tiny_bridge, transcoders, tmp_path):
    for layer, tc in enumerate(transcoders.transcoders):
        tc.save(tmp_path / f"layer_{layer}")
    (tmp_path / "transcoders.json").write_text(json.dumps({"transcoders": {"0": str(tmp_path / "layer_0"), "1": "layer_1"}}))
    loaded = load_transcoders(tmp_path)
    assert len(loaded) == 2 and torch.equal(loaded.transcoders[1].W_skip, transcoders.transcoders[1].W_skip)
    (tmp_path / "transcoders.json").write_text(json.dumps({"transcoders": {"1": "layer_1"}}))
    with pytest.raises(ValueError, match="every block"):
        load_transcoders(tmp_path)
    with pytest.raises(FileNotFoundError, match="saewb transcoders"):
        load_transcoders(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="block 0 needs"):
        TranscoderSet(transcoders.transcoders[::-1], ["a", "b"])
    with pytest.raises(ValueError, match="transcoders for a model of 2 blocks"):
        ReplacementModel(tiny_bridge, TranscoderSet(transcoders.transcoders[:1], ["a"]))
    from analysis.circuits.targets import FeatureTarget
    with pytest.raises(ValueError, match="residual basis"):
        trace_transcoders(tiny_bridge, transcoders, PROMPT, FeatureTarget(stack_index=1, hook="blocks.1.hook_resid_post", feature=3))


@pytest.fixture(scope="module")
def means(transcoders):
    """Planted held-out means: every feature a positive mean, every block a mean error."""
    gen = torch.Generator().manual_seed(1)
    return TranscoderMeans(torch.rand(2, 64, generator=gen) * 0.5, torch.randn(2, 32, generator=gen) * 0.3, 1000, "planted")


def test_mean_ablation_keeps_the_clean_run_and_empties_every_mlp_to_its_means(tiny_bridge, transcoders, means):
    target = logit_target(tiny_bridge.tokenizer, "q")
    every = trace_transcoders(tiny_bridge, transcoders, PROMPT, target, GraphConfig(max_feature_nodes=10_000, min_node_share=0.0), means=means)
    m = every.metric
    assert m["full"] == pytest.approx(m["clean"], abs=1e-4) and every.faithfulness == pytest.approx(1.0, abs=1e-3)
    assert m["graph_frozen"] == pytest.approx(m["clean"], abs=1e-4)
    # "empty" by hand: every MLP its transcoder at the mean code, plus its skip term and its mean error
    logits = logits_with_mlps(tiny_bridge, transcoders,
                              lambda layer, tc, m_in: tc.decode(means.codes[layer]) + tc.skip(m_in) + means.errors[layer])
    assert float(target.metric(logits[:, -1])[0]) == pytest.approx(m["empty"], abs=1e-4)
    zero = trace_transcoders(tiny_bridge, transcoders, PROMPT, target, GraphConfig(max_feature_nodes=10_000, min_node_share=0.0,
                                                                                    transcoder_ablation="zero"))
    assert abs(zero.metric["empty"] - m["empty"]) > 1e-3  # the baseline is really another one


def test_a_mean_baseline_edge_is_the_finite_difference_of_the_departure(tiny_bridge, transcoders, means):
    target = logit_target(tiny_bridge.tokenizer, "q")
    cfg = GraphConfig(max_feature_nodes=40, min_node_share=0.0, edge_share=1.0, max_edges=100_000, n_check_edges=3)
    graph = trace_transcoders(tiny_bridge, transcoders, PROMPT, target, cfg, means=means)
    rm = ReplacementModel(tiny_bridge, transcoders)
    clean = rm.clean_run(tokens_of(tiny_bridge))
    by_id = {n.id: n for n in graph.nodes}
    feature_edges = [e for e in graph.edges if by_id[e.source].kind == "feature" and by_id[e.target].kind == "feature"]
    assert feature_edges
    for e in sorted(feature_edges, key=lambda e: -abs(e.direct))[:4]:
        up, down = by_id[e.source], by_id[e.target]
        mean = means.codes[up.stack_index, up.feature]

        def downstream_pre(scale: float, up=up, down=down, mean=mean) -> float:
            codes = clean.codes.clone()
            codes[up.stack_index, up.position, up.feature] = mean + scale * (clean.codes[up.stack_index, up.position, up.feature] - mean)
            with torch.no_grad():
                _, inputs = rm.forward(clean, rm.zero_injections(clean).detach(), codes=codes)
            tc = transcoders.transcoders[down.stack_index]
            return float(inputs[down.stack_index][0, down.position] @ tc.W_enc[:, down.feature])

        # removing the feature (to its mean) moves the downstream pre-activation by minus the edge
        assert downstream_pre(0.0) - downstream_pre(1.0) == pytest.approx(-e.direct, rel=1e-3, abs=1e-5)
    # the error node's term is its vector less the block's mean error, the inactive features' departures included
    error = next(n for n in graph.nodes if n.kind == "error")
    tc = transcoders.transcoders[error.stack_index]
    inactive = (clean.codes[error.stack_index, error.position] == 0) * means.codes[error.stack_index]
    expected = clean.errors[error.stack_index, error.position] - inactive @ tc.W_dec
    assert error.activation == pytest.approx(float(expected.norm()), rel=1e-4)


def test_transcoder_means_are_the_held_out_averages_and_are_cached_by_content(tiny_bridge, transcoders, text_corpus, tmp_path):
    corpus = CorpusConfig(source=str(text_corpus), split="heldout", context_len=16)
    cache = tmp_path / "tc_means.safetensors"
    measured = transcoder_means(tiny_bridge, transcoders, corpus, n_tokens=300, cache=cache)
    assert cache.exists() and measured.codes.shape == (2, 64) and measured.errors.shape == (2, 32)
    # by hand: the first contexts' MLP inputs and outputs, positions >= 1
    from activations.corpus import load_contexts
    rm = ReplacementModel(tiny_bridge, transcoders)
    tokens = torch.from_numpy(load_contexts(corpus, tiny_bridge.tokenizer, max_contexts=20)).long()
    codes, errors = torch.zeros(2, 64), torch.zeros(2, 32)
    count = 0
    with torch.no_grad():
        for row in tokens:
            clean = rm.clean_run(row)
            codes += clean.codes[:, 1:].sum(1)
            errors += clean.errors[:, 1:].sum(1)
            count += len(row) - 1
    assert measured.n_tokens == count
    torch.testing.assert_close(measured.codes, codes / count, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(measured.errors, errors / count, atol=1e-4, rtol=1e-4)
    cached = transcoder_means(tiny_bridge, transcoders, corpus, n_tokens=300, cache=cache)
    assert torch.equal(cached.codes, measured.codes) and cached.n_tokens == count
    with torch.no_grad():
        transcoders.transcoders[0].b_enc.add_(0.5)  # other weights: the cache is not reused
    try:
        again = transcoder_means(tiny_bridge, transcoders, corpus, n_tokens=300, cache=cache)
        assert not torch.allclose(again.codes[0], measured.codes[0])
    finally:
        with torch.no_grad():
            transcoders.transcoders[0].b_enc.sub_(0.5)


def test_analyze_reads_a_transcoder_folder_in_one_held_out_pass_and_the_graph_cards_show_it(tiny_bridge, tiny_llama_dir, transcoders,
                                                                                             tmp_path, capsys):
    """`saewb analyze --sae <transcoders>`: every listed transcoder gets its atlas and labels, the held-out rows at all
    their hooks harvested in one pass (removed after), the same atlas the model's own pass gives; then a transcoder
    graph's feature cards carry top contexts, logit effects and labels."""
    from analysis import cli
    from analysis.circuits.export import feature_cards
    from analysis.features.atlas import AtlasConfig, build_atlas, load_atlas
    from analysis.features.cli import split_heldout
    from sae import load_sae
    from tests.test_user_corpus import write_user_corpus

    corpus = write_user_corpus(tmp_path / "docs.jsonl", n_docs=800)
    folder = tmp_path / "tc"
    for layer, tc in enumerate(transcoders.transcoders):
        tc.save(folder / f"layer_{layer}")
        copy = load_sae(folder / f"layer_{layer}")
        copy.cfg.context_size = 32
        copy.training_data = {"corpus": {"source": str(corpus), "split": "train", "context_len": 32}, "exclude_bos": True}
        copy.save(folder / f"layer_{layer}")
    (folder / "transcoders.json").write_text(json.dumps({"transcoders": {"0": "layer_0", "1": "layer_1"}}))
    cli.main(["analyze", "--sae", str(folder), "--device", "cpu", "--atlas-tokens", str(31 * 24), "--label-contexts", "16"])
    printed = capsys.readouterr().out
    assert "one held-out pass for 2 hooks" in printed and printed.count("labels: ") == 2
    assert not list(folder.glob("*/heldout_*")) and not list(folder.glob("heldout_*"))  # the pass's store is gone
    sae = load_sae(folder / "layer_1")
    atlas = load_atlas(folder / "layer_1" / "atlas")
    assert atlas.meta["contexts_read_from_store"] == atlas.n_contexts == 24 and (folder / "layer_1" / "atlas" / "labels.json").exists()
    heldout = CorpusConfig(source=str(corpus), split="heldout", context_len=32)
    precision = atlas.meta["config"]["autocast"]  # the pass's probe's choice
    by_model = build_atlas(sae, tiny_bridge, AtlasConfig(n_tokens=31 * 24, corpus=heldout, device="cpu", autocast=precision),
                           tokens=split_heldout(heldout, tiny_bridge.tokenizer, 31 * 24, 16).atlas)
    assert by_model.meta["contexts_read_from_store"] == 0
    torch.testing.assert_close(atlas.max_activation, by_model.max_activation, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(atlas.fire_count, by_model.fire_count)

    with pytest.raises(SystemExit, match="is a transcoder"):  # evaluate reconstructs an SAE's own hook: refused, not misread
        cli.main(["evaluate", "--sae", str(folder), "--device", "cpu"])
    graph = trace_transcoders(tiny_bridge, load_transcoders(folder), PROMPT, logit_target(tiny_bridge.tokenizer, "q"),
                              GraphConfig(max_feature_nodes=10, transcoder_ablation="zero"))
    cards = feature_cards(graph)
    assert cards and all(card["examples"] and card["logits"] and "max_activation" in card for card in cards.values())
    assert any(card["label"] for card in cards.values())
