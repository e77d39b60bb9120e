"""What the console shows of the service right now and over time: each backend's state and
requests in flight, and the counts behind the Overview's charts. Read from what the gateway
already keeps: the store (per-minute counts, usage per day, placed requests in flight) and
the host's Prometheus multiprocess files (streams in flight, breakers), never from one
worker's memory alone."""

from __future__ import annotations

import calendar
import os
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from prometheus_client.samples import Sample

from app.backends.dispatch import Dispatcher
from app.errors import GatewayError
from app.policy.usage import summed
from app.state.guard import GuardedStore
from app.state.store import TALLY_FIELDS, Tally

# The Overview's ranges: how far back, and how many seconds each point of the chart sums.
RANGES = {"hour": (3600, 60), "day": (86400, 3600), "month": (30 * 86400, 86400)}
SERIES = ("requests", "errors", "input_tokens", "output_tokens", "cached_tokens")


def series(store: GuardedStore, name: str, now: float) -> dict[str, list[float]]:
    """The counts of the range ``name`` as chart columns: ``t`` (each point's start, epoch
    seconds) and one list per count. The hour and the day come from the store's per-minute
    counts; thirty days from the usage records (per day), as ``python -m app.usage`` reads."""
    span, step = RANGES[name]
    first = (int(now) - span) // step * step + step
    points = {t: dict.fromkeys(SERIES, 0) for t in range(first, int(now) + 1, step)}
    if name == "month":
        since = time.strftime("%Y-%m-%d", time.gmtime(first))
        until = time.strftime("%Y-%m-%d", time.gmtime(now))
        for entry in summed(store.usage(since, until, None, None), ["day"]):
            t = calendar.timegm(time.strptime(str(entry["day"]), "%Y-%m-%d"))
            if t in points:
                for field in SERIES:
                    points[t][field] += int(entry[field])
    else:
        tally: Tally
        for tally in store.tallies(first // 60):
            t = tally.minute * 60 // step * step
            if t in points:
                for field in TALLY_FIELDS:
                    points[t][field] += getattr(tally, field)
    columns: dict[str, list[float]] = {"t": [float(t) for t in points]}
    for field in SERIES:
        columns[field] = [float(p[field]) for p in points.values()]
    return columns


def totals(columns: dict[str, list[float]]) -> dict[str, int]:
    return {field: int(sum(columns[field])) for field in SERIES}


def backends(dispatcher: Dispatcher, store: GuardedStore) -> list[dict[str, Any]]:
    """Each backend now: its breaker (open if any worker on this host holds it open), its
    streams in flight on this host, the requests placed on it across the service (routes
    that place by load), and this worker's count of failures in a row."""
    names = list(dispatcher.clients)
    try:
        placed: dict[str, int] | None = store.backend_loads(names)
    except GatewayError:
        placed = None  # the store is down
    streams: dict[str, float] = {}
    breakers: dict[str, float] = {}
    for sample in _samples():
        backend = sample.labels.get("backend")
        if backend is None:
            continue
        if sample.name == "gateway_streams_in_flight":
            streams[backend] = streams.get(backend, 0) + sample.value
        elif sample.name == "gateway_backend_breaker_open":
            breakers[backend] = max(breakers.get(backend, 0), sample.value)
    health = dispatcher.balancer.snapshot()
    rows = []
    for name, client in dispatcher.clients.items():
        mine = health.get(name, {})
        is_open = breakers.get(name, 0) > 0 or mine.get("breaker") == "open"
        rows.append(
            {
                "name": name,
                "url": client.name,
                "breaker": "open" if is_open else str(mine.get("breaker", "closed")),
                "streams": int(streams.get(name, 0)),
                "placed": None if placed is None else placed.get(name, 0),
                "failures": mine.get("consecutive_failures", 0),
                "max_concurrency": mine.get("max_concurrency", 0),
            }
        )
    return rows


def _samples() -> Iterator[Sample]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    for metric in registry.collect():
        yield from metric.samples
