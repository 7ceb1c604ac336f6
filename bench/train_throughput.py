"""Training throughput: the workbench against this machine's matmul peak, SAE Lens and
sparsify, every figure measured in one run on one machine (ratios are within the run).

    python bench/train_throughput.py --store runs/default/activations/blocks.8.hook_resid_post --out runs/bench_train
    python bench/train_throughput.py --store <store> --out /tmp/bt --quick       # smoke run: tiny sizes, numbers meaningless
    python bench/train_throughput.py ... --skip e2e rss                          # only parts of it

Parts (`--skip` any of them):

``peak``   Matmul peak of this machine: the best of `--peak-repeats` [n, n] @ [n, n] products,
           in fp32 and in bf16, FLOP/s = 2 n^3 / seconds.
``arch``   Training from the store, per architecture (topk, batchtopk, standard, jumprelu),
           fp32 and bf16 autocast: tokens/s of the training loop (`sae.trainer`, first step to
           last; the init sample and the final checkpoint excluded) against the bound set by
           the encoder matmul at the measured peak of the same precision:

               bound tokens/s = peak FLOP/s / (2 * d_in * d_sae * 3)

           i.e. the forward x @ W_enc plus the two backward matmuls (grad W_enc, grad input)
           of a dense implementation, 2 FLOPs per multiply-add; the decoder is not counted.
           The workbench's TopK backward touches only the k active latents (`sae.common`), so
           TopK can pass this bound. Held-out FVU / L0 / dead fraction are measured on the
           store's last shard(s), which no run trains on, so "bf16 is faster at equal FVU"
           can be checked. A `topk plain` row repeats TopK fp32 with plain autograd and
           default Adam (`TrainConfig.fast_kernels = False`): the speed-up of the fast path.
``lens``   SAE Lens TopK (`bench/quality.py`'s matched recipe) on the same store batches,
           width, k, batch, lr and token count, against the workbench's TopK in fp32 and bf16
           autocast, each without and with SAE Lens's gradient clipping (norm 1.0); tokens/s
           of the whole training call (init included; ratios to SAE Lens), and held-out FVU,
           L0, dead fraction.
``e2e``    End to end, the model forward included, on `--e2e-tokens` tokens of the default
           corpus: the workbench training on the fly (`sae.on_the_fly`, the forward stops at
           the hooked layer) and harvest-then-train, against sparsify's own `Trainer` (it runs
           the whole model, excluding the <|endoftext|> token, which our contexts start with),
           same width, k, batch (in tokens), lr, warm-up and AuxK settings. sparsify needs its
           own venv (`--peers-python`, see bench/quality.py); the model is handed to it as a
           Hugging Face folder written once under `<out>/smollm2_hf`. FVU on held-out-split
           activations of the same model. The model runs in fp32 for both; `--e2e-autocast bf16`
           harvests under bf16 autocast and runs sparsify's whole `fit` under it.
``rss``    Peak RSS of training (a child process each, its own VmHWM) from stores of two sizes:
           the first `--rss-small-shards` shards, and the whole store; same steps, small SAE.
           Memory is bounded by the shard window (the one being read and the next, prefetched),
           so the two should match. A store that ends within the run has no next window to
           prefetch and peaks lower: that is why the small store is not smaller (16 shards).

Writes `<out>/train_throughput.json` and prints the tables.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (bench/quality.py: shared peer setup)
from memory import peak_rss_mb  # noqa: E402

from activations import ActivationStore  # noqa: E402
from activations.corpus import contexts_for_tokens  # noqa: E402
from activations.io import atomic_write_json  # noqa: E402
from activations.model import resolve_device  # noqa: E402
from analysis.evaluation.metrics import ReconstructionStats  # noqa: E402
from sae import ARCHITECTURES, SAEConfig, load_sae  # noqa: E402
from sae.trainer import TrainConfig, Trainer, default_lr  # noqa: E402

PARTS = ["peak", "arch", "lens", "e2e", "rss"]
QUICK = dict(d_sae=512, k=16, batch_size=512, train_tokens=8192, heldout_tokens=2048, e2e_tokens=2048, init_tokens=2048, peak_n=512, rss_tokens=4096)


# ---------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, repeats: int) -> float:
    """Best FLOP/s of [n, n] @ [n, n] in `dtype`."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def split_store(store: ActivationStore, heldout_shards: int) -> tuple[ActivationStore, ActivationStore]:
    """Two views of one store: all but the last `heldout_shards` shards, and those."""
    if len(store.shards) <= heldout_shards:
        raise SystemExit(f"{store.path} has {len(store.shards)} shard(s); the benchmark holds out {heldout_shards}: harvest more tokens")
    train, heldout = copy.copy(store), copy.copy(store)
    train.shards, heldout.shards = store.shards[:-heldout_shards], store.shards[-heldout_shards:]
    return train, heldout


