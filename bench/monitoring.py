"""Concept monitoring: do a concept's SAE features detect texts about it better than words do?

    python bench/monitoring.py --sae runs/default/sae/topk_k32_4608 --out runs/bench_monitoring

The texts are windows of `--window` tokens cut from the held-out documents of the embedded
default corpus (never seen in training). A text's ground truth is its source, so the label
does not depend on any word list. Each concept (`CONCEPTS`) is a word to search for and the
source whose texts contain the concept:

* scripture ("God"): King James Bible vs the rest;
* programming ("Python"): the Python documentation vs the rest;
* Linux packaging ("package"): the four Debian books vs the rest;
* Regency fiction ("Miss"): Jane Austen's novels vs the rest.

Detectors, AUROC on the same test texts:

* **SAE features, unsupervised**: `analysis.features.monitor.concept_features` (the concept
  word's 5 most selective features) and `monitor_concepts` (the strongest firing of any of them
  on the text, x max activation). The feature choice sees only the concept word;
* **bag of words, unsupervised**: how often the concept word appears (as a whole word, any case);
* **bag of words, supervised**: logistic regression on word counts (the 2,000 commonest
  words of the training texts), trained on the other half of the windows;
* **SAE features, supervised**: logistic regression on each feature's max activation over the
  text, trained on the same half.
"""
from __future__ import annotations

import argparse
import json
import lzma
import re
import time
from collections import Counter
from pathlib import Path

import torch

from activations import load_model
from activations.corpus import DEFAULT_CORPUS
from activations.io import atomic_write_bytes, atomic_write_json
from analysis.encoding import encode_contexts
from analysis.features.atlas import load_atlas
from analysis.features.monitor import auroc, concept_features, concept_monitor_html, monitor_concepts
from sae import load_sae

CONCEPTS = {  # name: (concept word searched, id prefixes of the sources whose texts are positive)
    "scripture": ("God", ("kjv/",)),
    "programming": ("Python", ("pydocs/",)),
    "Linux packaging": ("package", ("debian-handbook/", "debian-policy/", "debian-reference/", "developers-reference/")),
    "Regency fiction": ("Miss", ("austen/",)),
}
WORD = re.compile(r"[a-z][a-z']*")


def windows(tokenizer, window: int, per_doc: int) -> tuple[list[str], list[str]]:
    """(texts, document ids): up to `per_doc` non-overlapping token windows of each held-out document."""
    texts, ids = [], []
    with lzma.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["split"] != "heldout":
                continue
            toks = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
            starts = list(range(0, max(len(toks) - window, 0) + 1, window))[:per_doc]
            for s in starts:
                piece = tokenizer.decode(toks[s:s + window])
                if len(WORD.findall(piece.lower())) >= 5:
                    texts.append(piece)
                    ids.append(doc["id"])
    return texts, ids


def logistic(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, l2: float = 1e-3, steps: int = 200) -> torch.Tensor:
    """Test scores of an L2-regularised logistic regression (LBFGS) on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x, xt = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    y = train_y.float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (xt @ w + b).detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, help="SAE folder with its atlas (saewb analyze)")
    p.add_argument("--window", type=int, default=32, help="tokens per text")
    p.add_argument("--per-doc", type=int, default=2, help="windows taken from each held-out document")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench_monitoring"))
    args = p.parse_args()
    started = time.perf_counter()
    model = load_model(args.model, args.device)
    sae = load_sae(args.sae)
    atlas = load_atlas(Path(args.sae) / "atlas")
    tok = model.tokenizer
    texts, doc_ids = windows(tok, args.window, args.per_doc)
    n = len(texts)
    # split by document, so no document has windows on both sides
    docs = sorted(set(doc_ids))
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    train_docs = {docs[i] for i in order[: len(docs) // 2]}
    is_train = torch.tensor([d in train_docs for d in doc_ids])
    print(f"{n} texts of {args.window} tokens from {len(docs)} held-out documents ({int(is_train.sum())} train / {int((~is_train).sum())} test)")

    concepts = {name: concept_features(word, model, sae, atlas) for name, (word, _) in CONCEPTS.items()}
    readings = monitor_concepts(texts, model, sae, atlas, concepts)
    print(f"concept features and readings: {time.perf_counter() - started:.0f} s")

    # every feature's max activation per text, for the supervised probe on features
    device = next(model.parameters()).device
    feats = []
    sink = tok.convert_tokens_to_ids("<|endoftext|>")
    rows = [[sink] + tok(t, add_special_tokens=False)["input_ids"][: args.window] for t in texts]
    for b in range(0, n, 32):
        batch = rows[b:b + 32]
        width = max(len(r) for r in batch)
        tokens = torch.tensor([r + [sink] * (width - len(r)) for r in batch], device=device)
        f = encode_contexts(model, sae.to(device), tokens).f.cpu()
        mask = torch.tensor([[0 < i < len(r) for i in range(width)] for r in batch])
        feats.append((f * mask[..., None]).amax(1))
    feats = torch.cat(feats)  # [n, d_sae]

    words = [Counter(WORD.findall(t.lower())) for t in texts]
    vocab = [w for w, _ in sum((words[i] for i in range(n) if is_train[i]), Counter()).most_common(2000)]
    index = {w: j for j, w in enumerate(vocab)}
    bow = torch.zeros(n, len(vocab))
    for i, c in enumerate(words):
        for w, k in c.items():
            if w in index:
                bow[i, index[w]] = k

    results = []
    print(f"\n{'concept':<16} {'word':<9} {'positives':>9}  AUROC: {'features':>8} {'word count':>10} {'BoW probe':>9} {'feature probe':>13}")
    for j, (name, (word, prefixes)) in enumerate(CONCEPTS.items()):
        positive = torch.tensor([d.startswith(prefixes) for d in doc_ids])
        test = ~is_train
        word_count = torch.tensor([float(c[word.lower()]) for c in words])
        row = {
            "concept": name, "word": word, "features": concepts[name], "n_positive_test": int(positive[test].sum()), "n_test": int(test.sum()),
            "auroc_features": auroc(readings.score[test, j], positive[test]),
            "auroc_word_count": auroc(word_count[test], positive[test]),
            "auroc_bow_probe": auroc(logistic(bow[is_train], positive[is_train], bow[test]), positive[test]),
            "auroc_feature_probe": auroc(logistic(feats[is_train], positive[is_train], feats[test]), positive[test]),
        }
        results.append(row)
        print(f"{name:<16} {word:<9} {row['n_positive_test']:>9}         {row['auroc_features']:>8.3f} {row['auroc_word_count']:>10.3f} "
              f"{row['auroc_bow_probe']:>9.3f} {row['auroc_feature_probe']:>13.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "monitoring.json", {"args": {k: str(v) for k, v in vars(args).items()}, "n_texts": n, "results": results})
    shown = list(range(0, n, max(1, n // 60)))[:60]  # a readable sample for the page
    sample = type(readings)([texts[i] for i in shown], readings.concepts, readings.features, readings.score[shown],
                            {c: v[shown] for c, v in readings.per_feature.items()}, [readings.top_token[i] for i in shown])
    atomic_write_bytes(args.out / "concepts.html", concept_monitor_html(sample, "Concept monitor: held-out windows of the default corpus").encode())
    print(f"{args.out / 'monitoring.json'}\n{args.out / 'concepts.html'}\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
