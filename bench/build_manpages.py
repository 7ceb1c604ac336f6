"""Build a corpus of another kind of text for label benches: English man pages (documentation
with its commands, options, shell examples and code left in), rendered to plain text.

    python bench/build_manpages.py --out runs/manpages.jsonl

Pages of sections 1 and 8 under /usr/share/man (no translations), rendered with
`man -l <page> | col -bx`, kept when at least 1,500 characters long (up to `--max-pages`),
taken and written in a fixed pseudo-random order (sha1 of the page's file name) so an atlas and the scoring text after it
both hold a mix of pages. One JSON object per line: {"text": ..., "source": <page file>}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
from pathlib import Path

from tqdm.auto import tqdm

from activations.io import atomic_write_bytes


def render(page: Path) -> str:
    """The page as plain text (`man -l | col -bx`), empty when it does not render."""
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"}
    man = subprocess.run(["man", "-l", str(page)], capture_output=True, env=env, timeout=30)
    if man.returncode != 0:
        return ""
    return subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True, timeout=30).stdout.decode("utf-8", "replace")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--man-dir", type=Path, default=Path("/usr/share/man"))
    p.add_argument("--min-chars", type=int, default=1500)
    p.add_argument("--max-pages", type=int, default=1666, help="stop after this many kept pages (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/manpages.jsonl"))
    args = p.parse_args()
    pages = sorted(q for section in ("man1", "man8") for q in (args.man_dir / section).glob("*") if q.is_file())
    if not pages:
        raise SystemExit(f"no man pages under {args.man_dir}/man1 or man8 (install the man-db package and some manuals)")
    pages.sort(key=lambda q: hashlib.sha1(q.name.encode()).hexdigest())
    lines = []
    for page in tqdm(pages, desc="man pages"):
        text = render(page).strip()
        if len(text) >= args.min_chars:
            lines.append(json.dumps({"text": text, "source": page.name}))
            if len(lines) >= args.max_pages:
                break
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, ("\n".join(lines) + "\n").encode())
    print(f"{len(lines):,} of {len(pages):,} pages, {sum(len(json.loads(x)['text']) for x in lines):,} characters -> {args.out}")


if __name__ == "__main__":
    main()
