"""Backend failures -> Anthropic errors (app/translate/upstream_errors.py, app/errors.py), and
the stop a full context window makes (app/translate/response.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from app import errors
from app.errors import GatewayError, field_error
from app.translate.response import (
    context_window_exceeded,
    map_stop_reason,
    translate_response,
)
from app.translate.stream import StreamTranslator
from app.translate.upstream_errors import EXCERPT_CHARS, error_from_body, error_from_status

BACKEND = "gpu-box:8000"
PREFIX = f"backend {BACKEND} returned HTTP"


def from_status(
    status: int, body: Any = b"", headers: dict[str, str] | None = None
) -> GatewayError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return error_from_status(status, raw, headers or {}, BACKEND)


def openai_error(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, **extra}}


# --- error_from_status -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected_status", "expected_type", "expected_message"),
    [
        (
            400,
            openai_error("temperature: must be <= 2", type="BadRequestError", code=400),
            400,
            "invalid_request_error",
            "temperature: must be <= 2",
        ),
        (
            422,
            {"detail": [{"loc": ["body", "messages"], "msg": "field required"}]},
            400,
            "invalid_request_error",
            '[{"loc":["body","messages"],"msg":"field required"}]',
        ),
        (
            422,
            {"object": "error", "message": "n must be 1", "type": "BadRequestError", "code": 422},
            400,
            "invalid_request_error",
            "n must be 1",
        ),
        (400, b"", 400, "invalid_request_error", f"{PREFIX} 400"),
        (
            401,
            openai_error("Incorrect API key provided: sk-abc"),
            401,
            "authentication_error",
            f"{PREFIX} 401: the backend rejected the gateway's credentials",
        ),
        (
            403,
            openai_error("model access denied"),
            403,
            "permission_error",
            f"{PREFIX} 403: model access denied",
        ),
        (
            402,
            openai_error("Insufficient Balance"),
            402,
            "billing_error",
            f"{PREFIX} 402: Insufficient Balance",
        ),
        (
            404,
            openai_error("The model `qwen9` does not exist.", code="model_not_found"),
            404,
            "not_found_error",
            f"{PREFIX} 404: The model `qwen9` does not exist.",
        ),
        (404, b"", 404, "not_found_error", f"{PREFIX} 404: not found"),
        (408, b"", 504, "timeout_error", f"{PREFIX} 408: timed out"),
        (504, b"upstream timed out", 504, "timeout_error", f"{PREFIX} 504: upstream timed out"),
        (413, b"", 413, "request_too_large", f"{PREFIX} 413: request too large"),
        (
            429,
            openai_error("Rate limit reached", code="rate_limit_exceeded"),
            429,
            "rate_limit_error",
            f"{PREFIX} 429: Rate limit reached",
        ),
        (
            500,
            openai_error("CUDA out of memory"),
            500,
            "api_error",
            f"{PREFIX} 500: CUDA out of memory",
        ),
        (500, b"", 500, "api_error", f"{PREFIX} 500: server error"),
        (502, b"Bad Gateway", 500, "api_error", f"{PREFIX} 502: Bad Gateway"),
        (
            503,
            openai_error("Server is overloaded"),
            529,
            "overloaded_error",
            f"{PREFIX} 503: Server is overloaded",
        ),
        (503, b"   \n", 529, "overloaded_error", f"{PREFIX} 503: overloaded"),
        (409, openai_error("conflict"), 400, "invalid_request_error", f"{PREFIX} 409: conflict"),
        (
            401,
            {"detail": "Not authenticated"},
            401,
            "authentication_error",
            f"{PREFIX} 401: the backend rejected the gateway's credentials",
        ),
        (
            500,
            {"error": "plain string error"},
            500,
            "api_error",
            f"{PREFIX} 500: plain string error",
        ),
        (500, b'"just a json string"', 500, "api_error", f"{PREFIX} 500: just a json string"),
        (500, b"null", 500, "api_error", f"{PREFIX} 500: server error"),
    ],
    ids=[
        "400_keeps_backend_message",
        "422_fastapi_detail",
        "422_flat_vllm",
        "400_empty_body",
        "401",
        "403",
        "402",
        "404",
        "404_empty",
        "408",
        "504_plain_text",
        "413",
        "429",
        "500",
        "500_empty",
        "502_plain_text",
        "503",
        "503_blank_body",
        "409_other_4xx",
        "fastapi_detail_string",
        "error_as_string",
        "json_string_body",
        "json_null_body",
    ],
)
def test_error_from_status(
    status: int,
    body: Any,
    expected_status: int,
    expected_type: str,
    expected_message: str,
) -> None:
    error = from_status(status, body)
    assert (error.status, error.error_type, error.message) == (
        expected_status,
        expected_type,
        expected_message,
    )


@pytest.mark.parametrize(
    ("status", "headers", "kept"),
    [
        (429, {"retry-after": "7", "x-ratelimit-remaining": "0"}, {"retry-after": "7"}),
        (429, {"retry-after-ms": "1500"}, {"retry-after-ms": "1500"}),
        (429, {}, {}),
        (503, {"retry-after": "30", "server": "nginx"}, {"retry-after": "30"}),
        (500, {"retry-after": "30"}, {}),
    ],
    ids=["429_retry_after", "429_retry_after_ms", "429_none", "503_retry_after", "500_not_kept"],
)
def test_retry_after_is_kept_for_rate_limits_and_overload(
    status: int, headers: dict, kept: dict
) -> None:
    assert from_status(status, b"", headers).headers == kept


def test_html_body_becomes_a_short_excerpt() -> None:
    html = (
        b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        + b"<center><h1>502 Bad Gateway</h1></center>\n" * 200
        + b"</body></html>"
    )
    error = from_status(502, html)
    assert error.error_type == "api_error"
    assert "<title>502 Bad Gateway</title>" in error.message
    assert "\n" not in error.message and "\r" not in error.message
    detail = error.message.removeprefix(f"{PREFIX} 502: ")
    assert len(detail) == EXCERPT_CHARS + 1
    assert detail.endswith("…")


def test_long_json_message_is_truncated() -> None:
    error = from_status(400, openai_error("x" * 5000))
    assert error.message == "x" * EXCERPT_CHARS + "…"


def test_invalid_utf8_body_does_not_raise() -> None:
    error = from_status(500, b"\xff\xfe broken \xc3")
    assert error.error_type == "api_error"
    assert "broken" in error.message


# --- a prompt that does not fit: in the words Claude Code acts on -----------------------------

# The two patterns Claude Code 2.1 matches against an API error's message (cli.js): the first
# starts compaction, the second a retry with a smaller max_tokens.
CLAUDE_CODE_PROMPT_TOO_LONG = re.compile(
    r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", re.I
)
CLAUDE_CODE_MAX_TOKENS = re.compile(
    r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)"
)


def as_claude_code_sees_it(error: GatewayError) -> str:
    """The SDK's APIError.message: the status, then the error body as JSON."""
    return f"{error.status} {json.dumps(error.payload('req_1'))}"


