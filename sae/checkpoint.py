"""The trainer's resumable checkpoint: `<out>/checkpoint/` holds every SAE's weights, Adam
moments and dead-latent counters (safetensors) and `state.json` (step, input scale, settings,
the data source's identity), written last so that its presence marks a complete checkpoint.
One complete checkpoint is on disk at every moment, and a resume refuses changed settings or
another data source, listing what differs."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from activations.io import atomic_save_safetensors, atomic_write_json, fsync_dir, pause_for_tests

if TYPE_CHECKING:
    from .trainer import Trainer

RESUME_MAY_CHANGE = ("out_dir", "device", "logger", "checkpoint_every", "log_every", "max_steps", "fast_kernels")
"""TrainConfig fields a resumed run may change (they do not change the weights it computes)."""


def source_identity(trainer: Trainer) -> dict:
    """What the checkpoint records of its data source, to refuse a resume on another one."""
    source = trainer.source
    return {"hook_name": getattr(source, "hook_name", None), "d_in": source.d_in, "fingerprint": getattr(source, "fingerprint", None)}


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a whole checkpoint (state.json, written last, and every SAE's file)."""
    try:
        names = json.loads((folder / "state.json").read_text())["names"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / f"sae_{i}.safetensors").exists() for i in range(len(names)))


def _write_tmp(trainer: Trainer) -> Path:
    """The checkpoint written into a fresh temporary folder of `out`."""
    for stale in trainer.out.glob(".checkpoint.*.tmp"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = trainer.out / f".checkpoint.{trainer.step}.tmp"
    tmp.mkdir(parents=True)
    for i, (sae, opt) in enumerate(zip(trainer.saes, trainer.optimizers)):
        tensors = {f"sae.{k}": v.detach().cpu() for k, v in sae.state_dict().items()}
        tensors["tokens_since_fired"] = trainer.tokens_since_fired[i].cpu()
        for p_index, state in opt.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"adam.{p_index}.{key}"] = torch.as_tensor(value).detach().cpu()
        atomic_save_safetensors(tensors, tmp / f"sae_{i}.safetensors")  # each write fsyncs the file and `tmp`
    atomic_write_json(tmp / "state.json", {"step": trainer.step, "scale": trainer.scale, "names": trainer.names,
                                           "config": asdict(trainer.cfg), "source": source_identity(trainer)})  # last: marks it complete
    metrics = trainer.out / "metrics.jsonl"
    if metrics.exists():  # the records up to this checkpoint survive a crash with it
        with metrics.open("rb") as f:
            os.fsync(f.fileno())
    return tmp


def save_checkpoint(trainer: Trainer) -> None:
    """Write `trainer`'s state as <out>/checkpoint, replacing the previous one."""
    tmp = _write_tmp(trainer)
    final, old = trainer.out / "checkpoint", trainer.out / ".checkpoint.old"
    # One complete checkpoint is on disk at every moment: `final` becomes `old` only when it
    # is complete, and `old` (maybe the only one, after a resume from it) is deleted only
    # once the new checkpoint is in place.
    if final.exists():
        if is_complete(final):
            shutil.rmtree(old, ignore_errors=True)  # `final` is complete
            final.rename(old)
            fsync_dir(trainer.out)
            pause_for_tests("rotate", final)  # tests: a kill here leaves only `old`
        else:
            shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(trainer.out)
    pause_for_tests("rotated", final)  # tests: a kill here leaves `final` and `old`
    shutil.rmtree(old, ignore_errors=True)


def resume_differences(trainer: Trainer, state: dict) -> list[str]:
    """What differs between the checkpoint's run and this one, as "field: then -> now"."""
    saved, now = state["config"], json.loads(json.dumps(asdict(trainer.cfg)))
    diffs = []
    for key, value in now.items():
        if key in RESUME_MAY_CHANGE or key not in saved or saved[key] == value:
            continue
        if key == "saes" and len(saved[key]) == len(value):
            for i, (a, b) in enumerate(zip(saved[key], value)):
                diffs += [f"saes[{i}].{k}: {a[k]!r} -> {b[k]!r}" for k in b if k in a and a[k] != b[k]]  # new fields: not a change
        else:
            diffs.append(f"{key}: {saved[key]!r} -> {value!r}")
    then, source = state.get("source") or {}, source_identity(trainer)
    for key, value in source.items():
        if then.get(key) is not None and value is not None and then[key] != value:
            diffs.append(f"source {key}: {then[key]!r} -> {value!r}" + (" (another activation store)" if key == "fingerprint" else ""))
    return diffs


def _load_sae_state(trainer: Trainer, folder: Path, i: int) -> None:
    """SAE i's weights, counters and Adam state from the checkpoint in `folder`."""
    sae, opt = trainer.saes[i], trainer.optimizers[i]
    tensors = load_file(str(folder / f"sae_{i}.safetensors"), device=str(trainer.device))
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    trainer.tokens_since_fired[i] = tensors["tokens_since_fired"]
    opt_state = opt.state_dict()
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, p_index, name = key.split(".", 2)
            per_param.setdefault(int(p_index), {})[name] = value.cpu() if name == "step" else value
    opt_state["state"] = per_param
    opt.load_state_dict(opt_state)
    # fused Adam assumes the moments share their parameter's memory layout (W_enc is a
    # transpose); load_state_dict makes them contiguous
    for param in sae.parameters():
        for name, value in opt.state[param].items():
            if name != "step":
                opt.state[param][name] = torch.empty_like(param).copy_(value)


def checkpoint_setting(out: Path, key: str) -> object:
    """The TrainConfig value `key` the complete checkpoint in `out` was written with (None: no checkpoint, or no such key)."""
    for folder in (out / "checkpoint", out / ".checkpoint.old"):
        if is_complete(folder):
            return json.loads((folder / "state.json").read_text())["config"].get(key)
    return None


def load_checkpoint(trainer: Trainer) -> bool:
    """Resume `trainer` from <out>/checkpoint (or the previous one, if a run was killed between
    the two renames); False when there is no complete checkpoint."""
    folder = trainer.out / "checkpoint"
    if not is_complete(folder):
        folder = trainer.out / ".checkpoint.old"  # killed between the two renames
        if not is_complete(folder):
            return False
    state = json.loads((folder / "state.json").read_text())
    diffs = resume_differences(trainer, state)
    if diffs:
        raise ValueError(f"{folder} was written by a run with other settings ({'; '.join(diffs)}, checkpoint -> now); "
                         f"rerun with the checkpoint's settings to resume it, or use a new --out (or delete {folder}) to start over")
    trainer.step = int(state["step"])
    trainer.scale = [float(v) for v in state["scale"]] if isinstance(state["scale"], list) else float(state["scale"])
    for i in range(len(trainer.saes)):
        _load_sae_state(trainer, folder, i)
    return True


__all__ = ["RESUME_MAY_CHANGE", "checkpoint_setting", "is_complete", "load_checkpoint", "resume_differences", "save_checkpoint", "source_identity"]
