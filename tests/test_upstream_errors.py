"""Backend failures -> Anthropic errors (app/translate/upstream_errors.py, app/errors.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app import errors
from app.errors import GatewayError, field_error
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
    ("status", "body"),
    [
        (
            400,
            openai_error(
                "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 130412 tokens. Please reduce the length of the messages.",
                type="invalid_request_error",
                param="messages",
                code="context_length_exceeded",
            ),
        ),
        (
            400,
            openai_error(
                "This model's maximum context length is 4096 tokens. However, you requested "
                "5000 tokens (4000 in the messages, 1000 in the completion). Please reduce the "
                "length of the messages or completion.",
                type="BadRequestError",
                param=None,
                code=400,
            ),
        ),
        (
            400,
            {
                "object": "error",
                "message": "This model's maximum context length is 2048 tokens. However, you "
                "requested 2100 tokens in the messages.",
                "type": "BadRequestError",
                "code": 400,
            },
        ),
        (
            422,
            openai_error("Request has too many tokens for the context window (n_ctx=4096)"),
        ),
    ],
    ids=["openai", "vllm", "vllm_flat_old", "other_wording_422"],
)
def test_context_overflow_says_prompt_is_too_long(status: int, body: dict) -> None:
    error = from_status(status, body)
    assert (error.status, error.error_type) == (400, "invalid_request_error")
    assert error.message.startswith("prompt is too long")
    assert "maximum context length" in error.message or "context window" in error.message


@pytest.mark.parametrize(
    "body",
    [
        {
            "error": {
                "code": 400,
                "message": "request (5000 tokens) exceeds the available context size "
                "(4096 tokens), try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": 5000,
                "n_ctx": 4096,
            }
        },
        openai_error(
            "Input tokens exceed the configured limit of 272000 tokens. Your messages resulted "
            "in 300000 tokens. Please reduce the length of the messages.",
            type="invalid_request_error",
            param="messages",
            code="context_length_exceeded",
        ),
    ],
    ids=["llamacpp_exceed_context_size_error", "openai_code_only"],
)
def test_context_overflow_is_recognised_by_error_code_or_type(body: dict) -> None:
    error = from_status(400, body)
    assert error.error_type == "invalid_request_error"
    assert error.message.startswith("prompt is too long")


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