LLAMACPP_OVERFLOW = {
    "error": {
        "code": 400,
        "message": "request (1087 tokens) exceeds the available context size (512 tokens), "
        "try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 1087,
        "n_ctx": 512,
    }
}

PROMPT_TOO_LONG = [
    (LLAMACPP_OVERFLOW, (1087, 512)),
    (
        openai_error(
            "This model's maximum context length is 4096 tokens. However, your request has "
            "5000 input tokens. Please reduce the length of the input messages.",
            type="BadRequestError",
            param=None,
            code=400,
        ),
        (5000, 4096),
    ),
    (
        {
            "object": "error",
            "message": "This model's maximum context length is 2048 tokens. However, you "
            "requested 2100 tokens in the messages, Please reduce the length of the messages.",
            "type": "BadRequestError",
            "code": 400,
        },
        (2100, 2048),
    ),
    (
        openai_error(
            "This model's maximum context length is 32768 tokens. However, you requested 0 "
            "output tokens and your prompt contains at least 32769 input tokens, for a total of "
            "at least 32769 tokens. Please reduce the length of the input prompt or the number "
            "of requested output tokens.",
            type="BadRequestError",
            param="input_tokens",
            code=400,
        ),
        (32769, 32768),
    ),
    (
        openai_error(
            "The decoder prompt (length 5000) is longer than the maximum model length of 4096. "
            "Make sure that `max_model_len` is no smaller than the number of text tokens.",
            type="BadRequestError",
            code=400,
        ),
        (5000, 4096),
    ),
    (
        {
            "object": "error",
            "message": "The input (5000 tokens) is longer than the model's context length "
            "(4096 tokens).",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        (5000, 4096),
    ),
    (
        openai_error(
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 130412 tokens. Please reduce the length of the messages.",
            type="invalid_request_error",
            param="messages",
            code="context_length_exceeded",
        ),
        (130412, 128000),
    ),
    (
        openai_error(
            "Input tokens exceed the configured limit of 272000 tokens. Your messages resulted "
            "in 300000 tokens. Please reduce the length of the messages.",
            type="invalid_request_error",
            param="messages",
            code="context_length_exceeded",
        ),
        (300000, 272000),
    ),
]
PROMPT_TOO_LONG_IDS = [
    "llamacpp",
    "vllm",
    "vllm_before_0_18",
    "vllm_0_18_prompt_alone",
    "vllm_input_processor",
    "sglang",
    "openai",
    "openai_configured_limit",
]


@pytest.mark.parametrize(("body", "counts"), PROMPT_TOO_LONG, ids=PROMPT_TOO_LONG_IDS)
def test_a_prompt_over_the_context_reads_prompt_is_too_long_n_tokens_over_m(
    body: dict, counts: tuple[int, int]
) -> None:
    error = from_status(400, body)
    prompt, limit = counts
    assert (error.status, error.error_type) == (400, "invalid_request_error")
    assert error.message.startswith(f"prompt is too long: {prompt} tokens > {limit} maximum")
    found = CLAUDE_CODE_PROMPT_TOO_LONG.search(as_claude_code_sees_it(error))
    assert found is not None and found.groups() == (str(prompt), str(limit))
    assert not error.retryable and not error.backend_fault


@pytest.mark.parametrize(("body", "counts"), PROMPT_TOO_LONG, ids=PROMPT_TOO_LONG_IDS)
def test_the_backends_own_words_follow_the_rewording(body: dict, counts: tuple) -> None:
    error = from_status(400, body)
    backend_text = body["error"]["message"] if "error" in body else body["message"]
    assert error.message.endswith(f" (backend: {backend_text})")


@pytest.mark.parametrize(
    ("message", "counts"),
    [
        (
            "This model's maximum context length is 4096 tokens. However, you requested 5000 "
            "tokens (4000 in the messages, 1000 in the completion). Please reduce the length of "
            "the messages or completion.",
            (4000, 1000, 4096),
        ),
        (
            "'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's maximum "
            "context length is 32768 tokens and your request has 2778 input tokens "
            "(32000 > 32768 - 2778).",
            (2778, 32000, 32768),
        ),
        (
            "This model's maximum context length is 32768 tokens. However, you requested 32000 "
            "output tokens and your prompt contains at least 769 input tokens, for a total of at "
            "least 32769 tokens. Please reduce the length of the input prompt or the number of "
            "requested output tokens.",
            (769, 32000, 32768),
        ),
        (
            "Requested token count exceeds the model's maximum context length of 4096 tokens. "
            "You requested a total of 5000 tokens: 4000 tokens from the input messages and 1000 "
            "tokens for the completion. Please reduce the number of tokens in the input messages "
            "or the completion to fit within the limit.",
            (4000, 1000, 4096),
        ),
    ],
    ids=["vllm_before_0_18", "vllm_max_tokens_too_large", "vllm_0_18", "sglang"],
)
def test_a_prompt_that_fits_with_too_large_a_max_tokens_asks_for_a_smaller_one(
    message: str, counts: tuple[int, int, int]
) -> None:
    error = from_status(400, openai_error(message, type="BadRequestError", code=400))
    assert (error.status, error.error_type) == (400, "invalid_request_error")
    found = CLAUDE_CODE_MAX_TOKENS.search(as_claude_code_sees_it(error))
    assert found is not None and tuple(int(n) for n in found.groups()) == counts
    assert "prompt is too long" not in error.message  # no compaction: the history fits


VLLM_0_32_OVERFLOW = openai_error(
    "This model's maximum context length is 2048 tokens. However, your prompt contains at least "
    "2049 input tokens, which exceeds this limit even without any output tokens. Please reduce "
    "the length of the input prompt. (parameter=input_tokens, value=2049)",
    type="BadRequestError",
    param="input_tokens",
    code=400,
)


def test_a_prompt_size_given_as_a_floor_is_replaced_by_the_tokenizers_count() -> None:
    """vLLM says "at least 2049" of any prompt over a 2048 window: Claude Code would compact by
    one token. The backend's tokenizer, asked on the error, says how far over it is."""
    raw = json.dumps(VLLM_0_32_OVERFLOW).encode()
    error = error_from_status(400, raw, {}, BACKEND, "vllm", count_prompt=lambda: 2531)
    found = CLAUDE_CODE_PROMPT_TOO_LONG.search(as_claude_code_sees_it(error))
    assert found is not None and found.groups() == ("2531", "2048")
    assert "at least 2049 input tokens" in error.message  # the backend's words, kept


def test_without_a_count_the_floor_stands() -> None:
    raw = json.dumps(VLLM_0_32_OVERFLOW).encode()
    for counter in (None, lambda: None):
        error = error_from_status(400, raw, {}, BACKEND, "vllm", count_prompt=counter)
        assert error.message.startswith("prompt is too long: 2049 tokens > 2048 maximum")


@pytest.mark.parametrize(
    "body",
    [PROMPT_TOO_LONG[1][0], LLAMACPP_OVERFLOW],
    ids=["vllm_exact_size", "llamacpp"],
)
def test_the_tokenizer_is_not_asked_when_the_backend_gave_the_exact_size(body: dict) -> None:
    def counter() -> int:
        raise AssertionError("counted")

    error = error_from_status(400, json.dumps(body).encode(), {}, BACKEND, count_prompt=counter)
    assert error.message.startswith("prompt is too long: ")


def test_the_tokenizer_is_not_asked_for_a_prompt_that_fits_beside_too_large_a_max_tokens() -> None:
    """vLLM says "at least 769" there too, but the prompt is under the window: that is the
    max_tokens problem, whatever its exact size."""
    message = (
        "This model's maximum context length is 32768 tokens. However, you requested 32000 "
        "output tokens and your prompt contains at least 769 input tokens, for a total of at "
        "least 32769 tokens."
    )

    def counter() -> int:
        raise AssertionError("counted")

    raw = json.dumps(openai_error(message)).encode()
    error = error_from_status(400, raw, {}, BACKEND, count_prompt=counter)
    assert CLAUDE_CODE_MAX_TOKENS.search(as_claude_code_sees_it(error))


def test_llamacpps_counts_in_the_error_object_are_used_over_its_text() -> None:
    body = {
        "error": {
            **LLAMACPP_OVERFLOW["error"],
            "message": "the request exceeds the "
            "available context size, try increasing the context size or enable context shift",
        }
    }
    error = from_status(400, body)
    assert error.message.startswith("prompt is too long: 1087 tokens > 512 maximum (backend: ")


def test_an_overflow_sent_as_a_server_error_is_the_clients_400() -> None:
    body = openai_error(
        "This model's maximum context length is 8192 tokens. However, your request has 9000 "
        "input tokens. Please reduce the length of the input messages.",
        type="InternalServerError",
        code=500,
    )
    error = from_status(500, body)
    assert (error.status, error.error_type) == (400, "invalid_request_error")
    assert error.message.startswith("prompt is too long: 9000 tokens > 8192 maximum")
    assert not error.retryable and not error.backend_fault


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            openai_error(
                "Your input exceeds the context window of this model. Please adjust your input "
                "and try again.",
                type="invalid_request_error",
                code="context_length_exceeded",
            ),
            "prompt is too long (backend: Your input exceeds the context window of this model. "
            "Please adjust your input and try again.)",
        ),
        (
            openai_error("Request has too many tokens for the context window"),
            "prompt is too long (backend: Request has too many tokens for the context window)",
        ),
        (
            openai_error("maximum context length is 4096 tokens", code="context_length_exceeded"),
            "prompt is too long: more than 4096 tokens > 4096 maximum "
            "(backend: maximum context length is 4096 tokens)",
        ),
    ],
    ids=["no_numbers", "no_numbers_other_wording", "limit_only"],
)
def test_an_overflow_without_both_numbers_still_reads_prompt_is_too_long(
    body: dict, expected: str
) -> None:
    error = from_status(400, body)
    assert (error.error_type, error.message) == ("invalid_request_error", expected)


