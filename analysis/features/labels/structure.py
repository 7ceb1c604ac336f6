"""structure: a named structural rule read from token strings, e.g. `inside brackets`,
`capitalised words`. One label is one rule (`StructureLabel.rule`); the rules do not depend
on the feature. Each is causal (it reads the tokens at positions <= p only) and is decided
from the token strings (`activations.model.token_strings`):

    in-brackets      inside an open bracket: the running depth of the tokens before p is > 0.
                     A token adds its "(", "[" and "{" characters and takes away its ")", "]"
                     and "}" (all of them: a token may hold several); the depth is floored at 0
                     after each token, so a closer the context never saw opened (it began
                     mid-text) does not leave the depth negative for the rest of the context.
                     The opener itself is outside, its closer inside.
    in-quotes        inside quotes: the tokens before p hold an odd number of straight `"`
                     characters, or the running depth of curly quotes (`“` opens, `”` closes,
                     per token opens minus closes, floored at 0 after each token) is > 0.
    after-newline    the previous token contains "\\n", or the current token starts with one.
    list-item        the current line, as far as seen, is a list item: the text of the tokens
                     <= p after its last "\\n", with leading whitespace stripped, starts with
                     "-", "*", "•", or digits [0-9] followed by ".". The context start counts as a
                     line start (position 0 is the boundary token, so that line never is one).
                     It holds from the token that completes the marker to the end of the line.
    number           the token contains a digit [0-9].
    capitalised      the token's text, after one optional leading space, starts with an
                     uppercase letter (`str.isupper`).
    code-identifier  the current word, as far as seen (the text of the tokens <= p after the
                     last whitespace character), is identifier-like: it contains "_", or a
                     camelCase hump [a-z0-9][A-Z], or a dotted access: "." followed by
                     [A-Za-z_] where the "." starts the word or follows [A-Za-z0-9_)\\]]
                     (`x.append`, `.append`, `f().bar`, `__init__`, `getAttr`). A lone lowercase
                     word (`getattr`) cannot be told from prose by its text and is not one;
                     prose abbreviations such as "e.g." are.

How it is computed: per-vocabulary lookup tables, built once per vocabulary (`vocabulary_tables`,
cached): bracket and quote counts per token, and for the two line / word rules the transition
table of a small character automaton, run over each token's text from every state. A batch
then costs a gather per token rule, a cumsum (and cummin, for the floor) per depth, and one
gather per position for the automata. The rules are computed once per batch and each label
gathers its own.

Candidates: for each live feature, the rules that hold at `MIN_SHARE` or more of its example
maxima (top and random examples, evaluated on the atlas contexts) and hold there at least
`MIN_LIFT` times as often as at an average atlas position; at most `MAX_PER_FEATURE` of them
(highest share first), to keep scoring cost down.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import Tensor

from activations.model import token_strings

from ..atlas import Atlas
from .base import Label, LabelContext, LabelKind, Predicate, per_tokenizer, register

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RULES: dict[str, str] = {
    "in-brackets": "inside brackets",
    "in-quotes": "inside quotes",
    "after-newline": "after a newline",
    "list-item": "in a list item",
    "number": "tokens with a digit",
    "capitalised": "capitalised words",
    "code-identifier": "in a code identifier",
}
"""Every rule, with its display text."""

DIGITS = frozenset("0123456789")
OPENERS, CLOSERS = "([{", ")]}"


@dataclass(kw_only=True)
class StructureLabel(Label):
    rule: str = ""
    """One of `RULES`."""


# ---------------------------------------------------------------------------- character automata
# list-item: the state after the text of the current line so far
LINE_START, LINE_DIGITS, LINE_LIST, LINE_OTHER = range(4)


def _line_step(state: int, c: str) -> int:
    if c == "\n":
        return LINE_START
    if state == LINE_START:
        if c.isspace():
            return LINE_START
        if c in "-*•":
            return LINE_LIST
        return LINE_DIGITS if c in DIGITS else LINE_OTHER
    if state == LINE_DIGITS:
        if c in DIGITS:
            return LINE_DIGITS
        return LINE_LIST if c == "." else LINE_OTHER
    return state  # LINE_LIST and LINE_OTHER last to the end of the line


# code-identifier: the state after the text of the current word so far
WORD_START, AFTER_LOWER, AFTER_UPPER, AFTER_DOT, AFTER_OTHER, IDENTIFIER = range(6)
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")  # a camelCase hump may follow these
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ)]")  # a dotted access may follow these (and _LOWER)
_AFTER_DOT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")


def _word_step(state: int, c: str) -> int:
    if c.isspace():
        return WORD_START
    if state == IDENTIFIER or c == "_":
        return IDENTIFIER
    if state == AFTER_LOWER and "A" <= c <= "Z":
        return IDENTIFIER  # camelCase hump
    if state == AFTER_DOT and c in _AFTER_DOT:
        return IDENTIFIER  # dotted access
    if c == ".":
        return AFTER_DOT if state in (WORD_START, AFTER_LOWER, AFTER_UPPER) else AFTER_OTHER
    if c in _LOWER:
        return AFTER_LOWER
    return AFTER_UPPER if c in _UPPER else AFTER_OTHER


def _transitions(strings: Sequence[str], step: Callable[[int, str], int], n_states: int) -> Tensor:
    """The automaton's state after each token's text, from each state: int64 [vocab + 1, n_states]
    (the last row, for ids outside the vocabulary, keeps the state)."""
    table = torch.empty(len(strings) + 1, n_states, dtype=torch.int64)
    rows = []
    for text in strings:
        states = list(range(n_states))
        for k, c in enumerate(text):
            states = [step(s, c) for s in states]
            if len(set(states)) == 1:  # all starts merged: run the rest of the text once
                s = states[0]
                for r in text[k + 1:]:
                    s = step(s, r)
                states = [s] * n_states
                break
        rows.append(states)
    table[:len(strings)] = torch.tensor(rows, dtype=torch.int64).view(len(strings), n_states)
    table[len(strings)] = torch.arange(n_states)
    return table


# ---------------------------------------------------------------------------- vocabulary tables
class VocabularyTables(NamedTuple):
    """Per-token lookups of one tokenizer; each has one row per token id plus a last row for
    ids outside the vocabulary (an empty text)."""

    brackets: Tensor
    """int64 [vocab + 1] openers minus closers in the token's text."""
    straight_quotes: Tensor
    """int64 [vocab + 1] `"` characters."""
    curly_quotes: Tensor
    """int64 [vocab + 1] `“` minus `”` characters."""
    has_newline: Tensor
    """bool [vocab + 1] the text contains "\\n"."""
    starts_newline: Tensor
    """bool [vocab + 1] the text starts with "\\n"."""
    number: Tensor
    """bool [vocab + 1] the text contains a digit."""
    capitalised: Tensor
    """bool [vocab + 1] after one optional leading space, the text starts with an uppercase letter."""
    line: Tensor
    """int64 [vocab + 1, 4] list-item automaton: state after the token, from each state."""
    word: Tensor
    """int64 [vocab + 1, 6] code-identifier automaton: state after the token, from each state."""


