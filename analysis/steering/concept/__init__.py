"""Concept steering: find the features that make the model *say* a concept, steer several of
them together at a dose chosen automatically, and score the text with a lexicon that does not
depend on the steered features.

1. **Lexicon** (`lexicon.py`, `Lexicon`): the concept's words, given by the user or, by default,
   the concept word's nearest whole words in the model's embedding, shown (`neighbour_lexicon`;
   `derive_lexicon` takes them from features' labels and logit effects instead). A word of the
   text counts when it is a lexicon word or one of its inflections ("loved" for "love"). It is
   the concept score of every steering table, beside the steered features' own re-read
   activation, so a topic that moves without the feature's token ("marriage" -> "a wedding")
   is counted.
2. **Feature choice** (`search.py`, `search_concept`). Every candidate gets each registered
   candidate score (`scores/`, one file each):
   * input selectivity (`analysis.features.monitor.input_selectivity`): does it fire on the
     concept's word in text, and rarely elsewhere?
   * answer contrast: how much more it fires on the model's own answers when the prompt asks
     for the concept (`PROMPTING`) than on its unprompted answers: what the model represents
     while it talks about the concept;
   * logit lens: a z-score of the push its decoder row gives the lexicon's tokens;
   * output side, after Arad, Mueller & Belinkov 2025 ("SAEs are good for steering if you select
     the right features"): the feature is clamped to `amplify` x its max activation in one
     forward pass over short chat prompts, and we read the next-token distribution at the start
     of the answer. `output_score` is Arad et al.'s: for the most probable of its own top
     `top_k` logit-lens tokens (W_dec[i] @ W_U), (1 - rank / |V|) x its probability;
     `delta_confidence` how much more probable the amplified model's top token becomes
     (Δ token confidence, arXiv 2510.03659); `concept_gain` the gain in log P(lexicon tokens),
     in nats, against control tokens that were as likely before.
   Candidates are the best `n_candidates` of each proposing score (input selectivity, answer
   contrast, logit lens); they are ranked by the mean of the ranking scores (input selectivity,
   answer contrast, concept gain), each scaled to its best candidate. Then the **trial score**
   (`scores/trial.py`): the best `n_trials` by concept gain and logit lens are each steered
   alone, the way they will be used (mode, positions, a trial dose), in short answers to a few
   tuning prompts; the share of answers showing the concept without looping decides which
   candidates are steered together and their weights (the concept gain decides when no trial
   shows the concept).
3. **Dose** (`dose.py`, `search_dose`): by `ConceptConfig.mode`, the weighted decoder
   directions are added, their sum scaled to dose x the residual stream's typical norm ("add"),
   or each feature is clamped (at least) to dose x weight x its max activation (error term
   kept, at `positions`, never position 0: `analysis.steering.interventions`). The dose is the
   largest on a rising ladder whose answers to held-out tuning prompts keep perplexity and
   repetition within `budget` x the unsteered answers' (the report's fair measures), refined by
   bisection between the last dose that passed and the first that failed (the budget's edge);
   a dose passes only when at least `confidence` (0.8) of bootstrap resamples of its tuning
   answers are within budget, since a dozen prompts measure the edge noisily;
   the dose steered is the one within budget whose tuning answers show the concept most often
   (the smaller of equals; the edge when none shows it); each dose's concept frequency is kept for the dose-response figure
   (`figure.py`). `choose_way` runs the dose
   search for several modes and positions and keeps the one whose dose shows the concept in
   the most tuning answers.
4. **A baseline without a dictionary** (`mean_difference.py`): the concept's mean-difference
   direction (DiffMean; the hook's mean on answers asked for the concept less on unprompted
   answers), steered as a one-latent dictionary through the same dose search and report.
5. **Report** (`report.py`, `compare_concept`): answers unsteered, prompted, steered and both,
   scored the same way: the concept frequency without the request's words, perplexity given
   the prompt that asks for the concept, and the repetition of every answer.
"""
from ..measure import Fluency
from .config import CONCEPT_MODES, MORE_TUNING_PROMPTS, PROMPTING, REQUEST, TUNING_PROMPTS, ConceptConfig, ConceptMode
from .dose import (
    DosePoint,
    DoseSearch,
    VerdictConfidence,
    Way,
    WayChoice,
    best_dose,
    budget_confidence,
    choose_dose,
    choose_way,
    concept_ratio,
    paired_confidence,
    parse_way,
    search_dose,
    way_name,
    within_budget,
)
from .figure import dose_response_figure, write_dose_response
from .lexicon import Lexicon, LexiconScores, derive_lexicon, lexicon_scores, neighbour_lexicon
from .mean_difference import MeanDifference, direction_dictionary, mean_difference, mean_difference_condition, mean_difference_search
from .report import ConceptPoint, ExtraCondition, compare_concept
from .scores import SCORES, CandidateInputs, CandidateScore, register
from .scores.answer_contrast import answer_contrast
from .scores.logit_lens_z import lexicon_logit_z
from .scores.output import OutputScores, matched_controls, output_scores
from .search import STEERED_BY, ConceptFeature, ConceptSearch, concept_steering, ranking_table, search_concept

__all__ = [
    "CONCEPT_MODES", "MORE_TUNING_PROMPTS", "ConceptMode", "PROMPTING", "REQUEST", "SCORES", "STEERED_BY", "TUNING_PROMPTS", "CandidateInputs", "CandidateScore", "ConceptConfig", "ConceptFeature",
    "ConceptPoint", "ConceptSearch", "DosePoint", "DoseSearch", "Way", "WayChoice", "ExtraCondition", "Fluency", "Lexicon", "LexiconScores", "OutputScores",
    "VerdictConfidence", "answer_contrast", "best_dose", "budget_confidence", "concept_ratio", "paired_confidence", "choose_dose", "choose_way", "parse_way", "way_name", "compare_concept", "concept_steering", "derive_lexicon", "lexicon_logit_z", "lexicon_scores", "neighbour_lexicon",
    "MeanDifference", "direction_dictionary", "mean_difference", "mean_difference_condition", "mean_difference_search", "matched_controls", "output_scores", "ranking_table", "register", "search_concept", "search_dose", "within_budget",
    "dose_response_figure", "write_dose_response",
]
