"""What the serving side can do only in a gevent worker: bound a wait in time, and notice a
client that left while the gateway waits for its backend.

Outside gevent (the in-process test server, where nothing is monkey-patched) both are
no-ops: a blocking read in a real thread cannot be interrupted this way.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator, Mapping
from typing import Any

import gevent
from gevent import monkey

from app.errors import GatewayError


def patched() -> bool:
    return monkey.is_module_patched("socket")


class ClientGone(gevent.GreenletExit):
    """Raised into a request's greenlet when its client hung up before any answer: a
    ``GreenletExit``, so that it passes through every ``except Exception`` on the way (the
    backend call, Flask's handlers), whose ``finally`` blocks close the backend connection
    and give back what the request holds, and gunicorn's gevent worker takes it quietly."""


@contextlib.contextmanager
def deadline(seconds: float, error: GatewayError) -> Iterator[None]:
    """Raise ``error`` if the block takes longer than ``seconds``."""
    if not seconds or not patched():
        yield
        return
    with gevent.Timeout(seconds, error):
        yield


READ = 1  # libev's EV_READ, the event gevent's own sockets watch for


@contextlib.contextmanager
def client_watch(environ: Mapping[str, Any]) -> Iterator[None]:
    """While the block runs (the backend is working, nothing has been sent to the client),
    raise ``ClientGone`` into it as soon as the client's connection closes.

    Behind nginx this is what a client hanging up looks like (nginx closes its connection to
    the gateway); without it, a backend keeps generating for an absent client until its
    answer is complete or ``read_timeout`` runs out. A client that pipelines its next
    request instead is left alone: its connection is readable, but not closed.

    An event-loop watcher on the client's socket does the watching (a few microseconds a
    request); only when it fires does a greenlet look at what arrived.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None or isinstance(sock, ssl.SSLSocket) or not patched():
        yield
        return
    watch = _Watch(sock, gevent.getcurrent())
    try:
        yield
    finally:
        watch.stop()


class _Watch:
    __slots__ = ("sock", "request", "watcher", "active")

    def __init__(self, sock: Any, request: Any) -> None:
        self.sock = sock
        self.request = request
        self.active = True
        self.watcher = gevent.get_hub().loop.io(sock.fileno(), READ)
        self.watcher.start(self._readable)

    def _readable(self) -> None:
        self.watcher.stop()  # one look is enough
        gevent.spawn(self._look)

    def _look(self) -> None:
        try:
            if self.sock.recv(1, socket.MSG_PEEK):
                return  # a pipelined request, not a hang-up
        except (OSError, ValueError):
            pass  # reset or closed under us: gone as well
        if self.active:
            self.request.kill(ClientGone(), block=False)

    def stop(self) -> None:
        self.active = False
        self.watcher.stop()
        self.watcher.close()
