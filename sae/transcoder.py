"""Skip transcoder (Dunefsky et al. 2024; Paulo et al. 2025): a TopK dictionary that reads an MLP's input and writes
its output, with a linear skip term beside it,

    pre   = x @ W_enc + b_enc                             (batch d_sae)     x: the MLP's input (batch d_in)
    f     = topk(relu(pre), k)                            (batch d_sae)
    y_hat = f @ W_dec + b_dec + x @ W_skip                (batch d_out)     y: the MLP's output

so a feature graph can route through the MLPs by their features (`analysis.circuits.replacement`). Paulo et al. find
the skip term lowers the error at no cost in how interpretable the features are.

Training rows hold the input and the target side by side (`split_batch`): a source yields (batch d_in + d_out). The
trainer scales each half by its own factor (`scale_of`: mean norm sqrt(d) for each), since an MLP's output norm can be
many times its input's (SmolLM2's last blocks); folding the factors (s_in, s_out) into the weights at the end is
W_enc * s_in, W_dec / s_out, b_dec / s_out, W_skip * s_in / s_out.

Saved in the SAE Lens layout of its "skip_transcoder" (W_skip as (d_out d_in), `d_out`, `hook_name_out` in the
metadata, no b_dec subtracted from the input). SAE Lens's own skip transcoder applies a ReLU, not TopK: it reads the
weights, but only the workbench reproduces the k-sparse code.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from activations.hooks import parse_hook, transcoder_hooks

from .base import Scale, TrainOutput, register
from .common import auxk_loss, input_scale
from .topk import TopKConfig, TopKSAE

TRANSCODERS_FILE = "transcoders.json"
"""What `saewb transcoders` writes beside the transcoders it trained: {"transcoders": {layer: path}} (read by
`analysis.circuits.replacement.load_transcoders`)."""


def transcoder_paths(folder: str | Path) -> dict[int, Path]:
    """{block: transcoder folder} in block order, from <folder>/transcoders.json (or
    <folder>/transcoders/transcoders.json); relative entries are relative to that file."""
    folder = Path(folder)
    manifest = next((p for p in (folder / TRANSCODERS_FILE, folder / "transcoders" / TRANSCODERS_FILE) if p.exists()), None)
    if manifest is None:
        raise FileNotFoundError(f"no {TRANSCODERS_FILE} in {folder} or {folder / 'transcoders'}: train them with "
                                f"`saewb transcoders --out {folder}`")
    listed = json.loads(manifest.read_text()).get("transcoders", {})
    return {int(block): Path(path) if Path(path).is_absolute() else manifest.parent / path
            for block, path in sorted(listed.items(), key=lambda item: int(item[0]))}


@dataclass
class SkipTranscoderConfig(TopKConfig):
    architecture: str = "skip_transcoder"
    hook_name: str = "blocks.8.mlp.hook_in"
    """Where the input is read: the MLP's input, after its norm."""
    hook_name_out: str = ""
    """Where the target is read: the MLP's output; "": that of `hook_name`'s block."""
    d_out: int = 0
    """Width of the output; 0: d_in (an MLP's input and output are both the residual's width)."""

    def __post_init__(self):
        super().__post_init__()
        if self.d_out == 0:
            self.d_out = self.d_in
        if self.d_out < 0:
            raise ValueError("d_out must be positive")
        into = parse_hook(self.hook_name)
        if not self.hook_name_out and into is not None:
            self.hook_name_out = transcoder_hooks(into.layer)[1]
        out = parse_hook(self.hook_name_out)
        if into is not None and out is not None and into.layer != out.layer:
            raise ValueError(f"a transcoder maps within one block: {self.hook_name} and {self.hook_name_out} are in blocks "
                             f"{into.layer} and {out.layer}")

    @classmethod
    def for_layer(cls, layer: int, **fields) -> SkipTranscoderConfig:
        """The config of a transcoder of block `layer`'s MLP (`activations.hooks.transcoder_hooks`)."""
        into, out = transcoder_hooks(layer)
        return cls(hook_name=into, hook_name_out=out, **fields)

    @property
    def batch_width(self) -> int:
        return self.d_in + self.d_out


