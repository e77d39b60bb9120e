"""A batch's time limits, with a clock the test moves: ``python -m app.batches sweep --at``
run against the live service's state. A batch not done 24 hours after it was created ends
with its items ``expired``; 29 days after, its results are removed and it is archived; and a
batch is deleted only once it has ended, its files with it.

The backend refuses every request whose prompt starts with ``doomed-`` with a 503, so such a
batch's items are tried, given back and tried again for as long as the test likes; the rest
are answered at once.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import pytest
import requests
from batching import Deployment, batch_requests, sdk, wait_ended
from fakebackend import FakeBackend, JSONReply, Recorded, Reply, completion, error_body, last_text
from servers import Gunicorn
from waiting import eventually

DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)


class DoomedOr(Reply):
    """503 to ``doomed-`` prompts, a short answer to the rest."""

    def send(self, handler: Any, request: Recorded) -> None:
        if last_text(request).startswith("doomed-"):
            body = error_body("the model is overloaded", error_type="server_error")
            JSONReply(body, status=503).send(handler, request)
        else:
            JSONReply(completion("ok")).send(handler, request)


@dataclass
class Service:
    deployment: Deployment
    backend: FakeBackend
    server: Gunicorn


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with FakeBackend() as backend:
        backend.default = DoomedOr()
        deployment = Deployment.write(
            tmp_path_factory.mktemp("expiry"),
            backend.url,
            capacity=4,
            upstream={"max_concurrency": 4},
            share=1.0,
            lease_seconds=3,
            poll_interval=0.2,
            backoff=0.2,
            max_backoff=1.0,
            max_attempts=100_000,  # a doomed item is tried until its batch ends
        )
        server = deployment.start(workers=1, GATEWAY_RETRIES="0")
        try:
            yield Service(deployment, backend, server)
        finally:
            server.stop()


@pytest.fixture
def client(service: Service) -> Iterator[anthropic.Anthropic]:
    with sdk(service.server) as client:
        yield client


def sweep(service: Service, moment: datetime.datetime) -> str:
    done = service.deployment.cli("sweep", "--at", moment.isoformat())
    assert done.returncode == 0, done.stderr
    return done.stdout


def doomed_tries(backend: FakeBackend, batch: str) -> int:
    return sum(1 for r in list(backend.requests) if last_text(r).startswith(f"doomed-{batch}-"))


def raw_results(service: Service, batch_id: str) -> requests.Response:
    url = f"{service.server.url}/v1/messages/batches/{batch_id}/results"
    return requests.get(url, headers={"x-api-key": "k"}, timeout=30)


def test_a_batch_not_done_in_24_hours_ends_with_its_items_expired(service, client):
    batch = client.messages.batches.create(requests=batch_requests(5, "doomed-a-"))
    eventually(lambda: doomed_tries(service.backend, "a") >= 10, "every item tried, twice over")

    sweep(service, batch.created_at + 23 * HOUR)
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"

    swept_at = batch.created_at + 25 * HOUR
    sweep(service, swept_at)
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.ended_at == swept_at
    counts = ended.request_counts
    assert (counts.processing, counts.succeeded, counts.errored) == (0, 0, 0)
    assert (counts.canceled, counts.expired) == (0, 5)
    lines = list(client.messages.batches.results(batch.id))
    assert sorted(line.custom_id for line in lines) == [f"item-{i}" for i in range(5)]
    assert {line.result.type for line in lines} == {"expired"}
    # Once ended, its items are not tried again: a batch created after it runs to its end
    # meanwhile, and only the items in flight when it ended (4 at most) reached the backend.
    tries = doomed_tries(service.backend, "a")
    later = client.messages.batches.create(requests=batch_requests(3, "fine-after-"))
    wait_ended(client, later.id, timeout=120)
    assert doomed_tries(service.backend, "a") <= tries + 4


def test_a_batch_is_archived_29_days_after_it_was_created(service, client):
    batch = client.messages.batches.create(requests=batch_requests(3, "fine-"))
    ended = wait_ended(client, batch.id, timeout=120)
    assert ended.request_counts.succeeded == 3
    files = service.deployment.batch_dir / batch.id
    assert (files / "requests.jsonl").exists()

    sweep(service, batch.created_at + 28 * DAY)
    kept = client.messages.batches.retrieve(batch.id)
    assert kept.archived_at is None and kept.results_url is not None
    assert len(list(client.messages.batches.results(batch.id))) == 3

    swept_at = batch.created_at + 30 * DAY
    assert batch.id in sweep(service, swept_at)
    archived = client.messages.batches.retrieve(batch.id)
    assert archived.archived_at == swept_at
    assert archived.results_url is None
    assert archived.processing_status == "ended"
    assert archived.request_counts.succeeded == 3  # the record is kept, its counts with it
    answer = raw_results(service, batch.id)
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "not_found_error"
    assert not files.exists()


def test_only_an_ended_batch_is_deleted_and_its_files_with_it(service, client):
    batch = client.messages.batches.create(requests=batch_requests(3, "doomed-d-"))
    eventually(lambda: doomed_tries(service.backend, "d") >= 3, "every item tried")
    files = service.deployment.batch_dir / batch.id

    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.batches.delete(batch.id)
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    assert files.exists()

    client.messages.batches.cancel(batch.id)
    ended = wait_ended(client, batch.id, timeout=60)
    assert ended.request_counts.canceled == 3
    assert client.messages.batches.delete(batch.id).type == "message_batch_deleted"

    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    assert raw_results(service, batch.id).status_code == 404
    assert not files.exists()
    listed = service.deployment.cli("list", "--limit", "1000")
    assert batch.id not in listed.stdout
