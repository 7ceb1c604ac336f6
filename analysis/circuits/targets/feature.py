"""A feature of a later SAE of the stack, read by its encoder (its pre-activation); and
`feature_target`, which makes one from a hook name and a feature id."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from activations.hooks import hook_layer

from .base import GraphTarget, register

if TYPE_CHECKING:
    from ..runner import ResidualRunner
    from ..stack import SAEStack


@register
@dataclass(frozen=True, kw_only=True)
class FeatureTarget(GraphTarget):
    """The graph has nodes at the hooks before the feature's (`n_hooks`)."""

    kind = "feature"
    neuronpedia_type = "feature target"
    stack_index: int
    """Index in the stack of the feature's SAE (>= 1)."""
    hook: str
    """That SAE's hook."""
    feature: int

    def value(self, runner: ResidualRunner, stack: SAEStack, resid: Tensor, start: int, position: int) -> Tensor:
        x = runner.blocks(resid, start, stack.depths[self.stack_index])
        return stack.saes[self.stack_index].pre_acts(x[:, position])[:, self.feature]

    def n_hooks(self, stack: SAEStack) -> int:
        return self.stack_index

    def feature_id(self) -> int | None:
        return self.feature

    def neuronpedia_layer(self) -> str:
        return str(hook_layer(self.hook))


def feature_target(stack: SAEStack, hook: str, feature: int, position: int = -1) -> FeatureTarget:
    """Feature `feature` of the stack's SAE at `hook`, read by its encoder."""
    if hook not in stack.hooks:
        raise ValueError(f"{hook!r} is not a hook of the stack {stack.hooks}")
    index = stack.hooks.index(hook)
    if index == 0:
        raise ValueError("a feature target needs at least one SAE before it; pick a feature of a later hook")
    d_sae = stack.saes[index].cfg.d_sae
    if not 0 <= feature < d_sae:
        raise ValueError(f"feature {feature} out of range: the SAE at {hook} has {d_sae} features (0..{d_sae - 1})")
    return FeatureTarget(stack_index=index, hook=hook, feature=feature, position=position, text=f"{hook} #{feature}")
