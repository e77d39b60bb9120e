"""Batch items take only a backend's idle room, and interactive requests never wait for them.

The backend holds every request until the test lets it go (no sleep stands for "long enough"),
and notes when each arrived and when it ended. Whatever the machine's speed, the timeline it
noted must show:

- no batch item arrived while the backend already had ``capacity`` requests, interactive and
  batch, in flight;
- never more batch items in flight at once than ``floor(share * capacity)``;
- interactive requests arriving while the batch's share was in use, and the waiting batch
  items letting freed room go to interactive requests already there.

Interactive requests are sent only while no batch item can be on its way (before the batch
exists, or while its share is full), so that the backend's order of arrival is the order in
which the gateway admitted them.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from batching import MODEL, Deployment, batch_in_flight, batch_requests, sdk, wait_ended
from fakebackend import FakeBackend, JSONReply, Recorded, Reply, completion, last_text
from servers import Gunicorn
from waiting import eventually

CAPACITY = 4
SHARE = 0.5
BATCH_MOST = math.floor(SHARE * CAPACITY)  # 2
ITEMS = 30
KINDS = ("batch", "chat")


@dataclass
class Visit:
    kind: str
    text: str
    arrived: float
    ended: float | None = None


class Staged(Reply):
    """Holds each request until the test releases one of its kind (or opens the kind for
    good); batch items are those whose prompt starts with ``batch-``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.visits: list[Visit] = []
        self.gates = {kind: threading.Semaphore(0) for kind in KINDS}
        self.opened = {kind: threading.Event() for kind in KINDS}

    def send(self, handler: Any, request: Recorded) -> None:
        text = last_text(request)
        kind = "batch" if text.startswith("batch-") else "chat"
        visit = Visit(kind, text, time.monotonic())
        with self.lock:
            self.visits.append(visit)
        while not self.opened[kind].is_set() and not handler.backend.stopping:
            if self.gates[kind].acquire(timeout=0.05):
                break
        visit.ended = time.monotonic()  # before the answer: the gateway may be quicker
        JSONReply(completion("ok")).send(handler, request)

    def held(self, kind: str) -> int:
        with self.lock:
            return sum(1 for v in self.visits if v.kind == kind and v.ended is None)

    def seen(self, kind: str) -> int:
        with self.lock:
            return sum(1 for v in self.visits if v.kind == kind)

    def release(self, kind: str, count: int = 1) -> None:
        self.gates[kind].release(count)

    def open(self, kind: str) -> None:
        self.opened[kind].set()


@dataclass
class Service:
    deployment: Deployment
    staged: Staged
    server: Gunicorn
    pool: ThreadPoolExecutor


@pytest.fixture
def start(tmp_path) -> Iterator[Callable[..., Service]]:
    """A gunicorn (two workers) in front of a staged backend, ``[batches]`` as given."""
    with ExitStack() as stack:

        def started(
            workers: int = 2, upstream: dict[str, Any] | None = None, **batches: Any
        ) -> Service:
            staged = Staged()
            backend = stack.enter_context(FakeBackend())
            pool = stack.enter_context(ThreadPoolExecutor(16))
            backend.default = staged
            deployment = Deployment.write(
                tmp_path, backend.url, capacity=CAPACITY, upstream=upstream, **batches
            )
            server = deployment.start(workers=workers)
            stack.callback(server.stop)
            stack.callback(lambda: [staged.open(kind) for kind in KINDS])
            return Service(deployment, staged, server, pool)

        yield started


@pytest.fixture
def service(start: Callable[..., Service]) -> Service:
    return start(share=SHARE, poll_interval=0.1)


def ask(service: Service, number: int) -> Future[int]:
    body = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": f"chat-{number}"}],
    }
    url = f"{service.server.url}/v1/messages"
    return service.pool.submit(lambda: requests.post(url, json=body, timeout=120).status_code)


def progress(service: Service, batch_id: str) -> dict[str, int]:
    shown = service.deployment.cli("show", batch_id)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)["progress"]


def let_runners_look(service: Service, batch_id: str, looks: int = 3) -> dict[str, int]:
    """Time for the runners to look for room several times over (they look every 0.1 s; each
    of these reads of the store takes longer than that): what a fast runner would have done by
    now, it has done."""
    for _ in range(looks):
        found = progress(service, batch_id)
    return found


