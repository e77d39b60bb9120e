#!/usr/bin/env python3
"""Message batches against a backend with a fixed capacity: (a) how fast a batch runs at the
backend's concurrency limit, against the same requests sent by a client with that concurrency
through ``/v1/messages``; (b) interactive requests' time to first token with and without a
2,000-item batch running at ``share = 0.5``. Run by hand (not a test, no assertions):

    .venv/bin/python bench/batches.py                  # ~3 minutes on 2 cores
    .venv/bin/python bench/batches.py --only b --interactive 4,6 --workers 2

The backend is tests/support/fakebackend.py with a capacity in front of its answers: it serves
at most ``--capacity`` requests at once and queues the rest in arrival order, as vLLM's
``--max-num-seqs`` or llama.cpp's slots do, so a batch item holding a place shows as an
interactive request's wait. Batch items are answered after ``--service-ms``; interactive
requests stream: a first chunk after ``--prefill-ms``, then ``--chunks`` chunks
``--chunk-ms`` apart. Everything runs on 127.0.0.1, gunicorn from this checkout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support")]

from batching import MODEL, Deployment, batch_requests, sdk, worker_pids  # noqa: E402
from fakebackend import (  # noqa: E402
    FakeBackend,
    JSONReply,
    Recorded,
    Reply,
    StreamReply,
    chunks,
    completion,
    last_text,
)
from servers import Gunicorn  # noqa: E402


@dataclass
class Served:
    kind: str  # "batch" or "chat"
    arrived: float
    started: float  # when it got a place


@dataclass
class Capacity(Reply):
    """At most ``capacity`` requests in service at once; the rest wait for a place, in the
    order they arrived (a condition variable's waiters are woken first come, first served)."""

    capacity: int
    service_s: float
    prefill_s: float
    chunk_count: int
    chunk_s: float
    busy: int = 0
    peak: dict[str, int] = field(default_factory=lambda: {"batch": 0, "chat": 0, "all": 0})
    served: list[Served] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)
    in_service: dict[str, int] = field(default_factory=lambda: {"batch": 0, "chat": 0})

    def send(self, handler: Any, request: Recorded) -> None:
        kind = "batch" if last_text(request).startswith("batch-") else "chat"
        arrived = time.monotonic()
        with self.lock:
            self.lock.wait_for(lambda: self.busy < self.capacity)
            self.busy += 1
            self.in_service[kind] += 1
            self.peak[kind] = max(self.peak[kind], self.in_service[kind])
            self.peak["all"] = max(self.peak["all"], self.busy)
            self.served.append(Served(kind, arrived, time.monotonic()))
        try:
            body = request.json if isinstance(request.json, dict) else {}
            if body.get("stream"):
                pieces = [f"tk{i} " for i in range(self.chunk_count)]
                reply: Reply = StreamReply(
                    chunks(pieces), first_delay=self.prefill_s, delay=self.chunk_s
                )
            else:
                reply = JSONReply(completion("ok"), delay=self.service_s)
            reply.send(handler, request)
        finally:
            with self.lock:
                self.busy -= 1
                self.in_service[kind] -= 1
                self.lock.notify()

    def reset(self) -> None:
        with self.lock:
            self.served.clear()
            self.peak = {"batch": 0, "chat": 0, "all": 0}


def item_body(index: int, prefix: str = "direct-") -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": f"{prefix}{index}"}],
    }


def cpu_seconds(server: Gunicorn) -> float:
    """The workers' time on a CPU so far: the scheduler's own count for every thread
    (``/proc/<pid>/task/*/schedstat``, nanoseconds), not tick samples."""
    total = 0
    for pid in worker_pids(server):
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


# --- (a) throughput --------------------------------------------------------------------------


