"""`saewb analyze` and `saewb monitor`: the features stage's commands.

analyze: per SAE, the feature atlas (one pass over held-out text) and labels scored on the
held-out text after the atlas's, written into <sae>/atlas (+ the dashboard under `run`). The
held-out text is tokenised once per SAE (`split_heldout`): the atlas reads the first rows,
the labels are scored on the rows after them.
monitor: which features fire on each token of a text, the features of a concept (--find),
or a concept heatmap over several texts (--concepts).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from activations.corpus import CorpusConfig, contexts_for_tokens, describe, heldout_corpus, tokens_in_contexts
from activations.flags import Command, add_flags
from activations.io import atomic_write_bytes, atomic_write_json
from activations.model import HookedModel, ModelLoader
from sae import load_sae
from sae.base import SAE

from ..command import add_corpus, heldout_activations, heldout_tokens, sae_paths, too_small
from ..encoding import first_position
from .atlas import Atlas, AtlasConfig, build_atlas, load_atlas
from .labels import LabelConfig, Labels, label_features, load_labels, save_labels, write_coverage_report
from .labels.score import MIN_SCORE_CONTEXTS
from .monitor import (
    CONCEPT_FEATURES,
    ConceptReadings,
    TokenFeatures,
    concept_features,
    concept_monitor_html,
    find_features,
    monitor,
    monitor_concepts,
    monitor_html,
    monitor_table,
)
from .neuronpedia import export_neuronpedia

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from activations.store import ActivationStore

ATLAS_FLAGS = {"n_tokens": "atlas_tokens"}
"""`AtlasConfig` fields that are flags under another name (`--n-tokens` is the harvest's)."""
LABEL_FLAGS = {"n_score_contexts": "label_contexts"}
"""`LabelConfig` fields that are flags under another name."""


# ---------------------------------------------------------------------------- flags
def add_analysis_sizes(p: argparse.ArgumentParser) -> None:
    """Held-out text of the atlas and of label scoring, and the feature namer."""
    add_flags(p, AtlasConfig, only=ATLAS_FLAGS, rename=ATLAS_FLAGS)
    add_flags(p, LabelConfig, only=LABEL_FLAGS, rename=LABEL_FLAGS)
    add_flags(p, LabelConfig, only=("namer",))


def add_llm(p: argparse.ArgumentParser) -> None:
    """The optional LLM explainer's flags."""
    p.add_argument("--llm-base-url", default=None, help="optional LLM explainer: an OpenAI-compatible endpoint, https:// or http:// to a "
                   "loopback host, e.g. http://localhost:8000/v1 (off by default); its key is read from $OPENAI_API_KEY, never saved")
    p.add_argument("--llm-model", default=None, help="model name for the explainer endpoint")
    p.add_argument("--llm-features", type=int, nargs="+", default=None, help="features to send to the explainer (default: all live ones)")
    p.add_argument("--allow-insecure-endpoint", action="store_true",
                   help="accept a plain http:// explainer endpoint on a non-loopback host (prompts and key sent unencrypted)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """`saewb run`'s analysis flags: the sizes, --skip-analysis and the explainer's."""
    add_analysis_sizes(p)
    p.add_argument("--skip-analysis", action="store_true", help="stop after evaluation (no atlas, labels or dashboard)")
    add_llm(p)


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    """`saewb analyze`'s own flags."""
    add_corpus(p)
    p.add_argument("--sae", nargs="+", default=None,
                   help="SAE folder(s) (default: every SAE the train stage wrote); results go to <sae>/atlas")
    add_analysis_sizes(p)
    p.add_argument("--neuronpedia", action="store_true", help="also export <sae>/atlas/neuronpedia.json")
    add_llm(p)


def add_monitor_arguments(p: argparse.ArgumentParser) -> None:
    """`saewb monitor`'s own flags."""
    p.add_argument("text", nargs="*", help="text to read (or --file)")
    p.add_argument("--sae", default=None, help="SAE folder (default: the first SAE the train stage wrote)")
    p.add_argument("--file", type=Path, default=None, help="read the text from this file")
    p.add_argument("--find", default=None, help="a concept (word or phrase): rank the features that fire most selectively on it")
    p.add_argument("--concepts", nargs="+", default=None, help="concepts (words) to watch: for each text, how strongly each concept's "
                   "features fire (table, <out>/monitor/concepts.json and a heatmap page); --file then holds one text per line "
                   "(.txt), a JSON list, or .jsonl with a 'text' field")
    p.add_argument("--concept-features", type=int, default=CONCEPT_FEATURES,
                   help="features per concept (the concept search's most selective)")
    p.add_argument("--top-k", type=int, default=5, help="features shown per token / concept results x2")
    p.add_argument("--html", type=Path, default=None, help="also write the token view (or the concept heatmap) as a standalone HTML page")


# ---------------------------------------------------------------------------- analyze
class Explainer(NamedTuple):
    """The optional LLM explainer's settings (no API key: it is read from the environment when called)."""

    llm: dict | None
    """{"base_url", "model", "features"}, or None: no explainer."""
    allow_insecure: bool
    """Whether a plain http:// endpoint on a non-loopback host is accepted."""


def explainer(args: argparse.Namespace) -> Explainer:
    """The explainer of the flags, its endpoint checked before any work (a SystemExit when refused)."""
    llm, insecure = None, bool(args.allow_insecure_endpoint)
    if args.llm_base_url:
        llm = {"base_url": args.llm_base_url, "model": args.llm_model or "default", "features": args.llm_features}
        try:
            LabelConfig(llm=llm, allow_insecure_endpoint=insecure)
        except ValueError as error:
            raise SystemExit(f"--llm-base-url: {error}") from None
    return Explainer(llm, insecure)


class HeldoutSplit(NamedTuple):
    """The held-out text of one analysis, tokenised once: atlas rows first, label rows after."""

    atlas_tokens: int
    """Tokens the atlas reads (`AtlasConfig.n_tokens`)."""
    atlas: np.ndarray
    """The atlas's rows, int32 [n_atlas_contexts context_len]."""
    labels: np.ndarray
    """The rows labels are scored on, the ones right after, int32 [n_label_contexts context_len]."""


def split_heldout(corpus: CorpusConfig, tokenizer: PreTrainedTokenizerBase, atlas_tokens: int, label_contexts: int) -> HeldoutSplit:
    """The held-out rows of the atlas and of label scoring, read once. The labels are scored on
    contexts after the atlas's, so a corpus too small for both is shared out (a quarter to the
    labels, at least `MIN_SCORE_CONTEXTS`) rather than eaten by the atlas."""
    atlas_contexts = contexts_for_tokens(atlas_tokens, corpus.context_len)
    rows = heldout_tokens(corpus, tokenizer, atlas_contexts + label_contexts)
    have = len(rows)
    if have < atlas_contexts + label_contexts:
        if have < 2 * MIN_SCORE_CONTEXTS:
            raise too_small(corpus, have, 2 * MIN_SCORE_CONTEXTS, "the atlas and label scoring")
        label_contexts = min(label_contexts, max(MIN_SCORE_CONTEXTS, have // 4))
        atlas_contexts = have - label_contexts
        atlas_tokens = tokens_in_contexts(atlas_contexts, corpus.context_len)
        print(f"{describe(corpus)} has only {have} contexts: the atlas reads the first {atlas_contexts} "
              f"({atlas_tokens:,} tokens), labels are scored on the other {label_contexts}")
    return HeldoutSplit(atlas_tokens, rows[:atlas_contexts], rows[atlas_contexts:atlas_contexts + label_contexts])


def analyze_saes(args: argparse.Namespace, models: ModelLoader, paths: list[Path], dashboard: bool = False) -> list[Path]:
    """Atlas + labels (+ dashboard) of each SAE in `paths`, written into <sae>/atlas (and
    <sae>/dashboard); the atlas folders. SAEs with no held-out store of their own share model
    passes (`shared_heldout`)."""
    llm = explainer(args)  # refuse a bad endpoint before any work
    done = []
    for group, stores in shared_heldout(args, models, paths):
        done += [analyze_one(args, models, path, llm, dashboard, stores.get(path)) for path in group]
    return done


SHARED_HELDOUT_BYTES = 1_500_000_000
"""Most bytes of held-out activations (fp32) one shared pass of `shared_heldout` stores on disk."""


def shared_heldout(args: argparse.Namespace, models: ModelLoader, paths: list[Path]) -> Iterator[tuple[list[Path], dict[Path, ActivationStore]]]:
    """The SAEs of `paths` in groups, in order, with {path: held-out store} for some. SAEs with no
    held-out store of their own (the 30 transcoders of `saewb transcoders`, which train from a
    stream) that read one model, corpus and first position go in groups of up to
    `SHARED_HELDOUT_BYTES` of activations: one harvest pass stores the held-out rows that the
    atlas and label scoring read at all the group's hooks, in a temporary folder beside the first
    SAE, removed once the group is analysed. Every other SAE is a group of its own, as before:
    its store, or the model, serves its reads."""
    def need(path: Path) -> tuple | None:
        sae = load_sae(path)
        corpus = heldout_corpus(sae.training_data, args.corpus, sae.cfg.context_size)
        rows = contexts_for_tokens(args.atlas_tokens, corpus.context_len) + args.label_contexts
        if heldout_activations(sae, corpus, rows, "analyze", quiet=True) is not None:
            return None
        first = first_position(sae)
        one_hook = tokens_in_contexts(rows, corpus.context_len, first) * sae.cfg.d_in * 4
        if one_hook > SHARED_HELDOUT_BYTES // 2:
            return None
        return (sae.cfg.model_name, corpus, first, tokens_in_contexts(rows, corpus.context_len, first)), sae.cfg.hook_name, one_hook

    pending: list[tuple[Path, tuple, str, int]] = []
    for path in [*paths, None]:
        needs = need(path) if path is not None else None
        key = needs[0] if needs else None
        full = needs is not None and sum(n for *_, n in pending) + needs[2] > SHARED_HELDOUT_BYTES
        if pending and (key != pending[0][1] or full):
            yield from _harvested_group(args, models, pending)
            pending = []
        if needs is not None:
            pending.append((path, key, needs[1], needs[2]))
        elif path is not None:
            yield [path], {}


def _harvested_group(args: argparse.Namespace, models: ModelLoader, pending: list) -> Iterator[tuple[list[Path], dict[Path, ActivationStore]]]:
    """`shared_heldout`'s group `pending` [(path, key, hook, bytes)] with its stores, harvested in one pass."""
    import shutil
    import tempfile

    from activations.harvest import HarvestConfig, harvest

    paths = [path for path, *_ in pending]
    if len(pending) == 1:
        yield paths, {}
        return
    (model_name, corpus, first, n_tokens), hooks = pending[0][1], list(dict.fromkeys(hook for _, _, hook, _ in pending))
    folder = Path(tempfile.mkdtemp(prefix="heldout_", dir=paths[0].parent))
    try:
        print(f"analyze: one held-out pass for {len(hooks)} hooks ({n_tokens:,} tokens each, {describe(corpus)}) into {folder}")
        stores = harvest(HarvestConfig(out_dir=str(folder), model=model_name, hooks=hooks, corpus=corpus, n_tokens=n_tokens,
                                       dtype="float32", exclude_bos=first == 1, device=args.device, up_to=True, compile="no"),
                         models.get(model_name))
        yield paths, {path: stores[hook] for path, _, hook, _ in pending}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def analyze_one(args: argparse.Namespace, models: ModelLoader, path: Path, llm: Explainer, dashboard: bool = False,
                heldout: ActivationStore | None = None) -> Path:
    """The atlas and labels of the SAE in `path` (and its dashboard); the atlas folder. `heldout`:
    a store of its held-out activations (default: the one harvested beside its training store)."""
    sae = load_sae(path)
    model = models.get(sae.cfg.model_name)
    corpus = heldout_corpus(sae.training_data, args.corpus, sae.cfg.context_size)
    split = split_heldout(corpus, model.tokenizer, args.atlas_tokens, args.label_contexts)
    started = time.perf_counter()
    heldout = heldout or heldout_activations(sae, corpus, len(split.atlas) + len(split.labels), "analyze")
    atlas = build_atlas(sae, model, AtlasConfig(n_tokens=split.atlas_tokens, corpus=corpus, device=args.device), sae_path=str(path),
                        tokens=split.atlas, heldout=heldout)
    atlas_dir = atlas.save(path / "atlas")
    s = atlas.summary()
    stored = atlas.meta.get("contexts_read_from_store", 0)
    source = f"read from {heldout.path}" if stored == atlas.n_contexts else "run through the model" if not stored else \
        f"{stored} contexts read from {heldout.path}"
    print(f"atlas: {atlas_dir} ({atlas.n_tokens:,} tokens of {describe(corpus)}, {source}, {time.perf_counter() - started:.0f} s): "
          f"{s['dead']} dead, {s['dense']} dense, ultralow-density mode: {_ultralow_text(s['ultralow'])}")
    started = time.perf_counter()
    label_cfg = LabelConfig(n_score_contexts=len(split.labels), llm=llm.llm, allow_insecure_endpoint=llm.allow_insecure,
                            **({"namer": args.namer} if args.namer else {}))
    labels = label_features(atlas, sae, model, label_cfg, tokens=split.labels, heldout=heldout)
    _print_labels(labels, save_labels(labels, atlas_dir / "labels.json"), write_coverage_report(labels, atlas_dir / "labels_coverage.html"),
                  time.perf_counter() - started)
    if getattr(args, "neuronpedia", False):  # `run` has no --neuronpedia
        print(f"neuronpedia: {export_neuronpedia(atlas, atlas_dir / 'neuronpedia.json', labels)}")
    if dashboard:
        from ..dashboard import build_dashboard

        print(f"dashboard: open {build_dashboard(atlas, path / 'dashboard', labels=labels).resolve().as_uri()}")
    return atlas_dir


def _print_labels(labels: Labels, labels_path: Path, coverage_path: Path, seconds: float) -> None:
    ls, n = labels.summary, labels.scored_on.n_contexts
    by_part = ls.positions_by_part or {}
    split = (f"{by_part['selection']:,} and {by_part['report']:,} positions" if by_part else f"{n} later contexts")
    print(f"labels: {labels_path} (chosen on every other document of {n} later contexts, reported on the rest: {split}; {seconds:.0f} s), "
          f"of {ls.live_features:,} live features:\n"
          f"  {ls.share_strong_f1_at_least_half:.1%} have a compact label with strong-firing F1 >= 0.5 "
          f"({ls.selection_share_strong:.1%} on the part it was chosen on; median {ls.median_best_strong_f1:.2f})\n"
          f"  {ls.share_of_live_with_f1_at_least_half:.1%} with all-firing F1 >= 0.5 "
          f"({ls.selection_share_all:.1%} on the selection part; median {ls.median_best_f1:.2f})\n"
          f"  apart, not counted: {ls.lookup_share_strong:.1%} have a lookup table (> 16 tokens) with strong F1 >= 0.5; "
          f"{ls.unexplained:,} features unexplained\n{_ball_text(ls)}  coverage: {coverage_path}")


def _ball_text(ls) -> str:
    """The headline were every semantic ball compact, and the ball sizes (summaries from before they were recorded: nothing)."""
    if ls.any_ball_share_strong is None:
        return ""
    balls = ls.semantic_ball_sizes or {}
    sizes = (f"; balls of the {balls['count']:,} semantic labels at strong F1 >= 0.5: median {balls['median']:.0f} tokens, "
             f"{balls['over_64']:,} over 64, {balls['over_200']:,} over 200") if balls.get("count") else ""
    return (f"  counting every semantic ball as compact (not only <= 64 tokens): {ls.any_ball_share_strong:.1%} strong, "
            f"{ls.any_ball_share_all:.1%} all-firing{sizes}\n")


def _ultralow_text(ultralow: dict | None) -> str:
    if not ultralow:
        return "none found"
    kind = "a cluster sharing a decoder direction" if ultralow.get("shares_direction") else "a tail, no shared decoder direction"
    return f"{ultralow['n_features']} features below 10^{ultralow['log10_density_below']:.2f} ({kind})"


def run_analyze(args: argparse.Namespace, models: ModelLoader) -> list[Path]:
    """`saewb analyze`: the SAEs of --sae, else every SAE the train stage wrote into --out."""
    return analyze_saes(args, models, sae_paths(args))


# ---------------------------------------------------------------------------- monitor
def run_monitor(args: argparse.Namespace, models: ModelLoader) -> list[TokenFeatures] | list[dict] | ConceptReadings:
    """`saewb monitor`: the token view of a text, the features of --find, or the --concepts heatmap."""
    sae_path = sae_paths(args)[0]
    sae = load_sae(sae_path)
    atlas_dir = sae_path / "atlas"
    try:  # labels of another SAE would be read at the wrong features: check the count first
        labels = load_labels(atlas_dir / "labels.json", sae.cfg.d_sae) if (atlas_dir / "labels.json").exists() else None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    model = models.get(sae.cfg.model_name)
    if args.concepts:
        return _monitor_concepts(args, model, sae, sae_path, labels)
    if args.find:
        return _find(args, model, sae, load_atlas(atlas_dir), labels)
    text = args.file.read_text() if args.file else " ".join(args.text)
    rows = monitor(text, model, sae, labels, top_k=args.top_k)
    max_activation = load_atlas(atlas_dir).max_activation if (atlas_dir / "atlas.json").exists() else None
    print(monitor_table(rows, max_activation))
    if args.html:
        atomic_write_bytes(args.html, monitor_html(rows, f"{sae_path.name}: feature monitor", max_activation).encode())
        print(f"page: {args.html.resolve().as_uri()}")
    return rows


def _find(args: argparse.Namespace, model: HookedModel, sae: SAE, atlas: Atlas, labels: Labels | None) -> list[dict]:
    """--find: the features that fire most selectively on the concept, as a table."""
    results = find_features(args.find, model, sae, atlas, labels, n=2 * args.top_k)
    print(f"features for {args.find!r} ({results[0]['occurrences']} occurrences, {results[0]['corpus_occurrences']} from held-out text):")
    print(f"{'feature':>8} {'score':>7} {'fires on query':>14} {'density':>9}  label (held-out F1)")
    for r in results:
        f1 = "" if r["label_f1"] is None else f" ({r['label_f1']:.2f})"
        print(f"{r['feature']:>8} {r['score']:>7.2f} {r['fire_rate_on_query']:>14.0%} {r['density']:>9.2e}  {r['label'][:70]}{f1}")
    return results


def _monitor_texts(args: argparse.Namespace) -> list[str]:
    """Texts to monitor: the positional text, or --file with one text per line / a JSON list / .jsonl records."""
    if args.file is None:
        return [" ".join(args.text)] if args.text else []
    raw = args.file.read_text(encoding="utf-8")
    if args.file.suffix == ".json":
        texts = json.loads(raw)
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise SystemExit(f"{args.file}: expected a JSON list of strings")
        return texts
    if args.file.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    return [line.strip() for line in raw.splitlines() if line.strip()]


def _concepts(args: argparse.Namespace, model: HookedModel, sae: SAE, atlas: Atlas, labels: Labels | None) -> dict[str, list[int]]:
    """The features of each of --concepts (printed with their labels)."""
    concepts = {}
    for concept in args.concepts:
        try:
            concepts[concept] = concept_features(concept, model, sae, atlas, n=args.concept_features)
        except ValueError as error:
            raise SystemExit(f"--concepts {concept!r}: {error}") from None
        if not concepts[concept]:
            raise SystemExit(f"--concepts {concept!r}: no live feature fires on it; try another word")
        shown = "; ".join(f"f{f} {labels.best(f).text[:50] if labels is not None and labels.best(f) else ''}" for f in concepts[concept])
        print(f"{concept}: {shown}")
    return concepts


def _monitor_concepts(args: argparse.Namespace, model: HookedModel, sae: SAE, sae_path: Path, labels: Labels | None) -> ConceptReadings:
    """--concepts: how strongly each concept's features fire on each text (table, JSON, heatmap page)."""
    texts = _monitor_texts(args)
    if not texts:
        raise SystemExit("saewb monitor --concepts needs texts: give one as arguments, or --file with one text per line")
    atlas = load_atlas(sae_path / "atlas")
    concepts = _concepts(args, model, sae, atlas, labels)
    try:
        readings = monitor_concepts(texts, model, sae, atlas, concepts)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(readings.table())
    out = Path(args.out) / "monitor"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "concepts.json", readings.to_dict())
    page = args.html or out / "concepts.html"
    atomic_write_bytes(page, concept_monitor_html(readings, f"{sae_path.name}: concept monitor").encode())
    print(f"  scores: {out / 'concepts.json'}\n  heatmap: {Path(page).resolve().as_uri()}")
    return readings


COMMANDS = {
    "analyze": Command("feature atlas (one pass over held-out text) + labels scored on other held-out text", add_analyze_arguments,
                       run_analyze),
    "monitor": Command("features firing on each token of a text, or the features of a concept (--find)", add_monitor_arguments,
                       run_monitor),
}

__all__ = ["ATLAS_FLAGS", "COMMANDS", "LABEL_FLAGS", "Explainer", "HeldoutSplit", "add_analysis_sizes", "add_llm", "add_run_arguments",
           "analyze_one", "analyze_saes", "explainer", "run_analyze", "run_monitor", "split_heldout"]
