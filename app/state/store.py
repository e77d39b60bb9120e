"""The state every worker and host shares: what a store does, and what it is asked.

Two engines implement it: SQLite in a state directory (the embedded default: every worker on
the host shares one file, in WAL mode) and Redis (several hosts behind one load balancer). Each
operation is one round trip and atomic: admission checks every limit of a key and takes what
the request needs, or nothing; settlement gives back what was reserved and too much, takes what
was too little, and releases the request's slot. Usage records are added up in each worker and
written a second at a time (app/state/buffer.py).

The limits are kept as GCRA buckets (the generic cell rate algorithm: a token bucket kept as one
number, the theoretical arrival time ``tat`` of the next unit if the key used its rate exactly).
A request of ``cost`` units at ``now`` fits when ``max(tat, now) + cost * per - now`` is within
the bucket's capacity (``capacity * per`` seconds); taking it moves ``tat`` on by ``cost * per``.
A rested key may spend its whole capacity at once, then ``1 / per`` units a second.

The engines share this module's arithmetic where they can (SQLite runs it in the transaction;
Redis runs the same steps in Lua), and one test suite runs against both.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
from abc import abstractmethod
from dataclasses import dataclass, field

from app.config import StateSettings
from app.state.batch_queue import BatchQueue

EPSILON = 1e-9


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer in time."""


@dataclass(frozen=True)
class Bucket:
    """A GCRA bucket of one key: ``per`` seconds per unit, ``capacity`` units at most."""

    name: str  # "requests", "input_tokens" or "output_tokens"
    per: float
    capacity: float


@dataclass(frozen=True)
class Budget:
    """A key's token allowance for one calendar period (UTC): ``period`` names it."""

    name: str  # "tokens_per_day" or "tokens_per_month"
    period: str  # "2026-12-01" or "2026-12"
    limit: int
    ends_in: float  # seconds until the period ends (its count is kept a day longer)

    @property
    def keep(self) -> float:
        return self.ends_in + 86400.0


@dataclass
class Ask:
    """What a request needs of its key's limits."""

    key: str
    takes: list[tuple[Bucket, float]] = field(default_factory=list)
    spends: list[tuple[Budget, int]] = field(default_factory=list)
    max_concurrent: int = 0
    lease_ttl: float = StateSettings.lease_seconds


@dataclass
class Standing:
    """A bucket's or budget's state as the key sees it after the admission."""

    limit: float
    remaining: float
    reset: float  # seconds until it is whole again (for a budget: until the period ends)


@dataclass
class Verdict:
    admitted: bool
    lease: str | None = None
    refused: str | None = None  # the limit that refused: a bucket's or budget's name, "concurrent"
    retry_after: float | None = None  # None: waiting will never help (the cost exceeds the limit)
    standing: dict[str, Standing] = field(default_factory=dict)


@dataclass
class Usage:
    """Use to add to a key × model × day record: one request's, or a worker's few seconds'."""

    day: str
    key: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    errors: int = 0
    requests: int = 1
    # The part of it that batch items made (app/batches), so a report tells the two apart.
    batch_requests: int = 0
    batch_input_tokens: int = 0
    batch_output_tokens: int = 0


# What a usage record adds up, in its columns' order.
USAGE_COUNTS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "errors",
    "batch_requests",
    "batch_input_tokens",
    "batch_output_tokens",
)


