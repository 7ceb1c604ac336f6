"""Concept steering: find the features that make the model *say* a concept, steer several of
them together at a dose chosen automatically, and score the text with a lexicon that does not
depend on the steered features.

1. **Lexicon** (`Lexicon`): the concept's words, given by the user or derived and shown
   (`derive_lexicon`, from the concept search's labels and logit effects). A word of the text
   counts when it is a lexicon word or one of its inflections ("loved" for "love"). It is the
   concept score of every steering table, beside the steered features' own re-read activation,
   so a topic that moves without the feature's token ("marriage" -> "a wedding") is counted.
2. **Feature choice** (`search_concept`). Every candidate gets three scores:
   * input selectivity (`analysis.features.monitor.input_selectivity`): does it fire on the
     concept's word in text, and rarely elsewhere?
   * answer contrast: how much more it fires on the model's own answers when the prompt asks
     for the concept (`PROMPTING`) than on its unprompted answers: what the model represents
     while it talks about the concept;
   * output side, after Arad, Mueller & Belinkov 2025 ("SAEs are good for steering if you select
     the right features"): the feature is clamped to `amplify` x its max activation in one
     forward pass over short chat prompts, and we read the next-token distribution at the start
     of the answer. `output_score` is the probability mass its own logit-lens tokens (W_dec[i]
     @ W_U, top `top_k`) gain; `concept_gain` is the gain in log P(lexicon tokens), in nats,
     against control tokens that were as likely before.
   Candidates are the best of each input side and of the logit lens (z-score on the lexicon's
   tokens); they are ranked by the mean of the three scores, each scaled to its best candidate,
   and the top `n_features` with a positive concept gain are steered, weighted by that gain.
3. **Dose** (`search_dose`): the steered features are clamped to dose x weight x their max
   activation (error term kept, every position but 0: `analysis.steering.interventions`). The dose
   is the largest on a rising ladder whose answers to held-out tuning prompts keep perplexity
   (under the unsteered model) and repetition within `budget` x the unsteered answers', refined
   by bisection between the last dose that passed and the first that failed.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import boundary_token_id
from activations.generation import GenerationConfig, decode, encode_prompts, generate_tokens
from activations.model import HookedModel, logits_with_edit, token_strings, unembedding
from sae.base import SAE

from ..evaluation.metrics import repetition_rate
from .interventions import Intervention, Steering, check_compatible, check_features
from .measure import generation_nll, right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..features.atlas import Atlas
    from ..features.labels import Labels


TUNING_PROMPTS = [
    # Neutral prompts for the dose search and the output score, kept apart from
    # `analysis.steering.NEUTRAL_PROMPTS`, on which steering is then reported.
    "What did you do yesterday?", "Tell me something about yourself.", "Write a few lines about a journey.",
    "What is a good hobby to pick up?", "Describe your neighbourhood.", "How should I spend a free evening?",
    "Write a short note to a friend.", "What do you like about your town?", "Tell me about a memorable day.",
    "What would you do with a day off?", "Describe a typical Monday.", "Give me an idea for a weekend project.",
]

PROMPTING = "{prompt} (In your answer, talk about {concept}.)"
"""The prompting baseline: the neutral prompt asking for the concept."""

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
    """"given" (the user's words) or "derived" (`derive_lexicon`)."""

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


# ---------------------------------------------------------------------------- output side
class OutputScores(NamedTuple):
    output_score: Tensor
    """[n] probability mass the feature's own top logit-lens tokens gain at the answer's first
    position when the feature is amplified (Arad et al. 2025's output score, in spirit)."""
    concept_gain: Tensor
    """[n] gain in log P(next token is a lexicon token), nats, under the same amplification,
    less the gain of control tokens as likely as the lexicon's before it (any large edit
    flattens the distribution and lifts every unlikely token; that is not the concept)."""


def matched_controls(logprobs: Tensor, token_ids: Tensor) -> Tensor:
    """For each token of `token_ids`, the next-less-likely token under `logprobs` [d_vocab]
    that is not one of them (the next-more-likely at the bottom of the ranking): a control set
    with the same starting probabilities. Needs fewer tokens than half the vocabulary."""
    order = logprobs.argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    taken = set(token_ids.tolist())
    controls = []
    for r in sorted(rank[token_ids].tolist()):
        below = (q for q in range(r + 1, len(order)) if int(order[q]) not in taken)
        above = (q for q in range(r - 1, -1, -1) if int(order[q]) not in taken)  # the least likely tokens have none below
        q = next(below, None)
        q = next(above) if q is None else q
        taken.add(int(order[q]))
        controls.append(int(order[q]))
    return torch.tensor(controls, dtype=torch.long)


def logit_lens(sae: SAE, model: HookedModel, features: Sequence[int] | None = None) -> Tensor:
    """Logit effects [n, d_vocab] of decoder rows (all when `features` is None) through the final norm's scale."""
    W_U, scale = unembedding(model)
    w_dec = sae.W_dec.detach() if features is None else sae.W_dec.detach()[list(features)]
    w_dec = w_dec.to(W_U.device, W_U.dtype)
    return (w_dec if scale is None else w_dec * scale) @ W_U


def lexicon_logit_z(sae: SAE, model: HookedModel, token_ids: Sequence[int]) -> Tensor:
    """[d_sae] how far above its average logit effect each feature pushes the lexicon's
    tokens, in standard deviations of its effects over the vocabulary (the logit-lens side,
    before any forward pass)."""
    W_U, scale = unembedding(model)
    W_U = W_U.float() if scale is None else (W_U.float() * scale.float()[:, None])
    mean_all = W_U.mean(1)  # [d_model]
    cov = torch.cov(W_U)  # [d_model, d_model]: the variance of d @ W_U over tokens is d C d
    mean_lex = W_U[:, list(token_ids)].mean(1)
    w_dec = sae.W_dec.detach().float().to(W_U.device)
    std = ((w_dec @ cov) * w_dec).sum(1).clamp_min(1e-12).sqrt()
    return ((w_dec @ (mean_lex - mean_all)) / std).cpu()


@torch.no_grad()
def output_scores(model: HookedModel, sae: SAE, features: Sequence[int], prompts: Sequence[Tensor], max_activation: Tensor,
                  concept_ids: Sequence[int], amplify: float = 2.0, top_k: int = 20) -> OutputScores:
    """Amplify each feature alone (clamp to `amplify` x its max activation [d_sae], every position
    but 0) in one forward pass over `prompts` (token ids [len] each, e.g. chat prompts with the
    answer opened), and read the next-token distribution at each prompt's last position."""
    features = check_features(features, sae.cfg.d_sae)
    check_compatible(model, sae)
    device = next(model.parameters()).device
    sae = sae.to(device)
    tokens, real = right_pad(prompts, boundary_token_id(model.tokenizer))  # a causal model never reads the right padding
    last = real.sum(1) - 1
    tokens, rows = tokens.to(device), torch.arange(len(prompts))

    def next_logprobs(edit: Steering | None) -> Tensor:  # [n_prompts, d_vocab]
        logits = logits_with_edit(model, tokens, sae.cfg.hook_name if edit else None, edit)
        return logits[rows, last.to(device)].float().log_softmax(-1).cpu()

    clean = next_logprobs(None)
    concept = torch.tensor(list(concept_ids), dtype=torch.long)
    control = matched_controls(clean.mean(0), concept)
    promoted = logit_lens(sae, model, features).topk(top_k, dim=-1).indices.cpu()  # [n, top_k]

    def lexicon_margin(lp: Tensor) -> Tensor:  # [n_prompts] log P(lexicon) - log P(controls)
        return lp[:, concept].logsumexp(-1) - lp[:, control].logsumexp(-1)

    clean_margin = lexicon_margin(clean)
    out, gain = [], []
    for f, top in zip(tqdm(features, desc="output scores", leave=False), promoted):
        lp = next_logprobs(Steering(sae, Intervention(f, "clamp", amplify), max_activation))
        out.append(float((lp[:, top].exp().sum(-1) - clean[:, top].exp().sum(-1)).mean()))
        gain.append(float((lexicon_margin(lp) - clean_margin).mean()))
    return OutputScores(torch.tensor(out), torch.tensor(gain))


# ---------------------------------------------------------------------------- concept search
@dataclass
class ConceptConfig:
    n_features: int = 16
    """Features steered together: the best-ranked ones with a positive concept gain. Many at a
    low dose each beat a few at a high one: their pushes toward the concept add up, their
    unrelated effects less so (on the default SAE: "sea" 0.25 of tuning answers within budget
    with 16 features, 0.08 with 4)."""
    n_candidates: int = 24
    """Candidates taken from each side (input selectivity, logit lens) before the forward passes."""
    amplify: float = 2.0
    """Output score: clamp value in multiples of the feature's max activation."""
    top_k: int = 20
    """Output score: the feature's promoted tokens counted (logit lens)."""
    max_density: float = 0.02
    """Features firing on more of the atlas' tokens than this are left out (not concept-specific)."""
    doses: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0])
    """Rising ladder of doses tried by the search (x weight x max activation per feature)."""
    refine: int = 1
    """Bisection steps between the last dose that passed and the first that failed."""
    budget: float = 2.0
    """Fluency budget: perplexity and repetition at most this many times the unsteered answers'."""
    margin: float = 1.0
    """The dose search holds the tuning answers to budget x margin: below 1 leaves room for the
    report prompts, where a dose chosen at the edge of the budget often lands over it."""
    repetition_floor: float = 0.02
    """The unsteered repetition counted in the budget is at least this (so 0 repetition on a
    few short answers does not make every repeat a failure)."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=40, chat=True))

    def __post_init__(self):
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        if self.n_features < 1 or self.n_candidates < 1 or not self.doses:
            raise ValueError("need n_features >= 1, n_candidates >= 1 and at least one dose")
        if sorted(self.doses) != list(self.doses) or min(self.doses) <= 0:
            raise ValueError(f"doses must be positive and rising, got {self.doses}")
        if self.budget <= 1:
            raise ValueError(f"the fluency budget is a ratio above 1, got {self.budget}")
        if not 0 < self.margin <= 1 or self.budget * self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1] and leave budget x margin above 1, got {self.margin}")


@dataclass
class ConceptFeature:
    feature: int
    input_score: float
    """Input selectivity, bits (r log2(r / density))."""
    fire_rate: float
    """Share of the concept word's occurrences the feature fires on."""
    contrast: float
    """Mean activation (x max) on answers asked to talk about the concept, less on unprompted answers."""
    logit_z: float
    """Logit-lens push on the lexicon's tokens, in standard deviations."""
    output_score: float
    concept_gain: float
    """Nats of lexicon probability gained when amplified."""
    combined: float
    """Ranking score: mean of input score, answer contrast and concept gain, each over its best candidate (negatives as 0)."""
    weight: float = 0.0
    """Share of the dose this feature gets when steered (its concept gain over the best one); 0 if not steered."""
    label: str = ""
    density: float = 0.0


