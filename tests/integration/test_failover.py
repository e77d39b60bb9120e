"""Several real fake backends behind one route: retries, failover, breaker, passthrough."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import pytest
import requests
from fakebackend import (
    FakeBackend,
    HangReply,
    JSONReply,
    RawReply,
    StreamReply,
    chunks,
    completion,
    error_body,
)
from inprocess import GatewayServer
from waiting import eventually

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def backends() -> Iterator[Callable[[], FakeBackend]]:
    started: list[FakeBackend] = []

    def new() -> FakeBackend:
        backend = FakeBackend().start()
        started.append(backend)
        return backend

    yield new
    for backend in started:
        backend.stop()


@pytest.fixture
def gateway_for() -> Iterator[Callable[..., GatewayServer]]:
    servers: list[GatewayServer] = []

    def start(
        backends: dict[str, FakeBackend | str], targets: list[str], **raw: Any
    ) -> GatewayServer:
        """A gateway whose one route sends every model to ``targets`` in order."""
        declared = [
            {
                "name": name,
                "url": b if isinstance(b, str) else b.url,
                **raw.pop(f"{name}_extra", {}),
            }
            for name, b in backends.items()
        ]
        route = {
            "name": "all",
            "match": "*",
            "strategy": raw.pop("strategy", "failover"),
            "targets": [{"backend": t, "model": f"{t}-model"} for t in targets],
        }
        routing = {"retries": 2, "backoff": 0.01, "breaker_failures": 100, **raw.pop("routing", {})}
        server = GatewayServer({"backends": declared, "routes": [route], "routing": routing, **raw})
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def dead_url() -> str:
    backend = FakeBackend().start()
    url = backend.url
    backend.stop()
    return url


def create(gateway: GatewayServer, **kwargs: Any):
    with gateway.client() as client:
        return client.messages.with_raw_response.create(
            model="claude-sonnet-4-6", max_tokens=20, messages=HI, **kwargs
        )


def test_connection_refused_fails_over_to_the_next_backend(backends, gateway_for):
    healthy = backends()
    gateway = gateway_for({"dead": dead_url(), "ok": healthy}, ["dead", "ok"])
    response = create(gateway)
    assert response.parse().content[0].text == "Hello"
    assert response.parse().model == "claude-sonnet-4-6"
    assert healthy.requests[-1].json["model"] == "ok-model"


def test_503_fails_over_and_429_keeps_its_retry_after_when_all_fail(backends, gateway_for):
    first, second = backends(), backends()
    first.reply(JSONReply(error_body("busy"), status=503))
    gateway = gateway_for({"a": first, "b": second}, ["a", "b"])
    assert create(gateway).parse().content[0].text == "Hello"
    assert len(first.requests) == 1 and len(second.requests) == 1

    for backend in (first, second):
        backend.default = JSONReply(
            error_body("slow down"), status=429, headers={"Retry-After": "0"}
        )
    with pytest.raises(anthropic.RateLimitError) as caught:
        create(gateway)
    assert caught.value.response.headers["retry-after"] == "0"


def test_a_503_from_the_only_backend_goes_back_with_its_retry_after(backends, gateway_for):
    """The gateway does not ask a backend that said no again: the client does, on the
    backend's schedule (the SDK honours retry-after)."""
    only = backends()
    only.reply(JSONReply(error_body("busy"), status=503, headers={"Retry-After": "5"}))
    gateway = gateway_for({"a": only}, ["a"])
    with pytest.raises(anthropic.APIStatusError) as caught:
        create(gateway)
    assert caught.value.status_code == 529
    assert caught.value.response.headers["retry-after"] == "5"
    assert len(only.requests) == 1
    started = time.monotonic()
    with gateway.client(max_retries=1) as client:
        assert client.messages.create(model="m", max_tokens=20, messages=HI).content
    assert len(only.requests) == 2  # one more: the SDK's own retry, not a gateway one
    # nothing queued for the backend's 5 s: the backend answered at once
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("status", [429, 503])
def test_retries_never_multiply_the_clients_own(backends, gateway_for, status):
    """An SDK with its default two retries against a backend that always says no: three
    backend requests, not nine."""
    only = backends()
    only.default = JSONReply(error_body("no"), status=status, headers={"Retry-After": "0"})
    gateway = gateway_for({"a": only}, ["a"])
    with gateway.client(max_retries=2) as client, pytest.raises(anthropic.APIStatusError):
        client.messages.create(model="m", max_tokens=20, messages=HI)
    assert len(only.requests) == 3


