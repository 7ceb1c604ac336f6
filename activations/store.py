"""On-disk activation store: safetensors shards plus a JSON manifest, one folder per hook.

    <store>/<hook_name>/manifest.json
    <store>/<hook_name>/shard_00000.safetensors   acts      [n_rows, d_in]  (storage dtype)
                                                  tokens    [n_contexts, context_len] int32
                                                  positions [n_rows] int64  (context * context_len + pos, shard-local)

Each shard covers a fixed range of contexts, so a killed harvest resumes shard by shard and
produces the same files. Reading shuffles rows across a window of shards (random shard
order, random rows within the window), so memory is bounded by the window, not the store.

Checksums: the manifest records every shard's sha256. `ActivationStore.load_shard` checks it
the first time a process reads a shard (in the trainer that is the prefetching reader thread,
so the hash overlaps training; hashlib releases the GIL) and remembers the verified (file,
size, mtime), so later epochs skip it: one sha256 per shard per process. Measured on a default
75.7 MB shard (512 contexts x 127 tokens x 576, bf16, page cache, one core): sha256 70 ms
(1.1 GB/s) against 57 ms to read() the file and 86 ms for `load_shard` + fp32 conversion, so
a shard's first read costs 172 ms instead of 86 ms, 2.7 s once per process for a 2M-token
store. A resumed harvest (manifest not complete) and `saewb harvest --repair` hash the shards
the manifest already lists. A mismatch is a `StoreError` that names the shard and the command
that rebuilds just the corrupt shards, `saewb harvest --repair <store>` (`repair_command`).

Writes go through `activations.io` (atomic and durable).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import shlex
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

FORMAT = "saewb-activations/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StoreError(ValueError):
    """A store that is missing, incomplete, corrupt or does not match what was asked for."""


def repair_command(store_path: Path) -> str:
    """The command that re-harvests just the corrupt or missing shards of a store."""
    return f"saewb harvest --repair {shlex.quote(str(store_path))}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, hashed from a read-only memory map (no copy out of the page cache)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return hashlib.sha256(view).hexdigest()


_VERIFIED: set[tuple] = set()
"""(file, size, mtime, sha256) of the shards whose checksum this process has checked."""


def _verified_key(path: Path, sha256: str) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, sha256)


def hook_dir(store: Path, hook_name: str) -> Path:
    return Path(store) / hook_name


HELDOUT_FOLDER = "heldout"
"""The held-out store of a harvest lives in <store root>/heldout/<hook>, beside the training store's <store root>/<hook>."""


