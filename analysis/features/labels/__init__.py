"""Feature labels without a large language model, each one scored on held-out text.

A label is a predicate over token positions that predicts where its feature fires. One file
per kind (each a `LabelKind` registered by name; `KINDS` lists them in rank order):

    token_set.py    token-set: the current token is one of a few tokens
    semantic.py     semantic: the current token lies near a few tokens in the model's embedding
                    or unembedding space (a cosine ball, reaching tokens the atlas never saw)
    context.py      context: the current token given the one before (`" States" after " United"`)
    word_piece.py   word-piece: a word continued, or the start of a word (from token strings)
    logit.py        logit: the next token is one the decoder direction promotes (logit lens)
    punctuation.py  punctuation: punctuation / whitespace / boundary tokens
    structure.py    structure: a structural rule of the text so far (inside brackets or quotes,
                    after a newline, in a list item, capitalised words, ...)
    position.py     position: position <= p, p fitted on the atlas
    genre.py        genre: throughout texts of one kind (enough of the tokens so far are one of
                    its distinctive tokens: "thee" "unto" "hath")
    dense.py        dense: everywhere (the feature fires on most tokens)
    pattern.py      pattern: N2G-style, the tokens ending here equal one of a few n-grams
    llm.py          llm: optional, off by default: an OpenAI-compatible explainer's trigger words

Shared modules: `base.py` (`Label`, `Scores`, `LabelKind`, the registry, `label_predicate`,
`per_tokenizer` for lookups made once per vocabulary), `config.py` (`LabelConfig`), `score.py`
(the scorer and `label_features`), `store.py` (`Labels` and labels.json), `names.py` (readable
feature names), `coverage.py` (the coverage report page).

Scoring is honest: candidates are made from the atlas's text; the held-out text after it is
dealt out in alternating batches to a *selection* part, on which each feature's label is
chosen, and a *report* part, on which it is reported. F1 is measured on all firings and on
strong firings (activation > max / 4; weaker firings left out). Only compact labels (at most
16 listed tokens per clause, at most two clauses, or a short rule) count in the summary.

    labels = label_features(atlas, sae, model, LabelConfig(n_score_contexts=2048))  # tokens=: rows already read
    save_labels(labels, "runs/default/atlas/labels.json")
    labels.best(12).text, labels.best(12).scores.f1
    predicate = label_predicate(labels.best(12), model.tokenizer)  # tokens [batch pos] -> bool [batch pos]

How to add a label kind: write analysis/features/labels/<name>.py with a `LabelKind`
subclass under `@register` (its `name`, a free `rank`, `candidates`, `compile`, `render`,
and a `Label` subclass as `label_class` if its predicate reads parameters). This package
imports every module in it but the shared ones, so nothing else needs editing; then add
its brute-force line to `BRUTE_FORCE` in tests/test_labels.py.
"""
import importlib
import pkgutil

from .base import KINDS, Label, LabelContext, LabelKind, Scores, label_predicate, register
from .config import LabelConfig, saved_config
from .coverage import coverage_report, write_coverage_report
from .llm import API_KEY_ENV, check_endpoint, llm_candidates
from .score import Scorer, label_features
from .store import FeatureLabels, Labels, LabelSummary, ScoredOn, check_labels, load_labels, save_labels

_SHARED_MODULES = {"base", "config", "coverage", "names", "score", "store"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")  # registers its kind

__all__ = ["API_KEY_ENV", "KINDS", "FeatureLabels", "Label", "LabelConfig", "LabelContext", "LabelKind", "LabelSummary", "Labels",
           "ScoredOn", "Scorer", "Scores", "check_endpoint", "check_labels", "label_features", "label_predicate", "llm_candidates",
           "load_labels", "register", "save_labels", "saved_config", "coverage_report", "write_coverage_report"]