def test_a_connection_never_made_is_tried_again_after_backoff(backends, gateway_for):
    gateway = gateway_for({"a": dead_url()}, ["a"], admin={"token": "t"})
    with pytest.raises(anthropic.APIStatusError) as caught:
        create(gateway)
    assert caught.value.status_code == 502
    assert "connection refused" in caught.value.body["error"]["message"]
    status = requests.get(gateway.url + "/status", headers={"x-api-key": "t"}, timeout=5).json()
    assert status["backends"]["a"]["errors"] == 1  # three attempts, one failure counted


def test_client_errors_are_not_retried(backends, gateway_for):
    first, second = backends(), backends()
    first.reply(JSONReply(error_body("bad request"), status=400))
    gateway = gateway_for({"a": first, "b": second}, ["a", "b"])
    with pytest.raises(anthropic.BadRequestError):
        create(gateway)
    assert len(first.requests) == 1 and second.requests == []


def test_read_timeout_is_not_retried(backends, gateway_for):
    slow, spare = backends(), backends()
    slow.reply(HangReply(3))
    gateway = gateway_for(
        {"slow": slow, "spare": spare}, ["slow", "spare"], slow_extra={"read_timeout": 0.3}
    )
    with pytest.raises(anthropic.APIStatusError) as caught:
        create(gateway)
    assert caught.value.status_code == 504
    assert spare.requests == []  # the slow backend may still be generating: no duplicate


def test_stream_failing_after_start_is_never_retried(backends, gateway_for):
    first, second = backends(), backends()
    first.reply(StreamReply(chunks(["partial", " answer", " here"]), cut_after=2))
    gateway = gateway_for({"a": first, "b": second}, ["a", "b"])
    with gateway.client() as client, pytest.raises(anthropic.APIStatusError):
        with client.messages.stream(model="m", max_tokens=20, messages=HI) as stream:
            stream.get_final_message()
    assert len(first.requests) == 1 and second.requests == []


def test_stream_retried_only_before_the_first_byte(backends, gateway_for):
    first, second = backends(), backends()
    first.reply(JSONReply(error_body("overloaded"), status=503))
    second.reply(StreamReply(chunks(["from", " b"]), delay=0.01))
    gateway = gateway_for({"a": first, "b": second}, ["a", "b"])
    with gateway.client() as client:
        with client.messages.stream(model="m", max_tokens=20, messages=HI) as stream:
            message = stream.get_final_message()
    assert message.content[0].text == "from b"
    assert len(first.requests) == 1 and len(second.requests) == 1


def test_breaker_takes_a_failing_backend_out_and_probes_it_back(backends, gateway_for):
    flaky, steady = backends(), backends()
    flaky.default = JSONReply(error_body("down"), status=500)
    # The cooldown is long enough for the three requests while the breaker is open to be
    # served within it on a machine that is busy with other work.
    cooldown = 3.0
    routing = {"breaker_failures": 2, "breaker_cooldown": cooldown, "retries": 1}
    gateway = gateway_for({"flaky": flaky, "steady": steady}, ["flaky", "steady"], routing=routing)
    for _ in range(2):
        create(gateway)
    opened = time.monotonic()
    assert len(flaky.requests) == 2
    for _ in range(3):
        create(gateway)  # breaker open: flaky is skipped
    assert len(flaky.requests) == 2 and len(steady.requests) == 5

    flaky.default = JSONReply(completion("flaky is back"))
    time.sleep(max(0.0, opened + cooldown + 0.1 - time.monotonic()))
    assert create(gateway).parse().content[0].text == "flaky is back"  # the probe
    assert create(gateway).parse().content[0].text == "flaky is back"  # closed again


