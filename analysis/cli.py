"""`saewb`: the workbench command line.

    saewb run [--preset smoke|default]     harvest -> train -> evaluate on the embedded default
    saewb harvest / train / evaluate       one stage each
    saewb analyze [--sae DIR]              feature atlas + scored labels (+ Neuronpedia JSON)
    saewb dashboard --atlas DIR            static HTML feature browser (opens offline)
    saewb monitor --sae DIR "some text"    which features fire on which tokens; --find CONCEPT;
                                           --concepts A B --file texts.txt: a concept heatmap
    saewb steer --sae DIR --features I ..  steered vs unsteered text + dose-response sweep figure
    saewb steer --sae DIR --concept WORD   concept steering: features, automatic dose, against prompting
    saewb trace --sae STACK --prompt P --target T   a feature graph of a prompt through a stack of SAEs
    saewb match --sae A B                  which features of two SAEs are the same (widths, seeds, layers)
Every flag can also come from a JSON config file (`--config run.json`, keys = flag names
with underscores); flags given on the command line win.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import operator
import sys
import time
from pathlib import Path

PRESETS = {
    # ~30 min on a 2-core CPU: 2M training tokens at layer 8, 8x expansion, k=32
    "default": dict(n_tokens=2_000_000, train_tokens=2_000_000, d_sae=4608, k=32, batch_size=4096, eval_tokens=131_072, ce_contexts=128,
                    atlas_tokens=1_000_000, label_contexts=2048),
    # ~2 min: checks the whole pipeline, numbers are not meaningful
    "smoke": dict(n_tokens=40_000, train_tokens=40_000, d_sae=1152, k=32, batch_size=1024, eval_tokens=8_192, ce_contexts=16,
                  atlas_tokens=16_384, label_contexts=64),
    # ~45 min: a stack of SAEs for inference chains (`saewb trace`), one per hook, all harvested in one
    # pass. Every third layer's residual stream from 2 to 29: 3 blocks between neighbours, the default
    # layer 8 among them, and the last SAE on the final residual, so the target reads it directly.
    "chain": dict(hooks=[f"blocks.{layer}.hook_resid_post" for layer in range(2, 30, 3)], n_tokens=500_000, train_tokens=500_000,
                  d_sae=2304, k=32, batch_size=4096, eval_tokens=32_768, ce_contexts=32, atlas_tokens=65_536, label_contexts=256),
}


# stage-config fields that are flags under another name (`--n-tokens` is the harvest's)
EVAL_FLAGS = {"n_tokens": "eval_tokens", "n_ce_contexts": "ce_contexts"}
ATLAS_FLAGS = {"n_tokens": "atlas_tokens"}
LABEL_FLAGS = {"n_score_contexts": "label_contexts"}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="JSON file of flag values (flags on the command line win)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="size preset (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    p.add_argument("--model", default=None, help="'smollm2' (embedded, the default), a local HF folder, or a hub name "
                   "(train: default the store's model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    from activations.model import DEFAULT_HOOK

    p.add_argument("--hook", default=DEFAULT_HOOK, help="TransformerLens hook name (default: %(default)s)")


def _add_corpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None, help="text: 'default' (embedded), a .txt/.jsonl/.parquet file or folder, or hf:<dataset>. "
                   "harvest/train/run read its train split (default: 'default'); evaluate/analyze/steer its held-out split "
                   "(default: the corpus the SAE was trained on, recorded in its cfg.json)")


def _add_harvest_flags(p: argparse.ArgumentParser) -> None:
    from activations import cli as harvest_cli

    harvest_cli.add_arguments(p)


def _add_repair_flag(p: argparse.ArgumentParser) -> None:
    from activations import cli as harvest_cli

    harvest_cli.add_repair_argument(p)


def _add_train(p: argparse.ArgumentParser) -> None:
    from sae import cli as train_cli

    train_cli.add_arguments(p)


def _add_eval(p: argparse.ArgumentParser) -> None:
    from activations.flags import add_flags

    from .evaluation.evaluate import EvalConfig

    p.add_argument("--sae", nargs="+", default=None, help="SAE folder(s) (default: every SAE the train stage wrote)")
    add_flags(p, EvalConfig, only=EVAL_FLAGS, rename=EVAL_FLAGS)


def _add_analysis_sizes(p: argparse.ArgumentParser) -> None:
    from activations.flags import add_flags

    from .features.atlas import AtlasConfig
    from .features.labels import LabelConfig

    add_flags(p, AtlasConfig, only=ATLAS_FLAGS, rename=ATLAS_FLAGS)
    add_flags(p, LabelConfig, only=LABEL_FLAGS, rename=LABEL_FLAGS)
    add_flags(p, LabelConfig, only=("namer",))


def _add_analyze_run(p: argparse.ArgumentParser) -> None:
    _add_analysis_sizes(p)
    p.add_argument("--skip-analysis", action="store_true", help="stop after evaluation (no atlas, labels or dashboard)")
    _add_llm(p)


def _add_llm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm-base-url", default=None, help="optional LLM explainer: an OpenAI-compatible endpoint, https:// or http:// to a "
                   "loopback host, e.g. http://localhost:8000/v1 (off by default); its key is read from $OPENAI_API_KEY, never saved")
    p.add_argument("--llm-model", default=None, help="model name for the explainer endpoint")
    p.add_argument("--llm-features", type=int, nargs="+", default=None, help="features to send to the explainer (default: all live ones)")
    p.add_argument("--allow-insecure-endpoint", action="store_true",
                   help="accept a plain http:// explainer endpoint on a non-loopback host (prompts and key sent unencrypted)")


def _add_analyze(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", nargs="+", default=None, help="SAE folder(s) (default: every SAE the train stage wrote); results go to <sae>/atlas")
    _add_analysis_sizes(p)
    p.add_argument("--neuronpedia", action="store_true", help="also export <sae>/atlas/neuronpedia.json")
    _add_llm(p)


def _add_monitor(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="*", help="text to read (or --file)")
    p.add_argument("--sae", default=None, help="SAE folder (default: the first SAE the train stage wrote)")
    p.add_argument("--file", type=Path, default=None, help="read the text from this file")
    p.add_argument("--find", default=None, help="a concept (word or phrase): rank the features that fire most selectively on it")
    p.add_argument("--concepts", nargs="+", default=None, help="concepts (words) to watch: for each text, how strongly each concept's "
                   "features fire (table, <out>/monitor/concepts.json and a heatmap page); --file then holds one text per line "
                   "(.txt), a JSON list, or .jsonl with a 'text' field")
    p.add_argument("--concept-features", type=int, default=5, help="features per concept (the concept search's most selective)")
    p.add_argument("--top-k", type=int, default=5, help="features shown per token / concept results x2")
    p.add_argument("--html", type=Path, default=None, help="also write the token view (or the concept heatmap) as a standalone HTML page")


def _add_dashboard(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atlas", type=Path, default=None, help="feature atlas folder (default: <out>/atlas)")
    p.add_argument("--labels", type=Path, default=None, help="labels.json of the same SAE (optional: label columns and scores)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--features", type=int, nargs="+", default=None, help="only these features (default: all)")
    which.add_argument("--top-n", type=int, default=None, help="only the N most frequently firing features")


def _add_steer(p: argparse.ArgumentParser) -> None:
    from activations.flags import add_flags

    from .steering import GenerationConfig, SweepConfig
    from .steering.concept import ConceptConfig

    p.add_argument("--sae", default=None, help="SAE folder (SAE Lens format; required); it names the hook to steer")
    p.add_argument("--features", type=int, nargs="+", default=None, help="feature ids, steered together (this or --concept)")
    p.add_argument("--concept", default=None, help="a concept (word) to steer toward: its features are found by what they read and "
                   "what they write, steered together at an automatically chosen dose, and compared with prompting")
    p.add_argument("--lexicon", nargs="+", default=None, help="--concept: words that show the concept in an answer (default: derived "
                   "from the features' labels and logit effects, and printed)")
    p.add_argument("--tuning-prompts", nargs="+", default=None, help="--concept: held-out prompts the features and the dose are chosen on "
                   "(default: analysis.steering.concept.TUNING_PROMPTS, none of them a report prompt)")
    add_flags(p, ConceptConfig, only=("n_features", "n_candidates", "doses", "budget"))
    add_flags(p, SweepConfig, only=("mode", "strengths", "unit", "threshold"))
    add_flags(p, GenerationConfig, only=("max_new_tokens", "temperature", "top_p", "seed", "chat"))
    p.add_argument("--prompts", nargs="+", default=None, help="prompts (default: the first 6 of analysis.steering.NEUTRAL_PROMPTS)")
    p.add_argument("--prompts-file", type=Path, default=None, help="a .json list of prompts, or a text file with one prompt per line")
    p.add_argument("--atlas", type=Path, default=None, help="feature atlas folder for max activations and labels (default: <sae>/atlas "
                   "when it exists, else max activations are measured on --max-contexts held-out contexts)")
    p.add_argument("--max-contexts", type=int, default=64, help="held-out contexts for max activations when no --atlas is given")
    p.add_argument("--kl-contexts", type=int, default=8, help="held-out contexts of neutral text for the KL side-effect measure")


def _add_trace(p: argparse.ArgumentParser) -> None:
    from activations.flags import add_flags

    from .circuits.graph import GraphConfig

    p.add_argument("--sae", nargs="+", default=None, help="the SAE stack: a folder with stack.json (`saewb run --preset chain` writes "
                   "<out>/sae/stack.json) or SAE folders in layer order (default: <out>/sae)")
    p.add_argument("--prompt", required=True, help="the prompt (BOS is prepended)")
    p.add_argument("--target", default=None, help="the target token, e.g. ' Paris' (one token; mind the leading space); "
                   "the graph explains its logit less the mean logit")
    p.add_argument("--contrast", default=None, help="with --target: explain the logit difference target - contrast")
    p.add_argument("--target-feature", default=None, metavar="HOOK:ID", help="explain a feature of a later SAE of the stack instead, "
                   "e.g. blocks.20.hook_resid_post:1234")
    p.add_argument("--position", type=int, default=-1, help="position of the target (default: the last token)")
    p.add_argument("--name", default=None, help="file name of the outputs (default: from the prompt)")
    add_flags(p, GraphConfig, skip={"batch_rows", "budgets"})


def _add_match(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", nargs="+", required=True, help="two SAE folders (same hook: widths or seeds), or one stack folder "
                   "(neighbouring layers)")
    p.add_argument("--threshold", type=float, default=0.7, help="decoder cosine at or above which two features count as the same")
    p.add_argument("--coact-tokens", type=int, default=16_384, help="held-out tokens for co-activation (layers of a stack)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saewb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    specs = {
        "run": ("harvest, train, evaluate, analyze and build the dashboard in one go", [_add_corpus, _add_harvest_flags, _add_train, _add_eval, _add_analyze_run]),
        "harvest": ("store activations of a model at hook points", [_add_corpus, _add_harvest_flags, _add_repair_flag]),
        "train": ("train SAEs on a store", [_add_corpus, _add_train]),
        "evaluate": ("metrics + HTML report of trained SAEs on held-out text", [_add_corpus, _add_eval]),
        "analyze": ("feature atlas (one pass over held-out text) + labels scored on other held-out text", [_add_corpus, _add_analyze]),
        "dashboard": ("static HTML bundle of a feature atlas, written to <out>/dashboard", [_add_dashboard]),
        "monitor": ("features firing on each token of a text, or the features of a concept (--find)", [_add_monitor]),
        "steer": ("steer generation with SAE features: side-by-side text and a dose-response figure in <out>/steer", [_add_corpus, _add_steer]),
        "trace": ("a feature graph of a prompt through a stack of SAEs: JSON, Neuronpedia JSON and an offline HTML view", [_add_trace]),
        "match": ("match the features of two SAEs (widths, seeds) or of neighbouring layers of a stack", [_add_corpus, _add_match]),
    }
    for name, (help_text, adders) in specs.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        for add in adders:
            add(p)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from activations.model import DEFAULT_MODEL

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
    args.model_given = args.model is not None  # train and --repair default to the store's model
    args.model = args.model or DEFAULT_MODEL
    return args


def _model(args):
    """The model of `args.model` on `args.device`, loaded once per command (`run` needs it for
    harvest, evaluation and analysis) through the command's own `ModelCache`."""
    if getattr(args, "models", None) is None:
        from activations.model import ModelCache

        args.models = ModelCache()
    return args.models.get(args.model, args.device)


