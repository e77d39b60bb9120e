"""What an ``affinity`` route costs a request: its conversation key (the hash chain over a
Claude Code-sized body), and its two state store round trips (place: loads, memory lookup,
choice, lease and memory write; then the lease given back), on SQLite and on Redis.

    python bench/placement.py [--redis redis://127.0.0.1:6379/0] [--n 2000]
    -> one JSON line per measurement, microseconds per request

Without ``--redis`` a throwaway redis-server is started on 127.0.0.1 if one is installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.backends.affinity import conversation  # noqa: E402
from app.state.store import Placement, Store  # noqa: E402

REPLICAS = ["r0", "r1", "r2", "r3"]


def claude_code_body(turns: int, file_bytes: int = 4000) -> dict:
    """A shared 12 kB system prompt and 20 tools, then ``turns`` turns with a file read each."""
    system = [{"type": "text", "text": "You are Claude Code. " + "x" * 12_000}]
    tools = [
        {"name": f"Tool{i}", "description": "d" * 800, "input_schema": {"type": "object"}}
        for i in range(20)
    ]
    messages: list[dict] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": [{"type": "text", "text": f"turn {turn}"}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "y" * 300}]})
    messages.append({"role": "user", "content": "f" * file_bytes})
    return {"model": "m", "system": system, "tools": tools, "messages": messages}


def per_call(work: Callable[[], object], n: int) -> float:
    """Median of five runs of ``n`` calls, in microseconds per call."""
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            work()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def store_cost(store: Store, n: int) -> float:
    body = claude_code_body(20)
    conv = conversation("fleet", body, {})
    assert conv is not None
    counter = iter(range(10**9))

    def one() -> None:
        i = next(counter)
        placement = Placement(
            REPLICAS,
            lookups=[f"{i}:{x}" for x in conv.lookups],
            session=f"s{i % 50}",
            remember=[f"{i}:{conv.last}", f"s{i % 50}"],
            max_entries=50_000,
        )
        placed = store.place(placement)
        store.unplace(placed.backend, placed.lease)

    return per_call(one, n)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="")
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    for turns in (1, 20, 100):
        body = claude_code_body(turns)
        size = len(json.dumps(body))
        cost = per_call(lambda b=body: conversation("fleet", b, {}), 200)
        print(json.dumps({"what": "key", "turns": turns, "body_bytes": size, "us": round(cost)}))

    from app.state.sqlite_store import SQLiteStore

    with tempfile.TemporaryDirectory() as directory:
        sqlite = SQLiteStore(directory)
        cost = store_cost(sqlite, args.n)
        print(json.dumps({"what": "place+unplace", "engine": "sqlite", "us": round(cost)}))
        sqlite.close()

    url, server = args.redis, None
    if not url and shutil.which("redis-server"):
        port = 6399
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
    if url:
        from app.state.redis_store import RedisStore

        try:
            redis = RedisStore(url, prefix="bench:")
            cost = store_cost(redis, args.n)
            print(json.dumps({"what": "place+unplace", "engine": "redis", "us": round(cost)}))
            redis.close()
        finally:
            if server is not None:
                server.terminate()
                server.wait()


if __name__ == "__main__":
    main()
