"""`saewb train`: the SAE stage's command. Its flags come from `TrainConfig` and from the
config class of every registered architecture, with the fields' docstrings as help, so a new
architecture's fields become flags without editing this file; `analysis.cli` collects it
into the `saewb` parser and composes it into `saewb run`. After a harvest of several hooks
(`run --hooks A B`, the chain preset) it trains one SAE per hook, all from one stream of batches (the hooks' stores
read in step, or one pass of the model with --on-the-fly), listed in `<out>/sae/stack.json`.

    saewb train --architecture topk batchtopk --d-sae 4608 9216 --k 32 64   # 2 x 2 x 2 SAEs, one pass
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from activations.cli import add_corpus
from activations.flags import Command, add_flags, from_flags
from activations.model import ModelLoader

from .config import ARCHITECTURES, SAEConfig, default_architecture, make_config
from .stack_manifest import write_stack_manifest
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
                   help=f"one or several, trained side by side (default: {default_architecture()})")
    p.add_argument("--on-the-fly", action="store_true", help="train from the model directly, no store (see README)")
    for cls in ARCHITECTURES.values():  # a field shared by several architectures becomes one flag
        add_flags(p, cls.config_class, skip=SET_BY_THE_SOURCE, many=swept_fields())
    add_flags(p, TrainConfig, skip=SET_HERE, rename=RENAMED)


def sae_configs(args: argparse.Namespace, d_in: int, context_len: int, hook: str | None = None, model: str | None = None) -> list[SAEConfig]:
    """One SAE config per architecture x d_sae x the values of the fields that architecture
    sweeps; every other flag goes to every config, and each keeps only its own fields. `hook`
    and `model` are what the SAEs record (default: --hook and --model)."""
    hook, model = hook or args.hook, model or args.model
    given = {name: getattr(args, name) for cls in ARCHITECTURES.values() for name in cls.config_class.field_names()
             if name not in SET_BY_THE_SOURCE and getattr(args, name, None) is not None}
    many = swept_fields()
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731  (a preset gives one value)
    configs = []
    for arch in args.architecture or [default_architecture()]:
        sweeps = ("d_sae", *ARCHITECTURES[arch].sweep_fields)  # ordered: run names come out in a fixed order
        scalar = {name: (value[0] if name in many and isinstance(value, list) else value) for name, value in given.items()
                  if name not in sweeps}
        swept = {name: as_list(given[name]) for name in sweeps if name in given}
        for values in itertools.product(*swept.values()):
            configs.append(make_config(arch, d_in=d_in, hook_name=hook, model_name=model, context_size=context_len,
                                       **scalar, **dict(zip(swept, values))))
    return configs


def train_one(args: argparse.Namespace, models: ModelLoader, hook: str, out_dir: Path) -> list[Path]:
    """Train the SAEs of `args` on `hook` (from its store, or --on-the-fly from the model) into
    `out_dir`; the SAE folders."""
    from activations import ActivationStore, CorpusConfig

    if args.on_the_fly:
        from .on_the_fly import OnTheFlySource

        corpus = from_flags(CorpusConfig, args, source=args.corpus or "default")
        source, context_len, model = OnTheFlySource(models.get(), hook, corpus=corpus), corpus.context_len, models.name()
    else:
        source = ActivationStore(args.store or Path(args.out) / "activations" / hook)
        hook, context_len = source.hook_name, int(source.manifest["context_len"])
        model = models.name(source.model_name)  # the SAEs record the model the store was harvested from
    cfg = from_flags(TrainConfig, args, rename=RENAMED, out_dir=str(out_dir), saes=sae_configs(args, source.d_in, context_len, hook, model),
                     device=args.device)
    paths = train(cfg, source)
    for p in paths:
        print(f"SAE (SAE Lens format): {p}")
    return paths


def run(args: argparse.Namespace, models: ModelLoader) -> list[Path]:
    """Train on the store of --hook into <out>/sae; after a harvest of several hooks, one SAE per
    hook, each into <out>/sae/<hook>/, listed in <out>/sae/stack.json."""
    hooks = getattr(args, "hooks", None) or [args.hook]
    out = Path(args.out) / "sae"
    if len(hooks) == 1 or args.store:
        return train_one(args, models, hooks[0] if len(hooks) == 1 else args.hook, out)  # `--hooks X` alone means X
    paths = [p for trained in train_stack(args, models, hooks, out) for p in trained]
    print(f"SAE stack: {write_stack_manifest(out, paths)}")
    return paths


def train_stack(args: argparse.Namespace, models: ModelLoader, hooks: list[str], out: Path) -> list[list[Path]]:
    """The SAEs of `args` at every hook, each into <out>/<hook>/, all from one stream of batches (`sae.stream`): one
    model pass (--on-the-fly), or the hooks' stores of one harvest read in step. The SAE folders of each hook."""
    from activations import ActivationStore, CorpusConfig

    from .stream import StoreRows, column_views, train_together

    if args.on_the_fly:
        from .on_the_fly import OnTheFlySource

        corpus = from_flags(CorpusConfig, args, source=args.corpus or "default")
        source, context_len, model = OnTheFlySource(models.get(), hooks, corpus=corpus), corpus.context_len, models.name()
        views = column_views(source, source.widths, hooks)
    else:
        stores = [ActivationStore(Path(args.out) / "activations" / hook) for hook in hooks]
        source = StoreRows(stores)
        context_len, model = int(stores[0].manifest["context_len"]), models.name(stores[0].model_name)
        views = column_views(source, source.widths, hooks, parts=stores)
    configs = []
    for offset, (hook, view) in enumerate(zip(hooks, views)):
        # one seed per hook for the weights: SAEs of equal shape from one seed start from the same random decoder, which
        # would make features "persist" across layers by their initialisation alone (the batches follow the first seed)
        configs.append(from_flags(TrainConfig, args, rename=RENAMED, out_dir=str(out / hook), device=args.device,
                                  saes=sae_configs(args, view.d_in, context_len, hook, model), seed=(args.seed or 0) + offset))
    print(f"--- training {len(hooks)} hooks from one stream: {', '.join(hooks)}")
    trained = train_together(configs, views)
    for paths in trained:
        for p in paths:
            print(f"SAE (SAE Lens format): {p}")
    return trained


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """`saewb train`'s own flags: the corpus (--on-the-fly) and the training flags."""
    add_corpus(p)
    add_arguments(p)


