"""Message threads (the ``message-threads-2026-08-12`` beta), kept by the gateway itself: the
backends never see a ``thread`` field, only whole conversations.

A turn with ``thread: {"type": "create"}`` is served as it is, and its conversation (system,
tools, messages and the reply) is kept under the reply's ``id``. A turn with ``{"type":
"continue", "previous_message_id": id}`` sends only its new messages, and no ``system`` or
``tools`` (the thread keeps those): the gateway claims the stored conversation, sends the
backend all of it followed by the new messages, and keeps the longer one under the new
reply's ``id``. The store is the service's (app/state), so any worker or host continues any
thread.

Rejections carry ``error.details.error_code``, which the SDK acts on (its lib/threads): a
thread that is not there (expired, never kept, another key's) is ``thread_not_found``; one
continued already is ``thread_already_continued``; one being continued right now is
``thread_continue_in_flight``; each makes the SDK replay the whole history under a new
thread. A request the gateway cannot thread (threads disabled, a conversation over
``threads.max_bytes``) is ``thread_unsupported_request`` with its ``unsupported`` list, on which
the tool runner carries on without a thread.
"""

from __future__ import annotations

from typing import Any

from app import jsonc
from app.config import ThreadSettings
from app.errors import GatewayError, InvalidRequest, NotFound, field_error
from app.state.guard import GuardedStore
from app.state.store import (
    THREAD_ALREADY_CONTINUED,
    THREAD_FOUND,
    THREAD_IN_FLIGHT,
    THREAD_NOT_FOUND,
)
from app.translate.anthropic_types import ErrorEvent

CREATE_ONLY_FIELDS = ("system", "tools")
# A continue's claim keeps other continues of the thread out this long at most, in case the
# worker holding it dies (a normal end releases it at once).
CLAIM_SECONDS = 900.0


class ThreadRejected(GatewayError):
    """A thread the SDK must replay or give up: ``error.details.error_code`` says which."""

    def __init__(self, code: str, message: str, status: int, **details: Any) -> None:
        super().__init__(message, status=status, should_retry=False)
        self.details = {"error_code": code, **details}
        self.error_type = NotFound.error_type if status == 404 else InvalidRequest.error_type

    def payload(self, request_id: str | None = None) -> ErrorEvent:
        body = super().payload(request_id)
        body["error"]["details"] = self.details
        return body


class ThreadTurn:
    """One threaded turn, from its claim on the store to its conversation kept (or its claim
    given back): exactly one of ``succeeded`` and ``failed`` takes effect."""

    __slots__ = ("kind", "previous_id", "owner", "store", "settings", "conversation", "done")

    def __init__(
        self,
        kind: str,
        previous_id: str | None,
        owner: str,
        store: GuardedStore,
        settings: ThreadSettings,
        conversation: dict[str, Any],
    ) -> None:
        self.kind = kind  # "create" or "continue"
        self.previous_id = previous_id
        self.owner = owner
        self.store = store
        self.settings = settings
        self.conversation = conversation  # system, tools and messages as sent to the backend
        self.done = False

    def succeeded(self, message: dict[str, Any]) -> None:
        """The reply ``message`` is complete: keep the conversation it ends under its id."""
        if self.done:
            return
        self.done = True
        reply_id = message.get("id")
        if not isinstance(reply_id, str) or not reply_id:
            return self._release()
        reply = {"role": "assistant", "content": message.get("content") or []}
        conversation = {**self.conversation}
        conversation["messages"] = [*conversation["messages"], reply]
        data = jsonc.dumps(conversation)
        ttl = self.settings.ttl
        if len(data) > self.settings.max_bytes:
            return self._release()  # the next continue finds nothing, and the SDK replays
        if self.previous_id is None:
            self.store.put_thread(reply_id, self.owner, data, ttl)
        else:
            self.store.finish_thread(self.previous_id, reply_id, self.owner, data, ttl)

    def failed(self) -> None:
        """No complete reply: a continued thread may be continued again."""
        if not self.done:
            self.done = True
            self._release()

    def _release(self) -> None:
        if self.previous_id is not None:
            self.store.release_thread(self.previous_id)