def test_an_anthropic_backends_overflow_message_passes_unchanged() -> None:
    message = "prompt is too long: 210000 tokens > 200000 maximum"
    error = from_status(
        400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    )
    assert error.message == message


def test_an_error_that_is_not_about_the_context_is_not_reworded() -> None:
    message = "max_tokens is too large: 32000. This model supports at most 16384 completion tokens"
    assert from_status(400, openai_error(message)).message == message


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (LLAMACPP_OVERFLOW, "prompt is too long: 1087 tokens > 512 maximum (backend: "),
        (
            {
                "error": {
                    "object": "error",
                    "message": "The input (5000 tokens) is longer than the model's context "
                    "length (4096 tokens).",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            },
            "prompt is too long: 5000 tokens > 4096 maximum (backend: ",
        ),
        (
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "prompt is too long: 210000 tokens > 200000 maximum",
                },
            },
            "prompt is too long: 210000 tokens > 200000 maximum",
        ),
    ],
    ids=["llamacpp_chunk", "sglang_chunk", "anthropic_event"],
)
def test_an_overflow_inside_a_stream_is_the_clients_400_in_claude_codes_words(
    chunk: dict, expected: str
) -> None:
    error = error_from_body(chunk)
    assert (error.status, error.error_type) == (400, "invalid_request_error")
    assert error.message.startswith(expected)
    assert CLAUDE_CODE_PROMPT_TOO_LONG.search(as_claude_code_sees_it(error))
    assert not error.backend_fault