def test_the_last_backend_of_a_route_is_never_taken_out(backends, gateway_for):
    """With its breaker open, the only backend still gets the requests (there is nowhere
    else to send them), and its first success closes the breaker."""
    only = backends()
    only.default = JSONReply(error_body("down"), status=500)
    routing = {"breaker_failures": 1, "breaker_cooldown": 30, "retries": 0}
    gateway = gateway_for({"a": only}, ["a"], routing=routing, admin={"token": "t"})
    for _ in range(2):
        with pytest.raises(anthropic.InternalServerError):
            create(gateway)
    status = requests.get(gateway.url + "/status", headers={"x-api-key": "t"}, timeout=5).json()
    assert status["backends"]["a"]["breaker"] == "open"
    only.default = JSONReply(completion("back"))
    assert create(gateway).parse().content[0].text == "back"
    assert len(only.requests) == 3
    status = requests.get(gateway.url + "/status", headers={"x-api-key": "t"}, timeout=5).json()
    assert status["backends"]["a"]["breaker"] == "closed"


def test_rate_limits_and_refusals_never_open_the_breaker(backends, gateway_for):
    only = backends()
    routing = {"breaker_failures": 2, "retries": 0}
    gateway = gateway_for({"a": only}, ["a"], routing=routing, admin={"token": "t"})
    refusals = [
        JSONReply(error_body("slow down"), status=429, headers={"Retry-After": "0"}),
        JSONReply(error_body("busy"), status=503),
        JSONReply(error_body("image input is not supported"), status=500),
        JSONReply(error_body("tools param requires --jinja flag", code=500), status=500),
        JSONReply(error_body("bad"), status=400),
        JSONReply(error_body("who"), status=401),
    ]
    only.reply(*refusals)
    for _ in refusals:
        with pytest.raises(anthropic.APIStatusError):
            create(gateway)
    status = requests.get(gateway.url + "/status", headers={"x-api-key": "t"}, timeout=5).json()
    assert status["backends"]["a"]["breaker"] == "closed"
    assert status["backends"]["a"]["errors"] == 0
    assert create(gateway).parse().content[0].text == "Hello"


def test_a_5xx_naming_the_request_is_a_400_for_the_client(backends, gateway_for):
    only = backends()
    message = "image input is not supported - hint: you may need to provide the mmproj"
    only.reply(JSONReply(error_body(message, error_type="server_error", code=500), status=500))
    gateway = gateway_for({"a": only}, ["a"])
    with pytest.raises(anthropic.BadRequestError) as caught:
        create(gateway)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "image input is not supported" in caught.value.body["error"]["message"]
    assert len(only.requests) == 1


def test_concurrency_cap_sends_overflow_to_the_next_backend(backends, gateway_for):
    small, big = backends(), backends()
    small.reply(StreamReply(chunks(["slow"]), first_delay=5.0))  # still open for the second
    gateway = gateway_for(
        {"small": small, "big": big}, ["small", "big"], small_extra={"max_concurrency": 1}
    )
    with gateway.client() as client:
        with client.messages.stream(model="m", max_tokens=20, messages=HI) as held:
            # the first stream holds small's only slot until it is read
            second = client.messages.create(model="m", max_tokens=20, messages=HI)
            assert held.get_final_message().content[0].text == "slow"
    assert second.content[0].text == "Hello"
    assert len(small.requests) == 1 and len(big.requests) == 1


# --- Anthropic-speaking backends ---------------------------------------------------------------

ANTHROPIC_MESSAGE = {
    "id": "msg_backend",
    "type": "message",
    "role": "assistant",
    "model": "backend-name",
    "content": [{"type": "text", "text": "native answer"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 3},
}


def anthropic_stream_bytes() -> bytes:
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {**ANTHROPIC_MESSAGE, "content": [], "stop_reason": None},
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "native "},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "stream"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 7},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(
        f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events
    )


