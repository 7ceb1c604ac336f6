"""Atlas throughput: `analysis.features.atlas.build_atlas` against its own floor, in one run.

The floor is the bare work every atlas must do: the model's forward pass to the SAE's hook
and the SAE encoder, on the same held-out contexts, batch and precision. The ratio
floor_time / atlas_time says how much the atlas bookkeeping (running top-N, reservoir
samples, histograms, token and co-activation counts, example windows) costs on top.
Peak RSS of the atlas is read from a child process, so it is the atlas's alone.

    python bench/atlas_throughput.py --sae runs/default/sae/topk_k32_4608 --tokens 1000000
    python bench/atlas_throughput.py --sae ... --tokens 65536      # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from memory import peak_rss_mb  # bench/memory.py (this script's folder is on sys.path)
from tqdm.auto import tqdm


def floor_seconds(sae_path: str, n_tokens: int, batch_contexts: int, autocast: str) -> float:
    from activations import CorpusConfig, load_contexts, load_model
    from activations.model import run_to_hooks
    from sae import load_sae

    sae = load_sae(sae_path)
    model = load_model(sae.cfg.model_name if sae.cfg.model_name else "smollm2", "cpu")
    ctx_len = sae.cfg.context_size
    tokens = torch.from_numpy(load_contexts(CorpusConfig(split="heldout", context_len=ctx_len), model.tokenizer,
                                            max_contexts=-(-n_tokens // (ctx_len - 1)))).long()
    started = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, len(tokens), batch_contexts), desc="floor: forward + encode"):
            x = run_to_hooks(model, tokens[start:start + batch_contexts], [sae.cfg.hook_name], autocast=autocast)[sae.cfg.hook_name]
            sae.encode(x)
    return time.perf_counter() - started


def atlas_child(sae_path: str, n_tokens: int, batch_contexts: int, autocast: str, out: str) -> None:
    from activations import load_model
    from analysis.features.atlas import AtlasConfig, build_atlas
    from sae import load_sae

    sae = load_sae(sae_path)
    model = load_model(sae.cfg.model_name if sae.cfg.model_name else "smollm2", "cpu")
    started = time.perf_counter()
    atlas = build_atlas(sae, model, AtlasConfig(n_tokens=n_tokens, batch_contexts=batch_contexts, autocast=autocast, device="cpu"))
    seconds = time.perf_counter() - started
    atlas.save(out)
    Path(out, "bench.json").write_text(json.dumps({"seconds": seconds, "n_tokens": atlas.n_tokens, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, help="SAE folder (SAE Lens format) of the embedded model")
    p.add_argument("--tokens", type=int, default=1_000_000, help="held-out tokens (default: %(default)s)")
    p.add_argument("--batch-contexts", type=int, default=16)
    p.add_argument("--autocast", choices=["none", "bf16"], default="bf16", help="model matmul precision (default: %(default)s)")
    p.add_argument("--out", default="/tmp/atlas_bench", help="where the child writes the atlas")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child:
        atlas_child(args.sae, args.tokens, args.batch_contexts, args.autocast, args.out)
        return

    command = [sys.executable, __file__, "--child", "--sae", args.sae, "--tokens", str(args.tokens),
               "--batch-contexts", str(args.batch_contexts), "--autocast", args.autocast, "--out", args.out]
    status = subprocess.run(command).returncode
    if status != 0:
        raise SystemExit(f"atlas child failed with status {status}")
    result = json.loads(Path(args.out, "bench.json").read_text())
    floor = floor_seconds(args.sae, args.tokens, args.batch_contexts, args.autocast)
    n = result["n_tokens"]
    print(f"\n{'stage':<34} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'forward + encode (floor)':<34} {floor:>8.1f} {n / floor:>9,.0f}")
    print(f"{'build_atlas (all features)':<34} {result['seconds']:>8.1f} {n / result['seconds']:>9,.0f}")
    print(f"atlas / floor throughput: {floor / result['seconds']:.2f}; atlas peak RSS {result['peak_rss_mb'] / 1024:.2f} GB; {n:,} tokens")


if __name__ == "__main__":
    main()