def test_the_translated_stream_ends_with_the_overflow_in_claude_codes_words() -> None:
    translator = StreamTranslator(model="claude-sonnet-4-5", message_id="msg_1", stop_sequences=[])
    translator.start()
    events = translator.feed_data(json.dumps(LLAMACPP_OVERFLOW).encode())
    assert events == [
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": error_from_body(LLAMACPP_OVERFLOW).message,
            },
        }
    ]
    assert CLAUDE_CODE_PROMPT_TOO_LONG.search(events[0]["error"]["message"])


def test_a_non_streamed_answer_holding_the_overflow_raises_it() -> None:
    with pytest.raises(errors.InvalidRequest, match=r"^prompt is too long: 1087 tokens > 512 "):
        translate_response(LLAMACPP_OVERFLOW, model="m", message_id="msg_1", stop_sequences=[])


# --- error_from_body (in-stream and in-200 errors) ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected_type", "expected_status", "expected_message"),
    [
        (openai_error("boom", type="server_error"), "api_error", 500, "boom"),
        (openai_error("The engine is overloaded", code=503), "overloaded_error", 529, None),
        (openai_error("Service Unavailable", code="503"), "overloaded_error", 529, None),
        (openai_error("Too many requests", code=429), "rate_limit_error", 429, None),
        (openai_error("Rate limit exceeded"), "rate_limit_error", 429, None),
        (openai_error("Upstream timed out", code=504), "timeout_error", 504, None),
        (openai_error("generation timeout"), "timeout_error", 504, None),
        (openai_error("Provider returned error", code=502), "api_error", 500, None),
        (
            {"object": "error", "message": "Model is overloaded", "type": "ServiceUnavailable"},
            "overloaded_error",
            529,
            "Model is overloaded",
        ),
        (
            {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400},
            "api_error",
            500,
            "bad",
        ),
        ({"error": "engine dead"}, "api_error", 500, "engine dead"),
        ({"error": {}}, "api_error", 500, "backend reported an error"),
        ({"error": None}, "api_error", 500, "backend reported an error"),
    ],
    ids=[
        "openai_shape",
        "code_503",
        "code_503_string",
        "code_429",
        "rate_limit_text",
        "code_504",
        "timeout_text",
        "openrouter_502",
        "flat_vllm_overloaded",
        "flat_vllm_bad_request",
        "string_error",
        "empty_error_object",
        "null_error",
    ],
)
def test_error_from_body(
    body: dict, expected_type: str, expected_status: int, expected_message: str | None
) -> None:
    error = error_from_body(body)
    assert (error.error_type, error.status) == (expected_type, expected_status)
    assert error.message == (expected_message or body["error"]["message"])