@dataclass
class ConceptSearch:
    concept: str
    lexicon: Lexicon
    ranked: list[ConceptFeature]
    """Every candidate, best first."""

    @property
    def steered(self) -> list[ConceptFeature]:
        return [c for c in self.ranked if c.weight > 0]

    @property
    def top_input(self) -> ConceptFeature:
        """The feature a search by input alone would steer (`saewb monitor --find`'s first)."""
        return max(self.ranked, key=lambda c: (c.input_score, c.fire_rate))

    def to_dict(self) -> dict:
        return {"concept": self.concept, "lexicon": {"words": list(self.lexicon.words), "source": self.lexicon.source},
                "ranked": [asdict(c) for c in self.ranked]}


@torch.no_grad()
def answer_contrast(model: HookedModel, sae: SAE, concept: str, prompts: Sequence[str], max_activation: Tensor,
                    generation: GenerationConfig | None = None) -> Tensor:
    """[d_sae] mean activation (x max activation [d_sae]) of every feature on the model's answers
    to `prompts` when each asks for the concept (`PROMPTING`), less on its unprompted answers.
    Answer tokens only, each read after its own prompt."""
    from ..encoding import encode_contexts

    generation = generation or GenerationConfig(chat=True)
    device = next(model.parameters()).device
    sae = sae.to(device)
    scale = max_activation.clamp_min(1e-12).to(device)

    def mean_on_answers(texts: list[str]) -> Tensor:
        tokens = encode_prompts(model.tokenizer, texts, generation.chat)
        total, count = torch.zeros(sae.cfg.d_sae, device=device), 0
        for p, g in zip(tokens, generate_tokens(model, tokens, generation)):
            if len(g):
                f = encode_contexts(model, sae, torch.cat([p, g.cpu()])[None].to(device)).f[0, len(p):]  # [n_new, d_sae]
                total += (f / scale).sum(0)
                count += len(g)
        return (total / max(count, 1)).cpu()

    return mean_on_answers([PROMPTING.format(prompt=p, concept=concept) for p in prompts]) - mean_on_answers(list(prompts))


