"""`saewb`: the workbench command line. Each stage owns its commands (`<stage>/cli.py`, a
`COMMANDS` table of `activations.flags.Command`); this module only builds the parser from
them, fills presets and config files, and dispatches. `run` composes the stages.

    saewb run [--preset smoke|default|chain]   harvest -> train -> evaluate -> atlas, labels, dashboard
    saewb harvest / train / evaluate           one stage each
    saewb analyze [--sae DIR]                  feature atlas + scored labels (+ Neuronpedia JSON)
    saewb dashboard --atlas DIR                static HTML feature browser (opens offline)
    saewb monitor --sae DIR "some text"        which features fire on which tokens; --find CONCEPT;
                                               --concepts A B --file texts.txt: a concept heatmap
    saewb steer --sae DIR --features I ..      steered vs unsteered text + dose-response sweep figure
    saewb steer --sae DIR --concept WORD       concept steering: features, automatic dose, against prompting
    saewb trace --sae STACK --prompt P --target T   a feature graph of a prompt through a stack of SAEs
    saewb match --sae A B                      which features of two SAEs are the same (widths, seeds, layers)
Every flag can also come from a JSON config file (`--config run.json`, keys = flag names
with underscores); flags given on the command line win.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
from pathlib import Path

from activations import cli as harvest_cli
from activations.flags import Command
from activations.hooks import act_name
from activations.model import ModelLoader
from sae import cli as train_cli

from .circuits import cli as circuits_cli
from .command import STEERING_FOLDER, add_common
from .dashboard import cli as dashboard_cli
from .evaluation import cli as evaluation_cli
from .features import cli as features_cli
from .steering import cli as steering_cli

PRESETS = {
    # ~30 min on a 2-core CPU: 2M training tokens at layer 8, 8x expansion, k=32
    "default": dict(n_tokens=2_000_000, train_tokens=2_000_000, d_sae=4608, k=32, batch_size=4096, eval_tokens=131_072, ce_contexts=128,
                    atlas_tokens=1_000_000, label_contexts=2048, steering_hook=act_name("resid_post", 23)),
    # ~2 min: checks the whole pipeline, numbers are not meaningful
    "smoke": dict(n_tokens=40_000, train_tokens=40_000, d_sae=1152, k=32, batch_size=1024, eval_tokens=8_192, ce_contexts=16,
                  atlas_tokens=16_384, label_contexts=64),
    # ~45 min (4 epochs per SAE): a stack of SAEs for inference chains (`saewb trace`), one per hook, all harvested in one
    # pass. Every third layer's residual stream from 2 to 29: 3 blocks between neighbours, the default
    # layer 8 among them, and the last SAE on the final residual, so the target reads it directly.
    # Each SAE trains 4 epochs over its 500k tokens (488 steps): one epoch left them undertrained. One input scale per
    # SAE: `--input-scaling auto` lowers delta CE from layer 11 on and raises seed overlap, but its graphs were less
    # faithful (report set, 3 hooks: median 0.75 against 0.96; docs/results.md).
    "chain": dict(hooks=[act_name("resid_post", layer) for layer in range(2, 30, 3)], n_tokens=500_000, train_tokens=2_000_000,
                  d_sae=2304, k=32, batch_size=4096, eval_tokens=32_768, ce_contexts=32, atlas_tokens=65_536, label_contexts=256),
}


STEERING = dict(n_tokens=300_000, train_tokens=1_200_000, d_sae=2304, k=32, eval_tokens=32_768, ce_contexts=32, atlas_tokens=65_536,
                label_contexts=256)
"""The sizes of a run's steering SAE (`--steering-hook`), trained after the main one into
<out>/steering: SAEs steer a concept where the model keeps its output features, at layers
23-29 of SmolLM2's 30 (bench/steering_depth.py), while the main SAE's layer 8 mostly holds
input features. 300k tokens, 4 epochs, 2,304 latents: what steers. `run` harvests its hook in
the main harvest's forward passes (the first 300k tokens go on to layer 23), so it adds about a fifth to the run."""


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """`saewb run` takes every stage's flags."""
    harvest_cli.add_corpus(p)
    harvest_cli.add_arguments(p)
    train_cli.add_arguments(p)
    evaluation_cli.add_arguments(p)
    features_cli.add_run_arguments(p)
    p.add_argument("--steering-hook", default=None,
                   help="also train a steering SAE at this hook, after the main one, into <out>/steering (the default preset: "
                        "blocks.23.hook_resid_post; 'none': no steering SAE). `saewb steer --concept` finds it by itself")


