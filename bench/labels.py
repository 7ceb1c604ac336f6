"""Label coverage of an SAE: the share of live features with a compact label of held-out F1 >=
0.5 (strong firings and all firings, on the report part; the selection part beside it), by
kind, and the time labelling takes.

    python bench/labels.py --sae runs/default/sae/topk_k32_4608                         # its atlas, its corpus
    python bench/labels.py --sae runs/default/sae/topk_k32_4608 --corpus novel.txt --out runs/labels_novel
        # another kind of text: a fresh atlas (--atlas-tokens) and labels on that corpus's held-out split
        # (--split train for a corpus the SAE never saw, when its held-out 5% is too small)

Prints a table and writes <out>/labels_bench.json (with --corpus, also the atlas and labels.json there).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

from activations.corpus import describe, heldout_corpus
from activations.io import atomic_write_json
from activations.model import ModelLoader
from analysis.features.atlas import AtlasConfig, build_atlas, load_atlas
from analysis.features.cli import split_heldout
from analysis.features.labels import LabelConfig, label_features, save_labels, write_coverage_report
from sae import load_sae


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", type=Path, required=True, help="SAE folder")
    p.add_argument("--corpus", default=None, help="score on this corpus instead (builds an atlas of it in --out)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: <sae>/atlas)")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout",
                   help="split of --corpus to read: 'train' is fine for text the SAE was never trained on (default: %(default)s)")
    p.add_argument("--atlas-tokens", type=int, default=1_000_000, help="atlas size with --corpus (default: %(default)s)")
    p.add_argument("--label-contexts", type=int, default=LabelConfig.n_score_contexts, help="default: %(default)s")
    p.add_argument("--namer", choices=["rules", "model"], default="rules")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    sae = load_sae(args.sae)
    model = ModelLoader(device=args.device).get(sae.cfg.model_name)
    out = args.out or args.sae / "atlas"
    timings = {}
    label_tokens = None  # without --corpus: read after the saved atlas's contexts
    if args.corpus:
        corpus = replace(heldout_corpus(sae.training_data, args.corpus, sae.cfg.context_size), split=args.split)
        split = split_heldout(corpus, model.tokenizer, args.atlas_tokens, args.label_contexts)  # tokenised once
        started = time.perf_counter()
        atlas = build_atlas(sae, model, AtlasConfig(n_tokens=split.atlas_tokens, corpus=corpus, device=args.device), sae_path=str(args.sae),
                            tokens=split.atlas)
        atlas.save(out)
        timings["atlas_s"] = time.perf_counter() - started
        label_contexts, label_tokens = len(split.labels), split.labels
    else:
        atlas, label_contexts = load_atlas(out), args.label_contexts
    started = time.perf_counter()
    labels = label_features(atlas, sae, model, LabelConfig(n_score_contexts=label_contexts, namer=args.namer), tokens=label_tokens)
    timings["labels_s"] = time.perf_counter() - started
    save_labels(labels, out / "labels.json")
    write_coverage_report(labels, out / "labels_coverage.html")
    s = labels.summary
    atomic_write_json(out / "labels_bench.json", {"summary": s.to_json(), "timings": timings, "corpus": describe(atlas.config.corpus),
                                                  "config": asdict(LabelConfig(n_score_contexts=label_contexts, namer=args.namer))})
    print(f"{describe(atlas.config.corpus)}: atlas {atlas.n_tokens:,} tokens; labels chosen on {labels.scored_on.n_contexts // 2} "
          f"contexts, reported on the other {labels.scored_on.n_contexts - labels.scored_on.n_contexts // 2}; {timings}")
    print(f"{'':34} {'report':>8} {'selection':>10}")
    print(f"{'compact, strong F1 >= 0.5':34} {s.share_strong_f1_at_least_half:>8.1%} {s.selection_share_strong:>10.1%}")
    print(f"{'compact, all-firing F1 >= 0.5':34} {s.share_of_live_with_f1_at_least_half:>8.1%} {s.selection_share_all:>10.1%}")
    print(f"{'lookup tables (not counted)':34} {s.lookup_share_strong:>8.1%}")
    print(f"median best strong F1 {s.median_best_strong_f1:.3f}, all {s.median_best_f1:.3f}; "
          f"unexplained {s.unexplained:,} of {s.live_features:,}")
    print("kinds (strong F1 >= 0.5): " + ", ".join(f"{k} {v}" for k, v in sorted(s.strong_kind_counts.items(), key=lambda kv: -kv[1])))
    print("kinds (all F1 >= 0.5):    " + ", ".join(f"{k} {v}" for k, v in sorted(s.best_kind_counts.items(), key=lambda kv: -kv[1])))
    for i in (s.unexplained_examples or [])[:6]:
        print(f"  unexplained f{i}: {labels.best(i).text[:90]} (strong F1 {labels.best(i).scores.strong_f1:.2f})")


if __name__ == "__main__":
    main()
