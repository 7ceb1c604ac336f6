"""structure and genre labels: every structure rule on hand-written text (one character per
token, and a tokenizer of multi-character tokens), the vectorised rules against plain loops
written from their definitions, and both kinds' candidates on planted atlases.

`structure_by_hand` and `genre_by_hand` are the kinds' lines of `BRUTE_FORCE` in
test_labels.py."""
from __future__ import annotations

import json
import re
import types

import pytest
import torch

from activations.model import token_strings
from analysis.features.labels import KINDS, LabelConfig, LabelContext, label_predicate
from analysis.features.labels.genre import GenreLabel
from analysis.features.labels.structure import RULES, StructureLabel

from .conftest import CharTokenizer
from .planted import atlas_from_activations


# ----------------------------------------------------------------------------- the definitions, as plain loops
def structure_by_hand(rule: str, row: list[int], p: int, strings: list[str]) -> bool:
    """Does structure rule `rule` hold at position p of token ids `row`? (the docstring of
    analysis/features/labels/structure.py, one rule at a time)"""
    seen = [strings[t] for t in row[:p + 1]]
    before, current = seen[:-1], seen[-1]
    if rule == "in-brackets":
        depth = 0
        for s in before:
            depth = max(0, depth + sum(s.count(c) for c in "([{") - sum(s.count(c) for c in ")]}"))
        return depth > 0
    if rule == "in-quotes":
        straight = curly = 0
        for s in before:
            straight += s.count('"')
            curly = max(0, curly + s.count("“") - s.count("”"))
        return straight % 2 == 1 or curly > 0
    if rule == "after-newline":
        return (len(before) > 0 and "\n" in before[-1]) or current.startswith("\n")
    if rule == "list-item":
        line = "".join(seen).split("\n")[-1].lstrip()
        return re.match(r"[-*•]|[0-9]+\.", line) is not None
    if rule == "number":
        return any(c in "0123456789" for c in current)
    if rule == "capitalised":
        return current.removeprefix(" ")[:1].isupper()
    if rule == "code-identifier":
        text, word = "".join(seen), "".join(seen)
        for k, c in enumerate(text):
            if c.isspace():
                word = text[k + 1:]
        return re.search(r"_|[a-z0-9][A-Z]|(?:^|[A-Za-z0-9_)\]])\.[A-Za-z_]", word) is not None
    raise ValueError(rule)


def genre_by_hand(label: GenreLabel, row: list[int], p: int) -> bool:
    """At least min_hits of the tokens at positions <= p are in the label's set."""
    return sum(t in label.tokens for t in row[:p + 1]) >= label.min_hits


# ----------------------------------------------------------------------------- tokenizers
class WordTokenizer:
    """A fixed vocabulary of multi-character tokens (ids = indices); `__call__` is greedy longest match."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        ids = []
        while text:
            t = max((i for i, v in enumerate(self.vocab) if v and text.startswith(v)), key=lambda i: len(self.vocab[i]))
            ids.append(t)
            text = text[len(self.vocab[t]):]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[i] for i in ids)

    def __len__(self):
        return len(self.vocab)


TRICKY = ["<|endoftext|>", "x", "y", "z", " ", "  ", ".", ".append", "(", ")", "))", "([", "]", "{", "}", "\n", "\n\n", "\n-", " \n ",
          "- ", "* ", "•", "1", "12", "3.", ". ", ".5", '"', ' "', '",', '""', "“", "”", "”“", " “Hello", "__init__", "_", "getAttr",
          "getattr", "Foo", " Bar", " the", "é", "É", " 7", "e.g.", "a1", "B", "\t", ")(", "x)", "f().", "", "\r\n"]


def marks(tokenizer, text: str, rule: str) -> str:
    """The rule over `text` as a string of "x" (holds) and "." (not), one per token."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    hold = label_predicate(StructureLabel(kind="structure", feature=0, rule=rule), tokenizer)(ids)[0]
    return "".join("x" if h else "." for h in hold.tolist())


# ----------------------------------------------------------------------------- structure rules
@pytest.mark.parametrize(("rule", "text", "expected"), [
    # the opener is outside, its closer inside; a closer never opened does not count
    ("in-brackets", "f(a, (b)) c", "..xxxxxxx.."),
    ("in-brackets", "a) [b{c}] d", "....xxxxx.."),
    ("in-quotes", 'say "hi" now "x', ".....xxx......x"),
    ("after-newline", "ab\ncd\n\ne", "..xx.xxx"),
    ("list-item", "x\n- a\n 12. b\n12 c\n* d", "..xxx....xxx......xxx"),
    ("number", "a1b 22", ".x..xx"),
    ("capitalised", "The cat Sat", "x.......x.."),
    ("code-identifier", "x.append(y_z) getattr .f e.g a", "..xxxxxxxxxxx..........x...x.."),
    ("code-identifier", "getAttr __init__ Ab aB", "...xxxx.xxxxxxxx.....x"),
])
def test_each_rule_on_characters(rule, text, expected):
    tokenizer = CharTokenizer()
    assert len(expected) == len(text)
    assert marks(tokenizer, text, rule) == expected
    strings = token_strings(tokenizer, list(range(len(tokenizer))))
    row = tokenizer(text)["input_ids"]
    assert "".join("x" if structure_by_hand(rule, row, p, strings) else "." for p in range(len(row))) == expected


