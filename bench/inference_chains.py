"""Feature graphs on SmolLM2 through the chain preset's stack (`saewb run --preset chain`), on a
tuning prompt set (where method choices are made) and a separate report prompt set (what the
README quotes), each of several families. A prompt counts only when its target is the model's
top next token; the others are listed and left out.

Per graph: faithfulness with error nodes recomputed in the ablated run (the headline), with them
frozen at their clean values, and the graph's features with no / every error node; whether it
passes |1 - F| <= 0.2 (undefined when ablating everything barely moves the target);
circuit-tracer's replacement and completeness scores on the kept nodes (and, with --whole-graph-scores on the
transcoder basis, on the whole graph before pruning, as circuit-tracer computes them); the post-activation edge check (sign
agreement and rank correlation on the strongest distinct feature -> feature edges, upstream
ablated, and every edge type apart); the nodes by kind; and the times: `trace` alone, the
feature cards and files, the model load and the held-out means, each apart.

Then, with --matching: features across layers (decoder cosine and co-activation), across widths
(a wider SAE at the same hook) and across seeds (the same SAE retrained from the same store with
another seed; without --width-sae, a twice-as-wide SAE is trained from that store too).

    python bench/inference_chains.py --stack runs/chain/sae --out runs/bench_chains --sets tuning report
    python bench/inference_chains.py --transcoders runs/tc --out runs/bench_tc --sets report   # the transcoder basis

Targets (report set): median faithfulness >= 0.8 with error nodes recomputed at <= 200 feature
nodes; sign agreement >= 90% and rank correlation >= 0.7 on each graph's top-20 distinct edges;
a graph of <= 32 tokens in <= 60 s.
Writes <out>/chains.json, and each family's first graph as JSON + HTML into <out>/graphs/<set>/.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from activations import load_model
from activations.io import atomic_write_json
from analysis import cli
from analysis.circuits.config import MatchConfig
from analysis.circuits.export import feature_cards, write_graph
from analysis.circuits.graph import GraphConfig, logit_target, stack_means, trace
from analysis.circuits.interventions import headline
from analysis.circuits.matching import layer_matches, live_features, match_saes
from analysis.circuits.means import transcoder_means
from analysis.circuits.replacement import TranscoderSet, load_transcoders
from analysis.circuits.stack import load_stack
from analysis.circuits.targets.logit import next_token_rank
from analysis.circuits.transcoder_graph import trace_transcoders
from sae import load_sae


@dataclass(frozen=True)
class Prompt:
    text: str
    target: str
    contrast: str | None = None


# Where method choices were made (the attribution method, integrated gradients' steps, the
# per-hook ranking, the number of hooks a graph cuts at). Most of these prompts were in the
# bench when the earlier choices were made.
TUNING: dict[str, list[Prompt]] = {
    "capital": [Prompt("The capital of France is", " Paris"), Prompt("The capital of Japan is", " Tokyo"),
                Prompt("The capital of Italy is", " Rome")],
    "agreement": [Prompt("The keys to the old cabinet", " are", " is"), Prompt("The girl with the red shoes", " is", " are"),
                  Prompt("The dogs in the garden", " are", " is")],
    "brackets": [Prompt("x = (a + b", ")"), Prompt('She said "hello', '"'), Prompt("values = [1, 2, 3", "]")],
    "python": [Prompt("import numpy as", " np"), Prompt("def add(a, b):\n    return a", " +"),
               Prompt("for i in range(len(items", "))")],
    "names": [Prompt("When Alice and Bob went to the park, Bob gave a ball to", " Alice", " Bob"),
              Prompt("Sarah and David were talking. David passed the phone to", " Sarah", " David")],
    "sequence": [Prompt("A, B, C, D,", " E"), Prompt("Monday, Tuesday, Wednesday,", " Thursday")],
    "long": [Prompt("The Eiffel Tower was finished in 1889 and millions of people visit it every year. "
                    "It stands in the middle of the city of", " Paris")],
}

# What the README reports: prompts written for this set, none of them looked at while choosing methods.
REPORT: dict[str, list[Prompt]] = {
    "capital": [Prompt("The capital of Germany is", " Berlin"), Prompt("The capital of Spain is", " Madrid"),
                Prompt("The capital of Egypt is", " Cairo"), Prompt("The capital of Russia is", " Moscow")],
    "agreement": [Prompt("The books on the shelf", " are", " is"), Prompt("The teacher of the students", " is", " are"),
                  Prompt("The cars near the house", " are", " is"), Prompt("The man with the dogs", " is", " are")],
    "names": [Prompt("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
              Prompt("After Lisa and Mark had lunch, Mark gave the book to", " Lisa", " Mark"),
              Prompt("Tom and Anna cooked dinner. Then Anna handed the plate to", " Tom", " Anna")],
    "brackets": [Prompt("y = [a, b, c", "]"), Prompt("result = max(a, b", ")"), Prompt("print('done", "')")],
    "python": [Prompt("import pandas as", " pd"), Prompt("import matplotlib.pyplot as", " plt"),
               Prompt("for key, value in data.", "items")],
    "opposites": [Prompt("The opposite of hot is", " cold"), Prompt("The opposite of up is", " down"),
                  Prompt("The opposite of big is", " small")],
    "sequence": [Prompt("January, February, March,", " April"), Prompt("one, two, three, four,", " five"),
                 Prompt("a, b, c, d,", " e")],
    "long": [Prompt("The Great Wall was built over many centuries to protect the northern border, and today it is one of the most "
                    "famous sights in the country of", " China"),
             Prompt("The Colosseum was completed in 80 AD and it could hold tens of thousands of people. Today tourists visit it "
                    "in the city of", " Rome")],
}
SETS = {"tuning": TUNING, "report": REPORT}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--stack", type=Path, help="the stack folder (<out>/sae of `saewb run --preset chain`): the residual basis")
    where.add_argument("--transcoders", type=Path, help="the folder of `saewb transcoders`: the transcoder basis")
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--sets", nargs="*", default=["tuning", "report"], choices=list(SETS), help="prompt sets (default: both; "
                   "none with --matching: only the matching)")
    p.add_argument("--families", nargs="+", default=None, help="only these families (default: every family of each set)")
    p.add_argument("--max-feature-nodes", type=int, default=GraphConfig.max_feature_nodes, help="default: %(default)s")
    p.add_argument("--budgets", type=int, nargs="+", default=GraphConfig().budgets, help="smaller feature budgets whose "
                   "faithfulness is also reported, with the same ranking (default: %(default)s)")
    p.add_argument("--n-hooks", type=int, nargs="+", default=[GraphConfig.n_hooks], help="hooks each graph cuts at, evenly spaced "
                   "(0: every hook of the stack); several values trace every prompt once per value (default: %(default)s)")
    p.add_argument("--transcoder-ablation", nargs="+", default=[GraphConfig.transcoder_ablation], choices=("mean", "zero"),
                   help="with --transcoders: what a removed node is set to; several values trace every prompt once per value "
                        "(default: %(default)s)")
    p.add_argument("--whole-graph-scores", action="store_true", help="with --transcoders: also the replacement and completeness "
                   "scores as circuit-tracer computes them, on the whole graph before pruning (every active feature and error node)")
    p.add_argument("--ig-steps", type=int, default=GraphConfig.ig_steps, help="default: %(default)s (0: gradient x activation)")
    p.add_argument("--matching", action="store_true", help="also match features across layers, widths and seeds")
    p.add_argument("--width-sae", type=Path, default=None, help="with --matching: a wider SAE at one of the stack's hooks, to match "
                   "against (default: train one of twice the width from the stack's store)")
    p.add_argument("--retrain-tokens", type=int, default=None, help="with --matching: tokens for the wider and the other-seed SAE "
                   "trained from the stack's store (default: as many as the stack's; 0 skips both comparisons)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def rank_of(model, prompt: Prompt) -> tuple[int, float, str]:
    """(rank of the target among next tokens, its probability, the top token) on the clean model."""
    return tuple(next_token_rank(model, prompt.text, logit_target(model.tokenizer, prompt.target).token))


def graph_row(graph, prompt: Prompt, rank: int, prob: float, cards_s: float) -> dict:
    m, checks = graph.metric, headline(graph.interventions)
    return {"prompt": prompt.text, "target": graph.target.text, "n_tokens": len(graph.tokens), "rank": rank, "p_target": prob,
            "trace_seconds": graph.seconds, "cards_and_files_seconds": cards_s, "nodes": graph.counts(), "n_edges": len(graph.edges),
            "kept_share_of_active": graph.counts()["feature"] / max(1, m["active_features"]),
            "error_share": graph.error_share(), "faithfulness": graph.faithfulness, "passes": graph.passes,
            "faithfulness_frozen": m["faithfulness_graph_frozen"], "faithfulness_no_errors": m["faithfulness_graph_no_errors"],
            "faithfulness_all_errors": m["faithfulness_graph_all_errors"],
            "faithfulness_by_budget": {str(m["nodes_top"][k]): m["faithfulness_" + k] for k in m["nodes_top"]},
            "replacement": graph.scores["replacement"], "completeness": graph.scores["completeness"],
            "replacement_whole": graph.scores.get("replacement_whole", float("nan")),
            "completeness_whole": graph.scores.get("completeness_whole", float("nan")),
            "whole_features": graph.scores.get("whole_features"), "whole_seconds": graph.scores.get("whole_seconds"),
            "sign_agreement": checks["sign_agreement"], "rank_correlation": checks["rank_correlation"], "edges_by_type": checks["by_type"],
            "metric": m, "chain": graph.chain_text()}


def trace_set(model, stack, means, args, name: str, n_hooks: int, ablation: str = "mean") -> tuple[dict, list[dict]]:
    """Every prompt of the set whose target is the model's top token, traced: ({family: rows}, the prompts left out).
    `stack` is an SAE stack (the residual basis) or a `TranscoderSet` (the transcoder basis, `n_hooks` unused, `means`
    its `TranscoderMeans`, `ablation` what a removed node is set to)."""
    transcoder_basis = isinstance(stack, TranscoderSet)
    basis = f"transcoders_{ablation}" if transcoder_basis else f"{n_hooks or len(stack)}hooks"
    cfg = GraphConfig(max_feature_nodes=args.max_feature_nodes, ig_steps=args.ig_steps, n_hooks=n_hooks, transcoder_ablation=ablation,
                      budgets=args.budgets, whole_graph_scores=transcoder_basis and args.whole_graph_scores)
    results, left_out = {}, []
    for family, prompts in SETS[name].items():
        if args.families and family not in args.families:
            continue
        rows = []
        for prompt in prompts:
            try:
                rank, prob, top = rank_of(model, prompt)
            except ValueError as error:  # a target of several tokens
                left_out.append({"family": family, "prompt": prompt.text, "target": prompt.target, "why": str(error)})
                print(f"[{name}/{family}] left out: {error}")
                continue
            if rank != 1:
                left_out.append({"family": family, "prompt": prompt.text, "target": prompt.target, "rank": rank, "top_token": top})
                print(f"[{name}/{family}] left out: {prompt.text!r} -> {prompt.target!r} is rank {rank}; the model's top token is {top!r}")
                continue
            target = logit_target(model.tokenizer, prompt.target, prompt.contrast)
            if transcoder_basis:
                graph = trace_transcoders(model, stack, prompt.text, target, cfg, means=means)
            else:
                graph = trace(model, stack, prompt.text, target, cfg, means=means)
            started = time.perf_counter()
            cards = feature_cards(graph)  # fills the node labels the chain is read out with
            if not rows:
                write_graph(graph, args.out / "graphs" / f"{name}_{basis}" / family, model_name=stack.model_name, cards=cards)
            row = graph_row(graph, prompt, rank, prob, time.perf_counter() - started)
            rows.append(row)
            print(f"[{name}/{family}/{basis}] {prompt.text!r} -> {target.text!r} (p {prob:.2f}):\n  " + graph.summary().replace("\n", "\n  "))
            print("  by edge type, upstream ablated: " + "; ".join(
                f"{kind} {v['sign_agreement']:.0%} / {v['rank_correlation']:.2f} (n {v['n_edges']})" for kind, v in row["edges_by_type"].items()))
            print("  chain: " + row["chain"].replace("\n", "\n  "))
        if rows:
            results[family] = rows
    return results, left_out


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def set_table(results: dict) -> str:
    """Per family and over all: faithfulness (recomputed) min / median / max, passes and undefined,
    the other definitions' medians, the graph scores, the edge check, nodes and time."""
    lines = ["| family | graphs | F recomputed min / median / max | pass | undefined | F frozen | F no errors | F all errors | "
             "replacement | completeness | sign agr. f->f (min / median) | rank corr. f->f (median) | features / errors | share of active kept | "
             "trace s (max) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    every = [r for rows in results.values() for r in rows]
    for name, rows in [*results.items(), ("all", every)]:
        f = sorted(r["faithfulness"] for r in rows if math.isfinite(r["faithfulness"]))
        span = f"{f[0]:.2f} / {statistics.median(f):.2f} / {f[-1]:.2f}" if f else "undefined"
        signs = [r["sign_agreement"] for r in rows if math.isfinite(r["sign_agreement"])]
        lines.append(
            f"| {name} | {len(rows)} | {span} | {sum(r['passes'] for r in rows)} | {sum(not math.isfinite(r['faithfulness']) for r in rows)} | "
            f"{_median([r['faithfulness_frozen'] for r in rows]):.2f} | {_median([r['faithfulness_no_errors'] for r in rows]):.2f} | "
            f"{_median([r['faithfulness_all_errors'] for r in rows]):.2f} | {_median([r['replacement'] for r in rows]):.3f} | "
            f"{_median([r['completeness'] for r in rows]):.2f} | "
            f"{(min(signs) if signs else float('nan')):.0%} / {_median(signs):.0%} | {_median([r['rank_correlation'] for r in rows]):.2f} | "
            f"{_median([r['nodes']['feature'] for r in rows]):.0f} / {_median([r['nodes']['error'] for r in rows]):.0f} | "
            f"{_median([r['kept_share_of_active'] for r in rows]):.0%} | {max(r['trace_seconds'] for r in rows):.1f} |")
    if any(math.isfinite(r["replacement_whole"]) for r in every):
        lines.append("circuit-tracer's scores on the whole graph before pruning (every active feature and error node), median per family: " + "; ".join(
            f"{name} replacement {_median([r['replacement_whole'] for r in rows]):.3f}, completeness {_median([r['completeness_whole'] for r in rows]):.2f}"
            for name, rows in [*results.items(), ("all", every)])
            + f" (median {_median([r['whole_features'] for r in every]):.0f} features, {_median([r['whole_seconds'] for r in every]):.0f} s per graph)")
    types = sorted({t for r in every for t in r["edges_by_type"]})
    lines.append("edge check by type, upstream ablated (median over graphs of sign agreement / rank correlation): " + "; ".join(
        f"{t} {_median([r['edges_by_type'][t]['sign_agreement'] for r in every if t in r['edges_by_type']]):.0%} / "
        f"{_median([r['edges_by_type'][t]['rank_correlation'] for r in every if t in r['edges_by_type']]):.2f}" for t in types))
    lines.append(f"graphs passing |1 - F| <= 0.2 (recomputed): {sum(r['passes'] for r in every)}/{len(every)}; frozen: "
                 f"{sum(math.isfinite(r['faithfulness_frozen']) and abs(1 - r['faithfulness_frozen']) <= 0.2 for r in every)}/{len(every)}; "
                 f"sign agreement >= 90%: {sum(r['sign_agreement'] >= 0.9 for r in every)}/{len(every)}; rank correlation >= 0.7: "
                 f"{sum(r['rank_correlation'] >= 0.7 for r in every)}/{len(every)}; <= 60 s: {sum(r['trace_seconds'] <= 60 for r in every)}/{len(every)}")
    return "\n".join(lines)


def _retrained(stack, args, name: str, d_sae: int, seed: int):
    """The stack SAE at the default layer (else the middle one), trained again from its own store with
    another width or seed, the other settings as they were: (its index in the stack, the new SAE, seconds)."""
    hooks = stack.hooks
    hook = "blocks.8.hook_resid_post" if "blocks.8.hook_resid_post" in hooks else hooks[len(hooks) // 2]
    index = hooks.index(hook)
    path, sae = stack.paths[index], stack.saes[index]
    store = Path(sae.training_data.get("store", args.stack.parent / "activations" / hook))
    if not store.exists():
        print(f"{name} comparison skipped: no store at {store}")
        return index, None, 0.0
    trained = json.loads((path.parent / "train_summary.json").read_text()).get("config", {})
    n_tokens = args.retrain_tokens or trained.get("n_tokens", 500_000)
    started = time.perf_counter()
    retrained = cli.main(["train", "--out", str(args.out / name), "--store", str(store), "--device", args.device,
                          "--architecture", sae.cfg.architecture, "--d-sae", str(d_sae), "--k", str(sae.cfg.k),
                          "--train-tokens", str(n_tokens), "--batch-size", str(trained.get("batch_size", 4096)),
                          "--seed", str(seed)])[0]
    return index, load_sae(retrained), time.perf_counter() - started


def compare(stack, index: int, other, label: str, seconds: float) -> dict:
    """Both directions of a decoder-cosine match between the stack's SAE at `index` and `other`."""
    sae, live = stack.saes[index], live_features(stack.paths[index])
    threshold = MatchConfig.threshold
    forward, backward = match_saes(sae, other, threshold, live), match_saes(other, sae, threshold, None, live)
    print(f"{label} at {sae.cfg.hook_name} ({sae.cfg.d_sae} -> {other.cfg.d_sae} latents, trained in {seconds:.0f} s): {forward.summary()}")
    print(f"  the other way ({other.cfg.d_sae} -> {sae.cfg.d_sae}): {backward.summary()}")
    return {"hook": sae.cfg.hook_name, "seconds": seconds, "forward": _pair(forward), "backward": _pair(backward)}


def _pair(result) -> dict:
    return {"threshold": result.threshold, "share_matched": result.share_matched, "share_mutual": result.share_mutual,
            "share_matched_b": result.share_matched_b, "median_cosine": result.median_cosine,
            "n_live_a": result.n_live_a, "n_live_b": result.n_live_b}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.transcoders:
        return main_transcoders(args)
    stack = load_stack(args.stack)
    started = time.perf_counter()
    model = load_model(stack.model_name or "smollm2", device=args.device)
    load_s = time.perf_counter() - started
    stack.to(next(model.parameters()).device)
    torch.set_grad_enabled(True)
    cache = args.stack / "means.safetensors"
    cached = cache.exists()
    started = time.perf_counter()
    means = stack_means(model, stack, n_tokens=GraphConfig.mean_tokens, cache=cache)
    means_s = time.perf_counter() - started
    print(f"model load {load_s:.0f} s; held-out means over {means.n_tokens:,} tokens {means_s:.1f} s "
          f"({'read from' if cached else 'computed, cached in'} {cache})")
    sets, tables = {}, {}
    for name in args.sets:
        for n_hooks in args.n_hooks:
            key = f"{name}, {n_hooks or len(stack)} hooks"
            results, left_out = trace_set(model, stack, means, args, name, n_hooks)
            tables[key] = set_table(results)
            sets[key] = {"families": results, "left_out": left_out, "n_hooks": n_hooks or len(stack)}
    print_tables(sets, tables)
    record = {"sets": sets, "tables": tables, "model_load_seconds": load_s, "means_seconds": means_s, "means_cached": cached,
              "settings": {k: str(v) for k, v in vars(args).items()}}
    if args.matching:
        record |= matching(model, stack, args)
    atomic_write_json(args.out / "chains.json", record)
    print(f"results: {args.out / 'chains.json'}; graphs: {args.out / 'graphs'}")


def print_tables(sets: dict, tables: dict) -> None:
    for key, table in tables.items():
        results, left_out = sets[key]["families"], sets[key]["left_out"]
        print(f"\n{key} ({sum(len(r) for r in results.values())} graphs in {len(results)} families; "
              f"{len(left_out)} prompts left out, their target not the top token):\n{table}")


def main_transcoders(args: argparse.Namespace) -> None:
    """The prompt sets on the transcoder basis, once per `--transcoder-ablation`."""
    transcoders = load_transcoders(args.transcoders)
    started = time.perf_counter()
    model = load_model(transcoders.model_name or "smollm2", device=args.device)
    load_s = time.perf_counter() - started
    cache = args.transcoders / "means.safetensors"
    cached = cache.exists()
    started = time.perf_counter()
    means = transcoder_means(model, transcoders, n_tokens=GraphConfig.mean_tokens, cache=cache) if "mean" in args.transcoder_ablation else None
    means_s = time.perf_counter() - started
    torch.set_grad_enabled(True)
    measured = "no held-out means (zero ablation only)" if means is None else \
        f"held-out means over {means.n_tokens:,} tokens {means_s:.1f} s ({'cache file existed' if cached else 'computed'})"
    print(f"model load {load_s:.0f} s; {measured}; {len(transcoders)} transcoders from {args.transcoders}")
    sets, tables = {}, {}
    for name in args.sets:
        for ablation in args.transcoder_ablation:
            key = f"{name}, transcoder basis, {ablation}-ablated"
            results, left_out = trace_set(model, transcoders, means, args, name, 0, ablation)
            tables[key] = set_table(results)
            sets[key] = {"families": results, "left_out": left_out, "basis": "transcoder", "ablation": ablation}
    print_tables(sets, tables)
    atomic_write_json(args.out / "chains.json", {"sets": sets, "tables": tables, "model_load_seconds": load_s, "means_seconds": means_s,
                                                 "means_cached": cached, "settings": {k: str(v) for k, v in vars(args).items()}})
    print(f"results: {args.out / 'chains.json'}; graphs: {args.out / 'graphs'}")


def matching(model, stack, args) -> dict:
    """Features matched across the stack's layers, and at one hook across widths and seeds."""
    started = time.perf_counter()
    layers = layer_matches(model, stack)
    layers_s = time.perf_counter() - started
    print(layers.table() + f"\n(layer matching {layers_s:.0f} s)")
    width = seeds = None
    if args.width_sae:  # a wider SAE trained before, at one of the stack's hooks
        wide = load_sae(args.width_sae)
        width = compare(stack, stack.hooks.index(wide.cfg.hook_name), wide, "widths", 0.0)
    elif args.retrain_tokens != 0:
        index, wide, seconds = _retrained(stack, args, "width", 2 * stack.saes[0].cfg.d_sae, 0)
        width = compare(stack, index, wide, "widths", seconds) if wide is not None else None
    if args.retrain_tokens != 0:
        index, other, seconds = _retrained(stack, args, "seed", stack.saes[0].cfg.d_sae, 100)
        seeds = compare(stack, index, other, "seeds", seconds) if other is not None else None
    return {"layers": layers.to_dict(), "layers_seconds": layers_s, "widths": width, "seeds": seeds}


if __name__ == "__main__":
    main()
