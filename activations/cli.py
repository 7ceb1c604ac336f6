"""`saewb harvest`: the activations stage's command. Its flags come from `HarvestConfig` (and
`CorpusConfig.context_len`), with the fields' docstrings as help; `analysis.cli` collects it
into the `saewb` parser and composes it into `saewb run`."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .corpus import CorpusConfig
from .flags import Command, add_flags, from_flags
from .harvest import HarvestConfig, harvest, repair_config
from .model import ModelLoader
from .store import HELDOUT_FOLDER, ActivationStore

RENAMED = {"autocast": "harvest_autocast"}  # `--autocast` is the trainer's


def add_corpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None, help="text: 'default' (embedded books and documentation), 'chat' (embedded: the model's own chat answers), "
                   "a .txt/.jsonl/.parquet file or folder, or hf:<dataset>; several joined by '+' are read in turn ('chat+default'). "
                   "harvest/train/run read its train split (default: 'default'); evaluate/analyze/steer its held-out split "
                   "(default: the corpus the SAE was trained on, recorded in its cfg.json)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, HarvestConfig, only=("hooks", "n_tokens", "batch_contexts", "shard_contexts", "dtype", "autocast"), rename=RENAMED,
              help_suffix={"hooks": "Default: --hook."})
    add_flags(p, CorpusConfig, only=("context_len",))
    p.add_argument("--keep-bos", action="store_true", help="also store position 0, the attention sink (HarvestConfig.exclude_bos=False)")
    p.add_argument("--heldout-tokens", type=int, default=None,
                   help="also store the activations of this many held-out tokens (fp32, in <out>/activations/heldout/<hook>), "
                        "which evaluation, the atlas and label scoring then read instead of running the model again "
                        "(saewb run: what those stages read; saewb harvest: none)")


def add_repair_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repair", type=Path, default=None, metavar="STORE",
                   help="re-harvest the corrupt or missing shards of this store folder (<out>/activations/<hook>); "
                        "every other setting is read from its manifest")


def run(args: argparse.Namespace, models: ModelLoader, heldout_tokens: int | None = None,
        also: dict[str, tuple[int, int]] | None = None) -> dict[str, ActivationStore]:
    """Harvest (or resume, or --repair) per `args` with the model `models` gives; then the
    held-out store of `heldout_tokens` tokens (default: --heldout-tokens, else none). `also`:
    more hooks harvested in the same passes, each hook -> (training rows, held-out rows), at
    most the main harvest's (`HarvestConfig.hook_tokens`)."""
    if getattr(args, "repair", None):
        # same model, corpus, sizes and device as the original harvest; --model only says where
        # to load that model from (e.g. a moved folder), --device where to run
        cfg = repair_config(args.repair, **({"device": args.device} if args.device != "auto" else {}))
        stores = harvest(cfg, ModelLoader(models.given, cfg.device, models.cache).get(cfg.model))
        for store in stores.values():
            print(f"repaired: {store.path} ({len(store.shards)} shards, {store.n_tokens:,} tokens)")
        return stores
    corpus = from_flags(CorpusConfig, args, source=args.corpus or "default")
    also = also or {}
    hooks = args.hooks or [args.hook]
    cfg = from_flags(HarvestConfig, args, rename=RENAMED, out_dir=str(Path(args.out) / "activations"), model=models.name(),
                     hooks=[*hooks, *(h for h in also if h not in hooks)], corpus=corpus, exclude_bos=not args.keep_bos, device=args.device,
                     hook_tokens={h: rows for h, (rows, _) in also.items() if h not in hooks})
    stores = harvest(cfg, models.get())
    for store in stores.values():
        print(f"activations: {store.path} ({store.n_tokens:,} tokens, d_in {store.d_in})")
    heldout_tokens = args.heldout_tokens if heldout_tokens is None else heldout_tokens
    if heldout_tokens:
        precision = next(iter(stores.values())).manifest["autocast"]  # the training store's: no second probe
        extra = {h: min(rows, heldout_tokens) for h, (_, rows) in also.items() if h in cfg.hook_tokens}
        heldout = harvest(replace(heldout_config(cfg, heldout_tokens, precision), hook_tokens=extra), models.get())
        for store in heldout.values():
            print(f"held-out activations: {store.path} ({store.n_tokens:,} tokens)")
    return stores


def heldout_config(cfg: HarvestConfig, n_tokens: int, autocast: str) -> HarvestConfig:
    """The harvest of the held-out store beside the store of `cfg`: the held-out split of the same
    corpus, up to `n_tokens` (fewer when the split holds fewer), in fp32, with `autocast`, every
    hook to `n_tokens`."""
    return replace(cfg, out_dir=str(Path(cfg.out_dir) / HELDOUT_FOLDER), corpus=replace(cfg.corpus, split="heldout"), n_tokens=n_tokens,
                   dtype="float32", autocast=autocast, up_to=True, hook_tokens={})


def add_harvest_arguments(p: argparse.ArgumentParser) -> None:
    """`saewb harvest`'s own flags: the corpus, the harvest's, and --repair."""
    add_corpus(p)
    add_arguments(p)
    add_repair_argument(p)


COMMANDS = {"harvest": Command("store activations of a model at hook points", add_harvest_arguments, run, sharded=True)}