# --- the envelope ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "status", "error_type"),
    [
        (errors.GatewayError, 500, "api_error"),
        (errors.InvalidRequest, 400, "invalid_request_error"),
        (errors.AuthenticationFailed, 401, "authentication_error"),
        (errors.BillingError, 402, "billing_error"),
        (errors.PermissionDenied, 403, "permission_error"),
        (errors.NotFound, 404, "not_found_error"),
        (errors.MethodNotAllowed, 405, "invalid_request_error"),
        (errors.RequestTooLarge, 413, "request_too_large"),
        (errors.RateLimited, 429, "rate_limit_error"),
        (errors.UpstreamError, 500, "api_error"),
        (errors.UpstreamTimeout, 504, "timeout_error"),
        (errors.Overloaded, 529, "overloaded_error"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_error_classes_carry_anthropic_status_and_type(
    cls: type[GatewayError], status: int, error_type: str
) -> None:
    error = cls("went wrong")
    assert (error.status, error.error_type, str(error)) == (status, error_type, "went wrong")
    assert error.payload() == {
        "type": "error",
        "error": {"type": error_type, "message": "went wrong"},
    }


@pytest.mark.parametrize(
    ("request_id", "expected_extra"),
    [("req_011Abc", {"request_id": "req_011Abc"}), (None, {}), ("", {})],
    ids=["with_request_id", "none", "empty"],
)
def test_payload_envelope(request_id: str | None, expected_extra: dict) -> None:
    error = errors.Overloaded("Overloaded")
    assert error.payload(request_id) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        **expected_extra,
    }


def test_status_can_be_overridden_per_instance() -> None:
    error = errors.UpstreamError("backend unreachable", status=502)
    assert (error.status, errors.UpstreamError.status) == (502, 500)


@pytest.mark.parametrize(
    ("should_retry", "headers", "expected"),
    [
        (True, None, {"x-should-retry": "true"}),
        (False, None, {"x-should-retry": "false"}),
        (None, None, {}),
        (False, {"retry-after": "3"}, {"retry-after": "3", "x-should-retry": "false"}),
    ],
    ids=["true", "false", "unset", "with_other_headers"],
)
def test_should_retry_sets_the_x_should_retry_header(
    should_retry: bool | None, headers: dict | None, expected: dict
) -> None:
    error = errors.UpstreamError("x", headers=headers, should_retry=should_retry)
    assert error.headers == expected


def test_headers_are_copied_not_shared() -> None:
    original = {"retry-after": "1"}
    error = errors.RateLimited("x", headers=original, should_retry=True)
    assert original == {"retry-after": "1"}
    assert error.headers is not original


def test_field_error_names_the_path() -> None:
    error = field_error("messages.2.content.0.text", "must be a string")
    assert isinstance(error, errors.InvalidRequest)
    assert error.message == "messages.2.content.0.text: must be a string"


# --- what the dispatcher reads off an error ----------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "retryable", "backend_fault"),
    [
        (429, openai_error("slow down"), True, False),  # said no: another backend may say yes
        (503, openai_error("loading"), True, False),
        (529, openai_error("overloaded"), True, False),
        (500, openai_error("CUDA out of memory"), True, True),  # cannot serve
        (502, b"<html>bad gateway</html>", True, True),
        (504, b"", True, True),
        (400, openai_error("bad"), False, False),
        (401, openai_error("key"), False, False),
        (404, openai_error("no model"), False, False),
        (422, openai_error("n must be 1"), False, False),
    ],
)
def test_only_failures_that_say_the_backend_cannot_serve_count_against_it(
    status: int, body: Any, retryable: bool, backend_fault: bool
) -> None:
    error = from_status(status, body)
    assert (error.retryable, error.backend_fault) == (retryable, backend_fault)


