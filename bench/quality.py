"""Quality benchmark: the workbench's TopK SAE against peer libraries, same data, same eval.

Every SAE is trained on the same activation store (the same shuffled batches, in the same
order), with the same width, k, batch size and token count, then scored by the same
`analysis.evaluation.evaluate.evaluate` on the same held-out text. Prints a table and writes
`<out>/quality.json`; each SAE folder also gets the usual `eval.json` + `report.html`.

Run (from the repository root, after `saewb run` has written the default store):

    python bench/quality.py --store runs/default/activations/blocks.8.hook_resid_post --out runs/bench_quality
    python bench/quality.py ... --ours runs/default/sae/topk_k32_4608   # reuse our trained SAE
    python bench/quality.py ... --peers sae_lens --peer-recipe defaults
    # smoke test (minutes on CPU):
    python bench/quality.py --store /tmp/h1/blocks.8.hook_resid_post --out /tmp/bq \\
        --d-sae 256 --k 8 --batch-size 512 --train-tokens 8192 --eval-tokens 2048 --ce-contexts 4

Peers
-----
* ``sae_lens`` (SAE Lens 6.54, a test dependency): its `TopKTrainingSAE` trained by its own
  `SAETrainer`, fed our store's batches as its `data_provider`; converted and saved by its
  own `save_inference_model`, then loaded with the workbench's `sae.load_sae`.
* ``sparsify`` (EleutherAI; on PyPI as ``eai-sparsify`` -- the PyPI name ``sparsify`` is
  Neural Magic's unrelated, end-of-life package that no longer builds). Its `Trainer` only
  trains on the fly from a Hugging Face model through forward hooks, so here its
  `SparseCoder` (its encoder kernel, its FVU + AuxK loss, its decoder renormalisation and
  gradient projection, its optimizer and schedule) is driven by a short loop that mirrors
  `sparsify.trainer.Trainer`'s per-step code for ``loss_fn="fvu"``. It needs transformers
  5 and must not go into the main venv, so it lives in a separate venv:

      python3 -m venv ../venv-peers && ../venv-peers/bin/pip install torch==2.13.0 eai-sparsify
      ../venv-peers/bin/pip install --no-deps -e .

  When `sparsify` is not importable here, its training runs in that interpreter
  (`--peers-python`, default ``../venv-peers/bin/python`` next to the checkout or
  ``$SAEWB_PEERS_PYTHON``) and evaluation stays in this process (one model load).

Recipes (`--peer-recipe`)
-------------------------
Ours always uses the workbench defaults: Adam lr 1.6e-3/sqrt(d_sae/2^14) (`sae.trainer.default_lr`), 50 warm-up steps,
linear decay over the last 20%, inputs scaled to mean norm sqrt(d_in), b_dec = geometric
median, unit-norm decoder rows, AuxK (k_aux = d_in/2, alpha 1/32, dead after 250k tokens).

``matched`` (default): each peer set, through its own config knobs, as close to that as
it allows; what it cannot express is noted.
  - SAE Lens: same lr, warm-up and final linear decay; normalize_activations =
    "expected_average_only_in", estimated on the sample ours uses (same formula, so the
    same factor); dead_feature_window = 250k tokens in steps. b_dec is set to our
    geometric median before training: SAE Lens 6 has no b_dec init option, starts it at 0,
    and Adam moves it by ~lr per step, far too slowly for SmolLM2's residual mean (about
    3/4 of the mean norm). Its own defaults stay: AuxK coefficient 1.0 on the
    un-normalised residual MSE (ours: 1/32 of a normalised one), decoder_init_norm 0.1,
    rescale_acts_by_decoder_norm (TopK on pre-acts x decoder norms; rows never
    renormalised), gradient-norm clipping at 1.0 (hard-coded).
  - sparsify: optimizer "adam" with the same lr and warm-up (its schedule then decays
    linearly to 0 over the whole run, not the last 20%); auxk_alpha 1/32, dead after 250k
    tokens; inputs scaled by our input scale (sparsify has no such option; folded back on
    export). Its own: b_dec = mean of the first batch, encoder bias 0, W_dec = W_enc^T.
``defaults``: each peer's own defaults apart from width, k, batch size and token count.
  - SAE Lens: constant lr 3e-4, no warm-up or decay, no input normalisation, b_dec = 0,
    dead window 1000 steps (4M tokens at batch 4096: AuxK never switches on in a
    2M-token run).
  - sparsify: schedule-free SignSGD (momentum 0.95), lr 5e-3/sqrt(d_sae/2^14), AuxK off
    (auxk_alpha 0), dead after 10M tokens.

Throughput is training tokens / wall-clock seconds of the whole training call (init,
data loading and, for ours, checkpoints included), on the device given by --device.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from activations.io import atomic_write_json
from activations.store import ActivationStore
from analysis.cli import PRESETS
from sae import ARCHITECTURES, SAEConfig, load_sae
from sae.trainer import INIT_SAMPLE_EPOCH, TrainConfig, Trainer, sae_name, train

PEERS = ("sae_lens", "sparsify")
MAX_CONVERSION_ERROR = 1e-4
"""Largest relative difference allowed between a peer's own forward pass and ours on its weights."""


