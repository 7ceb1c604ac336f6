"""Concept steering against prompting, judged by a lexicon the steered features do not define.

    python bench/concept_steering.py --sae runs/default/steering/sae/<steering SAE> --out runs/bench_concepts
    python bench/concept_steering.py --hooks blocks.15.hook_resid_post blocks.23.hook_resid_post --out runs/bench_diffmean
      (no SAE: the mean-difference baseline alone at each hook)
    python bench/concept_steering.py --sae <same SAE> --reuse runs/bench_concepts/summary.json \
        --report-prompts-file bench/prompts/fresh_report_prompts.txt --out runs/bench_fresh
      (the features, ways and doses a run chose, steered again on other report prompts: no search)

The concepts and their lexicons (`CONCEPTS` below) were fixed before any measurement. For
each concept (`analysis.steering.concept`):

1. `search_concept` proposes candidates (input selectivity, answer contrast, logit lens),
   scores them (output score, concept gain), and steers the most promising ones alone in short
   answers to tuning prompts (the trial score); those that show the concept are steered
   together, weighted by their trial score;
2. `choose_dose` finds the largest dose whose answers to the 24 tuning prompts
   (`TUNING_PROMPTS` + `MORE_TUNING_PROMPTS`, `--dose-prompts`) keep perplexity and repetition
   within 2x the unsteered answers', and steers at the dose within budget that shows the concept
   in the most tuning answers (the smaller of equals), for each steering way of `--ways`
   (mode:positions); `choose_way` keeps the way whose dose shows the concept in the most tuning
   answers (the report prompts decide nothing);
3. the 48 report prompts (`NEUTRAL_PROMPTS` + `MORE_NEUTRAL_PROMPTS`, `--report-prompts`; none of
   them a tuning prompt; chat template, greedy, 40 new tokens) are answered unsteered, prompted ("... (In your answer, talk about
   <concept>.)"), steered at that dose, and prompted and steered; and, as a baseline without a
   dictionary (`--mean-difference`, on by default), steered along the concept's mean-difference
   direction (DiffMean: the hook's mean activation on the tuning prompts' answers when asked for
   the concept, less on their unprompted answers), its dose chosen by the same rule.

Scores, all under the unsteered model: the concept frequency (share of answers with a lexicon
word, the request's own words never counted, so an echo of the request scores nothing; the
share with any lexicon word beside it, and a second verdict from it: steering's answers to neutral prompts
were not asked for the concept, so the concept's own word is no echo there), the steered features' own re-read frequency, the fair
perplexity (every condition's answers given the prompt that asks for the concept), the
perplexity given each condition's own prompt (today's verdict), and the repeated-trigram rate
(every answer counted; one under 3 tokens counts as 1). A point is within budget when its
fair perplexity and its repetition (from the 0.02 floor) are both <= 2x the unsteered
answers'. Ratios count a zero unsteered frequency as one answer in n (a lower bound). How surely the
report prompts decide each verdict is printed beside it ("sure"): the share of paired bootstrap resamples
of the prompts (each condition's and the unsteered answers drawn by the same prompts) in which the point
is within budget; and, summed over concepts, the number expected to reach 5x within budget on another
draw of prompts like these. A second verdict, "pooled", holds repetition to 2x the unsteered rate of the
report's and the tuning prompts' unsteered answers together, so one or two loops among the report's own
unsteered answers do not set the budget (defined after the 48-prompt run; first measured on
`bench/prompts/fresh_report_prompts.txt`, written before it). Writes
<out>/summary.json, <out>/concept_steering.html (every answer, HTML-escaped) and one
dose-response figure per concept.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from activations import load_model
from activations.io import atomic_write_bytes, atomic_write_json
from analysis.circuits.interventions import rank_correlation
from analysis.features.atlas import load_atlas
from analysis.features.labels import load_labels
from analysis.steering import MORE_NEUTRAL_PROMPTS, NEUTRAL_PROMPTS
from analysis.steering.concept import (
    CONCEPT_MODES,
    MORE_TUNING_PROMPTS,
    TUNING_PROMPTS,
    ConceptConfig,
    ConceptSearch,
    ExtraCondition,
    Fluency,
    Lexicon,
    choose_dose,
    choose_way,
    compare_concept,
    mean_difference_condition,
    mean_difference_search,
    parse_way,
    search_concept,
    way_name,
    write_dose_response,
)
from analysis.steering.interventions import POSITIONS
from sae import load_sae

CONCEPTS = {  # fixed in advance: the concept word (searched) and the words that show it in an answer
    "love": "love lover beloved romance romantic affection passion adore darling sweetheart kiss",
    "marriage": "marriage marry wedding wed bride groom husband wife spouse engagement engaged matrimony vow",
    "music": "music musical musician song sing singer melody tune piano guitar violin instrument concert rhythm harmony band orchestra choir",
    "food": "food eat meal dinner lunch breakfast cook recipe bread meat fruit vegetable delicious taste dish kitchen soup cake",
    "sea": "sea ocean wave beach shore sail sailor ship boat tide coast marine island harbor harbour seaside voyage",
    "Python": "python code coding programming programmer function variable script module syntax compiler interpreter debug",
}


PREDICTORS = ("output_score", "delta_confidence", "concept_gain", "logit_z")
"""Single-pass scores compared by how well they predict the trial score (the candidate steered alone, measured where it is used)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", default=None, help="SAE folder with its atlas and labels (saewb analyze); needed unless --hooks is given")
    p.add_argument("--hooks", nargs="+", default=None,
                   help="no SAE: only the mean-difference baseline, at each of these hooks (e.g. blocks.15.hook_resid_post), "
                        "with unsteered and prompted answers, its dose chosen the same way: where the model steers without a dictionary")
    p.add_argument("--concepts", nargs="+", default=list(CONCEPTS), help=f"a subset of {list(CONCEPTS)}")
    p.add_argument("--n-features", type=int, default=ConceptConfig.n_features, help="features steered together")
    p.add_argument("--budget", type=float, default=ConceptConfig.budget, help="fluency budget (x unsteered)")
    p.add_argument("--margin", type=float, default=ConceptConfig.margin, help="the dose search holds tuning answers to budget x margin")
    p.add_argument("--ways", nargs="+", default=["add:all"],
                   help=f"mode:positions, each mode one of {list(CONCEPT_MODES)} and positions one of {list(POSITIONS)}: the ways of "
                        "steering compared per concept on the tuning prompts (the first also runs the trials). Default: add:all alone; "
                        "choosing among three per concept on 12 tuning prompts did not carry to the report prompts (docs/results.md)")
    p.add_argument("--top-input", action="store_true", help="also steer the search's top input feature alone at its own dose")
    p.add_argument("--mean-difference", action=argparse.BooleanOptionalAction, default=True,
                   help="also steer the concept's mean-difference direction (DiffMean: the hook's mean on answers asked for the concept "
                        "less on unprompted answers, read from the tuning prompts), dose chosen the same way, as a baseline")
    p.add_argument("--dose-prompts", type=int, choices=(12, 24), default=24,
                   help="tuning prompts answered at each dose of the search: 12 (TUNING_PROMPTS, as saewb steer) or 24 (+ MORE_TUNING_PROMPTS)")
    p.add_argument("--report-prompts", type=int, choices=(24, 48), default=48,
                   help="report prompts: 24 (NEUTRAL_PROMPTS) or 48 (+ MORE_NEUTRAL_PROMPTS); with 24, one or two looping answers "
                        "decide the repetition budget's edge")
    p.add_argument("--report-prompts-file", type=Path, default=None,
                   help="report prompts from this file instead, one per line (none may be a tuning prompt)")
    p.add_argument("--reuse", type=Path, default=None,
                   help="a summary.json of an earlier run with the same SAE: steer its features, ways and doses again on the report "
                        "prompts, with no search (the mean difference's direction is read again from the tuning prompts)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/bench_concepts"))
    args = p.parse_args()
    unknown = [c for c in args.concepts if c not in CONCEPTS]
    if unknown:
        raise SystemExit(f"unknown concept(s) {unknown}: choose from {list(CONCEPTS)}")

    if args.sae is None and not args.hooks:
        raise SystemExit("give --sae (an SAE with its atlas), or --hooks for the mean-difference baseline alone")

    started = time.perf_counter()
    model = load_model(args.model, args.device)
    prompts = (NEUTRAL_PROMPTS + MORE_NEUTRAL_PROMPTS)[:args.report_prompts]
    if args.report_prompts_file is not None:
        try:
            prompts = [line.strip() for line in args.report_prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as error:
            raise SystemExit(f"--report-prompts-file: {error}") from None
        if not prompts:
            raise SystemExit(f"--report-prompts-file: {args.report_prompts_file} has no prompts")
    saved = _saved_choices(args.reuse) if args.reuse is not None else {}
    if saved and set(args.concepts) - set(saved):
        raise SystemExit(f"--reuse: {args.reuse} has no choice for {sorted(set(args.concepts) - set(saved))}")
    dose_prompts = (TUNING_PROMPTS + MORE_TUNING_PROMPTS)[:args.dose_prompts]
    if set(prompts) & set(dose_prompts):
        raise SystemExit("the report prompts must be disjoint from the tuning prompts")
    if args.hooks:
        return mean_difference_by_hook(args, model, prompts, dose_prompts)
    sae = load_sae(args.sae)
    atlas_dir = Path(args.sae) / "atlas"
    atlas, labels = load_atlas(atlas_dir), load_labels(atlas_dir / "labels.json")
    try:
        ways = [parse_way(w) for w in args.ways]
    except ValueError as error:
        raise SystemExit(f"--ways: {error}") from None
    cfg = ConceptConfig(n_features=args.n_features, budget=args.budget, margin=args.margin, mode=ways[0][0], positions=ways[0][1])
    cfg.generation.max_new_tokens, cfg.generation.batch_size = args.max_new_tokens, args.batch_size
    n = len(prompts)
    print(f"model and atlas: {time.perf_counter() - started:.0f} s")

    summary, pages = [], []
    for concept in args.concepts:
        t0 = time.perf_counter()
        lexicon = Lexicon(concept, tuple(CONCEPTS[concept].split()))
        if concept in saved:  # --reuse: an earlier run's features, way and doses, no search
            search, steer_cfg, dose_value, base, extra = _reuse(saved[concept], model, sae, dose_prompts, cfg, args.mean_difference)
            searches, tried, figure = {}, [], None
            print(f"\n=== {concept}: reused {len(search.steered)} features at dose {dose_value} ({steer_cfg.mode}:{steer_cfg.positions})"
                  + (f"; mean difference at {extra['mean difference'].dose}" if "mean difference" in extra else ""))
        else:
            search = search_concept(concept, model, sae, atlas, labels, lexicon, cfg=cfg)
            steered = search.steered
            top_input = search.top_input
            print(f"\n=== {concept}: {len(search.ranked)} candidates; steered "
                  + ", ".join(f"f{c.feature} (w {c.weight:.2f}, gain {c.concept_gain:+.2f}, input {c.input_score:.1f}, contrast {c.contrast:.3f})"
                              for c in steered)
                  + f"; top input feature f{top_input.feature} (gain {top_input.concept_gain:+.2f})")
            for c in steered:
                print(f"    f{c.feature}: {c.label[:90]}")
            tried = [c for c in search.ranked if c.trial == c.trial]  # measured (not NaN)
            print(f"  trials: {len(tried)} candidates steered alone, {sum(c.trial > 0 for c in tried)} showing the concept; "
                  "rank correlation with the trial score: " + ", ".join(f"{name} {rank_correlation([c.scores[name] for c in tried], [c.trial for c in tried]):+.2f}"
                                                                        for name in PREDICTORS))
            choice = choose_way(model, sae, search, atlas.max_activation, ways, dose_prompts, cfg=cfg)
            dose, steer_cfg = choice.dose, choice.config(cfg)
            print("  ways on the tuning prompts (concept share at the chosen dose): "
                  + ", ".join(f"{name} {'-' if d.chosen is None else f'{d.chosen.concept_frequency:.2f} at {d.dose:.2g}'}"
                              for name, d in choice.tried.items()) + f" -> {way_name(choice.way)}")
            searches = {f"concept, {name}": d for name, d in choice.tried.items()}
            extra = {}
            if args.top_input:
                alone = [replace(top_input, weight=1.0)]
                searches["top input"] = choose_dose(model, sae, search, atlas.max_activation, dose_prompts, steer_cfg, alone, dose.base)
                if searches["top input"].dose is not None:
                    extra["top input feature"] = ExtraCondition(alone, searches["top input"].dose)
            if args.mean_difference:  # the baseline without a dictionary, its dose chosen the same way on the same tuning prompts
                searches["mean difference"], condition = mean_difference_condition(model, sae.cfg.hook_name, concept, lexicon, dose_prompts,
                                                                                   steer_cfg, dose.base)
                if condition is not None:
                    extra["mean difference"] = condition
            for name, d in searches.items():
                print(f"  dose search ({name}): base ppl {d.base.perplexity:.2f} rep {d.base.repetition:.3f}; "
                      + ", ".join(f"{pt.dose:.2g}{'' if pt.within_budget else '!'} (ppl {pt.fluency.perplexity:.2f}, rep {pt.fluency.repetition:.3f}, "
                                  f"concept {pt.concept_frequency:.2f}, sure {pt.confidence:.2f})" for pt in d.points) + f" -> {d.dose}")
            dose_value, base = dose.dose, dose.base
            figure = write_dose_response(dose, concept, "share of the residual norm" if steer_cfg.mode == "add" else "x weight x max activation",
                                         args.out / f"dose_{concept}.html")
        points = compare_concept(model, sae, search, prompts, atlas.max_activation, dose_value, steer_cfg, extra,
                                 reference=(base.repetition, len(dose_prompts)))
        seconds = time.perf_counter() - t0
        rows = {pt.condition: asdict(pt) for pt in points}
        print(f"  {'condition':<22} {'dose':>5} {'concept':>7} {'x':>5} {'any word':>8} {'feature':>7} {'ppl':>7} {'x':>5} {'rep':>6} {'x':>5}"
              f"  {'fair':>4} {'sure':>5} {'pooled':>6}  {'ppl own':>7} {'own':>4}")
        b = rows["unsteered"]
        for name, r in rows.items():
            print(f"  {name:<22} {'' if r['dose'] is None else format(r['dose'], '.2g'):>5} {r['lexicon_frequency']:>7.2f} {r['ratio']:>5.1f} "
                  f"{r['lexicon_frequency_any_word']:>8.2f} {r['feature_frequency']:>7.2f} {r['perplexity']:>7.2f} "
                  f"{r['perplexity'] / b['perplexity']:>5.2f} {r['repetition']:>6.3f} {r['repetition'] / max(b['repetition'], 0.02):>5.2f}"
                  f"  {'yes' if r['within_budget'] else 'no':>4} {r['budget_confidence']:>5.2f} {'yes' if r['within_budget_pooled'] else 'no':>6}"
                  f"  {r['perplexity_given_own_prompt']:>7.2f} "
                  f"{'yes' if r['within_budget_own_prompt'] else 'no':>4}")
        for name in ("steering", "prompting + steering"):
            if name in rows:
                for q, t in list(zip(prompts, rows[name]["texts"]))[:3]:
                    print(f"    [{name}] {q} -> {' '.join(t.split())[:150]}")
        steer_row, prompt_row = rows.get("steering"), rows["prompting"]
        met = steer_row is not None and steer_row["within_budget"] and steer_row["ratio"] >= 5
        met_own = steer_row is not None and steer_row["within_budget_own_prompt"] and steer_row["ratio"] >= 5
        matches = (steer_row is not None and steer_row["within_budget"] and prompt_row["within_budget"]  # at zero, nothing is matched
                   and steer_row["lexicon_frequency"] >= prompt_row["lexicon_frequency"]
                   and steer_row["lexicon_frequency"] > rows["unsteered"]["lexicon_frequency"])
        met_any = steer_row is not None and steer_row["within_budget"] and steer_row["ratio_any_word"] >= 5  # the second echo rule
        direction_row = rows.get("mean difference")
        direction_met = direction_row is not None and direction_row["within_budget"] and direction_row["ratio"] >= 5
        met_pooled = steer_row is not None and steer_row["within_budget_pooled"] and steer_row["ratio"] >= 5  # the second verdict
        direction_met_pooled = direction_row is not None and direction_row["within_budget_pooled"] and direction_row["ratio"] >= 5
        print(f"  {concept}: steering {'reaches' if met else 'does not reach'} 5x within the fair budget "
              f"(today's verdict: {'reaches' if met_own else 'does not'}; counting the concept's own word in unrequested answers: "
              f"{'reaches' if met_any else 'does not'}; the pooled repetition budget: {'reaches' if met_pooled else 'does not'}); "
              f"{'matches' if matches else 'does not match'} prompting; "
              f"within budget in {steer_row['budget_confidence'] if steer_row else 0:.2f} and at 5x within budget in "
              f"{steer_row['confidence_5x'] if steer_row else 0:.2f} of paired resamples of the prompts  [{seconds:.0f} s]")
        summary.append({"concept": concept, "predictors": {name: rank_correlation([c.scores[name] for c in tried], [c.trial for c in tried])
                                                           for name in PREDICTORS} if tried else {},
                        "search": search.to_dict(),
                        "dose_search": saved[concept]["dose_search"] if concept in saved else {k: v.to_dict() for k, v in searches.items()},
                        "reused": str(args.reuse) if concept in saved else None,
                        "way": f"{steer_cfg.mode}:{steer_cfg.positions}", "conditions": rows, "meets_5x": met, "meets_5x_todays_verdict": met_own,
                        "meets_5x_any_word": met_any, "meets_5x_pooled": met_pooled, "matches_prompting": matches,
                        "mean_difference_meets_5x": direction_met, "mean_difference_meets_5x_pooled": direction_met_pooled,
                        "confidence_5x": steer_row["confidence_5x"] if steer_row else 0.0,
                        "mean_difference_confidence_5x": direction_row["confidence_5x"] if direction_row else 0.0,
                        "seconds": seconds, "figure": None if figure is None else str(figure)})
        pages.append(_section(concept, lexicon, search, rows, prompts))

    print(f"\nsummary ({n} report prompts; lexicon frequency, its ratio to unsteered, whether the point is within the 2x fluency budget, "
          "and the share of paired resamples of the prompts in which it is)")
    names = ["prompting", "steering", "prompting + steering", "top input feature", "mean difference"]
    print(f"{'concept':<10} {'way':<26} {'unsteered':>9} " + " ".join(f"{s:>24}" for s in names))
    for e in summary:
        cells = []
        for s in names:
            r = e["conditions"].get(s)
            cells.append("-" if r is None else f"{r['lexicon_frequency']:.2f} ({r['ratio']:.1f}x){'' if r['within_budget'] else ' over'} "
                                               f"{r['budget_confidence']:.2f}")
        print(f"{e['concept']:<10} {e['way']:<26} {e['conditions']['unsteered']['lexicon_frequency']:>9.2f} " + " ".join(f"{c:>24}" for c in cells))
    print(f"concepts reaching >= 5x within the fair budget by steering: {[e['concept'] for e in summary if e['meets_5x']] or 'none'} "
          f"({sum(e['meets_5x'] for e in summary)} of {len(summary)}; today's verdict: "
          f"{sum(e['meets_5x_todays_verdict'] for e in summary)}; counting the concept's own word in answers to neutral prompts: "
          f"{sum(e['meets_5x_any_word'] for e in summary)}; the pooled repetition budget: {sum(e['meets_5x_pooled'] for e in summary)}); expected on another draw of prompts like these (paired bootstrap): "
          f"{sum(e['confidence_5x'] for e in summary):.1f} (" + ", ".join(f"{e['concept']} {e['confidence_5x']:.2f}" for e in summary) + ")")
    if args.mean_difference:
        print(f"concepts reaching >= 5x within the fair budget by the mean-difference direction (no dictionary): "
              f"{[e['concept'] for e in summary if e['mean_difference_meets_5x']] or 'none'} "
              f"({sum(e['mean_difference_meets_5x'] for e in summary)} of {len(summary)}; the pooled repetition budget: "
              f"{sum(e['mean_difference_meets_5x_pooled'] for e in summary)}; expected on another draw: "
              f"{sum(e['mean_difference_confidence_5x'] for e in summary):.1f})")
    print(f"concepts where steering matches prompting's frequency, both within budget: "
          f"{[e['concept'] for e in summary if e['matches_prompting']] or 'none'}")
    for name in PREDICTORS:
        values = [e["predictors"][name] for e in summary if e["predictors"].get(name, math.nan) == e["predictors"].get(name, math.nan)]
        if not values:  # --reuse: no search, no trials
            continue
        print(f"rank correlation of {name} with the trial score: mean {sum(values) / max(len(values), 1):+.2f} over {len(values)} concepts")
    print("seconds per concept (search, dose search, report): " + ", ".join(f"{e['concept']} {e['seconds']:.0f}" for e in summary))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "summary.json", {"args": {k: str(v) for k, v in vars(args).items()}, "concepts": summary})
    atomic_write_bytes(args.out / "concept_steering.html", _page(pages).encode())
    print(f"{args.out / 'summary.json'}\n{args.out / 'concept_steering.html'}\ntotal {time.perf_counter() - started:.0f} s")