def test_anthropic_backend_gets_the_body_through_and_model_is_renamed(backends, gateway_for):
    native = backends()
    native.routes[("POST", "/v1/messages")] = lambda req: JSONReply(ANTHROPIC_MESSAGE)
    gateway = gateway_for(
        {"native": native}, ["native"], native_extra={"protocol": "anthropic", "api_key": "sk-n"}
    )
    response = create(gateway, extra_headers={"anthropic-beta": "context-1m-2025-08-07"})
    message = response.parse()
    assert message.content[0].text == "native answer" and message.model == "claude-sonnet-4-6"
    sent = native.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.json == {"model": "native-model", "max_tokens": 20, "messages": HI}
    assert sent.headers["x-api-key"] == "sk-n"
    assert sent.headers["anthropic-beta"] == "context-1m-2025-08-07"


def test_an_anthropic_backend_gets_whole_conversations_and_never_the_threads_beta(
    backends, gateway_for
):
    # The gateway keeps the threads itself: the backend sees neither the thread field nor the
    # beta, only the whole conversation of a continue, with the system it was created with.
    native = backends()
    native.routes[("POST", "/v1/messages")] = lambda req: JSONReply(
        {**ANTHROPIC_MESSAGE, "id": f"msg_native_{len(native.requests)}"}
    )
    gateway = gateway_for({"native": native}, ["native"], native_extra={"protocol": "anthropic"})
    betas = "message-threads-2026-08-12, context-1m-2025-08-07"
    with gateway.client() as client:
        first = client.beta.messages.create(
            model="claude-sonnet-4-6", max_tokens=20, system="terse", messages=HI,
            extra_body={"thread": {"type": "create"}}, extra_headers={"anthropic-beta": betas},
        )  # fmt: skip
        client.beta.messages.create(
            model="claude-sonnet-4-6", max_tokens=20,
            messages=[{"role": "user", "content": "and?"}],
            extra_body={"thread": {"type": "continue", "previous_message_id": first.id}},
            extra_headers={"anthropic-beta": "message-threads-2026-08-12"},
        )  # fmt: skip
    created, continued = native.requests[-2], native.requests[-1]
    assert "thread" not in created.json and created.headers["anthropic-beta"] == (
        "context-1m-2025-08-07"
    )
    assert "anthropic-beta" not in continued.headers
    assert continued.json["system"] == "terse"
    assert [m["role"] for m in continued.json["messages"]] == ["user", "assistant", "user"]
    assert continued.json["messages"][1]["content"] == ANTHROPIC_MESSAGE["content"]


def test_anthropic_backend_stream_is_relayed_and_renamed(backends, gateway_for):
    native = backends()
    stream = anthropic_stream_bytes()
    native.routes[("POST", "/v1/messages")] = lambda req: RawReply(
        stream, headers={"Content-Type": "text/event-stream"}
    )
    gateway = gateway_for({"native": native}, ["native"], native_extra={"protocol": "anthropic"})
    with gateway.client() as client:
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=20, messages=HI) as s:
            message = s.get_final_message()
    assert message.content[0].text == "native stream"
    assert message.model == "claude-sonnet-4-6"
    assert message.usage.output_tokens == 7 and message.usage.input_tokens == 12