@dataclass
class Trained:
    name: str
    path: str
    """SAE Lens-format folder that `sae.load_sae` reads."""
    seconds: float | None = None
    tokens: int | None = None
    conversion_error: float | None = None
    """Max |peer forward - workbench forward| / max |x| on a batch: 0 up to float error."""
    note: str = ""

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds and self.tokens else None


# ---------------------------------------------------------------------------- shared setup
def workbench_config(args: argparse.Namespace, store: ActivationStore) -> TrainConfig:
    sae_cfg = SAEConfig(
        architecture="topk", d_in=store.d_in, d_sae=args.d_sae, k=args.k, hook_name=store.hook_name,
        model_name=store.model_name, context_size=int(store.manifest["context_len"]),
    )
    return TrainConfig(
        out_dir=str(args.out / "ours"), saes=[sae_cfg], n_tokens=args.train_tokens, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, device=args.device,
    )


def reference_trainer(cfg: TrainConfig, store: ActivationStore) -> Trainer:
    """The workbench trainer, initialised but never run: the single source of the batch
    order, learning rate, input scale and b_dec (geometric median) the peers are given."""
    trainer = Trainer(cfg, store)
    trainer.init_from_sample()
    return trainer


def init_sample(cfg: TrainConfig, store: ActivationStore) -> Iterator[torch.Tensor]:
    """The batches the workbench trainer estimates its input scale from."""
    size = min(cfg.batch_size, cfg.init_tokens)
    return itertools.islice(store.iter_batches(size, seed=cfg.seed, epoch=INIT_SAMPLE_EPOCH), math.ceil(cfg.init_tokens / size))


