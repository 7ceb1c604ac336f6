"""Semantic labels (analysis/features/labels/semantic.py) against their definition, recomputed
by hand on the tiny model: the set is every vocabulary id whose cosine with the prototype is
>= the radius, and the radius is the best of those tried by F1 on the atlas's counts."""
from __future__ import annotations

import math
from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch

from activations.corpus import CorpusConfig
from analysis.features.atlas import AtlasConfig, build_atlas
from analysis.features.labels import KINDS, LabelConfig, LabelContext
from analysis.features.labels.base import MAX_LISTED_TOKENS
from analysis.features.labels.semantic import SPACES, SemanticKind, neighbourhoods, token_set_f1

from .test_atlas import tiny_sae

MAX_SET = 25  # what the kind allows for the tiny model's 257-token vocabulary (a tenth of it)
TOLERANCE = 1e-5  # fp32 matmul vs fp64 by hand: a token this close to the radius may fall either side


@pytest.fixture(scope="module")
def setup(tiny_model, text_corpus):
    sae = tiny_sae()
    corpus = CorpusConfig(source=str(text_corpus), context_len=32)
    cfg = AtlasConfig(corpus=corpus, n_tokens=31 * 30, batch_contexts=8, autocast="none", device="cpu")
    return sae, build_atlas(sae, tiny_model, cfg)


def vectors_by_hand(model, space: str) -> list[list[float]]:
    """Token vectors as lists: rows of W_E, or columns of W_U."""
    matrix = model.W_E if space == "embedding" else model.W_U.T
    return matrix.detach().double().tolist()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm > 0 else 0.0


def by_hand(atlas, feature: int, vectors: list[list[float]]):
    """The feature's prototype tokens (top `MAX_LISTED_TOKENS` by activation sum x precision,
    at least `PROTOTYPE_SHARE` of the heaviest) and every token's cosine with the prototype."""
    ids, counts, acts = (t.tolist() for t in atlas.feature_tokens(feature))
    freq = atlas.token_frequency.tolist()
    weight = {t: a * c / max(freq[t], 1) for t, c, a in zip(ids, counts, acts)}
    ranked = sorted(ids, key=lambda t: -weight[t])[:MAX_LISTED_TOKENS]
    chosen = [t for t in ranked if weight[t] > 0 and weight[t] >= SemanticKind.PROTOTYPE_SHARE * weight[ranked[0]]]
    d = len(vectors[0])
    prototype = [0.0] * d
    for t in chosen:
        norm = math.sqrt(sum(x * x for x in vectors[t]))
        for j in range(d):
            prototype[j] += weight[t] * vectors[t][j] / norm
    return chosen, [cosine(prototype, v) for v in vectors], weight


def atlas_f1(atlas, feature: int, tokens) -> float:
    """F1 of "the token is in `tokens`" on the atlas's exact counts."""
    ids, counts, _ = (t.tolist() for t in atlas.feature_tokens(feature))
    fired, freq = dict(zip(ids, counts)), atlas.token_frequency.tolist()
    tp = sum(fired.get(t, 0) for t in tokens)
    fp = sum(freq[t] for t in tokens) - tp
    fn = int(atlas.fire_count[feature]) - tp
    return 2 * tp / max(2 * tp + fp + fn, 1)


@pytest.mark.parametrize("space", SPACES)
def test_tokens_are_the_ball_around_the_prototype(setup, tiny_model, space):
    _, atlas = setup
    vectors = vectors_by_hand(tiny_model, space)
    found = [nb for nb in neighbourhoods(atlas, torch.tensor(vectors, dtype=torch.float32), atlas.live_features, MAX_SET,
                                         chunk=7, prototype_share=SemanticKind.PROTOTYPE_SHARE) if nb is not None]
    assert len(found) >= len(atlas.live_features) // 2  # chunks of 7: several chunks, a ragged last one
    for nb in found:
        prototype, cos, weight = by_hand(atlas, nb.feature, vectors)
        assert set(nb.prototype_tokens) == set(prototype), nb.feature
        shown = [weight[t] for t in nb.prototype_tokens]
        assert all(a >= b * (1 - 1e-6) for a, b in pairwise(shown))  # heaviest first (fp32 may swap near-ties)
        inside = {t for t, c in enumerate(cos) if c >= nb.radius + TOLERANCE}
        maybe = {t for t, c in enumerate(cos) if abs(c - nb.radius) < TOLERANCE}
        assert inside <= set(nb.tokens) <= inside | maybe, nb.feature
        assert len(nb.tokens) == len(set(nb.tokens)) <= MAX_SET
        assert [cos[t] for t in nb.tokens] == sorted((cos[t] for t in nb.tokens), reverse=True)  # nearest first
        assert nb.n_unseen == sum(int(atlas.token_frequency[t]) == 0 for t in nb.tokens)


