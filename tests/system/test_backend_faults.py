"""One real gunicorn gateway across backends that misbehave, and how it answers each.

A TLS backend signed by a throwaway CA, a backend behind an HTTP proxy, and a plain backend
scripted to send bytes after its answer, a gzip bomb, a 100 MB stream line, a 101 and a 302.
The tests share one gateway on purpose, and run in order: after every fault the client gets
the right Anthropic error, the worker serves the next request normally, every client gets
its own answer, and at the end nothing is left in flight.
"""

from __future__ import annotations

import json
import shutil
import ssl
from pathlib import Path

import anthropic
import pytest
import requests
from fakebackend import (
    EchoReply,
    FakeBackend,
    HangReply,
    HugeLineReply,
    JSONReply,
    RawReply,
    StreamReply,
    WireReply,
    chunks,
    error_body,
    gzip_bomb,
)
from proxyserver import ForwardProxy
from servers import Gunicorn, ThrowawayCA

ADMIN = "admin-token-for-faults"


def wire_answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


def completion_bytes(text: str) -> bytes:
    body = {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }  # fmt: skip
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> ThrowawayCA:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the test certificates (apt-get install openssl)")
    return ThrowawayCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def world(tmp_path_factory, ca):
    """The backends, the proxy and one gateway in front of them all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.server_cert, ca.server_key)
    with (
        FakeBackend(echo_request_id=True) as plain,
        FakeBackend(tls=context) as tls,
        FakeBackend() as behind,
        ForwardProxy() as proxy,
    ):
        for backend in (plain, tls, behind):
            backend.default = EchoReply()
        directory = tmp_path_factory.mktemp("faults")
        config = directory / "gateway.toml"
        config.write_text(
            f"""
[admin]
token = "{ADMIN}"
[routing]
retries = 0
[[backends]]
name = "plain"
url = "{plain.url}"
[[backends]]
name = "tls"
url = "{tls.url}"
ca_bundle = "{ca.cert}"
[[backends]]
name = "tls-unknown-ca"
url = "{tls.url}"
[[backends]]
name = "proxied"
url = "{behind.url}"
proxy = "{proxy.url}"
[[routes]]
match = "plain"
backend = "plain"
[[routes]]
match = "tls"
backend = "tls"
[[routes]]
match = "tls-unknown-ca"
backend = "tls-unknown-ca"
[[routes]]
match = "proxied"
backend = "proxied"
"""
        )
        gateway = Gunicorn({"GATEWAY_CONFIG": str(config)}, directory / "gunicorn.log")
        try:
            yield {"gateway": gateway, "plain": plain, "tls": tls, "proxy": proxy}
        finally:
            gateway.stop()


@pytest.fixture(scope="module")
def sdk(world):
    with anthropic.Anthropic(
        base_url=world["gateway"].url, api_key="k", max_retries=0, timeout=60
    ) as client:
        yield client


MARKERS = iter(f"marker-{n}" for n in range(10_000))


def ask(sdk, model: str = "plain", stream: bool = False) -> str:
    """A request whose answer must be its own marker; returns the answer's text."""
    marker = next(MARKERS)
    messages = [{"role": "user", "content": marker}]
    if stream:
        with sdk.messages.stream(model=model, max_tokens=16, messages=messages) as events:
            text = events.get_final_message().content[0].text
    else:
        text = sdk.messages.create(model=model, max_tokens=16, messages=messages).content[0].text
    assert text == marker
    return text


def serves_the_next_request(sdk) -> None:
    ask(sdk)
    ask(sdk, stream=True)


def status(world) -> dict:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return requests.get(world["gateway"].url + "/status", headers=headers, timeout=5).json()


def test_a_plain_backend_answers_each_client_its_own(sdk):
    for _ in range(3):
        serves_the_next_request(sdk)


def test_a_tls_backend_signed_by_the_configured_ca(sdk):
    ask(sdk, "tls")
    ask(sdk, "tls", stream=True)


def test_a_tls_backend_with_an_unknown_ca_is_a_502_naming_it(sdk, world):
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(sdk, "tls-unknown-ca")
    assert caught.value.status_code == 502
    error = caught.value.body["error"]
    assert error["type"] == "api_error"
    assert f"TLS with backend 127.0.0.1:{world['tls'].port} failed" in error["message"]
    serves_the_next_request(sdk)


def test_a_backend_behind_an_http_proxy(sdk, world):
    ask(sdk, "proxied")
    ask(sdk, "proxied", stream=True)
    assert any("/v1/chat/completions" in line for line in world["proxy"].seen)


def answer_then(text: str, stray: bytes, after: float | None = None) -> WireReply:
    """The answer, and a stray response: in the same write, or ``after`` seconds later."""
    answer = wire_answer(completion_bytes(text))
    if after is None:
        return WireReply(answer + stray)
    return WireReply(answer, then=stray, then_after=after)