def _model_of(args, sae):
    """The model `sae` reads: --model when given, else the one its cfg.json names."""
    if not args.model_given and sae.cfg.model_name:
        args.model = sae.cfg.model_name
    return _model(args)


def cmd_harvest(args) -> dict:
    from activations import cli as harvest_cli

    return harvest_cli.run(args, _model)


def cmd_train(args) -> list[Path]:
    """Train on the store of --hook; after a harvest of several hooks (`run --hooks A B`, the
    chain preset), one SAE per hook, each into <out>/sae/<hook>/, listed in <out>/sae/stack.json."""
    from sae import cli as train_cli

    hooks = getattr(args, "hooks", None) or [args.hook]
    if len(hooks) == 1 or getattr(args, "store", None):
        return train_cli.run(args, _model)
    from .circuits.stack import write_stack_manifest

    paths = []
    for offset, hook in enumerate(hooks):
        # one seed per hook: SAEs of equal shape from one seed start from the same random decoder,
        # which would make features "persist" across layers by their initialisation alone
        seed = (args.seed or 0) + offset
        print(f"--- training on {hook} (seed {seed})")
        paths += train_cli.run(argparse.Namespace(**{**vars(args), "hook": hook, "seed": seed}), _model, out_dir=args.out / "sae" / hook)
    print(f"SAE stack: {write_stack_manifest(args.out / 'sae', paths)}")
    return paths


