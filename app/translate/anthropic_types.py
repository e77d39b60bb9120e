"""The Anthropic Messages wire shapes the gateway writes: the message, its content blocks and
usage, the stream events and the error envelope.

Types only: a ``TypedDict`` is a plain dict at run time, so building one costs what the dict
literal did. What clients and Anthropic-speaking backends send is untrusted JSON, read as
``Mapping[str, Any]`` and checked field by field where it is used; these shapes are what the
gateway promises back.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

# Why a message ended. The gateway produces all but pause_turn (a server-tool turn paused),
# which an Anthropic-speaking backend may relay.
StopReason = Literal[
    "end_turn",
    "max_tokens",
    "stop_sequence",
    "tool_use",
    "pause_turn",
    "refusal",
    "model_context_window_exceeded",
]

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "billing_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "timeout_error",
    "overloaded_error",
]


class Usage(TypedDict):
    """Token counts; ``input_tokens`` excludes the cached part (``cache_read_input_tokens``)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


# --- content blocks -------------------------------------------------------------------------


class TextBlock(TypedDict):
    type: Literal["text"]
    text: str


class ThinkingBlock(TypedDict):
    type: Literal["thinking"]
    thinking: str
    signature: str  # the gateway's own (app.ids.thinking_signature), accepted back as is


class ToolUseBlock(TypedDict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = TextBlock | ThinkingBlock | ToolUseBlock


class Message(TypedDict):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None  # None only in message_start
    stop_sequence: str | None
    usage: Usage


# --- stream events ----------------------------------------------------------------------------


class TextDelta(TypedDict):
    type: Literal["text_delta"]
    text: str


class ThinkingDelta(TypedDict):
    type: Literal["thinking_delta"]
    thinking: str


class SignatureDelta(TypedDict):
    type: Literal["signature_delta"]
    signature: str


class InputJSONDelta(TypedDict):
    type: Literal["input_json_delta"]
    partial_json: str


BlockDelta = TextDelta | ThinkingDelta | SignatureDelta | InputJSONDelta


class MessageStartEvent(TypedDict):
    type: Literal["message_start"]
    message: Message


class ContentBlockStartEvent(TypedDict):
    type: Literal["content_block_start"]
    index: int  # 0, 1, 2… in the order blocks start: clients look blocks up by position
    content_block: ContentBlock


class ContentBlockDeltaEvent(TypedDict):
    type: Literal["content_block_delta"]
    index: int
    delta: BlockDelta


class ContentBlockStopEvent(TypedDict):
    type: Literal["content_block_stop"]
    index: int


class StopDelta(TypedDict):
    stop_reason: StopReason | None
    stop_sequence: str | None


class MessageDeltaEvent(TypedDict):
    type: Literal["message_delta"]
    delta: StopDelta
    usage: Usage  # running totals, not increments


class MessageStopEvent(TypedDict):
    type: Literal["message_stop"]


class PingEvent(TypedDict):
    type: Literal["ping"]


class ErrorDetail(TypedDict):
    type: str  # an ErrorType; str, since a relayed backend's error keeps its own
    message: str
    # What a client acts on besides the type (a message thread's ``error_code``).
    details: NotRequired[dict[str, Any]]


class ErrorEvent(TypedDict):
    """The error envelope: an HTTP error body, or the ``error`` event that ends a stream."""

    type: Literal["error"]
    error: ErrorDetail
    request_id: NotRequired[str]


StreamEvent = (
    MessageStartEvent
    | ContentBlockStartEvent
    | ContentBlockDeltaEvent
    | ContentBlockStopEvent
    | MessageDeltaEvent
    | MessageStopEvent
    | PingEvent
    | ErrorEvent
)