def begin_turn(
    body: dict[str, Any], owner: str, store: GuardedStore, settings: ThreadSettings
) -> ThreadTurn | None:
    """Take ``thread`` out of ``body``; for a continue, put the stored conversation in front of
    the new messages (in place). None for a request that is not threaded."""
    if "thread" not in body:
        return None
    thread = body.pop("thread")
    if thread is None:
        return None
    kind, previous_id = _parse(thread)
    if not settings.enabled:
        raise _unsupported("this gateway does not keep message threads", ["thread"])
    if kind == "create":
        turn = ThreadTurn(kind, None, owner, store, settings, _conversation_of(body))
        _check_size(turn.conversation, settings)
        return turn
    for field in CREATE_ONLY_FIELDS:
        if field in body:
            raise field_error(
                field,
                f"cannot be sent when continuing a thread: the thread keeps the {field} it was "
                "created with",
            )
    assert previous_id is not None
    stored = _claim(store, previous_id, owner)
    turn = ThreadTurn(kind, previous_id, owner, store, settings, stored)
    try:
        new_messages = body.get("messages")
        if not isinstance(new_messages, list):
            raise field_error("messages", "must be an array of messages")
        stored["messages"] = [*stored["messages"], *new_messages]
        _check_size(stored, settings)
    except BaseException:
        turn.failed()
        raise
    for field in CREATE_ONLY_FIELDS:
        if field in stored:
            body[field] = stored[field]
    body["messages"] = stored["messages"]
    return turn


def _parse(thread: Any) -> tuple[str, str | None]:
    if not isinstance(thread, dict):
        raise field_error("thread", "must be an object")
    kind = thread.get("type")
    if kind == "create":
        return kind, None
    if kind != "continue":
        raise field_error("thread.type", "must be create or continue")
    previous = thread.get("previous_message_id")
    if not isinstance(previous, str) or not previous or len(previous) > 200:
        raise field_error("thread.previous_message_id", "must be the id of an earlier reply")
    return kind, previous


def _conversation_of(body: dict[str, Any]) -> dict[str, Any]:
    conversation = {field: body[field] for field in CREATE_ONLY_FIELDS if field in body}
    messages = body.get("messages")
    conversation["messages"] = list(messages) if isinstance(messages, list) else []
    return conversation


def _claim(store: GuardedStore, previous_id: str, owner: str) -> dict[str, Any]:
    status, data = store.claim_thread(previous_id, owner, CLAIM_SECONDS)
    if status == THREAD_FOUND and data is not None:
        try:
            stored = jsonc.loads(data)
        except jsonc.JSONDecodeError:
            stored = None
        if isinstance(stored, dict) and isinstance(stored.get("messages"), list):
            return stored
        store.release_thread(previous_id)
        status = THREAD_NOT_FOUND
    if status == THREAD_ALREADY_CONTINUED:
        raise ThreadRejected(
            status, f"thread {previous_id} has been continued already; send the full history", 409
        )
    if status == THREAD_IN_FLIGHT:
        raise ThreadRejected(
            status, f"thread {previous_id} is being continued by another request right now", 409
        )
    raise ThreadRejected(
        THREAD_NOT_FOUND,
        f"no thread {previous_id}: it expired, was never kept, or belongs to another key; "
        "send the full history",
        404,
    )


def _check_size(conversation: dict[str, Any], settings: ThreadSettings) -> None:
    size = len(jsonc.dumps(conversation))
    if size > settings.max_bytes:
        raise _unsupported(
            f"the conversation ({size:,} bytes) is larger than the gateway keeps in a thread "
            f"({settings.max_bytes:,} bytes); send it without a thread",
            ["thread_size"],
        )


def _unsupported(message: str, unsupported: list[str]) -> ThreadRejected:
    return ThreadRejected("thread_unsupported_request", message, 400, unsupported=unsupported)
