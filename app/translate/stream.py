"""OpenAI chat-completion chunks -> the Anthropic stream event grammar, as a state machine.

    message_start (content_block_start ping? content_block_delta* content_block_stop)*
    message_delta message_stop

Feed each parsed backend chunk; get back the Anthropic events it completes. Block indexes are
the gateway's own (0, 1, 2… in start order), never the backend's tool-call ``index``: clients
look blocks up by position. Tool calls are buffered per call and emitted whole once complete,
so that interleaved fragments never leave two blocks open and the joined ``partial_json`` is
always valid JSON.
"""

from __future__ import annotations

from typing import Any

from app import ids, jsonc
from app.errors import GatewayError, UpstreamError
from app.translate.response import (
    map_stop_reason,
    map_usage,
    parse_arguments,
    reasoning_text,
    tool_use_id,
)
from app.translate.think_tags import ThinkTagSplitter
from app.translate.upstream_errors import error_from_body

Event = dict[str, Any]
PING: Event = {"type": "ping"}


class _ToolCall:
    __slots__ = ("id", "name", "arguments")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name = ""
        self.arguments: list[str] = []


TRUNCATED = "backend stream ended before the answer was complete"


class Ending:
    """How a relayed stream ends in error: one ``error`` event, then nothing more."""

    ended = False
    error_type: str | None = None
    error: GatewayError | None = None  # what ended the stream, when something did

    def fail(self, error: GatewayError) -> list[Event]:
        """An in-band error event; it ends the stream (no message_stop follows)."""
        if self.ended:
            return []
        self.ended = True
        self.error_type = error.error_type
        self.error = error
        return [error.payload()]


class StreamTranslator(Ending):
    """One translator per response; not reusable."""

    def __init__(
        self,
        *,
        model: str,
        message_id: str,
        stop_sequences: list[str],
        input_tokens: int = 0,
        think_tags: bool = False,
    ) -> None:
        self.model = model
        self._think_tags = ThinkTagSplitter() if think_tags else None
        self.message_id = message_id
        self.stop_sequences = stop_sequences
        self.input_tokens = input_tokens
        self.finish_reason: str | None = None
        self.matched_stop: Any = None
        self.usage: dict[str, Any] | None = None
        self.stop_reason: str | None = None
        self.output_chars = 0
        self.refused = False
        self._next_index = 0
        self._open: str | None = None  # "text" | "thinking" while a block is open
        self._tools: dict[int, _ToolCall] = {}
        self._tool_ids: set[str] = set()
        self._pinged = False

    # --- public ---------------------------------------------------------------------------

    def start(self) -> list[Event]:
        usage = {
            "input_tokens": self.input_tokens,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return [{"type": "message_start", "message": message}]

    def feed_data(self, data: bytes) -> list[Event]:
        """One ``data:`` payload (not ``[DONE]``): parse it and translate."""
        if self.ended:
            return []
        try:
            chunk = jsonc.loads(data)
        except jsonc.JSONDecodeError:
            return self.fail(UpstreamError("backend sent malformed stream data"))
        if not isinstance(chunk, dict):
            return self.fail(UpstreamError("backend sent malformed stream data"))
        return self.feed(chunk)

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if self.ended:
            return []
        if "error" in chunk or chunk.get("object") == "error":
            return self.fail(error_from_body(chunk))
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        choices = chunk.get("choices")
        if not choices:
            return []  # the usage chunk (choices: []) and keep-alive objects
        choice = choices[0]
        events: list[Event] = []
        delta = choice.get("delta")
        if delta:
            self._apply_delta(delta, events)
        finish = choice.get("finish_reason")
        if finish:
            if finish == "error":
                return events + self.fail(error_from_body(chunk))
            self.finish_reason = finish
            self.matched_stop = choice.get("stop_reason")
        return events

    def finish(self, *, saw_done: bool) -> list[Event]:
        """Close the message at ``[DONE]`` or at end of body.

        A body that ends with neither ``[DONE]`` nor a finish reason was cut short: report an
        error rather than pretend the answer was complete.
        """
        if self.ended:
            return []
        if not saw_done and self.finish_reason is None:
            return self.fail(UpstreamError(TRUNCATED))
        events: list[Event] = []
        if self._think_tags is not None:
            self._append_segments(self._think_tags.flush(), events)
        events.extend(self._flush_tools())
        self._close_block(events)
        stop_reason, stop_sequence = map_stop_reason(
            self.finish_reason,
            bool(self._tool_ids),
            self.matched_stop,
            self.stop_sequences,
            refused=self.refused,
        )
        self.stop_reason = stop_reason
        usage = map_usage(self.usage, estimate_output=(self.output_chars + 3) // 4)
        if self.usage is None:
            usage["input_tokens"] = self.input_tokens
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": usage,
            }
        )
        events.append({"type": "message_stop"})
        self.ended = True
        return events

    @property
    def final_usage(self) -> dict[str, int]:
        return map_usage(self.usage, estimate_output=(self.output_chars + 3) // 4)

    # --- deltas -------------------------------------------------------------------------------

    def _apply_delta(self, delta: dict[str, Any], events: list[Event]) -> None:
        reasoning = reasoning_text(delta)
        if reasoning:
            self._append("thinking", "thinking_delta", "thinking", reasoning, events)
        content = delta.get("content")
        if content and isinstance(content, str):
            if self._think_tags is None:
                self._append("text", "text_delta", "text", content, events)
            else:
                self._append_segments(self._think_tags.feed(content), events)
        refusal = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            self.refused = True
            self._append("text", "text_delta", "text", refusal, events)
        calls = delta.get("tool_calls")
        if not calls and isinstance(delta.get("function_call"), dict):  # legacy single call
            calls = [{"index": 0, "function": delta["function_call"]}]
        if calls:
            for fragment in calls:
                if isinstance(fragment, dict):
                    self._tool_fragment(fragment)

    def _append(
        self, kind: str, delta_type: str, field: str, text: str, events: list[Event]
    ) -> None:
        if self._open != kind:
            events.extend(self._flush_tools())
            self._close_block(events)
            self._open_block(kind, events)
        self.output_chars += len(text)
        events.append(
            {
                "type": "content_block_delta",
                "index": self._next_index - 1,
                "delta": {"type": delta_type, field: text},
            }
        )

    def _append_segments(self, segments: list[tuple[str, str]], events: list[Event]) -> None:
        for kind, text in segments:
            if kind == "thinking":
                self._append("thinking", "thinking_delta", "thinking", text, events)
            else:
                self._append("text", "text_delta", "text", text, events)

    def _open_block(self, kind: str, events: list[Event]) -> None:
        block: dict[str, Any] = (
            {"type": "text", "text": ""}
            if kind == "text"
            else {"type": "thinking", "thinking": "", "signature": ""}
        )
        events.append(
            {"type": "content_block_start", "index": self._next_index, "content_block": block}
        )
        self._next_index += 1
        self._open = kind
        if not self._pinged:
            self._pinged = True
            events.append(PING)

    def _close_block(self, events: list[Event]) -> None:
        if self._open is None:
            return
        index = self._next_index - 1
        if self._open == "thinking":
            events.append(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "signature_delta", "signature": ids.thinking_signature()},
                }
            )
        events.append({"type": "content_block_stop", "index": index})
        self._open = None

    # --- tool calls ---------------------------------------------------------------------------

    def _tool_fragment(self, fragment: dict[str, Any]) -> None:
        """Accumulate one fragment. Calls are emitted at the end of the run of tool-call
        fragments (finish, or other content), because some servers interleave calls."""
        index = fragment.get("index")
        if not isinstance(index, int):
            index = self._index_for(fragment.get("id"))
        call = self._tools.get(index)
        if call is None:
            call = self._tools[index] = _ToolCall()
        if fragment.get("id") and call.id is None:
            call.id = fragment["id"]
        function = fragment.get("function") or {}
        if function.get("name") and not call.name:
            call.name = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = jsonc.dumps_str(arguments)
        if arguments:
            call.arguments.append(arguments)

    def _index_for(self, call_id: Any) -> int:
        """Backends that omit ``index``: correlate by id, else continue the latest call."""
        for index, call in self._tools.items():
            if call_id and call.id == call_id:
                return index
        if call_id or not self._tools:
            return max(self._tools, default=-1) + 1
        return max(self._tools)

    def _flush_tools(self) -> list[Event]:
        if not self._tools:
            return []
        events: list[Event] = []
        self._close_block(events)
        for index in sorted(self._tools):
            call = self._tools[index]
            block_index = self._next_index
            self._next_index += 1
            arguments = jsonc.dumps_str(parse_arguments("".join(call.arguments)))
            self.output_chars += len(arguments)
            block = {
                "type": "tool_use",
                "id": tool_use_id(call.id, self._tool_ids),
                "name": call.name,
                "input": {},
            }
            events.append(
                {"type": "content_block_start", "index": block_index, "content_block": block}
            )
            events.append(
                {
                    "type": "content_block_delta",
                    "index": block_index,
                    "delta": {"type": "input_json_delta", "partial_json": arguments},
                }
            )
            events.append({"type": "content_block_stop", "index": block_index})
        self._tools.clear()
        return events


