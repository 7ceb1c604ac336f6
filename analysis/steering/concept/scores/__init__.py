"""Candidate scores of concept steering, one file each (a `CandidateScore` registered by
name; `SCORES` lists them in rank order):

    input_selectivity.py  input_score: fires on the concept's word, rarely elsewhere (proposes, ranks);
                          fire_rate: share of the word's occurrences it fires on
    answer_contrast.py    contrast: fires more on answers asked to talk about the concept (proposes, ranks)
    logit_lens_z.py       logit_z: its decoder row pushes the lexicon's tokens (proposes)
    output.py             output_score and concept_gain: what an amplified feature makes the
                          model say next (concept_gain ranks and weighs the steered features)

How to add a score: write analysis/steering/concept/scores/<name>.py with a `CandidateScore`
subclass under `@register` (its `name`, a free `rank`, a `header` for the table, whether it
`proposes` candidates or counts `in_ranking`, and `score(inputs, features)`). This package
imports every module in it but `base`, so nothing else needs editing; then test it on a
planted feature in tests/test_concept_steering.py.
"""
import importlib
import pkgutil

from .base import SCORES, CandidateInputs, CandidateScore, of_features, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")  # registers its scores

__all__ = ["SCORES", "CandidateInputs", "CandidateScore", "of_features", "register"]