def heldout_metrics(sae_path: str | Path, heldout: ActivationStore, n_tokens: int, device: torch.device) -> dict:
    """FVU, L0 and dead fraction of a saved SAE on `n_tokens` held-out rows."""
    sae = load_sae(sae_path, device)
    stats = ReconstructionStats(sae.cfg.d_sae)
    with torch.no_grad():
        for x in heldout.iter_batches(min(4096, n_tokens, heldout.n_tokens), seed=1):  # a small last shard still gives a batch
            x = x.to(device)
            f = sae.encode(x)
            stats.update(x, sae.decode(f), f)
            if stats.n >= n_tokens:
                break
    return {"fvu": stats.fvu, "l0": stats.l0, "dead": float((stats.fire_counts == 0).float().mean()), "n_heldout": stats.n}


def train_config(args: argparse.Namespace, store, out: Path, architecture: str = "topk", autocast: str = "none", **kw) -> TrainConfig:
    sae = SAEConfig(architecture=architecture, d_in=store.d_in, d_sae=args.d_sae, k=args.k, hook_name=store.hook_name,
                    model_name=getattr(store, "model_name", "smollm2"))
    base = dict(out_dir=str(out), saes=[sae], n_tokens=args.train_tokens, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                device=str(args.device), autocast=autocast, init_tokens=args.init_tokens, checkpoint_every=10**9, log_every=10)
    return TrainConfig(**{**base, **kw})


@dataclass
class Run:
    name: str
    tokens: int
    seconds: float
    """Whole call: init sample, training loop, final checkpoint and save."""
    loop_tokens_per_s: float | None = None
    """Training loop only (the trainer's own count), where known."""
    path: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_trainer(name: str, cfg: TrainConfig, source) -> Run:
    quality.fresh_dir(Path(cfg.out_dir))
    started = time.perf_counter()
    trainer = Trainer(cfg, source)
    [path] = trainer.train()
    seconds = time.perf_counter() - started
    return Run(name, cfg.total_steps * cfg.batch_size, seconds, trainer.last_record["tokens_per_s"], str(path))


# ---------------------------------------------------------------------------- parts
def part_arch(args, train, heldout, peaks: dict) -> list[dict]:
    rows = []
    plans = [(arch, mode, True) for arch in args.archs for mode in ("none", "bf16")] + [("topk", "none", False)] * ("topk" in args.archs)
    for arch, mode, fast in plans:
        run = run_trainer(f"{arch} {'bf16' if mode == 'bf16' else 'fp32'}{'' if fast else ' plain'}",
                          train_config(args, train, args.out / "arch" / f"{arch}_{mode}_{fast}", arch, mode, fast_kernels=fast), train)
        peak = peaks.get("bf16" if mode == "bf16" else "fp32")
        bound = peak / (2 * train.d_in * args.d_sae * 3) if peak else None
        rows.append(asdict(run) | {"bound_tokens_per_s": bound} | heldout_metrics(run.path, heldout, args.heldout_tokens, args.device))
        print(f"  {run.name}: {run.loop_tokens_per_s:,.0f} tok/s", flush=True)
    return rows


