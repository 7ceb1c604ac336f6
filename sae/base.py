"""The SAE base class, the architecture registry, and SAE Lens-format save/load.

Every architecture shares the parameters and maths (shapes as einops strings)
    pre   = (x - b_dec) @ W_enc + b_enc          (batch d_sae)
    f     = activation(pre)                      (batch d_sae)
    x_hat = f @ W_dec + b_dec                    (batch d_in)
and differs in `activation` (inference), `training_forward` (loss during training) and the
hooks below (`aux_loss`, `max_active_latents`, SAE Lens export and import). An architecture is
one file: a `SAEConfig` subclass with its fields, an `SAE` subclass, and `@register` above it.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .common import encoder_pre_acts, input_scale, normalize_decoder_rows, tied_init
from .config import ARCHITECTURES, SAEConfig, make_config, register  # noqa: F401  (the registry, re-exported)

Scale = float | list[float]
"""What the trainer multiplies training rows by: one factor, or one per part of the row (a transcoder's input, output)."""


class TrainOutput(NamedTuple):
    loss: Tensor
    """Total loss to backpropagate, () (without the auxiliary loss, see `SAE.aux_loss`)."""
    x_hat: Tensor
    """Reconstruction (batch d_in)."""
    active: Tensor
    """Bool (d_sae): which latents fired anywhere in this batch (dead-latent tracking)."""
    l0: Tensor
    """Mean active latents per token, ()."""
    mse: Tensor
    """Mean over the batch of ||x - x_hat||^2, ()."""
    sparsity: Tensor
    """The architecture's sparsity penalty (already weighted), or 0, ()."""
    pre: Tensor
    """Pre-activations (batch d_sae), reused by AuxK instead of a second encoder matmul."""


class SAE(nn.Module):
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    """The architecture's config dataclass (each architecture file defines one)."""
    architecture: ClassVar[str] = ""
    """Registered name, set by `register` from `config_class`."""
    is_default: ClassVar[bool] = False
    """Built when no architecture is named (set by `@register(default=True)`; one class only)."""
    max_grad_norm: ClassVar[float | None] = None
    """Gradient clipping norm the trainer uses for this architecture unless `TrainConfig.max_grad_norm` says otherwise
    (None: no clipping; set where it was measured to help)."""
    sweep_fields: ClassVar[tuple[str, ...]] = ()
    """Config fields a sweep over several values trains one SAE per value of (e.g. ("k",))."""
    sae_lens_architecture: ClassVar[str] = ""
    """The `architecture` string SAE Lens loads what `save` writes as."""
    sae_lens_loads: ClassVar[tuple[str, ...]] = ()
    """SAE Lens `architecture` strings of other tools' directories that `load_sae` loads as this class."""
    is_transcoder: ClassVar[bool] = False
    """Whether it maps one hook to another (input and target side by side in a training row, `split_batch`) rather
    than reconstructing its input."""
    sae_lens_pre_6_default: ClassVar[bool] = False
    """Whether SAE Lens before 6.0 read a cfg.json without "architecture" as this class (named in load errors)."""

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__} "
                            "(build it with sae.make_config)")
        self.cfg = cfg
        w_enc, w_dec = tied_init(cfg.d_in, cfg.d_sae, generator)
        self.W_enc = nn.Parameter(w_enc)  # (d_in d_sae)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(w_dec)  # (d_sae d_in)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.training_data: dict = {}
        """Where the training activations came from (set by the trainer, saved in cfg.json):
        "corpus" (a CorpusConfig dict), "model", "store" and "store_fingerprint". Later stages
        read their held-out text from the same corpus (`activations.corpus.heldout_corpus`)."""

    @property
    def max_active_latents(self) -> int:
        """How many latents per token analysis keeps (the atlas's code buffer): the most that can
        be active where the architecture bounds it, else the strongest 64, which only truncates
        the weakest activations of very dense tokens."""
        return min(self.cfg.d_sae, 64)

    # ---------------------------------------------------------------- inference
    @property
    def input_offset(self) -> Tensor:
        """(d_in): what is subtracted from the input before encoding, b_dec for an SAE (its input and output share a space)."""
        return self.b_dec

    def split_batch(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """A training batch (batch `cfg.batch_width`) -> (inputs (batch d_in), targets (batch d_out)): for an SAE both are
        the batch itself; a transcoder's batch holds its input and target side by side."""
        return batch, batch

    def pre_acts(self, x: Tensor, fast: bool = False) -> Tensor:
        """x (... d_in) -> (... d_sae), `...` any leading dims, e.g. (batch pos). `fast`: 2-D inputs
        with gradients on take the hand-written backward of `sae.common.encoder_pre_acts` (training)."""
        return encoder_pre_acts(x, self.W_enc, self.b_enc, self.input_offset, fast)

    def activation(self, pre: Tensor) -> Tensor:
        """Feature activations (... d_sae) from pre-activations (... d_sae), e.g. (batch pos d_sae)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations f (... d_sae) of raw activations x (... d_in), e.g. (batch pos d_in)."""
        self._check_input(x)
        return self.activation(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        """f (... d_sae) -> (... d_in), e.g. (batch pos d_sae) -> (batch pos d_in)."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction (... d_in) of x (... d_in), e.g. (batch pos d_in)."""
        return self.decode(self.encode(x))

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE expects d_in={self.cfg.d_in} ({self.cfg.hook_name}), got activations of width {x.shape[-1]}")

    # ---------------------------------------------------------------- training
    def training_forward(self, x: Tensor, sparsity_scale: float = 1.0, fast: bool = False) -> TrainOutput:
        """Loss on a batch x (batch d_in) (normalised inputs). `sparsity_scale` in [0, 1]
        warms the sparsity penalty up. `fast`: the hand-written backward passes of
        `sae.common` (same maths as plain autograd, less work; `TrainConfig.fast_kernels`)."""
        pre = self.pre_acts(x, fast)
        f = self.activation(pre)
        x_hat = self.decode(f)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        zero = x.new_zeros(())
        return TrainOutput(mse, x_hat, (f > 0).any(0), (f > 0).float().sum(-1).mean(), mse, zero, pre)

    def aux_loss(self, x: Tensor, out: TrainOutput, dead: Tensor, k_aux: int, fast: bool = False,
                 mean_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The architecture's auxiliary loss () (unweighted: the trainer adds
        `aux_coefficient` times it), 0 for architectures without one. x the training batch (batch `cfg.batch_width`),
        `out` of `training_forward` on x, dead bool (d_sae): latents that have not fired for a while.
        `mean_over_ranks` (data-parallel): turns a sum over this rank's batch into the mean over ranks."""
        return x.new_zeros(())

    @torch.no_grad()
    def post_step(self) -> None:
        """Called after every optimiser step: keep decoder rows unit-norm."""
        normalize_decoder_rows(self.W_dec)

    # ---------------------------------------------------------------- input scale
    def scale_of(self, sample: Tensor) -> Scale:
        """The factor the trainer multiplies training rows by, from the init sample (n batch_width): one scalar such
        that mean ||s x|| = sqrt(d_in)."""
        return input_scale(sample)

    def scale_rows(self, rows: Tensor, scale: Scale) -> Tensor:
        """Training rows (... batch_width) times `scale` (of `scale_of`: a scalar; or one factor per dimension,
        `sae.common.per_dimension_scale`)."""
        return rows * (torch.as_tensor(scale, dtype=rows.dtype, device=rows.device) if isinstance(scale, list) else scale)

    @torch.no_grad()
    def fold_input_scale(self, scale: Scale) -> None:
        """Make an SAE trained on `scale * x` take raw x: pre-activations and outputs
        are unchanged, so thresholds and k stay valid. `scale`: a scalar or a factor per input dimension."""
        s = torch.as_tensor(scale, dtype=self.W_enc.dtype, device=self.W_enc.device) if isinstance(scale, list) else scale
        if isinstance(s, Tensor) and s.numel() != self.W_enc.shape[0]:
            raise ValueError(f"{s.numel()} input scales for d_in {self.W_enc.shape[0]}")
        self.W_enc *= s[:, None] if isinstance(s, Tensor) else s
        self.b_dec /= s
        self.W_dec /= s

    # ---------------------------------------------------------------- SAE Lens format
    def sae_lens_fields(self) -> dict:
        """Architecture-specific top-level cfg.json fields SAE Lens reads (e.g. TopK's k)."""
        return {}

    @classmethod
    def config_fields_from_sae_lens(cls, raw: dict) -> dict:
        """Config fields of this architecture read from another tool's SAE Lens cfg.json `raw`."""
        return {}

    def sae_lens_config(self) -> dict:
        cfg = self.cfg
        return {
            "architecture": self.sae_lens_architecture,
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "model_name": cfg.model_name,
                "hook_name": cfg.hook_name,
                "hook_head_index": None,
                "context_size": cfg.context_size,
                "prepend_bos": True,
                "workbench_config": cfg.to_dict(),
                **({"dataset_path": self.training_data["corpus"]["source"]} if "corpus" in self.training_data else {}),
                **({"workbench_training_data": self.training_data} if self.training_data else {}),
            },
            **self.sae_lens_fields(),
        }

    def extra_tensors(self) -> dict[str, Tensor]:
        """Non-parameter tensors saved beside the weights (e.g. BatchTopK's threshold, its scalar () theta
        repeated to (d_sae))."""
        return {}

    def load_extra_tensors(self, state: dict[str, Tensor]) -> None:
        """Read what `extra_tensors` saved from `state`, the whole name -> tensor dict that
        `load_tensors` got (W_enc (d_in d_sae), ...)."""

    def load_tensors(self, state: dict[str, Tensor]) -> None:
        """Copy weights from `state` (name -> tensor: W_enc (d_in d_sae), b_enc (d_sae), W_dec (d_sae d_in),
        b_dec (d_in), ...), with clear errors for missing or mis-shaped tensors."""
        for name, p in self.named_parameters():
            if name not in state:
                raise ValueError(f"SAE weights are missing {name!r}")
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"SAE weight {name!r} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(state[name].float())
        self.load_extra_tensors(state)

    def saved_tensors(self) -> dict[str, Tensor]:
        """Name -> tensor, as `save` writes them: the parameters (fp32, CPU) and `extra_tensors`."""
        return {n: p.detach().float().cpu() for n, p in self.named_parameters()} | self.extra_tensors()

    def save(self, path: str | Path) -> Path:
        """Write `cfg.json` + `sae_weights.safetensors` (SAE Lens format), atomically."""
        from activations.io import atomic_save_safetensors, atomic_write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(self.saved_tensors(), path / "sae_weights.safetensors")
        atomic_write_json(path / "cfg.json", self.sae_lens_config())
        return path


def _workbench_config(ours, cfg_path: Path) -> SAEConfig:
    """The architecture's config saved in cfg.json's metadata.workbench_config, with errors that
    name the file and what is allowed (no or an unregistered architecture, unknown keys, bad
    values). Files written before the configs were split hold every architecture's fields:
    those of other architectures are ignored (`make_config`)."""
    where = f"{cfg_path} (metadata.workbench_config)"
    if not isinstance(ours, dict):
        raise ValueError(f"{where}: expected an object of SAEConfig fields, found {type(ours).__name__}")
    if "architecture" not in ours:
        raise ValueError(f"{where} has no \"architecture\"; registered architectures: {sorted(ARCHITECTURES)}")
    if ours["architecture"] not in ARCHITECTURES:
        raise ValueError(f"{where}: architecture {ours['architecture']!r} is not registered; registered: {sorted(ARCHITECTURES)}")
    try:
        return make_config(**ours)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE Lens-format directory (ours or another tool's) into the matching class."""
    path = Path(path)
    cfg_path, weights_path = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"{path} is not an SAE directory: it needs cfg.json and sae_weights.safetensors")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as error:
        raise ValueError(f"{cfg_path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object (an SAE Lens cfg.json), found {type(raw).__name__}")
    meta = raw.get("metadata") or {}
    ours = meta.get("workbench_config") if isinstance(meta, dict) else None
    if ours:
        cfg = _workbench_config(ours, cfg_path)
    else:
        if "architecture" not in raw:
            # SAE Lens >= 6 always writes it; older SAE Lens assumed one architecture when it was missing
            old_default = [c.sae_lens_loads[0] for c in ARCHITECTURES.values() if c.sae_lens_pre_6_default]
            raise ValueError(
                f"{cfg_path} has no \"architecture\" field, so it is unknown which SAE this is; registered architectures: "
                f"{sorted(ARCHITECTURES)}. Add the right one to the file"
                + "".join(f" (a cfg.json from SAE Lens before 6.0 without it meant \"architecture\": \"{name}\")" for name in old_default))
        missing = [key for key in ("d_in", "d_sae") if key not in raw]
        if missing:
            raise ValueError(f"{cfg_path} lacks {missing}: an SAE Lens cfg.json needs d_in and d_sae")
        cls = next((c for c in ARCHITECTURES.values() if raw["architecture"] in c.sae_lens_loads), None)
        if cls is None:
            supported = sorted(name for c in ARCHITECTURES.values() for name in c.sae_lens_loads)
            raise ValueError(f"{cfg_path}: architecture {raw.get('architecture')!r} is not supported; supported: {supported}")
        if raw.get("normalize_activations", "none") not in ("none", None):
            raise ValueError(f"{cfg_path}: normalize_activations={raw['normalize_activations']!r} is not supported (fold it into the weights)")
        cfg = make_config(
            cls.architecture, d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), **cls.config_fields_from_sae_lens(raw),
            hook_name=meta.get("hook_name") or raw.get("hook_name", ""), model_name=meta.get("model_name") or raw.get("model_name", ""),
            context_size=int(meta.get("context_size") or raw.get("context_size") or 128),
        )
    sae = ARCHITECTURES[cfg.architecture](cfg)
    state = load_file(str(weights_path))
    if raw.get("rescale_acts_by_decoder_norm"):
        # SAE Lens TopK checkpoints choose top-k on pre * ||W_dec[i]||: fold the norms in
        norms = state["W_dec"].norm(dim=1)
        state["W_enc"], state["b_enc"], state["W_dec"] = state["W_enc"] * norms, state["b_enc"] * norms, state["W_dec"] / norms[:, None]
    if (not raw.get("apply_b_dec_to_input", True) and not ARCHITECTURES[cfg.architecture].is_transcoder
            and state["b_dec"].shape == state["W_enc"].shape[:1]):
        # other tools' SAEs may skip subtracting b_dec before encoding: fold that into b_enc. Never for a transcoder:
        # its b_dec is the output's bias, and nothing is subtracted from its input (the shapes agree when d_out == d_in)
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]
    sae.load_tensors(state)
    if isinstance(meta.get("workbench_training_data"), dict):
        sae.training_data = meta["workbench_training_data"]
    return sae.to(device)
