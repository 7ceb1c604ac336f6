"""Steering demonstration: does clamping a feature make the model talk about its concept,
and at what fluency cost? Clamp vs add vs simply prompting for the concept.

    python bench/steering_demo.py --sae runs/default/sae/topk_k32_4608 \
        --features 1599:music 971:"the sea" --strengths 1 1.5 2 3 --out runs/bench_steering

For each feature (id:concept) the neutral prompts (`analysis.steering.NEUTRAL_PROMPTS`, in
the chat template, greedy decoding) are answered

* unsteered,
* with the prompt asking for the concept ("... (In your answer, talk about <concept>.)"),
* clamped (f_i = s x max activation) and added (x += s x max activation x W_dec[i]) at every strength s,

and every set of answers is scored under the unsteered model (`analysis.steering.score_condition`):
concept frequency = share of answers on which the feature, re-reading the answer alone,
exceeds --threshold x its max activation on some token; perplexity of the answer given its
prompt; repetition; KL on neutral held-out text (steered conditions only). Max activations
are measured by `feature_stats` on --max-contexts held-out contexts (the atlas' values can be
used instead once it is built). Prints one table per feature and writes
<out>/feature_<id>/sweep.{json,html}; the issue's target is >= 5x concept frequency at a
perplexity within 2x of the unsteered answers'.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from activations import CorpusConfig, load_contexts, load_model
from analysis.steering import (
    NEUTRAL_PROMPTS, GenerationConfig, Intervention, Steering, SweepResult, encode_prompts, feature_stats, generate_tokens,
    kl_on_text, score_condition, write_sweep,
)
from sae import load_sae


def parse_feature(spec: str) -> tuple[int, str]:
    feature, _, concept = spec.partition(":")
    if not concept:
        raise argparse.ArgumentTypeError(f"{spec!r}: give features as id:concept, e.g. 1599:music")
    return int(feature), concept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True)
    p.add_argument("--features", type=parse_feature, nargs="+", required=True, help="id:concept pairs")
    p.add_argument("--strengths", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="in multiples of max activation")
    p.add_argument("--modes", nargs="+", default=["clamp", "add"], choices=["clamp", "add"])
    p.add_argument("--n-prompts", type=int, default=len(NEUTRAL_PROMPTS))
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threshold", type=float, default=0.25, help="concept present above this x max activation")
    p.add_argument("--max-contexts", type=int, default=256, help="held-out contexts for max activations")
    p.add_argument("--kl-contexts", type=int, default=8)
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
    tokenizer = model.tokenizer
    heldout = torch.from_numpy(load_contexts(CorpusConfig(split="heldout", context_len=sae.cfg.context_size), tokenizer,
                                             max_contexts=max(args.max_contexts, args.kl_contexts))).long()
    stats = feature_stats(sae, model, heldout[:args.max_contexts])
    neutral = heldout[:args.kl_contexts]
    prompts = NEUTRAL_PROMPTS[:args.n_prompts]
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, chat=True, batch_size=args.batch_size)
    prompt_tokens = encode_prompts(tokenizer, prompts, chat=True)
    unsteered = generate_tokens(model, prompt_tokens, gen)
    print(f"model + max activations + unsteered answers: {time.perf_counter() - started:.0f} s; {len(prompts)} prompts, "
          f"{args.max_new_tokens} new tokens, threshold {args.threshold} x max activation")

    for feature, concept in args.features:
        def score(series, strength, prompt_ids, generated, kl):
            return score_condition(model, sae, series, strength, prompt_ids, generated, [feature], stats.max_activation,
                                   args.threshold, kl, n_examples=3)

        points = [score("unsteered", None, prompt_tokens, unsteered, 0.0)]
        asked = encode_prompts(tokenizer, [f"{p} (In your answer, talk about {concept}.)" for p in prompts], chat=True)
        points.append(score("prompt", None, asked, generate_tokens(model, asked, gen), None))
        for mode in args.modes:
            for strength in args.strengths:
                steering = Steering(sae, Intervention(feature, mode, strength), stats.max_activation)
                generated = generate_tokens(model, prompt_tokens, gen, steering)
                points.append(score(mode, strength, prompt_tokens, generated, kl_on_text(model, steering, neutral)))
                print(f"  {mode} {strength:g}: done at {time.perf_counter() - started:.0f} s", flush=True)
        result = SweepResult([feature], "+".join(["prompt", *args.modes]), "max", list(prompts), points)
        json_path, html_path = write_sweep(result, args.out / f"feature_{feature}", title=f"Steering feature {feature} ({concept})")

        base = points[0]
        print(f"\nfeature {feature} ({concept}), max activation {float(stats.max_activation[feature]):.3g}, "
              f"fires on {float(stats.frequency[feature]):.2%} of held-out tokens")
        print(f"{'condition':<12} {'strength':>8} {'concept freq':>12} {'x unsteered':>11} {'mean act':>8} {'perplexity':>10} "
              f"{'x unsteered':>11} {'repetition':>10} {'KL':>7}")
        for pt in points:
            ratio = pt.concept_frequency / base.concept_frequency if base.concept_frequency else float("inf") if pt.concept_frequency else 1.0
            print(f"{pt.series:<12} {'' if pt.strength is None else f'{pt.strength:g}':>8} {pt.concept_frequency:>12.2f} {ratio:>11.1f} "
                  f"{pt.concept_activation:>8.3f} {pt.perplexity:>10.2f} {pt.perplexity / base.perplexity:>11.2f} "
                  f"{pt.repetition:>10.3f} {'-' if pt.kl is None else f'{pt.kl:.3f}':>7}")
        fluent = [pt for pt in points[2:] if pt.perplexity <= 2 * base.perplexity]
        if fluent:
            best = max(fluent, key=lambda pt: pt.concept_frequency)
            print(f"best steered condition within 2x perplexity: {best.series} {best.strength:g} -> concept frequency "
                  f"{base.concept_frequency:.2f} -> {best.concept_frequency:.2f}; e.g. {best.examples[0]!r}")
        else:
            print("no steered condition stays within 2x the unsteered perplexity")
        print(f"  {json_path}\n  {html_path}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