def test_rules_on_multi_character_tokens():
    tokenizer = WordTokenizer(TRICKY)
    ids = {v: i for i, v in enumerate(TRICKY)}

    def on(rule: str, pieces: list[str]) -> str:
        hold = label_predicate(StructureLabel(kind="structure", feature=0, rule=rule), tokenizer)(torch.tensor([[ids[v] for v in pieces]]))
        return "".join("x" if h else "." for h in hold[0].tolist())

    # several brackets in one token all count; the floor keeps a stray closer from hiding a later opener
    assert on("in-brackets", ["x", "([", "x", "]", "x", "))", "x", "(", "x"]) == "..xxxx..x"
    assert on("in-brackets", ["))", "(", "x", ")(", "x", ")", "x"]) == "..xxxx."
    # curly quotes by depth, straight ones by parity
    assert on("in-quotes", ["“", "x", "”“", "x", "”", "x", '""', "x", ' "', "x", '",', "x"]) == ".xxxx....xx."
    assert on("after-newline", ["x", " \n ", "x", "\n-", "x"]) == "..xxx"
    # a list marker split over tokens holds from the token that completes it to the end of the line
    assert on("list-item", ["\n", "  ", "1", "12", ". ", "x", "\n-", "x", "\n", "3.", "\n", "12", "x", ".", "\n", "•", "x"]) == \
        "....xxxx.x.....xx"
    assert on("capitalised", [" Bar", "Foo", " the", "É", "é", " “Hello", " 7"]) == "xx.x..."
    assert on("number", ["a1", "x", " 7", "3."]) == "x.xx"
    assert on("code-identifier", ["x", ".append", "(", "y", ")", " ", "getattr", " ", "getAttr", " ", "f().", "x", " ", "e.g.",
                                  " ", "__init__", " ", ".5"]) == ".xxxx...x..x.x.x.."

    # random sequences of tricky tokens: every rule against its definition
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(len(TRICKY), (64, 40), generator=gen)
    tokens[0, 5] = 10_000  # an id past the vocabulary reads as an empty token
    strings = TRICKY + [""] * (10_001 - len(TRICKY))
    labels = [StructureLabel(kind="structure", feature=n, rule=rule) for n, rule in enumerate(RULES)]
    got = KINDS["structure"].compile(labels * 2, tokenizer)(tokens)  # labels sharing a rule get the same column
    assert got.shape == (64, 40, 2 * len(RULES))
    for j, label in enumerate(labels):
        expected = torch.tensor([[structure_by_hand(label.rule, row, p, strings) for p in range(40)] for row in tokens.tolist()])
        assert torch.equal(got[..., j], expected), label.rule
        assert torch.equal(got[..., j + len(RULES)], expected), label.rule
        assert expected.any() and not expected.all(), label.rule  # the random text exercises the rule both ways
        record = json.loads(json.dumps(label.to_json()))
        assert record["rule"] == label.rule and torch.equal(label_predicate(record, tokenizer)(tokens), expected)


def test_structure_needs_a_tokenizer_and_a_known_rule():
    with pytest.raises(ValueError, match="needs the tokenizer"):
        KINDS["structure"].compile([StructureLabel(kind="structure", feature=0, rule="number")])
    with pytest.raises(ValueError, match="unknown structure rule"):
        KINDS["structure"].compile([StructureLabel(kind="structure", feature=0, rule="in-parens")], CharTokenizer())


# ----------------------------------------------------------------------------- planted atlases
def char_contexts(texts: list[str], tokenizer) -> torch.Tensor:
    """Contexts of one character per token behind the boundary token (id 256), all as long as the longest."""
    n = max(len(t) for t in texts)
    return torch.tensor([[256] + tokenizer(t.ljust(n))["input_ids"] for t in texts])