def test_one_route_mixes_anthropic_and_openai_backends(backends, gateway_for):
    native, chat = backends(), backends()
    native.routes[("POST", "/v1/messages")] = lambda req: JSONReply(
        {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, status=529
    )
    gateway = gateway_for(
        {"native": native, "chat": chat}, ["native", "chat"], native_extra={"protocol": "anthropic"}
    )
    assert create(gateway).parse().content[0].text == "Hello"
    assert chat.requests[-1].path == "/v1/chat/completions"


# --- status ---------------------------------------------------------------------------------------


def test_status_needs_the_admin_token_and_shows_backend_health(backends, gateway_for):
    one = backends()
    gateway = gateway_for({"one": one}, ["one"], admin={"token": "s3cret"})
    create(gateway)
    assert requests.get(gateway.url + "/status", timeout=5).status_code == 401
    wrong = requests.get(gateway.url + "/status", headers={"x-api-key": "nope"}, timeout=5)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    status = requests.get(
        gateway.url + "/status", headers={"Authorization": "Bearer s3cret"}, timeout=5
    ).json()
    assert status["backends"]["one"]["breaker"] == "closed"
    assert (
        status["backends"]["one"]["successes"] == 1 and status["backends"]["one"]["in_flight"] == 0
    )
    assert status["routes"][0]["name"] == "all"
    assert "s3cret" not in str(status)


def test_status_is_absent_without_an_admin_token(backends, gateway_for):
    gateway = gateway_for({"one": backends()}, ["one"])
    assert requests.get(gateway.url + "/status", timeout=5).status_code == 404


def test_models_lists_routes_and_aliases(backends):
    one = backends()
    raw = {
        "upstream": {"url": one.url, "model": "qwen3"},
        "models": {"claude-haiku-4-5": "qwen3-8b"},
        "backends": [{"name": "big", "url": one.url}],
        "routes": [
            {"match": ["claude-opus-4-7", "claude-*"], "backend": "big", "model": "qwen3-235b"}
        ],
    }
    gateway = GatewayServer(raw)
    try:
        with gateway.client() as client:
            ids = [m.id for m in client.models.list()]
    finally:
        gateway.close()
    assert ids == ["claude-haiku-4-5", "claude-opus-4-7", "qwen3"]


def test_count_tokens_on_an_anthropic_backend_is_passed_through(backends, gateway_for):
    native = backends()
    native.routes[("POST", "/v1/messages/count_tokens")] = lambda req: JSONReply(
        {"input_tokens": 42}
    )
    gateway = gateway_for({"native": native}, ["native"], native_extra={"protocol": "anthropic"})
    with gateway.client() as client:
        response = client.messages.with_raw_response.count_tokens(model="claude-x", messages=HI)
    assert response.parse().input_tokens == 42
    assert response.headers["x-gateway-token-count"] == "exact"
    assert native.requests[-1].json == {"model": "native-model", "messages": HI}


def test_a_request_the_gateway_refuses_is_not_held_against_the_backend(backends, gateway_for):
    one = backends()
    gateway = gateway_for(
        {"one": one}, ["one"], admin={"token": "t"}, routing={"breaker_failures": 1}
    )
    errors_before = _backend_errors(gateway, "one")
    with gateway.client() as client, pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model="m",
            max_tokens=10,
            messages=HI,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    status = requests.get(gateway.url + "/status", headers={"x-api-key": "t"}, timeout=5).json()
    assert status["backends"]["one"]["errors"] == 0 and status["backends"]["one"]["in_flight"] == 0
    assert one.requests == []
    assert _backend_errors(gateway, "one") == errors_before
    assert create(gateway).parse().content[0].text == "Hello"


def _backend_errors(gateway: GatewayServer, backend: str) -> float:
    text = requests.get(gateway.url + "/metrics", timeout=5).text
    needle = f'gateway_backend_errors_total{{backend="{backend}"'
    lines = [line for line in text.splitlines() if line.startswith(needle)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_a_stream_whose_end_cannot_be_read_still_frees_the_keys_slot_and_is_logged(
    backends, gateway_for, gateway_log
):
    # An Anthropic backend whose usage is not a number: reading the stream's usage at its end
    # fails. The rest of the end must run all the same: the client gets the whole stream, the
    # key's only slot comes back, the request is settled and gets its access line.
    native = backends()
    broken = anthropic_stream_bytes().replace(b'"output_tokens": 7', b'"output_tokens": "seven"')
    native.routes[("POST", "/v1/messages")] = lambda req: RawReply(
        broken, headers={"Content-Type": "text/event-stream"}
    )
    key = {"name": "solo", "sha256": hashlib.sha256(b"test-key").hexdigest(), "max_concurrent": 1}
    gateway = gateway_for(
        {"native": native},
        ["native"],
        native_extra={"protocol": "anthropic", "max_concurrency": 1},
        auth={"keys": [key]},
    )
    with gateway.client() as client:
        for _ in range(2):  # the second is refused if the first still holds the key's slot
            with client.messages.stream(model="claude-x", max_tokens=20, messages=HI) as s:
                assert s.get_final_message().content[0].text == "native stream"
    lines = [r.msg for r in gateway_log.records if r.name == "gateway.access"]
    assert [(line["status"], line["key"]) for line in lines] == [(200, "solo")] * 2
    assert lines[0]["stop_reason"] == "end_turn" and lines[0]["client_disconnected"] is False
    failures = [r for r in gateway_log.records if r.name == "gateway" and r.levelname == "ERROR"]
    assert len(failures) == 2  # once for each stream, in the gateway's log


# --- count_tokens takes a backend slot as a message does --------------------------------------


def counting_backend(backends: Callable[[], FakeBackend], count: int) -> FakeBackend:
    """A vLLM-like backend whose tokenizer says ``count``."""
    backend = backends()
    backend.routes[("POST", "/tokenize")] = lambda req: JSONReply(
        {"count": count, "max_model_len": 8192, "tokens": []}
    )
    return backend


def count(gateway: GatewayServer) -> Any:
    with gateway.client() as client:
        return client.messages.with_raw_response.count_tokens(model="claude-x", messages=HI)


def status_of(gateway: GatewayServer, backend: str) -> dict[str, Any]:
    status = requests.get(gateway.url + "/status", headers={"x-api-key": "t"}, timeout=5).json()
    return status["backends"][backend]


def test_a_count_is_not_sent_to_a_backend_at_its_max_concurrency(backends, gateway_for):
    only = counting_backend(backends, 123)
    only.reply(JSONReply(completion("slow"), delay=5.0))  # holds the slot while the count runs
    extra = {"dialect": "vllm", "max_concurrency": 1}
    gateway = gateway_for({"a": only}, ["a"], a_extra=extra, admin={"token": "t"})
    slow = threading.Thread(target=create, args=(gateway,))
    slow.start()
    try:
        # the message holds the only slot
        eventually(lambda: status_of(gateway, "a")["in_flight"] == 1, "the message in flight")
        busy = count(gateway)
    finally:
        slow.join(timeout=30)
    assert busy.headers["x-gateway-token-count"] == "estimate" and busy.parse().input_tokens > 0
    assert only.tokenizer_requests == []
    counted = count(gateway)  # the slot is free again: the backend counts
    assert counted.headers["x-gateway-token-count"] == "exact"
    assert counted.parse().input_tokens == 123 and len(only.tokenizer_requests) == 1
    assert status_of(gateway, "a")["in_flight"] == 0  # and the count gave it back


def test_a_count_is_not_sent_to_a_backend_its_breaker_holds_back(backends, gateway_for):
    only = counting_backend(backends, 123)
    only.reply(JSONReply(error_body("down"), status=500))
    routing = {"breaker_failures": 1, "breaker_cooldown": 30, "retries": 0}
    gateway = gateway_for(
        {"a": only}, ["a"], a_extra={"dialect": "vllm"}, routing=routing, admin={"token": "t"}
    )
    with pytest.raises(anthropic.InternalServerError):
        create(gateway)
    assert status_of(gateway, "a")["breaker"] == "open"
    counted = count(gateway)
    assert counted.headers["x-gateway-token-count"] == "estimate"
    assert only.tokenizer_requests == []
    # A count is no probe, and says nothing of the backend: the breaker is as it was.
    assert status_of(gateway, "a")["breaker"] == "open"
    assert status_of(gateway, "a")["in_flight"] == 0


def test_a_count_goes_to_the_next_backend_when_the_first_is_held_back(backends, gateway_for):
    first, second = counting_backend(backends, 111), counting_backend(backends, 222)
    first.reply(JSONReply(error_body("down"), status=500))
    routing = {"breaker_failures": 1, "breaker_cooldown": 30, "retries": 1}
    vllm = {"dialect": "vllm"}
    gateway = gateway_for(
        {"a": first, "b": second}, ["a", "b"], a_extra=vllm, b_extra=vllm, routing=routing
    )
    assert create(gateway).parse().content[0].text == "Hello"  # a failed, b answered
    assert count(gateway).parse().input_tokens == 222
    assert first.tokenizer_requests == []
