"""Where SmolLM2 steers: output scores and concept steering per depth, on a stack of SAEs
(the chain preset's, `saewb run --preset chain`, one SAE every few layers).

    python bench/steering_depth.py --stack runs/chain/sae --out runs/bench_depth

1. **Output scores** (Arad, Mueller & Belinkov 2025): for a seeded sample of each SAE's live,
   not-dense features, the feature is amplified (clamped to `--amplify` x its max activation,
   every position but 0) on neutral chat prompts, and the next-token distribution at the start
   of the answer is read: for the most probable of its top-20 logit-lens tokens, (1 - rank/|V|)
   x its probability, averaged over the prompts. Per layer: the median, and the share of
   features above 0.01 (output features).
2. **Concept steering per depth**: for each concept (lexicons fixed in advance, those of
   bench/concept_steering.py) and each layer of `--concept-layers`, the concept search and the
   dose search on the tuning prompts (`analysis.steering.concept`), with the steering mode and
   positions given; the score is the best share of answers showing the concept (lexicon,
   the request's words not counted) among the doses within the fair fluency budget
   (perplexity given the concept prompt, repetition from the floor), against the unsteered and
   prompted answers on the same prompts.

Every choice here is made on the tuning prompts; bench/concept_steering.py reports on others.
Writes <out>/depth.json and <out>/steering_depth.html (standalone plotly).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from activations import load_model
from activations.generation import encode_prompts
from activations.hooks import residual_depth
from activations.io import atomic_write_bytes, atomic_write_json
from analysis.circuits.stack import stack_paths
from analysis.features.atlas import load_atlas
from analysis.features.labels import load_labels
from analysis.steering.concept import CONCEPT_MODES, TUNING_PROMPTS, ConceptConfig, Lexicon, choose_dose, output_scores, search_concept
from analysis.steering.interventions import POSITIONS
from sae import load_sae

sys.path.insert(0, str(Path(__file__).parent))
from concept_steering import CONCEPTS  # noqa: E402


def layer_output_scores(model, sae, atlas, prompts, n_features: int, amplify: float, seed: int) -> torch.Tensor:
    """Output scores [n] of a seeded sample of the SAE's live features of density <= 2%."""
    usable = ((atlas.max_activation > 0) & (atlas.density <= 0.02)).nonzero().squeeze(-1)
    pick = usable[torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))[:n_features]].sort().values
    any_token = [int(model.tokenizer(" the", add_special_tokens=False)["input_ids"][0])]  # the concept gain is not used here
    return output_scores(model, sae, pick.tolist(), prompts, atlas.max_activation, any_token, amplify=amplify, top_k=20).output_score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", required=True, help="folder of one SAE per hook, each with its atlas and labels (saewb run --preset chain)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="only the SAEs at these layers (default: all)")
    p.add_argument("--features-per-layer", type=int, default=96, help="features sampled per SAE for the output scores (0: skip them)")
    p.add_argument("--amplify", type=float, default=10.0, help="output score: clamp value in multiples of the feature's max activation")
    p.add_argument("--concepts", nargs="*", default=list(CONCEPTS), help=f"a subset of {list(CONCEPTS)} (none: output scores only)")
    p.add_argument("--concept-layers", type=int, nargs="+", default=None, help="layers of the concept part (default: every SAE's)")
    p.add_argument("--mode", choices=CONCEPT_MODES, default=ConceptConfig.mode)
    p.add_argument("--positions", choices=POSITIONS, default=ConceptConfig.positions)
    p.add_argument("--tuning-prompts", type=int, default=8, help="the first N tuning prompts (of 12)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench_depth"))
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DEPTH_JSON",
                   help="no measuring: merge the layers of earlier runs' depth.json (e.g. output scores from one, concepts from "
                        "another) into <out>/depth.json and the figure")
    args = p.parse_args()
    if args.merge:
        rows = merge([json.loads(path.read_text())["layers"] for path in args.merge])
        args.concepts = list(dict.fromkeys(c for r in rows for c in r["concepts"]))
        write(rows, args)
        return
    unknown = [c for c in args.concepts if c not in CONCEPTS]
    if unknown:
        raise SystemExit(f"unknown concept(s) {unknown}: choose from {list(CONCEPTS)}")

    started = time.perf_counter()
    model = load_model("smollm2", "cpu")
    tuning = TUNING_PROMPTS[:args.tuning_prompts]
    chat = encode_prompts(model.tokenizer, tuning, chat=True)
    cfg = ConceptConfig(mode=args.mode, positions=args.positions)
    cfg.generation.max_new_tokens = args.max_new_tokens
    rows = []
    for path in stack_paths(args.stack):
        sae = load_sae(path).eval()
        hook = sae.cfg.hook_name
        layer = int(hook.split(".")[1])
        if args.layers is not None and layer not in args.layers:
            continue
        depth = int(residual_depth(hook))
        atlas = load_atlas(path / "atlas")
        t0 = time.perf_counter()
        row = {"hook": hook, "depth": depth, "n_features": 0, "output_score_median": float("nan"), "output_score_mean": float("nan"),
               "output_features": float("nan"), "output_scores": [], "concepts": {}}
        if args.features_per_layer > 0:
            scores = layer_output_scores(model, sae, atlas, chat[:4], args.features_per_layer, args.amplify, args.seed)
            row.update({"n_features": len(scores), "output_score_median": float(scores.median()), "output_score_mean": float(scores.mean()),
                        "output_features": float((scores > 0.01).float().mean()), "output_scores": scores.tolist()})
            print(f"{hook}: output score median {row['output_score_median']:.4f}, mean {row['output_score_mean']:.4f}, "
                  f"share > 0.01 {row['output_features']:.2f}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        if args.concepts and (args.concept_layers is None or layer in args.concept_layers):
            labels = load_labels(path / "atlas" / "labels.json") if (path / "atlas" / "labels.json").exists() else None
            for concept in args.concepts:
                t1 = time.perf_counter()
                lexicon = Lexicon(concept, tuple(CONCEPTS[concept].split()))
                search = search_concept(concept, model, sae, atlas, labels, lexicon, prompts=tuning, cfg=cfg)
                if not search.steered:
                    row["concepts"][concept] = {"steered": 0}
                    print(f"  {concept}: no feature raises the lexicon", flush=True)
                    continue
                dose = choose_dose(model, sae, search, atlas.max_activation, prompts=tuning, cfg=cfg)
                within = [pt.concept_frequency for pt in dose.points if pt.within_budget]
                best = max(within, default=0.0)
                row["concepts"][concept] = {"steered": len(search.steered), "best_within_budget": best, "dose": dose.dose,
                                            "unsteered": dose.unsteered_frequency, "prompting": dose.prompting.concept_frequency,
                                            "dose_search": dose.to_dict()}
                print(f"  {concept}: best within budget {best:.2f} at dose {dose.dose} (unsteered {dose.unsteered_frequency:.2f}, "
                      f"prompting {dose.prompting.concept_frequency:.2f}); doses "
                      + ", ".join(f"{pt.dose:.2g}{'' if pt.within_budget else '!'}:{pt.concept_frequency:.2f}" for pt in dose.points)
                      + f"  [{time.perf_counter() - t1:.0f} s]", flush=True)
        rows.append(row)

    write(rows, args)
    print(f"total {time.perf_counter() - started:.0f} s")


def merge(runs: list[list[dict]]) -> list[dict]:
    """One row per hook from several runs' rows: output scores from the run that measured them,
    the concepts of all."""
    by_hook: dict[str, dict] = {}
    for rows in runs:
        for r in rows:
            row = by_hook.setdefault(r["hook"], {**r, "concepts": {}})
            if r["n_features"] and not row["n_features"]:
                row.update({k: r[k] for k in ("n_features", "output_score_median", "output_score_mean", "output_features", "output_scores")})
            row["concepts"].update(r["concepts"])
    return sorted(by_hook.values(), key=lambda r: r["depth"])


def write(rows: list[dict], args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "depth.json", {"args": {k: str(v) for k, v in vars(args).items()}, "layers": rows})
    atomic_write_bytes(args.out / "steering_depth.html", page(rows, args).encode())
    print(f"\n{'depth':>5} {'hook':<26} {'median':>8} {'> 0.01':>7}  " + " ".join(f"{c:>8}" for c in args.concepts))
    for r in rows:
        cells = [f"{r['concepts'][c]['best_within_budget']:.2f}" if c in r["concepts"] and "best_within_budget" in r["concepts"][c]
                 else ("none" if c in r["concepts"] else "-") for c in args.concepts]
        print(f"{r['depth']:>5} {r['hook']:<26} {r['output_score_median']:>8.4f} {r['output_features']:>7.2f}  "
              + " ".join(f"{c:>8}" for c in cells))
    print(f"{args.out / 'depth.json'}\n{args.out / 'steering_depth.html'}")


def page(rows: list[dict], args) -> str:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("output scores of sampled features (Arad et al.)",
                                                        f"concept steering on the tuning prompts ({args.mode}, {args.positions} positions)"))
    n_layers = 30
    for r in rows:
        fig.add_trace(go.Box(y=r["output_scores"], x=[f"{r['depth']}/{n_layers}"] * len(r["output_scores"]), name=r["hook"],
                             showlegend=False, boxpoints=False), row=1, col=1)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for n, concept in enumerate(args.concepts):
        color = palette[n % len(palette)]
        measured = [r for r in rows if concept in r["concepts"]]
        pts = [(r["depth"], r["concepts"][concept].get("best_within_budget", 0.0)) for r in measured]
        if pts:
            fig.add_trace(go.Scatter(x=[d for d, _ in pts], y=[v for _, v in pts], mode="lines+markers", name=f"{concept}: steering",
                                     line=dict(color=color)), row=1, col=2)
            prompted = [r["concepts"][concept]["prompting"] for r in measured if "prompting" in r["concepts"][concept]]
            if prompted:
                fig.add_trace(go.Scatter(x=[pts[0][0], pts[-1][0]], y=[prompted[0]] * 2, mode="lines", name=f"{concept}: prompting",
                                         line=dict(color=color, dash="dash", width=1)), row=1, col=2)
    fig.update_yaxes(type="log", title_text="output score", row=1, col=1)
    fig.update_xaxes(title_text="depth (blocks before the hook / 30)", row=1, col=1)
    fig.update_xaxes(title_text="depth (blocks before the hook)", row=1, col=2)
    fig.update_yaxes(title_text="best share of answers within budget", range=[0, 1.05], row=1, col=2)
    fig.update_layout(title="Where SmolLM2 steers", height=520, width=1200, template="plotly_white")
    scored = [r for r in rows if r["n_features"]]
    note = ("<p>Left: each SAE's sampled features amplified to 10x their max activation; share of output features (score above 0.01) "
            + ", ".join(f"layer {r['hook'].split('.')[1]} {r['output_features']:.0%}" for r in scored)
            + ". Right: the best share of tuning answers showing the concept among the doses within the fair fluency budget; dashed: "
            "prompting on the same prompts.</p>") if scored else ""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Where SmolLM2 steers</title></head><body>"
            + fig.to_html(full_html=False, include_plotlyjs="inline") + note + "</body></html>")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