def direct_throughput(server: Gunicorn, items: int, concurrency: int) -> float:
    """``items`` requests by ``concurrency`` clients, each sending its next one as soon as
    the last is answered: items per second."""
    counter = iter(range(items))
    lock = threading.Lock()

    def client() -> int:
        done = 0
        with requests.Session() as session:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return done
                answer = session.post(f"{server.url}/v1/messages", json=item_body(index))
                assert answer.status_code == 200, answer.text
                done += 1

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(lambda _: client(), range(concurrency)))
    assert total == items
    return items / (time.monotonic() - start)


def batch_throughput(server: Gunicorn, items: int) -> float:
    """A batch of ``items`` from its create to its end (seen by polling every 0.1 s)."""
    with sdk(server, timeout=600) as client:
        start = time.monotonic()
        batch = client.messages.batches.create(requests=batch_requests(items))
        while client.messages.batches.retrieve(batch.id).processing_status != "ended":
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        ended = client.messages.batches.retrieve(batch.id)
    assert ended.request_counts.succeeded == items, ended.request_counts
    return items / elapsed


# --- (b) interactive TTFT --------------------------------------------------------------------


def ttft(port: int, body: bytes) -> float:
    """Seconds from sending the request to the first ``content_block_delta`` event."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        start = time.monotonic()
        conn.request("POST", "/v1/messages", body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 200, answer.read()
        first = None
        while line := answer.readline():
            if first is None and line.startswith(b"event: content_block_delta"):
                first = time.monotonic() - start
        assert first is not None
        return first
    finally:
        conn.close()


def interactive(url: str, clients: int, count: int, think_s: float) -> list[float]:
    """``count`` streamed requests from ``clients`` users, each pausing ``think_s`` between
    its requests: every request's TTFT."""
    counter = iter(range(count))
    lock = threading.Lock()
    port = int(url.rsplit(":", 1)[1])

    def user() -> list[float]:
        seen = []
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return seen
            body = {**item_body(index, "chat-"), "max_tokens": 64, "stream": True}
            seen.append(ttft(port, json.dumps(body).encode()))
            time.sleep(think_s)

    with ThreadPoolExecutor(clients) as pool:
        return [t for part in pool.map(lambda _: user(), range(clients)) for t in part]


def measured(url: str, clients: int, count: int, think_s: float) -> list[float]:
    """``interactive`` in a process of its own: the clients' timing is not held up by this
    process's threads (the backend's, answering the batch) waiting for the GIL."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(interactive, url, clients, count, think_s).result()


def summary(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


def waited(backend: Capacity, kind: str) -> tuple[int, int]:
    """Of ``kind``'s requests since the last reset: how many waited for a place, of all."""
    with backend.lock:
        mine = [s for s in backend.served if s.kind == kind]
    return sum(1 for s in mine if s.started - s.arrived > 0.002), len(mine)


# --- the run ---------------------------------------------------------------------------------


def start(
    directory: Path, backend: FakeBackend, args: argparse.Namespace, share: float
) -> tuple[Deployment, Gunicorn]:
    deployment = Deployment.write(
        directory, backend.url, capacity=args.capacity, share=share, backoff=1.0
    )
    return deployment, deployment.start(workers=args.workers)


def run_a(args: argparse.Namespace, capacity: Capacity, backend: FakeBackend, base: Path) -> None:
    _, server = start(base / "a", backend, args, share=1.0)
    try:
        direct_throughput(server, 4 * args.capacity, args.capacity)  # warm-up
        capacity.reset()
        cpu = cpu_seconds(server)
        direct = direct_throughput(server, args.items, args.capacity)
        direct_cpu = (cpu_seconds(server) - cpu) / args.items * 1000
        direct_peak = dict(capacity.peak)
        capacity.reset()
        cpu = cpu_seconds(server)
        batch = batch_throughput(server, args.items)
        batch_cpu = (cpu_seconds(server) - cpu) / args.items * 1000
        batch_peak = dict(capacity.peak)
    finally:
        server.stop()
    ideal = args.capacity / (args.service_ms / 1000)
    print(f"\n(a) throughput, {args.items} requests, capacity {args.capacity}, share 1.0")
    print(f"    backend's ceiling: {ideal:.1f}/s ({args.service_ms} ms a request)")
    print(
        f"    direct, {args.capacity} clients: {direct:.1f}/s, workers' CPU {direct_cpu:.1f} ms "
        f"a request  (peak in service {direct_peak})"
    )
    print(
        f"    batch:              {batch:.1f}/s, workers' CPU {batch_cpu:.1f} ms an item  "
        f"(peak in service {batch_peak})"
    )
    print(
        f"    batch / direct: {batch / direct:.2f} (throughput), {batch_cpu / direct_cpu:.2f} (CPU)"
    )


