"""A bounded soak of one real gunicorn gateway: streams, JSON, count_tokens, clients that hang
up mid-stream or before the backend's first byte, bad input, and a backend that answers 429,
500, cuts streams and thinks for too long, all at once from several clients.

Afterwards every backend slot, key slot, file descriptor and greenlet is back to what it was
before, and the next client is served. CI runs it for a few seconds; a longer run by hand:

    GATEWAY_SOAK_SECONDS=300 ./scripts/test tests/system/test_soak.py -s
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import anthropic
import pytest
import requests
from fakebackend import (
    AutoReply,
    FakeBackend,
    HoldReply,
    JSONReply,
    RawReply,
    Recorded,
    Reply,
    StreamReply,
    chunks,
    error_body,
)
from servers import Gunicorn

SECONDS = float(os.environ.get("GATEWAY_SOAK_SECONDS", "6"))
CLIENTS = 6
ADMIN = "admin-token-soak"
KEY = "sk-gw-soak-0123456789"
BODY = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


class MixedReply(Reply):
    """The backend's answer to each request, drawn at random: mostly good, often not."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.lock = threading.Lock()

    def send(self, handler, request: Recorded) -> None:
        with self.lock:
            draw = self.random.random()
        stream = isinstance(request.json, dict) and request.json.get("stream")
        if draw < 0.55:
            reply: Reply = AutoReply()
        elif draw < 0.65:
            reply = JSONReply(error_body("slow down"), status=429, headers={"Retry-After": "1"})
        elif draw < 0.72:
            reply = JSONReply(error_body("boom", error_type="server_error"), status=500)
        elif draw < 0.80 and stream:
            reply = StreamReply(chunks(["cut", " short", " here"]), cut_after=2)
        elif draw < 0.90 and stream:
            reply = StreamReply(chunks([f"w{i} " for i in range(20)]), delay=0.02)
        elif draw < 0.93:
            reply = HoldReply(2.0)  # thinks; the client may give up first
        elif draw < 0.96:
            reply = RawReply(b"<html>proxy error</html>", headers={"Content-Type": "text/html"})
        else:
            reply = AutoReply()
        reply.send(handler, request)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[tuple[Gunicorn, FakeBackend]]:
    directory = tmp_path_factory.mktemp("soak")
    with FakeBackend() as backend:
        backend.default = MixedReply(seed=20261201)
        config = directory / "gateway.toml"
        config.write_text(
            f"""
[upstream]
url = "{backend.url}"
read_timeout = 1.5
[routing]
retries = 1
backoff = 0.01
[admin]
token = "{ADMIN}"
[[auth.keys]]
name = "soak"
sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"
max_concurrent = 100
"""
        )
        server = Gunicorn({"GATEWAY_CONFIG": str(config)}, directory / "gunicorn.log")
        try:
            yield server, backend
        finally:
            server.stop()


# One kept-alive connection for every reading: a connection per reading would be counted
# among the worker's sockets or not, depending on whether the worker had closed it yet.
STATUS = requests.Session()


def counters(server: Gunicorn, backend_port: int) -> dict:
    status = STATUS.get(server.url + "/status", headers={"x-api-key": ADMIN}, timeout=10).json()
    to_backend, other = sockets(status["worker_pid"], backend_port)
    return {
        "backend_in_flight": {n: b["in_flight"] for n, b in status["backends"].items()},
        "probing": {n: b["probing"] for n, b in status["backends"].items()},
        "key_in_flight": {n: k["in_flight"] for n, k in status["keys"].items()},
        # Kept-alive backend connections are the pool's to keep (checked apart, bounded);
        # the metrics' files open as each metric is first used.
        "client_sockets": other,
        "greenlets": status["process"]["greenlets"],
    }, to_backend


def sockets(pid: int, port: int) -> tuple[int, int]:
    """The worker's sockets: (TCP connections to ``port``, all the others)."""
    inodes = set()
    with open(f"/proc/{pid}/net/tcp") as table:
        rows = table.read().splitlines()[1:]
    for line in rows:
        fields = line.split()
        if int(fields[2].rsplit(":", 1)[1], 16) == port:
            inodes.add(fields[9])
    to_port = other = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while we looked
        if link.startswith("socket:["):
            if link[8:-1] in inodes:
                to_port += 1
            else:
                other += 1
    return to_port, other


def settled(server: Gunicorn, port: int, want: dict | None, seconds: float = 15) -> tuple:
    """The counters once every request has wound down: equal to ``want``, or (without one)
    the same for 3 s (longer than the backend ever holds a request); else the last reading."""
    deadline = time.monotonic() + seconds
    since, last = time.monotonic(), None
    while True:
        now, pooled = counters(server, port)
        if now != last:
            since, last = time.monotonic(), now
        stable = want is None and time.monotonic() - since >= 3
        if now == want or stable or time.monotonic() > deadline:
            return now, pooled
        time.sleep(0.3)