def message_events(message: dict[str, Any]) -> list[Event]:
    """A complete message as the events a streamed answer would have sent.

    For backends that answer a streaming request with one JSON body (some servers ignore
    ``stream`` for tool calls): the client asked for a stream and gets a well-formed one.
    """
    usage = message.get("usage") or {}
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 0},
    }
    events: list[Event] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message.get("content") or ()):
        events.extend(_block_events(index, block))
    delta = {
        "stop_reason": message.get("stop_reason"),
        "stop_sequence": message.get("stop_sequence"),
    }
    events.append({"type": "message_delta", "delta": delta, "usage": usage})
    events.append({"type": "message_stop"})
    return events


def _block_events(index: int, block: dict[str, Any]) -> list[Event]:
    kind = block.get("type")
    if kind == "text":
        empty: dict[str, Any] = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": block.get("text", "")}]
    elif kind == "thinking":
        empty = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [
            {"type": "thinking_delta", "thinking": block.get("thinking", "")},
            {"type": "signature_delta", "signature": block.get("signature", "")},
        ]
    elif kind == "tool_use":
        empty = {**block, "input": {}}
        deltas = [
            {"type": "input_json_delta", "partial_json": jsonc.dumps_str(block.get("input", {}))}
        ]
    else:  # blocks a chat backend never produces (redacted thinking, ...): as they are
        return [
            {"type": "content_block_start", "index": index, "content_block": block},
            {"type": "content_block_stop", "index": index},
        ]
    return [
        {"type": "content_block_start", "index": index, "content_block": empty},
        *({"type": "content_block_delta", "index": index, "delta": d} for d in deltas),
        {"type": "content_block_stop", "index": index},
    ]