LENS_VARIANTS = [("fp32", "none", 0.0), ("fp32, clip 1", "none", 1.0), ("bf16", "bf16", 0.0), ("bf16, clip 1", "bf16", 1.0)]
"""The workbench's TopK recipes set against SAE Lens's: (name, autocast, max_grad_norm; 0: no clipping). SAE Lens clips at 1.0."""


def part_lens(args, train, heldout, arch_rows: list[dict]) -> list[dict]:
    """SAE Lens's TopK (matched recipe) first, then each of `LENS_VARIANTS` of ours on the same batches."""
    ref = quality.reference_trainer(train_config(args, train, args.out / "lens_ref"), train)
    lens = quality.train_sae_lens(ref, train, "matched", args.out)
    rows = [{"name": "SAE Lens TopK", "tokens": lens.tokens, "seconds": lens.seconds, "path": lens.path}
            | heldout_metrics(lens.path, heldout, args.heldout_tokens, args.device)]
    for name, autocast, clip in LENS_VARIANTS:
        run = run_trainer(f"workbench TopK {name}", train_config(args, train, args.out / "lens" / name.replace(", ", "_").replace(" ", ""),
                                                                autocast=autocast, max_grad_norm=clip), train)
        rows.append(asdict(run) | heldout_metrics(run.path, heldout, args.heldout_tokens, args.device))
        print(f"  {run.name}: {run.tokens_per_s:,.0f} tok/s, FVU {rows[-1]['fvu']:.4f}", flush=True)
    return rows


