#!/usr/bin/env python3
"""The gateway against the bare floor: a plain Flask + requests relay (bench/bare_relay).

The issue's targets are relative to that floor, and this machine's absolute figures drift
from minute to minute, so the two are measured alternately, several times, with the same
harness (bench/run.py) and the medians compared: (c) CPU per relayed chunk and TTFT, (e) CPU
per 1000 JSON requests.

    .venv/bin/python bench/vs_bare.py            # 3 alternations, about 4 minutes
    .venv/bin/python bench/vs_bare.py --times 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
APPS = {"gateway": REPO, "bare relay": BENCH / "bare_relay"}
FIGURES = {
    "(c) CPU per relayed chunk, 1 ms apart (µs)": lambda r: r["c"]["cpu_us_per_chunk"],
    "(c) CPU per relayed chunk, back to back (µs)": lambda r: r["c"]["burst_cpu_us_per_chunk"],
    "(c) TTFT added over direct (ms)": lambda r: r["c"]["ttft_added_ms"],
    "(e) CPU-s per 1000 JSON requests": lambda r: r["e"]["cpu_s_per_1000"],
}


def run_once(app: Path) -> dict:
    """One bench/run.py --only ce run of ``app``; its JSON results. The gateway runs with every
    feature on (a client key with limits); the bare relay has no such thing to switch on."""
    command = [sys.executable, str(BENCH / "run.py"), "--only", "ce", "--app-dir", str(app)]
    if app != REPO:
        command.append("--no-auth")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    out = done.stdout + done.stderr
    line = next(x for x in reversed(out.splitlines()) if "results:" in x)
    path = line.split("results:", 1)[1].split(" / ")[0].strip()
    return json.loads(Path(path).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=3, help="alternations (default 3)")
    args = parser.parse_args()
    values: dict[str, dict[str, list[float]]] = {a: {f: [] for f in FIGURES} for a in APPS}
    for turn in range(args.times):
        order = list(APPS) if turn % 2 == 0 else list(reversed(APPS))
        for name in order:
            result = run_once(APPS[name])
            for figure, pick in FIGURES.items():
                values[name][figure].append(pick(result))
            print(f"turn {turn + 1}: {name} done", file=sys.stderr)
    title = f"figure (median of {args.times} runs)"
    print(f"{title:46} {'gateway':>10} {'bare':>10} {'ratio':>7}")
    for figure in FIGURES:
        gateway = statistics.median(values["gateway"][figure])
        bare = statistics.median(values["bare relay"][figure])
        print(f"{figure:46} {gateway:10.3f} {bare:10.3f} {gateway / bare:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
