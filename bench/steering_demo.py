"""Steering demonstration: does clamping a feature make the model talk about its concept,
and at what fluency cost? Clamp vs add vs simply prompting for the concept.

    python bench/steering_demo.py --sae runs/default/sae/topk_k32_4608 \
        --concepts marriage love music food Python --out runs/bench_steering

Features come from the SAE's feature atlas and labels (`saewb analyze`, in <sae>/atlas):

* for each concept the concept search (`analysis.features.monitor.find_features`, the same ranking as
  `saewb monitor --find`) ranks features; the first of its top 10 whose best label scores
  held-out F1 >= --min-label-f1 and that fires on < --max-density of tokens is steered
  (or name them: --features 1599:music);
* strengths are in units of the feature's max activation in the atlas.

For each feature the neutral prompts (`analysis.steering.NEUTRAL_PROMPTS`, in the chat
template, greedy decoding) are answered

* unsteered,
* with the prompt asking for the concept ("... (In your answer, talk about <concept>.)"),
* clamped (f_i = s x max activation, error term kept) and added (x += s x max activation x
  W_dec[i]) at every strength s,

and every set of answers is scored under the unsteered model (`analysis.steering.score_condition`):

* concept frequency = share of answers on which the feature, re-reading the answer alone,
  exceeds --threshold x its max activation on some token;
* label frequency = share of answers containing a token where the feature's best label
  predicate holds (e.g. one of its label's tokens);
* perplexity of the answer given its prompt, repetition (repeated trigrams), and KL to the
  unsteered model on neutral held-out text (steered conditions only).

A causal check (`analysis.steering.causal_check`) ablates each feature where it fires on
held-out text and reports the change in log-probability of the tokens its logit effects
promote, against a random token set. Prints one table per feature and a summary; writes
<out>/feature_<id>/sweep.{json,html} and <out>/summary.json. The issue's target: >= 5x
concept frequency at a perplexity within 2x of the unsteered answers'. A zero unsteered
frequency is counted as 1 answer in the ratio, so ratios are lower bounds there.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from activations import CorpusConfig, load_contexts, load_model
from activations.io import atomic_write_json
from analysis.features.atlas import load_atlas
from analysis.features.labels import Labels, label_predicate, load_labels
from analysis.features.monitor import find_features
from analysis.steering import (
    NEUTRAL_PROMPTS, GenerationConfig, Intervention, Steering, SweepResult, causal_check, encode_prompts, generate_tokens,
    kl_on_text, score_condition, write_sweep,
)
from sae import load_sae


def parse_feature(spec: str) -> tuple[int, str]:
    feature, _, concept = spec.partition(":")
    if not concept:
        raise argparse.ArgumentTypeError(f"{spec!r}: give features as id:concept, e.g. 1599:music")
    return int(feature), concept


def pick_feature(concept: str, model, sae, atlas, labels: Labels, min_f1: float, max_density: float) -> int:
    """The concept search's best-ranked feature with a well-scored label and low density."""
    found = find_features(concept, model, sae, atlas, labels, n=10)
    print(f"\nconcept search {concept!r} ({found[0]['occurrences']} occurrences, {found[0]['corpus_occurrences']} in the atlas text):")
    print(f"  {'feature':>7} {'score':>6} {'fires':>6} {'density':>8} {'F1':>5}  label")
    for row in found[:5]:
        print(f"  {row['feature']:>7} {row['score']:>6.2f} {row['fire_rate_on_query']:>6.2f} {row['density']:>8.2e} "
              f"{row['label_f1'] or 0:>5.2f}  {row['label'][:70]}")
    for row in found:
        if (row["label_f1"] or 0) >= min_f1 and row["density"] < max_density:
            return row["feature"]
    raise SystemExit(f"no feature among the top 10 for {concept!r} has a label with F1 >= {min_f1}; name one with --features")


