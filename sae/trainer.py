"""Train one or several SAEs from one pass over activations.

Batches come from an `ActivationStore` (shuffled across shards, bounded memory) or from
`OnTheFlySource` (harvested from the model as training runs). Every SAE in
`TrainConfig.saes` sees the same batches, so a sweep over k or width costs one data pass.

Checkpoints (weights, Adam state, dead-latent counters, step) are written atomically every
`checkpoint_every` steps; rerunning the same command resumes from the last one and ends
with the same weights as an uninterrupted run (the data order is a pure function of
seed and epoch). A resume refuses a checkpoint whose settings (everything in `TrainConfig`
but `sae.checkpoint.RESUME_MAY_CHANGE`) or source store (its fingerprint) differ, and cuts metrics.jsonl back
to the checkpoint's step (a killed run logged past it). Rotation keeps one complete
checkpoint on disk at every moment: the current one is renamed to `.checkpoint.old` and
deleted only after the new one (written and fsynced in a temp folder) is renamed into place.

Under torchrun (see `activations.distributed`) training is data-parallel: every rank takes
its `batch_size / world_size` rows of each global batch, DDP averages the gradients, and the
ranks all-reduce which latents fired (so they agree on dead latents and AuxK) and the AuxK
normaliser. Given the same `batch_size` and seed, N ranks reproduce the single-process run
up to float rounding (a test checks 2 ranks). Exception: BatchTopK picks its top k * batch
per rank, not across the global batch. Rank 0 alone logs, checkpoints and saves.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from activations import distributed
from activations.io import atomic_write_json
from activations.model import MODEL_NAME_ATTR, resolve_device, same_model
from activations.precision import training_autocast

from .base import ARCHITECTURES, SAE, TrainOutput, make_config
from .checkpoint import checkpoint_setting, load_checkpoint, save_checkpoint
from .common import DOMINANT_SHARE, check_init_sample, dominant_share, geometric_median, per_dimension_scale, project_out_parallel_grad
from .config import SAEConfig
from .metrics_log import MetricsLog, read_metrics, truncate_metrics  # noqa: F401  (read_metrics: re-exported)

"""TrainConfig fields a resumed run may change; any other difference refuses the checkpoint."""

INIT_SAMPLE_EPOCH = 10**6
"""The init sample (input scale, b_dec) is drawn as this 'epoch' so it never equals a training epoch's order."""

LR_AT_2_14_LATENTS = 1.6e-3
"""Default Adam lr of an SAE with 2^14 latents; `default_lr` scales it by 1 / sqrt(d_sae / 2^14).
8x sparsify's 2e-4 / sqrt(d_sae / 2^14): runs of a few hundred steps gain from the larger step
(lr sweep in docs/results.md)."""

DEFAULT_LR_RULE = f"{LR_AT_2_14_LATENTS:g} / sqrt(d_sae / 2^14)"
"""`default_lr` as text, for help messages."""


def default_lr(d_sae: int) -> float:
    """The default Adam lr for `d_sae` latents: DEFAULT_LR_RULE (3e-3 at 4,608 latents)."""
    return LR_AT_2_14_LATENTS / math.sqrt(d_sae / 2**14)


