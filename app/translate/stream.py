"""OpenAI chat-completion chunks -> the Anthropic stream event grammar, as a state machine.

    message_start (content_block_start ping? content_block_delta* content_block_stop)*
    message_delta message_stop

Feed each parsed backend chunk; get back the Anthropic events it completes. Block indexes are
the gateway's own (0, 1, 2… in start order), never the backend's tool-call ``index``: clients
look blocks up by position.

A tool call's arguments go out as ``input_json_delta`` fragments as the backend sends them
(Claude Code shows the progress), one call at a time: a call whose fragments arrive while
another is still open (servers that interleave calls) is held and sent once the open one is
complete, so two blocks are never open at once. Arguments that do not start as a JSON object
are held to the end and repaired (app.translate.response.parse_arguments).

Text goes through app.translate.text_filter: a repeated prefill is removed, and the first
stop sequence ends the answer there, whatever the backend would have written next.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from app import ids, jsonc
from app.errors import GatewayError, UpstreamError
from app.translate.anthropic_types import (
    BlockDelta,
    ContentBlock,
    Message,
    PingEvent,
    StopReason,
    StreamEvent,
    Usage,
)
from app.translate.backend_shape import (
    delta_of,
    first_choice,
    function_of,
    malformed,
    tool_calls_of,
)
from app.translate.openai_types import Delta, ToolCallFragment
from app.translate.response import (
    context_window_exceeded,
    map_stop_reason,
    map_usage,
    parse_arguments,
    reasoning_text,
    tool_use_id,
)
from app.translate.text_filter import TextFilter
from app.translate.think_tags import ThinkTagSplitter
from app.translate.upstream_errors import error_from_body

Event = StreamEvent
PING: PingEvent = {"type": "ping"}


# What _JsonTail looks at: escapes, quotes, a comma before a closing bracket or at the end,
# and brackets.
_JSON_TOKENS = re.compile(r'\\.|\\\Z|"|,\s*(?=[}\]])|,\s*\Z|[{}\[\]]', re.S)


class _JsonTail:
    """Follows streamed JSON just enough to drop trailing commas (``{"a": 1,}``, which some
    models write) as the arguments stream: outside strings only, so an argument's text is
    never touched. A comma at the end of a piece is held until what follows it is known.
    It also counts brackets, so that whether the object is complete is known without parsing
    it again at every fragment."""

    __slots__ = ("in_string", "escaped", "held", "depth", "closed")

    def __init__(self) -> None:
        self.in_string = False
        self.escaped = False  # the last piece ended, inside a string, with a backslash
        self.held = ""  # a comma and the whitespace after it, outside any string
        self.depth = 0  # brackets open outside strings
        self.closed = False  # the outermost bracket has closed: the value is complete

    def feed(self, piece: str) -> str:
        text, self.held = self.held + piece, ""
        start = 0
        if self.escaped:
            self.escaped, start = False, 1
        out: list[str] = []
        kept = 0
        for match in _JSON_TOKENS.finditer(text, start):
            token = match.group()
            if token == '"':
                self.in_string = not self.in_string
            elif token[0] == "\\":
                self.escaped = len(token) == 1  # a backslash that ends the piece
            elif self.in_string:
                continue
            elif token in "{[":
                self.depth += 1
            elif token in "}]":
                self.depth -= 1
                self.closed = self.depth == 0
            else:
                out.append(text[kept : match.start()])
                if match.end() < len(text):  # before a closing bracket: a trailing comma
                    kept = match.start() + 1
                else:  # at the end: held until the next piece says which it is
                    self.held, kept = token, len(text)
        out.append(text[kept:])
        return "".join(out)

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class _ToolCall:
    __slots__ = ("id", "name", "arguments", "sent", "streams", "closed", "tail")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name = ""
        self.arguments: list[str] = []
        self.sent = 0  # argument pieces already sent as deltas
        self.streams: bool | None = None  # None until the arguments' start is known
        self.closed = False
        self.tail = _JsonTail()


BlockKind = Literal["text", "thinking"]  # the blocks the translator streams as text

TRUNCATED = "backend stream ended before the answer was complete"
MAX_TOOL_CALLS = 128  # in one run of tool calls


class Ending:
    """How a relayed stream ends in error: one ``error`` event, then nothing more."""

    ended = False
    cut = False  # the answer ended before the backend's did (a stop sequence): stop reading
    error_type: str | None = None
    error: GatewayError | None = None  # what ended the stream, when something did

    def fail(self, error: GatewayError) -> list[StreamEvent]:
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
        input_tokens: int | Callable[[], int] = 0,
        think_tags: bool = False,
        prefill: str = "",
        single_tool: bool = False,
        max_tokens: int | None = None,
        stream_tools: bool = True,
        backend: str = "",
    ) -> None:
        """``input_tokens``: the prompt's size for ``message_start``, or a function that gives
        it when the stream starts (a count that ran beside the backend call). ``prefill``:
        the assistant text the request ended with. ``single_tool``: at most one tool call
        (``disable_parallel_tool_use``), whatever the backend sends. ``max_tokens``: the cap
        the backend was sent, to tell a full context from it (``context_window_exceeded``).
        ``stream_tools=False``: tool arguments are held to each call's end and repaired (for
        an answer that is added up, not relayed, nothing is gained by sending them early).
        ``backend``: its name, for the message of an error about what it sent."""
        self.model = model
        self.backend = backend
        self._think_tags = ThinkTagSplitter() if think_tags else None
        self.message_id = message_id
        self.stop_sequences = stop_sequences
        self._input_tokens = input_tokens
        self.input_tokens = input_tokens if isinstance(input_tokens, int) else 0
        # None when there is nothing to filter: text then goes out as it comes.
        self._text = TextFilter(stop_sequences, prefill) if stop_sequences or prefill else None
        self.single_tool = single_tool
        self.max_tokens = max_tokens
        self.stream_tools = stream_tools
        self.context_full = False  # the backend showed its context window filled up
        self._live: int | None = None  # the tool call whose block is open
        self.finish_reason: str | None = None
        self.matched_stop: object = None
        self.usage: dict[str, Any] | None = None
        self.stop_reason: StopReason | None = None
        self.output_chars = 0
        self.refused = False
        self._next_index = 0
        self._open: BlockKind | None = None  # while a block is open
        self._tools: dict[int, _ToolCall] = {}
        self._tool_ids: set[str] = set()
        self._pinged = False

    # --- public ---------------------------------------------------------------------------

    def start(self) -> list[Event]:
        if callable(self._input_tokens):
            self.input_tokens = self._input_tokens()
        usage: Usage = {
            "input_tokens": self.input_tokens,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        message: Message = {
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
            return self.fail(malformed("malformed stream data", self.backend))
        if not isinstance(chunk, dict):
            return self.fail(malformed("malformed stream data", self.backend))
        return self.feed(chunk)

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        """One parsed chunk, as the backend sent it: whatever in it is not of the OpenAI
        shape ends the stream with an error event (app.translate.backend_shape)."""
        if self.ended:
            return []
        try:
            return self._feed(chunk)
        except UpstreamError as error:
            return self.fail(error)

    def _feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        if "error" in chunk or chunk.get("object") == "error":
            return self.fail(error_from_body(chunk))
        choice = first_choice(chunk, self.backend)  # checked before anything reads the chunk
        # The evidence of a full context (llama.cpp's timings, the usage chunk) and the finish
        # reason come in separate chunks; only those that carry it are looked at.
        if not self.context_full and (
            "timings" in chunk or "__verbose" in chunk or "usage" in chunk
        ):
            self.context_full = context_window_exceeded(chunk, self.max_tokens)
        usage = chunk.get("usage")
        if usage and isinstance(usage, dict):
            self.usage = usage
        if choice is None:
            return []  # the usage chunk (choices: []) and keep-alive objects
        events: list[Event] = []
        delta = delta_of(choice, "delta", self.backend)
        if delta:
            self._apply_delta(delta, events)
        finish: object = choice.get("finish_reason")
        if finish and isinstance(finish, str):
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
            if self.ended:  # the flushed text held a stop sequence
                return events
        if self._text is not None:
            self._text_out(self._text.flush(), events, filtered=True)
        if self.ended:
            return events
        events.extend(self._flush_tools())
        stop_reason, stop_sequence = map_stop_reason(
            self.finish_reason,
            bool(self._tool_ids),
            self.matched_stop,
            self.stop_sequences,
            refused=self.refused,
            context_full=self.context_full,
        )
        return events + self._end(stop_reason, stop_sequence)

    def _end(self, stop_reason: StopReason | None, stop_sequence: str | None) -> list[Event]:
        events = self._flush_tools()
        self._close_block(events)
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
    def final_usage(self) -> Usage:
        usage = map_usage(self.usage, estimate_output=(self.output_chars + 3) // 4)
        if self.usage is None:
            usage["input_tokens"] = self.input_tokens
        return usage

    # --- deltas -------------------------------------------------------------------------------

    def _apply_delta(self, delta: Delta, events: list[Event]) -> None:
        reasoning = reasoning_text(delta)
        if reasoning:
            self._append("thinking", reasoning, events)
        content: object = delta.get("content")
        if content and isinstance(content, str):
            if self._think_tags is None:
                self._text_out(content, events)
            else:
                self._append_segments(self._think_tags.feed(content), events)
            if self.ended:  # a stop sequence: the answer is over
                return
        refusal: object = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            self.refused = True
            self._append("text", refusal, events)
        for fragment in tool_calls_of(delta, self.backend):
            self._tool_fragment(fragment, events)

    def _text_out(self, text: str, events: list[Event], *, filtered: bool = False) -> None:
        """Text through the filter (unless ``filtered`` already); if it met a stop sequence,
        the answer ends here."""
        matcher = self._text
        if matcher is not None and not filtered:
            text = matcher.feed(text)
        if text:
            self._append("text", text, events)
        if matcher is not None and matcher.matched is not None and not self.ended:
            self.cut = True
            events.extend(self._end("stop_sequence", matcher.matched))

    def _append(self, kind: BlockKind, text: str, events: list[Event]) -> None:
        if self.ended:
            return
        if self._open != kind:
            if kind != "text":
                self._release_text(events)
                if self.ended:
                    return
            events.extend(self._flush_tools())
            self._close_block(events)
            self._open_block(kind, events)
        self.output_chars += len(text)
        delta: BlockDelta = (
            {"type": "text_delta", "text": text}
            if kind == "text"
            else {"type": "thinking_delta", "thinking": text}
        )
        events.append(
            {"type": "content_block_delta", "index": self._next_index - 1, "delta": delta}
        )

    def _release_text(self, events: list[Event]) -> None:
        """Other content follows the text: what the filter holds (a tail that might have begun
        a stop sequence, a prefill's echo) is text after all, and goes out before it."""
        if self._text is not None:
            self._text_out(self._text.flush(), events, filtered=True)

    def _append_segments(self, segments: list[tuple[str, str]], events: list[Event]) -> None:
        for kind, text in segments:
            if self.ended:
                return
            if kind == "thinking":
                self._append("thinking", text, events)
            else:
                self._text_out(text, events)

    def _open_block(self, kind: BlockKind, events: list[Event]) -> None:
        block: ContentBlock = (
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

    def _tool_fragment(self, fragment: ToolCallFragment, events: list[Event]) -> None:
        """Add one fragment to its call, and send what can be sent of it now."""
        if self.ended:
            return
        index: object = fragment.get("index")
        call_id: object = fragment.get("id")
        if not isinstance(index, int):
            index = self._index_for(call_id)
        call = self._tools.get(index)
        if call is None:
            if len(self._tools) >= MAX_TOOL_CALLS:
                return  # a backend gone wrong; no client asks for more in one answer
            call = self._tools[index] = _ToolCall()
            if not self.stream_tools:
                call.streams = False
        if call.closed:
            return  # its block is closed: the call was complete
        if call_id and isinstance(call_id, str) and call.id is None:
            call.id = call_id
        function = function_of(fragment)
        name = function.get("name")
        if name and not call.name:
            call.name = name
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = jsonc.dumps_str(arguments)
            call.streams = False  # whole already: sent at once when the call closes
        if arguments:
            call.arguments.append(arguments)
        self._advance_tools(index, events)

    def _advance_tools(self, index: int, events: list[Event]) -> None:
        """Keep one call's block open and streaming; move on to the next call only once the
        open one's arguments are complete JSON (interleaving servers send more otherwise)."""
        if index == self._live:
            self._send_arguments(self._tools[index], events)
            return
        live = self._tools.get(self._live) if self._live is not None else None
        if live is not None:
            if not _complete(live):
                return  # held until the open call is complete
            self._close_tool(live, events)
        pending = self._pending()
        if pending and pending[0][1].name:
            self._open_tool(*pending[0], events)

    def _pending(self) -> list[tuple[int, _ToolCall]]:
        return sorted((i, c) for i, c in self._tools.items() if not c.closed and i != self._live)

    def _open_tool(self, index: int, call: _ToolCall, events: list[Event]) -> None:
        if self.single_tool and self._tool_ids:
            call.closed = True  # disable_parallel_tool_use: one call, the first
            return
        self._release_text(events)
        if self.ended:
            return
        self._close_block(events)
        block: ContentBlock = {
            "type": "tool_use",
            "id": tool_use_id(call.id, self._tool_ids),
            "name": call.name,
            "input": {},
        }
        events.append(
            {"type": "content_block_start", "index": self._next_index, "content_block": block}
        )
        self._next_index += 1
        self._live = index
        self._send_arguments(call, events)

    def _send_arguments(self, call: _ToolCall, events: list[Event]) -> None:
        if call.streams is None:
            if not call.arguments or not call.arguments[-1].strip():
                return  # nothing new to tell by
            call.streams = _streams("".join(call.arguments))
            if not call.streams:
                return
        if not call.streams or call.sent == len(call.arguments):
            return
        piece = call.tail.feed("".join(call.arguments[call.sent :]))
        call.sent = len(call.arguments)
        if piece:
            self._argument_delta(piece, events)

    def _close_tool(self, call: _ToolCall, events: list[Event]) -> None:
        if call.streams:
            self._send_arguments(call, events)
            rest = call.tail.flush()
            if rest:
                self._argument_delta(rest, events)
        else:  # held to the end: repaired, or {} for a call with no arguments
            self._argument_delta(jsonc.dumps_str(parse_arguments("".join(call.arguments))), events)
        events.append({"type": "content_block_stop", "index": self._next_index - 1})
        call.closed = True
        self._live = None

    def _argument_delta(self, piece: str, events: list[Event]) -> None:
        self.output_chars += len(piece)
        events.append(
            {
                "type": "content_block_delta",
                "index": self._next_index - 1,
                "delta": {"type": "input_json_delta", "partial_json": piece},
            }
        )

    def _index_for(self, call_id: object) -> int:
        """Backends that omit ``index``: correlate by id, else continue the latest call."""
        for index, call in self._tools.items():
            if call_id and call.id == call_id:
                return index
        if call_id or not self._tools:
            return max(self._tools, default=-1) + 1
        return max(self._tools)

    def _flush_tools(self) -> list[Event]:
        """The run of tool calls is over (other content, or the end): close the open call,
        then send each held one whole."""
        if not self._tools:
            return []
        events: list[Event] = []
        live = self._tools.get(self._live) if self._live is not None else None
        if live is not None:
            self._close_tool(live, events)
        for index, call in self._pending():
            self._open_tool(index, call, events)
            if self._live == index:
                self._close_tool(call, events)
        self._tools.clear()
        return events


def _streams(arguments: str) -> bool | None:
    """Arguments go out as they come when they start as a JSON object should (``{"`` or
    ``{}``); anything else (a code fence, a Python dict) is held to the end and repaired.
    None: too little has arrived to tell."""
    text = arguments.lstrip()
    if not text:
        return None
    if text[0] != "{":
        return False
    rest = text[1:].lstrip()
    return None if not rest else rest[0] in '"}'


def _complete(call: _ToolCall) -> bool:
    """Whether a call's arguments so far are a whole JSON object (none yet: not complete,
    the arguments may still come)."""
    if call.streams:
        return call.tail.closed and call.sent == len(call.arguments)
    last = next((p for p in reversed(call.arguments) if p.strip()), "")
    if not last.rstrip().endswith("}"):
        return False  # cheap: a whole object ends with "}"; parsing each time would be O(n²)
    try:
        return isinstance(jsonc.loads("".join(call.arguments)), dict)
    except jsonc.JSONDecodeError:
        return False


def message_events(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A complete message as the events a streamed answer would have sent.

    For backends that answer a streaming request with one JSON body (some servers ignore
    ``stream`` for tool calls): the client asked for a stream and gets a well-formed one.
    The message may be an Anthropic-speaking backend's, whose blocks are passed on as they
    are: so these events are plain dicts, not the typed ones the translator writes.
    """
    usage = message.get("usage") or {}
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 0},
    }
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message.get("content") or ()):
        events.extend(_block_events(index, block))
    delta = {
        "stop_reason": message.get("stop_reason"),
        "stop_sequence": message.get("stop_sequence"),
    }
    events.append({"type": "message_delta", "delta": delta, "usage": usage})
    events.append({"type": "message_stop"})
    return events


def _block_events(index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
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
