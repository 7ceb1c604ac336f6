"""`saewb harvest`: the activations stage's command. Its flags come from `HarvestConfig` (and
`CorpusConfig.context_len`), with the fields' docstrings as help; `analysis.cli` composes it
into `saewb run`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from .corpus import CorpusConfig
from .flags import add_flags, from_flags
from .harvest import HarvestConfig, harvest, repair_config
from .store import ActivationStore

RENAMED = {"autocast": "harvest_autocast"}  # `--autocast` is the trainer's


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, HarvestConfig, only=("hooks", "n_tokens", "batch_contexts", "shard_contexts", "dtype", "autocast"), rename=RENAMED,
              help_suffix={"hooks": "Default: --hook."})
    add_flags(p, CorpusConfig, only=("context_len",))
    p.add_argument("--keep-bos", action="store_true", help="also store position 0, the attention sink (HarvestConfig.exclude_bos=False)")


def add_repair_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repair", type=Path, default=None, metavar="STORE",
                   help="re-harvest the corrupt or missing shards of this store folder (<out>/activations/<hook>); "
                        "every other setting is read from its manifest")


def run(args: argparse.Namespace, model_of: Callable[[argparse.Namespace], object]) -> dict[str, ActivationStore]:
    """Harvest (or resume, or --repair) per `args`; `model_of(args)` gives the model to run."""
    if getattr(args, "repair", None):
        # same model, corpus, sizes and device as the original harvest; --model only says where
        # to load that model from (e.g. a moved folder), --device where to run
        cfg = repair_config(args.repair, **({"device": args.device} if args.device != "auto" else {}))
        args.device, args.model = cfg.device, args.model if args.model_given else cfg.model
        stores = harvest(cfg, model_of(args))
        for store in stores.values():
            print(f"repaired: {store.path} ({len(store.shards)} shards, {store.n_tokens:,} tokens)")
        return stores
    corpus = from_flags(CorpusConfig, args, source=args.corpus or "default")
    cfg = from_flags(HarvestConfig, args, rename=RENAMED, out_dir=str(args.out / "activations"), model=args.model,
                     hooks=args.hooks or [args.hook], corpus=corpus, exclude_bos=not args.keep_bos, device=args.device)
    stores = harvest(cfg, model_of(args))
    for store in stores.values():
        print(f"activations: {store.path} ({store.n_tokens:,} tokens, d_in {store.d_in})")
    return stores
