"""The OpenAI Chat Completions wire shapes: the request the gateway writes, and the answer
and stream chunks it reads back.

Types only (a ``TypedDict`` is a plain dict at run time). The request is built by the
gateway and typed as such. A backend's answer is untrusted JSON: the translators take it as
``Any`` and check each field before use (app.translate.backend_shape); these classes say what
the checked parts are, so the code after a check is typed.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, Required, TypedDict

# --- the request ---------------------------------------------------------------------------


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class ImageURL(TypedDict):
    url: str  # http(s), or a data: URL with the image inline


class ImagePart(TypedDict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = TextPart | ImagePart


class FunctionCall(TypedDict):
    name: str
    arguments: str  # the arguments as JSON text


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(TypedDict):
    role: Literal["system"]
    content: str


class UserMessage(TypedDict):
    role: Literal["user"]
    content: str | list[ContentPart]  # a string where it can be: many templates take only that


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str
    tool_calls: NotRequired[list[ToolCall]]
    # Earlier reasoning, under the name the backend reads (Dialect.reasoning_history).
    reasoning_content: NotRequired[str]
    reasoning: NotRequired[str]


class ToolMessage(TypedDict):
    role: Literal["tool"]
    tool_call_id: str
    content: str


ChatMessage = SystemMessage | UserMessage | AssistantMessage | ToolMessage


class FunctionDefinition(TypedDict):
    name: str
    parameters: dict[str, Any]  # a JSON Schema
    description: NotRequired[str]


class FunctionTool(TypedDict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(TypedDict):
    name: str


class NamedToolChoice(TypedDict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["auto", "required", "none"] | NamedToolChoice
ReasoningEffort = Literal["none", "low", "medium", "high"]


class JSONSchemaFormat(TypedDict):
    name: str
    schema: dict[str, Any]


class ResponseFormat(TypedDict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


class ThinkingSwitch(TypedDict):
    """DeepSeek's own switch."""

    type: Literal["enabled", "disabled"]


class ChatTemplateKwargs(TypedDict):
    """Passed to the chat template by vLLM, SGLang and llama.cpp."""

    enable_thinking: bool


class StreamOptions(TypedDict):
    include_usage: bool


class ChatRequest(TypedDict, total=False):
    """``POST /chat/completions``. Fields past ``messages`` are sent only when set, and some
    only to the backends whose dialect takes them (app.translate.dialect)."""

    model: Required[str]
    messages: Required[list[ChatMessage]]
    max_tokens: int
    max_completion_tokens: int  # OpenAI's name for the cap (Dialect.max_tokens_field)
    temperature: float
    top_p: float
    top_k: int
    user: str
    tools: list[FunctionTool]
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    reasoning_effort: ReasoningEffort
    thinking: ThinkingSwitch
    chat_template_kwargs: ChatTemplateKwargs
    response_format: ResponseFormat
    # vLLM's prefill: continue the final assistant message instead of starting a new one.
    continue_final_message: bool
    add_generation_prompt: bool
    stream: bool
    stream_options: StreamOptions


# --- what comes back: the parts the translators read, once checked ------------------------------

FinishReason = str  # stop, length, tool_calls, content_filter, function_call, error; others seen


class FunctionFragment(TypedDict, total=False):
    """A tool call's function, whole (an answer) or a piece of it (a stream)."""

    name: str
    # JSON text, or pieces of it in a stream; a few servers send the object itself.
    arguments: str | dict[str, Any]


class ToolCallFragment(TypedDict, total=False):
    """One entry of ``tool_calls``: ``id`` and ``name`` come once, ``arguments`` in pieces."""

    index: int  # which call, in a stream (some servers leave it out)
    id: str
    type: str
    function: FunctionFragment


class Delta(TypedDict, total=False):
    """A stream chunk's ``choices[0].delta``, and an answer's ``choices[0].message``: the same
    fields, whole or in pieces."""

    role: str
    content: str | list[Any] | None  # a few servers send content parts, not a string
    reasoning_content: str | None  # DeepSeek, llama.cpp
    reasoning: str | None  # vLLM, Ollama
    refusal: str | None
    tool_calls: list[ToolCallFragment] | None
    function_call: FunctionFragment | None  # the legacy single call


class Choice(TypedDict, total=False):
    index: int
    delta: Delta  # in a stream chunk
    message: Delta  # in a complete answer
    finish_reason: FinishReason | None
    stop_reason: str | int | None  # vLLM: the stop string that fired (or token id)


class PromptTokensDetails(TypedDict, total=False):
    cached_tokens: int


class Usage(TypedDict, total=False):
    prompt_tokens: int  # cached tokens included
    completion_tokens: int  # reasoning included
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None
    prompt_cache_hit_tokens: int  # DeepSeek's name for the cached part
