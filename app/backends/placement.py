"""Placing a request on one of a route's backends with the whole service's load in view
(``least_busy``, ``affinity``), through the state store.

Each request takes a lease in the store on the backend it goes to and gives it back when its
answer is over, so every worker and host counts the same requests in flight; a worker that is
killed leaves leases that expire (``[state] lease_seconds``). Placing is one store round trip:
the loads, the conversation's remembered replica (app/backends/affinity.py), the choice within
the load bound, the lease and the memory of where the conversation went, all at once. Giving
the lease back is one more; a failover to another target (rare) one more again, which also
remembers the conversation where it landed, so it stays there.

While the store cannot answer, placing says nothing and the worker orders the targets by what it
knows itself: ``least_busy`` by its own requests in flight, ``affinity`` by rendezvous hashing
of the conversation, which every worker and host computes alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.backends.affinity import Conversation, conversation, rendezvous
from app.config import Route, Settings, Target
from app.state.guard import GuardedStore
from app.state.store import ROUTED_FAILOVER, Placement

PLACED = frozenset({"least_busy", "affinity"})


@dataclass
class Lease:
    """A request's place in the service-wide count, given back by ``release`` exactly once."""

    store: GuardedStore
    backend: str
    lease: str
    routed: str | None  # why this backend (affinity), or that it was a failover
    remember: list[str] = field(default_factory=list)
    held: bool = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.store.unplace(self.backend, self.lease)


class Placer:
    def __init__(self, settings: Settings, store: GuardedStore) -> None:
        self.settings = settings
        self.store = store

    def order(
        self,
        route: Route,
        planned: list[Target],
        ready: int,
        body: Mapping[str, Any],
        headers: Mapping[str, str],
    ) -> tuple[list[Target], Lease | None]:
        """``planned`` (the balancer's order, its first ``ready`` let in by their breakers)
        reordered: the chosen target first, then the other ready ones by load, then the held
        back ones; and the lease taken on the chosen one (None: the store did not answer)."""
        ready_targets, held = planned[:ready] or planned, planned[ready:] if ready else []
        by_backend: dict[str, Target] = {}
        for target in ready_targets:
            by_backend.setdefault(target.backend, target)
        names = list(by_backend)
        conv = conversation(route.name, body, headers) if route.strategy == "affinity" else None
        if conv is not None:
            names = rendezvous(conv.ring_key, names)
        rest = _rest(ready_targets, by_backend) + held
        placed = self.store.place(self._placement(names, conv))
        if placed is None:
            return [by_backend[name] for name in names] + rest, None
        others = sorted((n for n in names if n != placed.backend), key=lambda n: placed.loads[n])
        first = [by_backend[placed.backend]] + [by_backend[n] for n in others]
        remember = _remember(conv)
        routed = placed.routed if conv is not None else None
        lease = Lease(self.store, placed.backend, placed.lease, routed, remember)
        return first + rest, lease

    def _placement(self, names: list[str], conv: Conversation | None) -> Placement:
        routing = self.settings.routing
        placement = Placement(names, lease_ttl=self.settings.state.lease_seconds)
        if conv is not None:
            placement.lookups = conv.lookups
            placement.session = conv.session
            placement.remember = _remember(conv)
            placement.memory_ttl = routing.affinity_ttl
            placement.max_entries = routing.affinity_max_entries
            placement.hit_factor = routing.affinity_hit_factor
            placement.new_factor = routing.affinity_new_factor
        return placement

    def landed(self, lease: Lease, backend: str) -> None:
        """The request went to ``backend``: when that is not where it was placed, its lease
        and its conversation move there."""
        if backend == lease.backend or not lease.held:
            return
        old, lease.backend, lease.routed = lease.backend, backend, ROUTED_FAILOVER
        ttl = self.settings.routing.affinity_ttl
        lease_ttl = self.settings.state.lease_seconds
        self.store.moved(lease.lease, old, backend, lease_ttl, lease.remember, ttl)


def _remember(conv: Conversation | None) -> list[str]:
    if conv is None:
        return []
    return [conv.last] + ([conv.session] if conv.session else [])


def _rest(targets: list[Target], first: Mapping[str, Target]) -> list[Target]:
    """Targets naming a backend already listed (the same backend under another model)."""
    return [t for t in targets if first[t.backend] is not t]
