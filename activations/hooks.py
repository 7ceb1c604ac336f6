"""Hook names: the one place that builds and reads TransformerLens hook names, in the spirit
of TransformerLens' `utils.get_act_name`.

    act_name("resid_post", 8)              -> "blocks.8.hook_resid_post"
    parse_hook("blocks.8.hook_mlp_out")    -> HookName(layer=8, kind="mlp_out")
    residual_depth("blocks.8.hook_resid_post") -> 9.0 (the point resid_pre of block 9 reads)
    parse_hook("blocks.8.mlp.hook_in")     -> HookName(layer=8, kind="mlp_input") (the MLP's own
                                              input, after its norm: what a transcoder reads)
"""
from __future__ import annotations

import re
from typing import NamedTuple

BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")
MLP_INPUT_HOOK = re.compile(r"^blocks\.(\d+)\.mlp\.hook_in$")
"""The MLP's input after the block's second norm (TransformerBridge's name; kind "mlp_input"). Not
`blocks.L.hook_mlp_in`, which TransformerLens gives the residual before that norm."""
RESIDUAL_KINDS = ("resid_pre", "resid_post")
"""Hooks that read the whole residual stream (what a feature graph's SAEs must read)."""
FAST_KINDS = ("resid_pre", "resid_post", "mlp_out", "mlp_input")
"""Hooks with a verified fast path on a Hugging Face model (`activations.model.hook_module`)."""


class HookName(NamedTuple):
    layer: int
    """The block index."""
    kind: str
    """What is read there, without the `hook_` prefix: resid_pre, resid_post, mlp_out, ..."""


def act_name(kind: str, layer: int) -> str:
    """The TransformerLens name of hook `kind` (e.g. "resid_post", or "hook_resid_post") in block `layer`."""
    kind = kind.removeprefix("hook_")
    if not re.fullmatch(r"[a-z_]+", kind) or layer < 0:
        raise ValueError(f"no hook name for kind {kind!r} at layer {layer}")
    return f"blocks.{layer}.hook_{kind}"


def parse_hook(name: str) -> HookName | None:
    """(layer, kind) of a `blocks.L.hook_KIND` name (or of `blocks.L.mlp.hook_in`, kind "mlp_input");
    None for other names (hook_embed, ln_final...)."""
    match = BLOCK_HOOK.match(name)
    if match is not None:
        return HookName(int(match.group(1)), match.group(2))
    match = MLP_INPUT_HOOK.match(name)
    return None if match is None else HookName(int(match.group(1)), "mlp_input")


def transcoder_hooks(layer: int) -> tuple[str, str]:
    """The hooks a transcoder of block `layer`'s MLP maps between: (its input after the norm, its output)."""
    if layer < 0:
        raise ValueError(f"no block {layer}")
    return f"blocks.{layer}.mlp.hook_in", act_name("mlp_out", layer)


def hook_layer(name: str) -> int:
    """The block a hook belongs to (0 for hooks outside the blocks, such as hook_embed): the
    forward pass must run through this block to read it."""
    parsed = parse_hook(name)
    return 0 if parsed is None else parsed.layer


def residual_depth(name: str) -> float:
    """Where a residual hook sits in the stream: resid_pre of block L is at L, resid_post at
    L + 1 (the same point as resid_pre of block L + 1). Error for any other hook."""
    parsed = parse_hook(name)
    if parsed is None or parsed.kind not in RESIDUAL_KINDS:
        raise ValueError(f"{name!r} is not a residual-stream hook (blocks.L.hook_resid_pre / hook_resid_post): "
                         "a feature graph needs SAEs that read the whole residual stream")
    return parsed.layer + (1.0 if parsed.kind == "resid_post" else 0.0)


__all__ = ["FAST_KINDS", "RESIDUAL_KINDS", "HookName", "act_name", "hook_layer", "parse_hook", "residual_depth", "transcoder_hooks"]
