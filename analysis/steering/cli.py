"""`saewb steer`: the steering stage's command. With --features, a dose-response sweep of
those features steered together (side-by-side text, a table, sweep.json and a figure); with
--concept, concept steering (`analysis.steering.concept`): features found by the candidate
scores, an automatic dose, and a comparison with prompting. `analysis.cli` collects `COMMANDS`
into the `saewb` parser."""
from __future__ import annotations

import argparse
import functools
import json
import operator
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from activations.model import ModelLoader

from ..command import Command, add_corpus

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

    from activations.corpus import CorpusConfig
    from activations.model import HookedModel
    from sae.base import SAE

    from ..features.atlas import Atlas
    from ..features.labels import Labels
    from .concept import ConceptConfig, ConceptPoint, DoseSearch, Lexicon
    from .interventions import TokenPredicate
    from .sweep import SweepConfig, SweepResult


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`saewb steer`'s own flags: the held-out corpus, what to steer, and the configs' fields."""
    from activations.flags import add_flags
    from activations.generation import GenerationConfig

    from .concept import ConceptConfig
    from .sweep import SweepConfig

    add_corpus(p)
    p.add_argument("--sae", default=None, help="SAE folder (SAE Lens format); it names the hook to steer. Default with --concept: "
                   "the steering SAE `saewb run` trained into --out (<out>/steering), else the run's main SAE")
    p.add_argument("--features", type=int, nargs="+", default=None, help="feature ids, steered together (this or --concept)")
    p.add_argument("--concept", default=None, help="a concept (word) to steer toward: its features are found by what they read and "
                   "what they write, steered together at an automatically chosen dose, and compared with prompting")
    p.add_argument("--lexicon", nargs="+", default=None, help="--concept: words that show the concept in an answer (default: the "
                   "concept word's nearest whole words in the model's embedding, printed)")
    p.add_argument("--tuning-prompts", nargs="+", default=None, help="--concept: held-out prompts the features and the dose are chosen on "
                   "(default: analysis.steering.concept.TUNING_PROMPTS, none of them a report prompt)")
    p.add_argument("--mean-difference", action="store_true", help="--concept: also steer the concept's mean-difference direction "
                   "(DiffMean, no dictionary: the hook's mean on answers asked for the concept less on unprompted answers, read from "
                   "the tuning prompts), its dose chosen the same way: the baseline the SAE's features are up against")
    add_flags(p, ConceptConfig, only=("n_features", "n_candidates", "mode", "positions", "doses", "budget", "margin", "confidence"))
    add_flags(p, SweepConfig, only=("mode", "strengths", "unit", "positions", "threshold"))
    add_flags(p, GenerationConfig, only=("max_new_tokens", "temperature", "top_p", "seed", "chat"))
    p.add_argument("--prompts", nargs="+", default=None, help="prompts (default: the first 6 of analysis.steering.NEUTRAL_PROMPTS)")
    p.add_argument("--prompts-file", type=Path, default=None, help="a .json list of prompts, or a text file with one prompt per line")
    p.add_argument("--atlas", type=Path, default=None, help="feature atlas folder for max activations and labels (default: <sae>/atlas "
                   "when it exists, else max activations are measured on --max-contexts held-out contexts)")
    p.add_argument("--max-contexts", type=int, default=64, help="held-out contexts for max activations when no --atlas is given")
    p.add_argument("--kl-contexts", type=int, default=8, help="held-out contexts of neutral text for the KL side-effect measure")


def run(args: argparse.Namespace, models: ModelLoader) -> SweepResult | list[ConceptPoint]:
    """`saewb steer`: a sweep of --features, or concept steering toward --concept."""
    if args.concept and not args.sae:
        args.sae = _run_sae_for_concepts(Path(args.out))
    if not args.sae or not (args.features or args.concept):
        raise SystemExit("saewb steer needs --sae and --features, or --concept (as flags or in --config)")
    if args.features and args.concept:
        raise SystemExit("saewb steer takes --features or --concept, not both")
    return run_concept(args, models) if args.concept else run_sweep(args, models)


def _run_sae_for_concepts(out: Path) -> str:
    """The SAE `saewb steer --concept` steers when no --sae is given: the run's steering SAE
    (<out>/steering), else its main SAE, with a note when that one sits early in the model."""
    from ..command import steering_sae, trained_saes

    found = steering_sae(out)
    if found is not None:
        print(f"steering SAE of {out}: {found}")
        return str(found)
    if not (out / "sae").exists():
        raise SystemExit(f"saewb steer --concept needs --sae, or an --out that `saewb run` wrote ({out} has no sae/ folder)")
    main = trained_saes(out)[-1]
    print(f"{out} has no steering SAE (saewb run --steering-hook); steering with {main}. An SAE in the first half of the model mostly "
          "holds input features, which rarely steer (bench/steering_depth.py)")
    return str(main)


def steer_prompts(args: argparse.Namespace) -> list[str]:
    """The report prompts: --prompts-file, else --prompts, else the first 6 `NEUTRAL_PROMPTS`."""
    from .sweep import NEUTRAL_PROMPTS

    if args.prompts_file is not None:
        text = Path(args.prompts_file).read_text()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        prompts = json.loads(text) if Path(args.prompts_file).suffix == ".json" else lines
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise SystemExit(f"{args.prompts_file}: expected a JSON list of prompt strings")
        return prompts
    return list(args.prompts or NEUTRAL_PROMPTS[:6])


# ---------------------------------------------------------------------------- --features: a sweep
def label_predicates(labels_path: Path, features: list[int], tokenizer: PreTrainedTokenizerBase,
                     d_sae: int | None = None) -> TokenPredicate | None:
    """The OR of the features' best-label predicates (None without labels): "the steered
    text says what the label says", a score independent of the features' activation."""
    if not labels_path.exists():
        return None
    from ..features.labels import label_predicate, load_labels

    try:
        labels = load_labels(labels_path, d_sae)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    chosen = [labels.best(f) for f in features]
    predicates = [label_predicate(label, tokenizer) for label in chosen if label is not None]
    for f, label in zip(features, chosen):
        f1 = f"  (held-out F1 {label.scores.f1:.2f})" if label and label.scores else ""
        print(f"f{f} label: {label.text if label else '(dead feature)'}{f1}")
    if not predicates:
        return None
    return lambda tokens: functools.reduce(operator.or_, (p(tokens) for p in predicates))


