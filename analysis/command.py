"""What every `saewb` command shares: the command record each stage registers, the common
flags, the SAEs a run trained, and the held-out text of a stage, read once.

A stage's commands live in its own `cli.py` (`analysis/evaluation/cli.py` evaluate, ...), each
a `Command` in that module's `COMMANDS`; `analysis.cli` only collects them into the `saewb`
parser and dispatches, and its `run` composes the stages.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from activations.cli import add_corpus
from activations.flags import Command

if TYPE_CHECKING:
    import numpy as np

    from activations.corpus import CorpusConfig
    from activations.store import ActivationStore
    from sae.base import SAE


def add_common(p: argparse.ArgumentParser, presets: list[str]) -> None:
    """Flags every command takes."""
    from activations.model import DEFAULT_HOOK

    p.add_argument("--config", type=Path, help="JSON file of flag values (flags on the command line win)")
    p.add_argument("--preset", choices=presets, default="default", help="size preset (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    p.add_argument("--model", default=None, help="'smollm2' (embedded, the default), a local HF folder, or a hub name "
                   "(default: the model the SAE, store or stack records)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--hook", default=DEFAULT_HOOK, help="TransformerLens hook name (default: %(default)s)")


STEERING_FOLDER = "steering"
"""Where `saewb run` trains its steering SAE: <out>/steering (`analysis.cli.STEERING`)."""


def steering_sae(out: Path) -> Path | None:
    """The steering SAE `saewb run` trained into `out` (None when it trained none)."""
    summary = Path(out) / STEERING_FOLDER / "sae" / "train_summary.json"
    if not summary.exists():
        return None
    return Path(next(iter(json.loads(summary.read_text())["saes"].values())))


def trained_saes(out: Path) -> list[Path]:
    """The SAE folders the train stage wrote into `out`/sae (a stack's, when it trained one)."""
    summary = out / "sae" / "train_summary.json"
    if (out / "sae" / "stack.json").exists():
        summary = out / "sae" / "stack.json"
    if not summary.exists():
        raise SystemExit(f"no --sae given and no {summary}; train first or pass --sae")
    return [Path(p) for p in json.loads(summary.read_text())["saes"].values()]


def sae_paths(args: argparse.Namespace) -> list[Path]:
    """--sae when given, else every SAE the train stage wrote into --out. A folder of several
    (a stack's stack.json, `saewb transcoders`' transcoders.json) stands for all it lists."""
    given = getattr(args, "sae", None)
    if given:
        return [p for path in ([given] if isinstance(given, (str, Path)) else given) for p in member_saes(Path(path))]
    return trained_saes(Path(args.out))


def member_saes(path: Path) -> list[Path]:
    """[path] for an SAE folder; the SAEs a stack or transcoder folder lists (in layer order)."""
    from sae.stack_manifest import STACK_FILE
    from sae.transcoder import TRANSCODERS_FILE, transcoder_paths

    if (path / "cfg.json").exists() or not path.is_dir():
        return [path]  # an SAE, or what load_sae will name in its error
    if (path / STACK_FILE).exists():
        from .circuits.stack import stack_paths

        return stack_paths(path)
    if (path / TRANSCODERS_FILE).exists() or (path / "transcoders" / TRANSCODERS_FILE).exists():
        return list(transcoder_paths(path).values())
    return [path]


def too_small(corpus: CorpusConfig, have: int, need: int, what: str) -> SystemExit:
    from activations.corpus import describe

    return SystemExit(f"{describe(corpus)} has {have} contexts of {corpus.context_len} tokens; {what} needs at least {need}. "
                      "Use a larger corpus (files hold out every 20th document) or name another with --corpus")


def heldout_activations(sae: SAE, corpus: CorpusConfig, contexts: int, what: str, quiet: bool = False) -> ActivationStore | None:
    """The held-out store harvested beside the SAE's training store for `corpus` (None when there
    is none, e.g. another corpus or an SAE from another tool), with a note when it holds fewer
    than the `contexts` that `what` reads (unless `quiet`): the rest then run through the model."""
    from dataclasses import asdict

    from activations.store import heldout_store

    data = sae.training_data or {}
    store = heldout_store(data.get("store"), asdict(corpus), data.get("model"), sae.cfg.hook_name)
    if store is not None and store.n_contexts < contexts and not quiet:
        logging.getLogger(__name__).warning(f"{what}: the held-out store {store.path} holds {store.n_contexts} of the {contexts} contexts read; the other "
                                            f"{contexts - store.n_contexts} run through the model. To store them all, delete {store.path.parent} and rerun the "
                                            f"harvest with --heldout-tokens {contexts * (corpus.context_len - 1):,}")
    return store


def heldout_tokens(corpus: CorpusConfig, tokenizer, wanted: int) -> np.ndarray:
    """Up to `wanted` packed contexts of the held-out split, int32 [n_contexts context_len]:
    the stage tokenises its text once, here, and hands the rows to every step (fewer rows
    when the corpus holds fewer; none when it is empty)."""
    import numpy as np

    from activations import EmptyCorpusError, load_contexts

    try:
        return load_contexts(corpus, tokenizer, max_contexts=wanted)
    except EmptyCorpusError:
        return np.zeros((0, corpus.context_len), dtype=np.int32)


__all__ = ["STEERING_FOLDER", "Command", "add_common", "add_corpus", "heldout_activations", "heldout_tokens", "sae_paths", "steering_sae", "too_small", "trained_saes"]
