"""Backend failures -> gateway errors with Anthropic types and statuses (pure).

Backends word their errors in several shapes (OpenAI ``{"error": {...}}``, older vLLM's flat
``{"object": "error"}``, FastAPI ``{"detail": ...}``, HTML from a proxy); the client always gets
one Anthropic envelope, with the backend's own message kept so the cause stays visible.

A prompt that does not fit the context is reworded the way Anthropic words it, numbers
included, because that wording is what Claude Code acts on (see ``overflow_message``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from app import jsonc
from app.errors import (
    AuthenticationFailed,
    BillingError,
    GatewayError,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    UpstreamError,
    UpstreamTimeout,
)
from app.translate.redact import redact

CONTEXT_OVERFLOW_MARKERS = (
    "context_length_exceeded",
    "maximum context length",
    "exceed_context_size",
    "exceeds the available context size",
    "context window",
    "too many tokens",
    "prompt is too long",
    "longer than the model's context length",  # SGLang
    "larger than the max context size",  # llama.cpp
    "longer than the maximum model length",  # vLLM's input processor
    "exceed context limit",  # Anthropic, for input plus max_tokens
    "exceed the configured limit",  # OpenAI
)
RETRY_HEADERS = ("retry-after", "retry-after-ms")
EXCERPT_CHARS = 300

# Server errors (5xx) whose text says the request itself is at fault: the backend can serve,
# just not this. llama.cpp answers many of these with a 500 (it throws from parameter
# parsing: "tools param requires --jinja flag", "image input is not supported", "Cannot use
# tools with stream", "Unsupported param: tool_choice", "Failed to parse messages"); vLLM and
# SGLang answer a feature they lack with a 500 from NotImplementedError.
CLIENT_FAULT_MARKERS = (
    "not supported",
    "unsupported",
    "is not allowed",
    "requires --jinja",
    "cannot use tools",
    "failed to parse",
    "must be provided",
    "only one completion choice",
)
DIALECT_CLIENT_FAULT_MARKERS: dict[str, tuple[str, ...]] = {
    "llamacpp": ("is required", "invalid type", "expected a", "content part type"),
    "vllm": ("notimplementederror", "not implemented", "is not a valid"),
    "sglang": ("notimplementederror", "not implemented", "is not a valid"),
}


def error_from_status(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    backend: str,
    dialect: str = "",
    count_prompt: PromptCounter | None = None,
) -> GatewayError:
    """The gateway error for a non-2xx backend answer, marked with what the dispatcher
    needs: whether another backend may cure it (``retryable``: 429, 503, server errors) and
    whether it says this backend cannot serve (``backend_fault``: server errors and timeouts,
    never a 429, a 503 or a 4xx). ``count_prompt``: the prompt's exact size from the backend's
    tokenizer, asked only for an overflow that gives a lower bound (``overflow_message``)."""
    detail, code, fields = _message(body)
    if status >= 500 and status not in (503, 504, 529) and _client_fault(detail, code, dialect):
        status = 400  # llama.cpp's 500 for "image input is not supported", and the like
    error = _classify(status, detail, code, fields, headers, backend, count_prompt)
    error.retryable = status in (429, 503, 529) or status >= 500
    error.backend_fault = status >= 500 and status not in (503, 529)
    return error


def _client_fault(detail: str, code: str, dialect: str) -> bool:
    text = f"{detail} {code}".lower()
    markers = CLIENT_FAULT_MARKERS + DIALECT_CLIENT_FAULT_MARKERS.get(dialect, ())
    return is_overflow(text) or any(m in text for m in markers)


def _classify(
    status: int,
    detail: str,
    code: str,
    fields: Mapping[str, Any],
    headers: Mapping[str, str],
    backend: str,
    count_prompt: PromptCounter | None = None,
) -> GatewayError:
    kept = {h: headers[h] for h in RETRY_HEADERS if h in headers}
    prefix = f"backend {backend} returned HTTP {status}"
    if status in (400, 422):
        if is_overflow(f"{detail} {code}"):
            return InvalidRequest(overflow_message(detail, fields, count_prompt))
        return InvalidRequest(detail or prefix)
    if status == 401:
        return AuthenticationFailed(f"{prefix}: the backend rejected the gateway's credentials")
    if status == 403:
        return PermissionDenied(f"{prefix}: {detail or 'forbidden'}")
    if status == 402:
        return BillingError(f"{prefix}: {detail or 'payment required'}")
    if status == 404:
        return NotFound(f"{prefix}: {detail or 'not found'}")
    if status == 413:
        return RequestTooLarge(f"{prefix}: {detail or 'request too large'}")
    if status == 429:
        return RateLimited(f"{prefix}: {detail or 'rate limited'}", headers=kept)
    if status in (408, 504):
        return UpstreamTimeout(f"{prefix}: {detail or 'timed out'}")
    if status in (503, 529):
        return Overloaded(f"{prefix}: {detail or 'overloaded'}", headers=kept)
    if status >= 500:
        return UpstreamError(f"{prefix}: {detail or 'server error'}")
    return InvalidRequest(f"{prefix}: {detail}" if detail else prefix)


def error_from_body(obj: Mapping[str, Any]) -> GatewayError:
    """The gateway error for an error object inside a 200 answer or a stream; only a
    server-side failure counts against the backend."""
    error = obj.get("error")
    fields = error if isinstance(error, dict) else obj
    message = _from_object(obj) or "backend reported an error"
    code, kind = fields.get("code"), fields.get("type")
    text = f"{message} {code} {kind}".lower()
    if str(code) in ("503", "529") or "overload" in text:
        return Overloaded(message)
    if str(code) == "429" or "rate limit" in text:
        return RateLimited(message)
    if is_overflow(text):  # a stream's first event, or a 200 answer, refusing the prompt
        return InvalidRequest(overflow_message(message, fields))
    if str(code) in ("408", "504") or "timeout" in text or "timed out" in text:
        return UpstreamTimeout(message, backend_fault=True)
    return UpstreamError(message, backend_fault=True)


# --- a prompt that does not fit ----------------------------------------------------------------
#
# Claude Code reads two messages (cli.js, 2.1.x). On a 400 matching
#     /prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)/i
# it compacts the conversation, by about the difference; on one matching
#     /input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)/
# it retries at once with a max_tokens that fits (and compacts when none would). Backends state
# the same facts in their own words; these read the numbers back out of them.
PROMPT_TOKENS = tuple(
    re.compile(p, re.I)
    for p in (
        # llama.cpp ("request (N tokens) exceeds the available context size"), SGLang
        r"\((\d+) tokens\) (?:exceeds the available|is larger than|is longer than)",
        r"prompt \(length (\d+)\)",  # vLLM's input processor
        r"\((\d+) in the messages",  # vLLM before 0.18, DeepSeek, OpenAI's older wording
        r"requested (\d+) tokens in the messages",  # vLLM before 0.18
        r"(?:request has|prompt contains)(?: at least)? (\d+) (?:input|prompt) tokens",  # vLLM
        r"messages resulted in (\d+) tokens",  # OpenAI
        r"(\d+) tokens from the input messages",  # SGLang
        r"prompt is too long: (\d+) tokens",  # Anthropic
        r"exceed context limit: (\d+) \+",  # Anthropic
        r"prompt contains (\d+) tokens",  # Mistral
        r"(\d+) of text input",  # OpenRouter
    )
)
CONTEXT_LIMITS = tuple(
    re.compile(p, re.I)
    for p in (
        r"maximum context length (?:is|of) (\d+)",  # vLLM, SGLang, OpenAI, DeepSeek, OpenRouter
        r"(?:available|max) context size \((\d+) tokens\)",  # llama.cpp
        r"model's context length \((\d+) tokens\)",  # SGLang
        r"maximum model length of (\d+)",  # vLLM's input processor
        r"configured limit of (\d+)",  # OpenAI
        r"> (\d+) maximum",  # Anthropic
        r"exceed context limit: \d+ \+ \d+ > (\d+)",  # Anthropic
        r"(\d+) maximum context length",  # Mistral
    )
)
# A prompt size that is a floor, not a count: vLLM's "your prompt contains at least N input
# tokens".
LOWER_BOUND = re.compile(r"at least \d+ (?:input|prompt) tokens", re.I)
PromptCounter = Callable[[], int | None]  # the prompt's exact size, or None if it cannot say
OUTPUT_TOKENS = tuple(
    re.compile(p, re.I)
    for p in (
        r"(\d+) in the completion",  # vLLM before 0.18, DeepSeek
        r"requested (\d+) output tokens",  # vLLM
        r"is too large: (\d+)",  # vLLM: "'max_tokens' or 'max_completion_tokens' is too large"
        r"(\d+) tokens for the completion",  # SGLang
        r"exceed context limit: \d+ \+ (\d+)",  # Anthropic
        r"(\d+) in the output",  # OpenRouter
    )
)


def is_overflow(text: str) -> bool:
    """Whether a backend's error text (message, code and type) says the request does not fit
    the model's context."""
    lowered = text.lower()
    return any(m in lowered for m in CONTEXT_OVERFLOW_MARKERS)


