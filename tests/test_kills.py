"""Real kills: SIGKILL a `saewb harvest` and a `saewb train` subprocess several times at
seeded random moments, some of them inside atomic writes and checkpoint rotation, then rerun
the same command. The store must be byte-identical to an uninterrupted harvest, the SAEs
identical to an uninterrupted training run, and metrics.jsonl must hold each (sae, step) once.

Kills land inside write windows through the test-only hook of `activations.store`
(`pause_for_tests`): with SAEWB_TEST_PAUSE_FILE set, a subprocess appends "<label> <path>" to
that file when a write's temp file is complete (label "write") or between the checkpoint
renames ("rotate", "rotated"), then sleeps SAEWB_TEST_PAUSE_S seconds. The test watches the
file and kills during the sleep. Only these subprocesses get the variables.

The model is a random 2-layer Llama saved as a local Hugging Face folder (`tiny_llama_dir`
in conftest.py), loaded by the CLI like any `--model` folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from analysis import cli

HOOK = "blocks.1.hook_resid_post"
ROOT = Path(__file__).resolve().parents[1]
PAUSE_S = 0.2


def harvest_args(model: str, out: Path, corpus: Path) -> list[str]:
    # 80 contexts of 16 tokens in 10 shards
    return ["harvest", "--model", model, "--out", str(out), "--hook", HOOK, "--corpus", str(corpus), "--n-tokens", "1200",
            "--context-len", "16", "--dtype", "float32", "--batch-contexts", "4", "--shard-contexts", "8",
            "--harvest-autocast", "none", "--device", "cpu"]


def train_args(model: str, out: Path, store: Path) -> list[str]:
    # two SAEs, 40 steps of 64 tokens, a checkpoint every 4 steps
    return ["train", "--model", model, "--out", str(out), "--store", str(store), "--architecture", "topk", "jumprelu",
            "--d-sae", "64", "--k", "4", "--train-tokens", str(64 * 40), "--batch-size", "64", "--device", "cpu",
            "--checkpoint-every", "4", "--log-every", "1"]


def in_process(argv: list[str]) -> None:
    """The same CLI in this process (the model stays loaded), on one thread like the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli.main(argv)
    finally:
        torch.set_num_threads(threads)


def events_of(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [tuple(line.split(" ", 1)) for line in lines if " " in line]


def run_and_kill(argv: list[str], tmp: Path, rng: np.random.Generator, target: tuple) -> list[tuple[str, str]]:
    """Start `saewb <argv>` and SIGKILL it at `target`:
    ("write", part, n): inside the n-th write window whose path contains `part`;
    ("rotate", label, n): inside the n-th checkpoint-rotation window named `label`;
    ("delay", seconds): that long after its first write began.
    Returns the events the process reported before it died."""
    events = tmp / "events.txt"
    events.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAEWB_TEST_PAUSE_FILE": str(events), "SAEWB_TEST_PAUSE_S": str(PAUSE_S),
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = open(tmp / "subprocess.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "analysis.cli", *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            seen = events_of(events)
            if target[0] == "delay":
                hit = bool(seen)
            else:
                kind, part, n = target
                if kind == "write":
                    matching = [e for e in seen if e[0] == "write" and part in e[1]]
                else:
                    matching = [e for e in seen if e[0] == part]
                hit = len(matching) >= n
            if hit:
                # inside the write's pause, or a random moment after the first write
                time.sleep(rng.uniform(0, PAUSE_S * 0.3) if target[0] != "delay" else target[1])
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL, f"saewb {argv[0]} exited ({proc.returncode}) before the kill:\n{(tmp / 'subprocess.log').read_text()[-3000:]}"
    return events_of(events)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_sigkilled_harvest_resumes_to_the_same_store(tiny_llama_dir, text_corpus, tmp_path):
    rng = np.random.default_rng(11)
    in_process(harvest_args(tiny_llama_dir, tmp_path / "straight", text_corpus))
    straight = tmp_path / "straight" / "activations" / HOOK
    killed = tmp_path / "killed" / "activations" / HOOK
    argv = harvest_args(tiny_llama_dir, tmp_path / "killed", text_corpus)
    # inside a shard's write, inside a manifest write, then at a random moment
    targets = [("write", "shard_", int(rng.integers(2, 4))), ("write", "manifest.json", int(rng.integers(2, 4))),
               ("delay", float(rng.uniform(0.2, 0.6)))]
    for target in targets:
        seen = run_and_kill(argv, tmp_path, rng, target)
        if target[0] == "write":  # the kill landed in that write: its temp file is left behind
            assert any(p.name.startswith(".") and p.name.endswith(".tmp") for p in killed.iterdir()), seen
    manifest = json.loads((killed / "manifest.json").read_text())
    assert not manifest["complete"] and 0 < len(manifest["shards"]) < 10, manifest["shards"]  # the kills left a partial store
    in_process(argv)  # the same command again
    assert folder_bytes(killed) == folder_bytes(straight)  # same shards and manifest, no temp files left


def test_sigkilled_training_resumes_to_the_same_weights_and_metrics(tiny_llama_dir, text_corpus, tmp_path):
    rng = np.random.default_rng(12)
    in_process(harvest_args(tiny_llama_dir, tmp_path / "acts", text_corpus))
    store = tmp_path / "acts" / "activations" / HOOK
    in_process(train_args(tiny_llama_dir, tmp_path / "straight", store))
    argv = train_args(tiny_llama_dir, tmp_path / "killed", store)
    # between the checkpoint renames (only .checkpoint.old is on disk), inside the write of a
    # checkpoint's SAE file, at a random moment; each run resumes the previous one
    targets = [("rotate", "rotate", int(rng.integers(1, 3))), ("write", "sae_1.safetensors", int(rng.integers(1, 3))),
               ("delay", float(rng.uniform(0.3, 1.0)))]
    kinds = []
    for target in targets:
        seen = run_and_kill(argv, tmp_path, rng, target)
        kinds.append(seen[-1][0] if seen else None)
    assert kinds[0] == "rotate"  # killed while only the previous checkpoint was on disk
    sae_dir = tmp_path / "killed" / "sae"
    state = json.loads(((sae_dir / "checkpoint") if (sae_dir / "checkpoint").exists() else (sae_dir / ".checkpoint.old")).joinpath("state.json").read_text())
    assert 0 < state["step"] < 40
    in_process(argv)  # the same command again

    one, two = tmp_path / "straight" / "sae", sae_dir
    summary_one, summary_two = (json.loads((d / "train_summary.json").read_text()) for d in (one, two))
    assert summary_two["steps"] == 40 and summary_two["input_scale"] == summary_one["input_scale"]
    for name in summary_one["saes"]:
        a, b = load_file(str(one / name / "sae_weights.safetensors")), load_file(str(two / name / "sae_weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert (one / name / "cfg.json").read_text() == (two / name / "cfg.json").read_text()
    records = {}
    for d in (one, two):
        lines = (d / "metrics.jsonl").read_text().splitlines()
        keys = [(r["sae"], r["step"]) for r in map(json.loads, lines)]
        assert len(keys) == len(set(keys)) == 2 * 40, d  # each (sae, step) once
        records[d] = {(r["sae"], r["step"]): r for r in map(json.loads, lines)}
    for key, r in records[one].items():
        assert all(records[two][key][m] == r[m] for m in ("loss", "mse", "fvu", "l0", "aux_loss")), key
