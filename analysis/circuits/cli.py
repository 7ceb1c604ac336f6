"""`saewb trace` and `saewb match`: the circuits stage's commands. `analysis.cli` collects
`COMMANDS` into the `saewb` parser.

trace: the feature graph of a prompt through a stack of SAEs (or, `--basis transcoder`, through a skip transcoder per
MLP), written as JSON, Neuronpedia JSON and an offline HTML page into <stack>/traces/ (<transcoders>/traces/).
match: which features of two SAEs are the same (widths, seeds), or of neighbouring layers of a stack.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from activations.flags import add_flags, from_flags

from ..command import Command, add_corpus
from .config import GraphConfig, MatchConfig

if TYPE_CHECKING:
    from activations.model import HookedModel, ModelLoader

    from .feature_graph import FeatureGraph
    from .matching import LayerMatches, PairMatch
    from .stack import SAEStack
    from .targets import GraphTarget


# ---------------------------------------------------------------------------- trace
def add_trace_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", nargs="+", default=None, help="the SAE stack: a folder with stack.json (`saewb run --preset chain` writes "
                   "<out>/sae/stack.json) or SAE folders in layer order (default: <out>/sae)")
    p.add_argument("--basis", choices=("residual", "transcoder"), default="residual",
                   help="residual: nodes are the features of a stack of residual SAEs (--sae); transcoder: the features of a "
                        "skip transcoder per MLP (--transcoders) in the prompt's frozen local replacement model, exact edges")
    p.add_argument("--transcoders", default=None, help="with --basis transcoder: the folder `saewb transcoders` wrote "
                   "(default: <out>/transcoders)")
    p.add_argument("--prompt", required=True, help="the prompt (BOS is prepended)")
    p.add_argument("--target", default=None, help="the target token, e.g. ' Paris' (one token; mind the leading space); "
                   "the graph explains its logit less the mean logit")
    p.add_argument("--contrast", default=None, help="with --target: explain the logit difference target - contrast")
    p.add_argument("--target-feature", default=None, metavar="HOOK:ID", help="explain a feature of a later SAE of the stack instead, "
                   "e.g. blocks.20.hook_resid_post:1234")
    p.add_argument("--position", type=int, default=-1, help="position of the target (default: the last token)")
    p.add_argument("--name", default=None, help="file name of the outputs (default: from the prompt)")
    add_flags(p, GraphConfig, skip={"batch_rows", "budgets"})


class StackSource(NamedTuple):
    source: list[Path] | Path
    """What `load_stack` reads."""
    folder: Path
    """Where traces and the means cache go."""


def stack_source(args: argparse.Namespace) -> StackSource:
    """The stack of --sae (default <out>/sae): a stack folder, or SAE folders (outputs then in --out)."""
    sources = [Path(p) for p in (args.sae or [Path(args.out) / "sae"])]
    if len(sources) == 1 and sources[0].is_dir() and not (sources[0] / "cfg.json").exists():
        return StackSource(sources[0], sources[0])
    return StackSource(sources, Path(args.out))


def _load(source: list[Path] | Path) -> SAEStack:
    from .stack import load_stack

    try:
        return load_stack(source)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--sae: {error}") from None


def trace_target(args: argparse.Namespace, stack: SAEStack, model: HookedModel) -> GraphTarget:
    """--target-feature HOOK:ID, else --target (with --contrast)."""
    from .targets import feature_target, logit_target

    if args.target_feature:
        hook, _, feature = args.target_feature.rpartition(":")
        return feature_target(stack, hook, int(feature), args.position)
    if args.target:
        return logit_target(model.tokenizer, args.target, args.contrast, position=args.position)
    raise ValueError("name what to explain: --target TOKEN (optionally --contrast TOKEN) or --target-feature HOOK:ID")


def run_trace(args: argparse.Namespace, models: ModelLoader) -> FeatureGraph:
    """`saewb trace`: the graph, its files, and a summary with the strongest chain."""
    from .export import feature_cards, write_graph
    from .graph import stack_means, trace

    try:
        cfg = from_flags(GraphConfig, args)
    except ValueError as error:
        raise SystemExit(f"trace: {error}") from None
    if args.basis == "transcoder":
        model, graph, folder, model_name = _trace_on_transcoders(args, models, cfg)
    else:
        where = stack_source(args)
        stack = _load(where.source)
        model, folder, model_name = models.get(stack.model_name), where.folder, stack.model_name
        try:
            stack.check_model(model)
            target = trace_target(args, stack, model)
            started = time.perf_counter()
            means = stack_means(model, stack.to(next(model.parameters()).device), n_tokens=cfg.mean_tokens,
                                cache=where.folder / "means.safetensors")
            _print_means(means.n_tokens, time.perf_counter() - started, where.folder / "means.safetensors")
            graph = trace(model, stack, args.prompt, target, cfg, means=means)
        except ValueError as error:
            raise SystemExit(f"trace: {error}") from None
    cards = feature_cards(graph)
    name = args.name or (re.sub(r"[^A-Za-z0-9]+", "_", args.prompt).strip("_")[:48] or "graph")
    paths = write_graph(graph, folder / "traces" / name, model_name=model_name, cards=cards)
    print(graph.summary())
    if (note := top_token_note(model, args.prompt, graph.target)) is not None:
        print(note)
    print("faithfulness at smaller budgets: " + ", ".join(f"{graph.metric['nodes_top'][k]} features {graph.metric['faithfulness_' + k]:.1%}"
                                                        for k in graph.metric["nodes_top"]))
    print("strongest chain:\n  " + graph.chain_text())
    for path in paths:
        print(f"  {path}")
    return graph


def _print_means(n_tokens: int, seconds: float, cache: Path) -> None:
    """The held-out means' own time, apart from the model load and the trace."""
    print(f"held-out means over {n_tokens:,} tokens: {seconds:.1f} s (cache: {cache})")