@pytest.mark.parametrize(
    ("dialect", "message"),
    [
        ("llamacpp", "tools param requires --jinja flag"),
        ("llamacpp", "image input is not supported - hint: you may need to provide the mmproj"),
        ("llamacpp", "Cannot use tools with stream"),
        ("llamacpp", "Unsupported param: tool_choice"),
        ("llamacpp", "Failed to parse messages: missing content"),
        ("vllm", "NotImplementedError: logprobs with structured outputs"),
        ("sglang", "Tool choice 'required' is not implemented"),
        ("", "audio input is not supported"),
    ],
)
def test_a_server_error_that_names_the_request_is_the_clients_400(dialect: str, message: str):
    body = json.dumps({"error": {"code": 500, "message": message, "type": "server_error"}})
    error = error_from_status(500, body.encode(), {}, BACKEND, dialect)
    assert (error.status, error.error_type) == (400, "invalid_request_error")
    assert message in error.message
    assert not error.retryable and not error.backend_fault


def test_a_server_error_about_the_server_stays_a_server_error() -> None:
    body = json.dumps({"error": {"message": "CUDA error: an illegal memory access"}}).encode()
    error = error_from_status(500, body, {}, BACKEND, "llamacpp")
    assert error.status == 500 and error.backend_fault


def test_an_error_inside_a_stream_counts_only_when_it_is_the_servers() -> None:
    assert not error_from_body({"error": {"message": "rate limit exceeded"}}).backend_fault
    assert not error_from_body({"error": {"message": "server overloaded"}}).backend_fault
    assert error_from_body({"error": {"message": "worker crashed"}}).backend_fault