def overflow_message(
    detail: str,
    fields: Mapping[str, Any] | None = None,
    count_prompt: PromptCounter | None = None,
) -> str:
    """The overflow in Anthropic's words, with the backend's own text after it.

    ``fields``: the backend's error object; llama.cpp counts there (``n_prompt_tokens``,
    ``n_ctx``). A prompt that fits while prompt plus ``max_tokens`` does not is worded as the
    ``max_tokens`` problem it is, so that Claude Code lowers ``max_tokens`` instead of compacting
    a conversation that was not too long.

    vLLM (0.18 and later) stops tokenizing one token past the window and says "at least
    N+1": Claude Code compacts by about the difference it reads, so that one token would make
    it compact too little and fail again. ``count_prompt`` (the backend's tokenizer, which
    counts a prompt of any size) gives the exact size instead; when it fails the lower bound
    stands.
    """
    fields = fields or {}
    prompt = _count(fields.get("n_prompt_tokens")) or _first(PROMPT_TOKENS, detail)
    limit = _count(fields.get("n_ctx")) or _first(CONTEXT_LIMITS, detail)
    if count_prompt is not None and prompt is not None and limit is not None and prompt > limit:
        if LOWER_BOUND.search(detail):
            exact = count_prompt()
            prompt = exact if exact is not None and exact > prompt else prompt
    output = _first(OUTPUT_TOKENS, detail)
    head = _overflow_head(prompt, limit, output)
    return head if not detail or detail == head else f"{head} (backend: {detail})"