class Heldout(NamedTuple):
    tokens: Tensor
    """[n_contexts context_len] int64 held-out contexts (neutral text)."""
    corpus: CorpusConfig
    """The corpus and split they come from."""


def _heldout(args: argparse.Namespace, sae: SAE, model: HookedModel, n_contexts: int) -> Heldout:
    """Up to `n_contexts` held-out contexts of the SAE's corpus (or --corpus), tokenised once."""
    import torch

    from activations.corpus import describe, heldout_corpus

    from ..command import heldout_tokens, too_small

    corpus = heldout_corpus(sae.training_data, args.corpus, sae.cfg.context_size)
    tokens = torch.from_numpy(heldout_tokens(corpus, model.tokenizer, n_contexts)).long()
    if not len(tokens):
        raise too_small(corpus, 0, 1, "saewb steer (KL on neutral text)")
    if len(tokens) < n_contexts:
        print(f"{describe(corpus)} has only {len(tokens)} contexts: KL and max activations use those")
    return Heldout(tokens, corpus)


class Scale(NamedTuple):
    max_activation: Tensor | None
    """[d_sae] the unit of strengths in "max" units (None when none is needed)."""
    predicate: TokenPredicate | None
    """The steered features' label predicate, when the atlas has labels."""


def _scale(args: argparse.Namespace, sae: SAE, model: HookedModel, cfg: SweepConfig, heldout: Tensor) -> Scale:
    """Max activations from the atlas (--atlas or <sae>/atlas, with its labels' predicate), else
    measured on --max-contexts held-out contexts [n pos] when the strengths need them."""
    from .measure import feature_stats

    atlas_dir = args.atlas or (Path(args.sae) / "atlas" if (Path(args.sae) / "atlas" / "atlas.json").exists() else None)
    if atlas_dir is not None:
        from ..features.atlas import load_atlas

        atlas = load_atlas(atlas_dir)
        if atlas.d_sae != sae.cfg.d_sae:
            raise SystemExit(f"{atlas_dir} is the atlas of a {atlas.d_sae}-feature SAE, not of {args.sae} ({sae.cfg.d_sae} features); "
                             "pass the right --atlas or rebuild it with `saewb analyze`")
        for f in cfg.features:
            atlas.check_feature(f)
        return Scale(atlas.max_activation, label_predicates(atlas_dir / "labels.json", cfg.features, model.tokenizer, sae.cfg.d_sae))
    if cfg.unit == "max" and cfg.mode != "ablate":
        return Scale(feature_stats(sae, model, heldout[:args.max_contexts]).max_activation, None)
    return Scale(None, None)


def _checked_features(args: argparse.Namespace, sae: SAE) -> list[int]:
    """--features, checked against the SAE before any model or text is loaded."""
    from .interventions import check_features

    try:
        return check_features(args.features, sae.cfg.d_sae)
    except ValueError as error:
        raise SystemExit(f"--features: {error}") from None


