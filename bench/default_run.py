"""Time `saewb run` stage by stage: the stage table of the default run.

Runs the command in a subprocess and timestamps the first appearance of each stage's own
output (its progress bar or its summary line), so the same script times any version of the
workbench without instrumenting it. Prints the table and writes it as JSON, and the run's
output as <out>/run.log.

    python bench/default_run.py --out /tmp/default_run                  # the default preset
    python bench/default_run.py --out /tmp/small -- --n-tokens 262144   # extra flags for `saewb run`
    python bench/default_run.py --compare before.json after.json        # two tables side by side

Stages are the spans between markers, in order; a stage whose marker never appears is
reported as absent (e.g. the held-out harvest of versions that had none).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

MARKERS = [  # (stage, regex of the first output that belongs to it)
    ("harvest", r"harvest \d+ hook"),
    ("harvest held-out", r"harvest held-out"),
    ("train", r"\btrain:|^--- training \d+ hooks"),  # one SAE, or a stack from one stream
    ("evaluate", r"evaluate: "),
    ("atlas", r"\batlas:\s|\batlas\s+\d+%|atlas: \d"),
    ("labels", r"labels: "),
    ("dashboard", r"dashboard pages"),
    ("steering SAE", r"--- the steering SAE at"),  # harvest to train to labels of the second SAE, as one stage
]
END = r"outputs in "


def time_run(extra: list[str], out: Path) -> dict:
    """Run `saewb run --out out extra...`; {stage: seconds}, total, peak RSS and the log."""
    command = [sys.executable, "-m", "analysis.cli", "run", "--out", str(out), *extra]
    started = time.perf_counter()
    seen: dict[str, float] = {"start-up and model load": 0.0}
    log = []
    proc = subprocess.Popen(["/usr/bin/time", "-f", "maxrss_kb %M", *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    buffer = ""
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(4096):
        now = time.perf_counter() - started
        text = chunk.decode(errors="replace")
        log.append(text)
        buffer = (buffer + text)[-4096:]
        for stage, pattern in MARKERS:
            if stage not in seen and re.search(pattern, buffer, re.M):
                seen[stage] = now
        if "end" not in seen and re.search(END, buffer):
            seen["end"] = now
    code = proc.wait()
    total = time.perf_counter() - started
    full = "".join(log)
    if code != 0:
        raise SystemExit(f"saewb run failed ({code}):\n{full[-3000:]}")
    order = sorted(seen.items(), key=lambda kv: kv[1])
    stages = {name: round(order[i + 1][1] - t, 1) for i, (name, t) in enumerate(order[:-1])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text(full)  # the run's own output, progress bars included
    rss = re.search(r"maxrss_kb (\d+)", full)
    return {"stages": stages, "total_s": round(total, 1), "peak_rss_gb": round(int(rss.group(1)) / 2**20, 2) if rss else None,
            "command": " ".join(command[1:])}


def table(results: dict[str, dict]) -> str:
    names = [s for s in ["start-up and model load"] + [s for s, _ in MARKERS] if any(s in r["stages"] for r in results.values())]
    cols = list(results)
    lines = [f"{'stage':<18}" + "".join(f"{c:>12}" for c in cols) + ("   ratio" if len(cols) == 2 else "")]
    rows = [(n, [r["stages"].get(n) for r in results.values()]) for n in names]
    rows.append(("total", [r["total_s"] for r in results.values()]))
    for name, values in rows:
        cells = "".join(f"{v:>11.0f}s" if v is not None else f"{'-':>12}" for v in values)
        ratio = f"   {values[1] / values[0]:.2f}x" if len(values) == 2 and values[0] and values[1] is not None else ""
        lines.append(f"{name:<18}{cells}{ratio}")
    lines.append(f"{'peak RSS (GB)':<18}" + "".join(f"{r['peak_rss_gb'] or 0:>12.2f}" for r in results.values()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="run folder; must not exist (a timed run starts from nothing)")
    p.add_argument("--json", type=Path, default=None, help="write the timings here (default: <out>/stage_times.json)")
    p.add_argument("--label", default="run", help="column name in the printed table")
    p.add_argument("--compare", type=Path, nargs=2, default=None, help="print two saved timings side by side and exit")
    p.add_argument("extra", nargs="*", help="flags passed to `saewb run` (after --)")
    args = p.parse_args()
    if args.compare:
        results = {path.stem: json.loads(path.read_text()) for path in args.compare}
        print(table(results))
        return
    if args.out is None:
        p.error("--out is required")
    if args.out.exists():
        p.error(f"{args.out} exists: a timed run starts from nothing (remove it or pick another --out)")
    result = time_run(args.extra, args.out)
    path = args.json or args.out / "stage_times.json"
    path.write_text(json.dumps(result, indent=1))
    print(table({args.label: result}))
    print(f"timings: {path}")


if __name__ == "__main__":
    main()