def heldout_store(training_store: str | Path | None, corpus: dict, model: str, hook: str) -> ActivationStore | None:
    """The held-out activations harvested beside the training store `training_store` (one hook's
    folder, as an SAE's `training_data["store"]` records it), if they are of `corpus` (a
    CorpusConfig as a dict), `model` and `hook` and complete; None otherwise. Found by its place,
    trusted for its content: readers compare each context's tokens with the text they analyse
    (`analysis.encoding.HookActivations`), so a corpus edited since the harvest is not misread."""
    if not training_store:
        return None
    folder = hook_dir(Path(training_store).parent / HELDOUT_FOLDER, hook)
    try:
        store = ActivationStore(folder)
    except StoreError:
        return None
    m = store.manifest
    return store if (m["corpus"] == corpus and m["model"] == model and m["hook_name"] == hook) else None


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
        self._last_shard: tuple[int | None, dict[str, Tensor]] = (None, {})
        for shard in self.shards:
            if not (self.path / shard.file).exists():
                raise StoreError(f"{self.path}: shard {shard.file} listed in the manifest is missing; "
                                 f"re-harvest it with `{repair_command(self.path)}`")

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
    def training_data(self) -> dict:
        """Provenance an SAE trained on this store records (`SAE.training_data`)."""
        return {"corpus": self.manifest["corpus"], "model": self.model_name, "store": str(self.path), "store_fingerprint": self.fingerprint,
                "exclude_bos": bool(self.manifest["exclude_bos"])}

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def fingerprint(self) -> str:
        """Identity of the store's content (model, hook, corpus, dtype and every shard's
        sha256): a checkpoint records it, so a resume on another store is refused."""
        keys = ("model", "hook_name", "dtype", "corpus_fingerprint", "context_len", "exclude_bos")
        ident = [self.manifest.get(k) for k in keys] + [s.sha256 for s in self.shards]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]

    def _mismatch(self, shard: ShardInfo, got: str) -> StoreError:
        return StoreError(
            f"{self.path / shard.file}: checksum mismatch (sha256 {got[:12]}..., the manifest records {shard.sha256[:12]}...): "
            f"the shard is corrupt or truncated. Rebuild just the corrupt shards with `{repair_command(self.path)}`"
        )

    def verify(self) -> None:
        """Check every shard's checksum (catches truncated or corrupt files)."""
        for shard in self.shards:
            got = sha256_file(self.path / shard.file)
            if got != shard.sha256:
                raise self._mismatch(shard, got)
            _VERIFIED.add(_verified_key(self.path / shard.file, shard.sha256))

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        """Shard `index`'s tensors: acts [n_rows, d_in], tokens [n_contexts, context_len] and
        positions [n_rows]. Its sha256 is checked on the first read in this process (see the module docstring)."""
        shard = self.shards[index]
        path = self.path / shard.file
        try:
            key = _verified_key(path, shard.sha256)
            if key not in _VERIFIED:
                got = sha256_file(path)
                if got != shard.sha256:
                    raise self._mismatch(shard, got)
                _VERIFIED.add(key)
            data = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{path}: cannot read shard ({e}); it is corrupt or truncated. "
                             f"Rebuild just the corrupt shards with `{repair_command(self.path)}`") from e
        acts = data.get("acts")
        if acts is None or acts.shape != (shard.n_tokens, self.d_in):
            got = None if acts is None else tuple(acts.shape)
            raise StoreError(f"{path}: expected acts of shape {(shard.n_tokens, self.d_in)}, found {got}; the shard is corrupt. "
                             f"Rebuild just the corrupt shards with `{repair_command(self.path)}`")
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
            """Each window's acts [n_rows, d_in], rows shuffled."""
            for shard_ids in windows:
                acts = torch.cat([self.load_shard(int(i))["acts"] for i in shard_ids])
                yield acts[torch.from_numpy(rng.permutation(len(acts)))]

        def batches(window_iter: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
            """Windows [n_rows, d_in] -> this rank's batches [batch_size, d_in]; a window's leftover rows start the next."""
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

    @property
    def n_contexts(self) -> int:
        """Contexts the store holds (the shards cover them in order from context 0)."""
        return sum(s.n_contexts for s in self.shards)

    def contexts(self, first: int, n: int) -> tuple[Tensor, Tensor]:
        """Contexts `first` .. `first + n` in their layout: tokens int32 [n, context_len] and
        acts float32 [n, context_len, d_in], zero at the positions the store leaves out
        (position 0 when `exclude_bos`). Reads each shard once per process while reading in order."""
        if first < 0 or first + n > self.n_contexts:
            raise StoreError(f"{self.path} holds contexts 0..{self.n_contexts}; {first}..{first + n} asked for")
        ctx_len = int(self.manifest["context_len"])
        skipped = 1 if self.manifest["exclude_bos"] else 0
        tokens, acts = [], []
        at = first
        while at < first + n:
            index = next(i for i, s in enumerate(self.shards) if s.first_context <= at < s.first_context + s.n_contexts)
            shard = self._cached_shard(index)
            info = self.shards[index]
            lo, hi = at - info.first_context, min(first + n, info.first_context + info.n_contexts) - info.first_context
            tokens.append(shard["tokens"][lo:hi])
            rows = shard["acts"].view(info.n_contexts, ctx_len - skipped, self.d_in)[lo:hi].float()
            acts.append(torch.cat([rows.new_zeros(hi - lo, skipped, self.d_in), rows], dim=1))
            at = info.first_context + hi
        return torch.cat(tokens), torch.cat(acts)

    def _cached_shard(self, index: int) -> dict[str, Tensor]:
        """`load_shard(index)`, keeping the last one read (sequential readers ask for it again)."""
        if self._last_shard[0] != index:
            self._last_shard = (index, self.load_shard(index))
        return self._last_shard[1]


def _prefetching(items: Iterator, depth: int = 1) -> Iterator:
    """Run the iterator `items` in a background thread, up to `depth` results ahead (overlaps
    I/O and conversion with the consumer's compute). Closing or dropping the returned
    generator stops the thread, so an abandoned epoch does not pin its window in memory."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
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
