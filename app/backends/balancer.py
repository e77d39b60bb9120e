"""Per-worker backend health: in-flight counts, a circuit breaker, and the order in which a
route's targets are tried.

A breaker opens after ``breaker_failures`` consecutive failures and keeps the backend out for
``breaker_cooldown`` seconds; then one request is let through as a probe, which closes the
breaker on success and reopens it on failure. State is per process (each gunicorn worker
learns on its own), which keeps the hot path free of shared storage.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.config import Route, Routing, Target


@dataclass
class Health:
    in_flight: int = 0
    failures: int = 0  # consecutive
    opened_at: float | None = None  # breaker open since (monotonic), None when closed
    probing: bool = False  # a half-open probe is in flight
    successes: int = 0
    errors: int = 0


class Balancer:
    def __init__(
        self,
        limits: dict[str, int],
        policy: Routing,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        on_breaker: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.on_breaker = on_breaker  # told when a breaker opens (True) or closes (False)
        self.limits = limits  # backend -> max concurrency (0: none)
        self.policy = policy
        self.clock = clock
        self.rng = rng
        self.health = {name: Health() for name in limits}

    def state(self, backend: str) -> str:
        health = self.health[backend]
        if health.opened_at is None:
            return "closed"
        if self.clock() - health.opened_at >= self.policy.breaker_cooldown:
            return "half_open"
        return "open"

    def plan(self, route: Route) -> list[Target]:
        """The route's targets in the order to try them, without those taken out."""
        targets = [t for t in route.targets if self._available(t.backend)]
        if route.strategy == "least_busy":
            targets.sort(key=lambda t: self.health[t.backend].in_flight)
        elif route.strategy == "weighted":
            targets = self._weighted_order(targets)
        return targets

    def _available(self, backend: str) -> bool:
        state = self.state(backend)
        return state == "closed" or (state == "half_open" and not self.health[backend].probing)

    def _weighted_order(self, targets: list[Target]) -> list[Target]:
        """Weighted random order without replacement; weight 0 means failover only."""
        ordered: list[Target] = []
        pool = [t for t in targets if t.weight > 0]
        while pool:
            point = self.rng() * sum(t.weight for t in pool)
            for target in pool:
                point -= target.weight
                if point < 0:
                    break
            ordered.append(target)
            pool.remove(target)
        return ordered + [t for t in targets if t.weight <= 0]

    def acquire(self, backend: str) -> bool:
        """Take an in-flight slot; False when the backend is at its concurrency cap."""
        health = self.health[backend]
        limit = self.limits[backend]
        if limit and health.in_flight >= limit:
            return False
        state = self.state(backend)
        if state == "open":
            return False
        if state == "half_open":
            if health.probing:
                return False
            health.probing = True
        health.in_flight += 1
        return True

    def release(self, backend: str, *, ok: bool | None) -> None:
        """Give the slot back; ``ok`` None means the outcome says nothing about the backend."""
        health = self.health[backend]
        health.in_flight -= 1
        health.probing = False
        if ok is True:
            was_open = health.opened_at is not None
            health.failures = 0
            health.opened_at = None
            health.successes += 1
            if was_open and self.on_breaker:
                self.on_breaker(backend, False)
        elif ok is False:
            health.errors += 1
            health.failures += 1
            half_open = health.opened_at is not None
            if half_open or health.failures >= self.policy.breaker_failures:
                health.opened_at = self.clock()
                if self.on_breaker:
                    self.on_breaker(backend, True)

    def retry_delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        ceiling = min(self.policy.max_backoff, self.policy.backoff * (2**attempt))
        return ceiling * self.rng()

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {
            name: {
                "breaker": self.state(name),
                "in_flight": h.in_flight,
                "consecutive_failures": h.failures,
                "successes": h.successes,
                "errors": h.errors,
                "max_concurrency": self.limits[name],
            }
            for name, h in self.health.items()
        }
