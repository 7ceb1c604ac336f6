"""`saewb train`: the SAE stage's command. Its flags come from `TrainConfig` and from the
config class of every registered architecture, with the fields' docstrings as help, so a new
architecture's fields become flags without editing this file; `analysis.cli` composes it
into `saewb run`.

    saewb train --architecture topk batchtopk --d-sae 4608 9216 --k 32 64   # 2 x 2 x 2 SAEs, one pass
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Callable

from activations.flags import add_flags, from_flags

from .config import ARCHITECTURES, SAEConfig, make_config
from .trainer import TrainConfig, train

RENAMED = {"n_tokens": "train_tokens"}  # `--n-tokens` is the harvest's
SET_BY_THE_SOURCE = set(SAEConfig.field_names()) - {"d_sae"}  # architecture, d_in, hook, model, context size
SET_HERE = {"out_dir", "saes", "device"}


def swept_fields() -> set[str]:
    """Fields that take several values on the command line: d_sae and every architecture's `sweep_fields`."""
    return {"d_sae", *(name for cls in ARCHITECTURES.values() for name in cls.sweep_fields)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="activation store folder (default: <out>/activations/<hook>)")
    p.add_argument("--architecture", nargs="+", default=None, choices=sorted(ARCHITECTURES),
                   help=f"one or several, trained side by side (default: {make_config().architecture})")
    p.add_argument("--on-the-fly", action="store_true", help="train from the model directly, no store (see README)")
    for cls in ARCHITECTURES.values():  # a field shared by several architectures becomes one flag
        add_flags(p, cls.config_class, skip=SET_BY_THE_SOURCE, many=swept_fields())
    add_flags(p, TrainConfig, skip=SET_HERE, rename=RENAMED)


def sae_configs(args: argparse.Namespace, d_in: int, context_len: int) -> list[SAEConfig]:
    """One SAE config per architecture x d_sae x the values of the fields that architecture
    sweeps; every other flag goes to every config, and each keeps only its own fields."""
    given = {name: getattr(args, name) for cls in ARCHITECTURES.values() for name in cls.config_class.field_names()
             if name not in SET_BY_THE_SOURCE and getattr(args, name, None) is not None}
    many = swept_fields()
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731  (a preset gives one value)
    configs = []
    for arch in args.architecture or [make_config().architecture]:
        sweeps = ("d_sae", *ARCHITECTURES[arch].sweep_fields)  # ordered: run names come out in a fixed order
        scalar = {name: (value[0] if name in many and isinstance(value, list) else value) for name, value in given.items()
                  if name not in sweeps}
        swept = {name: as_list(given[name]) for name in sweeps if name in given}
        for values in itertools.product(*swept.values()):
            configs.append(make_config(arch, d_in=d_in, hook_name=args.hook, model_name=args.model, context_size=context_len,
                                       **scalar, **dict(zip(swept, values))))
    return configs


def run(args: argparse.Namespace, model_of: Callable[[argparse.Namespace], object], out_dir: Path | None = None) -> list[Path]:
    """Train per `args` (from a store, or --on-the-fly from `model_of(args)`) into `out_dir`
    (default <out>/sae); the SAE folders."""
    from activations import ActivationStore, CorpusConfig

    if args.on_the_fly:
        from .on_the_fly import OnTheFlySource

        corpus = from_flags(CorpusConfig, args, source=args.corpus or "default")
        source = OnTheFlySource(model_of(args), args.hook, corpus=corpus)
        context_len = corpus.context_len
    else:
        source = ActivationStore(args.store or args.out / "activations" / args.hook)
        args.hook = source.hook_name
        context_len = int(source.manifest["context_len"])
        if not args.model_given:  # the SAEs record the model the store was harvested from
            args.model = source.model_name
    cfg = from_flags(TrainConfig, args, rename=RENAMED, out_dir=str(out_dir or args.out / "sae"),
                     saes=sae_configs(args, source.d_in, context_len), device=args.device)
    paths = train(cfg, source)
    for p in paths:
        print(f"SAE (SAE Lens format): {p}")
    return paths


__all__ = ["add_arguments", "run", "sae_configs", "swept_fields"]