def _heldout_contexts(corpus, tokenizer, wanted: int) -> int:
    """How many of `wanted` contexts the corpus' held-out split has (tokenises at most those)."""
    from activations import EmptyCorpusError, load_contexts

    try:
        return len(load_contexts(corpus, tokenizer, max_contexts=wanted))
    except EmptyCorpusError:
        return 0


def _too_small(corpus, have: int, need: int, what: str) -> SystemExit:
    from activations.corpus import describe

    return SystemExit(f"{describe(corpus)} has {have} contexts of {corpus.context_len} tokens; {what} needs at least {need}. "
                      "Use a larger corpus (files hold out every 20th document) or name another with --corpus")


def cmd_evaluate(args, sae_paths=None):
    from activations.corpus import describe, heldout_corpus
    from sae import load_sae

    from .evaluation.evaluate import EvalConfig, evaluate_many, summary_line, write_results

    if sae_paths is None and args.sae:
        sae_paths = [Path(p) for p in args.sae]
    if sae_paths is None:
        sae_paths = _trained_saes(args)
    # SAEs of one model measured on the same text share their passes (a stack, a sweep)
    groups: dict[tuple, list] = {}
    for path in sae_paths:
        sae = load_sae(path)
        model = _model_of(args, sae)
        corpus = heldout_corpus(sae.training_data, args.corpus, sae.cfg.context_size)
        n_tokens, n_ce = args.eval_tokens, args.ce_contexts
        wanted = max(n_ce, -(-n_tokens // (corpus.context_len - 1)))
        have = _heldout_contexts(corpus, model.tokenizer, wanted)
        if have < 2:
            raise _too_small(corpus, have, 2, "evaluation")
        if have < wanted:  # scale down to what the corpus holds rather than fail
            n_tokens, n_ce = min(n_tokens, have * (corpus.context_len - 1)), min(n_ce, have)
            print(f"{describe(corpus)} has only {have} contexts: evaluating on {n_tokens:,} tokens and {n_ce} CE contexts")
        cfg = EvalConfig(corpus=corpus, n_tokens=n_tokens, n_ce_contexts=n_ce)
        groups.setdefault((id(model), describe(corpus), n_tokens, n_ce), []).append((path, sae, model, cfg))
    results = {}
    for members in groups.values():
        _, _, model, cfg = members[0]
        for (path, sae, _, _), result in zip(members, evaluate_many([m[1] for m in members], model, cfg)):
            json_path, html_path = write_results(result, path, path.parent / "metrics.jsonl",
                                                 title=f"{path.name} @ {sae.cfg.hook_name}, measured on {describe(cfg.corpus)}")
            print(f"{path.name}: {summary_line(result)}")
            print(f"  metrics: {json_path}\n  report:  {html_path}")
            results[str(path)] = result
    if len(sae_paths) > 1 and (args.out / "sae" / "stack.json").exists() and \
            {str(p) for p in sae_paths} <= set(json.loads((args.out / "sae" / "stack.json").read_text())["saes"].values()):
        from .circuits.stack import format_stack_table, stack_rows, write_stack_report

        print(format_stack_table(stack_rows(args.out / "sae")))
        print(f"  stack report: {write_stack_report(args.out / 'sae')[1]}")
    return results


def _trained_saes(args) -> list[Path]:
    summary = args.out / "sae" / "train_summary.json"
    if (args.out / "sae" / "stack.json").exists():
        summary = args.out / "sae" / "stack.json"
    if not summary.exists():
        raise SystemExit(f"no --sae given and no {summary}; train first or pass --sae")
    return [Path(p) for p in json.loads(summary.read_text())["saes"].values()]


def cmd_analyze(args, sae_paths=None, dashboard: bool = False) -> list[Path]:
    """Atlas + labels (+ dashboard) of each SAE, written into <sae>/atlas (and <sae>/dashboard)."""
    from activations.corpus import describe, heldout_corpus
    from sae import load_sae

    from .features.atlas import AtlasConfig, build_atlas, export_neuronpedia
    from .features.labels import LabelConfig, label_features, save_labels, write_coverage_report

    paths = sae_paths or ([Path(p) for p in args.sae] if getattr(args, "sae", None) else _trained_saes(args))
    llm, insecure = None, bool(getattr(args, "allow_insecure_endpoint", False))
    if getattr(args, "llm_base_url", None):
        # no API key here: the explainer reads $OPENAI_API_KEY when it calls, so it is never saved
        llm = {"base_url": args.llm_base_url, "model": args.llm_model or "default", "features": args.llm_features}
        try:
            LabelConfig(llm=llm, allow_insecure_endpoint=insecure)  # refuse a bad endpoint before any work
        except ValueError as error:
            raise SystemExit(f"--llm-base-url: {error}") from None
    out_dirs = []
    for path in paths:
        sae = load_sae(path)
        model = _model_of(args, sae)
        started = time.perf_counter()
        corpus = heldout_corpus(sae.training_data, args.corpus, sae.cfg.context_size)
        atlas_tokens, label_contexts = _split_heldout(corpus, model.tokenizer, args.atlas_tokens, args.label_contexts)
        atlas_cfg = AtlasConfig(n_tokens=atlas_tokens, corpus=corpus, device=args.device)
        atlas = build_atlas(sae, model, atlas_cfg, sae_path=str(path))
        atlas_dir = atlas.save(path / "atlas")
        s = atlas.summary()
        print(f"atlas: {atlas_dir} ({atlas.n_tokens:,} tokens of {describe(corpus)}, {time.perf_counter() - started:.0f} s): "
              f"{s['dead']} dead, {s['dense']} dense, "
              f"ultralow-density mode: {_ultralow_text(s['ultralow'])}")
        started = time.perf_counter()
        label_cfg = LabelConfig(n_score_contexts=label_contexts, llm=llm, allow_insecure_endpoint=insecure,
                                **({"namer": args.namer} if getattr(args, "namer", None) else {}))
        labels = label_features(atlas, sae, model, label_cfg)
        labels_path = save_labels(labels, atlas_dir / "labels.json")
        ls = labels.summary
        coverage_path = write_coverage_report(labels, atlas_dir / "labels_coverage.html")
        print(f"labels: {labels_path} (chosen on {labels.scored_on.n_contexts // 2} later contexts, reported on the other "
              f"{labels.scored_on.n_contexts - labels.scored_on.n_contexts // 2}, {time.perf_counter() - started:.0f} s), "
              f"of {ls.live_features:,} live features:\n"
              f"  {ls.share_strong_f1_at_least_half:.1%} have a compact label with strong-firing F1 >= 0.5 "
              f"({ls.selection_share_strong:.1%} on the part it was chosen on; median {ls.median_best_strong_f1:.2f})\n"
              f"  {ls.share_of_live_with_f1_at_least_half:.1%} with all-firing F1 >= 0.5 "
              f"({ls.selection_share_all:.1%} on the selection part; median {ls.median_best_f1:.2f})\n"
              f"  apart, not counted: {ls.lookup_share_strong:.1%} have a lookup table (> 16 tokens) with strong F1 >= 0.5; "
              f"{ls.unexplained:,} features unexplained\n  coverage: {coverage_path}")
        if getattr(args, "neuronpedia", False):
            print(f"neuronpedia: {export_neuronpedia(atlas, atlas_dir / 'neuronpedia.json', labels)}")
        if dashboard:
            from .dashboard import build_dashboard

            index = build_dashboard(atlas, path / "dashboard", labels=labels)
            print(f"dashboard: open {index.resolve().as_uri()}")
        out_dirs.append(atlas_dir)
    return out_dirs


def _split_heldout(corpus, tokenizer, atlas_tokens: int, label_contexts: int) -> tuple[int, int]:
    """(atlas tokens, label contexts) that fit the held-out split: the labels are scored on
    contexts after the atlas's, so a small corpus is shared out rather than eaten by the atlas."""
    from activations.corpus import describe

    body = corpus.context_len - 1
    atlas_contexts = -(-atlas_tokens // body)
    have = _heldout_contexts(corpus, tokenizer, atlas_contexts + label_contexts)
    if have >= atlas_contexts + label_contexts:
        return atlas_tokens, label_contexts
    minimum = 16  # the fewest contexts label scoring accepts
    if have < 2 * minimum:
        raise _too_small(corpus, have, 2 * minimum, "the atlas and label scoring")
    label_contexts = min(label_contexts, max(minimum, have // 4))
    atlas_contexts = have - label_contexts
    print(f"{describe(corpus)} has only {have} contexts: the atlas reads the first {atlas_contexts} "
          f"({atlas_contexts * body:,} tokens), labels are scored on the other {label_contexts}")
    return atlas_contexts * body, label_contexts


def _ultralow_text(ultralow: dict | None) -> str:
    if not ultralow:
        return "none found"
    kind = "a cluster sharing a decoder direction" if ultralow.get("shares_direction") else "a tail, no shared decoder direction"
    return f"{ultralow['n_features']} features below 10^{ultralow['log10_density_below']:.2f} ({kind})"


def cmd_monitor(args) -> None:
    from sae import load_sae

    from .features.labels import load_labels
    from .features.monitor import find_features, monitor, monitor_html, monitor_table

    sae_path = Path(args.sae) if args.sae else _trained_saes(args)[0]
    sae = load_sae(sae_path)
    atlas_dir = sae_path / "atlas"
    try:  # labels of another SAE would be read at the wrong features: check the count first
        labels = load_labels(atlas_dir / "labels.json", sae.cfg.d_sae) if (atlas_dir / "labels.json").exists() else None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    model = _model_of(args, sae)
    if args.concepts:
        return _monitor_concepts(args, model, sae, sae_path, labels)
    if args.find:
        from .features.atlas import load_atlas

        atlas = load_atlas(atlas_dir)
        results = find_features(args.find, model, sae, atlas, labels, n=2 * args.top_k)
        print(f"features for {args.find!r} ({results[0]['occurrences']} occurrences, {results[0]['corpus_occurrences']} from held-out text):")
        print(f"{'feature':>8} {'score':>7} {'fires on query':>14} {'density':>9}  label (held-out F1)")
        for r in results:
            f1 = "" if r["label_f1"] is None else f" ({r['label_f1']:.2f})"
            print(f"{r['feature']:>8} {r['score']:>7.2f} {r['fire_rate_on_query']:>14.0%} {r['density']:>9.2e}  {r['label'][:70]}{f1}")
        return
    text = args.file.read_text() if args.file else " ".join(args.text)
    rows = monitor(text, model, sae, labels, top_k=args.top_k)
    max_activation = None
    if (atlas_dir / "atlas.json").exists():
        from .features.atlas import load_atlas

        max_activation = load_atlas(atlas_dir).max_activation
    print(monitor_table(rows, max_activation))
    if args.html:
        from activations.io import atomic_write_bytes

        atomic_write_bytes(args.html, monitor_html(rows, f"{sae_path.name}: feature monitor", max_activation).encode())
        print(f"page: {args.html.resolve().as_uri()}")


def _monitor_texts(args) -> list[str]:
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


def _monitor_concepts(args, model, sae, sae_path: Path, labels) -> None:
    from activations.io import atomic_write_bytes, atomic_write_json

    from .features.atlas import load_atlas
    from .features.monitor import concept_features, concept_monitor_html, monitor_concepts

    texts = _monitor_texts(args)
    if not texts:
        raise SystemExit("saewb monitor --concepts needs texts: give one as arguments, or --file with one text per line")
    atlas = load_atlas(sae_path / "atlas")
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


def cmd_dashboard(args) -> Path:
    from .features.atlas import load_atlas
    from .dashboard import build_dashboard

    atlas = load_atlas(args.atlas or args.out / "atlas")
    from .features.labels import load_labels

    try:
        labels = load_labels(args.labels, atlas.d_sae) if args.labels else None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    features = args.features
    if args.top_n is not None:
        features = atlas.density.argsort(descending=True, stable=True)[:args.top_n].tolist()
    started = time.perf_counter()
    index = build_dashboard(atlas, args.out / "dashboard", labels=labels, features=features)
    n_pages = atlas.d_sae if features is None else len(set(features))
    print(f"dashboard: {n_pages:,} feature pages in {time.perf_counter() - started:.0f} s\n  open {index.resolve().as_uri()}")
    return index


def _steer_prompts(args) -> list[str]:
    from .steering import NEUTRAL_PROMPTS

    if args.prompts_file is not None:
        text = Path(args.prompts_file).read_text()
        prompts = json.loads(text) if Path(args.prompts_file).suffix == ".json" else [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise SystemExit(f"{args.prompts_file}: expected a JSON list of prompt strings")
        return prompts
    return list(args.prompts or NEUTRAL_PROMPTS[:6])


def _label_predicates(labels_path: Path, features: list[int], tokenizer, d_sae: int | None = None):
    """The OR of the features' best-label predicates (None without labels): "the steered
    text says what the label says", a concept score independent of the feature's activation."""
    if not labels_path.exists():
        return None
    from .features.labels import label_predicate, load_labels

    try:
        labels = load_labels(labels_path, d_sae)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    chosen = [labels.best(f) for f in features]
    predicates = [label_predicate(label, tokenizer) for label in chosen if label is not None]
    for f, label in zip(features, chosen):
        print(f"f{f} label: {label.text if label else '(dead feature)'}" + (f"  (held-out F1 {label.scores.f1:.2f})" if label and label.scores else ""))
    if not predicates:
        return None
    return lambda tokens: functools.reduce(operator.or_, (p(tokens) for p in predicates))


def cmd_steer(args):
    import torch

    from activations import load_contexts
    from activations.flags import from_flags
    from activations.corpus import describe, heldout_corpus
    from sae import load_sae

    from .steering import GenerationConfig, SideBySide, SweepConfig, check_features, feature_stats, format_side_by_side, sweep, write_sweep

    if not args.sae or not (args.features or args.concept):
        raise SystemExit("saewb steer needs --sae and --features or --concept (as flags or in --config)")
    if args.features and args.concept:
        raise SystemExit("saewb steer takes --features or --concept, not both")
    if args.concept:
        return _steer_concept(args)
    sae = load_sae(args.sae)
    try:
        args.features = check_features(args.features, sae.cfg.d_sae)  # before loading the model or any text
    except ValueError as error:
        raise SystemExit(f"--features: {error}") from None
    prompts = _steer_prompts(args)
    cfg = from_flags(SweepConfig, args, features=args.features, n_examples=len(prompts), generation=from_flags(GenerationConfig, args))
    if cfg.mode == "ablate":
        cfg.strengths = [0.0]  # ablation has no strength
    model = _model_of(args, sae)
    n_contexts = max(args.kl_contexts, args.max_contexts if cfg.unit == "max" and args.atlas is None else 0)
    corpus = heldout_corpus(sae.training_data, args.corpus, sae.cfg.context_size)
    heldout = torch.from_numpy(load_contexts(corpus, model.tokenizer, max_contexts=n_contexts)).long()
    if len(heldout) < n_contexts:
        print(f"{describe(corpus)} has only {len(heldout)} contexts: KL and max activations use those")
    atlas_dir = args.atlas or (Path(args.sae) / "atlas" if (Path(args.sae) / "atlas" / "atlas.json").exists() else None)
    max_activation, predicate = None, None
    if atlas_dir is not None:
        from .features.atlas import load_atlas

        atlas = load_atlas(atlas_dir)
        if atlas.d_sae != sae.cfg.d_sae:
            raise SystemExit(f"{atlas_dir} is the atlas of a {atlas.d_sae}-feature SAE, not of {args.sae} ({sae.cfg.d_sae} features); "
                             "pass the right --atlas or rebuild it with `saewb analyze`")
        for f in args.features:
            atlas.check_feature(f)
        max_activation = atlas.max_activation
        predicate = _label_predicates(atlas_dir / "labels.json", args.features, model.tokenizer, sae.cfg.d_sae)
    elif cfg.unit == "max" and cfg.mode != "ablate":
        max_activation = feature_stats(sae, model, heldout[:args.max_contexts]).max_activation
    if max_activation is not None:
        print("max activations: " + ", ".join(f"f{f} {float(max_activation[f]):.3g}" for f in args.features))
    result = sweep(model, sae, prompts, heldout[:args.kl_contexts], cfg, max_activation, predicate, neutral_text=describe(corpus))
    base = result.points[0]
    for point in result.points[1:]:
        strength = "" if cfg.mode == "ablate" else f" = {point.strength:g}" + (" x max activation" if cfg.unit == "max" else "")
        print(f"\n{cfg.mode} features {args.features}{strength}")
        print(format_side_by_side([SideBySide(p, b, s) for p, b, s in zip(prompts, base.examples, point.examples)]))
    print(f"\n{'condition':<16} {'concept act':>11} {'concept freq':>12} {'label freq':>10} {'perplexity':>10} {'repetition':>10} {'KL':>8}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for p in result.points:
        name = p.series if p.strength is None or cfg.mode == "ablate" else f"{p.series} {p.strength:g}"
        print(f"{name:<16} {fmt(p.concept_activation, '11.3f')} {p.concept_frequency:>12.2f} {fmt(p.predicate_frequency, '10.2f')} "
              f"{fmt(p.perplexity, '10.2f')} {fmt(p.repetition, '10.3f')} {fmt(p.kl, '8.4f')}")
    print(f"  KL on {len(heldout[:args.kl_contexts])} contexts of {describe(corpus)}")
    json_path, html_path = write_sweep(result, args.out / "steer", title=f"Steering {Path(args.sae).name} features {args.features} ({cfg.mode})")
    print(f"  sweep:  {json_path}\n  figure: {html_path}")
    return result


def _steer_concept(args):
    from dataclasses import asdict

    from activations.flags import from_flags
    from activations.io import atomic_write_json
    from sae import load_sae

    from .features.atlas import load_atlas
    from .features.labels import load_labels
    from .steering import GenerationConfig, SideBySide, format_side_by_side
    from .steering.concept import ConceptConfig, Lexicon, choose_dose, compare_concept, search_concept

    sae = load_sae(args.sae)
    atlas_dir = args.atlas or Path(args.sae) / "atlas"
    if not (Path(atlas_dir) / "atlas.json").exists():
        raise SystemExit(f"--concept needs the SAE's feature atlas ({atlas_dir}); build it with `saewb analyze --sae {args.sae}`")
    atlas = load_atlas(atlas_dir)
    if atlas.d_sae != sae.cfg.d_sae:
        raise SystemExit(f"{atlas_dir} is the atlas of a {atlas.d_sae}-feature SAE, not of {args.sae} ({sae.cfg.d_sae} features)")
    try:
        labels = load_labels(Path(atlas_dir) / "labels.json", sae.cfg.d_sae) if (Path(atlas_dir) / "labels.json").exists() else None
        lexicon = Lexicon(args.concept, tuple(args.lexicon)) if args.lexicon else None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    generation = from_flags(GenerationConfig, args, chat=True if args.chat is None else args.chat)
    cfg = from_flags(ConceptConfig, args, generation=generation)
    model = _model_of(args, sae)
    try:
        search = search_concept(args.concept, model, sae, atlas, labels, lexicon, prompts=args.tuning_prompts, cfg=cfg)
    except ValueError as error:
        raise SystemExit(f"--concept {args.concept!r}: {error}") from None
    print(f"lexicon ({search.lexicon.source}): {', '.join(search.lexicon.words)}")
    print(f"{'feature':>8} {'input':>6} {'contrast':>8} {'gain':>6} {'output':>7} {'weight':>6}  label")
    for c in search.ranked[:10]:
        print(f"{c.feature:>8} {c.input_score:>6.2f} {c.contrast:>8.3f} {c.concept_gain:>+6.2f} {c.output_score:>+7.4f} {c.weight:>6.2f}  {c.label[:60]}")
    if not search.steered:
        raise SystemExit(f"no feature raises the lexicon's tokens for {args.concept!r}; try other --lexicon words")
    dose = choose_dose(model, sae, search, atlas.max_activation, prompts=args.tuning_prompts, cfg=cfg)
    print("dose search: " + ", ".join(f"{p.dose:.2g}{'' if p.within_budget else ' (over)'}" for p in dose.points) + f" -> {dose.dose}")
    prompts = _steer_prompts(args)
    points = compare_concept(model, sae, search, prompts, atlas.max_activation, dose.dose, cfg)
    rows = {p.condition: p for p in points}
    if "steering" in rows:
        print(format_side_by_side([SideBySide(q, b, s) for q, b, s in zip(prompts, rows["unsteered"].texts, rows["steering"].texts)]))
    print(f"\n{'condition':<22} {'lexicon freq':>12} {'x':>5} {'feature freq':>12} {'perplexity':>10} {'repetition':>10}  within {cfg.budget:g}x")
    for p in points:
        print(f"{p.condition:<22} {p.lexicon_frequency:>12.2f} {p.ratio:>5.1f} {p.feature_frequency:>12.2f} {p.perplexity:>10.2f} "
              f"{p.repetition:>10.3f}  {'yes' if p.within_budget else 'no'}")
    out = args.out / "steer" / f"concept_{''.join(ch if ch.isalnum() else '_' for ch in args.concept)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"search": search.to_dict(), "dose": dose.dose, "points": [asdict(p) for p in points]})
    print(f"  {out}")
    return points


def _stack_source(args) -> tuple[list | Path, Path]:
    """(what `load_stack` reads, the folder traces and means go in) from --sae (default <out>/sae)."""
    sources = [Path(p) for p in (args.sae or [args.out / "sae"])]
    if len(sources) == 1 and sources[0].is_dir() and not (sources[0] / "cfg.json").exists():
        return sources[0], sources[0]
    return sources, Path(args.out)


def cmd_trace(args):
    import re

    from activations.flags import from_flags

    from .circuits.export import feature_cards, write_graph
    from .circuits.graph import GraphConfig, feature_target, logit_target, stack_means, trace
    from .circuits.stack import load_stack

    source, folder = _stack_source(args)
    try:
        stack = load_stack(source)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--sae: {error}") from None
    if stack.model_name and not args.model_given:
        args.model = stack.model_name
    model = _model(args)
    cfg = from_flags(GraphConfig, args)
    try:
        stack.check_model(model)
        if args.target_feature:
            hook, _, feature = args.target_feature.rpartition(":")
            target = feature_target(stack, hook, int(feature), args.position)
        elif args.target:
            target = logit_target(model.tokenizer, args.target, args.contrast, position=args.position)
        else:
            raise ValueError("name what to explain: --target TOKEN (optionally --contrast TOKEN) or --target-feature HOOK:ID")
        means = stack_means(model, stack.to(next(model.parameters()).device), n_tokens=cfg.mean_tokens, cache=folder / "means.safetensors")
        graph = trace(model, stack, args.prompt, target, cfg, means=means)
    except ValueError as error:
        raise SystemExit(f"trace: {error}") from None
    cards = feature_cards(graph)
    name = args.name or (re.sub(r"[^A-Za-z0-9]+", "_", args.prompt).strip("_")[:48] or "graph")
    paths = write_graph(graph, folder / "traces" / name, model_name=stack.model_name, cards=cards)
    print(graph.summary())
    print("faithfulness at smaller budgets: " + ", ".join(f"{graph.metric['nodes_top'][k]} nodes {graph.metric['faithfulness_' + k]:.1%}"
                                                        for k in graph.metric["nodes_top"]))
    print("strongest chain:\n  " + graph.chain_text())
    for path in paths:
        print(f"  {path}")
    return graph


def cmd_match(args):
    from sae import load_sae

    from .circuits.matching import layer_matches, live_features, match_saes
    from .circuits.stack import load_stack

    if len(args.sae) == 2:  # two SAEs: same hook (widths, seeds) or any two
        a, b = (load_sae(p) for p in args.sae)
        result = match_saes(a, b, args.threshold, live_features(args.sae[0]), live_features(args.sae[1]))
        print(f"{args.sae[0]} vs {args.sae[1]}:\n  {result.summary()}")
        return result
    try:
        stack = load_stack(args.sae[0])
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--sae: {error}") from None
    if not args.model_given and stack.model_name:
        args.model = stack.model_name
    result = layer_matches(_model(args), stack, threshold=args.threshold, n_tokens=args.coact_tokens, corpus=args.corpus)
    print(result.table())
    return result


SHARDED = {"harvest": cmd_harvest, "train": cmd_train}
MAIN_RANK_ONLY = {"evaluate": cmd_evaluate, "analyze": cmd_analyze, "monitor": cmd_monitor, "dashboard": cmd_dashboard, "steer": cmd_steer,
                   "trace": cmd_trace, "match": cmd_match}


def main(argv: list[str] | None = None) -> None:
    from activations import distributed

    args = parse(argv)
    started = time.perf_counter()
    rank = distributed.current()  # under torchrun: harvest is sharded, training is DDP (activations/distributed.py)
    with contextlib.nullcontext() if rank.is_main else contextlib.redirect_stdout(io.StringIO()):  # rank 0 prints
        if args.command == "run":
            cmd_harvest(args)
            paths = cmd_train(args)
            if rank.is_main:
                cmd_evaluate(args, paths)
                if not args.skip_analysis:
                    cmd_analyze(args, paths, dashboard=True)
            print(f"outputs in {args.out.resolve()} (total {time.perf_counter() - started:.0f} s)")
        elif args.command in SHARDED:  # every rank takes part (torchrun)
            SHARDED[args.command](args)
        elif rank.is_main:  # the analysis commands are not sharded: rank 0 alone
            MAIN_RANK_ONLY[args.command](args)
    distributed.shutdown()


if __name__ == "__main__":
    main()
