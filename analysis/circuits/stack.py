"""A stack of SAEs on the residual stream of one model, one per hook, in layer order: the
material of a feature graph (`graph.py`).

    saewb run --preset chain      harvests the stack's hooks in one pass, trains one SAE per hook
                                  and writes <out>/sae/stack.json + stack_report.html (per layer:
                                  held-out FVU, CE recovered, dead fraction)

`load_stack` refuses what a graph cannot use: SAEs of different models, non-residual hooks,
hooks out of layer order or repeated, and (with `check_model`) a stack of another model.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from activations.hooks import residual_depth
from activations.io import atomic_write_bytes, atomic_write_json
from activations.model import HookedModel, model_mismatch
from sae import SAE, load_sae
from sae.stack_manifest import STACK_FILE, write_stack_manifest  # noqa: F401  (re-exported: the stack API)

from ..encoding import first_position


@dataclass
class SAEStack:
    """SAEs on residual hooks of one model, ordered by layer."""

    saes: list[SAE]
    paths: list[Path | None]

    def __post_init__(self) -> None:
        if not self.saes:
            raise ValueError("an SAE stack needs at least one SAE")
        positions = [residual_depth(s.cfg.hook_name) for s in self.saes]
        if any(b <= a for a, b in zip(positions, positions[1:])):
            raise ValueError(f"hooks out of order: {self.hooks}; a stack lists its SAEs from the first layer to the last, "
                             "one per residual-stream point")
        models = {s.cfg.model_name for s in self.saes}
        if len(models) > 1:
            raise ValueError(f"the stack's SAEs were trained on different models: {sorted(map(str, models))}")
        widths = {s.cfg.d_in for s in self.saes}
        if len(widths) > 1:
            raise ValueError(f"the stack's SAEs read different widths (d_in {sorted(widths)}): not one residual stream")
        if len({first_position(s) for s in self.saes}) > 1:
            raise ValueError("the stack mixes SAEs trained with and without the BOS position")

    @property
    def hooks(self) -> list[str]:
        return [s.cfg.hook_name for s in self.saes]

    @property
    def model_name(self) -> str | None:
        return self.saes[0].cfg.model_name

    @property
    def depths(self) -> list[int]:
        """The number of blocks before each hook (`residual_depth`: resid_post of block L is L + 1)."""
        return [int(residual_depth(h)) for h in self.hooks]

    def __len__(self) -> int:
        return len(self.saes)

    def subset(self, indices: list[int]) -> SAEStack:
        """The stack of the SAEs at `indices` (in layer order)."""
        return SAEStack([self.saes[i] for i in indices], [self.paths[i] for i in indices])

    def to(self, device: str | torch.device) -> SAEStack:
        self.saes = [s.to(device).eval() for s in self.saes]
        return self

    def check_model(self, model: HookedModel) -> None:
        """A clear error when the stack was trained on another model, or reads past its depth."""
        if (mismatch := model_mismatch(self.model_name, model)) is not None:
            raise ValueError(f"this SAE stack was trained on another model: {mismatch}")
        d_model, n_layers = int(model.cfg.d_model), int(model.cfg.n_layers)
        if self.saes[0].cfg.d_in != d_model:
            raise ValueError(f"the stack's SAEs read d_in {self.saes[0].cfg.d_in}, the model's residual stream is {d_model} wide: "
                             "an SAE stack of another model")
        if self.depths[-1] > n_layers:
            raise ValueError(f"hook {self.hooks[-1]!r} is past the model's {n_layers} layers: an SAE stack of another model")


def stack_paths(source: str | Path | list[str | Path]) -> list[Path]:
    """SAE folders of a stack: a folder holding stack.json, the stack.json itself, or a list of SAE folders."""
    if isinstance(source, (list, tuple)):
        if len(source) == 1:
            return stack_paths(source[0])
        return [Path(p) for p in source]
    path = Path(source)
    manifest = path if path.name == STACK_FILE else path / STACK_FILE
    if manifest.exists():
        saes = json.loads(manifest.read_text())["saes"]
        # relative entries are relative to the manifest's folder (a stack folder moved or shared as a whole)
        return [Path(p) if Path(p).is_absolute() or Path(p).exists() else manifest.parent / p for p in saes.values()]
    if (path / "cfg.json").exists():
        return [path]
    raise FileNotFoundError(f"{path} is neither an SAE folder nor a folder with {STACK_FILE} (written by `saewb run --preset chain`)")


def load_stack(source: str | Path | list[str | Path], device: str | torch.device = "cpu") -> SAEStack:
    paths = stack_paths(source)
    return SAEStack([load_sae(p, device=device).eval() for p in paths], paths)


# ---------------------------------------------------------------------------------------
# the per-layer report of a trained stack


def stack_rows(stack_dir: str | Path) -> list[dict]:
    """One row per SAE of the stack: hook, depth (blocks before it), FVU, CE recovered, delta CE, dead fraction, L0 (from eval.json)."""
    rows = []
    for path in stack_paths(stack_dir):
        hook = load_sae(path).cfg.hook_name
        ev = json.loads((path / "eval.json").read_text()) if (path / "eval.json").exists() else {}
        rows.append({"hook": hook, "depth": int(residual_depth(hook)), "sae": path.name,
                     "fvu": ev.get("fvu"), "ce_loss_recovered": ev.get("ce_loss_recovered"), "delta_ce": ev.get("delta_ce"),
                     "dead_fraction": ev.get("dead_fraction"), "l0": ev.get("l0"), "n_tokens": ev.get("n_tokens")})
    return rows


def stack_figure(rows: list[dict]) -> go.Figure:
    fig = make_subplots(rows=1, cols=3, subplot_titles=("held-out FVU", "CE loss recovered", "dead fraction"))
    depths = [r["depth"] for r in rows]
    for col, key in enumerate(("fvu", "ce_loss_recovered", "dead_fraction"), start=1):
        fig.add_trace(go.Scatter(x=depths, y=[r[key] for r in rows], mode="lines+markers", name=key, showlegend=False), row=1, col=col)
    fig.update_xaxes(title_text="blocks before the hook")
    fig.update_layout(height=360, title="SAE stack, per layer")
    return fig


def format_stack_table(rows: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| hook | FVU | CE recovered | delta CE (nats) | dead | L0 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['hook']} | {fmt(r['fvu'], '.4f')} | {fmt(r['ce_loss_recovered'], '.4f')} | {fmt(r['delta_ce'], '.3f')} | "
              f"{fmt(r['dead_fraction'], '.2%')} | {fmt(r['l0'], '.1f')} |" for r in rows]
    return "\n".join(lines)


def write_stack_report(stack_dir: str | Path) -> tuple[Path, Path]:
    """<stack>/stack_eval.json and the standalone <stack>/stack_report.html (table + figure)."""
    stack_dir = Path(stack_dir)
    rows = stack_rows(stack_dir)
    json_path = stack_dir / "stack_eval.json"
    atomic_write_json(json_path, rows)
    table = "".join("<tr>" + "".join(f"<td>{html.escape('-' if v is None else (f'{v:.4f}' if isinstance(v, float) else str(v)))}</td>"
                                     for v in r.values()) + "</tr>" for r in rows)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>SAE stack</title></head><body>"
            f"<h2>SAE stack: held-out metrics per layer</h2><table border=1 cellpadding=4><tr>{head}</tr>{table}</table>"
            + stack_figure(rows).to_html(full_html=False, include_plotlyjs=True) + "</body></html>")
    html_path = stack_dir / "stack_report.html"
    atomic_write_bytes(html_path, page.encode())
    return json_path, html_path


def decoder_directions(sae: SAE) -> Tensor:
    """W_dec [d_sae, d_in] as unit rows (every architecture keeps them unit norm; normalised again here for imports)."""
    W = sae.W_dec.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
