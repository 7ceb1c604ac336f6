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
from activations.model import HookedModel, logits_with_edit, model_mismatch, run_to_hooks, validate_hook
from activations.io import atomic_write_bytes, atomic_write_json
from sae.base import SAE

from ..encoding import first_position
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


def evaluate(sae: SAE, model: HookedModel, cfg: EvalConfig | None = None) -> EvalResult:
    """Metrics of `sae` spliced into `model` at `sae.cfg.hook_name`, on held-out text."""
    return evaluate_many([sae], model, cfg)[0]


@torch.no_grad()
def evaluate_many(saes: list[SAE], model: HookedModel, cfg: EvalConfig | None = None) -> list[EvalResult]:
    """`evaluate` for several SAEs of one model on the same held-out text, sharing the work:
    one forward pass to the deepest hook gives every SAE its reconstruction inputs, and the
    clean CE is computed once. Only the spliced and zero-ablated passes are per SAE."""
    cfg = cfg or EvalConfig()
    if not saes:
        return []
    for sae in saes:
        validate_hook(model, sae.cfg.hook_name)
        if (mismatch := model_mismatch(sae.cfg.model_name, model)) is not None:
            raise ValueError(f"this SAE was trained on activations of another model: {mismatch}; "
                             f"evaluate it with --model {sae.cfg.model_name}")
    device = next(model.parameters()).device
    saes = [sae.to(device).eval() for sae in saes]
    hooks = sorted({sae.cfg.hook_name for sae in saes})
    ctx_len = cfg.corpus.context_len
    n_contexts = max(cfg.n_ce_contexts, -(-cfg.n_tokens // (ctx_len - 1)))
    tokens = torch.from_numpy(load_contexts(cfg.corpus, model.tokenizer, max_contexts=n_contexts)).long()
    if len(tokens) < n_contexts:
        raise ValueError(f"{describe(cfg.corpus)} has {len(tokens)} contexts of {ctx_len} tokens, {n_contexts} needed "
                         f"(n_tokens={cfg.n_tokens:,}, n_ce_contexts={cfg.n_ce_contexts}); lower them or use a larger corpus")

    stats = [ReconstructionStats(sae.cfg.d_sae) for sae in saes]
    firsts = [first_position(sae) for sae in saes]  # the sink position is never spliced nor measured
    recon_contexts = -(-cfg.n_tokens // (ctx_len - 1))
    for b in tqdm(range(0, recon_contexts, cfg.batch_contexts), desc="evaluate: reconstruction"):
        batch = tokens[b:min(b + cfg.batch_contexts, recon_contexts)].to(device)
        acts = run_to_hooks(model, batch, hooks)
        for sae, first, st in zip(saes, firsts, stats):
            x = acts[sae.cfg.hook_name]
            x = x.reshape(*x.shape[:2], -1)
            if x.shape[-1] != sae.cfg.d_in:
                raise ValueError(f"SAE d_in={sae.cfg.d_in} but {sae.cfg.hook_name} has width {x.shape[-1]}")
            x = x[:, first:].flatten(0, 1)
            f = sae.encode(x)
            st.update(x, sae.decode(f), f)

    def splice(sae: SAE, first: int):
        def edit(act: torch.Tensor) -> torch.Tensor:
            """act [batch, pos, d_in] reconstructed by the SAE from position `first` on."""
            out = act.clone()
            out[:, first:] = sae(act[:, first:].float()).to(act.dtype)
            return out
        return edit

    def zero(first: int):
        def edit(act: torch.Tensor) -> torch.Tensor:
            """act [batch, pos, d_in] zeroed from position `first` on (the CE baseline)."""
            out = act.clone()
            out[:, first:] = 0
            return out
        return edit

    clean_ce: list[torch.Tensor] = []  # [batch pos] per batch, every position
    ce = [{"spliced": [], "zero": []} for _ in saes]
    kl: list[list[torch.Tensor]] = [[] for _ in saes]
    for b in tqdm(range(0, cfg.n_ce_contexts, cfg.batch_contexts), desc="evaluate: CE loss"):
        batch = tokens[b:min(b + cfg.batch_contexts, cfg.n_ce_contexts)].to(device)
        clean = logits_with_edit(model, batch)
        clean_ce.append(cross_entropy(clean, batch).cpu())
        for n, (sae, first) in enumerate(zip(saes, firsts)):
            spliced = logits_with_edit(model, batch, sae.cfg.hook_name, splice(sae, first))
            ce[n]["spliced"].append(cross_entropy(spliced, batch)[:, first:].flatten().cpu())  # predictions from spliced positions
            ce[n]["zero"].append(cross_entropy(logits_with_edit(model, batch, sae.cfg.hook_name, zero(first)), batch)[:, first:].flatten().cpu())
            kl[n].append(kl_per_token(clean, spliced)[:, first:-1].flatten().cpu())

    results = []
    for n, (sae, first, st) in enumerate(zip(saes, firsts, stats)):
        clean_tokens = torch.cat([c[:, first:].flatten() for c in clean_ce])
        means = {"clean": float(clean_tokens.mean())} | {k: float(torch.cat(v).mean()) for k, v in ce[n].items()}
        density = (st.fire_counts.double() / st.n).clamp_min(1e-10).log10()
        results.append(EvalResult(
            n_tokens=st.n, n_ce_tokens=int(clean_tokens.numel()), mse=st.mse, fvu=st.fvu,
            explained_variance=1 - st.fvu, l0=st.l0,
            dead_fraction=dead_fraction(st.fire_counts), dense_fraction=dense_fraction(st.fire_counts, st.n),
            ce_clean=means["clean"], ce_spliced=means["spliced"], ce_zero_ablated=means["zero"],
            ce_loss_recovered=ce_loss_recovered(means["clean"], means["spliced"], means["zero"]),
            delta_ce=means["spliced"] - means["clean"], kl_per_token=float(torch.cat(kl[n]).mean()),
            log10_feature_density=[round(float(v), 4) for v in density], corpus=asdict(cfg.corpus),
            metrics={name: fn(st) for name, fn in HELD_OUT_METRICS.items()},
        ))
    return results


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


__all__ = ["EvalConfig", "EvalResult", "evaluate", "evaluate_many", "summary_line", "write_results"]
