"""The context and word-piece label kinds: their candidate makers on an atlas with planted
features (each firing by a known rule on random text), their predicates' edge cases, display
texts and compactness. (Their predicates against a brute force: tests/test_labels.py.)"""
from __future__ import annotations

import pytest
import torch

from analysis.features.atlas import Atlas
from analysis.features.labels import KINDS, LabelContext
from analysis.features.labels.base import MAX_LISTED_TOKENS
from analysis.features.labels.context import ContextLabel, example_firings
from analysis.features.labels.word_piece import WordPieceLabel, piece_table

from .planted import atlas_from_activations

PIECES = ["<|endoftext|>", " the", " United", " States", " Is", " cat", " dog", " run", " big", " red",
          "s", "ing", "ed", "ly", "er", ",", ".", " (", ")", "2", "7", " 3", "\n", " -"]
PIECES += [f" w{k}" for k in range(20)] + [f"x{k}" for k in range(10)]  # fillers: more words and word pieces
ID = {s: i for i, s in enumerate(PIECES)}
SINK = 0


class PieceTokenizer:
    """A tokenizer over `PIECES` (just what the word-piece kind reads: its length and decode)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(PIECES[i] for i in ids)

    def __len__(self):
        return len(PIECES)


class _Model:
    tokenizer = PieceTokenizer()


def is_continuation(prev: int, cur: int) -> bool:
    return PIECES[cur][:1].isalnum() and PIECES[prev][-1:].isalnum()


# feature -> rule over (previous token, current token): where it fires
PLANTED = {
    0: lambda prev, cur: prev == ID[" Is"],                                      # any token after " Is"
    1: lambda prev, cur: prev == ID[" United"] and cur == ID[" States"],         # " States" after " United"
    2: is_continuation,                                                          # a word continued
    3: lambda prev, cur: cur == ID[" cat"],                                      # a token, whatever comes before
    4: lambda prev, cur: prev == ID[" the"] and PIECES[cur][:1] == " " and PIECES[cur][1:2].isalpha(),  # a word starts after " the"
}


def planted_atlas(n_contexts: int = 300, ctx_len: int = 32) -> Atlas:
    """An atlas of the `PLANTED` features on uniformly random text (position 0, the sink, skipped)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, len(PIECES), (n_contexts, ctx_len), generator=g)
    tokens[:, 0] = SINK
    acts = torch.zeros(n_contexts, ctx_len, len(PLANTED))
    for c in range(n_contexts):
        for p in range(1, ctx_len):
            for i, rule in PLANTED.items():
                if rule(int(tokens[c, p - 1]), int(tokens[c, p])):
                    acts[c, p, i] = 1 + torch.rand(1, generator=g).item()  # distinct maxima
    atlas = atlas_from_activations(tokens, acts, dict(enumerate(PIECES)))
    atlas.planted_fires = acts > 0  # [contexts, pos, d_sae], for the tests
    return atlas


@pytest.fixture(scope="module")
def atlas():
    return planted_atlas()


def candidates(kind: str, atlas: Atlas) -> dict[int, list]:
    out: dict[int, list] = {}
    for label in KINDS[kind].candidates(atlas, LabelContext(None, _Model(), None)):
        out.setdefault(label.feature, []).append(label)
    return out


def test_example_firings_are_the_firings_inside_the_example_windows(atlas):
    firings = example_firings(atlas)
    fires, tokens = atlas.planted_fires, atlas.tokens.long()
    for i, rule in PLANTED.items():
        previous, current, weight = firings.of(i)
        assert len(previous) > 0 and all(rule(int(a), int(b)) for a, b in zip(previous, current))
        # each firing stands for its share of the feature's firings on its current token
        for token in set(current.tolist()):
            assert weight[current == token].sum() == pytest.approx(int(fires[..., i][tokens == token].sum()))