@dataclass
class Settlement:
    """The end of a request: its slot back, its reservations corrected."""

    key: str
    lease: str | None
    # Units given back to a bucket (+) or taken more (-); tokens more (+) or fewer (-) spent.
    corrections: list[tuple[Bucket, float]] = field(default_factory=list)
    budget_corrections: list[tuple[Budget, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.lease is None and not self.corrections and not self.budget_corrections


@dataclass
class UsageRow:
    day: str
    key: str
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    errors: int
    batch_requests: int = 0
    batch_input_tokens: int = 0
    batch_output_tokens: int = 0


# Why a placement chose its backend (the access line's ``routed``).
ROUTED_PREFIX = "prefix"  # the replica that served the conversation's longest known prefix
ROUTED_SESSION = "session"  # the replica of the client's session, no prefix known
ROUTED_NEW = "new"  # nothing known: the least loaded replica
ROUTED_SPILLED = "spilled"  # the known replica was over its load bound: the least loaded
ROUTED_FAILOVER = "failover"  # the known replica is held back, or failed: another one


@dataclass
class Placement:
    """What placing a request on one of a route's backends asks of the store, in one round
    trip: every candidate's requests in flight (the whole service's, from live leases), the
    backend remembered for the conversation (``lookups``, the longest prefix first, then
    ``session``), a choice within the load bound, a lease on it, and the conversation
    remembered there (``remember``) for ``memory_ttl`` seconds.

    ``candidates`` are in tie-break order: among equally loaded backends the first wins."""

    candidates: list[str]
    lease_ttl: float = 900.0
    lookups: list[str] = field(default_factory=list)
    session: str | None = None
    remember: list[str] = field(default_factory=list)
    memory_ttl: float = 1800.0
    max_entries: int = 100_000
    hit_factor: float = 1.5
    new_factor: float = 1.25


@dataclass
class Placed:
    backend: str
    lease: str
    routed: str  # one of the ROUTED_ values
    loads: dict[str, int]  # requests in flight per candidate before this one


def choose(
    placement: Placement, loads: dict[str, int], known: str | None, by_session: bool
) -> tuple[str, str]:
    """The backend and why, given the candidates' loads and the backend remembered for the
    conversation (``known``, found by its prefix or, ``by_session``, by the client's session).

    Consistent hashing with bounded loads: a remembered backend keeps the conversation while its
    load, with this request, stays within ``factor`` times the candidates' average (rounded
    up, so an idle route always admits); a prefix hit saves a whole prefill, so it may go
    further over the average than a session hint. Otherwise the least loaded candidate. The
    Redis engine runs the same steps in Lua (app/state/redis_store.py PLACE)."""
    candidates = placement.candidates
    least = min(candidates, key=lambda name: loads[name])  # the first of the least loaded
    if known is None:
        return least, ROUTED_NEW
    if known not in loads:
        return least, ROUTED_FAILOVER
    factor = placement.new_factor if by_session else placement.hit_factor
    total = sum(loads.values())
    bound = math.ceil(factor * (total + 1) / len(candidates) - EPSILON)
    if loads[known] + 1 <= bound:
        return known, ROUTED_SESSION if by_session else ROUTED_PREFIX
    return least, ROUTED_SPILLED


# What continuing a stored thread can find (the SDK reacts to these error codes).
THREAD_FOUND = "found"
THREAD_NOT_FOUND = "thread_not_found"
THREAD_ALREADY_CONTINUED = "thread_already_continued"
THREAD_IN_FLIGHT = "thread_continue_in_flight"


class Store(BatchQueue):
    """One engine. Every method is one round trip; each raises ``StoreUnavailable`` when the
    store cannot answer. (Its batch methods are app.state.batch_queue's.)"""

    @abstractmethod
    def admit(self, ask: Ask) -> Verdict: ...

    @abstractmethod
    def settle(self, settlement: Settlement) -> None: ...

    @abstractmethod
    def add_usage(self, records: list[Usage]) -> None:
        """Add to the key × model × day records, in one round trip."""

    @abstractmethod
    def usage(self, since: str, until: str, key: str | None, model: str | None) -> list[UsageRow]:
        """Usage records for the days ``since`` to ``until`` (ISO dates, both included)."""

    @abstractmethod
    def in_flight(self, keys: list[str]) -> dict[str, int]:
        """The requests each key has in flight (live leases), for the admin view."""

    @abstractmethod
    def place(self, placement: Placement) -> Placed:
        """Choose one of ``placement.candidates`` and take a lease on it (see Placement)."""

    @abstractmethod
    def moved(
        self, lease: str, old: str, new: str, lease_ttl: float, remember: list[str], ttl: float
    ) -> None:
        """The request placed on ``old`` went to ``new`` (failover): its lease moves, and the
        conversation is remembered on ``new``."""

    @abstractmethod
    def unplace(self, backend: str, lease: str) -> None:
        """The request is over: its lease on ``backend`` is given back."""

    @abstractmethod
    def backend_loads(self, backends: list[str]) -> dict[str, int]:
        """Each backend's requests in flight, the whole service's, for the admin view."""

    @abstractmethod
    def put_thread(self, thread_id: str, owner: str, body: bytes, ttl: float) -> None:
        """Keep a conversation under the id of its last reply."""

    @abstractmethod
    def claim_thread(self, thread_id: str, owner: str, hold: float) -> tuple[str, bytes | None]:
        """Take a stored conversation to continue it: ``THREAD_FOUND`` and its body, or why
        not. A claim keeps other continues of it out for ``hold`` seconds, or until
        ``finish_thread`` or ``release_thread``."""

    @abstractmethod
    def finish_thread(
        self, previous_id: str, thread_id: str, owner: str, body: bytes, ttl: float
    ) -> None:
        """The continue succeeded: keep the longer conversation, and mark the one it continued
        as continued (a second continue of it is refused)."""

    @abstractmethod
    def release_thread(self, thread_id: str) -> None:
        """The continue failed: its conversation may be continued again."""

    @abstractmethod
    def ping(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


def take(tat: float, now: float, bucket: Bucket, cost: float) -> tuple[float | None, float]:
    """GCRA: the bucket's new ``tat`` if ``cost`` fits (else None), and the seconds to wait
    until it would fit (infinite if it never can)."""
    if cost > bucket.capacity + EPSILON:
        return None, float("inf")
    new = max(tat, now) + cost * bucket.per
    over = new - now - bucket.capacity * bucket.per
    if over > EPSILON:
        return None, over
    return new, 0.0


def standing(tat: float, now: float, bucket: Bucket) -> Standing:
    backlog = max(tat - now, 0.0)
    remaining = max(bucket.capacity - backlog / bucket.per, 0.0)
    return Standing(bucket.capacity, remaining, backlog)


def budget_standing(budget: Budget, used: int) -> Standing:
    return Standing(budget.limit, max(budget.limit - used, 0), budget.ends_in)


class _LeaseIds:
    """A random prefix per process (made again in a forked worker), then a counter: unique
    across workers, hosts and restarts without a system call per request."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = secrets.token_hex(6)
        self.numbers = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.numbers):x}"


lease_id = _LeaseIds().next
