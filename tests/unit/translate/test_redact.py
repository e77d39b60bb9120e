"""app.translate.redact: secrets never leave in backend text, configured or only shaped like one."""

from __future__ import annotations

import pytest

from app.config import build_settings
from app.serving.web import secrets_of
from app.translate.redact import MASK, Redactor
from app.translate.upstream_errors import error_from_body, error_from_status

SECRET = "backend-key-7d1f0c2a9b"


@pytest.mark.parametrize(
    "text",
    [
        f"invalid header Authorization: Bearer {SECRET}",
        f"key {SECRET} is not allowed",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
        "x-api-key: sk-ant-api03-AbCdEfGhIjKlMnOp",
        'api_key="abcdefgh12345"',
        "used sk-proj-0123456789abcdefXYZ here",
        "Basic dXNlcjpwYXNzd29yZA==",
    ],
)
def test_secrets_and_token_shapes_are_masked(text: str) -> None:
    redacted = Redactor([SECRET])(text)
    assert MASK in redacted
    for secret in (SECRET, "eyJhbGci", "AbCdEfGh", "abcdefgh12345", "0123456789abcdef", "dXNlcjp"):
        assert secret not in redacted


def test_ordinary_text_is_left_alone() -> None:
    text = "the model skipped a token; bearer of bad news; api keys are configured"
    assert Redactor([SECRET])(text) == text


def test_backend_errors_quote_no_secret(monkeypatch) -> None:
    from app.translate import redact as module

    monkeypatch.setattr(module.redact, "secrets", (SECRET,))
    body = f'{{"error": {{"message": "bad auth header: Bearer {SECRET}"}}}}'.encode()
    assert SECRET not in error_from_status(400, body, {}, "gpu:8000").message
    assert SECRET not in error_from_status(500, body, {}, "gpu:8000").message
    assert SECRET not in error_from_body({"error": {"message": f"key {SECRET}"}}).message


def test_the_configured_secrets_are_the_backend_keys_headers_and_admin_token() -> None:
    settings = build_settings(
        {
            "upstream": {"url": "http://127.0.0.1:1/v1", "api_key": "sk-upstream-1234"},
            "backends": [
                {
                    "name": "b",
                    "url": "http://127.0.0.1:2/v1",
                    "headers": {"X-Team-Token": "team-token-5678"},
                    "proxy": "http://user:proxy-pass-999@127.0.0.1:3128",
                }
            ],
            "admin": {"token": "admin-token-0000"},
        },
        {},
    )
    assert set(secrets_of(settings)) == {
        "sk-upstream-1234",
        "team-token-5678",
        "user:proxy-pass-999",
        "admin-token-0000",
    }
