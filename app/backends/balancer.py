"""Per-worker backend health: in-flight slots, a circuit breaker, and the order in which a
route's targets are tried.

Health means "can serve", not "said yes": only failures that say a backend cannot serve (no
connection, a broken connection, no answer in time, a server error that is not about the
request) count against it; a 429, a 503, a 4xx or a 5xx that names the request as the cause
never do (the dispatcher decides which is which, and counts one client request at most once).

A breaker opens after ``breaker_failures`` consecutive failures and keeps the backend at the
back of every route's order for ``breaker_cooldown`` seconds; then one request is let through
as a probe, which closes the breaker on success and reopens it on failure. A breaker only ever
reorders: a route whose every target is held back still tries them, so the last backend that
could serve is never taken out, and a success from it closes its breaker.

Every admitted request holds a ``Slot``, whose ``release`` acts exactly once, however often
and from wherever it is called (the dispatcher on a failed attempt, the view when the answer
is over, the stream's end), so neither the in-flight count nor a probe can be left behind.

State is per process (each gunicorn worker learns on its own), which keeps the hot path free
of shared storage. The service-wide count of requests in flight, which ``least_busy`` and
``affinity`` order by, is the state store's (app/backends/placement.py); the per-process count
here is what ``least_busy`` falls back on while the store cannot answer, and what a backend's
``max_concurrency`` caps.
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


class Slot:
    """An admitted request's hold on a backend, given back by ``release`` exactly once."""

    __slots__ = ("balancer", "backend", "probe", "held", "counted")

    def __init__(self, balancer: Balancer, backend: str, probe: bool, counted: bool = True) -> None:
        self.balancer = balancer
        self.backend = backend
        self.probe = probe
        self.held = True
        self.counted = counted  # in the worker's in-flight count (not a batch item's)

    def release(self, ok: bool | None) -> None:
        """``ok``: True served, False could not serve, None says nothing about the backend
        (a client error, a refusal, the client leaving)."""
        if self.held:
            self.held = False
            self.balancer.settle(self, ok)


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
        # Told when a request starts or ends here (the batch runner publishes the loads).
        self.on_load: Callable[[], None] | None = None
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
        """Every target of the route, in the order to try them: those whose breaker lets
        them in first, in the route's strategy order, then the held-back ones, the longest
        held back first."""
        return self.split(route)[0]

    def split(self, route: Route) -> tuple[list[Target], int]:
        """``plan``'s order, and how many of its first targets their breakers let in."""
        ready = [t for t in route.targets if self._admits(t.backend)]
        held = [t for t in route.targets if not self._admits(t.backend)]
        if route.strategy == "least_busy":
            ready.sort(key=lambda t: self.health[t.backend].in_flight)
        elif route.strategy == "weighted":
            ready = self._weighted_order(ready)
        held.sort(key=lambda t: self.health[t.backend].opened_at or 0.0)
        return ready + held, len(ready)

    def _admits(self, backend: str) -> bool:
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

    def acquire(self, backend: str, batch: bool = False) -> Slot | None:
        """A slot on ``backend``; None when it is at its concurrency cap (load is shed to
        the route's next target). A half-open backend's first request is its probe.

        A batch item's slot neither meets the cap nor counts towards it: the item has a slot
        of the whole service's already (app/batches/runner.py), and must not take the room
        the worker's cap keeps for interactive requests."""
        health = self.health[backend]
        limit = self.limits[backend]
        if limit and health.in_flight >= limit and not batch:
            return None
        probe = self.state(backend) == "half_open" and not health.probing
        if probe:
            health.probing = True
        if not batch:
            health.in_flight += 1
            if self.on_load is not None:
                self.on_load()
        return Slot(self, backend, probe, counted=not batch)

    def settle(self, slot: Slot, ok: bool | None) -> None:
        """Only ``Slot.release`` calls this, once per slot."""
        backend = slot.backend
        health = self.health[backend]
        if slot.counted:
            health.in_flight -= 1
            if self.on_load is not None:
                self.on_load()
        if slot.probe:
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
            if health.opened_at is not None or health.failures >= self.policy.breaker_failures:
                health.opened_at = self.clock()
                if self.on_breaker:
                    self.on_breaker(backend, True)

    def retry_delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        ceiling = min(self.policy.max_backoff, self.policy.backoff * (2**attempt))
        return ceiling * self.rng()

    def loads(self) -> dict[str, int]:
        """This worker's requests in flight per backend (batch items not among them)."""
        return {name: health.in_flight for name, health in self.health.items()}

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {
            name: {
                "breaker": self.state(name),
                "in_flight": h.in_flight,
                "probing": h.probing,
                "consecutive_failures": h.failures,
                "successes": h.successes,
                "errors": h.errors,
                "max_concurrency": self.limits[name],
            }
            for name, h in self.health.items()
        }