def tables_of_strings(strings: Sequence[str]) -> VocabularyTables:
    """The lookups for a vocabulary whose token t reads `strings[t]`."""
    def column(values: Iterable, dtype: torch.dtype) -> Tensor:
        return torch.tensor([*values, 0], dtype=dtype)

    def capital(s: str) -> bool:
        return s.removeprefix(" ")[:1].isupper()  # one optional leading space

    return VocabularyTables(
        brackets=column((sum(s.count(c) for c in OPENERS) - sum(s.count(c) for c in CLOSERS) for s in strings), torch.int64),
        straight_quotes=column((s.count('"') for s in strings), torch.int64),
        curly_quotes=column((s.count("“") - s.count("”") for s in strings), torch.int64),
        has_newline=column(("\n" in s for s in strings), torch.bool),
        starts_newline=column((s.startswith("\n") for s in strings), torch.bool),
        number=column((any(c in DIGITS for c in s) for s in strings), torch.bool),
        capitalised=column((capital(s) for s in strings), torch.bool),
        line=_transitions(strings, _line_step, 4),
        word=_transitions(strings, _word_step, 6),
    )


@per_tokenizer
def vocabulary_tables(tokenizer: PreTrainedTokenizerBase) -> VocabularyTables:
    """The lookups of `tokenizer`'s vocabulary, built once per vocabulary (about a second for
    SmolLM2's 49,152 tokens) and cached."""
    return tables_of_strings(token_strings(tokenizer, list(range(len(tokenizer)))))


# ---------------------------------------------------------------------------- the rules on token ids
def _floored_depth_before(step: Tensor) -> Tensor:
    """Running depth before each position: d = max(0, d + step) after each token, from 0.
    step [batch pos] -> int64 [batch pos]. The floored sum is S - min(0, cummin(S)) with S
    the plain cumulative sum (Lindley's recursion), so no loop over positions."""
    total = step.cumsum(1)
    after = total - total.cummin(1).values.clamp_max(0)
    return torch.nn.functional.pad(after[:, :-1], (1, 0))


def _run(table: Tensor, ids: Tensor, accept: int) -> Tensor:
    """Run an automaton (`table` [vocab + 1, states]) along each row of ids [batch pos] from
    state 0: bool [batch pos], whether the state after each token is `accept`."""
    n_states = table.shape[1]
    flat = table.to(ids.device).flatten()
    rows = (ids * n_states).T.contiguous()  # [pos batch]: each position's ids side by side
    state = torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device)
    out = torch.empty(rows.shape, dtype=torch.bool, device=ids.device)
    for p in range(len(rows)):  # one gather per position; the state is a small int per row
        state = flat[rows[p] + state]
        torch.eq(state, accept, out=out[p])
    return out.T