def _overflow_head(prompt: int | None, limit: int | None, output: int | None) -> str:
    if prompt is not None and limit is not None and output and prompt < limit <= prompt + output:
        return (
            f"input length and `max_tokens` exceed context limit: {prompt} + {output} > {limit}, "
            "decrease input length or `max_tokens` and try again"
        )
    if prompt is not None and limit is not None:
        return f"prompt is too long: {prompt} tokens > {limit} maximum"
    if limit is not None:  # the size unsaid: it is at least the limit
        return f"prompt is too long: more than {limit} tokens > {limit} maximum"
    if prompt is not None:
        return f"prompt is too long: {prompt} tokens"
    return "prompt is too long"


def _first(patterns: tuple[re.Pattern[str], ...], text: str) -> int | None:
    for pattern in patterns:
        found = pattern.search(text)
        if found:
            return int(found.group(1))
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _message(body: bytes) -> tuple[str, str, Mapping[str, Any]]:
    """The backend's error message, its error code and type (for classification), and the
    error object's fields (llama.cpp puts token counts there)."""
    try:
        obj = jsonc.loads(body.strip() or b"null")
    except jsonc.JSONDecodeError:
        return _excerpt(body.decode("utf-8", "replace")), "", {}
    if isinstance(obj, dict):
        error = obj.get("error")
        fields = error if isinstance(error, dict) else obj
        labels = [error.get("code"), error.get("type")] if isinstance(error, dict) else []
        return _from_object(obj), " ".join(str(x) for x in labels if x), fields
    return (_excerpt(str(obj)) if obj is not None else ""), "", {}


def _from_object(obj: Mapping[str, Any]) -> str:
    error = obj.get("error")
    if isinstance(error, dict) and error.get("message"):
        return _excerpt(str(error["message"]))
    if isinstance(error, str) and error:
        return _excerpt(error)
    for key in ("message", "detail"):
        if obj.get(key):
            value = obj[key]
            return _excerpt(value if isinstance(value, str) else jsonc.dumps_str(value))
    return ""


def _excerpt(text: str) -> str:
    """Backend text as a message may quote it: one line, bounded, without secrets."""
    text = redact(" ".join(text.split()))
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"
