"""Relaying an Anthropic-speaking backend's stream: the same interface as StreamTranslator,
but the events are Anthropic's already (pure).

Each event is re-framed from its own ``type`` (so ``event:`` always matches), the model name is
rewritten to the one the client asked for, and usage and the stop reason are read on the way
for the access log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app import ids, jsonc
from app.errors import UpstreamError
from app.translate.anthropic_types import StreamEvent, Usage
from app.translate.redact import redact
from app.translate.stream import TRUNCATED, Ending
from app.translate.upstream_errors import error_from_body

Event = dict[str, Any]  # the backend's own, relayed (its type checked, the rest as it is)
Events = Sequence[Mapping[str, Any]]  # relayed ones, or the gateway's error event


class PassthroughStream(Ending):
    def __init__(self, *, model: str) -> None:
        self.model = model
        self.finish_reason: str | None = None  # set at message_stop
        self.stop_reason: str | None = None
        self._usage: dict[str, Any] = {}

    def start(self) -> list[StreamEvent]:
        return []  # the backend sends its own message_start

    def feed_data(self, data: bytes) -> Events:
        if self.ended:
            return []
        try:
            event = jsonc.loads(data)
        except jsonc.JSONDecodeError:
            return self.fail(UpstreamError("backend sent malformed stream data"))
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return self.fail(UpstreamError("backend sent an event without a type"))
        self._observe(event)
        return [event]

    def _observe(self, event: Event) -> None:
        kind = event["type"]
        if kind == "message_start" and isinstance(event.get("message"), dict):
            event["message"]["model"] = self.model
            event["message"].update(passthrough_id(event["message"]))
            usage = event["message"].get("usage")
            if isinstance(usage, dict):
                usage.update(start_cache_fields(usage))
                self._usage.update(usage)
        elif kind == "message_delta":
            self._usage.update(
                {k: v for k, v in (event.get("usage") or {}).items() if v is not None}
            )
            delta = event.get("delta")
            if isinstance(delta, dict):
                delta.update(passthrough_stop(delta))
                self.stop_reason = delta.get("stop_reason") or self.stop_reason
        elif kind == "message_stop":
            self.finish_reason = "message_stop"
            self.ended = True
        elif kind == "error":
            error = event.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                error["message"] = redact(error["message"])  # relayed: no secrets in it
            self.error_type = (
                error.get("type", "api_error") if isinstance(error, dict) else "api_error"
            )
            self.error = error_from_body(event)
            self.ended = True

    def finish(self, *, saw_done: bool) -> list[StreamEvent]:
        if self.ended:
            return []
        return self.fail(UpstreamError(TRUNCATED))

    @property
    def final_usage(self) -> Usage:
        usage = self._usage
        return {
            "input_tokens": int(usage.get("input_tokens") or 0),
            "output_tokens": int(usage.get("output_tokens") or 0),
            "cache_creation_input_tokens": int(usage.get("cache_creation_input_tokens") or 0),
            "cache_read_input_tokens": int(usage.get("cache_read_input_tokens") or 0),
        }


def passthrough_id(message: dict[str, Any]) -> dict[str, Any]:
    """A message id of Anthropic's form (``msg_…``) for one that has another: vLLM's own
    /v1/messages names its messages ``chatcmpl-…``, and clients may check the prefix."""
    backend_id = message.get("id")
    if isinstance(backend_id, str) and backend_id.startswith("msg_"):
        return {}
    return {"id": ids.message_id()}


CACHE_FIELDS = ("cache_creation_input_tokens", "cache_read_input_tokens")


def start_cache_fields(usage: Mapping[str, Any]) -> dict[str, int]:
    """The cache counts message_start leaves out, as 0 (vLLM's own /v1/messages sends neither
    there). Anthropic's API always sends both, and so does the gateway's translation of chat
    completions; a client that adds them up for the prompt's size (protocol: input +
    cache_creation + cache_read) would add None. 0 keeps vLLM's input_tokens the whole
    prompt, which it is there; the cached part comes in message_delta, whose counts the SDKs
    put over message_start's."""
    return {key: 0 for key in CACHE_FIELDS if usage.get(key) is None}


def passthrough_stop(message: dict[str, Any]) -> dict[str, Any]:
    """A backend that names the stop sequence that fired but calls the stop ``end_turn``
    (llama.cpp's own /v1/messages): the stop reason Anthropic gives, ``stop_sequence``."""
    if message.get("stop_sequence") and message.get("stop_reason") == "end_turn":
        return {"stop_reason": "stop_sequence"}
    return {}
