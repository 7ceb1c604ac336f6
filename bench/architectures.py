"""Architectures side by side on one store: held-out FVU, CE recovered, dead fraction and
first-letter absorption (`analysis.evaluation.absorption`) of SAEs trained from the same
batches, in one pass (`saewb train --architecture a b ...`).

    python bench/architectures.py --store runs/default/activations/blocks.8.hook_resid_post --out runs/architectures
    python bench/architectures.py ... --also runs/default/sae/topk_k32_4608      # add an SAE trained before
    # smoke (a minute): --d-sae 256 --k 8 --train-tokens 40000 --eval-tokens 4096 --ce-contexts 8 --absorption-contexts 64

Prints a table and writes <out>/architectures.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from activations import ActivationStore, load_contexts
from activations.corpus import contexts_for_tokens, heldout_corpus
from activations.io import atomic_write_json
from activations.model import ModelLoader
from analysis import cli
from analysis.cli import PRESETS
from analysis.evaluation.absorption import AbsorptionConfig, first_letter_absorption
from analysis.evaluation.cli import evaluate_saes
from sae import load_sae


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    default = PRESETS["default"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True, help="activation store of the training split (a hook folder)")
    p.add_argument("--out", type=Path, required=True, help="results folder (SAEs in <out>/sae)")
    p.add_argument("--archs", nargs="+", default=["batchtopk", "matryoshka"], help="architectures (default: %(default)s)")
    p.add_argument("--also", nargs="*", type=Path, default=[], help="already-trained SAE folders to score alongside")
    p.add_argument("--d-sae", type=int, default=default["d_sae"], help="default: %(default)s")
    p.add_argument("--k", type=int, default=default["k"], help="default: %(default)s")
    p.add_argument("--train-tokens", type=int, default=default["train_tokens"], help="default: %(default)s")
    p.add_argument("--eval-tokens", type=int, default=default["eval_tokens"], help="default: %(default)s")
    p.add_argument("--ce-contexts", type=int, default=default["ce_contexts"], help="default: %(default)s")
    p.add_argument("--absorption-contexts", type=int, default=512, help="held-out contexts after the evaluation's (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--reuse", action="store_true", help="score the SAEs an earlier run wrote to <out>/sae instead of training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    store = ActivationStore(args.store)
    common = ["--out", str(args.out), "--device", args.device]
    started = time.perf_counter()
    summary = args.out / "sae" / "train_summary.json"
    if args.reuse and summary.exists():  # SAEs trained by an earlier run of this script
        paths, train_s = [Path(p) for p in json.loads(summary.read_text())["saes"].values()], None
    else:
        paths = cli.main(["train", *common, "--store", str(args.store), "--architecture", *args.archs,
                          "--d-sae", str(args.d_sae), "--k", str(args.k), "--train-tokens", str(args.train_tokens)])
        train_s = time.perf_counter() - started
    paths += list(args.also)
    models = ModelLoader(None, args.device)
    eval_args = cli.parse(["evaluate", *common, "--eval-tokens", str(args.eval_tokens), "--ce-contexts", str(args.ce_contexts)])
    evals = evaluate_saes(eval_args, models, [Path(p) for p in paths])

    sae0 = load_sae(paths[0])
    model = models.get(sae0.cfg.model_name)
    corpus = heldout_corpus(sae0.training_data, None, sae0.cfg.context_size)
    skip = max(args.ce_contexts, contexts_for_tokens(args.eval_tokens, corpus.context_len))  # the evaluation's contexts
    tokens = torch.from_numpy(load_contexts(corpus, model.tokenizer, max_contexts=skip + args.absorption_contexts)).long()[skip:]
    rows = {}
    for path in paths:
        path = Path(path)
        absorption = first_letter_absorption(model, load_sae(path), tokens, AbsorptionConfig())
        e = evals[str(path)]
        rows[path.name] = {"fvu": e.fvu, "ce_loss_recovered": e.ce_loss_recovered, "delta_ce": e.delta_ce, "dead_fraction": e.dead_fraction,
                           "l0": e.l0, "absorption": absorption.to_dict()}
    atomic_write_json(args.out / "architectures.json", {"settings": {k: str(v) for k, v in vars(args).items()},
                                                        "train_seconds_all": train_s, "store_tokens": store.n_tokens, "results": rows})
    header = f"{'SAE':<24} {'FVU':>7} {'CE rec':>7} {'dead':>6} {'L0':>6} {'absorption':>10} {'miss':>6} {'main F1':>7} {'probe acc':>9}"
    print(header + "\n" + "-" * len(header))
    for name, r in rows.items():
        a = r["absorption"]
        print(f"{name:<24} {r['fvu']:>7.4f} {r['ce_loss_recovered']:>7.4f} {r['dead_fraction']:>6.1%} {r['l0']:>6.1f} "
              f"{a['mean_absorption_rate']:>10.3f} {a['mean_miss_rate']:>6.3f} {a['mean_main_f1']:>7.3f} {a['probe_accuracy']:>9.3f}")
    n_letters = len(next(iter(rows.values()))["absorption"]["letters"])
    print(f"(absorption: mean over {n_letters} letters, {len(tokens)} held-out contexts after the evaluation's; lower is better)")
    print(f"results: {args.out / 'architectures.json'}" + (f" (training {train_s:.0f} s)" if train_s else ""))


if __name__ == "__main__":
    main()