def test_structure_candidates_on_a_planted_atlas():
    tokenizer = CharTokenizer()
    gen = torch.Generator().manual_seed(0)
    pieces = ["ab (cd ef) gh", "x = 12 + 345", "Big Red Dog", "no (yes) no", "call 911 (now)", "plain words only"]
    texts = [" ".join(pieces[int(k)] for k in torch.randint(len(pieces), (4,), generator=gen)) for _ in range(40)]
    tokens = char_contexts(texts, tokenizer)
    strings = token_strings(tokenizer, list(range(len(tokenizer))))
    rows = tokens.tolist()
    truth = {rule: torch.tensor([[structure_by_hand(rule, row, p, strings) for p in range(len(row))] for row in rows]) for rule in RULES}
    acts = torch.zeros(*tokens.shape, 4)
    acts[..., 0] = truth["in-brackets"] * torch.rand(tokens.shape, generator=gen)  # fires inside brackets
    acts[..., 1] = truth["number"] * (1 + torch.rand(tokens.shape, generator=gen))  # on digits
    acts[..., 2] = (tokens == ord("o")).float()  # on one letter: no structural rule
    acts[..., 3] = truth["capitalised"] & (tokens != ord("B"))  # capitals but "B"
    atlas = atlas_from_activations(tokens, acts, {i: s for i, s in enumerate(strings)}, top_n=5, n_samples=8, left=4, right=2)
    context = LabelContext(None, types.SimpleNamespace(tokenizer=tokenizer), LabelConfig())
    got = {}
    for label in KINDS["structure"].candidates(atlas, context):
        got.setdefault(label.feature, []).append(label.rule)
    assert got[0][0] == "in-brackets" and got[1][0] == "number" and 2 not in got and got[3] == ["capitalised"]
    assert all(len(rules) <= KINDS["structure"].MAX_PER_FEATURE for rules in got.values())
    label = KINDS["structure"].make(atlas, 0, rule="in-brackets")
    assert label.text == "inside brackets" and KINDS["structure"].is_compact(label)


def test_genre_candidates_on_a_planted_atlas():
    """Two kinds of text: feature 0 fires throughout the first kind, feature 1 on one common
    token of both, feature 2 on one rare word (its examples are few, scattered contexts)."""
    gen = torch.Generator().manual_seed(0)
    vocab_size, n_contexts, ctx_len = 64, 60, 48
    common, bible, docs = torch.arange(1, 11), torch.arange(20, 28), torch.arange(40, 48)
    is_bible = torch.arange(n_contexts) % 3 == 0  # a third of the contexts
    tokens = torch.zeros(n_contexts, ctx_len, dtype=torch.long)
    for c in range(n_contexts):
        own = bible if is_bible[c] else docs
        pick = torch.rand(ctx_len, generator=gen) < 0.3
        tokens[c] = torch.where(pick, own[torch.randint(len(own), (ctx_len,), generator=gen)], common[torch.randint(len(common), (ctx_len,), generator=gen)])
    tokens[:, 0] = 63  # the boundary token
    acts = torch.zeros(n_contexts, ctx_len, 3)
    acts[..., 0] = is_bible[:, None] * (0.5 + torch.rand(n_contexts, ctx_len, generator=gen))
    acts[..., 1] = (tokens == 3).float()
    acts[..., 2] = (tokens == 40).float() * (torch.arange(n_contexts) % 7 == 1)[:, None]
    atlas = atlas_from_activations(tokens, acts, {i: f"w{i}" for i in range(vocab_size)}, top_n=6, n_samples=10, left=4, right=2)
    context = LabelContext(None, types.SimpleNamespace(tokenizer=None), LabelConfig())
    labels = KINDS["genre"].candidates(atlas, context)
    assert [label.feature for label in labels] == [0]
    label = labels[0]
    assert set(label.tokens) <= set(bible.tolist()) and len(label.tokens) >= 4 and label.min_hits in KINDS["genre"].MIN_HITS
    assert label.text.startswith('in text like "w2') and KINDS["genre"].is_compact(label)
    # the rule on token ids, against its definition, alone and read back from labels.json
    rows = tokens.tolist()
    for min_hits in (1, 3):
        probe = GenreLabel(kind="genre", feature=0, tokens=label.tokens, min_hits=min_hits)
        expected = torch.tensor([[genre_by_hand(probe, row, p) for p in range(ctx_len)] for row in rows])
        assert torch.equal(label_predicate(probe)(tokens), expected)
        assert torch.equal(label_predicate(json.loads(json.dumps(probe.to_json())))(tokens), expected)
    # and it finds the kind of text: the feature's firings, nearly exactly
    pred = label_predicate(label)(tokens)[:, 1:]
    fire = acts[:, 1:, 0] > 0
    f1 = 2 * (pred & fire).sum() / (pred.sum() + fire.sum())
    assert f1 > 0.9
    assert not KINDS["genre"].is_compact(GenreLabel(kind="genre", feature=0, tokens=list(range(17))))