def search_concept(concept: str, model: HookedModel, sae: SAE, atlas: Atlas, labels: Labels | None = None, lexicon: Lexicon | None = None,
                   prompts: Sequence[str] | None = None, cfg: ConceptConfig | None = None) -> ConceptSearch:
    """Rank features for steering toward `concept` by what they read and what they write.
    Without a `lexicon`, one is derived from the input side's best features and shown in the
    result. `prompts` (default `TUNING_PROMPTS`) are read for the output scores."""
    from ..features.monitor import input_selectivity, label_text

    cfg = cfg or ConceptConfig()
    sel = input_selectivity(concept, model, sae, atlas)
    usable = (atlas.max_activation > 0) & (atlas.density <= cfg.max_density)
    best = lambda score: torch.where(usable, score, torch.full_like(score, -math.inf)).topk(cfg.n_candidates).indices  # noqa: E731
    by_input = best(sel.score)
    if lexicon is None:
        lexicon = derive_lexicon(concept, model.tokenizer, by_input[:3].tolist(), atlas, labels)
    concept_ids = lexicon.token_ids(model.tokenizer)
    z = lexicon_logit_z(sae, model, concept_ids)
    prompts = list(prompts or TUNING_PROMPTS)
    contrast = answer_contrast(model, sae, concept, prompts, atlas.max_activation, cfg.generation)
    candidates = [f for f in dict.fromkeys(by_input.tolist() + best(contrast).tolist() + best(z).tolist()) if usable[f]]
    prompt_tokens = encode_prompts(model.tokenizer, prompts, cfg.generation.chat)
    out = output_scores(model, sae, candidates, prompt_tokens, atlas.max_activation, concept_ids, cfg.amplify, cfg.top_k)
    parts = [sel.score[candidates], contrast[candidates], out.concept_gain]
    combined = sum(part.clamp_min(0) / part.clamp_min(0).max().clamp_min(1e-12) for part in parts) / len(parts)
    ranked = [
        ConceptFeature(f, float(sel.score[f]), float(sel.fire_rate[f]), float(contrast[f]), float(z[f]), float(out.output_score[n]),
                       float(out.concept_gain[n]), float(combined[n]), label=label_text(labels, f), density=float(atlas.density[f]))
        for n, f in enumerate(candidates)
    ]
    ranked.sort(key=lambda c: -c.combined)
    chosen = [c for c in ranked if c.concept_gain > 0][:cfg.n_features]
    top = max((c.concept_gain for c in chosen), default=0.0)
    for c in chosen:
        c.weight = c.concept_gain / top
    return ConceptSearch(concept, lexicon, ranked)


