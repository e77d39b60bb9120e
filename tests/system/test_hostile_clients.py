"""One real gunicorn gateway, with client keys and limits, against clients that misbehave:
broken HTTP, broken bodies, bodies nobody reads, stalled uploads, hang-ups while the backend
thinks, values of the wrong type and shapes nested too deep.

Each gets a 4xx in Anthropic's envelope (or, for a hang-up, nothing, and its backend request
closed), and the tests share the gateway on purpose: at the end nothing is held, and the next
client is served.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import anthropic
import pytest
import requests
from fakebackend import FakeBackend, HoldReply
from servers import Gunicorn
from waiting import eventually

ADMIN = "admin-token-hostile"
KEYS = {"alice": "sk-gw-alice-0123456789", "single": "sk-gw-single-0123456789"}
RATED = "sk-gw-rated-0123456789"
BODY = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gateway(module_backend: FakeBackend, tmp_path_factory) -> Iterator[Gunicorn]:
    directory = tmp_path_factory.mktemp("hostile")
    sha = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in KEYS.items()}
    config = directory / "gateway.toml"
    config.write_text(
        f"""
body_timeout = 1
[upstream]
url = "{module_backend.url}"
[routing]
retries = 0
[admin]
token = "{ADMIN}"
[[auth.keys]]
name = "alice"
sha256 = "{sha["alice"]}"
[[auth.keys]]
name = "single"
sha256 = "{sha["single"]}"
max_concurrent = 1
[[auth.keys]]
name = "rated"
sha256 = "{hashlib.sha256(RATED.encode()).hexdigest()}"
requests_per_minute = 60
burst = 2
"""
    )
    server = Gunicorn({"GATEWAY_CONFIG": str(config)}, directory / "gunicorn.log")
    yield server
    server.stop()


def exchange(gateway: Gunicorn, raw: bytes, *, wait: float = 5.0) -> tuple[bytes, bool]:
    """Send ``raw`` on a fresh connection; (everything answered, whether the gateway closed
    the connection after it)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=wait) as conn:
        conn.sendall(raw)
        received = b""
        closed = False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                piece = conn.recv(65536)
            except TimeoutError:
                break
            if not piece:
                closed = True
                break
            received += piece
            if _complete(received):
                conn.settimeout(wait)  # is the connection closed after the answer?
        return received, closed


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return bool(sep) and len(body) >= int(line.split(b":")[1])
    return False


def envelope(answer: bytes) -> tuple[int, dict, dict[str, str]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), json.loads(body), headers


def post(key: str | None, body: bytes, extra: str = "", path: str = "/v1/messages") -> bytes:
    auth = f"x-api-key: {key}\r\n" if key else ""
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}{extra}"
        ).encode()
        + b"\r\n"
        + body
    )


def sized(key: str | None, body: bytes) -> bytes:
    return post(key, body, f"Content-Length: {len(body)}\r\n")


def status(gateway: Gunicorn) -> dict:
    headers = {"x-api-key": ADMIN}
    return requests.get(gateway.url + "/status", headers=headers, timeout=5).json()


def served(gateway: Gunicorn, key: str = KEYS["alice"]) -> None:
    with anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0) as client:
        assert client.messages.create(**BODY).content[0].text == "Hello"


# --- broken HTTP: gunicorn's own errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad\x01Header: y\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 150 + b"\r\n", 431),
    ],
    ids=["request_line", "header_bytes", "uri_too_long", "header_too_long", "too_many_headers"],
)
def test_broken_http_gets_an_anthropic_envelope_not_an_html_page(gateway, raw, code):
    answer, closed = exchange(gateway, raw)
    status_code, body, headers = envelope(answer)
    assert status_code == code
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]
    assert headers["content-type"] == "application/json"
    assert closed


# --- broken bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunked",
    [
        b'5\n{"a":\r\n0\r\n\r\n',  # a bare LF after the size
        b"-5\r\n{}\r\n0\r\n\r\n",  # a negative size
        b'2\r\n{"model": 1}\r\n0\r\n\r\n',  # data longer than declared
        b"zz\r\n{}\r\n0\r\n\r\n",  # not a size at all
    ],
    ids=["bare_lf", "negative_size", "longer_than_declared", "not_hex"],
)
def test_malformed_chunked_bodies_are_a_400_and_a_closed_connection(gateway, chunked):
    answer, closed = exchange(
        gateway, post(KEYS["alice"], chunked, "Transfer-Encoding: chunked\r\n")
    )
    code, body, headers = envelope(answer)
    assert code == 400 and body["error"]["type"] == "invalid_request_error"
    assert "request body" in body["error"]["message"]
    assert headers.get("connection") == "close" and closed
    assert answer.count(b"HTTP/1.1") == 1  # one answer, no second page after it


