"""Worker shutdown: streams in flight may finish during the drain time, then end with an SSE
``error`` event instead of a cut connection.

gunicorn gives a stopping (or reloaded) worker ``graceful_timeout`` seconds, after which the
master kills it outright. A few seconds before that, every stream still open is woken and told
to end cleanly. gunicorn.conf.py installs the SIGTERM hook in each worker.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("gateway")

DRAIN = object()  # put into a stream's queue: end now, the worker is going away
MARGIN = 3.0  # seconds before the master's kill to end the remaining streams

_streams: set[Any] = set()
_lock = threading.Lock()
_draining = False


def register(queue: Any) -> None:
    with _lock:
        _streams.add(queue)
        late = _draining
    if late:
        queue.put(DRAIN)


def unregister(queue: Any) -> None:
    with _lock:
        _streams.discard(queue)


def drain_now() -> None:
    """Tell every open stream to end (and any that opens from now on)."""
    global _draining
    with _lock:
        _draining = True
        queues = list(_streams)
    if queues:
        log.warning("worker drain time is over: ending %d open stream(s)", len(queues))
    for queue in queues:
        queue.put(DRAIN)


def install(worker: Any) -> None:
    """Wrap a gevent worker's SIGTERM handler: start the drain clock when it is told to go.

    The handler runs inside gevent's event loop, where nothing may block: it only schedules.
    """
    import gevent

    original = worker.handle_exit
    window = max(float(worker.cfg.graceful_timeout) - MARGIN, 0.5)

    def on_term(signum: int, frame: Any) -> None:
        original(signum, frame)
        gevent.spawn_later(window, drain_now)

    signal.signal(signal.SIGTERM, on_term)