def test_batch_items_take_only_idle_room_and_never_more_than_their_share(service):
    staged = service.staged
    answers = [ask(service, n) for n in range(CAPACITY)]
    eventually(lambda: staged.held("chat") == CAPACITY, "the backend full of interactive requests")

    with sdk(service.server) as client:
        batch = client.messages.batches.create(requests=batch_requests(ITEMS))
        eventually(lambda: progress(service, batch.id)["running"] >= 1, "an item claimed")
        let_runners_look(service, batch.id)
        assert staged.seen("batch") == 0  # the backend is full: the batch waits

        staged.release("chat")  # one free place: one batch item takes it, no more
        eventually(lambda: staged.held("batch") == 1, "a batch item in the free place")
        let_runners_look(service, batch.id)
        assert staged.seen("batch") == 1

        staged.release("chat")  # a second one: the second and last of the batch's share
        eventually(lambda: staged.held("batch") == BATCH_MOST, "the batch's share in use")
        staged.release("chat", CAPACITY - 2)  # the backend is half empty, the share is full
        eventually(lambda: staged.held("chat") == 0, "the interactive requests answered")
        let_runners_look(service, batch.id)
        assert staged.seen("batch") == BATCH_MOST

        # Interactive requests are sent on at once, over the capacity: the gateway never
        # holds them back for the batch.
        answers += [ask(service, n) for n in range(CAPACITY, 2 * CAPACITY)]
        eventually(lambda: staged.held("chat") == CAPACITY, "new interactive requests sent")
        assert staged.held("batch") == BATCH_MOST

        # The batch's items end; the backend is still full with interactive requests: the
        # waiting items leave the room to them.
        staged.release("batch", BATCH_MOST)
        eventually(lambda: progress(service, batch.id)["succeeded"] == BATCH_MOST, "2 done")
        let_runners_look(service, batch.id)
        assert staged.seen("batch") == BATCH_MOST

        staged.release("chat")  # room again: the next item goes
        eventually(lambda: staged.held("batch") == 1, "the next batch item")
        staged.open("chat")
        staged.open("batch")
        ended = wait_ended(client, batch.id, timeout=180)
    assert ended.request_counts.succeeded == ITEMS
    assert [answer.result(timeout=120) for answer in answers] == [200] * (2 * CAPACITY)

    visits = list(staged.visits)
    assert sorted(v.text for v in visits if v.kind == "batch") == sorted(
        f"batch-{i}" for i in range(ITEMS)
    )
    for visit in visits:
        if visit.kind != "batch":
            continue
        busy = in_flight(visits, visit)
        assert busy["batch"] + busy["chat"] < CAPACITY, (visit.text, busy)
        assert busy["batch"] < BATCH_MOST, (visit.text, busy)


def in_flight(visits: list[Visit], arriving: Visit) -> dict[str, int]:
    """What the backend had in flight, by kind, when ``arriving`` arrived."""
    moment = arriving.arrived
    busy = dict.fromkeys(KINDS, 0)
    for other in visits:
        if other is arriving or other.arrived >= moment:
            continue
        if other.ended is None or other.ended > moment:
            busy[other.kind] += 1
    return busy


def test_a_batch_item_that_outlasts_the_lease_keeps_its_place(start):
    """A slot's lease is only for a worker that dies: an item answered after several leases
    still holds its place, and the batch takes no more than its share meanwhile."""
    service = start(share=SHARE, poll_interval=0.1, lease_seconds=1)
    staged = service.staged
    with sdk(service.server) as client:
        batch = client.messages.batches.create(requests=batch_requests(10))
        eventually(lambda: staged.held("batch") == BATCH_MOST, "the batch's share in use")
        time.sleep(3)  # three leases: a slot not renewed would have run out by now
        let_runners_look(service, batch.id)
        assert staged.seen("batch") == BATCH_MOST
        assert batch_in_flight(service.server) == {"default": BATCH_MOST}
        staged.open("batch")
        assert wait_ended(client, batch.id, timeout=120).request_counts.succeeded == 10


def test_batch_items_leave_a_workers_own_cap_to_interactive_requests(start):
    """``max_concurrency`` caps a worker's requests to a backend; the batch's items, admitted
    on the service's idle room, must not use up that cap and get an interactive request
    refused as busy while the backend has room for it."""
    service = start(workers=1, upstream={"max_concurrency": BATCH_MOST}, share=SHARE)
    staged = service.staged
    with sdk(service.server) as client:
        batch = client.messages.batches.create(requests=batch_requests(4))
        eventually(lambda: staged.held("batch") == BATCH_MOST, "the batch's share in use")
        answer = ask(service, 0)
        eventually(lambda: staged.held("chat") == 1 or answer.done(), "the request answered")
        staged.open("chat")
        assert answer.result(timeout=120) == 200
        staged.open("batch")
        assert wait_ended(client, batch.id, timeout=120).request_counts.succeeded == 4