@register
class SkipTranscoder(TopKSAE):
    config_class = SkipTranscoderConfig
    cfg: SkipTranscoderConfig
    sae_lens_architecture = "skip_transcoder"
    sae_lens_loads = ()  # SAE Lens's skip transcoders are ReLU: loading one as TopK would change what it computes
    is_transcoder = True

    def __init__(self, cfg: SkipTranscoderConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        w_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=generator)
        self.W_dec = nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))  # (d_sae d_out)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out))  # (d_in d_out)
        self.register_buffer("_zero_offset", torch.zeros(cfg.d_in), persistent=False)

    @property
    def input_offset(self) -> Tensor:
        """Zeros (d_in): a transcoder's b_dec lives in the output space, so nothing is subtracted from its input."""
        return self._zero_offset

    def split_batch(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        return batch[..., :self.cfg.d_in], batch[..., self.cfg.d_in:]

    def scale_of(self, sample: Tensor) -> Scale:
        """[s_in, s_out]: each half of the rows (n d_in + d_out) to mean norm sqrt(its width)."""
        inputs, targets = self.split_batch(sample)
        return [input_scale(inputs), input_scale(targets)]

    def scale_rows(self, rows: Tensor, scale: Scale) -> Tensor:
        if not isinstance(scale, list):
            return rows * scale
        factors = torch.full((rows.shape[-1],), scale[1], dtype=rows.dtype, device=rows.device)
        factors[:self.cfg.d_in] = scale[0]
        return rows * factors

    @torch.no_grad()
    def fold_input_scale(self, scale: Scale) -> None:
        s_in, s_out = scale if isinstance(scale, list) else (scale, scale)
        self.W_enc *= s_in
        self.W_dec /= s_out
        self.b_dec /= s_out
        self.W_skip *= s_in / s_out

    def skip(self, x: Tensor) -> Tensor:
        """The linear term x @ W_skip: (... d_in) -> (... d_out)."""
        return x @ self.W_skip

    def forward(self, x: Tensor) -> Tensor:
        """The MLP output (... d_out) predicted from its input x (... d_in), e.g. (batch pos d_in)."""
        return self.decode(self.encode(x)) + self.skip(x)

    def training_forward(self, x: Tensor, sparsity_scale: float = 1.0, fast: bool = False) -> TrainOutput:
        """x (batch d_in + d_out): inputs and targets side by side; x_hat and mse are of the targets."""
        inputs, targets = self.split_batch(x)
        pre = self.selective_pre_acts(inputs, fast)
        indices = pre.topk(self.cfg.k, dim=-1).indices
        values = self.gather_pre_acts(inputs, pre, indices).relu()
        return self.sparse_training_output(targets, pre, values, indices, fast, extra=self.skip(inputs))

    def aux_loss(self, x: Tensor, out: TrainOutput, dead: Tensor, k_aux: int, fast: bool = False,
                 mean_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """AuxK on the target's residual: dead latents, read from the input, reconstruct y - y_hat."""
        inputs, targets = self.split_batch(x)
        return auxk_loss(inputs, out.x_hat, out.pre, dead, k_aux, self, fast, mean_over_ranks, target=targets)

    # ------------------------------------------------ SAE Lens
    def sae_lens_fields(self) -> dict:
        return {"d_out": self.cfg.d_out, "apply_b_dec_to_input": False, "k": self.cfg.k}

    def sae_lens_config(self) -> dict:
        config = super().sae_lens_config()
        config["metadata"]["hook_name_out"] = self.cfg.hook_name_out
        return config

    def saved_tensors(self) -> dict[str, Tensor]:
        """SAE Lens's layout: W_skip as (d_out d_in)."""
        tensors = super().saved_tensors()
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
        return tensors

    def load_tensors(self, state: dict[str, Tensor]) -> None:
        if "W_skip" in state and tuple(state["W_skip"].shape) == (self.cfg.d_out, self.cfg.d_in):
            state = {**state, "W_skip": state["W_skip"].T}
        super().load_tensors(state)
