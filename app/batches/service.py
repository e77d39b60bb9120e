"""The batch routes' work, apart from HTTP: who may see a batch, and what each call does.

A batch belongs to the key that created it: any other key gets a 404 for it and never sees it
listed, as if it did not exist. The admin token sees every batch.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from app import ids
from app.batches.envelope import BoundedInput, read_requests
from app.batches.files import BatchFiles
from app.batches.shapes import lost_line, unfinished_line
from app.config import BatchSettings
from app.errors import InvalidRequest, NotFound
from app.serving.green import deadline
from app.state.batch_queue import (
    ENDED,
    EXPIRES_AFTER,
    BatchPage,
    BatchRecord,
)
from app.state.guard import GuardedStore

BATCH_ID = re.compile(r"msgbatch_[0-9A-Za-z]{1,64}")
PAGE_LIMIT = (1, 1000)
DEFAULT_LIMIT = 20
RESULTS_CHUNK = 1000  # items per read of the index and of the store's done set


@dataclass(frozen=True)
class Viewer:
    """Who asks: a key's name, or the admin (``owner`` None), who sees every batch."""

    owner: str | None


class Batches:
    def __init__(
        self,
        settings: BatchSettings,
        store: GuardedStore,
        files: BatchFiles,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.clock = clock

    def create(self, environ: dict[str, Any], owner: str, body_timeout: float) -> BatchRecord:
        """Read the body into the batch's files, then keep the batch in the store: once this
        returns, every item is on disk (synced) and the batch is in the store."""
        source = BoundedInput(environ, self.settings.max_body_bytes)
        now = self.clock()
        batch_id = ids.batch_id(now)
        slow = InvalidRequest(
            f"the request body did not arrive within {body_timeout:g} s",
            status=408,
            should_retry=False,
        )
        with self.files.writing(batch_id) as writer, deadline(body_timeout, slow):
            total = read_requests(source, writer, self.settings.max_requests)
        record = BatchRecord(batch_id, owner, total, now, now + EXPIRES_AFTER)
        try:
            self.store.run(lambda s: s.batch_create(record))
        except BaseException:
            self.files.remove(batch_id)
            raise
        return record

    def get(self, batch_id: str, viewer: Viewer) -> BatchRecord:
        record = None
        if BATCH_ID.fullmatch(batch_id):
            record = self.store.run(lambda s: s.batch_get(batch_id))
        if record is None or (viewer.owner is not None and record.owner != viewer.owner):
            raise NotFound(f"no message batch with id {batch_id!r}")
        return record

    def page(self, viewer: Viewer, args: dict[str, str]) -> BatchPage:
        limit = _limit(args.get("limit"))
        before, after = args.get("before_id"), args.get("after_id")
        if before is not None and after is not None:
            raise InvalidRequest("before_id and after_id cannot be given together")
        return self.store.run(lambda s: s.batch_list(viewer.owner, limit, before, after))

    def cancel(self, batch_id: str, viewer: Viewer) -> BatchRecord:
        self.get(batch_id, viewer)
        now = self.clock()
        record = self.store.run(lambda s: s.batch_cancel(batch_id, now))
        if record is None:
            raise NotFound(f"no message batch with id {batch_id!r}")
        return record

    def delete(self, batch_id: str, viewer: Viewer) -> None:
        record = self.get(batch_id, viewer)
        if record.status != ENDED:
            raise InvalidRequest(
                f"message batch {batch_id} has not ended: cancel it, and delete it once "
                "its processing_status is ended"
            )
        if self.store.run(lambda s: s.batch_delete(batch_id)):
            self.files.remove(batch_id)

    def results(self, batch_id: str, viewer: Viewer) -> Iterator[bytes]:
        """The JSONL results, read as they are sent: a batch's results are never held in
        memory whole. Only once the batch has ended, and until it is archived."""
        record = self.get(batch_id, viewer)
        if record.status != ENDED:
            raise InvalidRequest(
                f"message batch {batch_id} is still {record.status}: its results are ready "
                "once its processing_status is ended"
            )
        if record.archived_at is not None:
            raise NotFound(
                f"the results of message batch {batch_id} were removed 29 days after it was created"
            )
        return self._lines(record)

    def _done(self, batch_id: str, start: int, stop: int) -> list[int]:
        return self.store.run(lambda s: s.batch_done(batch_id, start, stop))

    def _lines(self, record: BatchRecord) -> Iterator[bytes]:
        """Item by item, in the order they were sent: the kept result of each done item, and
        ``canceled`` or ``expired`` for the rest."""
        rest = record.unfinished_kind
        for start in range(0, record.total, RESULTS_CHUNK):
            stop = min(start + RESULTS_CHUNK, record.total)
            done = set(self._done(record.id, start, stop))
            custom_ids = self.files.custom_ids(record.id, start, stop)
            for index, custom_id in zip(range(start, stop), custom_ids, strict=True):
                if index not in done:
                    yield unfinished_line(custom_id, rest) + b"\n"
                    continue
                line = self.files.result(record.id, index)
                yield (line if line is not None else lost_line(custom_id)) + b"\n"


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    low, high = PAGE_LIMIT
    if not low <= limit <= high:
        raise InvalidRequest(f"limit: expected an integer from {low} to {high}")
    return limit
