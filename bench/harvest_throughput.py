"""Harvest throughput: the workbench's `run_to_hooks` against a bare Hugging Face forward
pass truncated after the same layer, and against the machine's own bound, side by side in one
run.

    python bench/harvest_throughput.py                       # layer 8, batches of 8 and 16, fp32 and bf16
    python bench/harvest_throughput.py --batch-contexts 8 16 32 --autocast none bf16

For each precision and batch: tokens/s of the workbench and of the bare forward, their ratio
(target >= 0.9), and the share of the forward bound reached:

    bound tokens/s = matmul peak FLOP/s of that precision / forward FLOPs per token

The forward's FLOPs per token to the hook are counted from the model's shapes (2 per
multiply-add): per block the q, k, v, o projections and the gated MLP's three matrices, plus
the attention scores and the weighted sum over the causal prefix (on average (ctx + 1) / 2
positions); norms, rotary embeddings and softmax are left out. The matmul peak is the best of
`--peak-repeats` [n, n] @ [n, n] products in that precision with the same threads. The last
line is what `autocast="auto"` (`activations.precision`) picks on this machine, and bf16's
relative error against fp32 on the same batch. Then the harvest's compiled path
(`HarvestConfig.compile`, `activations.model.compiled_blocks`) at the largest batch: its
speed, its share of the bound, and its difference to the eager activations.
"""
from __future__ import annotations

import argparse
import time

import torch

from activations import CorpusConfig, load_contexts, load_model, run_to_hooks
from activations.hooks import act_name
from activations.model import compiled_blocks, hf_model_of
from activations.precision import probe_precision, relative_error


def bare_hf_truncated(model, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """The reference: HF embedding + the first `layer + 1` decoder layers, nothing else."""
    hf = hf_model_of(model).base_model
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


def forward_flops_per_token(cfg, n_blocks: int, context_len: int) -> float:
    """Matmul FLOPs per token of `n_blocks` Llama-style blocks (2 per multiply-add)."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    d_head = d // heads
    d_kv = getattr(cfg, "num_key_value_heads", heads) * d_head
    projections = 2 * (d * d + 2 * d * d_kv + d * d)  # q, k, v, o
    mlp = 2 * 3 * d * cfg.intermediate_size  # gate, up, down
    attention = 2 * 2 * d * (context_len + 1) / 2  # scores and weighted sum over the causal prefix
    return n_blocks * (projections + mlp + attention)


def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best FLOP/s of [n, n] @ [n, n] in `dtype` on the CPU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--batch-contexts", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--autocast", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    parser.add_argument("--n-contexts", type=int, default=64, help="contexts timed per setting")
    parser.add_argument("--peak-n", type=int, default=2048, help="matrix size of the peak measurement (default: %(default)s)")
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows (torch.compile of the decoder layers)")
    args = parser.parse_args()
    model = load_model("smollm2", device="cpu")
    tokens = torch.from_numpy(load_contexts(CorpusConfig(), model.tokenizer, max_contexts=args.n_contexts)).long()
    hook = act_name("resid_post", args.layer)
    ref = bare_hf_truncated(model, tokens[:2], args.layer)
    assert torch.allclose(ref, run_to_hooks(model, tokens[:2], [hook])[hook], atol=1e-4), "reference disagrees with the hook"
    flops = forward_flops_per_token(hf_model_of(model).config, args.layer + 1, tokens.shape[1])
    peaks = {"none": matmul_peak(torch.float32, args.peak_n, args.peak_repeats), "bf16": matmul_peak(torch.bfloat16, args.peak_n, args.peak_repeats)}
    print(f"threads {torch.get_num_threads()}; forward to {hook}: {flops / 1e6:.1f} MFLOP per token; matmul peak fp32 "
          f"{peaks['none'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'batch':>6} {'autocast':>9} {'workbench tok/s':>16} {'bare HF tok/s':>14} {'ratio':>6} {'bound tok/s':>12} {'of bound':>9}")
    for autocast in args.autocast:
        for bc in args.batch_contexts:
            batches = list(tokens.split(bc))
            ours = timed(lambda b, a=autocast: run_to_hooks(model, b, [hook], a), batches, autocast)
            bare = timed(lambda b: bare_hf_truncated(model, b, args.layer), batches, autocast)
            bound = peaks[autocast] / flops
            print(f"{bc:>6} {autocast:>9} {ours:>16,.0f} {bare:>14,.0f} {ours / bare:>6.2f} {bound:>12,.0f} {ours / bound:>9.0%}")
    probe = probe_precision(model, tokens[:args.batch_contexts[-1]], [hook])
    print(f"autocast='auto' picks: {probe.describe()}")
    if args.no_compile:
        return
    # the harvest's compiled path (HarvestConfig.compile): decoder layers through torch.compile
    bc = args.batch_contexts[-1]
    batches = list(tokens.split(bc))
    eager = {a: run_to_hooks(model, batches[0], [hook], a)[hook] for a in args.autocast}
    started = time.perf_counter()
    with compiled_blocks(model, [hook]):
        for autocast in args.autocast:
            run_to_hooks(model, batches[0], [hook], autocast)
        compile_s = time.perf_counter() - started
        print(f"compiled decoder layers (first calls, compiling included: {compile_s:.0f} s):")
        for autocast in args.autocast:
            ours = timed(lambda b, a=autocast: run_to_hooks(model, b, [hook], a), batches, autocast)
            got = run_to_hooks(model, batches[0], [hook], autocast)[hook]
            bound = peaks[autocast] / flops
            print(f"{bc:>6} {autocast:>9} {ours:>16,.0f} {'':>14} {'':>6} {bound:>12,.0f} {ours / bound:>9.0%}   vs eager: max abs diff "
                  f"{float((got - eager[autocast]).abs().max()):.2e}, relative error {relative_error(got, eager[autocast]):.1e}")


if __name__ == "__main__":
    main()
