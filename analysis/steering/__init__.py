"""Steering: change what a model says by editing SAE features while it generates, and
measure the effect without a judge model.

    interventions.py   Intervention (clamp / clamp_at_least / add / ablate; units max, absolute, norm),
                       Steering (positions all / prompt / generated), steer(): the semantics
    measure.py         side-by-side text, feature stats, feature readout, fluency, KL
    sweep.py           dose-response sweeps -> JSON + standalone plotly figure
    causal.py          does ablating a feature lower the tokens its logit effects promote?
    concept/           concept steering: features chosen by pluggable candidate scores, an
                       automatic dose, a lexicon score, compared with prompting
    cli.py             `saewb steer`

Generation itself (KV cache, padding, sampling) is `activations.generation`; a `Steering`
is the edit it attaches to every forward pass.
"""
from activations.generation import GenerationConfig, decode, encode_prompts, generate_tokens, stop_token_ids

from .causal import CausalCheck, causal_check
from .interventions import (
    MODES,
    POSITIONS,
    UNITS,
    Intervention,
    Mode,
    Positions,
    Steering,
    TokenPredicate,
    Unit,
    check_compatible,
    check_features,
    steer,
)
from .measure import (
    FeatureReadout,
    FeatureStats,
    Fluency,
    SideBySide,
    compare,
    feature_readout,
    feature_stats,
    format_side_by_side,
    generation_fluency,
    generation_nll,
    kl_on_text,
)
from .sweep import MORE_NEUTRAL_PROMPTS, NEUTRAL_PROMPTS, SweepConfig, SweepPoint, SweepResult, score_condition, summarize, sweep, write_sweep

__all__ = [
    "POSITIONS", "Positions", "CausalCheck", "FeatureReadout", "FeatureStats", "Fluency", "GenerationConfig", "Intervention", "MODES", "Mode", "MORE_NEUTRAL_PROMPTS", "NEUTRAL_PROMPTS",
    "SideBySide", "Steering", "SweepConfig", "SweepPoint", "SweepResult", "TokenPredicate", "UNITS", "Unit", "causal_check",
    "check_compatible", "check_features", "compare", "decode", "encode_prompts", "feature_readout", "feature_stats", "format_side_by_side",
    "generate_tokens", "generation_fluency", "generation_nll", "kl_on_text", "score_condition", "steer", "stop_token_ids", "summarize",
    "sweep", "write_sweep",
]