def add_transcoder_arguments(p: argparse.ArgumentParser) -> None:
    """`saewb transcoders`' flags: the corpus, the blocks, the transcoder's own fields and the training flags."""
    from .transcoder import SkipTranscoderConfig

    add_corpus(p)
    p.add_argument("--layers", nargs="+", type=int, default=None,
                   help="blocks whose MLP gets a transcoder (default: every block, the full replacement model that "
                        "`saewb trace --basis transcoder` needs)")
    p.add_argument("--buffer-tokens", type=int, default=16_384,
                   help="rows of the in-memory shuffle buffer; each row holds every layer's MLP input and output (fp32)")
    add_flags(p, SkipTranscoderConfig, skip=SET_BY_THE_SOURCE | {"hook_name_out", "d_out"}, many=swept_fields())
    add_flags(p, TrainConfig, skip=SET_HERE, rename=RENAMED)


def run_transcoders(args: argparse.Namespace, models: ModelLoader) -> list[Path]:
    """Skip transcoders for the MLPs of --layers, all trained from one pass of the model over the corpus (`sae.stream`),
    into <out>/transcoders/layer_<L>/, listed in <out>/transcoders/transcoders.json."""
    from activations import CorpusConfig
    from activations.hooks import transcoder_hooks
    from activations.io import atomic_write_json
    from activations.model import n_layers

    from .on_the_fly import OnTheFlySource
    from .stream import column_views, train_together
    from .transcoder import TRANSCODERS_FILE, SkipTranscoderConfig

    model = models.get()
    layers = sorted(set(args.layers)) if args.layers else list(range(n_layers(model)))
    if any(not 0 <= layer < n_layers(model) for layer in layers):
        raise SystemExit(f"--layers must be blocks 0..{n_layers(model) - 1}, got {layers}")
    corpus = from_flags(CorpusConfig, args, source=args.corpus or "default")
    hooks = [hook for layer in layers for hook in transcoder_hooks(layer)]
    source = OnTheFlySource(model, hooks, corpus=corpus, buffer_tokens=args.buffer_tokens)
    widths = [source.widths[2 * i] + source.widths[2 * i + 1] for i in range(len(layers))]
    views = column_views(source, widths, [transcoder_hooks(layer)[0] for layer in layers])
    fields = {name: (value[0] if isinstance(value, list) else value) for name in SkipTranscoderConfig.field_names()
              if name not in SET_BY_THE_SOURCE | {"hook_name_out", "d_out"} and (value := getattr(args, name, None)) is not None}
    out = Path(args.out) / "transcoders"
    configs = []
    for i, layer in enumerate(layers):
        transcoder = SkipTranscoderConfig.for_layer(layer, d_in=source.widths[2 * i], d_out=source.widths[2 * i + 1],
                                                    model_name=models.name(), context_size=corpus.context_len, **fields)
        # one seed per layer for the weights (equal shapes from one seed would start from the same decoder); the stream's
        # batches follow the first layer's seed
        configs.append(from_flags(TrainConfig, args, rename=RENAMED, out_dir=str(out / f"layer_{layer}"), saes=[transcoder],
                                  device=args.device, seed=(args.seed or 0) + layer))
    trained = train_together(configs, views)
    paths = {layer: p[0] for layer, p in zip(layers, trained) if p}
    if paths:
        listed = {str(layer): str(Path(p).resolve().relative_to(out.resolve())) for layer, p in paths.items()}
        atomic_write_json(out / TRANSCODERS_FILE, {"transcoders": listed})  # relative: the folder can be moved
        print(f"transcoders: {out / TRANSCODERS_FILE}")
    return list(paths.values())


COMMANDS = {"train": Command("train SAEs on a store", add_train_arguments, run, sharded=True),
            "transcoders": Command("train a skip transcoder per MLP from one pass over the corpus", add_transcoder_arguments,
                                   run_transcoders, sharded=False)}

__all__ = ["COMMANDS", "add_arguments", "run", "sae_configs", "swept_fields", "train_one", "train_stack"]
