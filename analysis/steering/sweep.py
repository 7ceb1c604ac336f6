"""Dose-response sweeps: generate at every strength, read the steered features back, score
fluency and side effects (`analysis.steering.measure`), and write JSON + a standalone plotly
figure."""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor
from tqdm.auto import tqdm

from activations.generation import GenerationConfig, decode, encode_prompts, generate_tokens
from activations.io import atomic_write_bytes, atomic_write_json
from activations.model import HookedModel
from sae.base import SAE

from .interventions import MODES, POSITIONS, Intervention, Mode, Positions, Steering, TokenPredicate, Unit, check_compatible, check_features
from .measure import FeatureReadout, Fluency, feature_readout, generation_fluency, kl_on_text, residual_norm, share

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


NEUTRAL_PROMPTS = [
    # Everyday requests that name no particular topic, for measuring steering on "unrelated" prompts.
    "Tell me about your weekend.", "What should I do this afternoon?", "Write a short story about a robot.",
    "Give me three tips for staying healthy.", "Describe your ideal day.", "What is the capital of France?",
    "Explain how a bicycle works.", "Write a poem about the morning.", "What makes a good friend?",
    "How do I make a cup of tea?", "Tell me a fun fact.", "What is your favourite colour and why?",
    "Describe a walk in the city.", "How can I learn a new language?", "Write a letter to a neighbour.",
    "What do you think about rainy days?", "Summarise the plot of a famous novel.", "How do airplanes stay in the air?",
    "Plan a birthday party for a child.", "Why do people keep diaries?", "Describe the room you are in.",
    "What is the best way to start the morning?", "Give advice to a new student.", "Tell me about an interesting job.",
]
MORE_NEUTRAL_PROMPTS = [
    # Twenty-four more, written before any steering was measured on them, for a report verdict less at the mercy of one
    # or two looping answers (`bench/concept_steering.py --report-prompts 48`). Like the first, they name none of the
    # bench's concepts (love, marriage, music, food, sea, Python) and none is a tuning prompt or a chat-corpus request.
    "Describe a busy train station.", "How do I keep my desk tidy?", "Invent a short tale about a key that opens no door.",
    "What is the best advice you have ever heard?", "Explain how a clock works.", "Tell me about a famous inventor.",
    "Write a few lines about the first snow of winter.", "How can I get better at remembering names?", "Describe a quiet library.",
    "What should I bring to a job interview?", "Give me three reasons to take a walk every day.", "Write a short speech for a school assembly.",
    "What is interesting about the moon?", "How do I fix a flat tyre on a bike?", "Describe the view from a tall building.",
    "What makes a good leader?", "Tell me a story about a clever fox.", "How does a rainbow form?",
    "Write a message to welcome a new colleague.", "What is a good habit to start this year?", "Describe an old house at the end of a street.",
    "How should I prepare for an exam?", "What do you enjoy about the evening?", "Explain why leaves change colour.",
]


@dataclass
class SweepConfig:
    features: list[int]
    """Features steered together at every strength."""
    mode: Mode = "clamp"
    """clamp: f_i = v | clamp_at_least: f_i = max(f_i, v) | add: alpha * W_dec[i] added | ablate: f_i = 0
    (the SAE's error term kept in every mode)."""
    strengths: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    """v or alpha, one sweep point each (ablate has none)."""
    unit: Unit = "max"
    """Strengths in multiples of each feature's max activation ("max"), raw ("absolute"), or
    shares of the residual stream's typical norm at the hook ("norm", measured on the prompts)."""
    positions: Positions = "all"
    """Positions edited: "all", "prompt", "generated", "opening" (the prompt and the answer's first tokens) or "fading" (the
    prompt, then a push halving every `interventions.FADING_HALF_LIFE` answer tokens); position 0 never."""
    threshold: float = 0.25
    """A generation shows the steered features when one exceeds this (in `unit`s) on a generated token."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    n_examples: int = 3
    """Generations kept as text per strength, for the report."""

    def __post_init__(self):
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        if self.mode not in MODES:
            raise ValueError(f"unknown steering mode {self.mode!r}: choose one of {MODES}")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown steering positions {self.positions!r}: choose one of {POSITIONS}")
        if not self.features or not self.strengths:
            raise ValueError("a sweep needs at least one feature and one strength")


@dataclass
class SweepPoint:
    series: str
    """"unsteered", a steering mode, or another condition (e.g. "prompt")."""
    strength: float | None
    """In the sweep's unit; None for conditions without a strength."""
    feature_activation: float | None
    """Mean activation of the steered features on the re-read generations (relative to max
    activation when known; None when nothing was generated)."""
    feature_frequency: float
    """Share of generations where a steered feature exceeds the threshold on some token."""
    predicate_rate: float | None
    """Mean share of generated tokens matching the label predicate (None without one)."""
    predicate_frequency: float | None
    """Share of generations with at least one token matching the label predicate (None without one)."""
    perplexity: float | None
    """exp(mean NLL per generated token) under the unsteered model, given the prompts (None
    when nothing was generated)."""
    repetition: float | None
    """Mean repeated-trigram rate of the generations."""
    kl: float | None
    """Mean KL(unsteered || steered) per token on neutral text (None where not defined)."""
    n_generations: int
    examples: list[str]


