"""`saewb dashboard`: the dashboard's command, a static HTML bundle of a feature atlas (and
its labels) written to <out>/dashboard."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from activations.flags import Command
from activations.model import ModelLoader

from ..features.atlas import load_atlas
from ..features.labels import load_labels
from .builder import build_dashboard


def add_dashboard_arguments(p: argparse.ArgumentParser) -> None:
    """`saewb dashboard`'s own flags."""
    p.add_argument("--atlas", type=Path, default=None, help="feature atlas folder (default: <out>/atlas)")
    p.add_argument("--labels", type=Path, default=None, help="labels.json of the same SAE (optional: label columns and scores)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--features", type=int, nargs="+", default=None, help="only these features (default: all)")
    which.add_argument("--top-n", type=int, default=None, help="only the N most frequently firing features")


def run(args: argparse.Namespace, models: ModelLoader) -> Path:
    """`saewb dashboard`: the bundle of --atlas (all features, --features, or the --top-n densest); its index.html."""
    atlas = load_atlas(args.atlas or Path(args.out) / "atlas")
    try:
        labels = load_labels(args.labels, atlas.d_sae) if args.labels else None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    features = args.features
    if args.top_n is not None:
        features = atlas.density.argsort(descending=True, stable=True)[:args.top_n].tolist()
    started = time.perf_counter()
    index = build_dashboard(atlas, Path(args.out) / "dashboard", labels=labels, features=features)
    n_pages = atlas.d_sae if features is None else len(set(features))
    print(f"dashboard: {n_pages:,} feature pages in {time.perf_counter() - started:.0f} s\n  open {index.resolve().as_uri()}")
    return index


COMMANDS = {"dashboard": Command("static HTML bundle of a feature atlas, written to <out>/dashboard", add_dashboard_arguments, run)}

__all__ = ["COMMANDS", "add_dashboard_arguments", "run"]
