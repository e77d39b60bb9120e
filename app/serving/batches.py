"""The Message Batches routes (app/batches does the work): ``/v1/messages/batches`` and below,
the beta path (``?beta=true``, the ``message-batches-2024-09-24`` beta header) the same.

Each batch route is a client's (its key) or the admin's (the admin token, which sees every
batch); app.serving.web lets the admin token through on these paths only.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, request

from app import jsonc
from app.batches.service import Batches, Viewer
from app.batches.shapes import deleted, message_batch, page
from app.config import Settings
from app.errors import PermissionDenied
from app.serving.state import Phase, RequestState, current

JSON = "application/json"
BATCHES_PATH = "/v1/messages/batches"


def create_batches_blueprint(settings: Settings, batches: Batches) -> Blueprint:
    bp = Blueprint("batches", __name__)
    public_url = settings.batches.public_url

    @bp.post(BATCHES_PATH)
    def create_batch() -> Response:
        state = _state()
        if state.admin and settings.keys:
            raise PermissionDenied(
                "the admin token lists, reads, cancels and deletes batches; a batch is "
                "created with the client key it runs as"
            )
        record = batches.create(request.environ, state.owner, settings.body_timeout)
        state.advance(Phase.BODY_READ)
        return _json(message_batch(record, public_url))

    @bp.get(BATCHES_PATH)
    def list_batches() -> Response:
        found = batches.page(_viewer(), request.args.to_dict())
        return _json(page(found.records, found.has_more, public_url))

    @bp.get(f"{BATCHES_PATH}/<batch_id>")
    def get_batch(batch_id: str) -> Response:
        return _json(message_batch(batches.get(batch_id, _viewer()), public_url))

    @bp.post(f"{BATCHES_PATH}/<batch_id>/cancel")
    def cancel_batch(batch_id: str) -> Response:
        return _json(message_batch(batches.cancel(batch_id, _viewer()), public_url))

    @bp.delete(f"{BATCHES_PATH}/<batch_id>")
    def delete_batch(batch_id: str) -> Response:
        batches.delete(batch_id, _viewer())
        return _json(deleted(batch_id))

    @bp.get(f"{BATCHES_PATH}/<batch_id>/results")
    def batch_results(batch_id: str) -> Response:
        lines: Iterator[bytes] = batches.results(batch_id, _viewer())
        headers = {"Content-Disposition": f'attachment; filename="{batch_id}.jsonl"'}
        return Response(lines, mimetype="application/x-jsonl", headers=headers)

    return bp


def _state() -> RequestState:
    state = current()
    assert state is not None
    return state


def _viewer() -> Viewer:
    state = _state()
    return Viewer(None if state.admin else state.owner)


def _json(body: object) -> Response:
    return Response(jsonc.dumps(body), mimetype=JSON)
