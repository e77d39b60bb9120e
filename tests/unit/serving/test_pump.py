"""app.serving.pump.Pump: a backend body read in a thread of its own, handed over in order,
and stopped on demand even while its read is blocked or its queue is full."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

from app.serving.pump import DEPTH, END, Pump


def test_pieces_are_handed_over_in_order_then_the_end() -> None:
    pump = Pump(iter([b"a", b"b", b"c"]), lambda: None)
    got = [pump.get(1.0) for _ in range(4)]
    assert got == [b"a", b"b", b"c", END]
    assert pump.done
    pump.close()


def test_an_error_of_the_iteration_is_handed_over_and_ends_it() -> None:
    def pieces() -> Iterator[bytes]:
        yield b"a"
        raise ConnectionResetError("backend gone")

    pump = Pump(pieces(), lambda: None)
    assert pump.get(1.0) == b"a"
    error = pump.get(1.0)
    assert isinstance(error, ConnectionResetError) and pump.done
    pump.close()


def test_nothing_within_the_timeout_is_none() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        pump = Pump(iter(lambda: ours.recv(100), b""), lambda: ours.shutdown(socket.SHUT_RD))
        assert pump.get(0.05) is None
        theirs.sendall(b"late")
        assert pump.get(1.0) == b"late"
        pump.close()
        assert not pump.thread.is_alive()


def test_close_interrupts_a_read_blocked_on_a_silent_backend() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        pump = Pump(iter(lambda: ours.recv(100), b""), lambda: ours.shutdown(socket.SHUT_RD))
        assert pump.get(0.05) is None  # the read is blocked now
        pump.close(wait=2.0)
        assert not pump.thread.is_alive()


def test_close_frees_a_pump_blocked_on_a_full_queue() -> None:
    produced = threading.Event()

    def endless() -> Iterator[bytes]:
        while True:
            produced.set()
            yield b"x"

    pump = Pump(endless(), lambda: None)
    assert produced.wait(1.0)
    while pump.queue.qsize() < DEPTH:  # the relay reads nothing: the queue fills up
        threading.Event().wait(0.01)
    pump.close(wait=2.0)
    assert not pump.thread.is_alive()
