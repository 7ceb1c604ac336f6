"""`saewb`: the workbench command line.

    saewb run [--preset smoke|default]     harvest -> train -> evaluate on the embedded default
    saewb harvest / train / evaluate       one stage each
Every flag can also come from a JSON config file (`--config run.json`, keys = flag names
with underscores); flags given on the command line win.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PRESETS = {
    # ~30 min on a 2-core CPU: 2M training tokens at layer 8, 8x expansion, k=32
    "default": dict(n_tokens=2_000_000, train_tokens=2_000_000, d_sae=4608, k=32, batch_size=4096, eval_tokens=131_072, ce_contexts=128),
    # ~2 min: checks the whole pipeline, numbers are not meaningful
    "smoke": dict(n_tokens=40_000, train_tokens=40_000, d_sae=1152, k=32, batch_size=1024, eval_tokens=8_192, ce_contexts=16),
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="JSON file of flag values (flags on the command line win)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="size preset (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local HF folder, or a hub name")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--hook", default="blocks.8.hook_resid_post", help="TransformerLens hook name")


def _add_harvest(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hooks", nargs="+", default=None, help="several hooks in one pass (default: --hook)")
    p.add_argument("--corpus", default="default", help="'default', a .txt/.jsonl/.parquet file or folder, or hf:<dataset>")
    p.add_argument("--n-tokens", type=int, default=None, help="activations to store per hook")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="storage dtype")
    p.add_argument("--keep-bos", action="store_true", help="also store position 0 (excluded by default)")
    p.add_argument("--batch-contexts", type=int, default=16, help="contexts per forward pass")
    p.add_argument("--harvest-autocast", choices=["none", "bf16"], default="bf16", help="model matmul precision while harvesting")


def _add_train(p: argparse.ArgumentParser) -> None:
    from sae import ARCHITECTURES

    p.add_argument("--store", default=None, help="activation store folder (default: <out>/activations/<hook>)")
    p.add_argument("--architecture", nargs="+", default=["topk"], choices=sorted(ARCHITECTURES), help="one or several: trained side by side")
    p.add_argument("--d-sae", type=int, nargs="+", default=None, help="latent counts (several = a sweep)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="TopK/BatchTopK k values (several = a sweep)")
    p.add_argument("--l1-coefficient", type=float, default=5.0)
    p.add_argument("--l0-coefficient", type=float, default=0.05)
    p.add_argument("--train-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="default: 8e-4 / sqrt(d_sae / 2^14)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    p.add_argument("--logger", choices=["jsonl", "wandb", "tensorboard"], default="jsonl")
    p.add_argument("--on-the-fly", action="store_true", help="train from the model directly, no store (see README)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", nargs="+", default=None, help="SAE folder(s) (default: every SAE the train stage wrote)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens for reconstruction metrics")
    p.add_argument("--ce-contexts", type=int, default=None, help="held-out contexts for CE metrics")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saewb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    specs = {
        "run": ("harvest, train and evaluate in one go", [_add_harvest, _add_train, _add_eval]),
        "harvest": ("store activations of a model at hook points", [_add_harvest]),
        "train": ("train SAEs on a store", [_add_train]),
        "evaluate": ("metrics + HTML report of trained SAEs on held-out text", [_add_eval]),
    }
    for name, (help_text, adders) in specs.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        for add in adders:
            add(p)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for key, value in json.loads(args.config.read_text()).items():
            if not hasattr(args, key):
                parser.error(f"{args.config}: unknown setting {key!r}")
            if key not in given:
                setattr(args, key, value)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    args.out = Path(args.out or f"runs/{args.preset}")
    return args


_LOADED_MODELS: dict[tuple[str, str], object] = {}


def _model(args):
    """Load the model once per process (`run` needs it for harvest and evaluation)."""
    from activations import load_model

    key = (args.model, args.device)
    if key not in _LOADED_MODELS:
        started = time.perf_counter()
        _LOADED_MODELS[key] = load_model(args.model, args.device)
        print(f"loaded {args.model} in {time.perf_counter() - started:.0f} s")
    return _LOADED_MODELS[key]


def cmd_harvest(args) -> dict:
    from activations import CorpusConfig, HarvestConfig, harvest

    cfg = HarvestConfig(
        out_dir=str(args.out / "activations"), model=args.model, hooks=args.hooks or [args.hook],
        corpus=CorpusConfig(source=args.corpus, context_len=args.context_len), n_tokens=args.n_tokens,
        batch_contexts=args.batch_contexts, dtype=args.dtype, exclude_bos=not args.keep_bos, autocast=args.harvest_autocast,
        device=args.device,
    )
    stores = harvest(cfg, _model(args))
    for hook, store in stores.items():
        print(f"activations: {store.path} ({store.n_tokens:,} tokens, d_in {store.d_in})")
    return stores


def _sae_configs(args, d_in: int):
    """One SAEConfig per (architecture, d_sae, k) in the sweep; k only varies for TopK-style SAEs."""
    from sae import SAEConfig

    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    configs = []
    for arch in args.architecture:
        for d_sae in as_list(args.d_sae):
            for k in as_list(args.k) if arch in ("topk", "batchtopk") else as_list(args.k)[:1]:
                configs.append(SAEConfig(
                    architecture=arch, d_in=d_in, d_sae=d_sae, k=k, l1_coefficient=args.l1_coefficient,
                    l0_coefficient=args.l0_coefficient, hook_name=args.hook, model_name=args.model,
                    context_size=getattr(args, "context_len", 128),
                ))
    return configs


def cmd_train(args):
    from activations import ActivationStore
    from sae.trainer import TrainConfig, train

    if args.on_the_fly:
        from sae.on_the_fly import OnTheFlySource

        source = OnTheFlySource(_model(args), args.hook, context_len=getattr(args, "context_len", 128))
    else:
        source = ActivationStore(args.store or args.out / "activations" / args.hook)
        args.hook = source.hook_name
    cfg = TrainConfig(
        out_dir=str(args.out / "sae"), saes=_sae_configs(args, source.d_in), n_tokens=args.train_tokens,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, autocast=args.autocast, logger=args.logger,
    )
    paths = train(cfg, source)
    for p in paths:
        print(f"SAE (SAE Lens format): {p}")
    return paths


def cmd_evaluate(args, sae_paths=None):
    from activations import CorpusConfig
    from sae import load_sae

    from .evaluate import EvalConfig, evaluate, summary_line, write_results

    if sae_paths is None and args.sae:
        sae_paths = [Path(p) for p in args.sae]
    if sae_paths is None:
        summary = args.out / "sae" / "train_summary.json"
        if not summary.exists():
            raise SystemExit(f"no --sae given and no {summary}; train first or pass --sae")
        sae_paths = [Path(p) for p in json.loads(summary.read_text())["saes"].values()]
    model = _model(args)
    results = {}
    for path in sae_paths:
        sae = load_sae(path)
        cfg = EvalConfig(corpus=CorpusConfig(split="heldout", context_len=sae.cfg.context_size), n_tokens=args.eval_tokens, n_ce_contexts=args.ce_contexts)
        result = evaluate(sae, model, cfg)
        json_path, html_path = write_results(result, path, path.parent / "metrics.jsonl", title=f"{path.name} @ {sae.cfg.hook_name}")
        print(f"{path.name}: {summary_line(result)}")
        print(f"  metrics: {json_path}\n  report:  {html_path}")
        results[str(path)] = result
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    started = time.perf_counter()
    if args.command == "harvest":
        cmd_harvest(args)
    elif args.command == "train":
        cmd_train(args)
    elif args.command == "evaluate":
        cmd_evaluate(args)
    else:
        cmd_harvest(args)
        paths = cmd_train(args)
        cmd_evaluate(args, paths)
        print(f"outputs in {args.out.resolve()} (total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
