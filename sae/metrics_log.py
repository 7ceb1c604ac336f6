"""A training run's metrics log: `metrics.jsonl` (one JSON record per SAE per logged step),
mirrored to wandb or TensorBoard when asked, and read back with a torn last line skipped."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from activations.io import atomic_write_bytes

if TYPE_CHECKING:
    from .trainer import TrainConfig


class MetricsLog:
    """Appends records to <out>/metrics.jsonl and to the optional wandb / TensorBoard backend."""

    def __init__(self, cfg: TrainConfig, out: Path):
        self.path = out / "metrics.jsonl"
        self.backend = None
        try:
            if cfg.logger == "wandb":
                import wandb

                self.backend = wandb.init(project="sae-workbench", config=asdict(cfg), dir=str(out))
            elif cfg.logger == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.backend = SummaryWriter(str(out / "tensorboard"))
        except ImportError as e:
            raise RuntimeError(f"--logger {cfg.logger} needs its package: pip install {cfg.logger} ({e})") from e

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.backend is None:
            return
        prefixed = {f"{record['sae']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
        if hasattr(self.backend, "log"):
            self.backend.log(prefixed, step=record["step"])
        else:
            for k, v in prefixed.items():
                self.backend.add_scalar(k, v, record["step"])


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break  # torn last line
            raise ValueError(f"{path}:{n}: not a JSON record (the file is corrupt)") from None
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps before `step` (a resumed run logs the later ones again), and
    drop a torn last line."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _record_step(line) is not None and _record_step(line) < step]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


__all__ = ["MetricsLog", "read_metrics", "truncate_metrics"]