def test_a_body_nested_too_deep_is_a_400_naming_where(gateway):
    schema: dict = {}
    inner = schema
    for _ in range(300):
        inner["items"] = {}
        inner = inner["items"]
    body = {**BODY, "tools": [{"name": "t", "input_schema": schema}]}
    answer, _ = exchange(gateway, sized(KEYS["alice"], json.dumps(body).encode()))
    code, error, _ = envelope(answer)
    assert code == 400
    assert error["error"]["message"].startswith("tools.0.input_schema.items")
    assert "nests deeper than 128 levels" in error["error"]["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tool_choice": {"type": "tool", "name": {"x": [1]}}}, "tool_choice.name"),
        ({"output_config": {"effort": ["high"]}}, "output_config.effort"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": {"a": 1}, "data": "x"},
                            }
                        ],
                    }
                ]
            },
            "messages.0.content.0.source.media_type",
        ),  # fmt: skip
        (
            {"messages": [{"role": "user", "content": [{"type": "x" * 100000}]}]},
            "messages.0.content.0",
        ),
    ],
    ids=["tool_choice_name", "effort", "media_type", "long_type"],
)
def test_values_of_the_wrong_type_are_a_400_naming_the_field(gateway, change, field):
    body = {**BODY, "tools": [{"name": "t", "input_schema": {"type": "object"}}], **change}
    answer, _ = exchange(gateway, sized(KEYS["alice"], json.dumps(body).encode()))
    code, error, _ = envelope(answer)
    assert code == 400, error
    assert error["error"]["message"].startswith(field)
    assert len(error["error"]["message"]) < 300


# --- bodies nobody reads ------------------------------------------------------------------------


def test_a_refused_request_closes_its_connection_instead_of_reading_the_body(gateway):
    answer, closed = exchange(gateway, sized("wrong-key", b"{" + b" " * (512 << 10)))
    code, body, headers = envelope(answer)
    assert code == 401 and body["error"]["type"] == "authentication_error"
    assert headers["connection"] == "close" and closed  # a clean close, after the answer


def test_a_refused_huge_body_is_answered_before_the_connection_goes(gateway):
    """8 MB nobody reads: the client gets its 401 while still sending, then the connection
    is dropped (a reset, once the lingering close has read its share)."""
    raw = sized("wrong-key", b"{" + b" " * (8 << 20))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
        sender = threading.Thread(target=_send_quietly, args=(conn, raw), daemon=True)
        sender.start()
        answer = b""
        try:
            while not _complete(answer) and (piece := conn.recv(65536)):
                answer += piece
        except ConnectionResetError:
            pass
        sender.join(10)
    code, body, _ = envelope(answer)
    assert code == 401 and body["error"]["type"] == "authentication_error"


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass  # the gateway stopped reading: expected


def test_clients_sending_bodies_without_a_key_do_not_stall_the_others(gateway):
    """Four connections that keep sending large bodies without a key, as fast as they can,
    while a real client works: it is served, and the gateway stays healthy."""
    stop = threading.Event()

    def blast() -> None:
        body = b"{" + b" " * (4 << 20)
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as conn:
                    conn.sendall(sized(None, body) * 4)
            except OSError:
                pass

    blasters = [threading.Thread(target=blast, daemon=True) for _ in range(4)]
    for thread in blasters:
        thread.start()
    try:
        time.sleep(0.5)
        for _ in range(5):
            served(gateway)
    finally:
        stop.set()
        for thread in blasters:
            thread.join(10)


def test_a_stalled_upload_times_out_and_holds_no_key_slot(gateway):
    """The key 'single' may have one request in flight: a body that stops arriving must
    neither keep that slot nor the connection."""
    body = json.dumps(BODY).encode()
    head = post(KEYS["single"], b"", f"Content-Length: {len(body)}\r\n")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as stalled:
        stalled.sendall(head + body[:10])  # and nothing more
        served(gateway, KEYS["single"])  # the slot is free while the upload stalls
        stalled.settimeout(5)
        answer = b""
        while piece := stalled.recv(65536):
            answer += piece
    code, error, _ = envelope(answer)
    assert code == 408 and "did not arrive within 1 s" in error["error"]["message"]


# --- hang-ups -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_while_the_backend_thinks_ends_the_backend_request(
    gateway, module_backend, stream
):
    before, seen = module_backend.closed_by_client, len(module_backend.requests)
    module_backend.reply(HoldReply(60))
    body = json.dumps({**BODY, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as conn:
        conn.sendall(sized(KEYS["single"], body))
        eventually(lambda: len(module_backend.requests) > seen, "the backend thinking about it")
    assert module_backend.wait_closed(before + 1, timeout=30)  # not after read_timeout (600 s)
    served(gateway, KEYS["single"])  # and its key slot is back
    lines = [e for e in gateway.access_lines() if e.get("status") == 499]
    assert lines and lines[-1]["client_disconnected"] is True


# --- the gateway's own limits ---------------------------------------------------------------------


def test_the_gateways_429_carries_the_rate_headers(gateway):
    with anthropic.Anthropic(base_url=gateway.url, api_key=RATED, max_retries=0) as client:
        for _ in range(2):
            client.messages.create(**BODY)
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.create(**BODY)
    headers = caught.value.response.headers
    assert headers["anthropic-ratelimit-requests-limit"] == "2"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert int(headers["retry-after"]) >= 1


# --- afterwards -----------------------------------------------------------------------------------


def test_afterwards_nothing_is_held_and_the_next_client_is_served(gateway):
    served(gateway)
    now = status(gateway)
    assert {k: v["in_flight"] for k, v in now["keys"].items()} == {
        "alice": 0,
        "single": 0,
        "rated": 0,
    }
    assert all(b["in_flight"] == 0 and not b["probing"] for b in now["backends"].values())