def fresh_dir(path: Path) -> Path:
    """Bench-owned output folder, emptied so no stale checkpoint is resumed (timings)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def relative_error(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    return float((a - b).abs().max() / x.abs().max())


# ---------------------------------------------------------------------------- ours
def train_ours(cfg: TrainConfig, store: ActivationStore) -> Trained:
    fresh_dir(Path(cfg.out_dir))
    started = time.perf_counter()
    [path] = train(cfg, store)
    return Trained("ours", str(path), time.perf_counter() - started, cfg.total_steps * cfg.batch_size)


def use_pretrained_ours(path: Path, cfg: TrainConfig) -> Trained:
    sae = load_sae(path)
    want = cfg.saes[0]
    if (sae.architecture, sae.cfg.d_sae, sae.cfg.k, sae.cfg.hook_name) != (want.architecture, want.d_sae, want.k, want.hook_name):
        raise SystemExit(
            f"--ours {path} is {sae.architecture} d_sae={sae.cfg.d_sae} k={sae.cfg.k} at {sae.cfg.hook_name}; the peers would be "
            f"trained as {want.architecture} d_sae={want.d_sae} k={want.k} at {want.hook_name}: pass matching --d-sae/--k/--store"
        )
    return Trained("ours", str(path), note="--ours: not retrained, no timing")


# ---------------------------------------------------------------------------- SAE Lens
def sae_lens_matched_schedule(ref: Trainer, n_norm_batches: int) -> dict:
    """SAETrainerConfig fields that reproduce the workbench's lr schedule and dead threshold."""
    cfg, steps = ref.cfg, ref.cfg.total_steps
    decay = int(steps * cfg.decay_fraction)
    warmup = min(cfg.warmup_steps, steps - decay)  # SAE Lens needs warm-up + decay <= steps (tiny runs)
    lr = ref.base_lrs[0]
    return dict(
        lr=lr, lr_end=lr, lr_warm_up_steps=warmup, lr_decay_steps=decay,
        dead_feature_window=max(1, cfg.dead_tokens // cfg.batch_size), n_batches_for_norm_estimate=n_norm_batches,
    )


def train_sae_lens(ref: Trainer, store: ActivationStore, recipe: str, out: Path) -> Trained:
    from sae_lens import SAE as LensSAE
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg, ours, matched = ref.cfg, ref.cfg.saes[0], recipe == "matched"
    # its norm estimate reads the first batches it is given: hand it our init sample, so
    # that the training batches that follow are exactly ours
    prefix = list(init_sample(cfg, store)) if matched else []
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.total_steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        device=str(ref.device), logger=LoggingConfig(log_to_wandb=False),
        **(sae_lens_matched_schedule(ref, len(prefix)) if matched else {}),
    )
    if trainer_cfg.lr_end is None:
        trainer_cfg.lr_end = trainer_cfg.lr  # what its runner config sets; unused by the "constant" schedule
    torch.manual_seed(cfg.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=ours.d_in, d_sae=ours.d_sae, k=ours.k, device=str(ref.device),
        normalize_activations="expected_average_only_in" if matched else "none",
        metadata=SAEMetadata(model_name=ours.model_name, hook_name=ours.hook_name, context_size=ours.context_size, prepend_bos=True),
    ))
    if matched:
        sae.b_dec.data.copy_(ref.saes[0].b_dec)  # normalised units: its normaliser equals ours (same sample, same formula)

    started = time.perf_counter()
    sae = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=itertools.chain(prefix, ref.batches())).fit()
    seconds = time.perf_counter() - started

    path = fresh_dir(out / "sae_lens")
    sae.save_inference_model(path)  # its own conversion (folds the scale and decoder norms) and save
    x = next(store.iter_batches(256, seed=cfg.seed + 1))
    with torch.no_grad():
        error = relative_error(LensSAE.load_from_disk(path)(x), load_sae(path)(x), x)
    return Trained("sae_lens", str(path), seconds, trainer_cfg.total_training_samples, error, f"recipe={recipe}")


# ---------------------------------------------------------------------------- sparsify
def sparsify_optimizer(params, recipe: str, lr: float, warmup: int, steps: int):
    """The optimizer and schedule `sparsify.trainer.Trainer` builds for `optimizer` adam/signum."""
    if recipe == "matched":
        from transformers import get_linear_schedule_with_warmup

        adam = torch.optim.Adam(params, lr=lr)
        return adam, get_linear_schedule_with_warmup(adam, warmup, steps)
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    opt = ScheduleFreeWrapper(SignSGD([dict(params=params, lr=lr)]), momentum=0.95)
    opt.train()
    return opt, None


def train_sparsify(ref: Trainer, store: ActivationStore, recipe: str, out: Path) -> Trained:
    from sparsify import SparseCoder, SparseCoderConfig

    cfg, ours = ref.cfg, ref.cfg.saes[0]
    device, steps = ref.device, cfg.total_steps
    matched = recipe == "matched"
    scale = ref.scale if matched else 1.0
    lr = ref.base_lrs[0] if matched else 5e-3 / math.sqrt(ours.d_sae / 2**14)
    auxk_alpha, dead_tokens = (cfg.aux_coefficient, cfg.dead_tokens) if matched else (0.0, 10_000_000)

    torch.manual_seed(cfg.seed)
    coder = SparseCoder(ours.d_in, SparseCoderConfig(activation="topk", num_latents=ours.d_sae, k=ours.k), device, dtype=torch.float32)
    optimizer, scheduler = sparsify_optimizer(list(coder.parameters()), recipe, lr, cfg.warmup_steps, steps)
    tokens_since_fired = torch.zeros(ours.d_sae, dtype=torch.long, device=device)

    started = time.perf_counter()
    for step, batch in zip(range(steps), ref.batches()):
        x = batch.to(device) * scale
        # --- mirrors the per-step code of sparsify.trainer.Trainer (loss_fn="fvu")
        if step == 0:
            coder.b_dec.data = x.mean(0)
        coder.set_decoder_norm_to_unit_norm()
        dead = tokens_since_fired > dead_tokens if auxk_alpha > 0 else None
        result = coder(x, dead_mask=dead)
        (result.fvu + auxk_alpha * result.auxk_loss).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            tokens_since_fired += len(x)
            tokens_since_fired[result.latent_indices.flatten()] = 0
    if hasattr(optimizer, "eval"):
        optimizer.eval()  # schedule-free: switch the weights to the averaged iterate, as its save does
    seconds = time.perf_counter() - started

    coder.save_to_disk(fresh_dir(out / "sparsify_native"))
    path = save_sparsify_as_workbench(coder, ours, scale, out / "sparsify")
    x = next(store.iter_batches(256, seed=cfg.seed + 1)).to(device)
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x * scale)
        theirs = coder.decode(top_acts, top_indices) / scale
        error = relative_error(theirs, load_sae(path, device)(x), x)
    return Trained("sparsify", str(path), seconds, steps * cfg.batch_size, error, f"recipe={recipe}")