# --- a context that filled while the answer was written ------------------------------------------


def llamacpp_final(predicted: int, *, verbose: dict | None = None) -> dict[str, Any]:
    """llama.cpp's non-streamed chat answer for a LIMIT stop (tools/server/server-task.cpp)."""
    answer: dict[str, Any] = {
        "choices": [
            {
                "finish_reason": "length",
                "index": 0,
                "message": {"role": "assistant", "content": "x"},
            }
        ],
        "object": "chat.completion",
        "usage": {"completion_tokens": predicted, "prompt_tokens": 500, "total_tokens": 500},
        "timings": {"cache_n": 0, "prompt_n": 500, "predicted_n": predicted},
    }
    if verbose is not None:
        answer["__verbose"] = verbose
    return answer


def limit_stop(truncated: bool, predicted: int, n_predict: int) -> dict[str, Any]:
    """llama.cpp's ``__verbose`` block (with ``--verbose``) for a LIMIT stop."""
    return {
        "truncated": truncated,
        "stop_type": "limit",
        "tokens_predicted": predicted,
        "generation_settings": {"n_predict": n_predict},
    }


def stop_reason_of(answer: dict[str, Any], max_tokens: int | None = None) -> str | None:
    finish = answer["choices"][0]["finish_reason"] if answer.get("choices") else None
    full = context_window_exceeded(answer, max_tokens)
    return map_stop_reason(finish, False, None, [], context_full=full)[0]