def hang_up_early(server: Gunicorn, stream: bool) -> None:
    """Send a request and leave before (or while) the answer comes."""
    body = json.dumps({**BODY, "stream": stream}).encode()
    head = (
        f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        conn.sendall(head + body)
        time.sleep(random.random() * 0.05)
        if stream:
            conn.recv(200)


def threaded_turns(sdk: anthropic.Anthropic, stream: bool) -> None:
    """A message thread's create and continue (either may meet the backend's faults)."""
    first = sdk.messages.create(**BODY, extra_body={"thread": {"type": "create"}})
    follow = {"thread": {"type": "continue", "previous_message_id": first.id}}
    more = {**BODY, "messages": [{"role": "user", "content": "and?"}]}
    if stream:
        with sdk.messages.stream(**more, extra_body=follow) as events:
            events.get_final_message()
    else:
        sdk.messages.create(**more, extra_body=follow)


def stopped(sdk: anthropic.Anthropic, stream: bool) -> None:
    """Stop sequences: the gateway ends the backend's stream itself when one appears (in the
    paced answer, at "w5"), JSON requests included, which it reads from the backend as a
    stream."""
    request = {**BODY, "stop_sequences": ["w5", "never-seen"]}
    if stream:
        with sdk.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = sdk.messages.create(**request)
    text = "".join(b.text for b in message.content if b.type == "text")
    assert "w5" not in text, text
    assert (message.stop_reason == "stop_sequence") == ("w4" in text), message


def client_loop(server: Gunicorn, seed: int, until: float, tally: Counter, failures: list) -> None:
    rng = random.Random(seed)
    with anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=10) as sdk:
        while time.monotonic() < until:
            action = rng.choice(
                ["json", "json", "stream", "stream", "hangup", "count", "bad", "thread", "stop"]
            )
            try:
                if action == "json":
                    sdk.messages.create(**BODY)
                elif action == "stream":
                    with sdk.messages.stream(**BODY) as events:
                        events.get_final_message()
                elif action == "hangup":
                    hang_up_early(server, stream=rng.random() < 0.5)
                elif action == "thread":
                    threaded_turns(sdk, stream=rng.random() < 0.5)
                elif action == "stop":
                    stopped(sdk, stream=rng.random() < 0.5)
                elif action == "count":
                    sdk.messages.count_tokens(model="m", messages=BODY["messages"])
                else:
                    sdk.messages.create(model="m", max_tokens=-1, messages=BODY["messages"])
                tally[f"{action} ok"] += 1
            except anthropic.APIStatusError as exc:
                tally[f"{action} {exc.status_code}"] += 1
                if "internal" in str(exc):  # the gateway's own failure, not the backend's
                    failures.append(f"{action}: {exc}")
            except (anthropic.APIConnectionError, OSError) as exc:
                tally[f"{action} {type(exc).__name__}"] += 1
            except AssertionError as exc:  # an answer that is not what Anthropic's would be
                failures.append(f"{action}: {exc}")


def test_a_soak_leaves_every_counter_where_it_started(gateway):
    server, backend = gateway
    # Warm: the backend pool, the app's caches, every metric's file (opened on first use).
    until = time.monotonic() + 2
    client_loop(server, 0, until, Counter(), [])
    before, _ = settled(server, backend.port, None)
    tally: Counter = Counter()
    failures: list[str] = []
    until = time.monotonic() + SECONDS
    threads = [
        threading.Thread(target=client_loop, args=(server, n, until, tally, failures))
        for n in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 60)
    after, pooled = settled(server, backend.port, before)
    print(f"\nsoak {SECONDS:g} s, {sum(tally.values())} requests: {dict(sorted(tally.items()))}")
    print(f"counters before: {before}\ncounters after:  {after}")
    assert failures == []
    assert sum(tally.values()) > 20 * SECONDS
    assert after == before
    assert pooled <= CLIENTS + 1  # idle in the pool, not one per request of the run
    # Only the backend's own failures (its 500s, its silence past read_timeout) are 5xx;
    # nothing the gateway did went wrong.
    log = server.log_path.read_text()
    assert "unhandled error" not in log and "Traceback" not in log
    assert {e["status"] for e in server.access_lines() if e.get("status", 0) >= 500} <= {500, 504}
    # The backend behaves again: the very next request is served (retried by nobody; with the
    # mixed replies, four in a row fail about one run in twenty-five).
    backend.default = AutoReply()
    with anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0) as sdk:
        assert sdk.messages.create(**BODY).content
        with sdk.messages.stream(**BODY) as events:
            assert events.get_final_message().content