def test_context_candidates_find_the_planted_previous_token_rules(atlas):
    found = candidates("context", atlas)
    assert all(len(labels) <= 2 for labels in found.values())
    assert {(tuple(label.previous), tuple(label.current)) for label in found[0]} >= {((ID[" Is"],), ())}
    assert ((ID[" United"],), (ID[" States"],)) in {(tuple(label.previous), tuple(label.current)) for label in found[1]}
    assert 3 not in found  # " cat" follows anything: the previous token explains nothing
    assert any(label.previous == [ID[" the"]] for label in found[4])
    texts = {label.text for labels in found.values() for label in labels}
    assert 'any token after " Is"' in texts and '" States" after " United"' in texts


def example_windows(atlas: Atlas, feature: int) -> torch.Tensor:
    """bool [contexts pos]: the positions inside the feature's example windows."""
    inside = torch.zeros(atlas.tokens.shape, dtype=torch.bool)
    left, right = atlas.meta["config"]["window_left"], atlas.meta["config"]["window_right"]
    for kind in ("top", "sample"):
        table = atlas.example_table(kind)
        for c, pos in zip(table.context[feature].tolist(), table.position[feature].tolist()):
            if c >= 0:
                inside[c, max(1, pos - left):pos + right + 1] = True
    return inside


@pytest.mark.parametrize("kind", ["context", "word-piece"])
def test_candidates_hold_on_most_of_the_example_firings_they_were_made_from(atlas, kind):
    """Each candidate's predicate, run on the atlas's own contexts, holds on most of its
    feature's firings inside the example windows (and never at position 0, the sink)."""
    found = [label for labels in candidates(kind, atlas).values() for label in labels]
    assert found
    predicate = KINDS[kind].compile(found, _Model.tokenizer)(atlas.tokens.long())  # [contexts pos label]
    assert not predicate[:, 0].any()
    for n, label in enumerate(found):
        fires = atlas.planted_fires[..., label.feature] & example_windows(atlas, label.feature)
        assert float((predicate[..., n] & fires).sum() / fires.sum()) >= KINDS[kind].MIN_COVERAGE, label.text


def test_word_piece_candidates_find_continuations_and_word_starts(atlas):
    found = candidates("word-piece", atlas)
    assert all(len(labels) <= 2 for labels in found.values())
    assert any(label.which == "continuation" and not label.previous for label in found[2])
    assert any(label.which == "start" and label.previous == [ID[" the"]] for label in found[4])
    assert {0, 1}.isdisjoint(found)  # any token after " Is", " States": neither mostly continuations nor mostly starts
    texts = {label.text for labels in found.values() for label in labels}
    assert 'a word continued' in texts and 'the start of a word after " the"' in texts


def test_context_predicate_edge_cases_and_texts(atlas):
    kind = KINDS["context"]
    labels = [kind.make(atlas, 0, previous=[ID[" United"]], current=[ID[" States"]]),
              kind.make(atlas, 0, previous=[ID[" Is"]]),
              kind.make(atlas, 0, previous=[ID[" the"], ID[" Is"]], current=[ID[" cat"], ID[" dog"]])]
    assert [label.text for label in labels] == ['" States" after " United"', 'any token after " Is"',
                                        'tokens [" cat", " dog"] after [" the", " Is"]']
    tokens = torch.tensor([[ID[" Is"], ID[" Is"], ID[" United"], ID[" States"], ID[" the"], ID[" cat"], ID[" Is"], 999]])
    got = kind.compile(labels)(tokens)
    assert got[..., 0].tolist() == [[False, False, False, True, False, False, False, False]]
    assert got[..., 1].tolist() == [[False, True, True, False, False, False, False, True]]  # position 0: no previous token
    assert got[..., 2].tolist() == [[False, False, False, False, False, True, False, False]]
    assert kind.compile(labels)(tokens[:, :1]).shape == (1, 1, 3) and not kind.compile(labels)(tokens[:, :1]).any()
    assert kind.compile(labels)(tokens[:, :0]).shape == (1, 0, 3)
    assert kind.is_compact(labels[2])
    assert not kind.is_compact(ContextLabel(kind="context", feature=0, previous=list(range(MAX_LISTED_TOKENS + 1))))
    assert not kind.is_compact(ContextLabel(kind="context", feature=0, previous=[1], current=list(range(MAX_LISTED_TOKENS + 1))))


