"""Each worker's batch runner: it claims items, waits for a backend with room, runs them, and
keeps their results.

One loop per worker claims one item at a time. Each worker also publishes its interactive
requests in flight per backend to the store (``publish_loads``): as they change, off the
requests' own path (at most fifty writes a second, a burst being one), and once a second
regardless. Batch slots are judged by the sum of every live
worker's, so requests that were running before a batch began count too, and a request costs
the store nothing for it.

An item goes to a backend only while the store gives it a slot there
(app/state/batch_queue.py ``batch_slot``): within ``[batches] share`` of the backend's
``capacity``, and only while the whole service's requests on it, interactive and batch, leave
room. Until then the runner holds the item (its lease renewed) and asks again
every ``poll_interval``; interactive requests never wait for it, since they are never queued
by the gateway and the slot is refused as soon as they fill the backend.

Execution is at least once, results exactly once (app/batches/files.py): a runner that dies
leaves claims whose leases run out, the items are claimed again, and an item that already has
its result file is finished with it instead of being run again. An item whose backend was busy
or failing is given back to be tried later, after a backoff that doubles, and the runner leaves
that backend alone meanwhile; after ``max_attempts`` it is ``errored`` with the last error.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.threadpool import ThreadPool

from app import ids, jsonc
from app.backends.dispatch import Dispatcher
from app.backends.routing import resolve
from app.batches.execute import Ran, WSGIApp, run_item
from app.batches.files import BatchFiles
from app.batches.item import BatchItem
from app.batches.shapes import errored_line, succeeded_line
from app.config import Settings, Upstream
from app.errors import GatewayError, InvalidRequest, Overloaded
from app.ops import metrics
from app.state.batch_queue import ERRORED, SUCCEEDED, BatchRecord, Claim
from app.state.guard import GuardedStore

log = logging.getLogger("gateway")

SWEEP_EVERY = 10.0  # seconds between a worker's sweeps (expiry, archiving)
# A worker's interactive load per backend, published for every worker's batch slots: written
# when it changes (at most one write per gap), at least this often, and valid for this long.
PUBLISH_GAP = 0.02
PUBLISH_AGAIN = 1.0
PUBLISH_TTL = 3.0
MAX_ITEMS = 256  # items one worker runs at once, whatever the slots allow
WRITERS = 4  # threads writing one worker's result files


class Runner:
    def __init__(
        self,
        app: WSGIApp,
        settings: Settings,
        store: GuardedStore,
        files: BatchFiles,
        dispatcher: Dispatcher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.settings = settings
        self.batches = settings.batches
        self.store = store
        self.files = files
        self.dispatcher = dispatcher
        self.clock = clock
        self.token = secrets.token_hex(8)  # made in the worker, after the fork
        self.held: dict[Claim, None] = {}  # claims this worker holds: waiting or running
        self.slots: dict[str, str] = {}  # slot -> backend, of this worker's items running
        self.owners: dict[str, str] = {}  # batch id -> the key it runs as
        self.cooling: dict[str, float] = {}  # backend -> when this worker may use it again
        self.pool = Pool(MAX_ITEMS)
        self.freed = Event()  # set when an item of this worker gives its slot back
        self.swept_at = 0.0
        self.greenlets: list[gevent.Greenlet[Any, Any]] = []
        # Result files are written and synced in threads while the item's greenlet waits: an
        # ``fsync`` (milliseconds, more on a busy disk or NFS) on the event loop stopped the
        # whole worker, interactive streams included, for about a quarter of the time under
        # the batch bench (bench/README.md). A pool of their own, so that a slow disk never
        # holds up the hub's, which resolves the backends' host names. Made by ``start``, in
        # the worker's loop.
        self.writers: ThreadPool | None = None

    def start(self) -> None:
        self.writers = ThreadPool(WRITERS)
        self.greenlets = [
            gevent.spawn(self._loop),
            gevent.spawn(self._renew),
            gevent.spawn(self._publish),
        ]

    def stop(self) -> None:
        """The worker is leaving: its items stop and go back to the queue at once, rather
        than when their leases run out."""
        gevent.killall(self.greenlets)
        self.pool.kill()
        now = self.clock()
        for claim in list(self.held):
            self._give_back(claim, now, attempt=False)
        self.held.clear()

    # --- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                busy = self._step()
            except Overloaded as exc:  # the store did not answer
                log.warning("batch runner: %s", exc.message)
                busy = False
            except Exception:
                log.exception("batch runner failed a step")
                busy = False
            if not busy:
                gevent.sleep(self.batches.poll_interval)

    def _step(self) -> bool:
        """Take one item and start it; False when there was nothing to take."""
        now = self.clock()
        if now - self.swept_at >= SWEEP_EVERY:
            self.swept_at = now
            self._sweep(now)
        if self.pool.full():
            return False
        claims = self._call(lambda s: s.batch_claim(self.token, now, self.batches.lease_seconds, 1))
        if not claims:
            return False
        claim = claims[0]
        self.held[claim] = None
        try:
            self._start(claim)
        except BaseException:
            self._give_back(claim, self.clock(), attempt=False)
            raise
        return True

    def _start(self, claim: Claim) -> None:
        line = jsonc.loads(self.files.request(claim.batch_id, claim.index))
        custom_id, params = line["custom_id"], line["params"]
        if self._finish_from_file(claim):
            return
        owner = self._owner(claim.batch_id)
        if owner is None:
            self.held.pop(claim, None)
            return
        refusal = _refusal(params)
        if refusal is not None:
            envelope = refusal.payload(ids.request_id())
            self._finish(claim, ERRORED, errored_line(custom_id, envelope))
            return
        backend, slot = None, None
        backends = self._backends(params)
        if backends:
            placed = self._room(claim, backends)
            if placed is None:
                return  # the batch was canceled while the item waited: it was given back
            backend, slot = placed
            self.slots[slot] = backend
        item = BatchItem(owner, claim.batch_id, custom_id, backend)
        body = jsonc.dumps(params)
        self.pool.spawn(self._run, claim, item, body, slot)

    def _room(self, claim: Claim, backends: list[str]) -> tuple[str, str] | None:
        """A slot on one of ``backends``, waited for; None if the batch was canceled (or
        ended) meanwhile, and the item given back: a canceled batch's items that have not
        been sent are never sent."""
        polls = 0
        while True:
            now = self.clock()
            for name in backends:
                if self.cooling.get(name, 0.0) > now:
                    continue
                slot = self._slot(name)
                if slot is None:
                    continue
                if polls == 0 or self._still_running(claim.batch_id):
                    return name, slot
                self._call(lambda s, b=name, t=slot: s.batch_unslot(b, t))  # type: ignore[misc]
                self._give_back(claim, now, attempt=False)
                return None
            polls += 1
            if polls % 10 == 0 and not self._still_running(claim.batch_id):
                self._give_back(claim, now, attempt=False)
                return None
            # Another worker's item ending is seen at the next poll, this worker's at once.
            self.freed.clear()
            self.freed.wait(self.batches.poll_interval)

    def _slot(self, backend: str) -> str | None:
        capacity = backend_capacity(self.settings.backends[backend])
        share = max(1, math.floor(self.batches.share * capacity))
        lease = self.batches.lease_seconds
        return self._call(lambda s: s.batch_slot(backend, capacity, share, lease))

    # --- one item ----------------------------------------------------------------------------

    def _run(self, claim: Claim, item: BatchItem, body: bytes, slot: str | None) -> None:
        metrics.batch_items_running(+1)
        try:
            try:
                ran = run_item(self.app, item, body)
            finally:
                if slot is not None and item.backend is not None:
                    backend = item.backend
                    self.slots.pop(slot, None)
                    self._call(lambda s: s.batch_unslot(backend, slot))
                    self.freed.set()
            self._settle(claim, item, ran)
        except Exception:
            log.exception("batch item %s of %s failed", item.custom_id, item.batch_id)
            self._give_back(claim, self.clock(), attempt=True)
        finally:
            metrics.batch_items_running(-1)

    def _settle(self, claim: Claim, item: BatchItem, ran: Ran) -> None:
        if ran.status == 200:
            self._finish(claim, SUCCEEDED, succeeded_line(item.custom_id, ran.body))
            return
        if ran.again and claim.attempts + 1 < self.batches.max_attempts:
            now = self.clock()
            wait = min(self.batches.backoff * 2**claim.attempts, self.batches.max_backoff)
            wait = max(wait, ran.retry_after or 0.0)
            if item.backend is not None:
                self.cooling[item.backend] = now + min(wait, self.batches.backoff)
            metrics.batch_item_retried(item.backend or "-", ran.status)
            # A key's passing limit is no failure of the item's: the wait is not an attempt.
            self._give_back(claim, now + wait, attempt=not ran.limited)
            return
        self._finish(claim, ERRORED, errored_line(item.custom_id, ran.body))

    def _finish_from_file(self, claim: Claim) -> bool:
        """An item run before by a runner that died after keeping its result: finished with
        that result, not run again."""
        kept = self.files.result(claim.batch_id, claim.index)
        if kept is None:
            return False
        kind = jsonc.loads(kept)["result"]["type"]
        self._count(claim, kind)
        return True

    def _finish(self, claim: Claim, kind: str, line: bytes) -> None:
        assert self.writers is not None, "items run only once the runner has started"
        write = self.files.write_result
        if not self.writers.apply(write, (claim.batch_id, claim.index, line, self.token)):
            kept = self.files.result(claim.batch_id, claim.index)
            kind = jsonc.loads(kept)["result"]["type"] if kept else kind
        self._count(claim, kind)

    def _count(self, claim: Claim, kind: str) -> None:
        now = self.clock()
        record = self._call(lambda s: s.batch_finish(claim, kind, now))
        self.held.pop(claim, None)
        if record is not None:
            metrics.batch_item_done(kind)
            if record.ended_at is not None:
                self.owners.pop(record.id, None)

    def _give_back(self, claim: Claim, not_before: float, *, attempt: bool) -> None:
        self.held.pop(claim, None)
        now = self.clock()
        self._call(lambda s: s.batch_release(self.token, claim, not_before, now, attempt))

    # --- what the items need -------------------------------------------------------------------

    def _backends(self, params: dict[str, Any]) -> list[str]:
        """The backends the item's route may send it to, in the route's order; none when the
        request fails before reaching one (it then runs without a slot, to get its error)."""
        try:
            route = resolve(self.settings, params.get("model"))  # type: ignore[arg-type]
        except (GatewayError, TypeError, AttributeError):
            return []
        names: list[str] = []
        for target in route.targets:
            if target.backend not in names and target.backend in self.settings.backends:
                names.append(target.backend)
        return names

    def _owner(self, batch_id: str) -> str | None:
        owner = self.owners.get(batch_id)
        if owner is None:
            record = self._call(lambda s: s.batch_get(batch_id))
            if record is None:
                return None
            owner = self.owners[batch_id] = record.owner
        return owner

    def _still_running(self, batch_id: str) -> bool:
        record: BatchRecord | None = self._call(lambda s: s.batch_get(batch_id))
        return record is not None and record.status == "in_progress"

    def _sweep(self, now: float) -> None:
        for batch_id in self._call(lambda s: s.batch_sweep(now)):
            self.files.remove(batch_id)
            log.info("batch %s archived: its requests and results are removed", batch_id)
        census = self._call(lambda s: s.batch_census())
        oldest = census.oldest_open
        metrics.batches_seen(census.by_status, now - oldest if oldest is not None else 0.0)

    def _publish(self) -> None:
        """This worker's interactive requests in flight per backend, into the store: as soon
        as a request starts or ends (the balancer says so; a burst is one write, at most one
        every ``PUBLISH_GAP``), and every ``PUBLISH_AGAIN`` regardless, so that its entry
        outlives it by ``PUBLISH_TTL`` at most."""
        changed = Event()
        self.dispatcher.balancer.on_load = changed.set
        published: dict[str, int] | None = None
        at = 0.0
        while True:
            changed.wait(PUBLISH_AGAIN)
            changed.clear()
            loads = self.dispatcher.balancer.loads()
            now = time.monotonic()
            if (loads != published or now - at >= PUBLISH_AGAIN) and self._published(loads):
                published, at = loads, now
            gevent.sleep(PUBLISH_GAP)

    def _published(self, loads: dict[str, int]) -> bool:
        try:
            self._call(lambda s: s.publish_loads(self.token, loads, PUBLISH_TTL))
        except Overloaded as exc:
            log.warning("batch runner: loads not published: %s", exc.message)
            return False
        return True

    def _renew(self) -> None:
        """The leases of this worker's claims and of its items' slots on the backends: an
        item's answer may take longer than a lease, and a slot run out would let another item
        take its place, beyond the batch's share."""
        lease = self.batches.lease_seconds
        while True:
            gevent.sleep(lease / 3)
            claims = list(self.held)
            if claims:
                self._renew_now(claims, lease)
            if self.slots:
                self._reslot(lease)

    def _reslot(self, lease: float) -> None:
        by_backend: dict[str, list[str]] = {}
        for slot, backend in list(self.slots.items()):
            by_backend.setdefault(backend, []).append(slot)
        for backend, slots in by_backend.items():
            try:
                self._call(lambda s, b=backend, t=slots: s.batch_reslot(b, t, lease))  # type: ignore[misc]
            except Overloaded as exc:
                log.warning("batch runner: slots on %s not renewed: %s", backend, exc.message)

    def _renew_now(self, claims: list[Claim], lease: float) -> None:
        now = self.clock()
        try:
            self._call(lambda s: s.batch_renew(self.token, claims, now, lease))
        except Overloaded as exc:
            log.warning("batch runner: leases not renewed: %s", exc.message)

    def _call(self, work: Callable[[Any], Any]) -> Any:
        return self.store.run(work)


def _refusal(params: dict[str, Any]) -> GatewayError | None:
    """What Anthropic refuses in a batch's request that a direct request may have."""
    if params.get("stream") is True:
        return InvalidRequest("stream: a batch's requests cannot stream")
    return None


def backend_capacity(config: Upstream) -> int:
    return config.capacity or config.max_concurrency or 1
