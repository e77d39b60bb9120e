"""The worker class's own piece, alone: the collector tuning. The worker under real gunicorn
is covered in test_gunicorn.py."""

from __future__ import annotations

import gc

from app.serving.worker import GC_THRESHOLDS, tune_gc


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
