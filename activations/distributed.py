"""Data-parallel helpers for `torchrun`, in one place.

    torchrun --nproc_per_node 2 -m analysis.cli harvest ...     # contexts sharded across ranks
    torchrun --nproc_per_node 2 -m analysis.cli train ...       # DDP, the global batch split

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the first helper that needs the process group
starts it (gloo for CPU tensors, NCCL for CUDA tensors when CUDA is present) and pins the
process to GPU LOCAL_RANK. Without those variables (or with WORLD_SIZE=1) every helper is a
no-op, so a single process runs exactly the code it ran before this module existed.
Multi-node runs (torchrun's --nnodes/--rdzv flags) need the store and output folders on a
filesystem every node sees.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    """Where this process sits in the job."""

    rank: int = 0
    """Global rank, 0..world_size-1."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this node: the GPU index on CUDA."""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes manifests, checkpoints, logs and final outputs."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def from_env() -> Rank:
    """The rank torchrun (or any launcher using its variables) gave this process."""
    return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def current() -> Rank:
    """This process' rank, starting the process group on first use under torchrun."""
    env = from_env()
    if env.parallel and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)  # before NCCL starts: one GPU per process
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    if not dist.is_initialized():
        return Rank()
    return Rank(dist.get_rank(), dist.get_world_size(), env.local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().parallel:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others (e.g. to fill a cache they then read)."""
    rank = current()
    if rank.parallel and not rank.is_main:
        dist.barrier()
    yield
    if rank.parallel and rank.is_main:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: Literal["sum", "mean", "max"] = "sum") -> torch.Tensor:
    """In-place reduction of `tensor`, any shape (e.g. fired latents [d_sae]), across ranks
    (identity for one process); returns `tensor`."""
    rank = current()
    if rank.parallel:
        dist.all_reduce(tensor, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= rank.world_size
    return tensor


def all_gather_object(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; [obj] for one process)."""
    rank = current()
    if not rank.parallel:
        return [obj]
    out = [None] * rank.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not current().parallel:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` under DistributedDataParallel when there are several ranks, else itself.
    DDP broadcasts rank 0's parameters and buffers at construction and averages gradients
    in backward. Buffers are not re-broadcast every step (`average_buffers_` keeps them
    equal), so a running statistic sees every rank's data, not just rank 0's."""
    if not current().parallel:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # named forward_sync_buffers since torch 2.13 (both still sync at init)
    no_resync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, **{no_resync: False})


@torch.no_grad()
def average_buffers_(module: torch.nn.Module) -> None:
    """Average floating-point buffers (running statistics) across ranks."""
    if current().parallel:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                all_reduce_(buffer, "mean")
