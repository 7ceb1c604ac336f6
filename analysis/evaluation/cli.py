"""`saewb evaluate`: the evaluation stage's command. Metrics and an HTML report of each SAE on
held-out text; SAEs of one model measured on the same text share their passes (a stack, a
sweep), and that text is tokenised once per stage (`analysis.command.heldout_tokens`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from activations.corpus import CorpusConfig, contexts_for_tokens, describe, heldout_corpus, tokens_in_contexts
from activations.flags import Command, add_flags
from activations.model import HookedModel, ModelLoader
from activations.store import ActivationStore
from sae import load_sae
from sae.base import SAE

from ..command import add_corpus, heldout_activations, heldout_tokens, sae_paths, too_small
from .evaluate import EvalConfig, EvalResult, eval_contexts, evaluate_many, summary_line, write_results

EVAL_FLAGS = {"n_tokens": "eval_tokens", "n_ce_contexts": "ce_contexts"}
"""`EvalConfig` fields that are flags under another name (`--n-tokens` is the harvest's)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The evaluation's flags (`run` takes them too): --sae and the held-out sizes."""
    p.add_argument("--sae", nargs="+", default=None, help="SAE folder(s) (default: every SAE the train stage wrote). "
                   "Their eval.json and report.html go into each folder, or under <out>/eval/ when --out is given too")
    add_flags(p, EvalConfig, only=EVAL_FLAGS, rename=EVAL_FLAGS)


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """`saewb evaluate`'s own flags: the corpus and the evaluation's."""
    add_corpus(p)
    add_arguments(p)


class EvalGroup(NamedTuple):
    """SAEs evaluated together: one model, one held-out text, one size."""

    model: HookedModel
    cfg: EvalConfig
    tokens: np.ndarray
    """The held-out rows, int32 [n_contexts context_len]."""
    members: list[tuple[Path, SAE]]
    """(folder, SAE) of each, in the order given."""
    heldout: dict[str, ActivationStore]
    """{hook: the held-out store of its activations}, for the hooks that have one."""


def evaluate_saes(args: argparse.Namespace, models: ModelLoader, paths: list[Path], into: dict[Path, Path] | None = None) -> dict[str, EvalResult]:
    """Evaluate the SAEs in `paths` (eval.json and report.html into each folder, or into `into[path]`), print one line
    each, and the stack's report when they are the stack the train stage wrote; {folder: result}."""
    results = {}
    for group in _groups(args, models, paths).values():
        saes = [sae for _, sae in group.members]
        results_of_group = evaluate_many(saes, group.model, group.cfg, group.tokens, group.heldout)
        for (path, sae), result in zip(group.members, results_of_group, strict=True):
            json_path, html_path = write_results(result, (into or {}).get(path, path), path.parent / "metrics.jsonl",
                                                 title=f"{path.name} @ {sae.cfg.hook_name}, measured on {describe(group.cfg.corpus)}")
            print(f"{path.name}: {summary_line(result)}")
            print(f"  metrics: {json_path}\n  report:  {html_path}")
            results[str(path)] = result
    _print_stack_report(Path(args.out), paths)
    return results


def _groups(args: argparse.Namespace, models: ModelLoader, paths: list[Path]) -> dict[tuple, EvalGroup]:
    """The SAEs of `paths` grouped by model and held-out text, each text tokenised once."""
    groups: dict[tuple, EvalGroup] = {}
    texts: dict[tuple, np.ndarray] = {}  # (model, corpus, contexts wanted) -> the held-out rows
    for path in paths:
        sae = load_sae(path)
        if getattr(sae.cfg, "hook_name_out", None):
            raise SystemExit(f"{path} is a transcoder ({sae.cfg.hook_name} -> {sae.cfg.hook_name_out}): evaluate measures SAEs that "
                             "reconstruct their own hook. A transcoder's FVU is in its training metrics, and what it misses is in "
                             "its graphs' error nodes (saewb trace --basis transcoder)")
        model = models.get(sae.cfg.model_name)
        corpus = heldout_corpus(sae.training_data, args.corpus, sae.cfg.context_size)
        wanted = eval_contexts(EvalConfig(corpus=corpus, n_tokens=args.eval_tokens, n_ce_contexts=args.ce_contexts))
        text = (models.name(sae.cfg.model_name), repr(corpus), wanted)
        if text not in texts:
            texts[text] = heldout_tokens(corpus, model.tokenizer, wanted)
        cfg = _fitted_config(corpus, args.eval_tokens, args.ce_contexts, len(texts[text]))
        key = (*text, cfg.n_tokens, cfg.n_ce_contexts)
        if key not in groups:
            groups[key] = EvalGroup(model, cfg, texts[text][:eval_contexts(cfg)], [], {})
        groups[key].members.append((path, sae))
        store = heldout_activations(sae, corpus, contexts_for_tokens(cfg.n_tokens, corpus.context_len), f"evaluate {path.name}")
        if store is not None:
            groups[key].heldout.setdefault(sae.cfg.hook_name, store)
    return groups


def _fitted_config(corpus: CorpusConfig, n_tokens: int, n_ce: int, have: int) -> EvalConfig:
    """The evaluation's sizes scaled down to the `have` held-out contexts the corpus holds
    (rather than fail); an error below 2."""
    if have < 2:
        raise too_small(corpus, have, 2, "evaluation")
    if have < max(n_ce, contexts_for_tokens(n_tokens, corpus.context_len)):
        n_tokens, n_ce = min(n_tokens, tokens_in_contexts(have, corpus.context_len)), min(n_ce, have)
        print(f"{describe(corpus)} has only {have} contexts: evaluating on {n_tokens:,} tokens and {n_ce} CE contexts")
    return EvalConfig(corpus=corpus, n_tokens=n_tokens, n_ce_contexts=n_ce)


def _print_stack_report(out: Path, paths: list[Path]) -> None:
    """The per-layer table and report of the stack in `out`/sae, when `paths` are its SAEs."""
    manifest = out / "sae" / "stack.json"
    if len(paths) < 2 or not manifest.exists() or not {str(p) for p in paths} <= set(json.loads(manifest.read_text())["saes"].values()):
        return
    from ..circuits.stack import format_stack_table, stack_rows, write_stack_report

    print(format_stack_table(stack_rows(out / "sae")))
    print(f"  stack report: {write_stack_report(out / 'sae')[1]}")


def results_folders(paths: list[Path], out: Path) -> dict[Path, Path]:
    """{SAE folder: <out>/eval/<its name>} (a name met twice gets its place in `paths` appended): where `saewb evaluate
    --sae ... --out <out>` writes, so that an SAE's own folder (another run's, a downloaded one) is left as it was."""
    names = [p.name for p in paths]
    return {p: out / "eval" / (name if names.count(name) == 1 else f"{name}-{i + 1}") for i, (p, name) in enumerate(zip(paths, names))}


def run(args: argparse.Namespace, models: ModelLoader) -> dict[str, EvalResult]:
    """`saewb evaluate`: the SAEs of --sae, else every SAE the train stage wrote into --out. Results go into each SAE's
    folder, or under <out>/eval/ when both --sae and --out are given."""
    paths = sae_paths(args)
    into = results_folders(paths, Path(args.out)) if getattr(args, "sae", None) and getattr(args, "out_given", False) else None
    return evaluate_saes(args, models, paths, into)


COMMANDS = {"evaluate": Command("metrics + HTML report of trained SAEs on held-out text", add_evaluate_arguments, run)}

__all__ = ["COMMANDS", "EVAL_FLAGS", "EvalGroup", "add_arguments", "evaluate_saes", "run"]
