"""The settings of a feature graph (`trace`) and of feature matching (`matching.py`), each a
flag of `saewb trace` / `saewb match` (`activations.flags`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GraphConfig:
    n_hooks: int = 3
    """Hooks of the stack the graph cuts the residual stream at, evenly spaced (0: every hook). Each
    cut is a full cut of the stream: with every node outside the graph mean-ablated at each,
    more cuts compound the loss, and a fixed feature budget spreads thinner (3 chosen on the
    tuning prompts: bench/inference_chains.py)."""
    max_feature_nodes: int = 200
    """Most feature nodes in the graph. Error nodes, the prompt's tokens and the target are counted
    apart (as circuit-tracer counts): an error node is kept when it ranks above the last kept feature."""
    min_node_share: float = 0.002
    """Drop nodes carrying less than this share of their hook's total |attribution|."""
    edge_share: float = 0.98
    """Keep the strongest edges until they carry this share of the total |edge weight|."""
    max_edges: int = 2000
    """Most edges kept."""
    max_prompt_tokens: int = 64
    """Longest prompt accepted (tokens, BOS included)."""
    n_check_edges: int = 20
    """Distinct edges of each type (token / feature / error -> feature / error / target) checked by
    intervention, strongest first; the headline is the feature -> feature edges."""
    check_doses: list[float] = field(default_factory=lambda: [0.0, 0.5, 2.0])
    """Multiples of the upstream node's term an intervention leaves (0: ablated to its mean; 2: doubled)."""
    min_span: float = 0.1
    """Faithfulness is undefined (NaN) when |clean - all ablated| < min_span x max(|clean|, |all ablated|):
    mean-ablating everything barely moves the target, and the ratio would divide by noise."""
    transcoder_ablation: str = "mean"
    """On the transcoder basis, what a node outside the graph is set to: mean (each feature at its held-out mean
    activation, each error at its block's held-out mean error) or zero (a feature off, an error removed)."""
    mean_tokens: int = 16_384
    """Held-out tokens for the means that ablation uses."""
    whole_graph_scores: bool = False
    """Also compute the replacement and completeness scores as circuit-tracer does, on the whole graph before pruning
    (every active feature, every error node and every token; transcoder basis): one batched backward pass per
    `batch_rows` active features, thousands on a prompt of 20 tokens. Its time is kept apart from the graph's
    (`scores["whole_seconds"]`)."""
    batch_rows: int = 64
    """Rows per batched pass through a span of blocks (memory bound)."""
    budgets: list[int] = field(default_factory=lambda: [25, 50, 100])
    """Smaller feature-node budgets whose faithfulness is also reported (same ranking)."""
    attribution: str = "integrated_gradients"
    """How node attributions are computed, a registered method (analysis.circuits.attribution):
    integrated_gradients (from the held-out mean to the prompt, `ig_steps` steps) or
    gradient_x_activation (the gradient at the prompt times the node's term)."""
    ig_steps: int = 8
    """Steps of integrated gradients, one hook at a time, from the held-out mean to the prompt's
    residual (0: gradient x activation at the prompt, whatever `attribution` names)."""

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= {low} (got {value})" for name, value, low in
                    (("max_feature_nodes", self.max_feature_nodes, 1), ("n_check_edges", self.n_check_edges, 0),
                     ("min_span", self.min_span, 0), ("ig_steps", self.ig_steps, 0), ("n_hooks", self.n_hooks, 0))
                    if value < low]
        if not self.check_doses or any(d < 0 or d == 1 for d in self.check_doses):
            problems.append(f"check_doses must be multiples >= 0 of a node's term, none of them 1 (got {self.check_doses})")
        if self.transcoder_ablation not in ("mean", "zero"):
            problems.append(f"transcoder_ablation must be mean or zero (got {self.transcoder_ablation!r})")
        if problems:
            raise ValueError("GraphConfig: " + "; ".join(problems))


@dataclass
class MatchConfig:
    threshold: float = 0.7
    """Decoder cosine at or above which two features count as the same."""
    coact_tokens: int = 16_384
    """Held-out tokens for co-activation (layers of a stack)."""


__all__ = ["GraphConfig", "MatchConfig"]
