"""Harvest activations at one or more hook points into an on-disk store.

One forward pass per batch serves every requested hook and stops after the last hooked
layer. Shards cover fixed context ranges and are written atomically, so rerunning a killed
harvest skips finished shards and yields the same store as an uninterrupted run.

Under torchrun the shards still to do are dealt round-robin to the ranks, which write them
into the one store; after each round of shards rank 0 records them all in the manifest. A
shard's bytes do not depend on which rank wrote it or on the number of ranks, so a store
harvested by N ranks equals the single-process one, and a killed run resumes with any N.

A resumed harvest checks the sha256 of every shard the manifest already lists and stops at a
corrupt one with a `StoreError` naming it; `HarvestConfig.repair` (`saewb harvest --repair
<store>`, config read back from the manifest by `repair_config`) re-harvests exactly the
corrupt and missing shards instead, giving the same bytes as the original harvest.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .corpus import CorpusConfig, contexts_for_tokens, fingerprint, load_contexts, tokens_in_contexts
from .io import atomic_save_safetensors, atomic_write_json, remove_stale_temp_files
from .model import DEFAULT_HOOK, DEFAULT_MODEL, HookedModel, compiled_blocks, load_model, model_mismatch, run_to_hooks, validate_hook
from .precision import AUTOCASTS, check_autocast, resolve_autocast
from .store import DTYPES, FORMAT, ActivationStore, StoreError, hook_dir, repair_command, sha256_file

log = logging.getLogger(__name__)
COMPILE_MIN_TOKENS = 1_000_000
"""`HarvestConfig.compile="auto"` compiles for at least this many tokens to harvest (~5 min of forward on 2 CPU cores)."""


@dataclass
class HarvestConfig:
    out_dir: str = "runs/default/activations"
    """Store root; each hook gets a sub-folder named after it."""
    model: str = DEFAULT_MODEL
    """"smollm2" (embedded default), a local HF directory, or a hub name."""
    hooks: list[str] = field(default_factory=lambda: [DEFAULT_HOOK])
    """TransformerLens hook names, all harvested in one forward pass."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    n_tokens: int = 2_000_000
    """Activation rows to store per hook (BOS rows excluded when `exclude_bos`)."""
    batch_contexts: int = 16
    """Contexts per forward pass."""
    shard_contexts: int = 512
    """Contexts per shard (512 x 128 = 65k tokens); a multiple of batch_contexts."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Storage dtype of the activations."""
    exclude_bos: bool = True
    """Drop position 0 (the BOS-like attention sink, norms ~100x the median)."""
    autocast: Literal["auto", "none", "bf16"] = "auto"
    """Model matmuls while harvesting: "auto" (time fp32 and bf16 autocast on the first batch and keep the faster, if bf16's
    relative error is within 1e-3; a resumed harvest keeps the recorded choice), "bf16" or "none" (fp32)."""
    device: str = "auto"
    repair: bool = False
    """Re-harvest the shards whose checksum does not match the manifest (else: an error)."""
    compile: Literal["auto", "yes", "no"] = "auto"
    """torch.compile the decoder layers up to the last hook (`activations.model.compiled_blocks`: residual hooks of a
    Hugging Face model): "auto" compiles a harvest of >= 1M tokens on a CPU with a C++ compiler, where the ~3 s per layer pays."""
    up_to: bool = False
    """Harvest at most n_tokens: what the corpus holds when it holds fewer (else: an error). The held-out store uses it."""
    hook_tokens: dict[str, int] = field(default_factory=dict)
    """Fewer rows for some hooks (hook -> rows, at most n_tokens): those hooks' stores hold the first contexts only, the
    same store a harvest of that size writes, and the forward pass goes past the shallower hooks only while a deeper one
    still needs rows. `saewb run` harvests its steering SAE's hook this way, in the main harvest's pass."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.shard_contexts % self.batch_contexts:
            raise ValueError("shard_contexts must be a multiple of batch_contexts")
        check_autocast(self.autocast)
        if not self.hooks:
            raise ValueError("at least one hook is needed")
        if isinstance(self.corpus, dict):
            self.corpus = CorpusConfig(**self.corpus)
        unknown = set(self.hook_tokens) - set(self.hooks)
        if unknown:
            raise ValueError(f"hook_tokens names hooks that are not harvested: {sorted(unknown)}")
        if any(not 0 < n <= self.n_tokens for n in self.hook_tokens.values()):
            raise ValueError(f"hook_tokens must be positive and at most n_tokens ({self.n_tokens:,}), got {self.hook_tokens}")


def harvest(cfg: HarvestConfig, model: HookedModel | None = None) -> dict[str, ActivationStore]:
    """Run (or resume) the harvest; returns {hook_name: ActivationStore}."""
    model = model if model is not None else load_model(cfg.model, cfg.device)
    for hook in cfg.hooks:
        validate_hook(model, hook)
    if (mismatch := model_mismatch(cfg.model, model)) is not None:
        raise ValueError(f"HarvestConfig.model={cfg.model!r} names another model than the one passed: {mismatch}")
    device = next(model.parameters()).device
    first = 1 if cfg.exclude_bos else 0
    n_contexts = contexts_for_tokens(cfg.n_tokens, cfg.corpus.context_len, first)
    with distributed.main_first():  # rank 0 fills the token cache, the others read it
        tokens = load_contexts(cfg.corpus, model.tokenizer, max_contexts=n_contexts, cache_dir=Path(cfg.out_dir) / ".token_cache")
    if len(tokens) < n_contexts and cfg.up_to and len(tokens):
        n_contexts = len(tokens)
    hook_contexts = {hook: min(n_contexts, contexts_for_tokens(cfg.hook_tokens.get(hook, cfg.n_tokens), cfg.corpus.context_len, first))
                     for hook in cfg.hooks}
    if len(tokens) < n_contexts:
        raise ValueError(
            f"corpus {cfg.corpus.source!r} ({cfg.corpus.split}) has only {tokens_in_contexts(len(tokens), cfg.corpus.context_len, first):,} "
            f"tokens, {cfg.n_tokens:,} requested"
        )
    cfg = replace(cfg, autocast=_autocast(cfg, model, tokens, device))
    header = {
        "format": FORMAT, "model": cfg.model, "d_in": None, "dtype": cfg.dtype, "context_len": cfg.corpus.context_len,
        "exclude_bos": cfg.exclude_bos, "corpus": asdict(cfg.corpus), "corpus_fingerprint": fingerprint(tokens), "n_contexts": n_contexts,
        "shard_contexts": cfg.shard_contexts, "batch_contexts": cfg.batch_contexts, "autocast": cfg.autocast,
        "compiled": _compiles(cfg, model, n_contexts),
    }
    # "device" (not checked on resume) lets a repair harvest where the shards were made: same bytes. A hook of fewer
    # contexts gets the header a harvest of its own size would write.
    manifests = {hook: {**_resumed(cfg, hook, _header_of(header, tokens, hook_contexts[hook])), "device": device.type} for hook in cfg.hooks}
    _harvest_missing_shards(model, cfg, tokens, manifests, device)
    if distributed.current().is_main:
        for hook, m in manifests.items():
            m["n_tokens"] = sum(s["n_tokens"] for s in m["shards"])
            m["complete"] = True
            atomic_write_json(hook_dir(Path(cfg.out_dir), hook) / "manifest.json", m)
    distributed.barrier()  # no rank returns before the store is complete
    return {hook: ActivationStore(hook_dir(Path(cfg.out_dir), hook)) for hook in cfg.hooks}


def _header_of(header: dict, tokens: np.ndarray, n_contexts: int) -> dict:
    """`header` for a store of the first `n_contexts` of `tokens`."""
    if n_contexts == header["n_contexts"]:
        return header
    return {**header, "n_contexts": n_contexts, "corpus_fingerprint": fingerprint(tokens[:n_contexts])}


def _recorded(cfg: HarvestConfig) -> dict | None:
    """The manifest an earlier run of this harvest left (its first hook's), or None: what an "auto" choice is resumed from."""
    manifest = hook_dir(Path(cfg.out_dir), cfg.hooks[0]) / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.exists() else None


def _autocast(cfg: HarvestConfig, model: HookedModel, tokens: np.ndarray, device: torch.device) -> str:
    """The precision to harvest with: as set, or for "auto" the one an earlier run of this
    harvest recorded (a resume must not mix precisions), else the faster one on the first batch."""
    if cfg.autocast != "auto":
        return cfg.autocast
    recorded = _recorded(cfg)
    if recorded is not None and recorded.get("autocast") in AUTOCASTS:
        return recorded["autocast"]
    choice = resolve_autocast("auto", model, torch.from_numpy(tokens[:cfg.batch_contexts]).long().to(device), cfg.hooks,
                              first=1 if cfg.exclude_bos else 0)
    return distributed.broadcast_object(choice)  # every rank harvests in rank 0's precision


def _compiles(cfg: HarvestConfig, model: HookedModel, n_contexts: int) -> bool:
    """Whether the harvest runs compiled decoder layers: "yes", or "auto" for a harvest of at least
    COMPILE_MIN_TOKENS on a CPU with a C++ compiler (what was measured), where the hooks allow it (`compiled_blocks`).
    The manifest records it, and a resumed "auto" harvest keeps what it recorded."""
    recorded = _recorded(cfg)
    if cfg.compile == "auto" and recorded is not None:  # a resume decides as the first run did (eager before the key existed)
        return bool(recorded.get("compiled", False))
    if cfg.compile == "no":
        return False
    rows = tokens_in_contexts(n_contexts, cfg.corpus.context_len, 1 if cfg.exclude_bos else 0)
    on_cpu_with_compiler = next(model.parameters()).device.type == "cpu" and shutil.which("g++") is not None  # inductor's C++ backend
    if cfg.compile == "auto" and (rows < COMPILE_MIN_TOKENS or not on_cpu_with_compiler):
        return False
    with compiled_blocks(model, cfg.hooks, dry_run=True) as possible:
        if cfg.compile == "yes" and not possible:
            raise ValueError(f"compile='yes' needs compiled decoder layers, which hooks {cfg.hooks} on this model do not allow "
                             "(residual hooks of a Hugging Face model only); use compile='auto' or 'no'")
        return possible


def _resumed(cfg: HarvestConfig, hook: str, header: dict) -> dict:
    """The manifest of `hook`'s store to continue from: `header` with the verified shards an
    earlier run of the same harvest left (none for a new store); an error for another harvest."""
    folder = hook_dir(Path(cfg.out_dir), hook)
    folder.mkdir(parents=True, exist_ok=True)
    with distributed.main_first():
        if distributed.current().is_main:
            remove_stale_temp_files(folder)  # no writer is running yet: these are from killed runs
    header = {**header, "hook_name": hook}
    path = folder / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        mismatched = [k for k in header if k != "d_in" and old.get(k, False if k == "compiled" else None) != header[k]]
        if mismatched:
            raise ValueError(f"{folder} holds a different harvest (differs in {mismatched}); choose another --out or delete it")
        return {**header, "d_in": old["d_in"], "shards": list(_verified_shards(folder, old, cfg.repair).values()), "complete": False}
    if cfg.repair:
        raise StoreError(f"{folder} has no manifest.json: there is no harvest to repair")
    return {**header, "shards": [], "complete": False}


def _harvest_missing_shards(model: HookedModel, cfg: HarvestConfig, tokens: np.ndarray, manifests: dict[str, dict],
                            device: torch.device) -> None:
    """Harvest every shard some hook's manifest lacks, dealt round-robin to the ranks; after each
    round every rank holds the same manifests, and rank 0 writes them."""
    rank = distributed.current()
    n_contexts = len(tokens)
    n_shards = math.ceil(n_contexts / cfg.shard_contexts)
    done = {hook: {s["file"] for s in m["shards"]} for hook, m in manifests.items()}
    todo = [i for i in range(n_shards) if any(i * cfg.shard_contexts < m["n_contexts"] and f"shard_{i:05d}.safetensors" not in done[hook]
                                              for hook, m in manifests.items())]
    mine = todo[rank.rank::rank.world_size]  # round r: every rank does its r-th shard
    kept_per_context = cfg.corpus.context_len - (1 if cfg.exclude_bos else 0)
    my_rows = sum(min(cfg.shard_contexts, n_contexts - i * cfg.shard_contexts) for i in mine) * kept_per_context
    compile_now = next(iter(manifests.values()))["compiled"]
    with compiled_blocks(model, cfg.hooks) if compile_now else contextlib.nullcontext(False):
        _harvest_rounds(model, cfg, tokens, manifests, device, mine, len(todo), my_rows)


def _harvest_rounds(model: HookedModel, cfg: HarvestConfig, tokens: np.ndarray, manifests: dict[str, dict], device: torch.device,
                    mine: list[int], n_todo: int, my_rows: int) -> None:
    """This rank's shards `mine`, a round at a time; the manifests gathered and written after each."""
    rank = distributed.current()
    bar = tqdm(total=my_rows, unit="tok", unit_scale=True, desc=f"harvest{' held-out,' if cfg.corpus.split == 'heldout' else ''} {len(cfg.hooks)} hook(s)", disable=not rank.is_main)
    for round_index in range(math.ceil(n_todo / rank.world_size)):
        extents = {hook: m["n_contexts"] for hook, m in manifests.items()}
        written = _harvest_shard(model, cfg, tokens, mine[round_index], device, DTYPES[cfg.dtype], bar, extents) if round_index < len(mine) else {}
        for entries in distributed.all_gather_object(written):  # every rank keeps the same manifest
            for hook, entry in entries.items():
                m = manifests[hook]
                m["d_in"] = entry.pop("d_in")
                m["shards"] = sorted([s for s in m["shards"] if s["file"] != entry["file"]] + [entry], key=lambda s: s["first_context"])
        if rank.is_main:
            for hook, m in manifests.items():
                atomic_write_json(hook_dir(Path(cfg.out_dir), hook) / "manifest.json", m)
    bar.close()


def _verified_shards(folder: Path, manifest: dict, repair: bool) -> dict[str, dict]:
    """The shards of `manifest` that are on disk with the recorded sha256. A resumed harvest
    (or a repair) hashes each of them (rank 0, shared with the others); a complete store
    rerun without `repair` is trusted here, its reader checks each shard once. Corrupt shards
    are an error unless `repair`, which drops them so they are harvested again."""
    rank = distributed.current()
    check = repair or not manifest.get("complete")
    bad = []
    with distributed.main_first():
        if rank.is_main and check:
            bad = [s["file"] for s in manifest["shards"] if (folder / s["file"]).exists() and sha256_file(folder / s["file"]) != s["sha256"]]
    bad = distributed.broadcast_object(bad)
    if bad and not repair:
        raise StoreError(f"{folder}: shard(s) {', '.join(bad)} do not match the checksums in the manifest (corrupt or "
                         f"truncated); re-harvest just those with `{repair_command(folder)}`")
    if bad:
        log.warning("%s: re-harvesting corrupt shard(s) %s", folder, ", ".join(bad))
    return {s["file"]: s for s in manifest["shards"] if (folder / s["file"]).exists() and s["file"] not in bad}


def repair_config(store_path: str | Path, **overrides) -> HarvestConfig:
    """The `HarvestConfig` that rebuilds the corrupt or missing shards of the store at
    `store_path` (one hook's folder), read back from its manifest; `overrides` e.g. device."""
    folder = Path(store_path)
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise StoreError(f"{folder} is not an activation store (no manifest.json): there is nothing to repair") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{folder / 'manifest.json'} is corrupt ({e}): harvest the store again into a new folder") from e
    kept = m["context_len"] - (1 if m["exclude_bos"] else 0)
    fields = dict(
        out_dir=str(folder.parent), model=m["model"], hooks=[m["hook_name"]], corpus=CorpusConfig(**m["corpus"]),
        n_tokens=m["n_contexts"] * kept, batch_contexts=m["batch_contexts"], shard_contexts=m["shard_contexts"],
        dtype=m["dtype"], exclude_bos=m["exclude_bos"], autocast=m["autocast"], device=m.get("device", "auto"), repair=True,
        compile="yes" if m.get("compiled") else "no",
    )
    return HarvestConfig(**{**fields, **overrides})


def _harvest_shard(model, cfg: HarvestConfig, tokens: np.ndarray, shard_index: int, device: torch.device,
                   storage: torch.dtype, bar, extents: dict[str, int]) -> dict[str, dict]:
    """Run the model over one shard's contexts and write one shard file per hook whose store
    reaches this shard (`extents`: hook -> its store's contexts); returns {hook: manifest entry
    (+ d_in)}. A batch runs only as deep as the hooks that still want its contexts."""
    ctx_len = cfg.corpus.context_len
    first_pos = 1 if cfg.exclude_bos else 0
    start = shard_index * cfg.shard_contexts
    shard_tokens = torch.from_numpy(tokens[start:start + cfg.shard_contexts])
    outputs: dict[str, list[torch.Tensor]] = {h: [] for h in cfg.hooks if extents[h] > start}
    for b in range(0, len(shard_tokens), cfg.batch_contexts):
        batch = shard_tokens[b:b + cfg.batch_contexts].long().to(device)
        wanted = [h for h in outputs if extents[h] > start + b]
        acts = run_to_hooks(model, batch, wanted, cfg.autocast)
        for hook, a in acts.items():
            a = a[:extents[hook] - start - b, first_pos:]
            if not torch.isfinite(a).all():
                raise FloatingPointError(f"non-finite activations at {hook} in contexts {start + b}..{start + b + len(batch)}")
            outputs[hook].append(a.reshape(-1, a.shape[-1]).to("cpu", storage))
        bar.update(batch.shape[0] * (ctx_len - first_pos))
    entries = {}
    for hook in outputs:
        n_kept = min(len(shard_tokens), extents[hook] - start)
        positions = (np.arange(n_kept)[:, None] * ctx_len + np.arange(first_pos, ctx_len)[None, :]).reshape(-1)
        folder = hook_dir(Path(cfg.out_dir), hook)
        acts = torch.cat(outputs[hook])
        name = f"shard_{shard_index:05d}.safetensors"
        atomic_save_safetensors(
            {"acts": acts, "tokens": shard_tokens[:n_kept].int(), "positions": torch.from_numpy(positions).long()},
            folder / name,  # no header metadata: safetensors writes it in random order, breaking checksums
        )
        entries[hook] = {"file": name, "first_context": start, "n_contexts": n_kept, "n_tokens": len(acts),
                         "sha256": sha256_file(folder / name), "d_in": int(acts.shape[1])}
    return entries
