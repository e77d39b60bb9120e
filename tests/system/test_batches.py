"""The Message Batches API through one real gunicorn (two gevent workers) and the official
SDK: every call of ``client.messages.batches`` and its beta twin, the refusals at create,
errored items among good ones, keys that see only their own batches, cancel, a budget that
runs out mid-batch, and a gateway left idle afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import pytest
import requests
from batching import results
from fakebackend import FakeBackend, JSONReply, Recorded, completion, error_body
from metrics import metric_sum
from servers import ROOT, Gunicorn
from waiting import eventually

ADMIN = "admin-token-batches-0123"
ALICE, BOB, THRIFTY = "sk-alice-batches-0123", "sk-bob-batches-0123", "sk-thrifty-0123"
BODY_CAP = 64 * 1024


@dataclass
class GatedReply(JSONReply):
    """An answer once the test opens ``gate``: items stay in flight until it does."""

    gate: threading.Event = field(default_factory=threading.Event)

    def send(self, handler: Any, request: Recorded) -> None:
        self.gate.wait(60)
        super().send(handler, request)


def _key(name: str, key: str, extra: str = "") -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f'[[auth.keys]]\nname = "{name}"\nsha256 = "{digest}"\n{extra}\n'


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[FakeBackend, FakeBackend]]:
    main, held = FakeBackend().start(), FakeBackend().start()
    held.default = GatedReply(completion("late"))
    yield main, held
    assert isinstance(held.default, GatedReply)
    held.default.gate.set()
    main.stop()
    held.stop()


@pytest.fixture(scope="module")
def gateway(
    backends: tuple[FakeBackend, FakeBackend], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    main, held = backends
    directory = tmp_path_factory.mktemp("batches")
    path = directory / "gateway.toml"
    path.write_text(
        f'[[backends]]\nname = "main"\nurl = "{main.url}"\ncapacity = 8\nbatch_priority = 7\n'
        f'[[backends]]\nname = "held"\nurl = "{held.url}"\ncapacity = 1\n'
        '[[routes]]\nname = "held"\nmatch = "held-*"\ntargets = [{ backend = "held" }]\n'
        '[[routes]]\nname = "main"\nmatch = "*"\ntargets = [{ backend = "main" }]\n'
        f"[batches]\nmax_body_bytes = {BODY_CAP}\nshare = 1.0\npoll_interval = 0.2\n"
        "backoff = 0.3\n"
        f'[admin]\ntoken = "{ADMIN}"\n'
        + _key("alice", ALICE)
        + _key("bob", BOB)
        + _key("thrifty", THRIFTY, "tokens_per_day = 60")
    )
    server = Gunicorn(
        {"GATEWAY_CONFIG": str(path), "GATEWAY_WORKERS": "2"}, directory / "gunicorn.log"
    )
    yield server
    server.stop()


OPENED: list[anthropic.Anthropic] = []


@pytest.fixture(scope="module", autouse=True)
def _close_clients() -> Iterator[None]:
    """The SDK clients the tests made, closed with the module: one left to the garbage
    collector drops its pooled connections in whatever test runs then, as a ResourceWarning."""
    yield
    while OPENED:
        OPENED.pop().close()


def client(gateway: Gunicorn, key: str = ALICE) -> anthropic.Anthropic:
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)
    OPENED.append(sdk)
    return sdk


def item(custom_id: str, text: str = "hi", **params: Any) -> dict[str, Any]:
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "params": {**body, **params}}


def ended(sdk: anthropic.Anthropic, batch_id: str, timeout: float = 60) -> Any:
    return eventually(
        lambda: (b := sdk.messages.batches.retrieve(batch_id)).processing_status == "ended" and b,
        timeout=timeout,
        what=f"batch {batch_id} ended",
    )


def test_a_batch_runs_to_results_each_item_once_errored_items_among_good_ones(
    gateway: Gunicorn,
) -> None:
    sdk = client(gateway)
    requests_ = [item(f"good-{i}", f"question {i}") for i in range(6)]
    requests_ += [
        {"custom_id": "no-max-tokens", "params": {"model": "m", "messages": []}},
        item("streams", stream=True),
        {"custom_id": "not-a-message", "params": {"model": "m", "max_tokens": "many"}},
    ]
    created = sdk.messages.batches.create(requests=requests_)  # type: ignore[arg-type]
    assert created.id.startswith("msgbatch_")
    assert created.processing_status == "in_progress"
    assert created.results_url is None
    assert created.request_counts.processing == 9
    assert (created.expires_at - created.created_at).total_seconds() == 86400
    batch = ended(sdk, created.id)
    counts = batch.request_counts
    assert (counts.succeeded, counts.errored, counts.processing) == (6, 3, 0)
    assert counts.canceled == counts.expired == 0
    assert batch.ended_at is not None and batch.results_url.endswith(f"/{created.id}/results")
    found = {r.custom_id: r.result for r in results(sdk.messages.batches, created.id)}
    assert sorted(found) == sorted(r["custom_id"] for r in requests_)
    assert all(found[f"good-{i}"].type == "succeeded" for i in range(6))
    for custom_id in ("no-max-tokens", "streams", "not-a-message"):
        error = found[custom_id]
        assert error.type == "errored"
        assert error.error.error.type == "invalid_request_error"


def test_a_succeeded_result_is_what_the_same_request_gets_directly_but_for_its_id(
    gateway: Gunicorn,
) -> None:
    sdk = client(gateway)
    params = item("same", "the same question", stop_sequences=["never"])["params"]
    direct = requests.post(
        f"{gateway.url}/v1/messages", json=params, headers={"x-api-key": ALICE}, timeout=30
    )
    assert direct.status_code == 200
    batch = sdk.messages.batches.create(requests=[{"custom_id": "same", "params": params}])
    ended(sdk, batch.id)
    line = requests.get(
        f"{gateway.url}/v1/messages/batches/{batch.id}/results",
        headers={"x-api-key": ALICE},
        timeout=30,
    )
    assert line.status_code == 200 and line.text.endswith("\n") and line.text.count("\n") == 1
    message = line.json()["result"]["message"]
    expected = direct.json()
    assert message["id"] != expected["id"]
    assert {**message, "id": None} == {**expected, "id": None}


def test_the_list_pages_newest_first_both_ways_as_the_sdk_follows_it(gateway: Gunicorn) -> None:
    sdk = client(gateway, BOB)
    made = [sdk.messages.batches.create(requests=[item(f"b{i}")]).id for i in range(5)]
    newest_first = list(reversed(made))
    first = sdk.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == newest_first[:2]
    assert first.has_more and first.first_id == newest_first[0] and first.last_id == newest_first[1]
    walked = [b.id for b in sdk.messages.batches.list(limit=2)]  # the SDK pages on by after_id
    assert walked[:5] == newest_first
    back = sdk.messages.batches.list(limit=2, before_id=made[0])  # the two made just after it
    assert [b.id for b in back.data] == [made[2], made[1]]
    assert back.has_more
    upward = [b.id for b in sdk.messages.batches.list(limit=2, before_id=made[0])]
    assert upward == [made[2], made[1], made[4], made[3]]
    everything = sdk.messages.batches.list(limit=1000)
    assert not everything.has_more
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.batches.list(limit=1001)
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.batches.list(limit=0)


def test_the_beta_path_works_the_same(gateway: Gunicorn) -> None:
    beta = client(gateway).beta.messages.batches
    created = beta.create(requests=[item("beta-1")])  # type: ignore[list-item]
    assert created.processing_status == "in_progress"
    eventually(
        lambda: beta.retrieve(created.id).processing_status == "ended", what="beta batch ended"
    )
    assert [r.custom_id for r in results(beta, created.id)] == ["beta-1"]
    assert created.id in [b.id for b in beta.list(limit=50)]
    assert beta.delete(created.id).type == "message_batch_deleted"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"requests": []}, "at least one"),
        ({"requests": [item("same"), item("same")]}, "used by another"),
        ({"requests": [item("has space")]}, "custom_id"),
        ({"requests": [item("x" * 65)]}, "custom_id"),
        ({"requests": [{"custom_id": "a", "params": "text"}]}, "params"),
        ({"requests": [{"custom_id": "a", "params": {}, "extra": 1}]}, "extra"),
        ({"requests": "no"}, "at least one"),
        ([1, 2], "at least one"),
    ],
)
def test_create_refuses_a_malformed_envelope_whole(
    gateway: Gunicorn, body: Any, fragment: str
) -> None:
    before = client(gateway, BOB).messages.batches.list(limit=1000).data
    answer = requests.post(
        f"{gateway.url}/v1/messages/batches", json=body, headers={"x-api-key": BOB}, timeout=30
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert fragment.lower() in answer.json()["error"]["message"].lower()
    assert len(client(gateway, BOB).messages.batches.list(limit=1000).data) == len(before)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b'{"requests": [{"custom_id": "a", "params": {',
        b"\x1f\x8b\x08\x00 not json",
        b'{"requests": [{"custom_id": "a", "params": {"x": ' + b"[" * 3000 + b"]" * 3000 + b"}}]}",
        b'{"requests": [{"custom_id": "a", "params": {"n": 1180591620717411303424}}]}',
    ],
    ids=["empty", "cut-short", "binary", "deep", "huge-integer"],
)
def test_create_refuses_a_body_it_cannot_read_in_one_plain_sentence(
    gateway: Gunicorn, raw: bytes
) -> None:
    answer = requests.post(
        f"{gateway.url}/v1/messages/batches",
        data=raw,
        headers={"x-api-key": BOB, "content-type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "\n" not in error["message"] and "b'" not in error["message"]


def test_create_refuses_a_body_over_the_batch_cap_and_invalid_json(gateway: Gunicorn) -> None:
    big = {"requests": [item(f"i{i}", "x" * 1000) for i in range(100)]}
    answer = requests.post(
        f"{gateway.url}/v1/messages/batches", json=big, headers={"x-api-key": BOB}, timeout=30
    )
    assert answer.status_code == 413
    assert answer.json()["error"]["type"] == "request_too_large"
    broken = requests.post(
        f"{gateway.url}/v1/messages/batches",
        data=b'{"requests": [{"custom_id": "a", "params": {',
        headers={"x-api-key": BOB, "content-type": "application/json"},
        timeout=30,
    )
    assert broken.status_code == 400
    assert broken.json()["error"]["type"] == "invalid_request_error"


def test_a_batch_is_its_keys_alone_and_the_admin_token_sees_every_one(gateway: Gunicorn) -> None:
    alice, bob = client(gateway, ALICE), client(gateway, BOB)
    mine = alice.messages.batches.create(requests=[item("private")])
    with pytest.raises(anthropic.NotFoundError):
        bob.messages.batches.retrieve(mine.id)
    with pytest.raises(anthropic.NotFoundError):
        bob.messages.batches.cancel(mine.id)
    with pytest.raises(anthropic.NotFoundError):
        bob.messages.batches.delete(mine.id)
    assert mine.id not in [b.id for b in bob.messages.batches.list(limit=1000)]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    listed = requests.get(
        f"{gateway.url}/v1/messages/batches?limit=1000", headers=admin, timeout=30
    ).json()
    assert mine.id in [b["id"] for b in listed["data"]]
    seen = requests.get(f"{gateway.url}/v1/messages/batches/{mine.id}", headers=admin, timeout=30)
    assert seen.status_code == 200
    made = requests.post(
        f"{gateway.url}/v1/messages/batches",
        json={"requests": [item("admin")]},
        headers=admin,
        timeout=30,
    )
    assert made.status_code == 403 and made.json()["error"]["type"] == "permission_error"
    nobody = requests.get(f"{gateway.url}/v1/messages/batches", timeout=30)
    assert nobody.status_code == 401
    unknown = requests.get(
        f"{gateway.url}/v1/messages/batches/msgbatch_nothing", headers=admin, timeout=30
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"


def test_results_wait_for_the_end_and_delete_waits_for_cancel(
    gateway: Gunicorn, backends: tuple[FakeBackend, FakeBackend]
) -> None:
    _, held = backends
    sdk = client(gateway)
    batch = sdk.messages.batches.create(requests=[item(f"h{i}", model="held-x") for i in range(4)])
    eventually(lambda: len(held.requests) >= 1, what="the first item at the held backend")
    with pytest.raises(anthropic.AnthropicError, match="finished processing"):
        results(sdk.messages.batches, batch.id)
    early = requests.get(
        f"{gateway.url}/v1/messages/batches/{batch.id}/results",
        headers={"x-api-key": ALICE},
        timeout=30,
    )
    assert early.status_code == 400
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.batches.delete(batch.id)
    canceling = sdk.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    time.sleep(0.5)  # a canceling batch hands out no more items
    assert len(held.requests) == 1
    assert isinstance(held.default, GatedReply)
    held.default.gate.set()  # the running item finishes, and is kept
    done = ended(sdk, batch.id)
    counts = done.request_counts
    assert (counts.succeeded, counts.canceled, counts.processing) == (1, 3, 0)
    kinds = {r.custom_id: r.result.type for r in results(sdk.messages.batches, batch.id)}
    assert sorted(kinds.values()) == ["canceled", "canceled", "canceled", "succeeded"]
    assert sdk.messages.batches.delete(batch.id).id == batch.id
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.batches.retrieve(batch.id)


def test_a_key_whose_budget_runs_out_mid_batch_gets_the_rest_errored(gateway: Gunicorn) -> None:
    sdk = client(gateway, THRIFTY)  # 60 tokens a day; each item reserves about 25
    batch = sdk.messages.batches.create(requests=[item(f"t{i}") for i in range(6)])
    done = ended(sdk, batch.id)
    assert done.request_counts.succeeded >= 1 and done.request_counts.errored >= 1
    errors = [
        r.result for r in results(sdk.messages.batches, batch.id) if r.result.type == "errored"
    ]
    assert {e.error.error.type for e in errors} == {"rate_limit_error"}


def test_usage_tells_batch_items_from_interactive_requests(gateway: Gunicorn) -> None:
    sdk = client(gateway, BOB)
    direct = requests.post(
        f"{gateway.url}/v1/messages",
        json=item("x", model="usage-model")["params"],
        headers={"x-api-key": BOB},
        timeout=30,
    )
    assert direct.status_code == 200
    batch = sdk.messages.batches.create(
        requests=[item(f"u{i}", model="usage-model") for i in range(3)]
    )
    ended(sdk, batch.id)
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def row() -> dict[str, Any] | None:
        report = requests.get(
            f"{gateway.url}/admin/usage?key=bob&model=usage-model&by=key,model",
            headers=admin,
            timeout=30,
        ).json()
        found = report["data"]
        return found[0] if found and found[0]["requests"] == 4 else None

    usage = eventually(row, what="the usage of one request and three batch items")
    assert usage["batch_requests"] == 3
    assert usage["batch_input_tokens"] == 30 and usage["batch_output_tokens"] == 15
    assert usage["input_tokens"] == 40 and usage["output_tokens"] == 20


def test_batch_items_carry_the_backends_batch_priority_and_direct_requests_none(
    gateway: Gunicorn, backends: tuple[FakeBackend, FakeBackend]
) -> None:
    main, _ = backends
    sdk = client(gateway)
    batch = sdk.messages.batches.create(requests=[item("prioritised", "priority probe")])
    ended(sdk, batch.id)
    direct = requests.post(
        f"{gateway.url}/v1/messages",
        json=item("x", "direct probe")["params"],
        headers={"x-api-key": ALICE},
        timeout=30,
    )
    assert direct.status_code == 200
    sent = {
        r.json["messages"][-1]["content"]: r.json.get("priority")
        for r in main.requests
        if r.json and r.json.get("messages")
    }
    assert sent["priority probe"] == 7
    assert sent["direct probe"] is None


def test_a_busy_or_failing_backend_makes_items_wait_and_try_again_not_fail(
    gateway: Gunicorn, backends: tuple[FakeBackend, FakeBackend]
) -> None:
    main, _ = backends
    main.reply(
        JSONReply(error_body("busy", error_type="server_busy"), status=503),
        JSONReply(error_body("overloaded"), status=429, headers={"retry-after": "0"}),
        JSONReply(error_body("boom", error_type="server_error"), status=500),
    )
    sdk = client(gateway)
    batch = sdk.messages.batches.create(requests=[item("patient")])
    done = ended(sdk, batch.id)
    assert done.request_counts.succeeded == 1
    (line,) = results(sdk.messages.batches, batch.id)
    assert line.result.type == "succeeded"
    scrape = requests.get(f"{gateway.url}/metrics", timeout=30).text
    assert metric_sum(scrape, "gateway_batch_item_retries_total", backend="main") >= 3


def operator(gateway: Gunicorn, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m app.batches`` with the gateway's own configuration and state directory."""
    env = {
        **os.environ,
        "GATEWAY_CONFIG": str(gateway.log_path.parent / "gateway.toml"),
        "GATEWAY_STATE_DIR": str(gateway.log_path.with_suffix(".state")),
    }
    return subprocess.run(
        [sys.executable, "-m", "app.batches", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_operator_lists_shows_cancels_and_purges_every_keys_batches(
    gateway: Gunicorn, backends: tuple[FakeBackend, FakeBackend]
) -> None:
    _, held = backends
    sdk = client(gateway, BOB)
    done = sdk.messages.batches.create(requests=[item("o1"), item("o2")])
    ended(sdk, done.id)
    waiting = sdk.messages.batches.create(requests=[item("w", model="held-y")])
    listed = operator(gateway, "list", "--key", "bob", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    assert done.id in listed.stdout and waiting.id in listed.stdout
    shown = operator(gateway, "show", done.id)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["key"] == "bob" and record["processing_status"] == "ended"
    assert record["progress"]["succeeded"] == 2 and record["progress"]["total"] == 2
    assert operator(gateway, "show", "msgbatch_none").returncode == 1
    canceled = operator(gateway, "cancel", waiting.id)
    assert canceled.returncode == 0, canceled.stderr
    assert sdk.messages.batches.retrieve(waiting.id).processing_status in ("canceling", "ended")
    assert isinstance(held.default, GatedReply)
    held.default.gate.set()
    ended(sdk, waiting.id)
    purged = operator(gateway, "purge", done.id, waiting.id)
    assert purged.returncode == 0, purged.stderr
    for batch_id in (done.id, waiting.id):
        with pytest.raises(anthropic.NotFoundError):
            sdk.messages.batches.retrieve(batch_id)
    assert operator(gateway, "sweep").returncode == 0


def test_access_lines_mark_batch_items_and_the_gateway_is_idle_afterwards(
    gateway: Gunicorn,
) -> None:
    sdk = client(gateway)
    batch = sdk.messages.batches.create(requests=[item("logged")])
    ended(sdk, batch.id)
    lines = eventually(
        lambda: [
            line
            for line in gateway.access_lines()
            if line.get("batch") == batch.id and line.get("custom_id") == "logged"
        ],
        what="the item's access line",
    )
    assert lines[0]["path"] == "/v1/messages" and lines[0]["key"] == "alice"
    status = requests.get(
        f"{gateway.url}/status", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30
    ).json()
    for backend in status["backends"].values():
        assert backend["service_in_flight"] == 0 and backend["batch_in_flight"] == 0
    assert requests.get(f"{gateway.url}/healthz", timeout=30).status_code == 200
    scrape = requests.get(f"{gateway.url}/metrics", timeout=30).text
    assert metric_sum(scrape, "gateway_batch_items_total", result="succeeded") >= 1
    assert metric_sum(scrape, "gateway_batch_items_in_flight") == 0
    eventually(  # the next sweep's census
        lambda: (
            metric_sum(
                requests.get(f"{gateway.url}/metrics", timeout=30).text,
                "gateway_batches",
                status="ended",
            )
            >= 1
        ),
        what="the batches gauge",
        timeout=30,
    )