def _saved_choices(path: Path) -> dict[str, dict]:
    """An earlier run's summary.json by concept (`--reuse`)."""
    try:
        concepts = json.loads(path.read_text(encoding="utf-8"))["concepts"]
        return {e["concept"]: e for e in concepts if e["search"] and e["conditions"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"--reuse: {path} is not a summary.json of this bench ({error})") from None


def _reuse(entry: dict, model, sae, dose_prompts: list[str], cfg: ConceptConfig, with_mean_difference: bool):
    """The search, steering config, dose and tuning prompts' unsteered fluency of an earlier run's concept (`entry`), and the
    mean difference's report condition at its saved dose (its direction read again from the tuning prompts: deterministic)."""
    search = ConceptSearch.from_dict(entry["search"])
    mode, positions = parse_way(entry["way"])
    steer_cfg = replace(cfg, mode=mode, positions=positions)
    chosen = entry["dose_search"][f"concept, {entry['way']}"]
    base = Fluency(chosen["base"]["perplexity"], chosen["base"]["repetition"])
    extra = {}
    direction = entry["conditions"].get("mean difference")
    if with_mean_difference and direction is not None:
        dictionary, md_search, max_activation = mean_difference_search(model, sae.cfg.hook_name, search.concept, search.lexicon, dose_prompts,
                                                                       replace(steer_cfg, mode="add"))
        extra["mean difference"] = ExtraCondition(md_search.steered, direction["dose"], dictionary, md_search.residual_norm, max_activation)
    return search, steer_cfg, chosen["dose"], base, extra


def mean_difference_by_hook(args, model, prompts: list[str], dose_prompts: list[str]) -> None:
    """The mean-difference baseline alone at each of `args.hooks`: per concept, its direction and dose
    from the tuning prompts (`choose_dose`, the first of `--ways`' positions), then unsteered, prompted,
    steered and prompted + steered answers to the report prompts, judged as the SAE's are."""
    positions = parse_way(args.ways[0])[1]
    cfg = ConceptConfig(budget=args.budget, margin=args.margin, mode="add", positions=positions)
    cfg.generation.max_new_tokens, cfg.generation.batch_size = args.max_new_tokens, args.batch_size
    table = {}
    for hook in args.hooks:
        for concept in args.concepts:
            t0 = time.perf_counter()
            lexicon = Lexicon(concept, tuple(CONCEPTS[concept].split()))
            direction, search, max_activation = mean_difference_search(model, hook, concept, lexicon, dose_prompts, cfg)
            found = choose_dose(model, direction, search, max_activation, dose_prompts, cfg)
            rows = {pt.condition: asdict(pt) for pt in compare_concept(model, direction, search, prompts, max_activation, found.dose, cfg)}
            steered = rows.get("steering")
            met = steered is not None and steered["within_budget"] and steered["ratio"] >= 5
            table[(hook, concept)] = {"dose": found.dose, "dose_search": found.to_dict(), "conditions": rows, "meets_5x": met,
                                      "seconds": time.perf_counter() - t0}
            print(f"{hook} {concept}: dose {found.dose}; " + "; ".join(
                f"{name} {r['lexicon_frequency']:.2f} ({r['ratio']:.1f}x, any word {r['lexicon_frequency_any_word']:.2f}, ppl x"
                f"{r['perplexity'] / rows['unsteered']['perplexity']:.2f}, rep {r['repetition']:.3f}, {'within' if r['within_budget'] else 'over'})"
                for name, r in rows.items()) + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
            if steered is not None:
                for q, t in list(zip(prompts, steered["texts"]))[:2]:
                    print(f"    [steering] {q} -> {' '.join(t.split())[:150]}")
    print(f"\nthe mean-difference direction alone ({positions} positions): concepts reaching >= 5x within the fair budget")
    for hook in args.hooks:
        met = [c for c in args.concepts if table[(hook, c)]["meets_5x"]]
        cells = []
        for c in args.concepts:
            r = table[(hook, c)]["conditions"].get("steering")
            cells.append(f"{c} -" if r is None else f"{c} {r['ratio']:.1f}x{'' if r['within_budget'] else ' over'}")
        print(f"  {hook}: {len(met)} of {len(args.concepts)} ({', '.join(cells)})")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "mean_difference.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": [{"hook": h, "concept": c, **v} for (h, c), v in table.items()]})
    print(f"{args.out / 'mean_difference.json'}")


def _section(concept, lexicon, search, rows, prompts) -> str:
    feats = "".join(f"<li>f{c.feature} (weight {c.weight:.2f}): {html.escape(c.label)}</li>" for c in search.steered)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in rows)
    stats = "".join(f"<td>concept {r['lexicon_frequency']:.2f} ({r['ratio']:.1f}x), ppl {r['perplexity']:.2f}, rep {r['repetition']:.3f}, "
                    f"{'within budget' if r['within_budget'] else 'over budget'}</td>" for r in rows.values())
    body = "".join("<tr><td>" + html.escape(q) + "</td>" + "".join(f"<td>{html.escape(r['texts'][i])}</td>" for r in rows.values()) + "</tr>"
                   for i, q in enumerate(prompts))
    return (f"<h2>{html.escape(concept)}</h2><p>lexicon: {html.escape(', '.join(lexicon.words))}</p><ul>{feats}</ul>"
            f"<table><tr><th>prompt</th>{head}</tr><tr><td></td>{stats}</tr>{body}</table>")


def _page(sections) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Concept steering</title><style>body{font-family:sans-serif;margin:2em}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}</style></head>"
            f"<body><h1>Concept steering against prompting</h1>{''.join(sections)}</body></html>")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
