"""Durable file writes shared by every stage (activations, sae, analysis).

Writes are atomic and durable: a temp file in the same folder, fsynced, renamed into place,
then the folder fsynced; a failed write removes its temp file. Tests only: when
SAEWB_TEST_PAUSE_FILE is set, every atomic write appends "<label> <path>" to that file and
sleeps SAEWB_TEST_PAUSE_S seconds after its temp file is complete and before the rename
(`pause_for_tests`; the trainer pauses the same way between its checkpoint renames), so a
test can SIGKILL a subprocess inside the write window (tests/test_kills.py). Nothing else
reads these variables.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def pause_for_tests(label: str, path: Path) -> None:
    """Tests only (see the module docstring): report a write window and pause inside it."""
    events = os.environ.get("SAEWB_TEST_PAUSE_FILE")
    if not events:
        return
    with open(events, "a") as f:
        f.write(f"{label} {path}\n")
    time.sleep(float(os.environ.get("SAEWB_TEST_PAUSE_S", "0.2")))


def fsync_dir(path: Path) -> None:
    """Make a rename or delete inside folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _commit(tmp: Path, path: Path) -> None:
    """fsync the finished temp file, rename it over `path`, fsync the folder; the temp file
    is removed if any of it fails."""
    try:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        pause_for_tests("write", path)
        tmp.replace(path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> tensor of any shape, e.g. a shard's acts [n_rows, d_in]) to `path`, atomically."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(tmp, path)


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of writes that died before their rename (call it only while no
    writer is running in `folder`)."""
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
