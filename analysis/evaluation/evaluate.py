"""Evaluate an SAE on held-out text: reconstruction, sparsity and spliced-in CE loss.

Positions are chosen as in training: position 0 of every context (the BOS-like sink) is
excluded from every metric and left untouched when splicing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from activations.corpus import CorpusConfig, describe, load_contexts
from activations.model import HookedModel, logits_with_edit, model_mismatch, validate_hook
from activations.io import atomic_write_bytes, atomic_write_json
from sae.base import SAE

from ..encoding import encode_contexts, first_position
from .metrics import HELD_OUT_METRICS, ReconstructionStats, ce_loss_recovered, cross_entropy, dense_fraction, dead_fraction, kl_per_token


@dataclass
class EvalConfig:
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(split="heldout"))
    n_tokens: int = 131_072
    """Held-out tokens for reconstruction metrics and the dead/dense fractions (BOS excluded)."""
    n_ce_contexts: int = 128
    """Contexts for the CE metrics (three full forward passes each)."""
    batch_contexts: int = 8

    def __post_init__(self):
        if isinstance(self.corpus, dict):
            self.corpus = CorpusConfig(**self.corpus)


@dataclass
class EvalResult:
    n_tokens: int
    """Held-out tokens behind the reconstruction metrics and dead/dense fractions."""
    n_ce_tokens: int
    """Predicted positions behind the CE metrics."""
    mse: float
    fvu: float
    explained_variance: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    ce_loss_recovered: float
    delta_ce: float
    """CE_spliced - CE_clean, in nats."""
    kl_per_token: float
    """Mean KL(clean || spliced) per predicted position."""
    log10_feature_density: list[float]
    """log10 firing frequency per feature (-inf for dead ones is stored as -10)."""
    corpus: dict = field(default_factory=dict)
    """The text measured on: the CorpusConfig (source, split, context length)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Every registered `metrics.HELD_OUT_METRICS` of the held-out statistics, by name."""


@torch.no_grad()
def evaluate(sae: SAE, model: HookedModel, cfg: EvalConfig | None = None) -> EvalResult:
    """Metrics of `sae` spliced into `model` at `sae.cfg.hook_name`, on held-out text."""
    cfg = cfg or EvalConfig()
    hook = sae.cfg.hook_name
    validate_hook(model, hook)
    if (mismatch := model_mismatch(sae.cfg.model_name, model)) is not None:
        raise ValueError(f"this SAE was trained on activations of another model: {mismatch}; evaluate it with --model {sae.cfg.model_name}")
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    ctx_len = cfg.corpus.context_len
    n_contexts = max(cfg.n_ce_contexts, -(-cfg.n_tokens // (ctx_len - 1)))
    tokens = torch.from_numpy(load_contexts(cfg.corpus, model.tokenizer, max_contexts=n_contexts)).long()
    if len(tokens) < n_contexts:
        raise ValueError(f"{describe(cfg.corpus)} has {len(tokens)} contexts of {ctx_len} tokens, {n_contexts} needed "
                         f"(n_tokens={cfg.n_tokens:,}, n_ce_contexts={cfg.n_ce_contexts}); lower them or use a larger corpus")

    stats = ReconstructionStats(sae.cfg.d_sae)
    recon_contexts = -(-cfg.n_tokens // (ctx_len - 1))
    first = first_position(sae)  # the sink position is never spliced nor measured
    for b in tqdm(range(0, recon_contexts, cfg.batch_contexts), desc="evaluate: reconstruction"):
        batch = tokens[b:min(b + cfg.batch_contexts, recon_contexts)].to(device)
        x, f = (t[:, first:].flatten(0, 1) for t in encode_contexts(model, sae, batch))
        stats.update(x, sae.decode(f), f)

    ce = {"clean": [], "spliced": [], "zero": []}
    kl = []

    def splice(act: torch.Tensor) -> torch.Tensor:
        """act [batch, pos, d_in] reconstructed by the SAE from position `first` on."""
        out = act.clone()
        out[:, first:] = sae(act[:, first:].float()).to(act.dtype)
        return out

    def zero(act: torch.Tensor) -> torch.Tensor:
        """act [batch, pos, d_in] zeroed from position `first` on (the CE baseline)."""
        out = act.clone()
        out[:, first:] = 0
        return out

    for b in tqdm(range(0, cfg.n_ce_contexts, cfg.batch_contexts), desc="evaluate: CE loss"):
        batch = tokens[b:min(b + cfg.batch_contexts, cfg.n_ce_contexts)].to(device)
        clean = logits_with_edit(model, batch)
        spliced = logits_with_edit(model, batch, hook, splice)
        ce["clean"].append(cross_entropy(clean, batch)[:, first:].flatten().cpu())  # predictions from spliced positions
        ce["spliced"].append(cross_entropy(spliced, batch)[:, first:].flatten().cpu())
        ce["zero"].append(cross_entropy(logits_with_edit(model, batch, hook, zero), batch)[:, first:].flatten().cpu())
        kl.append(kl_per_token(clean, spliced)[:, first:-1].flatten().cpu())
    means = {k: float(torch.cat(v).mean()) for k, v in ce.items()}
    density = (stats.fire_counts.double() / stats.n).clamp_min(1e-10).log10()
    return EvalResult(
        n_tokens=stats.n, n_ce_tokens=int(torch.cat(ce["clean"]).numel()), mse=stats.mse, fvu=stats.fvu,
        explained_variance=1 - stats.fvu, l0=stats.l0,
        dead_fraction=dead_fraction(stats.fire_counts), dense_fraction=dense_fraction(stats.fire_counts, stats.n),
        ce_clean=means["clean"], ce_spliced=means["spliced"], ce_zero_ablated=means["zero"],
        ce_loss_recovered=ce_loss_recovered(means["clean"], means["spliced"], means["zero"]),
        delta_ce=means["spliced"] - means["clean"], kl_per_token=float(torch.cat(kl).mean()),
        log10_feature_density=[round(float(v), 4) for v in density], corpus=asdict(cfg.corpus),
        metrics={name: fn(stats) for name, fn in HELD_OUT_METRICS.items()},
    )


def write_results(result: EvalResult, out_dir: str | Path, metrics_jsonl: str | Path | None = None, title: str = "SAE evaluation") -> tuple[Path, Path]:
    """Write `eval.json` and the standalone `report.html` (training curves + density histogram)."""
    from .report import evaluation_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "eval.json", out / "report.html"
    atomic_write_json(json_path, asdict(result))
    from sae.trainer import read_metrics

    records = read_metrics(metrics_jsonl) if metrics_jsonl else []  # tolerates a torn last line
    atomic_write_bytes(html_path, evaluation_report(result, records, title).encode())
    return json_path, html_path


def summary_line(result: EvalResult) -> str:
    return (
        f"FVU {result.fvu:.4f} | L0 {result.l0:.1f} | dead {result.dead_fraction:.1%} | dense {result.dense_fraction:.1%} | "
        f"CE clean {result.ce_clean:.3f} spliced {result.ce_spliced:.3f} zero {result.ce_zero_ablated:.3f} | "
        f"CE recovered {result.ce_loss_recovered:.4f} | delta CE {result.delta_ce:.4f} nats | KL {result.kl_per_token:.4f} | "
        f"{result.n_tokens:,} tokens of {describe(CorpusConfig(**result.corpus)) if result.corpus else 'unrecorded text'}"
    )


__all__ = ["EvalConfig", "EvalResult", "evaluate", "summary_line", "write_results"]
