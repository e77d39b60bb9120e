"""The console's Batches page: every key's message batches, newest first, with their live
progress (what ``python -m app.batches`` shows), and a cancel button for those still running.

Cancel goes through the same service as the API's (app/batches/service.py) and is written to
the audit log; the page reads one page of records from the store, nothing per item.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, g, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from app.batches.service import Batches, Viewer
from app.console import keyring
from app.console.guard import secure
from app.console.sessions import who
from app.errors import GatewayError
from app.state.batch_queue import BatchRecord

ADMIN = Viewer(None)
SHOWN = 100  # batches on the page


def add_batch_routes(bp: Blueprint, batches: Batches) -> None:
    @bp.get("/batches")
    def batches_page() -> str:
        key = request.args.get("key", "").strip() or None
        try:
            found = batches.store.run(lambda s: s.batch_list(key, SHOWN, None, None))
            rows, problem = [_row(record) for record in found.records], ""
        except GatewayError as exc:
            rows, problem = [], exc.message
        return render_template(
            "console/batches.html",
            page="batches",
            rows=rows,
            key=key or "",
            problem=problem,
            now=time.time(),
        )

    @bp.post("/batches/cancel")
    def cancel_batch() -> BaseResponse:
        batch_id = request.form.get("id", "")
        try:
            record = batches.cancel(batch_id, ADMIN)
        except GatewayError as exc:
            return _refused(exc.message, exc.status)
        keyring.audit(
            batches.store, who(g.console_session), "cancel batch", record.owner, {"batch": batch_id}
        )
        return redirect(url_for("console.batches_page"), code=303)


def _row(record: BatchRecord) -> dict[str, Any]:
    done = record.done
    return {
        "id": record.id,
        "key": record.owner,
        "status": record.status,
        "total": record.total,
        "done": done,
        "succeeded": record.succeeded,
        "errored": record.errored,
        "canceled": record.canceled,
        "expired": record.expired,
        "running": record.running,
        "percent": round(100 * done / record.total) if record.total else 100,
        "created": int(record.created_at),
        "expires": int(record.expires_at),
        "ended": int(record.ended_at) if record.ended_at is not None else None,
        "cancelable": record.status == "in_progress",
    }


def _refused(message: str, status: int) -> BaseResponse:
    page = Response(message + "\n", status=status, mimetype="text/plain")
    return secure(page, private=True)