@pytest.mark.parametrize(
    ("answer", "max_tokens", "expected"),
    [
        (
            llamacpp_final(11, verbose=limit_stop(True, 11, 4096)),
            None,
            "model_context_window_exceeded",
        ),
        (
            llamacpp_final(11, verbose=limit_stop(True, 11, -1)),
            None,
            "model_context_window_exceeded",
        ),
        (
            llamacpp_final(4096, verbose=limit_stop(True, 4096, 4096)),
            None,
            "max_tokens",
        ),
        (
            llamacpp_final(11, verbose=limit_stop(False, 11, 4096)),
            None,
            "max_tokens",
        ),
        (llamacpp_final(11), 4096, "model_context_window_exceeded"),
        (llamacpp_final(4096), 4096, "max_tokens"),
        (llamacpp_final(11), None, "max_tokens"),
    ],
    ids=[
        "verbose_truncated_before_n_predict",
        "verbose_truncated_unbounded",
        "verbose_after_a_context_shift_at_n_predict",
        "verbose_not_truncated",
        "timings_short_of_max_tokens",
        "timings_at_max_tokens",
        "timings_without_max_tokens_known",
    ],
)
def test_llamacpp_length_stop_is_the_context_windows_only_when_its_answer_says_so(
    answer: dict, max_tokens: int | None, expected: str
) -> None:
    assert stop_reason_of(answer, max_tokens) == expected


@pytest.mark.parametrize("finish_reason", ["model_length", "model_context_window_exceeded"])
def test_a_finish_reason_naming_the_full_context_maps_to_model_context_window_exceeded(
    finish_reason: str,
) -> None:
    assert map_stop_reason(finish_reason, False, None, [])[0] == "model_context_window_exceeded"
    assert context_window_exceeded({"choices": [{"finish_reason": finish_reason}]})


def test_evidence_of_a_full_context_changes_only_a_length_stop() -> None:
    assert map_stop_reason("length", False, None, [], context_full=True)[0] == (
        "model_context_window_exceeded"
    )
    assert map_stop_reason("stop", False, None, [], context_full=True)[0] == "end_turn"
    assert map_stop_reason("tool_calls", True, None, [], context_full=True)[0] == "tool_use"


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length", "stop_reason": None}]},
        {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 4096}},
        {"choices": [], "usage": {"prompt_tokens": 10}},
        {"choices": [{"delta": {"content": "x"}, "finish_reason": None}]},
        {"choices": ["not a choice"]},
    ],
    ids=["vllm_finish", "usage_at_max_tokens", "usage_uncounted", "content_delta", "malformed"],
)
def test_a_plain_length_stop_stays_max_tokens(chunk: dict) -> None:
    assert not context_window_exceeded(chunk, max_tokens=4096)


def test_a_length_stop_short_of_max_tokens_by_the_usage_is_the_context_windows() -> None:
    """vLLM 0.32 lowers a max_tokens that does not fit beside the prompt and stops at the
    window's end with "length"; its usage shows fewer tokens than were asked for."""
    answer = {
        "choices": [{"index": 0, "finish_reason": "length", "message": {"content": "x"}}],
        "usage": {"prompt_tokens": 2011, "completion_tokens": 37, "total_tokens": 2048},
    }
    assert stop_reason_of(answer, 100) == "model_context_window_exceeded"
    assert stop_reason_of(answer, 37) == "max_tokens"
    assert context_window_exceeded({"choices": [], "usage": answer["usage"]}, max_tokens=100)