def concept_steering(sae: SAE, features: Sequence[ConceptFeature], dose: float, max_activation: Tensor) -> Steering:
    """Clamp each feature to dose x its weight x its max activation [d_sae]."""
    if not features:
        raise ValueError("no feature to steer: no candidate raised the concept's tokens (try other lexicon words)")
    return Steering(sae, [Intervention(c.feature, "clamp", dose * c.weight) for c in features], max_activation)


# ---------------------------------------------------------------------------- dose search
class Fluency(NamedTuple):
    perplexity: float
    """exp(mean NLL per generated token) under the unsteered model, given the prompts."""
    repetition: float
    """Mean repeated-trigram rate of the answers."""


class DosePoint(NamedTuple):
    dose: float
    fluency: Fluency
    within_budget: bool


@dataclass
class DoseSearch:
    dose: float | None
    """The largest dose tried within budget; None when even the smallest failed."""
    base: Fluency
    """The unsteered answers' fluency on the same prompts."""
    points: list[DosePoint]
    """Every dose tried, in the order tried."""
    budget: float
    repetition_floor: float


def within_budget(fluency: Fluency, base: Fluency, budget: float, repetition_floor: float = 0.0) -> bool:
    """Both perplexity and repetition at most `budget` x the unsteered answers' (repetition
    counted from at least `repetition_floor`)."""
    return fluency.perplexity <= budget * base.perplexity and fluency.repetition <= budget * max(base.repetition, repetition_floor)


