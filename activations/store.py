"""On-disk activation store: safetensors shards plus a JSON manifest, one folder per hook.

    <store>/<hook_name>/manifest.json
    <store>/<hook_name>/shard_00000.safetensors   acts      [n_rows, d_in]  (storage dtype)
                                                  tokens    [n_contexts, context_len] int32
                                                  positions [n_rows] int64  (context * context_len + pos, shard-local)

Each shard covers a fixed range of contexts, so a killed harvest resumes shard by shard and
produces the same files. Reading shuffles rows across a window of shards (random shard
order, random rows within the window), so memory is bounded by the window, not the store.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "saewb-activations/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StoreError(ValueError):
    """A store that is missing, incomplete, corrupt or does not match what was asked for."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def hook_dir(store: Path, hook_name: str) -> Path:
    return Path(store) / hook_name


@dataclass
class ShardInfo:
    file: str
    first_context: int
    n_contexts: int
    n_tokens: int
    sha256: str


class ActivationStore:
    """Read side of one hook's store. `iter_batches` yields shuffled [batch, d_in] float32."""

    def __init__(self, path: str | Path, require_complete: bool = True):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            raise StoreError(f"{self.path} is not an activation store (no manifest.json); run `saewb harvest` first")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{manifest_path} is corrupt: {e}") from e
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{manifest_path}: unknown format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        if require_complete and not self.manifest.get("complete"):
            raise StoreError(f"{self.path}: harvest did not finish; rerun the same harvest command to resume it")
        self.shards = [ShardInfo(**s) for s in self.manifest["shards"]]
        for shard in self.shards:
            if not (self.path / shard.file).exists():
                raise StoreError(f"{self.path}: shard {shard.file} listed in the manifest is missing")

    # manifest fields used everywhere
    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def hook_name(self) -> str:
        return self.manifest["hook_name"]

    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    def verify(self) -> None:
        """Check every shard's checksum (catches truncated or corrupt files)."""
        for shard in self.shards:
            if sha256_file(self.path / shard.file) != shard.sha256:
                raise StoreError(f"{self.path / shard.file}: checksum mismatch, the shard is corrupt or truncated; delete it and rerun the harvest to rebuild it")

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        shard = self.shards[index]
        path = self.path / shard.file
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise StoreError(f"{path}: cannot read shard ({e}); it is corrupt or truncated, delete it and rerun the harvest") from e
        acts = data.get("acts")
        if acts is None or acts.shape != (shard.n_tokens, self.d_in):
            got = None if acts is None else tuple(acts.shape)
            raise StoreError(f"{path}: expected acts of shape {(shard.n_tokens, self.d_in)}, found {got}; the shard is corrupt")
        return data

    def iter_batches(
        self,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        window_shards: int = 4,
        rank: int = 0,
        world_size: int = 1,
        prefetch: bool = True,
        pin_memory: bool | None = None,
    ) -> Iterator[torch.Tensor]:
        """Shuffled float32 batches [batch_size, d_in] over one epoch, deterministic in (seed, epoch).
        With `world_size` > 1 each rank gets its slice of every global batch of
        `batch_size * world_size` rows (data-parallel). A final partial batch is dropped.
        With `prefetch`, one background thread reads and shuffles the next window of shards
        and another cuts and converts batches a few steps ahead, so the consumer only computes.
        `pin_memory` (default: when CUDA is available) returns page-locked batches, so that
        `.to("cuda", non_blocking=True)` copies them asynchronously."""
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self.shards))
        windows = [order[i:i + window_shards] for i in range(0, len(order), window_shards)]
        global_batch = batch_size * world_size
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory

        def shuffled_windows() -> Iterator[torch.Tensor]:
            for shard_ids in windows:
                acts = torch.cat([self.load_shard(int(i))["acts"] for i in shard_ids])
                yield acts[torch.from_numpy(rng.permutation(len(acts)))]

        def batches(window_iter: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
            carry = None
            for acts in window_iter:
                if carry is not None:
                    acts = torch.cat([carry, acts])
                n_full = len(acts) // global_batch
                for b in range(n_full):
                    rows = acts[b * global_batch + rank * batch_size: b * global_batch + (rank + 1) * batch_size]
                    yield torch.empty(rows.shape, dtype=torch.float32, pin_memory=True).copy_(rows) if pin else rows.float()
                carry = acts[n_full * global_batch:]

        if not prefetch:
            yield from batches(shuffled_windows())
            return
        yield from _prefetching(batches(_prefetching(shuffled_windows(), depth=1)), depth=4)

    def tokens(self) -> np.ndarray:
        """All packed contexts of the store, int32 [n_contexts, context_len]."""
        return np.concatenate([self.load_shard(i)["tokens"].numpy() for i in range(len(self.shards))])


def _prefetching(items: Iterator, depth: int = 1) -> Iterator:
    """Run the iterator `items` in a background thread, up to `depth` results ahead (overlaps
    I/O and conversion with the consumer's compute). Closing or dropping the returned
    generator stops the thread, so an abandoned epoch does not pin its window in memory."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        # also give up once the main thread has finished, so the interpreter can exit (the
        # thread is not a daemon: exiting while it is inside a torch op would abort)
        while not stop.is_set() and threading.main_thread().is_alive():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def worker():
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as e:  # surfaced in the consumer
            put(e)
            return
        put(done)

    threading.Thread(target=worker, daemon=False).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
