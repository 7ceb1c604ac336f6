"""Maths shared by every architecture and the trainer, written once."""
from __future__ import annotations

import torch
from torch import Tensor


def tied_init(d_in: int, d_sae: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """W_dec with unit-norm random rows [d_sae, d_in], and W_enc = W_dec.T [d_in, d_sae]."""
    w_dec = torch.randn(d_sae, d_in, generator=generator)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    return w_dec.T.clone(), w_dec


def geometric_median(points: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points` [n, d]."""
    median = points.mean(0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            return new
        median = new
    return median


def input_scale(sample: Tensor) -> float:
    """Scalar s such that mean ||s * x|| = sqrt(d_in) over `sample` [n, d_in]."""
    return float(sample.shape[1] ** 0.5 / sample.norm(dim=1).mean())


@torch.no_grad()
def normalize_decoder_rows(w_dec: Tensor) -> None:
    w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def project_out_parallel_grad(w_dec: Tensor) -> None:
    """Remove the gradient component along each (unit) decoder row, so Adam's step moves
    rows tangentially and renormalisation afterwards changes little."""
    if w_dec.grad is None:
        return
    parallel = (w_dec.grad * w_dec).sum(dim=1, keepdim=True)
    w_dec.grad -= parallel * w_dec


def sparse_decode(values: Tensor, indices: Tensor, w_dec: Tensor, b_dec: Tensor) -> Tensor:
    """x_hat [batch, d_in] from the k active latents per row (values/indices [batch, k]):
    an embedding-bag gather over decoder rows, never a dense [batch, d_sae] matmul."""
    return torch.nn.functional.embedding_bag(indices, w_dec, per_sample_weights=values.to(w_dec.dtype), mode="sum") + b_dec


def auxk_loss(x: Tensor, x_hat: Tensor, pre: Tensor, dead: Tensor, k_aux: int, w_dec: Tensor) -> Tensor:
    """AuxK (Gao et al. 2024): reconstruct the residual x - x_hat with the top `k_aux`
    pre-activations of dead latents; loss ||e - e_hat||^2 / ||e||^2 (batch sums)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    residual = (x - x_hat).detach()
    dead_pre = torch.where(dead[None, :], pre, torch.full_like(pre, -torch.inf))
    values, indices = dead_pre.topk(min(k_aux, n_dead), dim=1)
    values = values.relu()
    e_hat = torch.nn.functional.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum")
    return (residual - e_hat).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-8)