def search_dose(measure: Callable[[float], Fluency], base: Fluency, doses: Sequence[float], budget: float = 2.0, refine: int = 2,
                repetition_floor: float = 0.0) -> DoseSearch:
    """The largest dose whose `measure(dose)` stays within budget: try the rising `doses` until
    one fails, then bisect (geometric midpoints) `refine` times between the last that passed
    and the first that failed. Assumes the cost grows with the dose, as it does on average."""
    points: list[DosePoint] = []

    def trial(dose: float) -> bool:
        fluency = measure(dose)
        ok = within_budget(fluency, base, budget, repetition_floor)
        points.append(DosePoint(dose, fluency, ok))
        return ok

    passed, failed = None, None
    for dose in doses:
        if trial(dose):
            passed = dose
        else:
            failed = dose
            break
    if failed is not None:
        lo = passed if passed is not None else failed / 4
        for _ in range(refine):
            mid = math.sqrt(lo * failed)
            if trial(mid):
                lo = passed = mid
            else:
                failed = mid
    return DoseSearch(passed, base, points, budget, repetition_floor)


@torch.no_grad()
def fluency(model: HookedModel, prompts: Sequence[Tensor], generated: Sequence[Tensor]) -> Fluency:
    """Perplexity under the unsteered model and repetition of answers [n_new] to prompts [len]."""
    nll, n_tokens = generation_nll(model, prompts, generated)
    total = int(n_tokens.sum())
    reps = torch.tensor([repetition_rate(g.tolist()) for g in generated])
    return Fluency(math.exp(float(nll.sum()) / total) if total else float("nan"), float(reps.nanmean()) if len(reps) else float("nan"))


def choose_dose(model: HookedModel, sae: SAE, search: ConceptSearch, max_activation: Tensor, prompts: Sequence[str] | None = None,
                cfg: ConceptConfig | None = None, features: Sequence[ConceptFeature] | None = None, base: Fluency | None = None) -> DoseSearch:
    """`search_dose` for the search's steered features (or `features`) on held-out tuning prompts (default `TUNING_PROMPTS`).
    `base`: the unsteered answers' fluency on those prompts, when an earlier search measured it (`DoseSearch.base`)."""
    cfg = cfg or ConceptConfig()
    features = list(features if features is not None else search.steered)
    tokens = encode_prompts(model.tokenizer, list(prompts or TUNING_PROMPTS), cfg.generation.chat)
    base = base or fluency(model, tokens, generate_tokens(model, tokens, cfg.generation))

    bar = tqdm(total=len(cfg.doses) + cfg.refine, desc="dose search", leave=False)

    def measure(dose: float) -> Fluency:
        steering = concept_steering(sae, features, dose, max_activation)
        result = fluency(model, tokens, generate_tokens(model, tokens, cfg.generation, steering))
        bar.update()
        bar.set_postfix(dose=f"{dose:.2g}", ppl=f"{result.perplexity:.2f}", rep=f"{result.repetition:.3f}")
        return result

    try:
        return search_dose(measure, base, cfg.doses, cfg.budget * cfg.margin, cfg.refine, cfg.repetition_floor)
    finally:
        bar.close()


