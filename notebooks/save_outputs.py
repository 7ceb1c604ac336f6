"""Execute the notebooks on the smoke preset and save them with their outputs, so they read on
a code host (which shows images but runs no JavaScript) without being run.

    python notebooks/save_outputs.py                 # all notebooks, one shared smoke run
    python notebooks/save_outputs.py 03_steering     # only those whose name starts so

Figures (plotly), HTML views and IFrames of the run's pages are rendered to PNG in headless
Chromium (Debian's `chromium`; the test command installs it) and stored in the notebook as
images; progress bars (stderr, widgets) are dropped. Numbers in a smoke run mean nothing: the
outputs show what a notebook produces, not results.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT = 1000, 620
FIGURE_WIDTH = 1300


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        raise SystemExit("needs headless Chromium to render figures: apt-get install chromium")
    return path


def screenshot(page: Path, png: Path, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    """A PNG of `page` (a local HTML file) at width x height, after its scripts ran."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                        f"--window-size={width},{height}", "--virtual-time-budget=8000", f"--screenshot={png}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return png.read_bytes()


def _page_of(data: dict, folder: Path, work: Path, n: int) -> tuple[Path, int, int] | None:
    """The page to render for one output's mime bundle (None: keep the output as it is)."""
    if "application/vnd.plotly.v1+json" in data:
        import plotly.io as pio

        fig = pio.from_json(json.dumps(data["application/vnd.plotly.v1+json"]))
        page = work / f"figure_{n}.html"
        width = int(fig.layout.width or FIGURE_WIDTH)  # multi-panel figures crowd at the page width
        page.write_text(pio.to_html(fig, include_plotlyjs=True, full_html=True, default_width=f"{width - 20}px"))
        return page, width, int(fig.layout.height or 500) + 40
    text = data.get("text/html")
    if text is None:
        return None
    text = "".join(text) if isinstance(text, list) else text
    iframe = re.search(r'<iframe[^>]*src="([^"]+)"[^>]*?(?:width="(\d+)")?[^>]*?(?:height="(\d+)")?', text)
    if iframe:
        source = (folder / html.unescape(iframe.group(1))).resolve()
        return (source, WIDTH, int(iframe.group(3) or HEIGHT)) if source.exists() else None
    page = work / f"html_{n}.html"
    page.write_text(f"<!doctype html><meta charset='utf-8'><body style='font-family:sans-serif'>{text}</body>")
    return page, WIDTH, HEIGHT


def as_images(nb, folder: Path) -> None:
    """Replace rich outputs with PNGs, drop progress bars and execution metadata, in place."""
    with tempfile.TemporaryDirectory() as tmp:
        work, n = Path(tmp), 0
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            kept = []
            for out in cell.get("outputs", []):
                if out.get("output_type") == "stream" and out.get("name") == "stderr":
                    continue  # progress bars
                data = out.get("data", {})
                if "application/vnd.jupyter.widget-view+json" in data:
                    continue
                target = _page_of(data, folder, work, n) if out.get("output_type") in ("display_data", "execute_result") else None
                if target is not None:
                    page, width, height = target
                    png = screenshot(page, work / f"shot_{n}.png", width, height)
                    out["data"] = {"image/png": base64.b64encode(png).decode(), "text/plain": data.get("text/plain", "<figure>")}
                    out["metadata"] = {}
                    n += 1
                kept.append(out)
            cell["outputs"] = kept
            cell.get("metadata", {}).pop("execution", None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="notebook name prefixes (default: all)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "saewb_notebooks", help="folder of the smoke runs")
    args = p.parse_args(argv)
    os.environ["SAEWB_PRESET"] = "smoke"
    for path in sorted(HERE.glob("*.ipynb")):
        if args.names and not any(path.name.startswith(n) for n in args.names):
            continue
        # 02 and 03 share one smoke run; 01 builds its own, 04 a three-hook stack
        os.environ["SAEWB_OUT"] = str(args.out / {"01": "quickstart", "04": "stack"}.get(path.name[:2], "run"))
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(HERE.parent)}}).execute()
        as_images(nb, HERE.parent)
        nbformat.write(nb, path)
        print(f"{path.name}: saved with outputs ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