def rule_mask(rule: str, tables: VocabularyTables, ids: Tensor) -> Tensor:
    """Where `rule` holds: ids [batch pos] (already mapped into the tables' rows) -> bool [batch pos]."""
    def lookup(table: Tensor) -> Tensor:
        return table.to(ids.device)[ids]

    if rule == "in-brackets":
        return _floored_depth_before(lookup(tables.brackets)) > 0
    if rule == "in-quotes":
        straight = torch.nn.functional.pad(lookup(tables.straight_quotes).cumsum(1)[:, :-1], (1, 0))
        return (straight % 2 == 1) | (_floored_depth_before(lookup(tables.curly_quotes)) > 0)
    if rule == "after-newline":
        before = torch.nn.functional.pad(lookup(tables.has_newline)[:, :-1], (1, 0))
        return before | lookup(tables.starts_newline)
    if rule == "list-item":
        return _run(tables.line, ids, LINE_LIST)
    if rule == "number":
        return lookup(tables.number)
    if rule == "capitalised":
        return lookup(tables.capitalised)
    if rule == "code-identifier":
        return _run(tables.word, ids, IDENTIFIER)
    raise ValueError(f"unknown structure rule {rule!r}; known: {', '.join(RULES)}")


def structure_masks(rules: Sequence[str], tables: VocabularyTables, tokens: Tensor) -> Tensor:
    """Where each of `rules` holds: token ids [batch pos] -> bool [batch pos rule]."""
    vocab = len(tables.number) - 1
    tokens = tokens.long()
    ids = torch.where((tokens >= 0) & (tokens < vocab), tokens, vocab)  # an id past the vocabulary: the empty row
    if not rules:
        return torch.zeros(*tokens.shape, 0, dtype=torch.bool, device=tokens.device)
    return torch.stack([rule_mask(rule, tables, ids) for rule in rules], dim=-1)


# ---------------------------------------------------------------------------- the kind
@register
class StructureKind(LabelKind):
    name = "structure"
    rank = 35
    label_class = StructureLabel

    MIN_SHARE: ClassVar[float] = 0.6
    """A rule is proposed for a feature when it holds at this share of its example maxima..."""
    MIN_LIFT: ClassVar[float] = 1.5
    """... and at least this many times its rate at an average atlas position (a rule that
    holds almost everywhere says nothing about the feature)."""
    MAX_PER_FEATURE: ClassVar[int] = 2
    """Rules proposed per feature at most (each is scored on the held-out text)."""

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        live = atlas.live_features
        if not live:
            return []
        rules = list(RULES)
        tables = vocabulary_tables(context.model.tokenizer)
        masks = structure_masks(rules, tables, atlas.tokens)  # [n_contexts ctx_len rule]
        base_rate = masks[:, 1:].double().mean((0, 1))  # position 0 (the sink) is never scored
        hits = torch.zeros(atlas.d_sae, len(rules), dtype=torch.float64)
        counts = torch.zeros(atlas.d_sae, dtype=torch.float64)
        for kind in ("top", "sample"):
            table = atlas.example_table(kind)
            valid = (table.values > 0) & (table.context >= 0)  # [d_sae n]
            at_max = masks[table.context.clamp_min(0), table.position.clamp(0, masks.shape[1] - 1)]  # [d_sae n rule]
            hits += (at_max & valid[..., None]).sum(1).double()
            counts += valid.sum(1).double()
        share = hits / counts.clamp_min(1)[:, None]  # [d_sae rule]
        passes = (share >= self.MIN_SHARE) & (share >= self.MIN_LIFT * base_rate) & (counts > 0)[:, None]
        order = share.argsort(dim=1, descending=True, stable=True)
        ranked = torch.where(passes.gather(1, order), order, -1)[live].tolist()  # passing rules, highest share first
        out = []
        for i, rank in zip(live, ranked, strict=True):
            chosen = [r for r in rank if r >= 0][:self.MAX_PER_FEATURE]
            out.extend(self.make(atlas, i, rule=rules[r]) for r in chosen)
        return out

    def compile(self, labels: Sequence[StructureLabel], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        if tokenizer is None:
            raise ValueError("a structure label needs the tokenizer to build its predicate")
        unknown = sorted({label.rule for label in labels} - set(RULES))
        if unknown:
            raise ValueError(f"unknown structure rule(s) {unknown}; known: {', '.join(RULES)}")
        tables = vocabulary_tables(tokenizer)
        rules = sorted({label.rule for label in labels}, key=list(RULES).index)
        which = torch.tensor([rules.index(label.rule) for label in labels], dtype=torch.long)

        def predicate(tokens: Tensor) -> Tensor:
            """tokens [batch pos] -> bool [batch pos label]: each rule computed once, gathered per label."""
            return structure_masks(rules, tables, tokens).index_select(-1, which.to(tokens.device))
        return predicate

    def render(self, label: StructureLabel, atlas: Atlas) -> str:
        return RULES.get(label.rule, label.rule)


__all__ = ["RULES", "StructureKind", "StructureLabel", "VocabularyTables", "rule_mask", "structure_masks", "tables_of_strings",
           "vocabulary_tables"]
