#!/usr/bin/env python3
"""What llama.cpp says of its own queue while it holds requests: ``/metrics``
(``llamacpp:requests_processing``, ``requests_deferred``) and ``/slots`` (``is_processing``)
against the requests a client knows it has sent and not yet had answered, and what reading them
costs while the server computes.

One llama-server (SmolLM2-135M, one thread, four slots) and N requests with prompts of the
fleet bench's size sent at once, straight to it; a reader polls both endpoints every
``--every`` ms until every answer is in. Prints each distinct (in flight, processing,
deferred, slots busy) state and for how many polls it held, and the polls' latency. Run by
hand after ``scripts/llama-server``:

    .venv/bin/python bench/llama_queue.py --requests 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support")]

from llama import BUILD_HINT, LlamaServer, llama_dir  # noqa: E402


def prompt(i: int) -> str:
    return f"Project {i}.\n" + "\n".join(
        f"value_{i}_{n} = compute({n}, {i * n})  # keep answers short" for n in range(40)
    )


def metrics(url: str) -> tuple[int, int, float]:
    started = time.perf_counter()
    text = requests.get(url + "/metrics", timeout=60).text
    took = (time.perf_counter() - started) * 1000
    values = dict(line.split()[:2] for line in text.splitlines() if line[:1] != "#")
    processing = int(float(values["llamacpp:requests_processing"]))
    return processing, int(float(values["llamacpp:requests_deferred"])), took


def slots(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    busy = sum(s["is_processing"] for s in requests.get(url + "/slots", timeout=60).json())
    return busy, (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--every", type=float, default=100, help="ms between polls")
    args = parser.parse_args()
    home = llama_dir()
    if home is None:
        print(BUILD_HINT, file=sys.stderr)
        return 1
    log = Path(tempfile.mkdtemp(prefix="llama-queue-")) / "server.log"
    server = LlamaServer(home, log, ctx=8 * 1024, slots=4, extra=("-t", "1"))
    in_flight = 0
    lock = threading.Lock()

    def ask(i: int) -> None:
        nonlocal in_flight
        with lock:
            in_flight += 1
        try:
            server.chat({"messages": [{"role": "user", "content": prompt(i)}], "max_tokens": 8})
        finally:
            with lock:
                in_flight -= 1

    states: Counter[tuple[int, int, int, int]] = Counter()
    metrics_ms: list[float] = []
    slots_ms: list[float] = []
    try:
        with ThreadPoolExecutor(args.requests) as pool:
            futures = [pool.submit(ask, i) for i in range(args.requests)]
            time.sleep(0.2)  # every request sent
            while not all(f.done() for f in futures):
                sent = in_flight
                processing, deferred, took = metrics(server.url)
                busy, slot_took = slots(server.url)
                metrics_ms.append(took)
                slots_ms.append(slot_took)
                states[(sent, processing, deferred, busy)] += 1
                time.sleep(args.every / 1000)
        idle = [metrics(server.url)[2] for _ in range(20)]
    finally:
        server.stop()
    print("(in flight, processing, deferred, slots busy): polls")
    for state, polls in sorted(states.items(), key=lambda x: -x[0][0]):
        print(f"  {state}: {polls}")
    for name, took in (("/metrics busy", metrics_ms), ("/slots busy", slots_ms)):
        ordered = sorted(took)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        print(
            f"{name}: median {statistics.median(took):.1f} ms, p90 {p90:.1f}, max {max(took):.0f}"
        )
    print(f"/metrics idle: median {statistics.median(idle):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