def _sweep_config(args: argparse.Namespace, features: list[int], n_prompts: int) -> SweepConfig:
    from activations.flags import from_flags
    from activations.generation import GenerationConfig

    from .sweep import SweepConfig

    cfg = from_flags(SweepConfig, args, features=features, n_examples=n_prompts, generation=from_flags(GenerationConfig, args))
    return replace(cfg, strengths=[0.0]) if cfg.mode == "ablate" else cfg  # ablation has no strength


def _print_sweep(result: SweepResult, cfg: SweepConfig, prompts: list[str]) -> None:
    from .measure import SideBySide, format_side_by_side

    base = result.points[0]
    for point in result.points[1:]:
        strength = "" if cfg.mode == "ablate" else f" = {point.strength:g}" + {"max": " x max activation", "norm": " x residual norm"}.get(cfg.unit, "")
        print(f"\n{cfg.mode} features {cfg.features}{strength}")
        print(format_side_by_side([SideBySide(p, b, s) for p, b, s in zip(prompts, base.examples, point.examples)]))
    print(f"\n{'condition':<16} {'feature act':>11} {'feature freq':>12} {'label freq':>10} {'perplexity':>10} {'repetition':>10} "
          f"{'KL':>8}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for p in result.points:
        name = p.series if p.strength is None or cfg.mode == "ablate" else f"{p.series} {p.strength:g}"
        print(f"{name:<16} {fmt(p.feature_activation, '11.3f')} {p.feature_frequency:>12.2f} {fmt(p.predicate_frequency, '10.2f')} "
              f"{fmt(p.perplexity, '10.2f')} {fmt(p.repetition, '10.3f')} {fmt(p.kl, '8.4f')}")


def run_sweep(args: argparse.Namespace, models: ModelLoader) -> SweepResult:
    """Steer --features at every strength: side-by-side text, a table, sweep.json and sweep.html in <out>/steer."""
    from activations.corpus import describe
    from sae import load_sae

    from .sweep import sweep, write_sweep

    sae = load_sae(args.sae)
    features = _checked_features(args, sae)
    prompts = steer_prompts(args)
    cfg = _sweep_config(args, features, len(prompts))
    model = models.get(sae.cfg.model_name)
    heldout = _heldout(args, sae, model, max(args.kl_contexts, args.max_contexts if cfg.unit == "max" and args.atlas is None else 0))
    scale = _scale(args, sae, model, cfg, heldout.tokens)
    if scale.max_activation is not None:
        print("max activations: " + ", ".join(f"f{f} {float(scale.max_activation[f]):.3g}" for f in cfg.features))
    neutral = heldout.tokens[:args.kl_contexts]
    result = sweep(model, sae, prompts, neutral, cfg, scale.max_activation, scale.predicate, neutral_text=describe(heldout.corpus))
    _print_sweep(result, cfg, prompts)
    print(f"  KL on {len(neutral)} contexts of {describe(heldout.corpus)}")
    files = write_sweep(result, args.out / "steer", title=f"Steering {Path(args.sae).name} features {cfg.features} ({cfg.mode})")
    print(f"  sweep:  {files.json_path}\n  figure: {files.html_path}")
    return result


# ---------------------------------------------------------------------------- --concept: concept steering
class ConceptInputs(NamedTuple):
    atlas: Atlas
    labels: Labels | None
    """The atlas's labels.json, when it has one."""
    lexicon: Lexicon | None
    """--lexicon; None: derived by the search."""


def _concept_inputs(args: argparse.Namespace, sae: SAE) -> ConceptInputs:
    """The SAE's atlas (needed), its labels and the given lexicon, checked before the model loads."""
    from ..features.atlas import load_atlas
    from ..features.labels import load_labels
    from .concept import Lexicon

    atlas_dir = Path(args.atlas or Path(args.sae) / "atlas")
    if not (atlas_dir / "atlas.json").exists():
        raise SystemExit(f"--concept needs the SAE's feature atlas ({atlas_dir}); build it with `saewb analyze --sae {args.sae}`")
    atlas = load_atlas(atlas_dir)
    if atlas.d_sae != sae.cfg.d_sae:
        raise SystemExit(f"{atlas_dir} is the atlas of a {atlas.d_sae}-feature SAE, not of {args.sae} ({sae.cfg.d_sae} features)")
    try:
        labels = load_labels(atlas_dir / "labels.json", sae.cfg.d_sae) if (atlas_dir / "labels.json").exists() else None
        lexicon = Lexicon(args.concept, tuple(args.lexicon)) if args.lexicon else None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    return ConceptInputs(atlas, labels, lexicon)


def _concept_config(args: argparse.Namespace) -> ConceptConfig:
    from activations.flags import from_flags
    from activations.generation import GenerationConfig

    from .concept import ConceptConfig

    generation = from_flags(GenerationConfig, args, chat=True if args.chat is None else args.chat)
    return from_flags(ConceptConfig, args, generation=generation)


def _print_concept(points: list[ConceptPoint], prompts: list[str], budget: float) -> None:
    from .measure import SideBySide, format_side_by_side

    rows = {p.condition: p for p in points}
    if "steering" in rows:
        print(format_side_by_side([SideBySide(q, b, s) for q, b, s in zip(prompts, rows["unsteered"].texts, rows["steering"].texts)]))
    print(f"\n{'condition':<22} {'concept freq':>12} {'x':>5} {'any word':>8} {'x':>5} {'feature freq':>12} {'perplexity':>10} {'repetition':>10}  "
          f"{'within ' + format(budget, 'g') + 'x':>9} {'sure':>5}  {'own prompt':>10}")
    for p in points:
        print(f"{p.condition:<22} {p.lexicon_frequency:>12.2f} {p.ratio:>5.1f} {p.lexicon_frequency_any_word:>8.2f} {p.ratio_any_word:>5.1f} "
              f"{p.feature_frequency:>12.2f} "
              f"{p.perplexity:>10.2f} {p.repetition:>10.3f}  {'yes' if p.within_budget else 'no':>9} {p.budget_confidence:>5.2f}  "
              f"{'yes' if p.within_budget_own_prompt else 'no':>10}")
    print("  concept freq: answers with a lexicon word, the request's words not counted; any word: the request's words counted "
          "too (no echo in an answer to a neutral prompt); perplexity: given the prompt that asks for "
          "the concept (every condition); sure: the share of paired bootstrap resamples of the prompts within budget; own prompt: "
          "the verdict with perplexity given each condition's own prompt")


def _print_dose_search(title: str, found: DoseSearch) -> None:
    print(f"{title}: (dose: concept share, share of bootstrap resamples within budget) "
          + ", ".join(f"{p.dose:.2g}{'' if p.within_budget else ' (over)'}: {p.concept_frequency:.2f}, sure {p.confidence:.2f}" for p in found.points)
          + f" -> {found.dose}")


def run_concept(args: argparse.Namespace, models: ModelLoader) -> list[ConceptPoint]:
    """Concept steering toward --concept: the ranked candidates, the dose search and the report,
    saved to <out>/steer/concept_<concept>.json."""
    from activations.io import atomic_write_json
    from sae import load_sae

    from .concept import choose_dose, compare_concept, mean_difference_condition, ranking_table, search_concept, write_dose_response

    sae = load_sae(args.sae)
    given = _concept_inputs(args, sae)
    cfg = _concept_config(args)
    model = models.get(sae.cfg.model_name)
    try:
        search = search_concept(args.concept, model, sae, given.atlas, given.labels, given.lexicon, prompts=args.tuning_prompts, cfg=cfg)
    except ValueError as error:
        raise SystemExit(f"--concept {args.concept!r}: {error}") from None
    print(f"lexicon ({search.lexicon.source}): {', '.join(search.lexicon.words)}")
    print(ranking_table(search.ranked[:10]))
    if not search.steered:
        raise SystemExit(f"no feature raises the lexicon's tokens for {args.concept!r}; try other --lexicon words")
    dose = choose_dose(model, sae, search, given.atlas.max_activation, prompts=args.tuning_prompts, cfg=cfg)
    _print_dose_search("dose search", dose)
    extra, saved = {}, {}
    if args.mean_difference:
        baseline, condition = mean_difference_condition(model, sae.cfg.hook_name, args.concept, search.lexicon, args.tuning_prompts, cfg, dose.base)
        _print_dose_search("mean-difference dose search", baseline)
        saved["mean_difference_dose_search"] = baseline.to_dict()
        if condition is not None:
            extra["mean difference"] = condition
    prompts = steer_prompts(args)
    points = compare_concept(model, sae, search, prompts, given.atlas.max_activation, dose.dose, cfg, extra)
    _print_concept(points, prompts, cfg.budget)
    stem = args.out / "steer" / f"concept_{''.join(ch if ch.isalnum() else '_' for ch in args.concept)}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stem.with_suffix(".json"), {"search": search.to_dict(), "config": {"mode": cfg.mode, "positions": cfg.positions},
                                                  "dose": dose.dose, "dose_search": dose.to_dict(), **saved, "points": [asdict(p) for p in points]})
    unit = "share of the residual norm" if cfg.mode == "add" else "x weight x max activation"
    figure = write_dose_response(dose, args.concept, unit, stem.with_suffix(".html"))
    print(f"  {stem.with_suffix('.json')}\n  dose-response figure: {figure}")
    return points


COMMANDS: dict[str, Command] = {
    "steer": Command("steer generation with SAE features: side-by-side text and a dose-response figure in <out>/steer", add_arguments, run),
}

__all__ = ["COMMANDS", "add_arguments", "label_predicates", "run", "run_concept", "run_sweep", "steer_prompts"]