def test_word_piece_predicate_edge_cases_and_texts(atlas):
    kind, tokenizer = KINDS["word-piece"], _Model.tokenizer
    labels = [kind.make(atlas, 0, which="continuation"), kind.make(atlas, 0, which="start"),
              kind.make(atlas, 0, which="continuation", previous=[ID[" run"]]), kind.make(atlas, 0, which="start", previous=[ID[" the"], ID["."]])]
    assert [label.text for label in labels] == ["a word continued", "the start of a word", 'a word continued after " run"',
                                        'the start of a word after [" the", "."]']
    #                            cat    s     ,     ing   run   ing   the   dog    2     2     id past the vocabulary
    row = [ID[" cat"], ID["s"], ID[","], ID["ing"], ID[" run"], ID["ing"], ID[" the"], ID[" dog"], ID["2"], ID["2"], 999]
    got = kind.compile(labels, tokenizer)(torch.tensor([row]))[0].T.tolist()
    assert got[0] == [False, True, False, False, False, True, False, False, True, True, False]  # "ing" after ",": not continued
    assert got[1] == [True, False, False, False, True, False, True, True, False, False, False]  # a start needs no previous token
    assert got[2] == [False, False, False, False, False, True, False, False, False, False, False]
    assert got[3] == [False, False, False, False, False, False, False, True, False, False, False]
    with pytest.raises(ValueError, match="needs the tokenizer"):
        kind.compile(labels)
    with pytest.raises(ValueError, match="continuation or a start"):
        WordPieceLabel(kind="word-piece", feature=0, which="middle")
    assert not kind.is_compact(WordPieceLabel(kind="word-piece", feature=0, previous=list(range(MAX_LISTED_TOKENS + 1))))


def test_piece_table_is_built_once_per_tokenizer():
    first, other = PieceTokenizer(), PieceTokenizer()
    table = piece_table(first)
    assert piece_table(first) is table and piece_table(other) is table  # keyed on the vocabulary, not the object
    assert torch.equal(piece_table(other), table)
    assert table[ID["ing"]].tolist() == [True, True, False] and table[ID[" cat"]].tolist() == [False, True, True]
    assert table[ID[","]].tolist() == [False, False, False] and table[ID[" 3"]].tolist() == [False, True, False]


class ListTokenizer:
    """A tokenizer over any list of pieces (its length and decode)."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)

    def __len__(self):
        return len(self.pieces)


def test_tokenizer_caches_are_keyed_on_the_vocabulary_not_the_object():
    from analysis.features.labels.base import vocabulary_key
    from analysis.features.labels.structure import vocabulary_tables

    table = piece_table(ListTokenizer(list(PIECES)))
    assert piece_table(ListTokenizer(list(PIECES))) is table  # a tokenizer loaded twice shares the table
    swapped = list(PIECES)
    swapped[ID["ing"]], swapped[ID[" cat"]] = " cat", "ing"
    for _ in range(3):  # a new tokenizer may reuse a collected one's id: the vocabulary decides, never the id
        other = piece_table(ListTokenizer(swapped))
        assert other is not table and other[ID["ing"]].tolist() == [False, True, True] and other[ID[" cat"]].tolist() == [True, True, False]
    grown = piece_table(ListTokenizer([*PIECES, "ful"]))  # a token added since
    assert len(grown) == len(PIECES) + 1 and torch.equal(grown[:len(PIECES)], table)
    key = vocabulary_key(ListTokenizer(list(PIECES)))
    assert key == vocabulary_key(ListTokenizer(list(PIECES))) and key != vocabulary_key(ListTokenizer(swapped))
    tables = vocabulary_tables(ListTokenizer(list(PIECES)))
    assert vocabulary_tables(ListTokenizer(list(PIECES))) is tables and vocabulary_tables(ListTokenizer(swapped)) is not tables