def ask_for(sdk, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    return sdk.messages.create(model="plain", max_tokens=16, messages=messages).content[0].text


def test_bytes_after_an_answer_never_reach_another_client(sdk, world):
    """An unrequested second response, written with the first or just after it: urllib3
    finds it on the connection before reusing it, and the connection is retired. (The
    stray carries no X-Request-ID, so that is what finds it: an answer naming no request
    is served, even from a backend that echoes ids.)"""
    plain, text = world["plain"], next(MARKERS)
    stray = wire_answer(completion_bytes("LEAKED"))
    plain.reply(answer_then(text, stray))
    assert ask_for(sdk, text) == text
    serves_the_next_request(sdk)
    late = answer_then(text, stray, after=0.02)
    plain.reply(late)
    assert ask_for(sdk, text) == text
    assert late.then_written.wait(30)  # the stray is on the pooled connection now
    for _ in range(3):
        serves_the_next_request(sdk)  # each gets its own marker, never "LEAKED"


def test_a_late_stray_answer_naming_another_request_is_refused(sdk, world):
    """A stray that arrives only after the next request went out on the connection: the
    backend echoes request ids, and the stray names another request, so it is refused."""
    plain, text = world["plain"], next(MARKERS)
    stray = wire_answer(completion_bytes("LEAKED"), extra="X-Request-ID: req_someone_else\r\n")
    plain.reply(answer_then(text, stray, after=0.3))
    assert ask_for(sdk, text) == text
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(sdk)  # sent at once, on the connection the stray is about to arrive on
    assert caught.value.status_code == 502
    assert "sent an answer to another request" in caught.value.body["error"]["message"]
    for _ in range(3):
        serves_the_next_request(sdk)


def test_a_request_crossing_the_backends_keep_alive_close_is_answered(sdk, world):
    """The backend reads a request on a kept-alive connection and closes it unanswered, as
    when its keep-alive timeout runs out while the request is on its way: the gateway, with
    ``retries = 0``, sends it once more on a new connection, streamed or not."""
    serves_the_next_request(sdk)  # the worker has a connection to the backend in its pool
    for stream in (False, True):
        world["plain"].reply(HangReply(0))  # read, then closed without a word
        ask(sdk, stream=stream)
    serves_the_next_request(sdk)


def test_a_gzip_bomb_is_a_502_and_the_worker_stays_small(sdk, world):
    bomb = gzip_bomb(1 << 30)  # 1 GiB of zeros, about 1 MB on the wire
    world["plain"].reply(RawReply(bomb, headers={"Content-Encoding": "gzip"}))
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(sdk)
    assert caught.value.status_code == 500
    assert "sent a body larger than 33554432 bytes" in caught.value.body["error"]["message"]
    pid = status(world)["worker_pid"]
    peak_kb = int(
        next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
             if line.startswith("VmHWM:")).split()[1]
    )  # fmt: skip
    assert peak_kb < 400 * 1024  # the 32 MiB cap and the worker, far from the unit's 2G
    serves_the_next_request(sdk)


def test_a_100_mb_stream_line_ends_the_stream_with_an_error_event(sdk, world):
    world["plain"].reply(HugeLineReply(100 << 20))
    with pytest.raises(anthropic.APIStatusError, match="stream line longer than 4194304 bytes"):
        ask(sdk, stream=True)
    assert world["plain"].wait_closed()  # the gateway hung up instead of reading 100 MB
    serves_the_next_request(sdk)


def test_a_101_is_a_502_and_its_connection_is_dropped(sdk, world):
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    world["plain"].reply(WireReply(switch, then=wire_answer(completion_bytes("LEAKED")),
                                   then_after=0.05))  # fmt: skip
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(sdk)
    assert caught.value.status_code == 502
    assert "answered with HTTP 101 Switching Protocols" in caught.value.body["error"]["message"]
    serves_the_next_request(sdk)


def test_a_302_is_a_502_naming_the_backend(sdk, world):
    redirect = wire_answer(b"", "302 Found", "Location: http://127.0.0.1:9/v1/chat/completions\r\n")
    world["plain"].reply(WireReply(redirect))
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(sdk)
    assert caught.value.status_code == 502
    error = caught.value.body["error"]
    assert error["type"] == "api_error"
    assert f"backend 127.0.0.1:{world['plain'].port} answered with a redirect" in error["message"]
    serves_the_next_request(sdk)


def test_rate_limits_and_overload_go_back_with_retry_after_and_leave_it_healthy(sdk, world):
    for backend_status, code in ((429, 429), (503, 529)):
        world["plain"].reply(
            JSONReply(error_body("later"), status=backend_status, headers={"Retry-After": "7"})
        )
        with pytest.raises(anthropic.APIStatusError) as caught:
            ask(sdk)
        assert caught.value.status_code == code
        assert caught.value.response.headers["retry-after"] == "7"
        serves_the_next_request(sdk)
    assert status(world)["backends"]["plain"]["breaker"] == "closed"


def test_server_errors_and_a_stream_cut_midway_leave_it_serving(sdk, world):
    plain = world["plain"]
    plain.reply(JSONReply(error_body("tools param requires --jinja flag", code=500), status=500))
    with pytest.raises(anthropic.BadRequestError):
        ask(sdk)
    plain.reply(JSONReply(error_body("kaput", error_type="server_error"), status=500))
    with pytest.raises(anthropic.InternalServerError):
        ask(sdk)
    plain.reply(StreamReply(chunks(["half", " an", " answer"]), cut_after=2))
    with pytest.raises(anthropic.APIStatusError, match="before the answer was complete"):
        ask(sdk, stream=True)
    plain.reply(RawReply(b"<html>not an answer</html>", headers={"Content-Type": "text/html"}))
    with pytest.raises(anthropic.APIStatusError, match="neither SSE nor JSON"):
        ask(sdk, stream=True)
    for _ in range(3):
        serves_the_next_request(sdk)


def test_afterwards_nothing_is_in_flight(sdk, world):
    serves_the_next_request(sdk)
    backends = status(world)["backends"]
    assert {name: b["in_flight"] for name, b in backends.items()} == dict.fromkeys(backends, 0)
    metrics = requests.get(world["gateway"].url + "/metrics", timeout=5).text
    streams = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("gateway_streams_in_flight{")
    ]
    assert sum(streams) == 0
