#!/usr/bin/env python3
"""What the console costs a /v1/messages request: worker CPU per 1000 JSON requests ((e) of
bench/run.py) with the console off (no admin token) and on (an admin token configured, so the
per-minute counts and the log of failed requests are kept). The two setups take turns, in a
different order each turn, and the medians are compared, so the ratio comes from one
invocation on one machine (bench/tracing.py does the same for tracing).

    .venv/bin/python bench/console.py              # 3 turns of 2 runs, about 6 minutes
    .venv/bin/python bench/console.py --times 5 --venv /path/to/venv
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tracing import FIGURES, run_once  # noqa: E402

SETUPS = {"off": {}, "on": {"GATEWAY_ADMIN_TOKEN": "bench-console-admin-token-0123456789"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=3, help="turns (default 3)")
    parser.add_argument("--venv", default=str(Path(__file__).resolve().parents[1] / ".venv"))
    args = parser.parse_args()
    label, pick = FIGURES["e"]
    found: dict[str, list[float]] = {name: [] for name in SETUPS}
    names = list(SETUPS)
    for turn in range(args.times):
        for name in names[turn % 2 :] + names[: turn % 2]:
            value = pick(run_once(SETUPS[name], args.venv, "e"))
            found[name].append(value)
            print(f"turn {turn + 1}, console {name}: {value:.3f}", flush=True)
    base = statistics.median(found["off"])
    print(f"\n{label}, median of {args.times}:")
    for name, values in found.items():
        median = statistics.median(values)
        print(f"  console {name}: {median:.3f} ({median / base:.2f}x off)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