def run(args: argparse.Namespace, models: ModelLoader) -> None:
    """harvest -> train -> evaluate -> atlas, labels and dashboard, sharing one model loader."""
    from activations import distributed
    from activations.store import hook_dir

    started = time.perf_counter()
    stages = [args]
    if args.steering_hook and args.steering_hook.lower() != "none":
        stages.append(steering_args(args))
    shared = {stage.hook: (stage.n_tokens, heldout_tokens_needed(stage)) for stage in stages[1:] if stage.hook not in (args.hooks or [args.hook])}
    for stage in stages:
        if stage is not args:
            print(f"--- the steering SAE at {stage.hook}: {stage.n_tokens:,} tokens into {stage.out}")
        if stage.hook in shared and stage is not args:  # harvested in the main stage's passes, beside its store
            stage.store = str(hook_dir(Path(args.out) / "activations", stage.hook))
        else:
            harvest_cli.run(stage, models, heldout_tokens=heldout_tokens_needed(stage), also=shared if stage is args else None)
        paths = train_cli.run(stage, models)
        if distributed.current().is_main:
            evaluation_cli.evaluate_saes(stage, models, paths)
            if not stage.skip_analysis:
                features_cli.analyze_saes(stage, models, paths, dashboard=True)
    print(f"outputs in {Path(args.out).resolve()} (total {time.perf_counter() - started:.0f} s)")


def steering_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags of the run's steering-SAE stage: `args` at `--steering-hook`, with the
    `STEERING` sizes (none above the main stage's: a smaller preset gets a smaller steering
    SAE), into <out>/steering."""
    stage = argparse.Namespace(**vars(args))
    stage.hook, stage.hooks, stage.heldout_tokens = args.steering_hook, None, None
    for key, value in STEERING.items():
        main = getattr(args, key, None)
        main = main[0] if isinstance(main, list) and len(main) == 1 else main  # a sweepable flag given once
        setattr(stage, key, min(value, main) if isinstance(main, int) else value)
    stage.out = Path(args.out) / STEERING_FOLDER
    return stage


def heldout_tokens_needed(args: argparse.Namespace) -> int:
    """The held-out tokens `run` harvests beside the training store (--heldout-tokens when given):
    what evaluation's reconstruction metrics, the atlas and label scoring read, so each held-out
    token goes through the model once."""
    from activations.corpus import CorpusConfig, contexts_for_tokens, tokens_in_contexts

    if args.heldout_tokens is not None:
        return args.heldout_tokens
    ctx_len = args.context_len or CorpusConfig.context_len
    contexts = contexts_for_tokens(args.eval_tokens, ctx_len)
    if not args.skip_analysis:
        contexts = max(contexts, contexts_for_tokens(args.atlas_tokens, ctx_len) + args.label_contexts)
    return tokens_in_contexts(contexts, ctx_len, 0 if args.keep_bos else 1)


COMMANDS: dict[str, Command] = {
    "run": Command("harvest, train, evaluate, analyze and build the dashboard in one go", add_run_arguments, run, sharded=True),
    **harvest_cli.COMMANDS, **train_cli.COMMANDS, **evaluation_cli.COMMANDS, **features_cli.COMMANDS,
    **dashboard_cli.COMMANDS, **steering_cli.COMMANDS, **circuits_cli.COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saewb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        add_common(p, sorted(PRESETS))
        command.add_arguments(p)
    return parser


def _flags_given(argv: list[str]) -> set[str]:
    return {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed flags: the command line, then --config's values for flags it left unset, then
    the preset's. `args.model` stays None unless given (each stage then reads the model its
    inputs record); `args.out` is a Path."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        given = _flags_given(argv if argv is not None else sys.argv[1:])
        for key, value in json.loads(args.config.read_text()).items():
            if not hasattr(args, key):
                parser.error(f"{args.config}: unknown setting {key!r}")
            if key not in given:
                setattr(args, key, value)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    args.out_given = args.out is not None
    args.out = Path(args.out or f"runs/{args.preset}")
    return args


class _PrintHandler(logging.Handler):
    """The library's log lines (model loads, resumed harvests), printed like the commands' own
    output, to whatever `sys.stdout` is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record))


def _show_library_logs() -> None:
    for name in ("activations", "sae", "analysis"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(isinstance(h, _PrintHandler) for h in logger.handlers):
            logger.addHandler(_PrintHandler())


def main(argv: list[str] | None = None):
    """Run one `saewb` command; its result (rank 0; None on other ranks)."""
    from activations import distributed

    args = parse(argv)
    command = COMMANDS[args.command]
    rank = distributed.current()  # under torchrun: harvest is sharded, training is DDP (activations/distributed.py)
    _show_library_logs()
    result = None
    with contextlib.nullcontext() if rank.is_main else contextlib.redirect_stdout(io.StringIO()):  # rank 0 prints
        if command.sharded or rank.is_main:  # the analysis commands are not sharded: rank 0 alone
            result = command.run(args, ModelLoader(args.model, args.device))
    distributed.shutdown()
    return result if rank.is_main else None


def entry() -> None:
    """The `saewb` console script: `main`, its result dropped (a console script passes what it returns to sys.exit,
    which prints a non-integer to stderr and exits with status 1)."""
    main()


if __name__ == "__main__":
    entry()