def _trace_on_transcoders(args: argparse.Namespace, models: ModelLoader, cfg: GraphConfig) -> tuple[HookedModel, FeatureGraph, Path, str]:
    """(model, graph, output folder, model name) of a trace on the transcoder basis."""
    from .replacement import load_transcoders
    from .targets import logit_target
    from .transcoder_graph import trace_transcoders

    if args.target_feature:
        raise SystemExit("trace: --target-feature needs the residual basis; the transcoder basis explains --target (and --contrast)")
    if not args.target:
        raise SystemExit("trace: name what to explain: --target TOKEN (optionally --contrast TOKEN)")
    folder = Path(args.transcoders or Path(args.out) / "transcoders")
    try:
        transcoders = load_transcoders(folder)
        model = models.get(transcoders.model_name)
        target = logit_target(model.tokenizer, args.target, args.contrast, position=args.position)
        means = None
        if cfg.transcoder_ablation == "mean":
            from .means import transcoder_means
            started = time.perf_counter()
            means = transcoder_means(model, transcoders, n_tokens=cfg.mean_tokens, cache=folder / "means.safetensors")
            _print_means(means.n_tokens, time.perf_counter() - started, folder / "means.safetensors")
        graph = trace_transcoders(model, transcoders, args.prompt, target, cfg, means=means)
    except (FileNotFoundError, ValueError, NotImplementedError) as error:
        raise SystemExit(f"trace: {error}") from None
    return model, graph, folder, transcoders.model_name


def top_token_note(model: HookedModel, prompt: str, target: GraphTarget) -> str | None:
    """A note when a logit target's token is not the model's top next token at its position (the
    graph then explains a runner-up); None when it is, or for a feature target."""
    from .targets.logit import next_token_rank

    token = getattr(target, "token", None)
    if token is None:
        return None
    ranked = next_token_rank(model, prompt, token, target.position)
    if ranked.rank == 1:
        return None
    return (f"note: the target token is the model's number {ranked.rank} next token here, not its first ({ranked.top!r}); "
            "the graph explains a runner-up")


# ---------------------------------------------------------------------------- match
def add_match_arguments(p: argparse.ArgumentParser) -> None:
    add_corpus(p)
    p.add_argument("--sae", nargs="+", required=True, help="two SAE folders (same hook: widths or seeds), or one stack folder "
                   "(neighbouring layers)")
    add_flags(p, MatchConfig)


def run_match(args: argparse.Namespace, models: ModelLoader) -> PairMatch | LayerMatches:
    """`saewb match`: two SAEs by decoder cosine, or the neighbouring layers of one stack."""
    from sae import load_sae

    from .matching import layer_matches, live_features, match_saes

    cfg = from_flags(MatchConfig, args)
    if len(args.sae) == 2:  # two SAEs: same hook (widths, seeds) or any two
        a, b = (load_sae(p) for p in args.sae)
        result = match_saes(a, b, cfg.threshold, live_features(args.sae[0]), live_features(args.sae[1]))
        print(f"{args.sae[0]} vs {args.sae[1]}:\n  {result.summary()}")
        return result
    stack = _load(args.sae[0])
    result = layer_matches(models.get(stack.model_name), stack, threshold=cfg.threshold, n_tokens=cfg.coact_tokens, corpus=args.corpus)
    print(result.table())
    return result


COMMANDS: dict[str, Command] = {
    "trace": Command("a feature graph of a prompt through a stack of SAEs: JSON, Neuronpedia JSON and an offline HTML view",
                     add_trace_arguments, run_trace),
    "match": Command("match the features of two SAEs (widths, seeds) or of neighbouring layers of a stack", add_match_arguments, run_match),
}

__all__ = ["COMMANDS", "StackSource", "add_match_arguments", "add_trace_arguments", "run_match", "run_trace", "stack_source",
           "top_token_note", "trace_target"]