def heldout_activations(model, hook: str, n_tokens: int, autocast: str) -> ActivationStore:
    """Held-out-split activations of the model, as an in-memory store-like source."""
    from activations import CorpusConfig, load_contexts, run_to_hooks

    tokens = torch.from_numpy(load_contexts(CorpusConfig(split="heldout"), model.tokenizer, max_contexts=n_tokens // 127 + 1)).long()
    device = next(model.parameters()).device
    acts = torch.cat([run_to_hooks(model, b.to(device), [hook], autocast)[hook][:, 1:].flatten(0, 1).float().cpu() for b in tokens.split(16)])

    class Heldout:
        def iter_batches(self, batch_size, seed=0, **_):
            yield from acts.split(batch_size)

    return Heldout()


def part_e2e(args) -> list[dict]:
    from activations import CorpusConfig, HarvestConfig, harvest, load_contexts, load_model
    from sae.on_the_fly import OnTheFlySource

    hook = args.hook
    model = load_model("smollm2", str(args.device))
    heldout = heldout_activations(model, hook, args.heldout_tokens, args.e2e_autocast)
    runs = []
    source = OnTheFlySource(model, hook, CorpusConfig(), buffer_tokens=min(131_072, max(2 * args.batch_size, args.e2e_tokens)),
                            autocast=args.e2e_autocast)
    cfg = train_config(args, source, args.out / "e2e_on_the_fly", n_tokens=args.e2e_tokens)
    runs.append(asdict(run_trainer("workbench on the fly", cfg, source)))

    store_dir = quality.fresh_dir(args.out / "e2e_store")
    started = time.perf_counter()
    store = harvest(HarvestConfig(out_dir=str(store_dir), hooks=[hook], n_tokens=args.e2e_tokens, autocast=args.e2e_autocast,
                                  device=str(args.device)), model)[hook]
    harvest_seconds = time.perf_counter() - started
    trained = run_trainer("workbench harvest + train", train_config(args, store, args.out / "e2e_from_store", n_tokens=args.e2e_tokens), store)
    runs.append(asdict(trained) | {"seconds": trained.seconds + harvest_seconds, "harvest_seconds": harvest_seconds})

    python = quality.peers_python(args)
    if python is None:
        print(f"sparsify: not importable here nor at --peers-python {args.peers_python}; skipped")
    else:
        model_dir = save_hf_copy(args.out / "smollm2_hf")
        n_contexts = contexts_for_tokens(args.e2e_tokens, args.context_len)
        tokens = load_contexts(CorpusConfig(), model.tokenizer, max_contexts=n_contexts)
        spec = {
            "model_dir": str(model_dir), "tokens": tokens.tolist(), "out": str(args.out / "e2e_sparsify"), "d_sae": args.d_sae, "k": args.k,
            "batch_contexts": max(1, args.batch_size // (args.context_len - 1)), "lr": cfg.lr or default_lr(args.d_sae),
            "warmup_steps": cfg.warmup_steps, "dead_tokens": cfg.dead_tokens, "auxk_alpha": cfg.aux_coefficient,
            "exclude_token": int(tokens[0, 0]), "hook_name": hook, "autocast": args.e2e_autocast, "device": str(args.device),
        }
        spec_path = args.out / "e2e_sparsify_spec.json"
        atomic_write_json(spec_path, spec)
        subprocess.run([python, str(Path(__file__).resolve()), "--sparsify-e2e-child", str(spec_path), "--out", str(args.out)], check=True,
                       env=os.environ | {"PYTHONUNBUFFERED": "1"})
        runs.append(json.loads((Path(spec["out"]) / "run.json").read_text()))
    for run in runs:
        run |= heldout_metrics(run["path"], heldout, args.heldout_tokens, args.device)
    return runs


def save_hf_copy(folder: Path) -> Path:
    """SmolLM2 as a plain fp32 Hugging Face folder that another venv can load: transformers
    refuses to save a model it dequantised from GGUF, so its weights go into a fresh model."""
    if not (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM

        from activations.model import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = copy.deepcopy(hf.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = type(hf)(config)
        fresh.load_state_dict(hf.state_dict())
        fresh.save_pretrained(folder)
    return folder


def sparsify_e2e_child(spec_path: Path) -> None:
    """Runs in the peers venv: sparsify's own Trainer, end to end, then the SAE saved in the
    workbench format for evaluation."""
    import numpy as np
    from datasets import Dataset
    from sparsify import SparseCoderConfig
    from sparsify import TrainConfig as SparsifyConfig
    from sparsify import Trainer as SparsifyTrainer
    from transformers import AutoModel

    spec = json.loads(spec_path.read_text())
    out = quality.fresh_dir(Path(spec["out"]))
    device = torch.device(spec["device"])
    model = AutoModel.from_pretrained(spec["model_dir"], dtype=torch.float32).to(device).eval()
    layer = int(spec["hook_name"].split(".")[1])
    dataset = Dataset.from_dict({"input_ids": np.asarray(spec["tokens"], dtype=np.int64)}).with_format("torch")
    cfg = SparsifyConfig(
        SparseCoderConfig(activation="topk", num_latents=spec["d_sae"], k=spec["k"]), batch_size=spec["batch_contexts"],
        loss_fn="fvu", optimizer="adam", lr=spec["lr"], lr_warmup_steps=spec["warmup_steps"], auxk_alpha=spec["auxk_alpha"],
        dead_feature_threshold=spec["dead_tokens"], exclude_tokens=[spec["exclude_token"]], layers=[layer],
        save_every=10**9, log_to_wandb=False, save_dir=str(out / "native"),
    )
    trainer = SparsifyTrainer(cfg, dataset, model)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["autocast"] == "bf16"):
        trainer.fit()
    seconds = time.perf_counter() - started
    [coder] = trainer.saes.values()
    sae_cfg = SAEConfig(d_in=coder.d_in, d_sae=spec["d_sae"], k=spec["k"], hook_name=spec["hook_name"])
    path = quality.save_sparsify_as_workbench(coder, sae_cfg, 1.0, out / "sae")
    n_tokens = int((dataset["input_ids"][: len(dataset) // cfg.batch_size * cfg.batch_size] != spec["exclude_token"]).sum())
    atomic_write_json(out / "run.json", {"name": "sparsify (its Trainer)", "tokens": n_tokens, "seconds": seconds, "path": str(path)})


def part_rss(args, store: ActivationStore) -> list[dict]:
    sizes = sorted({min(args.rss_small_shards, len(store.shards)), len(store.shards)})
    rows = []
    for n_shards in sizes:
        spec = {"store": str(store.path), "n_shards": n_shards, "tokens": args.rss_tokens, "batch_size": args.batch_size, "device": str(args.device)}
        status = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-child", json.dumps(spec), "--out", str(args.out)]).returncode
        if status != 0:
            raise SystemExit(f"the RSS child for {n_shards} shards failed (status {status})")
        peak = json.loads((args.out / f"rss_{n_shards}" / "peak_rss.json").read_text())["peak_rss_mb"]
        rows.append({"n_shards": n_shards, "store_tokens": sum(s.n_tokens for s in store.shards[:n_shards]), "peak_rss_mb": peak})
    return rows


def rss_child(spec: dict, out: Path) -> None:
    store = ActivationStore(spec["store"])
    store.shards = store.shards[: spec["n_shards"]]
    sae = SAEConfig(d_in=store.d_in, d_sae=256, k=16, hook_name=store.hook_name)
    cfg = TrainConfig(out_dir=str(quality.fresh_dir(out / f"rss_{spec['n_shards']}")), saes=[sae], n_tokens=spec["tokens"],
                      batch_size=spec["batch_size"], device=spec["device"], checkpoint_every=10**9)
    Trainer(cfg, store).train()
    atomic_write_json(out / f"rss_{spec['n_shards']}" / "peak_rss.json", {"peak_rss_mb": peak_rss_mb()})  # the child's own, see bench/memory.py


# ---------------------------------------------------------------------------- report
def report(results: dict, args) -> str:
    lines = [f"machine: {results['machine']}; device {args.device}",
             f"SAE: d_sae {args.d_sae}, k {args.k}, batch {args.batch_size}" + (f", d_in {results['d_in']}, {args.train_tokens:,} training tokens from the store" if results["d_in"] else "")]
    peaks = results.get("peak", {})
    if peaks:
        lines.append(f"matmul peak ({args.peak_n}^3): fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s "
                     f"(bf16 / fp32 {peaks['bf16'] / peaks['fp32']:.2f})")
    if results.get("arch"):
        lines += ["", "training from the store (loop tok/s; bound = peak / (2 d_in d_sae 3) at that precision)",
                  f"{'run':<18} {'tok/s':>9} {'bound':>9} {'of bound':>9} {'vs fp32':>8} {'FVU':>7} {'L0':>6} {'dead':>6}"]
        fp32 = {r["name"].split()[0]: r["loop_tokens_per_s"] for r in results["arch"] if r["name"].endswith("fp32")}
        for r in results["arch"]:
            bound = r["bound_tokens_per_s"]
            lines.append(f"{r['name']:<18} {r['loop_tokens_per_s']:>9,.0f} {bound or 0:>9,.0f} {r['loop_tokens_per_s'] / bound if bound else 0:>9.0%} "
                         f"{r['loop_tokens_per_s'] / fp32[r['name'].split()[0]]:>8.2f} {r['fvu']:>7.4f} {r['l0']:>6.1f} {r['dead']:>6.1%}")
        lines.append(f"(held-out: {results['arch'][0]['n_heldout']:,} tokens of the store's last shard(s))")
    for part, title in (("lens", "against SAE Lens (whole training call)"), ("e2e", f"end to end, model forward included ({args.e2e_tokens:,} tokens)")):
        rows = results.get(part)
        if not rows:
            continue
        lines += ["", title, f"{'run':<26} {'tok/s':>9} {'ratio':>7} {'FVU':>7} {'L0':>6} {'dead':>6}"]
        for r in rows:
            speed = r["tokens"] / r["seconds"]
            lines.append(f"{r['name']:<26} {speed:>9,.0f} {speed / (rows[0]['tokens'] / rows[0]['seconds']):>7.2f} {r['fvu']:>7.4f} {r['l0']:>6.1f} {r['dead']:>6.1%}")
    if results.get("rss"):
        rows = results["rss"]
        lines += ["", "peak RSS of training: " + ", ".join(f"store of {r['store_tokens']:,} tokens {r['peak_rss_mb']:,.0f} MB" for r in rows)
                  + f" (ratio {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f})"]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, help="activation store (a hook folder) to train from")
    p.add_argument("--out", type=Path, required=True, help="results folder (its subfolders are overwritten)")
    p.add_argument("--quick", action="store_true", help=f"smoke-run sizes ({QUICK}); numbers meaningless")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    p.add_argument("--archs", nargs="+", default=sorted(ARCHITECTURES), choices=sorted(ARCHITECTURES), help="arch: architectures (default: all)")
    p.add_argument("--d-sae", type=int, default=4608, help="latents (default: %(default)s)")
    p.add_argument("--k", type=int, default=32, help="TopK/BatchTopK k (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step (default: %(default)s)")
    p.add_argument("--train-tokens", type=int, default=2**20, help="training tokens per store run (default: %(default)s)")
    p.add_argument("--heldout-tokens", type=int, default=65_536, help="held-out tokens for FVU/L0/dead (default: %(default)s)")
    p.add_argument("--heldout-shards", type=int, default=1, help="store shards held out of training (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="Adam lr for every run (default: sae.trainer.default_lr)")
    p.add_argument("--init-tokens", type=int, default=TrainConfig.init_tokens, help="sample for the input scale and b_dec (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-n", type=int, default=2048, help="matrix size of the peak measurement (default: %(default)s; 8192 on CUDA)")
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--hook", default="blocks.8.hook_resid_post", help="e2e: hook of the default model (default: %(default)s)")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--e2e-tokens", type=int, default=262_144, help="e2e: training tokens (default: %(default)s)")
    p.add_argument("--e2e-autocast", choices=["none", "bf16"], default="none", help="e2e: model precision for all (default: fp32)")
    p.add_argument("--rss-small-shards", type=int, default=16, help="rss: shards of the small store (default: %(default)s: more than the "
                   "--rss-tokens cover, so the prefetcher holds its next window as in any long run)")
    p.add_argument("--rss-tokens", type=int, default=3 * 4 * 65_024, help="rss: training tokens per run, ~3 windows (default: %(default)s)")
    p.add_argument("--peers-python", default=os.environ.get("SAEWB_PEERS_PYTHON", str(Path(__file__).resolve().parents[2] / "venv-peers" / "bin" / "python")),
                   help="interpreter with sparsify installed, used when this one lacks it (default: %(default)s)")
    p.add_argument("--sparsify-e2e-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    if args.quick:
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, value)
    args.device = resolve_device(args.device)
    if args.device.type == "cuda" and "peak_n" not in explicit and not args.quick:
        args.peak_n = 8192
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.sparsify_e2e_child:
        return sparsify_e2e_child(args.sparsify_e2e_child)
    if args.rss_child:
        return rss_child(json.loads(args.rss_child), args.out)
    parts = [p for p in PARTS if p not in args.skip]
    if {"arch", "lens", "rss"} & set(parts) and args.store is None:
        raise SystemExit("--store is needed for the arch, lens and rss parts (or --skip them)")
    args.out.mkdir(parents=True, exist_ok=True)
    store = ActivationStore(args.store) if args.store else None
    results: dict = {"machine": machine(), "d_in": store.d_in if store else None, "settings": {k: str(v) for k, v in vars(args).items()}}
    if "peak" in parts:
        results["peak"] = {name: matmul_peak(dtype, args.device, args.peak_n, args.peak_repeats)
                           for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    if store is not None:
        train, heldout = split_store(store, args.heldout_shards)
        if "arch" in parts:
            results["arch"] = part_arch(args, train, heldout, results.get("peak", {}))
        if "lens" in parts:
            results["lens"] = part_lens(args, train, heldout, results.get("arch", []))
    if "e2e" in parts:
        results["e2e"] = part_e2e(args)
    if "rss" in parts:
        results["rss"] = part_rss(args, store)
    atomic_write_json(args.out / "train_throughput.json", results)
    print(report(results, args))
    print(f"results: {args.out / 'train_throughput.json'}")


if __name__ == "__main__":
    main()
