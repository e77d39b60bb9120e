"""Worker shutdown: streams in flight may finish during the drain time, then end with an SSE
``error`` event instead of a cut connection.

gunicorn gives a stopping (or reloaded) worker ``graceful_timeout`` seconds, after which the
master kills it outright. A few seconds before that, ``draining`` turns true; every stream still
open sees it within a second (the relay never sleeps longer) and ends cleanly. gunicorn.conf.py
installs the SIGTERM hook in each worker.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger("gateway")

MARGIN = 3.0  # seconds before the master's kill to end the remaining streams
draining = False


def drain_now() -> None:
    """Tell every open stream (and any opened from now on) to end."""
    global draining
    draining = True
    log.warning("worker drain time is over: ending open streams")


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
