"""Evaluate an SAE on held-out text: reconstruction, sparsity and spliced-in CE loss.

Positions are chosen as in training: position 0 of every context (the BOS-like sink) is
excluded from every metric and left untouched when splicing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import CorpusConfig, contexts_for_tokens, describe, load_contexts
from activations.io import atomic_write_bytes, atomic_write_json
from activations.model import HookedModel, logits_with_edit, model_mismatch, run_to_hooks, validate_hook
from activations.store import ActivationStore
from sae.base import SAE

from ..encoding import HookActivations, first_position
from .metrics import HELD_OUT_METRICS, ReconstructionStats, ce_loss_recovered, cross_entropy, dead_fraction, dense_fraction, kl_per_token


@dataclass
class EvalConfig:
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(split="heldout"))
    n_tokens: int = 131_072
    """Held-out tokens for reconstruction metrics and the dead/dense fractions (BOS excluded)."""
    n_ce_contexts: int = 128
    """Contexts for the CE metrics (three full forward passes each)."""
    batch_contexts: int = 8

    def __post_init__(self) -> None:
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
    reconstruction_inputs: str = "model, fp32"
    """Where the reconstruction metrics' activations came from: the model run here in fp32, or the held-out store
    (with the precision its harvest recorded)."""


def evaluate(sae: SAE, model: HookedModel, cfg: EvalConfig | None = None, tokens: np.ndarray | Tensor | None = None,
             heldout: ActivationStore | None = None) -> EvalResult:
    """Metrics of `sae` spliced into `model` at `sae.cfg.hook_name`, on held-out text
    (`tokens`, `heldout`: as in `evaluate_many`)."""
    return evaluate_many([sae], model, cfg, tokens, {} if heldout is None else {heldout.hook_name: heldout})[0]


@torch.no_grad()
def evaluate_many(saes: list[SAE], model: HookedModel, cfg: EvalConfig | None = None,
                  tokens: np.ndarray | Tensor | None = None, heldout: dict[str, ActivationStore] | None = None) -> list[EvalResult]:
    """`evaluate` for several SAEs of one model on the same held-out text, sharing the work:
    one forward pass to the deepest hook gives every SAE its reconstruction inputs, and the
    clean CE is computed once. Only the spliced and zero-ablated passes are per SAE.

    `tokens`: the held-out rows, int [n_contexts context_len], for a caller that tokenised the
    text already (at least `eval_contexts(cfg)`; the first ones are read); default: those rows
    of `cfg.corpus`. `heldout`: {hook: held-out store} holding those rows' activations
    (`activations.store.heldout_store`): the reconstruction statistics read the contexts a
    store holds instead of running the model (the CE passes always run it)."""
    cfg = cfg or EvalConfig()
    if not saes:
        return []
    _check_saes(saes, model)
    device = next(model.parameters()).device
    saes = [sae.to(device).eval() for sae in saes]
    tokens = _eval_rows(cfg, model, tokens)
    firsts = [first_position(sae) for sae in saes]  # the sink position is never spliced nor measured
    n_contexts = contexts_for_tokens(cfg.n_tokens, cfg.corpus.context_len)
    readers = {hook: HookActivations(model, hook, (heldout or {}).get(hook), first_position=min(f for s, f in zip(saes, firsts, strict=True)
                                                                                                 if s.cfg.hook_name == hook))
               for hook in sorted({sae.cfg.hook_name for sae in saes})}
    stats = _reconstruction(saes, firsts, model, tokens[:n_contexts], cfg.batch_contexts, readers)
    ce = _ce_losses(saes, firsts, model, tokens[:cfg.n_ce_contexts], cfg.batch_contexts)
    inputs = {hook: _inputs(reader, n_contexts) for hook, reader in readers.items()}
    return [_result(st, losses, cfg, inputs[sae.cfg.hook_name]) for sae, st, losses in zip(saes, stats, ce, strict=True)]


def _inputs(reader: HookActivations, n_contexts: int) -> str:
    """`EvalResult.reconstruction_inputs` of the contexts `reader` served."""
    if reader.read_from_store == 0:
        return "model, fp32"
    where = f"held-out store ({'bf16 autocast' if reader.store and reader.store.manifest.get('autocast') == 'bf16' else 'fp32'})"
    return where if reader.read_from_store == n_contexts else f"{where} for {reader.read_from_store} of {n_contexts} contexts, model for the rest"


def eval_contexts(cfg: EvalConfig) -> int:
    """Held-out contexts an evaluation reads: enough for `cfg.n_tokens` and for `cfg.n_ce_contexts`."""
    return max(cfg.n_ce_contexts, contexts_for_tokens(cfg.n_tokens, cfg.corpus.context_len))


def _check_saes(saes: list[SAE], model: HookedModel) -> None:
    """Every SAE reads a hook of `model` and was trained on this model's activations."""
    for sae in saes:
        validate_hook(model, sae.cfg.hook_name)
        if (mismatch := model_mismatch(sae.cfg.model_name, model)) is not None:
            raise ValueError(f"this SAE was trained on activations of another model: {mismatch}; "
                             f"evaluate it with --model {sae.cfg.model_name}")


