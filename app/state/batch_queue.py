"""Message batches in the state store: each batch's record and the queue of its items.

A batch's items are numbered 0 to ``total - 1`` in the order the client sent them; their
requests and results are files (app/batches/files.py), so the store holds only who does what:

- ``next``: items below it have been handed out at least once; those from it on wait their
  first turn, so a batch of 100,000 items is one row (one hash) when it is created, not
  100,000;
- a *claim* on each item handed out and not done: the runner's token and its lease's end
  (``until``), renewed while the item runs, or, for an item given back to be tried again
  later, no token and the time it may be tried (``until`` again);
- the items *done*: a set of numbers, and a count per result (``succeeded``, ``errored``).

An item is done once: ``finish`` adds it to the done set only if it is not there yet, in the
same step as its count. A runner that dies leaves a claim whose lease runs out; the next claim
takes the item again (execution is at least once), and the result file, written before
``finish`` and never overwritten, keeps a second run from making a second line.

The API shows Anthropic's counts: every item ``processing`` until the batch ends, then each in
its result; items never done by then are ``canceled`` (the batch was canceled) or
``expired`` (its 24 hours ran out). The live counts here are for the operator's views.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

IN_PROGRESS = "in_progress"
CANCELING = "canceling"
ENDED = "ended"

SUCCEEDED = "succeeded"
ERRORED = "errored"
CANCELED = "canceled"
EXPIRED = "expired"
DONE_KINDS = (SUCCEEDED, ERRORED)

WORKER_LOADS = "loads"  # what publish_loads keeps, per backend
BATCH_FLIGHTS = "batch:"  # + a backend's name: its batch items' flights, apart from the rest
EXPIRES_AFTER = 24 * 3600.0  # a batch not ended by then ends, its unfinished items expired
ARCHIVED_AFTER = 29 * 86400.0  # from creation: the results are removed, the record kept


@dataclass
class BatchRecord:
    id: str
    owner: str  # the name of the key that created it ("-" without keys)
    total: int
    created_at: float  # seconds since the epoch
    expires_at: float
    status: str = IN_PROGRESS
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    archived_at: float | None = None
    succeeded: int = 0  # items done so far, by result
    errored: int = 0
    canceled: int = 0  # set when the batch ends
    expired: int = 0
    running: int = 0  # items claimed and running now
    next: int = 0  # items from here on have never been handed out

    @property
    def done(self) -> int:
        return self.succeeded + self.errored

    @property
    def unfinished_kind(self) -> str:
        """What an item not done when the batch ended became."""
        return CANCELED if self.cancel_initiated_at is not None else EXPIRED


@dataclass(frozen=True)
class Claim:
    """One item handed to a runner: ``attempts`` it had before this one."""

    batch_id: str
    index: int
    attempts: int


@dataclass
class BatchCensus:
    """How many batches there are in each state (archived ones left out), and when the
    oldest one not ended was created (None: every batch has ended)."""

    by_status: dict[str, int]
    oldest_open: float | None


@dataclass
class BatchPage:
    records: list[BatchRecord]
    has_more: bool


def ended(record: BatchRecord, now: float) -> BatchRecord:
    """``record`` as it ends at ``now``: its unfinished items canceled or expired."""
    record.status = ENDED
    record.ended_at = now
    rest = record.total - record.done
    if record.cancel_initiated_at is not None:
        record.canceled, record.expired = rest, 0
    else:
        record.canceled, record.expired = 0, rest
    record.running = 0
    return record


class BatchQueue(ABC):
    """What a store engine keeps of batches. Every method is one round trip and atomic, and
    raises ``StoreUnavailable`` when the store cannot answer; ``now`` is the caller's clock
    (seconds since the epoch), so that a test can move it."""

    @abstractmethod
    def batch_create(self, record: BatchRecord) -> None:
        """Keep a new batch, every item waiting for its first turn."""

    @abstractmethod
    def batch_get(self, batch_id: str) -> BatchRecord | None: ...

    @abstractmethod
    def batch_list(
        self, owner: str | None, limit: int, before_id: str | None, after_id: str | None
    ) -> BatchPage:
        """Newest first (ids sort by creation). ``after_id``: the ``limit`` batches created
        just before it; ``before_id``: the ``limit`` created just after it. ``owner`` None:
        every key's."""

    @abstractmethod
    def batch_cancel(self, batch_id: str, now: float) -> BatchRecord | None:
        """An ``in_progress`` batch moves to ``canceling``: no item of it is handed out
        again, and it ends when its running items are done (at once if none is). Any other
        batch is left as it is. None: no such batch."""

    @abstractmethod
    def batch_delete(self, batch_id: str) -> bool:
        """Forget an ended batch (its files are the caller's to remove). False: it has not
        ended (or does not exist) and is left alone."""

    @abstractmethod
    def batch_claim(self, token: str, now: float, lease: float, limit: int) -> list[Claim]:
        """Up to ``limit`` items of ``in_progress`` batches, oldest batch first, leased to
        ``token`` until ``now + lease``: items due to be tried again, items whose runner's
        lease ran out, then items never handed out."""

    @abstractmethod
    def batch_renew(self, token: str, claims: list[Claim], now: float, lease: float) -> None:
        """The leases ``token`` still holds on ``claims`` run on until ``now + lease``."""

    @abstractmethod
    def batch_release(
        self,
        token: str,
        claim: Claim,
        not_before: float,
        now: float | None = None,
        attempt: bool = True,
    ) -> None:
        """Give an item back to be tried again from ``not_before`` (its backend was busy or
        failed: one ``attempt`` more; or it was never sent: not one); nothing if ``token`` no
        longer holds it. In a canceling batch it is not tried again, and the batch ends at
        ``now`` (None: the store's clock) if it was the last one running."""

    @abstractmethod
    def batch_finish(self, claim: Claim, kind: str, now: float) -> BatchRecord | None:
        """The item is done with a ``kind`` result (``succeeded`` or ``errored``), unless it
        was done already or its batch has ended; the batch ends when this was its last item
        (or its last running one, once canceling). The record after it, or None when the
        item was not counted."""

    @abstractmethod
    def batch_done(self, batch_id: str, start: int, stop: int) -> list[int]:
        """The items from ``start`` to ``stop - 1`` that are done, in order."""

    @abstractmethod
    def batch_census(self) -> BatchCensus:
        """For the metrics: batches by status, and the oldest one still running."""

    @abstractmethod
    def publish_loads(self, worker: str, loads: dict[str, int], ttl: float) -> None:
        """One worker's interactive requests in flight per backend, as of now, until it
        publishes again or ``ttl`` seconds pass (a worker that died stops counting then)."""

    @abstractmethod
    def batch_slot(self, backend: str, capacity: int, share: int, lease: float) -> str | None:
        """A slot for one batch item on ``backend``, leased for ``lease`` seconds, if it has
        room: fewer than ``share`` batch items in flight on it, and fewer than ``capacity``
        requests in all (the interactive ones as every live worker last published them); a
        batch item takes no room an interactive request is using or waiting for. None: no
        room now."""

    @abstractmethod
    def batch_reslot(self, backend: str, slots: list[str], lease: float) -> None:
        """The ``slots`` on ``backend`` that are still live run on until ``lease`` seconds
        from now (the store's clock, as ``batch_slot``'s): an item keeps its slot as long as
        its answer takes, and a lease runs out only for a worker that died. A slot given back,
        or run out, is not taken again: another item may have its place."""

    @abstractmethod
    def batch_unslot(self, backend: str, slot: str) -> None:
        """The batch item is over: its slot on ``backend`` is free."""

    @abstractmethod
    def batch_sweep(self, now: float) -> list[str]:
        """Time's work on every batch: a batch past ``expires_at`` ends; a canceling batch
        whose running items' runners are gone (leases out) ends; an ended batch
        ``ARCHIVED_AFTER`` its creation is archived. The ids archived now (the caller removes
        their files)."""
