"""The static, offline dashboard: one HTML page per feature plus a searchable index, built
from a feature atlas (and its labels). `builder.py` writes the bundle; `assets/` holds the
CSS and JavaScript it copies in (model text is only ever set as textContent); `cli.py` is the
`dashboard` command."""
from .builder import build_dashboard

__all__ = ["build_dashboard"]