def run_b(args: argparse.Namespace, capacity: Capacity, backend: FakeBackend, base: Path) -> None:
    _, server = start(base / "b", backend, args, share=0.5)
    levels = [int(x) for x in args.interactive.split(",")]
    think = args.think_ms / 1000
    rows: dict[tuple[str, int], tuple[list[float], tuple[int, int]]] = {}

    def measure(label: str) -> None:
        for level in levels:
            capacity.reset()
            values = measured(server.url, level, args.requests, think)
            rows[(label, level)] = (values, waited(capacity, "chat"))

    try:
        measured(server.url, 2, 10, 0)  # warm-up
        measure("without")
        with sdk(server, timeout=600) as client:
            batch = client.messages.batches.create(requests=batch_requests(args.batch))
            wait_for(lambda: batch_seen(backend) >= 4 * args.capacity, "the batch running")
            measure("with")
            peak = dict(capacity.peak)
            left = client.messages.batches.retrieve(batch.id)
            running = left.processing_status == "in_progress"
            client.messages.batches.cancel(batch.id)
            while client.messages.batches.retrieve(batch.id).processing_status != "ended":
                time.sleep(0.2)
        measure("again")
    finally:
        server.stop()
    print(
        f"\n(b) interactive TTFT, capacity {args.capacity}, batch share 0.5 "
        f"({args.requests} streamed requests per row, {args.think_ms} ms between a user's)"
    )
    print(f"    the batch ran through every 'with' row: {running}; peak in service {peak}")
    print("    users  batch    median ms   p90 ms   waited at backend   median vs without")
    for level in levels:
        base_median = statistics.mean(
            summary(rows[(label, level)][0])[0] for label in ("without", "again")
        )
        for label in ("without", "with", "again"):
            values, (queued, total) = rows[(label, level)]
            median, p90 = summary(values)
            print(
                f"    {level:>5}  {label:<7}  {median * 1000:>9.1f}  {p90 * 1000:>7.1f}"
                f"   {queued:>5} of {total:<5}      {median / base_median:.2f}"
            )


def batch_seen(backend: FakeBackend) -> int:
    return sum(1 for r in list(backend.requests) if last_text(r).startswith("batch-"))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise SystemExit(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="ab", help="which figures: a, b or ab")
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--service-ms", type=int, default=100, help="a batch item's service")
    parser.add_argument("--prefill-ms", type=int, default=50, help="before a stream's 1st chunk")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-ms", type=int, default=5)
    parser.add_argument("--items", type=int, default=1000, help="requests for (a)")
    parser.add_argument("--batch", type=int, default=2000, help="the batch's items for (b)")
    parser.add_argument("--interactive", default="4,6", help="users for (b), comma-separated")
    parser.add_argument("--requests", type=int, default=150, help="per (b) row")
    parser.add_argument("--think-ms", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    capacity = Capacity(
        args.capacity,
        args.service_ms / 1000,
        args.prefill_ms / 1000,
        args.chunks,
        args.chunk_ms / 1000,
    )
    with FakeBackend() as backend, tempfile.TemporaryDirectory(prefix="bench-batches-") as tmp:
        backend.default = capacity
        print(f"gateway workers: {args.workers}; backend: {args.__dict__}")
        if "a" in args.only:
            run_a(args, capacity, backend, Path(tmp))
        if "b" in args.only:
            run_b(args, capacity, backend, Path(tmp))


if __name__ == "__main__":
    main()
