"""Feature graphs on SmolLM2 through the chain preset's stack (`saewb run --preset chain`):
per prompt family, the time per graph, its faithfulness under mean ablation of everything
outside it, and how often an intervention on a top edge's upstream feature moves the
downstream node the way attribution predicts. Then features across layers (decoder cosine
and co-activation), across widths (a wider SAE at the same hook) and across seeds (the same
SAE retrained from the same store with another seed; without --width-sae, a twice-as-wide SAE
is trained from that store too).

    python bench/inference_chains.py --stack runs/chain/sae --out runs/bench_chains \\
        --width-sae runs/default/sae/topk_k32_4608      # optional: the default run's 4608-latent layer-8 SAE

Targets: a graph of a prompt of up to 32 tokens in <= 60 s; graphs of <= 200 nodes keep
>= 80% of the target metric; sign agreement >= 90% on each graph's top-20 edges.
Writes <out>/chains.json, and each family's first graph as JSON + HTML into <out>/graphs/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from activations import load_model
from activations.generation import encode_prompts
from activations.io import atomic_write_json
from activations.model import logits_with_edit
from analysis import cli
from analysis.circuits.config import MatchConfig
from analysis.circuits.export import feature_cards, write_graph
from analysis.circuits.graph import GraphConfig, logit_target, stack_means, trace
from analysis.circuits.matching import layer_matches, live_features, match_saes
from analysis.circuits.stack import load_stack
from sae import load_sae


@dataclass(frozen=True)
class Prompt:
    text: str
    target: str
    contrast: str | None = None


# Prompts SmolLM2-135M-Instruct completes with the target as its top next token (the bench
# prints the rank, so a prompt that stops holding shows up).
FAMILIES: dict[str, list[Prompt]] = {
    "capital": [Prompt("The capital of France is", " Paris"), Prompt("The capital of Japan is", " Tokyo"),
                Prompt("The capital of Italy is", " Rome")],
    "agreement": [Prompt("The keys to the old cabinet", " are", " is"), Prompt("The girl with the red shoes", " is", " are"),
                  Prompt("The dogs in the garden", " are", " is")],
    "brackets": [Prompt("x = (a + b", ")"), Prompt('She said "hello', '"'), Prompt("values = [1, 2, 3", "]")],
    "python": [Prompt("import numpy as", " np"), Prompt("def add(a, b):\n    return a", " +"),
               Prompt("for i in range(len(items", "))")],
    "long": [Prompt("The Eiffel Tower was finished in 1889 and millions of people visit it every year. "
                    "It stands in the middle of the city of", " Paris")],
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", type=Path, required=True, help="the stack folder (<out>/sae of `saewb run --preset chain`)")
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), help="prompt families (default: all)")
    p.add_argument("--max-nodes", type=int, default=GraphConfig.max_nodes, help="default: %(default)s")
    p.add_argument("--width-sae", type=Path, default=None, help="a wider SAE at one of the stack's hooks, to match against "
                   "(default: train one of twice the width from the stack's store)")
    p.add_argument("--retrain-tokens", type=int, default=None, help="tokens for the wider and the other-seed SAE trained from the "
                   "stack's store (default: as many as the stack's; 0 skips both comparisons)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def rank_of(model, prompt: Prompt) -> tuple[int, float, str]:
    """(rank of the target among next tokens, its probability, the top token) on the clean model."""
    tokens = encode_prompts(model.tokenizer, [prompt.text])[0][None].to(next(model.parameters()).device)
    logits = logits_with_edit(model, tokens)[0, -1]  # the clean model, through the same path as evaluation
    target = logit_target(model.tokenizer, prompt.target).token
    probs = logits.float().softmax(-1)
    rank = int((logits > logits[target]).sum()) + 1
    return rank, float(probs[target]), model.tokenizer.decode([int(logits.argmax())])


def trace_families(model, stack, means, args) -> dict:
    cfg = GraphConfig(max_nodes=args.max_nodes)
    results = {}
    for family in args.families:
        rows = []
        for k, prompt in enumerate(FAMILIES[family]):
            rank, prob, top = rank_of(model, prompt)
            target = logit_target(model.tokenizer, prompt.target, prompt.contrast)
            graph = trace(model, stack, prompt.text, target, cfg, means=means)
            cards = feature_cards(graph)  # fills the node labels the chain is read out with
            if k == 0:
                write_graph(graph, args.out / "graphs" / family, model_name=stack.model_name, cards=cards)
            row = {"prompt": prompt.text, "target": target.text, "n_tokens": len(graph.tokens), "rank": rank, "p_target": prob,
                   "top_token": top, "seconds": graph.seconds, "n_nodes": graph.n_nodes, "n_edges": len(graph.edges),
                   "faithfulness": graph.faithfulness, "sign_agreement": graph.interventions.sign_agreement,
                   "correlation": graph.interventions.correlation, "metric": graph.metric,
                   "n_features": sum(n.kind == "feature" for n in graph.nodes), "chain": graph.chain_text()}
            rows.append(row)
            print(f"[{family}] {prompt.text!r} -> {target.text!r} (rank {rank}, p {prob:.2f}, top {top!r}): {graph.summary()}")
            print("  faithfulness by node budget: " + ", ".join(
                f"{graph.metric['nodes_top'][b]} nodes {graph.metric['faithfulness_' + b]:.1%}" for b in graph.metric["nodes_top"]))
            print("  chain: " + row["chain"].replace("\n", "\n  "))
        results[family] = rows
    return results


def family_table(results: dict) -> str:
    lines = ["| family | graphs | tokens | seconds (max) | nodes | faithfulness min / median / max | sign agreement min / median | correlation median |",
             "|---|---|---|---|---|---|---|---|"]
    every = [r for rows in results.values() for r in rows]
    for name, rows in [*results.items(), ("all", every)]:
        f = sorted(r["faithfulness"] for r in rows)
        s = sorted(r["sign_agreement"] for r in rows)
        c = [r["correlation"] for r in rows if r["correlation"] == r["correlation"]]
        lines.append(f"| {name} | {len(rows)} | {max(r['n_tokens'] for r in rows)} | {max(r['seconds'] for r in rows):.1f} | "
                     f"{max(r['n_nodes'] for r in rows)} | {f[0]:.1%} / {statistics.median(f):.1%} / {f[-1]:.1%} | "
                     f"{s[0]:.0%} / {statistics.median(s):.0%} | {statistics.median(c) if c else float('nan'):.3f} |")
    lines.append(f"graphs meeting faithfulness >= 80%: {sum(r['faithfulness'] >= 0.8 for r in every)}/{len(every)}; "
                 f"sign agreement >= 90%: {sum(r['sign_agreement'] >= 0.9 for r in every)}/{len(every)}; "
                 f"<= 60 s: {sum(r['seconds'] <= 60 for r in every)}/{len(every)}")
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
    stack = load_stack(args.stack)
    model = load_model(stack.model_name or "smollm2", device=args.device)
    stack.to(next(model.parameters()).device)
    torch.set_grad_enabled(True)
    started = time.perf_counter()
    means = stack_means(model, stack, n_tokens=GraphConfig.mean_tokens, cache=args.stack / "means.safetensors")
    means_s = time.perf_counter() - started
    print(f"held-out means over {means.n_tokens:,} tokens: {means_s:.0f} s (cached in {args.stack / 'means.safetensors'})")
    results = trace_families(model, stack, means, args)
    print(family_table(results))

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
    atomic_write_json(args.out / "chains.json", {"families": results, "layers": layers.to_dict(), "layers_seconds": layers_s,
                                                 "widths": width, "seeds": seeds, "means_seconds": means_s,
                                                 "settings": {k: str(v) for k, v in vars(args).items()}})
    print(f"results: {args.out / 'chains.json'}; graphs: {args.out / 'graphs'}")


if __name__ == "__main__":
    main()
