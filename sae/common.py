"""Maths shared by every architecture and the trainer, written once. Shapes are einops
strings: x (batch d_in), pre-activations (batch d_sae), the k active latents of each row
(batch k).

The hand-written backward passes (`_PreActs`, `_GatherPreActs`, `_SparseDecode`) compute what
plain autograd computes with less work; callers ask for them with `fast=True` (the trainer
passes `TrainConfig.fast_kernels`) and get plain autograd otherwise, the reference that
tests/test_fast_training.py compares against."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import SAE
    from .trainer import BatchSource


def tied_init(d_in: int, d_sae: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(W_enc, W_dec): W_dec (d_sae d_in) with unit-norm random rows, and W_enc = W_dec.T (d_in d_sae)."""
    w_dec = torch.randn(d_sae, d_in, generator=generator)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    return w_dec.T.clone(), w_dec


def geometric_median(points: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point (d) minimising the summed distance to `points` (n d)."""
    median = points.mean(0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            return new
        median = new
    return median


def check_init_sample(sample: Tensor, source: BatchSource | None = None) -> None:
    """A ValueError if the initialisation sample (n d_in) (input scale, b_dec) holds NaN/inf:
    the activations are broken, which training would otherwise report later as a diverging
    loss. Names the store and the shards holding non-finite rows when `source` is a store."""
    bad = ~torch.isfinite(sample).all(-1)
    if not bad.any():
        return
    where = "the training activations"
    if getattr(source, "path", None) is not None:
        where = f"the activation store {source.path}"
    elif getattr(source, "hook_name", None):
        where = f"the activations at {source.hook_name} ({type(source).__name__})"
    shards = []
    try:
        for i, shard in enumerate(source.shards):
            acts = source.load_shard(i)["acts"]
            n_bad = int((~torch.isfinite(acts.float()).all(-1)).sum())
            if n_bad:
                shards.append(f"{shard.file} ({n_bad} rows)")
    except Exception:  # not a store, or unreadable: report what is known
        pass
    in_shards = f"; non-finite rows in shard(s) {', '.join(shards)}" if shards else ""
    raise ValueError(f"{where} contain NaN/inf: {int(bad.sum())} of the {len(sample)} rows of the initialisation sample (input scale "
                     f"and b_dec) are not finite{in_shards}. The activations are broken (a corrupt store, or a model that overflows "
                     "in the harvest dtype); harvest them again (e.g. with --dtype float32), not a lower learning rate")


def input_scale(sample: Tensor) -> float:
    """Scalar s such that mean ||s * x|| = sqrt(d_in) over `sample` (n d_in)."""
    return float(sample.shape[1] ** 0.5 / sample.norm(dim=1).mean())


DOMINANT_SHARE = 0.75
"""`input_scaling="auto"` scales per dimension where one dimension holds at least this share of the input's variance.
On SmolLM2's residual stream (the chain stack's init samples): 0.41-0.69 at layers 2-8, where one factor gave the lower
delta CE, 0.82-0.97 at layers 11-26, where per-dimension scaling did, 0.12 at layer 29 (docs/results.md)."""


def dominant_share(sample: Tensor) -> float:
    """The share of the total variance of `sample` (n d_in) held by its largest-variance dimension."""
    variance = sample.float().var(dim=0)
    return float(variance.max() / variance.sum().clamp_min(1e-30))


def per_dimension_scale(sample: Tensor) -> list[float]:
    """Factors s (d_in) that give every dimension of `sample` (n d_in) unit standard deviation (a constant dimension
    keeps factor 1)."""
    std = sample.float().std(dim=0)
    return torch.where(std > 1e-8, 1 / std.clamp_min(1e-8), torch.ones_like(std)).tolist()


@torch.no_grad()
def normalize_decoder_rows(w_dec: Tensor) -> None:
    """Scale each row of W_dec (d_sae d_in) to unit norm, in place."""
    w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def project_out_parallel_grad(w_dec: Tensor) -> None:
    """Remove the gradient component along each (unit) decoder row of W_dec (d_sae d_in), so
    Adam's step moves rows tangentially and renormalisation afterwards changes little."""
    if w_dec.grad is None:
        return
    parallel = (w_dec.grad * w_dec).sum(dim=1, keepdim=True)
    w_dec.grad -= parallel * w_dec


