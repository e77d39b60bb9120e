"""The worker class's own pieces, alone: the client socket's writes and head holding, the
collector tuning, and gunicorn's error pages as envelopes. Their effect under real gunicorn is
covered in test_gunicorn.py and test_hostile_clients.py."""

from __future__ import annotations

import gc
import json
import socket
import threading

import pytest
from gunicorn import util

from app.serving.worker import GC_THRESHOLDS, ClientSocket, _as_envelope, tune_gc

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    theirs.settimeout(2)
    yield ClientSocket(ours), theirs
    ours.close()
    theirs.close()


def received(sock: socket.socket) -> list[bytes]:
    """Each recv() as the peer saw it; a head sent alone would be a piece of its own."""
    sock.setblocking(False)
    pieces = []
    while True:
        try:
            piece = sock.recv(65536)
        except BlockingIOError:
            return pieces
        pieces.append(piece)


def test_a_held_head_leaves_with_the_first_body_bytes(pair):
    client, peer = pair
    client.hold_head = True
    client.sendall(HEAD)
    assert received(peer) == []
    client.sendall(b"ok")
    assert received(peer) == [HEAD + b"ok"]


def test_a_held_head_with_no_body_goes_out_on_flush(pair):
    client, peer = pair
    client.hold_head = True
    client.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    client.flush()
    assert received(peer) == [b"HTTP/1.1 204 No Content\r\n\r\n"]


def test_100_continue_is_never_held(pair):
    client, peer = pair
    client.hold_head = True
    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert received(peer) == [b"HTTP/1.1 100 Continue\r\n\r\n"]


def test_without_hold_head_every_write_goes_out_at_once(pair):
    client, peer = pair
    client.sendall(HEAD)
    assert received(peer) == [HEAD]


def test_a_write_larger_than_the_send_buffer_arrives_whole(pair):
    client, peer = pair
    data = bytes(range(256)) * 40_000  # 10 MB: many partial sends
    got = bytearray()

    def read() -> None:
        peer.setblocking(True)
        while len(got) < len(data):
            got.extend(peer.recv(1 << 20))

    reader = threading.Thread(target=read)
    reader.start()
    client.sendall(data)
    reader.join(10)
    assert bytes(got) == data


def test_everything_else_is_the_sockets_own(pair):
    client, _ = pair
    assert client.fileno() == client.sock.fileno()
    assert client.getsockname() == client.sock.getsockname()


def test_gunicorns_error_page_becomes_an_anthropic_envelope(pair):
    client, peer = pair
    util.write_error(client, 431, "Request Header Fields Too Large", "Error parsing headers: 'x'")
    page = b"".join(received(peer))
    assert b"Content-Type: text/html" in page  # gunicorn's page as it wrote it
    head, _, body = _as_envelope(page).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert json.loads(body) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Error parsing headers: 'x'"},
    }


def test_tune_gc_freezes_the_startup_heap_and_raises_the_thresholds():
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
        assert GC_THRESHOLDS[0] > 700  # CPython's default, which the tuning exists to raise
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