def _nan_to_none(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def summarize(series: str, strength: float | None, tokenizer: PreTrainedTokenizerBase, generated: Sequence[Tensor], readout: FeatureReadout,
              fluency: Fluency, kl: float | None, n_examples: int = 3) -> SweepPoint:
    """One point of a dose-response curve from the scores of its generations [n_new] each."""
    return SweepPoint(
        series=series, strength=strength,
        feature_activation=_nan_to_none(float(readout.activation.nanmean())),
        feature_frequency=share(readout.present),
        predicate_rate=None if readout.predicate_rate is None else float(readout.predicate_rate.mean()),
        predicate_frequency=None if readout.predicate_rate is None else share(readout.predicate_rate > 0),
        perplexity=_nan_to_none(fluency.perplexity), repetition=_nan_to_none(fluency.repetition), kl=_nan_to_none(kl),
        n_generations=len(generated), examples=[decode(tokenizer, g) for g in generated[:n_examples]],
    )


def score_condition(model: HookedModel, sae: SAE, series: str, strength: float | None, prompts: Sequence[Tensor],
                    generated: Sequence[Tensor], features: Sequence[int], max_activation: Tensor | None, threshold: float, kl: float | None,
                    predicate: TokenPredicate | None = None, n_examples: int = 3, batch_size: int = 8) -> SweepPoint:
    """Feature readout, fluency and (given) side-effect scores of one set of generations [n_new]
    of prompts [len]; `max_activation` [d_sae] as in `feature_readout`."""
    readout = feature_readout(model, sae, features, generated, max_activation, threshold, predicate, batch_size)
    fluency = generation_fluency(model, prompts, generated, batch_size)
    return summarize(series, strength, model.tokenizer, generated, readout, fluency, kl, n_examples)


@dataclass
class SweepResult:
    features: list[int]
    mode: str
    unit: str
    prompts: list[str]
    points: list[SweepPoint]
    """The unsteered baseline first, then one point per strength (and any extra conditions)."""
    neutral_text: str = ""
    """What the KL side effect was measured on (e.g. a corpus and split)."""

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(model: HookedModel, sae: SAE, prompts: Sequence[str], neutral_tokens: Tensor, cfg: SweepConfig,
          max_activation: Tensor | None = None, predicate: TokenPredicate | None = None, neutral_text: str = "") -> SweepResult:
    """Dose-response: generate from `prompts` unsteered and at every strength of `cfg`, and
    score the steered features' readout, fluency and side effects (KL on `neutral_tokens`
    [n pos]); `max_activation` [d_sae]: the unit of `unit="max"` strengths."""
    check_features(cfg.features, sae.cfg.d_sae)  # before any generation
    check_compatible(model, sae)
    readout_max = max_activation if cfg.unit == "max" else None
    prompt_tokens = encode_prompts(model.tokenizer, prompts, cfg.generation.chat)
    score = lambda series, strength, generated, kl: score_condition(  # noqa: E731
        model, sae, series, strength, prompt_tokens, generated, cfg.features, readout_max, cfg.threshold, kl, predicate, cfg.n_examples)
    norm = residual_norm(model, sae.cfg.hook_name, prompt_tokens) if cfg.unit == "norm" else None
    points = [score("unsteered", None, generate_tokens(model, prompt_tokens, cfg.generation), 0.0)]
    for strength in tqdm(cfg.strengths, desc=f"steering sweep ({cfg.mode})"):
        steering = Steering(sae, [Intervention(f, cfg.mode, strength, cfg.unit) for f in cfg.features], max_activation, norm,
                            cfg.positions)
        generated = generate_tokens(model, prompt_tokens, cfg.generation, steering)
        points.append(score(cfg.mode, strength, generated, kl_on_text(model, steering, neutral_tokens)))
    return SweepResult(list(cfg.features), cfg.mode, cfg.unit, list(prompts), points, neutral_text)


class SweepFiles(NamedTuple):
    json_path: Path
    """sweep.json: the `SweepResult`."""
    html_path: Path
    """sweep.html: the standalone figure and example text."""


def write_sweep(result: SweepResult, out_dir: str | Path, title: str = "Steering dose-response") -> SweepFiles:
    """Write `sweep.json` and the standalone `sweep.html` (three curves + example text)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "sweep.json", out / "sweep.html"
    atomic_write_json(json_path, result.to_dict())
    atomic_write_bytes(html_path, steering_report(result, title).encode())
    return SweepFiles(json_path, html_path)


DASHES = {"feature_frequency": "dot", "predicate_frequency": "dashdot", "predicate_rate": "longdash", "repetition": "dot"}
"""Line style of the curves drawn beside another in the same panel."""


def steering_sweep_figure(result: SweepResult) -> go.Figure:
    """Dose-response curves of a `analysis.steering.SweepResult`: the steered features' readout,
    fluency (perplexity, repetition) and side effects (KL on neutral text) against strength, one line
    per series; conditions without a strength (the unsteered baseline, prompting) are
    horizontal dashed lines."""
    fig = make_subplots(rows=1, cols=3, specs=[[{}, {"secondary_y": True}, {}]],
                        subplot_titles=("steered features (re-read by the unsteered model)", "fluency cost",
                                        "side effects on neutral text"))
    curves = [  # (column, field, label, secondary y)
        (1, "feature_activation", "mean activation", False), (1, "feature_frequency", "feature frequency", False),
        (1, "predicate_frequency", "label predicate frequency", False), (1, "predicate_rate", "label predicate rate", False),
        (2, "perplexity", "perplexity", False),
        (2, "repetition", "repetition rate", True), (3, "kl", "KL per token", False),
    ]
    series = list(dict.fromkeys(p.series for p in result.points))
    colors = ["#444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    strengths = [p.strength for p in result.points if p.strength is not None]
    lo, hi = (min(strengths), max(strengths)) if strengths else (0.0, 1.0)
    for s_idx, name in enumerate(series):
        points = sorted((p for p in result.points if p.series == name), key=lambda p: (p.strength is None, p.strength or 0))
        color = colors[s_idx % len(colors)]
        for col, key, label, secondary in curves:
            values = [getattr(p, key) for p in points]
            if all(v is None for v in values):
                continue
            dash = DASHES.get(key)
            if points[0].strength is None:  # a condition without strength: a level line
                x, y, mode, dash = [lo, hi], [values[0]] * 2, "lines", "dash" if dash is None else "longdashdot"
            else:
                x, y, mode = [p.strength for p in points], values, "lines+markers"
            fig.add_trace(go.Scatter(x=x, y=y, mode=mode, name=f"{name}: {label}", legendgroup=name,
                                     line=dict(color=color, dash=dash)), row=1, col=col, secondary_y=secondary if col == 2 else None)
    unit = "x max activation" if result.unit == "max" else "absolute"
    fig.update_xaxes(title_text=f"strength ({unit})")
    fig.update_yaxes(title_text="perplexity", type="log", row=1, col=2, secondary_y=False)
    fig.update_yaxes(title_text="repetition rate", row=1, col=2, secondary_y=True)
    fig.update_layout(height=450, title=f"Steering features {result.features} ({result.mode})")
    return fig


def steering_report(result: SweepResult, title: str) -> str:
    """One standalone HTML page: the dose-response figure and example generations per
    condition (model text HTML-escaped)."""
    rows = "".join(
        f"<tr><td>{html.escape(p.series)}</td><td>{'' if p.strength is None else f'{p.strength:g}'}</td>"
        f"<td>{html.escape(' / '.join(' '.join(e.split()) for e in p.examples))}</td></tr>"
        for p in result.points
    )
    prompts = "".join(f"<li>{html.escape(p)}</li>" for p in result.prompts)
    figure = steering_sweep_figure(result).to_html(full_html=False, include_plotlyjs="inline")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td{border:1px solid #ccc;padding:3px 8px;vertical-align:top}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>{figure}<h2>Example generations</h2>"
        f"<table><tr><th>condition</th><th>strength</th><th>first generations</th></tr>{rows}</table>"
        f"<h2>Prompts</h2><ol>{prompts}</ol></body></html>"
    )


__all__ = [
    "MORE_NEUTRAL_PROMPTS", "NEUTRAL_PROMPTS", "SweepConfig", "SweepFiles", "SweepPoint", "SweepResult", "score_condition", "steering_report",
    "steering_sweep_figure", "summarize", "sweep", "write_sweep",
]