def save_sparsify_as_workbench(coder, cfg: SAEConfig, scale: float, path: Path) -> Path:
    """SparseCoder -> workbench TopK SAE (SAE Lens format): encoder.weight is W_enc^T, and
    relu-then-topk equals topk-then-relu; the input scale is folded in like ours."""
    sae = ARCHITECTURES["topk"](cfg)
    sae.load_tensors({
        "W_enc": coder.encoder.weight.detach().T.cpu(), "b_enc": coder.encoder.bias.detach().cpu(),
        "W_dec": coder.W_dec.detach().cpu(), "b_dec": coder.b_dec.detach().cpu(),
    })
    sae.fold_input_scale(scale)
    return sae.save(fresh_dir(path))


def peers_python(args: argparse.Namespace) -> str | None:
    """An interpreter that can import sparsify: this one, or the separate peers venv."""
    if importlib.util.find_spec("sparsify") is not None:
        return sys.executable
    candidate = Path(args.peers_python)
    return str(candidate) if candidate.exists() else None


def train_sparsify_elsewhere(args: argparse.Namespace, python: str) -> Trained:
    """Run this script's `--train-only sparsify` in the peers venv and read its result."""
    command = [python, str(Path(__file__).resolve()), "--train-only", "sparsify", *args.argv]
    subprocess.run(command, check=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    return Trained(**json.loads((args.out / "sparsify" / "train.json").read_text()))


def train_peers(args: argparse.Namespace, cfg: TrainConfig, store: ActivationStore) -> list[Trained]:
    python = peers_python(args) if "sparsify" in args.peers else None
    if "sparsify" in args.peers and python is None:
        raise SystemExit(f"sparsify is not importable here nor at --peers-python {args.peers_python}; see --help for its venv")
    sparsify_here = python == sys.executable
    ref = reference_trainer(cfg, store) if "sae_lens" in args.peers or sparsify_here else None
    trained = []
    if "sae_lens" in args.peers:
        trained.append(train_sae_lens(ref, store, args.peer_recipe, args.out))
    if "sparsify" in args.peers:
        trained.append(train_sparsify(ref, store, args.peer_recipe, args.out) if sparsify_here else train_sparsify_elsewhere(args, python))
    return trained


# ---------------------------------------------------------------------------- evaluation + report
def evaluate_all(trained: list[Trained], args: argparse.Namespace, store: ActivationStore) -> dict[str, dict]:
    from activations import CorpusConfig, load_model
    from analysis.evaluation.evaluate import EvalConfig, evaluate, write_results

    model = load_model(store.model_name, args.device)
    eval_cfg = EvalConfig(
        corpus=CorpusConfig(split="heldout", context_len=int(store.manifest["context_len"])),
        n_tokens=args.eval_tokens, n_ce_contexts=args.ce_contexts,
    )
    results = {}
    for t in trained:
        path = Path(t.path)
        result = evaluate(load_sae(path), model, eval_cfg)
        metrics = path.parent / "metrics.jsonl" if t.name == "ours" else None
        write_results(result, path, metrics, title=f"{t.name} ({path.name}) @ {store.hook_name}")
        summary = {k: v for k, v in asdict(result).items() if k != "log10_feature_density"}
        results[t.name] = {"train": asdict(t) | {"tokens_per_s": t.tokens_per_s}, "eval": summary}
    return results


def format_table(results: dict[str, dict]) -> str:
    header = f"{'SAE':<10} {'FVU':>7} {'L0':>6} {'dead':>7} {'CE rec':>7} {'dCE nats':>9} {'KL':>7} {'train tok/s':>12} {'conv err':>9}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        e, t = r["eval"], r["train"]
        speed = f"{t['tokens_per_s']:,.0f}" if t["tokens_per_s"] else "-"
        conv = f"{t['conversion_error']:.1e}" if t["conversion_error"] is not None else "-"
        lines.append(
            f"{name:<10} {e['fvu']:>7.4f} {e['l0']:>6.1f} {e['dead_fraction']:>7.1%} {e['ce_loss_recovered']:>7.4f} "
            f"{e['delta_ce']:>9.4f} {e['kl_per_token']:>7.4f} {speed:>12} {conv:>9}"
        )
    any_eval = next(iter(results.values()))["eval"]
    lines.append(f"(reconstruction + dead fraction over {any_eval['n_tokens']:,} held-out tokens; CE/KL over {any_eval['n_ce_tokens']:,} positions)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line
def available_peers(args: argparse.Namespace) -> list[str]:
    found = []
    if importlib.util.find_spec("sae_lens") is not None:
        found.append("sae_lens")
    if peers_python(args):
        found.append("sparsify")
    return found


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    default = PRESETS["default"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True, help="activation store of the training split (a hook folder)")
    p.add_argument("--out", type=Path, required=True, help="results folder (its SAE subfolders are overwritten)")
    p.add_argument("--d-sae", type=int, default=default["d_sae"], help="latents (default: %(default)s)")
    p.add_argument("--k", type=int, default=default["k"], help="active latents per token (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=default["batch_size"], help="default: %(default)s")
    p.add_argument("--train-tokens", type=int, default=default["train_tokens"], help="default: %(default)s")
    p.add_argument("--eval-tokens", type=int, default=default["eval_tokens"], help="held-out tokens for reconstruction metrics (default: %(default)s)")
    p.add_argument("--ce-contexts", type=int, default=default["ce_contexts"], help="held-out contexts for CE/KL (default: %(default)s)")
    p.add_argument("--peers", nargs="*", choices=PEERS, default=None, help="peer libraries (default: every one importable)")
    p.add_argument("--peer-recipe", choices=["matched", "defaults"], default="matched", help="see the recipes above (default: %(default)s)")
    p.add_argument("--ours", type=Path, default=None, help="an already-trained workbench SAE folder to evaluate instead of training ours")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="for training and evaluation (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="Adam lr for ours and the matched peers (default: sae.trainer.default_lr)")
    p.add_argument(
        "--peers-python", default=os.environ.get("SAEWB_PEERS_PYTHON", str(Path(__file__).resolve().parents[2] / "venv-peers" / "bin" / "python")),
        help="interpreter with sparsify installed, used when this one lacks it (default: %(default)s)",
    )
    p.add_argument("--train-only", choices=["sparsify"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.peers is None:
        args.peers = available_peers(args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    store = ActivationStore(args.store)
    cfg = workbench_config(args, store)
    if args.train_only == "sparsify":  # child process in the peers venv
        trained = train_sparsify(reference_trainer(cfg, store), store, args.peer_recipe, args.out)
        atomic_write_json(args.out / "sparsify" / "train.json", asdict(trained))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    print(f"store {store.path}: {store.n_tokens:,} tokens, d_in {store.d_in}; SAE {sae_name(cfg.saes[0])}, "
          f"{cfg.total_steps} steps of {cfg.batch_size}; peers {args.peers or 'none'} ({args.peer_recipe})")
    trained = [use_pretrained_ours(args.ours, cfg) if args.ours else train_ours(cfg, store)]
    trained += train_peers(args, cfg, store)
    for t in trained:
        if t.conversion_error is not None and t.conversion_error > MAX_CONVERSION_ERROR:
            raise SystemExit(f"{t.name}: loading {t.path} with sae.load_sae changes its outputs (relative error {t.conversion_error:.2e})")

    results = evaluate_all(trained, args, store)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("train_only", "argv")}
    atomic_write_json(args.out / "quality.json", {"settings": settings, "train_config": asdict(cfg), "results": results})
    print(format_table(results))
    print(f"results: {args.out / 'quality.json'}")


if __name__ == "__main__":
    main()
