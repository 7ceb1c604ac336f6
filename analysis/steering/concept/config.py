"""The settings of concept steering and its two fixed prompt sets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from activations.generation import GenerationConfig

from ..interventions import POSITIONS, Positions

ConceptMode = Literal["add", "clamp_at_least", "clamp"]
"""How the steered features are pushed: "add" their weighted decoder directions, the sum scaled
to dose x the residual stream's typical norm at the hook; "clamp_at_least" each feature to at
least dose x weight x its max activation; "clamp" to exactly that (which also lowers it where
it already fires above)."""
CONCEPT_MODES: tuple[ConceptMode, ...] = get_args(ConceptMode)
TUNING_PROMPTS = [
    # Neutral prompts for the dose search and the output score, kept apart from
    # `analysis.steering.NEUTRAL_PROMPTS`, on which steering is then reported.
    "What did you do yesterday?", "Tell me something about yourself.", "Write a few lines about a journey.",
    "What is a good hobby to pick up?", "Describe your neighbourhood.", "How should I spend a free evening?",
    "Write a short note to a friend.", "What do you like about your town?", "Tell me about a memorable day.",
    "What would you do with a day off?", "Describe a typical Monday.", "Give me an idea for a weekend project.",
]
MORE_TUNING_PROMPTS = [
    # Twelve more, as neutral, for a surer dose: `bench/concept_steering.py` answers all 24 at every dose of its search
    # (`--dose-prompts`); `saewb steer` answers the first 12 to stay within five minutes (`--tuning-prompts` takes more).
    "What is something you learned recently?", "Tell me about a place you would like to visit.", "Describe the perfect afternoon.",
    "What should I write in my journal today?", "Tell me about someone you admire.", "How do you stay calm on a busy day?",
    "Write a short paragraph about autumn.", "What makes a morning go well?", "Describe an old photograph.",
    "What would you tell a new neighbour?", "Give me a tip for a quiet Sunday.", "Write a few lines about a small village.",
]

REQUEST = "(In your answer, talk about {concept}.)"
"""What the prompting baseline adds to a neutral prompt. Its words are never counted by the
lexicon score (`Lexicon.without_request`), in any condition."""
PROMPTING = "{prompt} " + REQUEST
"""The prompting baseline: the neutral prompt asking for the concept."""


@dataclass
class ConceptConfig:
    n_features: int = 16
    """Features steered together: the best-ranked ones with a positive concept gain. Many at a
    low dose each beat a few at a high one: their pushes toward the concept add up, their
    unrelated effects less so (on the default SAE: "sea" 0.25 of tuning answers within budget
    with 16 features, 0.08 with 4)."""
    n_candidates: int = 24
    """Candidates taken from each proposing score (input selectivity, answer contrast, logit lens) before the forward passes."""
    amplify: float = 2.0
    """Output score: clamp value in multiples of the feature's max activation."""
    top_k: int = 20
    """Output score: the feature's promoted tokens counted (logit lens)."""
    max_density: float = 0.1
    """Features firing on more of the atlas' tokens than this are left out (not concept-specific).
    An output feature may fire often: SmolLM2's layer-23 "sea / ocean / shore" writer fires on 2.9%."""
    n_trials: int = 12
    """Candidates steered alone in a short generation each (the trial score): half the best by
    concept gain, half by logit-lens push, the rest of the union in ranking order."""
    trial_dose: float | None = None
    """The dose of a trial (None: 0.25 of the residual norm for add, 1.0 x max activation for the clamps)."""
    trial_prompts: int = 6
    """Tuning prompts answered in each trial (and unsteered once, the trial's baseline)."""
    trial_tokens: int = 24
    """Tokens generated per trial answer."""
    mode: ConceptMode = "add"
    """add | clamp_at_least | clamp (`ConceptMode`)."""
    positions: Positions = "all"
    """Positions steered: "all", "prompt" (the chat template and question), "generated" (the answer's tokens) or "opening"
    (the prompt and the answer's first `interventions.OPENING_TOKENS` tokens) or "fading" (the prompt at full strength, then
    a push halving every `interventions.FADING_HALF_LIFE` answer tokens)."""
    doses: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0])
    """Rising ladder of doses tried by the search: x weight x max activation per feature for the
    clamps; for add, the added vector's norm over the residual stream's typical norm."""
    refine: int = 1
    """Bisection steps between the last dose that passed and the first that failed."""
    budget: float = 2.0
    """Fluency budget: perplexity and repetition at most this many times the unsteered answers'."""
    margin: float = 1.0
    """The dose search holds the tuning answers to budget x margin: below 1 leaves room for the
    report prompts, where a dose chosen at the edge of the budget often lands over it."""
    confidence: float = 0.8
    """The dose search keeps a dose only when this share of bootstrap resamples of its tuning answers
    is within budget (`dose.budget_confidence`; 0: the point estimate alone). The budget's edge
    measured on a dozen prompts is noisy, and the largest dose that passes it once lands over
    budget on other prompts about half the time."""
    repetition_floor: float = 0.02
    """The unsteered repetition counted in the budget is at least this (so 0 repetition on a
    few short answers does not make every repeat a failure)."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=40, chat=True))

    @property
    def dose_of_trial(self) -> float:
        """The dose a trial steers each candidate at (`trial_dose`, or the mode's default)."""
        return self.trial_dose if self.trial_dose is not None else (0.25 if self.mode == "add" else 1.0)

    def __post_init__(self):
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        if self.mode not in CONCEPT_MODES:
            raise ValueError(f"unknown concept steering mode {self.mode!r}: choose one of {CONCEPT_MODES}")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown steering positions {self.positions!r}: choose one of {POSITIONS}")
        if self.n_features < 1 or self.n_candidates < 1 or not self.doses:
            raise ValueError("need n_features >= 1, n_candidates >= 1 and at least one dose")
        if sorted(self.doses) != list(self.doses) or min(self.doses) <= 0:
            raise ValueError(f"doses must be positive and rising, got {self.doses}")
        if not 0 <= self.confidence < 1:
            raise ValueError(f"confidence is a share of bootstrap resamples in [0, 1), got {self.confidence}")
        if self.budget <= 1:
            raise ValueError(f"the fluency budget is a ratio above 1, got {self.budget}")
        if not 0 < self.margin <= 1 or self.budget * self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1] and leave budget x margin above 1, got {self.margin}")


__all__ = ["CONCEPT_MODES", "MORE_TUNING_PROMPTS", "ConceptMode", "PROMPTING", "REQUEST", "TUNING_PROMPTS", "ConceptConfig"]