def ratio(value: float, base: float, n: int) -> float:
    """value / base, with a zero base counted as one answer in n (a lower bound)."""
    return value / max(base, 1 / n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, help="SAE folder with its atlas and labels (saewb analyze)")
    p.add_argument("--atlas", type=Path, default=None, help="atlas folder (default: <sae>/atlas)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--concepts", nargs="+", help="concepts to find features for with the concept search")
    which.add_argument("--features", type=parse_feature, nargs="+", help="id:concept pairs, instead of searching")
    p.add_argument("--min-label-f1", type=float, default=0.5, help="concept search: least held-out F1 of the feature's label")
    p.add_argument("--max-density", type=float, default=0.01, help="concept search: most firing rate on held-out tokens")
    p.add_argument("--strengths", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="in multiples of max activation")
    p.add_argument("--modes", nargs="+", default=["clamp", "add"], choices=["clamp", "add"])
    p.add_argument("--n-prompts", type=int, default=len(NEUTRAL_PROMPTS))
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threshold", type=float, default=0.25, help="concept present above this x max activation")
    p.add_argument("--kl-contexts", type=int, default=8, help="held-out contexts of neutral text for KL")
    p.add_argument("--causal-contexts", type=int, default=256, help="held-out contexts searched for the causal check")
    p.add_argument("--batch-size", type=int, default=24, help="prompts decoded together")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_steering"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model = load_model(args.model, args.device)
    sae = load_sae(args.sae)
    atlas_dir = args.atlas or Path(args.sae) / "atlas"
    atlas = load_atlas(atlas_dir)
    labels = load_labels(atlas_dir / "labels.json")
    tokenizer = model.tokenizer
    if args.concepts:
        chosen = [(pick_feature(c, model, sae, atlas, labels, args.min_label_f1, args.max_density), c) for c in args.concepts]
    else:
        chosen = [(atlas.check_feature(f), c) for f, c in args.features]
    heldout = torch.from_numpy(load_contexts(CorpusConfig(split="heldout", context_len=sae.cfg.context_size), tokenizer,
                                             max_contexts=max(args.causal_contexts, args.kl_contexts))).long()
    neutral = heldout[:args.kl_contexts]
    prompts = NEUTRAL_PROMPTS[:args.n_prompts]
    n = len(prompts)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, chat=True, batch_size=args.batch_size)
    prompt_tokens = encode_prompts(tokenizer, prompts, chat=True)
    unsteered = generate_tokens(model, prompt_tokens, gen)
    print(f"\nmodel + concept search + unsteered answers: {time.perf_counter() - started:.0f} s; {n} prompts, "
          f"{args.max_new_tokens} new tokens, threshold {args.threshold} x max activation")

    summary = []
    for feature, concept in chosen:
        label = labels.best(feature)
        label_f1 = label.scores.f1 if label and label.scores else None
        predicate = label_predicate(label, tokenizer) if label else None

        def score(series, strength, prompt_ids, generated, kl):
            return score_condition(model, sae, series, strength, prompt_ids, generated, [feature], atlas.max_activation,
                                   args.threshold, kl, predicate, n_examples=n)

        points = [score("unsteered", None, prompt_tokens, unsteered, 0.0)]
        asked = encode_prompts(tokenizer, [f"{p} (In your answer, talk about {concept}.)" for p in prompts], chat=True)
        points.append(score("prompt", None, asked, generate_tokens(model, asked, gen), None))
        for mode in args.modes:
            for strength in args.strengths:
                steering = Steering(sae, Intervention(feature, mode, strength), atlas.max_activation)
                generated = generate_tokens(model, prompt_tokens, gen, steering)
                points.append(score(mode, strength, prompt_tokens, generated, kl_on_text(model, steering, neutral)))
        result = SweepResult([feature], "+".join(["prompt", *args.modes]), "max", list(prompts), points)
        json_path, html_path = write_sweep(result, args.out / f"feature_{feature}", title=f"Steering feature {feature} ({concept})")
        causal = causal_check(model, sae, feature, heldout[:args.causal_contexts])

        base = points[0]
        print(f"\nfeature {feature} ({concept}): label {label.text if label else '-'} (held-out F1 {label_f1 or 0:.2f}); "
              f"max activation {float(atlas.max_activation[feature]):.3g}, density {float(atlas.density[feature]):.2e}  "
              f"[{time.perf_counter() - started:.0f} s]")
        print(f"{'condition':<10} {'strength':>8} {'concept freq':>12} {'x unsteered':>11} {'label freq':>10} {'mean act':>8} "
              f"{'perplexity':>10} {'x unsteered':>11} {'repetition':>10} {'KL':>7}")
        for pt in points:
            print(f"{pt.series:<10} {'' if pt.strength is None else f'{pt.strength:g}':>8} {pt.concept_frequency:>12.2f} "
                  f"{ratio(pt.concept_frequency, base.concept_frequency, n):>11.1f} {pt.predicate_frequency or 0:>10.2f} "
                  f"{pt.concept_activation:>8.3f} {pt.perplexity:>10.2f} {pt.perplexity / base.perplexity:>11.2f} "
                  f"{pt.repetition:>10.3f} {'-' if pt.kl is None else f'{pt.kl:.3f}':>7}")
        print(f"causal check: ablating it where it fires ({causal.n_positions} positions) changes log P(promoted tokens) by "
              f"{causal.delta:+.3f} nats (random tokens {causal.control_delta:+.3f}); lowered at {causal.fraction_lowered:.0%} of them")
        entry = {"feature": feature, "concept": concept, "label": label.text if label else None, "label_f1": label_f1,
                 "density": float(atlas.density[feature]), "max_activation": float(atlas.max_activation[feature]),
                 "causal": causal._asdict(), "points": [vars(pt) | {"examples": pt.examples[:3]} for pt in points]}
        for series in ("prompt", *args.modes):
            fluent = [pt for pt in points if pt.series == series and pt.perplexity <= 2 * base.perplexity]
            best = max(fluent, key=lambda pt: (pt.concept_frequency, -pt.perplexity), default=None)
            entry[f"best_{series}"] = None if best is None else {
                "strength": best.strength, "concept_frequency": best.concept_frequency, "label_frequency": best.predicate_frequency,
                "ratio": ratio(best.concept_frequency, base.concept_frequency, n), "perplexity_ratio": best.perplexity / base.perplexity,
                "example": best.examples[0]}
        entry["unsteered_frequency"], entry["unsteered_label_frequency"] = base.concept_frequency, base.predicate_frequency
        summary.append(entry)
        print(f"  {json_path}\n  {html_path}")

    print(f"\nsummary: best condition of each kind within 2x the unsteered perplexity ({n} neutral prompts; "
          f"ratios vs unsteered concept frequency, a zero counted as 1/{n})")
    print(f"{'feature':>7} {'concept':<12} {'unsteered':>9} " + " ".join(f"{s:>24}" for s in ("prompt", *args.modes)) + f" {'causal dlogp':>13}")
    for e in summary:
        cells = []
        for series in ("prompt", *args.modes):
            b = e[f"best_{series}"]
            cells.append("-" if b is None else f"{b['concept_frequency']:.2f} ({b['ratio']:.1f}x, ppl {b['perplexity_ratio']:.2f}x)"
                         + ("" if b["strength"] is None else f"@{b['strength']:g}"))
        print(f"{e['feature']:>7} {e['concept'][:12]:<12} {e['unsteered_frequency']:>9.2f} " + " ".join(f"{c:>24}" for c in cells)
              + f" {e['causal']['delta']:>+7.3f}/{e['causal']['control_delta']:+.3f}")
    met = [e["feature"] for e in summary if any((e[f"best_{m}"] or {}).get("ratio", 0) >= 5 for m in args.modes)]
    print(f"features meeting >= 5x at <= 2x perplexity (steering): {met or 'none'}")
    atomic_write_json(args.out / "summary.json", {"args": {k: str(v) for k, v in vars(args).items()}, "features": summary})
    print(f"{args.out / 'summary.json'}\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