def _eval_rows(cfg: EvalConfig, model: HookedModel, tokens: np.ndarray | Tensor | None) -> Tensor:
    """The held-out rows of the evaluation, long [eval_contexts(cfg) context_len]: `tokens`
    when given, else loaded from `cfg.corpus`; an error when there are fewer."""
    n_contexts, ctx_len = eval_contexts(cfg), cfg.corpus.context_len
    if tokens is None:
        tokens = load_contexts(cfg.corpus, model.tokenizer, max_contexts=n_contexts)
    if tokens.ndim != 2 or tokens.shape[1] != ctx_len:
        raise ValueError(f"evaluation reads token rows [n_contexts {ctx_len}] (cfg.corpus.context_len), not {tuple(tokens.shape)}")
    if len(tokens) < n_contexts:
        raise ValueError(f"{describe(cfg.corpus)} has {len(tokens)} contexts of {ctx_len} tokens, {n_contexts} needed "
                         f"(n_tokens={cfg.n_tokens:,}, n_ce_contexts={cfg.n_ce_contexts}); lower them or use a larger corpus")
    return torch.as_tensor(tokens[:n_contexts]).long()


def _reconstruction(saes: list[SAE], firsts: list[int], model: HookedModel, tokens: Tensor, batch_contexts: int,
                    readers: dict[str, HookActivations]) -> list[ReconstructionStats]:
    """Reconstruction statistics of each SAE on tokens [n_contexts pos], positions from its first
    on; the hooks whose reader holds the rows read them, the others share one model pass."""
    device = next(model.parameters()).device
    stats = [ReconstructionStats(sae.cfg.d_sae) for sae in saes]
    for b in tqdm(range(0, len(tokens), batch_contexts), desc="evaluate: reconstruction"):
        batch = tokens[b:b + batch_contexts].to(device)
        stored = [hook for hook, r in readers.items() if r.holds(b, len(batch))]
        computed = [hook for hook in readers if hook not in stored]
        acts = {hook: readers[hook](batch, b) for hook in stored} | (run_to_hooks(model, batch, computed) if computed else {})
        for sae, first, st in zip(saes, firsts, stats, strict=True):
            x = acts[sae.cfg.hook_name]
            x = x.reshape(*x.shape[:2], -1)
            if x.shape[-1] != sae.cfg.d_in:
                raise ValueError(f"SAE d_in={sae.cfg.d_in} but {sae.cfg.hook_name} has width {x.shape[-1]}")
            x = x[:, first:].flatten(0, 1)
            f = sae.encode(x)
            st.update(x, sae.decode(f), f)
    return stats


def _splice(sae: SAE, first: int) -> Callable[[Tensor], Tensor]:
    def edit(act: Tensor) -> Tensor:
        """act [batch, pos, d_in] reconstructed by the SAE from position `first` on."""
        out = act.clone()
        out[:, first:] = sae(act[:, first:].float()).to(act.dtype)
        return out
    return edit


