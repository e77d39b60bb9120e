"""The message a stream of Anthropic events adds up to, as a client's SDK would assemble it:
for the gateway's own record of a streamed reply (a message thread keeps the conversation),
and for a JSON answer the gateway read from the backend as a stream.

Pure: fed the events the gateway sends, in order; ``message`` is the whole reply once
``message_stop`` has gone by, and None for a stream that failed or ended before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.translate.response import parse_arguments


class MessageAccumulator:
    __slots__ = (
        "started",
        "blocks",
        "partial_json",
        "texts",
        "stop_reason",
        "stop_sequence",
        "usage",
        "complete",
        "failed",
    )

    def __init__(self) -> None:
        self.started: dict[str, Any] | None = None
        self.blocks: dict[int, dict[str, Any]] = {}
        self.partial_json: dict[int, list[str]] = {}
        self.texts: dict[int, list[str]] = {}
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage: dict[str, Any] = {}
        self.complete = False
        self.failed = False

    def feed(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Events as sent: the translator's, or an Anthropic-speaking backend's as relayed
        (read as untrusted JSON: a missing or odd field is skipped)."""
        for event in events:
            kind = event.get("type")
            if kind == "content_block_delta":
                self._delta(_index(event), _object(event.get("delta")))
            elif kind == "content_block_start":
                self.blocks[_index(event)] = dict(_object(event.get("content_block")))
            elif kind == "content_block_stop":
                self._close(_index(event))
            elif kind == "message_start":
                self.started = _object(event.get("message"))
            elif kind == "message_delta":
                delta = _object(event.get("delta"))
                self.stop_reason = delta.get("stop_reason") or self.stop_reason
                self.stop_sequence = delta.get("stop_sequence") or self.stop_sequence
                usage = event.get("usage")
                if isinstance(usage, dict):
                    self.usage.update({k: v for k, v in usage.items() if v is not None})
            elif kind == "message_stop":
                self.complete = not self.failed
            elif kind == "error":
                self.failed, self.complete = True, False

    @property
    def message(self) -> dict[str, Any] | None:
        if not self.complete or self.started is None:
            return None
        return {
            **self.started,
            "content": [self.blocks[index] for index in sorted(self.blocks)],
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": {**_object(self.started.get("usage")), **self.usage},
        }

    def _delta(self, index: int, delta: dict[str, Any]) -> None:
        block = self.blocks.get(index)
        if block is None:
            return
        kind = delta.get("type")
        if kind == "text_delta":
            self.texts.setdefault(index, []).append(_text(delta, "text"))
        elif kind == "input_json_delta":
            self.partial_json.setdefault(index, []).append(_text(delta, "partial_json"))
        elif kind == "thinking_delta":
            block["thinking"] = _text(block, "thinking") + _text(delta, "thinking")
        elif kind == "signature_delta":
            block["signature"] = _text(block, "signature") + _text(delta, "signature")
        elif kind == "citations_delta":
            citations = block.setdefault("citations", [])
            if isinstance(citations, list):
                citations.append(delta.get("citation"))

    def _close(self, index: int) -> None:
        block = self.blocks.get(index)
        texts = self.texts.pop(index, None)
        if texts is not None and block is not None:
            block["text"] = _text(block, "text") + "".join(texts)  # joined once: linear
        pieces = self.partial_json.pop(index, None)
        if pieces is None or block is None:
            return
        # As the gateway's JSON answers have it: repaired, or wrapped as _raw_arguments.
        block["input"] = parse_arguments("".join(pieces))


# An Anthropic-speaking backend's events are relayed as they came: a field of the wrong type
# is read as absent, so that keeping the reply never fails the stream.


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _index(event: Mapping[str, Any]) -> int:
    index = event.get("index", 0)
    return index if isinstance(index, int) else 0


def _text(obj: Mapping[str, Any], field: str) -> str:
    value = obj.get(field, "")
    return value if isinstance(value, str) else ""