# ---------------------------------------------------------------------------- report
@dataclass
class ConceptPoint:
    condition: str
    """"unsteered", "prompting", "steering", "prompting + steering", or another named condition."""
    dose: float | None
    lexicon_frequency: float
    """Share of answers with a lexicon word: the concept score."""
    lexicon_rate: float
    """Mean lexicon words per word."""
    feature_frequency: float
    """Share of answers on which a steered feature, re-read by the unsteered model, exceeds 0.25x its max."""
    perplexity: float
    """Under the unsteered model, given the neutral prompt."""
    perplexity_given_concept_prompt: float
    """The same answers given the prompt that asks for the concept: fluency without charging for the topic change."""
    repetition: float
    within_budget: bool
    """Perplexity and repetition both within the budget of the unsteered answers'."""
    ratio: float
    """lexicon_frequency over the unsteered one (a zero counted as one answer: a lower bound)."""
    texts: list[str]


@torch.no_grad()
def compare_concept(model: HookedModel, sae: SAE, search: ConceptSearch, prompts: Sequence[str], max_activation: Tensor, dose: float | None,
                    cfg: ConceptConfig | None = None, extra: dict[str, tuple[Sequence[ConceptFeature], float]] | None = None) -> list[ConceptPoint]:
    """Answers to `prompts` unsteered, prompted (`PROMPTING`), steered with the search's features at
    `dose`, prompted and steered, and under each `extra` condition (name -> (features, dose)),
    all scored the same way under the unsteered model."""
    from .measure import concept_scores

    cfg = cfg or ConceptConfig()
    tok = model.tokenizer
    neutral = encode_prompts(tok, list(prompts), cfg.generation.chat)
    asked = encode_prompts(tok, [PROMPTING.format(prompt=p, concept=search.concept) for p in prompts], cfg.generation.chat)
    runs: dict[str, tuple[list[Tensor], Steering | None, float | None]] = {"unsteered": (neutral, None, None), "prompting": (asked, None, None)}
    if dose is not None and search.steered:
        steering = concept_steering(sae, search.steered, dose, max_activation)
        runs["steering"] = (neutral, steering, dose)
        runs["prompting + steering"] = (asked, steering, dose)
    for name, (features, extra_dose) in (extra or {}).items():
        runs[name] = (neutral, concept_steering(sae, features, extra_dose, max_activation), extra_dose)
    feature_ids = [c.feature for c in search.steered] or [search.top_input.feature]
    points, base, base_frequency = [], None, 0.0
    for name, (tokens, steering, d) in tqdm(runs.items(), desc=f"conditions ({search.concept})", leave=False):
        generated = generate_tokens(model, tokens, cfg.generation, steering)
        texts = [decode(tok, g) for g in generated]
        lex = lexicon_scores(texts, search.lexicon)
        flu = fluency(model, tokens, generated)
        base = base or flu
        frequency = float(lex.present.float().mean())
        base_frequency = frequency if name == "unsteered" else base_frequency
        points.append(ConceptPoint(
            name, d, frequency, float(lex.rate.mean()),
            float(concept_scores(model, sae, feature_ids, generated, max_activation, threshold=0.25).present.float().mean()),
            flu.perplexity, fluency(model, asked, generated).perplexity, flu.repetition, within_budget(flu, base, cfg.budget),
            frequency / max(base_frequency, 1 / len(prompts)), texts))
    return points


__all__ = [
    "ConceptConfig", "ConceptFeature", "ConceptPoint", "compare_concept", "PROMPTING", "answer_contrast", "ConceptSearch", "DosePoint", "DoseSearch", "Fluency", "Lexicon", "LexiconScores", "OutputScores",
    "TUNING_PROMPTS", "choose_dose", "concept_steering", "derive_lexicon", "fluency", "lexicon_logit_z", "lexicon_scores", "logit_lens",
    "matched_controls", "output_scores", "search_concept", "search_dose", "within_budget",
]