@pytest.mark.parametrize("space", SPACES)
def test_radius_maximises_the_atlas_f1(setup, tiny_model, space):
    _, atlas = setup
    vectors = vectors_by_hand(tiny_model, space)
    found = [nb for nb in neighbourhoods(atlas, torch.tensor(vectors, dtype=torch.float32), atlas.live_features, MAX_SET,
                                         prototype_share=SemanticKind.PROTOTYPE_SHARE) if nb is not None]
    assert found
    for nb in found:
        _, cos, _ = by_hand(atlas, nb.feature, vectors)
        # the radii tried: just at each token the feature fires on, where that ball is small enough
        balls = [{u for u, c in enumerate(cos) if c >= cos[t]} for t in atlas.feature_tokens(nb.feature)[0].tolist()]
        best = max(atlas_f1(atlas, nb.feature, ball) for ball in balls if len(ball) <= MAX_SET)
        assert atlas_f1(atlas, nb.feature, nb.tokens) == pytest.approx(best, abs=1e-9), nb.feature
        assert nb.f1 == pytest.approx(best, abs=1e-9)
        # the cut lies midway between seen tokens: an unseen token may be inside, no seen token moves the F1
        seen = [t for t in range(len(cos)) if int(atlas.token_frequency[t]) > 0]
        assert all(abs(cos[t] - nb.radius) > TOLERANCE for t in seen)


def test_candidates_beat_the_token_set_or_reach_unseen_tokens(setup, tiny_model):
    sae, atlas = setup
    kind = KINDS["semantic"]
    cfg = LabelConfig(autocast="none")
    labels = kind.candidates(atlas, LabelContext(sae, tiny_model, cfg))
    assert {label.space for label in labels} == set(SPACES)  # both spaces give some
    baseline = dict(zip(atlas.live_features, token_set_f1(atlas, atlas.live_features, cfg.max_tokens)))
    for label in labels:
        assert len({(other.feature, other.space) for other in labels if other.feature == label.feature and other.space == label.space}) == 1
        assert SemanticKind.MIN_SET_TOKENS <= len(label.tokens) <= MAX_SET and kind.is_compact(label)
        f1, unseen = atlas_f1(atlas, label.feature, label.tokens), sum(int(atlas.token_frequency[t]) == 0 for t in label.tokens)
        token_set = baseline[label.feature]
        assert f1 >= token_set + SemanticKind.BEAT_MARGIN - 1e-9 or (unseen > 0 and f1 >= token_set - SemanticKind.UNSEEN_SLACK - 1e-9)
        assert label.text.startswith("tokens near ") and f"{label.space} cos >= {label.radius:.2f}; {len(label.tokens)} tokens)" in label.text
    assert sum(len(label.tokens) for label in labels) == len([t for label in labels for t in label.tokens])

    # tied embeddings (W_U = W_E.T, as in SmolLM2): one space, not the same labels twice
    tied = SimpleNamespace(W_E=tiny_model.W_E.detach(), W_U=tiny_model.W_E.detach().T)
    tied_labels = kind.candidates(atlas, LabelContext(sae, tied, cfg))
    assert tied_labels and {label.space for label in tied_labels} == {"embedding"}
    assert [label.to_json() for label in tied_labels] == [label.to_json() for label in labels if label.space == "embedding"]


def test_token_vectors_of_both_model_kinds(tiny_model, tiny_bridge):
    from activations.model import embedding, unembedding
    from analysis.features.labels.semantic import token_vectors

    assert torch.equal(token_vectors(tiny_model, "embedding"), tiny_model.W_E) and torch.equal(token_vectors(tiny_model, "unembedding"), tiny_model.W_U.T)
    hf = tiny_bridge.original_model
    assert torch.equal(embedding(tiny_bridge), hf.get_input_embeddings().weight)
    assert embedding(tiny_bridge).shape == (hf.config.vocab_size, hf.config.hidden_size) == unembedding(tiny_bridge)[0].T.shape
    assert torch.equal(token_vectors(tiny_bridge, "unembedding"), hf.get_output_embeddings().weight)
    with pytest.raises(ValueError, match="unknown token space"):
        token_vectors(tiny_model, "residual")
