"""The lexicon of a concept: the words that show it in text, the score of a text by those
words alone (independent of the steered features), and, when the user gives none, one from the
model's embedding neighbours of the concept word (`neighbour_lexicon`, the default) or derived
from the features (`derive_lexicon`)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from activations.model import token_strings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from activations.model import HookedModel

    from ...features.atlas import Atlas
    from ...features.labels import Labels


_WORD = re.compile(r"[A-Za-z][A-Za-z']*")
_SUFFIXES = ("s", "es", "ed", "d", "ing", "er", "ers", "ly", "al", "y", "ies", "ied", "ful", "ness")
_STOPWORDS = frozenset(
    "the a an and or of to in on at for with by from as is are was were be been it its this that these those "
    "he she they we you i me my your his her their our not no but if so do does did has have had will would "
    "shall should can could may might must there here what which who whom when where why how all any some "
    "one two than then them also into out up down over such only very more most".split()
)


def _word_forms(word: str) -> set[str]:
    """`word` and its common inflections: love -> loves, loved, loving, lover, lovely ..."""
    forms = {word} | {word + s for s in _SUFFIXES}
    if word.endswith("e"):
        forms |= {word[:-1] + s for s in ("ing", "ed", "er", "ers", "y")}
    if word.endswith("y"):
        forms |= {word[:-1] + s for s in ("ies", "ied", "ier")}
    if len(word) >= 3 and word[-1] not in "aeiouwy" and word[-2] in "aeiou":  # stop -> stopped
        forms |= {word + word[-1] + s for s in ("ed", "ing", "er")}
    return forms


@dataclass(frozen=True)
class Lexicon:
    """The words that show a concept in text. Matching is on whole words, case-insensitive,
    with common inflections: "loved", "loving" and "lovers" match "love"."""

    concept: str
    words: tuple[str, ...]
    source: str = "given"
    """"given" (the user's words), "neighbours" (`neighbour_lexicon`) or "derived" (`derive_lexicon`)."""

    def __post_init__(self):
        words = tuple(dict.fromkeys(w.strip().lower() for w in self.words if w and w.strip()))
        bad = [w for w in words if not _WORD.fullmatch(w)]
        if bad:
            raise ValueError(f"lexicon words must be single words of letters: {bad}")
        if not words:
            raise ValueError(f"the lexicon of {self.concept!r} has no words")
        object.__setattr__(self, "words", words)
        forms: dict[str, str] = {}
        for w in words:
            for form in _word_forms(w):
                forms.setdefault(form, w)
        object.__setattr__(self, "_forms", forms)

    def matches(self, text: str) -> list[str]:
        """The lexicon words found in `text`, once per occurrence, in order."""
        forms = self._forms  # type: ignore[attr-defined]
        return [forms[w] for w in (m.group().lower().strip("'") for m in _WORD.finditer(text)) if w in forms]

    def without_request(self, request: str) -> Lexicon:
        """This lexicon less every word the request itself uses (in any of the word's
        inflections), so that an answer echoing the request ("Sure, let's talk about the sea")
        scores nothing: the echo rule, applied to every condition alike. A ValueError when the
        request uses every word."""
        asked = {w.lower().strip("'") for w in _WORD.findall(request)}
        asked_forms = set().union(*(_word_forms(w) for w in asked)) if asked else set()
        kept = tuple(w for w in self.words if not (_word_forms(w) & asked) and w not in asked_forms)
        if not kept:
            raise ValueError(f"every word of the lexicon of {self.concept!r} is in the request {request!r}: add words that show the "
                             "concept without naming it")
        return Lexicon(self.concept, kept, self.source)

    def token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """First token of each word as it starts a word mid-text (" love", " Love") or a text ("love", "Love")."""
        ids: set[int] = set()
        for w in self.words:
            for variant in (" " + w, " " + w.capitalize(), w, w.capitalize()):
                pieces = tokenizer(variant, add_special_tokens=False)["input_ids"]
                if pieces:
                    ids.add(int(pieces[0]))
        return sorted(ids)


class LexiconScores(NamedTuple):
    present: Tensor
    """[n] bool: the text has at least one lexicon word."""
    rate: Tensor
    """[n] lexicon words per word of the text (0 for a text without words)."""


def lexicon_scores(texts: Sequence[str], lexicon: Lexicon) -> LexiconScores:
    """How much each text talks about the lexicon's concept, judged by its words alone."""
    hits = [len(lexicon.matches(t)) for t in texts]
    words = [len(_WORD.findall(t)) for t in texts]
    return LexiconScores(torch.tensor([h > 0 for h in hits], dtype=torch.bool),
                         torch.tensor([h / w if w else 0.0 for h, w in zip(hits, words)]))


def neighbour_lexicon(concept: str, model: HookedModel, max_words: int = 16) -> Lexicon:
    """The concept's words and the whole words nearest to them in the model's token embedding (cosine to the mean of
    the concept words' " word" tokens): alphabetic, 3+ letters, stop words left out, one entry per lower-cased word.
    It does not depend on any SAE feature. Embedding neighbours are related words, not only synonyms (SmolLM2's
    nearest to " sea": ocean, seas, marine, lake, ... but also road; to " love": hate), so show it to the user, and
    give a lexicon (--lexicon) where it matters."""
    from activations.model import embedding

    words = [w.lower() for w in _WORD.findall(concept)]
    if not words:
        raise ValueError(f"the concept {concept!r} has no word to find neighbours of: give a lexicon")
    table = embedding(model).float()
    ids = [i for w in words for i in model.tokenizer.encode(" " + w, add_special_tokens=False)]
    centre = table[ids].mean(0)
    cosine = (table @ centre) / (table.norm(dim=1) * centre.norm()).clamp_min(1e-8)
    for i in cosine.topk(min(50 * max_words, len(cosine))).indices.tolist():
        if len(dict.fromkeys(words)) >= max_words:
            break
        piece = token_strings(model.tokenizer, [i])[0]
        w = piece.strip().lower()
        if piece.startswith(" ") and len(w) >= 3 and w.isalpha() and w not in _STOPWORDS:
            words.append(w)
    return Lexicon(concept, tuple(dict.fromkeys(words))[:max_words], source="neighbours")


def derive_lexicon(concept: str, tokenizer: PreTrainedTokenizerBase, features: Sequence[int], atlas: Atlas, labels: Labels | None = None,
                   max_words: int = 24) -> Lexicon:
    """A lexicon from the concept word, the tokens of the features' labels and the tokens
    their logit effects promote: alphabetic words of 3+ letters, stop words left out. Show it
    to the user: it comes from the features, so it is only as independent as they are good."""
    words = [w.lower() for w in _WORD.findall(concept)]
    top_ids, _ = atlas.logit_tokens("top")
    for f in features:
        label = labels.best(f) if labels is not None else None
        ids = list(getattr(label, "tokens", []) or [])[:12] if label is not None else []
        ids += top_ids[f].tolist()
        for piece in token_strings(tokenizer, ids):
            w = piece.strip().lower()  # whole words only (a leading space): word pieces are not words
            if piece.startswith(" ") and len(w) >= 3 and w.isalpha() and w not in _STOPWORDS:
                words.append(w)
    return Lexicon(concept, tuple(dict.fromkeys(words))[:max_words], source="derived")


__all__ = ["Lexicon", "LexiconScores", "derive_lexicon", "lexicon_scores", "neighbour_lexicon"]