def _matmul_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast gives a matmul on t's device right now (t's own dtype outside autocast)."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def scatter_rows(indices: Tensor, values: Tensor, rows: Tensor, n: int) -> Tensor:
    """out (n d) with out[indices[b, s]] += values[b, s] * rows[b] for indices/values
    (batch k) and rows (batch d): the weight gradient of a product with k nonzeros per row,
    as a sparse x dense matmul of O(batch * k * d) instead of a dense O(batch * n * d) one."""
    batch, k = indices.shape
    row_of = torch.arange(batch, device=indices.device)[:, None].expand(batch, k)
    coo = torch.sparse_coo_tensor(
        torch.stack([indices.reshape(-1), row_of.reshape(-1)]), values.reshape(-1).to(rows.dtype), (n, batch), check_invariants=False,
    )
    return torch.sparse.mm(coo, rows)


class _PreActs(torch.autograd.Function):
    """pre = (x - b_dec) @ W_enc + b_enc (batch d_sae), computed as plain autograd computes it,
    with a leaner backward: no gradient for x (activations are data), and b_dec's gradient as
    -W_enc @ (sum over the batch of grad_pre), a vector-matrix product where autograd does a
    second (batch d_sae) x (d_sae d_in) matmul. W_enc's gradient is the usual matmul, in the
    forward's autocast dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
        xc = x - b_dec
        ctx.mm_dtype = _matmul_dtype(xc)
        ctx.save_for_backward(xc, w_enc)
        return xc @ w_enc + b_enc

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, w_enc = ctx.saved_tensors
        mm = ctx.mm_dtype
        grad_w = (xc.to(mm).T @ grad.to(mm)).to(w_enc.dtype)
        grad_sum = grad.sum(0).to(w_enc.dtype)
        grad_x = (grad.to(mm) @ w_enc.to(mm).T).to(xc.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, grad_sum, -(w_enc @ grad_sum)


class _GatherPreActs(torch.autograd.Function):
    """values (batch k) = pre[b, indices[b, s]], where pre = (x - b_dec) @ W_enc + b_enc was
    computed without autograd. The backward touches only the gathered latents: O(batch * k * d_in)
    where autograd's would be two dense (batch d_sae) x (d_sae d_in) matmuls (TopK at the
    default: k = 32 of 4,608 latents)."""

    @staticmethod
    def forward(ctx, pre: Tensor, indices: Tensor, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
        ctx.save_for_backward(indices, x, w_enc, b_dec)
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx, grad: Tensor):
        indices, x, w_enc, b_dec = ctx.saved_tensors
        grad = grad.to(w_enc.dtype)
        grad_w = scatter_rows(indices, grad, x - b_dec, w_enc.shape[1]).T
        grad_sum = torch.zeros(w_enc.shape[1], dtype=w_enc.dtype, device=w_enc.device).index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return None, None, None, grad_w, grad_sum, -(w_enc @ grad_sum)


class _SparseDecode(torch.autograd.Function):
    """sum_s values[b, s] * W_dec[indices[b, s]] (batch d_in): an embedding-bag gather forward;
    backward W_dec's gradient by `scatter_rows` (embedding_bag's own backward sorts all
    batch * k indices and is several times slower on CPU) and the values' gradient by
    embedding_bag's per-sample-weight backward."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, w_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, w_dec)
        return torch.nn.functional.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, indices, w_dec = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[0]:
            with torch.enable_grad():
                v = values.detach().requires_grad_()
                out = torch.nn.functional.embedding_bag(indices, w_dec.detach(), per_sample_weights=v, mode="sum")
                (grad_values,) = torch.autograd.grad(out, v, grad)
        grad_w = scatter_rows(indices, values, grad, w_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_w


def _needs_grad(*params: Tensor) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


def encoder_pre_acts(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, fast: bool = False) -> Tensor:
    """(x - b_dec) @ W_enc + b_enc: x (... d_in) -> (... d_sae), W_enc (d_in d_sae), b_enc (d_sae),
    b_dec (d_in). `fast`: 2-D x with gradients on goes through `_PreActs`' leaner backward."""
    if fast and x.dim() == 2 and _needs_grad(w_enc, b_enc, b_dec):
        return _PreActs.apply(x, w_enc, b_enc, b_dec)
    return (x - b_dec) @ w_enc + b_enc


def gather_pre_acts(pre: Tensor, indices: Tensor, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """pre.gather(1, indices) (batch k) of pre (batch d_sae), x (batch d_in), W_enc (d_in d_sae),
    b_enc (d_sae), b_dec (d_in). When `pre` was computed without a graph (the fast path:
    `encoder_pre_acts` under no_grad) the encoder's gradient reaches the gathered latents only,
    through `_GatherPreActs`; when `pre` carries the gradient (plain autograd) this is a plain gather."""
    if _needs_grad(w_enc, b_enc, b_dec) and not pre.requires_grad:
        return _GatherPreActs.apply(pre, indices, x, w_enc, b_enc, b_dec)
    return pre.gather(1, indices)


def sparse_decode(values: Tensor, indices: Tensor, w_dec: Tensor, b_dec: Tensor | None = None, fast: bool = False) -> Tensor:
    """x_hat (batch d_in) from the k active latents per row (values, indices (batch k)),
    W_dec (d_sae d_in), b_dec (d_in) or None: an embedding-bag gather over decoder rows, never
    a dense (batch d_sae) matmul. `fast`: the backward of `_SparseDecode`."""
    values = values.to(w_dec.dtype)
    if fast and _needs_grad(values, w_dec):
        out = _SparseDecode.apply(values, indices, w_dec)
    else:
        out = torch.nn.functional.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum")
    return out if b_dec is None else out + b_dec


def auxk_loss(x: Tensor, x_hat: Tensor, pre: Tensor, dead: Tensor, k_aux: int, sae: SAE, fast: bool = False,
              mean_over_ranks: Callable[[Tensor], Tensor] | None = None, target: Tensor | None = None) -> Tensor:
    """AuxK (Gao et al. 2024), a scalar (): reconstruct the residual e = target - x_hat (batch d_out; the target is
    the input x (batch d_in) itself for an SAE) with the top `k_aux` pre-activations (batch d_sae) of dead latents
    (bool (d_sae)); loss ||e - e_hat||^2 / ||e||^2 (batch sums), 0 when no latent is dead. `sae` gives the weights.
    `mean_over_ranks` (data-parallel ranks) turns this rank's ||e||^2 into the mean over ranks,
    so the loss averaged over ranks equals the single-process loss of the global batch."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    residual = ((x if target is None else target) - x_hat).detach()
    residual_norm = residual.pow(2).sum()
    if mean_over_ranks is not None:
        residual_norm = mean_over_ranks(residual_norm)
    with torch.no_grad():
        dead_pre = torch.where(dead[None, :], pre, torch.full_like(pre, -torch.inf))
        indices = dead_pre.topk(min(k_aux, n_dead), dim=1).indices
    values = gather_pre_acts(pre, indices, x, sae.W_enc, sae.b_enc, sae.input_offset).relu()
    e_hat = sparse_decode(values, indices, sae.W_dec, fast=fast)
    return (residual - e_hat).pow(2).sum() / residual_norm.clamp_min(1e-8)