class BatchSource(Protocol):
    """What the trainer reads. A source may also offer `init_sample(n_tokens, seed) -> (n d_in)`
    for the input-scale / b_dec sample; otherwise the sample is the first batches of the
    INIT_SAMPLE_EPOCH order (cheap for a store, but a streaming source would fill its whole
    shuffle buffer for it, so `sae.on_the_fly.OnTheFlySource` offers one)."""

    d_in: int
    hook_name: str

    def iter_batches(self, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        """Batches (batch d_in), batch = batch_size, in an order fixed by (seed, epoch); rank's share of each."""
        ...


@dataclass
class TrainConfig:
    out_dir: str = "runs/default/sae"
    saes: list[SAEConfig] = field(default_factory=lambda: [SAEConfig()])
    """SAEs trained side by side on the same batches (a sweep)."""
    n_tokens: int = 2_000_000
    """Training tokens; more than the store holds means several shuffled epochs."""
    batch_size: int = 4096
    """Global batch: under torchrun each rank takes batch_size / world_size rows of it."""
    lr: float | None = None
    """Adam learning rate; None: `default_lr(d_sae)` per SAE (3e-3 at 4,608 latents; see LR_AT_2_14_LATENTS)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up from 0 over this many first steps."""
    decay_fraction: float = 0.2
    """Linear decay to zero over this final fraction of steps."""
    sparsity_warmup_fraction: float = 0.05
    """L1/L0 coefficients ramp linearly from 0 over this first fraction of steps."""
    dead_tokens: int = 250_000
    """A latent unseen for this many tokens counts as dead (AuxK target). 10M in Gao et al.,
    scaled down for runs of a few million tokens."""
    aux_k: int | None = None
    """AuxK latents; None: d_in // 2."""
    aux_coefficient: float = 1 / 32
    """Weight of the architecture's auxiliary loss (AuxK for TopK-style SAEs; Gao et al.)."""
    max_grad_norm: float | None = None
    """Clip each SAE's gradient to this global norm before the optimiser step; 0: no clipping; None: the architecture's
    `SAE.max_grad_norm` (TopK and its subclasses 1.0, as SAE Lens: 5% lower held-out FVU at 1M tokens; the others none:
    clipping stopped JumpReLU from finding planted features)."""
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"
    """Initial decoder bias, from the init sample."""
    input_scaling: Literal["scalar", "per_dimension", "auto"] = "scalar"
    """How training rows are scaled (and the scale folded into the saved weights): "scalar", one factor so the mean row
    norm is sqrt(d_in) (SAE Lens' "expected_average_only_in"); "per_dimension", each dimension divided by its standard
    deviation on the init sample, so a few huge residual dimensions do not dominate the loss (not for transcoders);
    "auto", per dimension where one dimension holds >= `common.DOMINANT_SHARE` of the init sample's variance, else one
    factor (always one factor for transcoders). The choice is recorded in the SAE's training data."""
    init_tokens: int = 16384
    """Sample used for the input scale and b_dec."""
    seed: int = 0
    """Seed of the initialisation and of the batch order."""
    checkpoint_every: int = 100
    """Steps between checkpoints (a rerun resumes from the last)."""
    log_every: int = 10
    """Steps between metrics records (metrics.jsonl, and the logger's)."""
    logger: Literal["jsonl", "wandb", "tensorboard"] = "jsonl"
    """Where metrics go besides metrics.jsonl."""
    device: str = "auto"
    autocast: Literal["auto", "none", "bf16"] = "auto"
    """bf16 autocast of the encoder/decoder matmuls (weights and Adam stay fp32); "auto": bf16 where the encoder's matmul
    is >= 1.2x faster in it on this device (`activations.precision.training_autocast`), as a resumed run's checkpoint recorded."""
    max_steps: int | None = None
    """Stop after this many steps (for tests and time-boxed runs); the schedule still
    assumes n_tokens, so a later run resumes seamlessly."""
    fast_kernels: bool = True
    """Train through the hand-written backward passes of `sae.common` (same maths as plain
    autograd, less work) and fused Adam; False: plain autograd and the default Adam, the
    reference tests/test_fast_training.py compares against."""

    def __post_init__(self):
        self.saes = [make_config(**s) if isinstance(s, dict) else s for s in self.saes]
        if not self.saes:
            raise ValueError("TrainConfig.saes is empty")
        for s in self.saes:
            if s.architecture not in ARCHITECTURES:
                raise ValueError(f"unknown architecture {s.architecture!r}; registered: {sorted(ARCHITECTURES)}")

    @property
    def total_steps(self) -> int:
        return max(1, self.n_tokens // self.batch_size)


def sae_name(cfg: SAEConfig) -> str:
    """The run folder of an SAE, e.g. "topk_k32_4608" (`SAEConfig.run_name`)."""
    return cfg.run_name


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_start = int(cfg.total_steps * (1 - cfg.decay_fraction))
    decay = 1.0 if step < decay_start else max(0.0, (cfg.total_steps - step) / max(1, cfg.total_steps - decay_start))
    return warm * decay


class StepOutput(NamedTuple):
    out: TrainOutput
    """The architecture's training forward."""
    aux: Tensor
    """The architecture's auxiliary loss () (`SAE.aux_loss`, e.g. AuxK; unweighted), 0 when it has none."""
    loss: Tensor
    """out.loss + aux_coefficient * aux, (): what is backpropagated."""


class Objective(nn.Module):
    """One SAE's training loss as a module's forward, so DistributedDataParallel can wrap it
    (DDP averages the gradients of what its forward computed)."""

    def __init__(self, sae: SAE, aux_k: int, aux_coefficient: float, fast: bool = False):
        super().__init__()
        self.sae, self.aux_k, self.aux_coefficient, self.fast = sae, aux_k, aux_coefficient, fast
        self.mean_over_ranks = _mean_over_ranks if distributed.current().parallel else None

    def forward(self, x: Tensor, sparsity_scale: float, dead: Tensor) -> StepOutput:
        """x (batch d_in) (normalised), dead bool (d_sae)."""
        out = self.sae.training_forward(x, sparsity_scale, self.fast)
        aux = self.sae.aux_loss(x, out, dead, self.aux_k, self.fast, self.mean_over_ranks)
        return StepOutput(out, aux, out.loss + self.aux_coefficient * aux)


def _mean_over_ranks(t: Tensor) -> Tensor:
    return distributed.all_reduce_(t, "mean")


def epoch_batches(source: BatchSource, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                  world_size: int = 1) -> Iterator[torch.Tensor]:
    """`source`'s training batches (batch width; this rank's batch_size / world_size rows) from step `start_step` on,
    over as many shuffled epochs as needed: the data order is a pure function of the seed, the epoch and the step."""
    per_epoch = getattr(source, "n_tokens", None)
    steps_per_epoch = (per_epoch // batch_size) if per_epoch else None
    if steps_per_epoch == 0:
        raise ValueError(f"the activation store holds {per_epoch} tokens, fewer than one batch of {batch_size}")
    epoch = start_step // steps_per_epoch if steps_per_epoch else 0
    skip = start_step - epoch * steps_per_epoch if steps_per_epoch else 0
    while True:
        for i, batch in enumerate(source.iter_batches(batch_size // world_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size)):
            if i < skip:
                continue
            yield batch
        epoch, skip = epoch + 1, 0


def init_sample_of(source: BatchSource, n_tokens: int, seed: int, batch_size: int) -> Tensor:
    """The sample (about n_tokens rows, width) the input scale and b_dec are set from: the source's own `init_sample`
    where it has one (optional, see BatchSource), else its first batches in an epoch no training epoch uses."""
    if hasattr(source, "init_sample"):
        return source.init_sample(n_tokens, seed=seed)
    rows, batches = 0, []
    for batch in source.iter_batches(min(batch_size, n_tokens), seed=seed, epoch=INIT_SAMPLE_EPOCH):
        batches.append(batch)
        rows += len(batch)
        if rows >= n_tokens:
            break
    return torch.cat(batches)


class Trainer:
    def __init__(self, cfg: TrainConfig, source: BatchSource):
        self.cfg = cfg
        self.source = source
        self.out = Path(cfg.out_dir)
        self.device = resolve_device(cfg.device)
        self.rank = distributed.current()
        if cfg.autocast == "auto":
            self.cfg = cfg = replace(cfg, autocast=self._autocast())
        if cfg.batch_size % self.rank.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.rank.world_size} ranks")
        source_model = getattr(source, "model_name", None) or getattr(getattr(source, "model", None), MODEL_NAME_ATTR, None)
        for s in cfg.saes:
            if s.batch_width != source.d_in:
                raise ValueError(f"{s.architecture} reads rows of width {s.batch_width} (d_in={s.d_in}), which does not match the "
                                 f"activations' width {source.d_in} at {source.hook_name}")
            if not same_model(s.model_name, source_model):
                raise ValueError(f"SAEConfig.model_name={s.model_name!r} but the activations at {source.hook_name} come from model "
                                 f"{source_model!r}; set model_name to the store's model (saewb train: --model {source_model})")
        generator = torch.Generator().manual_seed(cfg.seed)
        self.saes: list[SAE] = [ARCHITECTURES[s.architecture](s, generator).to(self.device) for s in cfg.saes]
        self.names = [sae_name(s) for s in cfg.saes]
        if len(set(self.names)) != len(self.names):
            self.names = [f"{n}_{i}" for i, n in enumerate(self.names)]
        fused = cfg.fast_kernels or None  # one kernel for all parameters: ~15x faster on CPU than the default
        self.optimizers = [
            torch.optim.Adam(sae.parameters(), lr=cfg.lr or default_lr(sae.cfg.d_sae), betas=(0.9, 0.999), fused=fused)
            for sae in self.saes
        ]
        self.base_lrs = [opt.param_groups[0]["lr"] for opt in self.optimizers]
        self.tokens_since_fired = [torch.zeros(s.d_sae, dtype=torch.long, device=self.device) for s in cfg.saes]
        self.step = 0
        self.scale = 1.0
        self.last_record: dict | None = None
        """The latest metrics record (of the last SAE logged)."""

    def _autocast(self) -> str:
        """The precision of `autocast="auto"`: the one a checkpoint in `out` recorded (a resume
        must not switch), else `training_autocast` for the largest SAE (rank 0's, for every rank)."""
        recorded = checkpoint_setting(self.out, "autocast")
        if recorded in ("none", "bf16"):
            return recorded
        largest = max(self.cfg.saes, key=lambda s: s.d_in * s.d_sae)
        choice = training_autocast(self.cfg.batch_size // self.rank.world_size, largest.d_in, largest.d_sae, self.device)
        return distributed.broadcast_object(choice)

    # ------------------------------------------------------------------ data
    def batches(self) -> Iterator[torch.Tensor]:
        """Training batches (batch d_in) from the current step on, over as many epochs as needed."""
        return epoch_batches(self.source, self.cfg.batch_size, self.cfg.seed, self.step, self.rank.rank, self.rank.world_size)

    def init_from_sample(self) -> None:
        sample = init_sample_of(self.source, self.cfg.init_tokens, self.cfg.seed, self.cfg.batch_size).to(self.device)
        check_init_sample(sample, self.source)  # NaN/inf here is broken data, not a learning-rate problem
        if self.input_scaling_for(sample) == "per_dimension":
            self.scale = per_dimension_scale(sample)
        else:
            self.scale = self.saes[0].scale_of(sample)
        with torch.no_grad():
            for sae in self.saes:
                targets = sae.split_batch(sae.scale_rows(sample, self.scale))[1]
                sae.b_dec.copy_(geometric_median(targets) if self.cfg.b_dec_init == "geometric_median" else targets.mean(0))

    def input_scaling_for(self, sample: Tensor) -> Literal["scalar", "per_dimension"]:
        """`cfg.input_scaling` for this init sample (n d_in), "auto" resolved."""
        own_halves = any(type(sae).scale_rows is not SAE.scale_rows for sae in self.saes)  # transcoders: a factor per half
        if self.cfg.input_scaling == "auto":
            return "per_dimension" if not own_halves and dominant_share(sample) >= DOMINANT_SHARE else "scalar"
        if self.cfg.input_scaling == "per_dimension" and own_halves:
            raise ValueError("input_scaling='per_dimension' is for SAEs; a transcoder scales each half by its own factor")
        return self.cfg.input_scaling

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Write the resumable state (atomically; one complete checkpoint stays on disk)."""
        save_checkpoint(self)

    def load_checkpoint(self) -> bool:
        """Resume from the checkpoint in `out`, if there is a complete one; False when none."""
        return load_checkpoint(self)

    # ------------------------------------------------------------------ training
    def _start(self) -> MetricsLog | None:
        """Resume from the checkpoint, or initialise from a sample; the metrics log (rank 0)."""
        resumed = self.load_checkpoint()  # every rank reads the same checkpoint
        if resumed and self.rank.is_main:
            truncate_metrics(self.out / "metrics.jsonl", self.step)
        if not resumed:
            if self.rank.is_main:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            self.init_from_sample()
            self.scale = distributed.broadcast_object(self.scale)
        return MetricsLog(self.cfg, self.out) if self.rank.is_main else None

    def train(self) -> list[Path]:
        """Train (or resume) to the end of the schedule (or `max_steps`); the saved SAE folders,
        once the schedule is complete (none when `max_steps` stopped it earlier)."""
        self.begin()
        batches = self.batches() if self.step < self.end else iter(())
        while self.step < self.end:
            self.step_on(next(batches))
        return self.finish()

    def begin(self, progress: bool = True) -> None:
        """Resume or initialise, and get ready for `step_on` up to `self.end` steps (`progress`: a tqdm bar)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.logger = self._start()
        # DDP broadcasts rank 0's weights here, after init/resume
        self.objectives = [distributed.wrap_ddp(Objective(sae, cfg.aux_k or s.d_in // 2, cfg.aux_coefficient, cfg.fast_kernels), self.device)
                           for sae, s in zip(self.saes, cfg.saes)]
        self.end = cfg.total_steps if cfg.max_steps is None else min(cfg.total_steps, cfg.max_steps)
        self.bar = tqdm(total=self.end * cfg.batch_size, initial=self.step * cfg.batch_size, unit="tok", unit_scale=True, desc="train",
                        disable=not (self.rank.is_main and progress))
        self.clock = (time.perf_counter(), self.step)

    def step_on(self, x_raw: Tensor) -> None:
        """One step of every SAE on the raw training batch x_raw (batch width), then the checkpoint when one is due."""
        cfg = self.cfg
        x_raw = x_raw.to(self.device, non_blocking=True)
        if not torch.isfinite(x_raw).all():
            raise FloatingPointError(f"non-finite activations in training batch {self.step}: the source holds NaN/inf (a store's "
                                     "checksums passed, so the harvest wrote them); harvest again into a new --out, e.g. with "
                                     "--harvest-autocast none")
        x = self.saes[0].scale_rows(x_raw, self.scale)
        log_now = self.step % cfg.log_every == 0 or self.step == self.end - 1
        for i, objective in enumerate(self.objectives):
            self._update(i, objective, x, self.logger if log_now else False, self.clock)
        self.step += 1
        self.bar.update(cfg.batch_size)
        if log_now and self.last_record:
            self.bar.set_postfix(fvu=f"{self.last_record['fvu']:.3f}", l0=f"{self.last_record['l0']:.1f}")
        if self.rank.is_main and (self.step % cfg.checkpoint_every == 0 or self.step == self.end):
            self.save_checkpoint()

    def finish(self) -> list[Path]:
        """The saved SAE folders once the schedule is complete (none when `max_steps` stopped it earlier)."""
        self.bar.close()
        paths = []
        if self.step >= self.cfg.total_steps:
            paths = self.save_final() if self.rank.is_main else [self.out / name for name in self.names]
        distributed.barrier()  # no rank returns before rank 0's checkpoint and SAEs are on disk
        return paths

    def _update(self, i: int, objective: nn.Module, x: Tensor, logger: MetricsLog | None | bool, clock: tuple[float, int]) -> None:
        """One optimiser step of SAE i on the normalised batch x [batch d_in]; logs a record when
        `logger` is not False (all ranks take part, rank 0's `logger` writes)."""
        cfg, sae, opt = self.cfg, self.saes[i], self.optimizers[i]
        lr_mult = lr_factor(self.step, cfg)
        for group in opt.param_groups:
            group["lr"] = self.base_lrs[i] * lr_mult
        dead = self.tokens_since_fired[i] > cfg.dead_tokens
        sparsity_scale = min(1.0, (self.step + 1) / max(1, int(cfg.sparsity_warmup_fraction * cfg.total_steps)))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
            out, aux, loss = objective(x, sparsity_scale, dead)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.names[i]}: loss became {loss.item()} at step {self.step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: gradients averaged over ranks
        project_out_parallel_grad(sae.W_dec)
        clip = type(sae).max_grad_norm if cfg.max_grad_norm is None else cfg.max_grad_norm
        if clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
        opt.step()
        sae.post_step()
        distributed.average_buffers_(sae)  # BatchTopK's running threshold
        with torch.no_grad():
            fired = distributed.all_reduce_(out.active.to(torch.uint8), "max").bool()  # fired on any rank
            self.tokens_since_fired[i] += cfg.batch_size
            self.tokens_since_fired[i][fired] = 0
        if logger is not False:
            started, start_step = clock
            self._log(logger, i, sae, out, aux, loss, dead, x, lr_mult, (self.step + 1 - start_step) / (time.perf_counter() - started))

    @torch.no_grad()
    def _log(self, logger: MetricsLog | None, i: int, sae: SAE, out: TrainOutput, aux: Tensor, loss: Tensor, dead: Tensor,
             x: Tensor, lr_mult: float, steps_per_s: float) -> None:
        """One metrics record for SAE i, averaged over ranks (all ranks call this; rank 0 writes)."""
        target = sae.split_batch(x)[1]
        mean = distributed.all_reduce_(target.mean(0), "mean")  # the global batch's mean, so FVU is the global one
        variance = (target - mean).pow(2).sum(-1).mean()
        stats = torch.stack([loss, out.mse, variance, out.l0, aux, out.sparsity]).float()
        loss_v, mse, variance, l0, aux_v, sparsity = distributed.all_reduce_(stats, "mean").tolist()
        record = {
            "sae": self.names[i], "step": self.step, "tokens": (self.step + 1) * self.cfg.batch_size,
            "lr": self.base_lrs[i] * lr_mult, "loss": loss_v, "mse": mse, "fvu": mse / variance, "l0": l0, "aux_loss": aux_v,
            "sparsity_loss": sparsity, "dead_fraction": dead.float().mean().item(), "tokens_per_s": steps_per_s * self.cfg.batch_size,
        }
        if hasattr(sae, "threshold"):
            record["threshold_mean"] = sae.threshold.float().mean().item()
        self.last_record = record
        if logger is not None:
            logger.log(record)

    def save_final(self) -> list[Path]:
        """Save every SAE in SAE Lens format with the input scale folded into the weights."""
        paths = []
        for name, sae in zip(self.names, self.saes):
            final = type(sae)(sae.cfg)
            final.load_state_dict(sae.state_dict())
            final = final.cpu()
            final.fold_input_scale(self.scale)
            final.training_data = dict(getattr(self.source, "training_data", {}))
            per_dimension = isinstance(self.scale, list) and len(self.scale) == sae.cfg.d_in
            final.training_data["input_scaling"] = "per_dimension" if per_dimension else "scalar"
            if per_dimension:  # the space it learnt in
                final.training_data["input_scale_per_dimension"] = self.scale
            paths.append(final.save(self.out / name))
        atomic_write_json(self.out / "train_summary.json", {"saes": {n: str(p) for n, p in zip(self.names, paths)}, "steps": self.step, "input_scale": self.scale, "config": asdict(self.cfg)})
        return paths


def train(cfg: TrainConfig, source: BatchSource) -> list[Path]:
    """Train (or resume) the SAEs of `cfg` on `source`; returns the saved SAE directories."""
    return Trainer(cfg, source).train()
