"""The API's objects: a ``MessageBatch``, a page of them, and the result lines."""

from __future__ import annotations

import datetime
from typing import Any

from app import jsonc
from app.state.batch_queue import CANCELED, ENDED, EXPIRED, BatchRecord

RESULTS_PATH = "/v1/messages/batches/{id}/results"


def rfc3339(moment: float | None) -> str | None:
    if moment is None:
        return None
    stamp = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_batch(record: BatchRecord, public_url: str) -> dict[str, Any]:
    """Anthropic's ``MessageBatch``: every item ``processing`` until the batch ends, then each
    in its result, so the counts always add up to the batch's size. ``results_url`` from the
    configured public address or relative (the SDK joins it to its own base URL): never from
    the request's Host header, since the SDK sends the client's key wherever it points."""
    ended = record.status == ENDED
    counts = {
        "processing": 0 if ended else record.total,
        "succeeded": record.succeeded if ended else 0,
        "errored": record.errored if ended else 0,
        "canceled": record.canceled if ended else 0,
        "expired": record.expired if ended else 0,
    }
    results = None
    if ended and record.archived_at is None:
        results = public_url.rstrip("/") + RESULTS_PATH.format(id=record.id)
    return {
        "id": record.id,
        "type": "message_batch",
        "processing_status": record.status,
        "request_counts": counts,
        "ended_at": rfc3339(record.ended_at),
        "created_at": rfc3339(record.created_at),
        "expires_at": rfc3339(record.expires_at),
        "archived_at": rfc3339(record.archived_at),
        "cancel_initiated_at": rfc3339(record.cancel_initiated_at),
        "results_url": results,
    }


def page(records: list[BatchRecord], has_more: bool, public_url: str) -> dict[str, Any]:
    data = [message_batch(record, public_url) for record in records]
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def deleted(batch_id: str) -> dict[str, str]:
    return {"id": batch_id, "type": "message_batch_deleted"}


def succeeded_line(custom_id: str, message: Any) -> bytes:
    return jsonc.dumps(
        {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}
    )


def errored_line(custom_id: str, error: Any) -> bytes:
    """``error``: the envelope the request got (``{"type": "error", "error", "request_id"}``)."""
    return jsonc.dumps({"custom_id": custom_id, "result": {"type": "errored", "error": error}})


def unfinished_line(custom_id: str, kind: str) -> bytes:
    assert kind in (CANCELED, EXPIRED)
    return jsonc.dumps({"custom_id": custom_id, "result": {"type": kind}})


def lost_line(custom_id: str) -> bytes:
    """A done item whose result file is gone (the storage lost it): still one line for it."""
    error = {"type": "error", "error": {"type": "api_error", "message": "the result was lost"}}
    return errored_line(custom_id, error)
