"""The worker's own pieces, alone: the client socket's head holding, the cached Date header,
the collector tuning and log reopening. Their effect under real gunicorn is covered in
test_gunicorn.py."""

from __future__ import annotations

import gc
import socket

import gevent
import pytest

from app import gunicorn_speedups
from app.serving.worker import GC_THRESHOLDS, CachedHTTPDate, ClientSocket, GatewayWorker, tune_gc

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


def test_date_header_is_formatted_once_per_second(monkeypatch):
    calls = []
    now = [1_700_000_000.2]
    monkeypatch.setattr("app.serving.worker.time.time", lambda: now[0])

    def format_date(timestamp: float) -> str:
        calls.append(timestamp)
        return f"date {timestamp}"

    date = CachedHTTPDate(format_date)
    assert date() == "date 1700000000.2"
    now[0] = 1_700_000_000.9
    assert date() == "date 1700000000.2"
    assert date(1_000_000_000.0) == "date 1000000000.0"  # an explicit time is never cached
    now[0] = 1_700_000_001.0
    assert date() == "date 1700000001.0"
    assert calls == [1_700_000_000.2, 1_000_000_000.0, 1_700_000_001.0]


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


def test_usr1_rebuilds_the_environ_base_after_the_logs_are_reopened():
    events = []

    class Log:
        def reopen_files(self) -> None:
            events.append(("reopened", dict(gunicorn_speedups._bases)))

    worker = object.__new__(GatewayWorker)  # no sockets or app needed for this
    worker.log = Log()
    gunicorn_speedups._bases[1] = (object(), {"wsgi.errors": "old streams"})
    try:
        worker.handle_usr1(10, None)
        gevent.sleep(0.01)
        assert events and events[0][1]  # the old base was still there while reopening
        assert gunicorn_speedups._bases == {}  # and is gone after
    finally:
        gunicorn_speedups.forget_base_environ()
