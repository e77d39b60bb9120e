"""gunicorn's gevent worker, with the garbage collector tuned for a long-lived heap.

Everything else is the stock ``GeventWorker``: gunicorn's own request loop, keep-alive and
shutdown. The module imports nothing of the app, because gunicorn loads worker classes in the
master.
"""

from __future__ import annotations

import gc

from gunicorn.workers.ggevent import GeventWorker

# Young objects collected after this many net allocations (CPython's default is 700), and the
# older generations less often. See tune_gc.
GC_THRESHOLDS = (20_000, 50, 100)


def tune_gc() -> None:
    """Collect what loading the app left behind, then move every object alive now (modules,
    the app, its config and tables) out of the collector's sight, and collect less often.

    A worker holding hundreds of open streams has a large heap of objects that live for the
    whole request, and each of CPython's collections of the older generations walks all of it:
    profiled under 500 streams arriving at once, the collector was a tenth of the worker's CPU.
    Cycles are still collected; only the frozen startup objects are never scanned again.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class GatewayWorker(GeventWorker):
    def load_wsgi(self) -> None:
        super().load_wsgi()
        tune_gc()  # in the worker, after the fork and the app's import