def _zero(first: int) -> Callable[[Tensor], Tensor]:
    def edit(act: Tensor) -> Tensor:
        """act [batch, pos, d_in] zeroed from position `first` on (the CE baseline)."""
        out = act.clone()
        out[:, first:] = 0
        return out
    return edit


class CrossEntropies(NamedTuple):
    """One SAE's per-position losses over the CE contexts, from its first position on."""

    clean: Tensor
    """[n] CE of the clean model."""
    spliced: Tensor
    """[n] CE with the SAE's reconstruction spliced in."""
    zero: Tensor
    """[n] CE with the hook's activations zeroed."""
    kl: Tensor
    """[n'] KL(clean || spliced) per position (the last position has no next token to predict and is left out)."""


def _ce_losses(saes: list[SAE], firsts: list[int], model: HookedModel, tokens: Tensor, batch_contexts: int) -> list[CrossEntropies]:
    """The clean, spliced and zero-ablated losses of each SAE on tokens [n_contexts pos]; the clean pass is shared."""
    device = next(model.parameters()).device
    clean_ce: list[Tensor] = []  # [batch pos] per batch, every position
    spliced: list[list[Tensor]] = [[] for _ in saes]
    zero: list[list[Tensor]] = [[] for _ in saes]
    kl: list[list[Tensor]] = [[] for _ in saes]
    for b in tqdm(range(0, len(tokens), batch_contexts), desc="evaluate: CE loss"):
        batch = tokens[b:b + batch_contexts].to(device)
        clean = logits_with_edit(model, batch)
        clean_ce.append(cross_entropy(clean, batch).cpu())
        for n, (sae, first) in enumerate(zip(saes, firsts, strict=True)):
            edited = logits_with_edit(model, batch, sae.cfg.hook_name, _splice(sae, first))
            spliced[n].append(cross_entropy(edited, batch)[:, first:].flatten().cpu())  # predictions from spliced positions
            zeroed = logits_with_edit(model, batch, sae.cfg.hook_name, _zero(first))
            zero[n].append(cross_entropy(zeroed, batch)[:, first:].flatten().cpu())
            kl[n].append(kl_per_token(clean, edited)[:, first:-1].flatten().cpu())
    return [CrossEntropies(torch.cat([c[:, first:].flatten() for c in clean_ce]), torch.cat(spliced[n]), torch.cat(zero[n]),
                           torch.cat(kl[n])) for n, first in enumerate(firsts)]


def _result(st: ReconstructionStats, losses: CrossEntropies, cfg: EvalConfig, inputs: str) -> EvalResult:
    """One SAE's `EvalResult` from its reconstruction statistics and losses."""
    clean, spliced, zero = float(losses.clean.mean()), float(losses.spliced.mean()), float(losses.zero.mean())
    density = (st.fire_counts.double() / st.n).clamp_min(1e-10).log10()
    return EvalResult(
        n_tokens=st.n, n_ce_tokens=int(losses.clean.numel()), mse=st.mse, fvu=st.fvu, explained_variance=1 - st.fvu, l0=st.l0,
        dead_fraction=dead_fraction(st.fire_counts), dense_fraction=dense_fraction(st.fire_counts, st.n),
        ce_clean=clean, ce_spliced=spliced, ce_zero_ablated=zero, ce_loss_recovered=ce_loss_recovered(clean, spliced, zero),
        delta_ce=spliced - clean, kl_per_token=float(losses.kl.mean()),
        log10_feature_density=[round(float(v), 4) for v in density], corpus=asdict(cfg.corpus),
        metrics={name: fn(st) for name, fn in HELD_OUT_METRICS.items()}, reconstruction_inputs=inputs,
    )


def write_results(result: EvalResult, out_dir: str | Path, metrics_jsonl: str | Path | None = None,
                  title: str = "SAE evaluation") -> tuple[Path, Path]:
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


__all__ = ["CrossEntropies", "EvalConfig", "EvalResult", "eval_contexts", "evaluate", "evaluate_many", "summary_line", "write_results"]
