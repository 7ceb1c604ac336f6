"""Harvest throughput: the workbench's `run_to_hooks` against a bare Hugging Face forward
pass truncated after the same layer, same tokens, batch and dtype, side by side in one run.

    python bench/harvest_throughput.py                       # layer 8, batches of 8 and 16 contexts
    python bench/harvest_throughput.py --batch-contexts 8 16 32 --autocast none bf16

Prints tokens/s for each setting and the ratio workbench / bare HF (target >= 0.9).
"""
from __future__ import annotations

import argparse
import time

import torch

from activations import CorpusConfig, load_contexts, load_model, run_to_hooks


def bare_hf_truncated(model, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """The reference: HF embedding + the first `layer + 1` decoder layers, nothing else."""
    hf = model.original_model.base_model
    hidden = hf.embed_tokens(tokens)
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
    rotary = hf.rotary_emb(hidden, positions)
    mask = torch.full((tokens.shape[1], tokens.shape[1]), float("-inf"), device=tokens.device).triu(1)[None, None]
    for block in hf.layers[: layer + 1]:
        hidden = block(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def timed(fn, batches, autocast: str) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16"):
        fn(batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
    return sum(b.numel() for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--batch-contexts", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--autocast", nargs="+", default=["none"], choices=["none", "bf16"])
    parser.add_argument("--n-contexts", type=int, default=64, help="contexts timed per setting")
    args = parser.parse_args()
    model = load_model("smollm2", device="cpu")
    tokens = torch.from_numpy(load_contexts(CorpusConfig(), model.tokenizer, max_contexts=args.n_contexts)).long()
    hook = f"blocks.{args.layer}.hook_resid_post"
    ref = bare_hf_truncated(model, tokens[:2], args.layer)
    assert torch.allclose(ref, run_to_hooks(model, tokens[:2], [hook])[hook], atol=1e-4), "reference disagrees with the hook"
    print(f"{'batch':>6} {'autocast':>9} {'workbench tok/s':>16} {'bare HF tok/s':>14} {'ratio':>6}")
    for autocast in args.autocast:
        for bc in args.batch_contexts:
            batches = list(tokens.split(bc))
            ours = timed(lambda b: run_to_hooks(model, b, [hook]), batches, autocast)
            bare = timed(lambda b: bare_hf_truncated(model, b, args.layer), batches, autocast)
            print(f"{bc:>6} {autocast:>9} {ours:>16,.0f} {bare:>14,.0f} {ours / bare:>6.2f}")


if __name__ == "__main__":
    main()
