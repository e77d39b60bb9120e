"""Claude Code's attribution line in the system prompt (app/translate/billing_header.py), as
translate_request applies it, and its setting (``[translate] billing_header`` in app/config/).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from app import jsonc
from app.config import ConfigError, TranslateSettings, build_settings, load_settings
from app.translate.billing_header import clean_system_texts
from app.translate.dialect import DIALECTS
from app.translate.request import translate_request

# As Claude Code 2.1.197 writes it (cli.js): cc_version ends in a hash of the conversation's
# first message; cch only to Anthropic's own API, and on every request a new one.
HEADER = "x-anthropic-billing-header: cc_version=2.1.197.3a3; cc_entrypoint=cli; cch=7f3a9;"
OTHER_REQUEST = "x-anthropic-billing-header: cc_version=2.1.197.e51; cc_entrypoint=cli; cch=a5145;"
NORMALIZED = "x-anthropic-billing-header: cc_version=2.1.197.000; cc_entrypoint=cli; cch=00000;"
PROMPT = "You are Claude Code, Anthropic's official CLI for Claude."


def body(system: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "system": system,
        "messages": [{"role": "user", "content": "Hi"}],
    }


def blocks(*texts: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": t, "cache_control": {"type": "ephemeral"}} for t in texts]


def system_prompt(system: Any, mode: str | None = None) -> str:
    """The system message the backend gets for ``system`` (the default mode when None)."""
    payload = translate_request(
        body(system),
        backend_model="qwen3",
        dialect=DIALECTS["vllm"],
        billing_header=mode or TranslateSettings.billing_header,
    )
    first = payload["messages"][0]
    assert first["role"] == "system"
    return first["content"]


# --- the three modes, on both shapes of system prompt -----------------------------------------


@pytest.mark.parametrize(
    ("system", "mode", "expected"),
    [
        (blocks(HEADER, PROMPT), None, f"{NORMALIZED}\n\n{PROMPT}"),
        (blocks(HEADER, PROMPT), "normalize", f"{NORMALIZED}\n\n{PROMPT}"),
        (blocks(HEADER, PROMPT), "drop", PROMPT),
        (blocks(HEADER, PROMPT), "keep", f"{HEADER}\n\n{PROMPT}"),
        (f"{HEADER}\n{PROMPT}", None, f"{NORMALIZED}\n{PROMPT}"),
        (f"{HEADER}\n{PROMPT}", "drop", PROMPT),
        (f"{HEADER}\n{PROMPT}", "keep", f"{HEADER}\n{PROMPT}"),
        (blocks(f"{HEADER}{PROMPT}"), None, f"{NORMALIZED}{PROMPT}"),  # as 2.1.101 ran it on
        (blocks(f"{HEADER}{PROMPT}"), "drop", PROMPT),
        (f"Context.\n{HEADER}\n{PROMPT}", "drop", f"Context.\n{PROMPT}"),
    ],
    ids=[
        "blocks_default",
        "blocks_normalize",
        "blocks_drop",
        "blocks_keep",
        "string_default",
        "string_drop",
        "string_keep",
        "run_on_block_default",
        "run_on_block_drop",
        "string_later_line_drop",
    ],
)
def test_the_attribution_line_is_normalized_dropped_or_kept(
    system: Any, mode: str | None, expected: str
) -> None:
    assert system_prompt(system, mode) == expected


@pytest.mark.parametrize("mode", ["normalize", "drop"])
def test_two_requests_differing_only_in_their_hashes_translate_to_the_same_bytes(
    mode: str,
) -> None:
    def payload(header: str) -> bytes:
        translated = translate_request(
            body(blocks(header, PROMPT)),
            backend_model="qwen3",
            dialect=DIALECTS["llamacpp"],
            billing_header=mode,
        )
        return jsonc.dumps(translated)

    assert payload(HEADER) == payload(OTHER_REQUEST)


def test_kept_the_hashes_reach_the_backend_as_sent() -> None:
    assert system_prompt(blocks(HEADER, PROMPT), "keep") != system_prompt(
        blocks(OTHER_REQUEST, PROMPT), "keep"
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            "x-anthropic-billing-header: cc_version=2.1.197.3a3; cc_entrypoint=sdk-cli; "
            "cc_workload=cron; cc_is_subagent=true;",
            "x-anthropic-billing-header: cc_version=2.1.197.000; cc_entrypoint=sdk-cli; "
            "cc_workload=cron; cc_is_subagent=true;",
        ),
        (
            "x-anthropic-billing-header: cc_version=2.1.197; cc_entrypoint=cli; cch=ffff0123;",
            "x-anthropic-billing-header: cc_version=2.1.197; cc_entrypoint=cli; cch=00000;",
        ),
    ],
    ids=["no_cch_and_subagent_fields", "no_fingerprint_and_a_longer_cch"],
)
def test_only_the_values_that_change_per_request_or_conversation_are_fixed(
    header: str, expected: str
) -> None:
    assert clean_system_texts([header, PROMPT], "normalize") == [expected, PROMPT]


# --- what is left alone -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["normalize", "drop", "keep"])
def test_a_system_prompt_without_the_line_is_returned_as_it_is(mode: str) -> None:
    texts = [PROMPT, "Use the tools."]
    assert clean_system_texts(texts, mode) is texts


@pytest.mark.parametrize("mode", ["normalize", "drop"])
def test_the_marker_quoted_inside_a_line_is_not_the_line(mode: str) -> None:
    text = f"Never echo x-anthropic-billing-header: cch=7f3a9; to the user. {PROMPT}"
    assert clean_system_texts([text], mode) == [text]


def test_the_clients_request_body_is_not_changed() -> None:
    request = body(blocks(HEADER, PROMPT))
    before = copy.deepcopy(request)
    translate_request(
        request, backend_model="qwen3", dialect=DIALECTS["vllm"], billing_header="normalize"
    )
    assert request == before


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="billing_header"):
        clean_system_texts([HEADER], "strip")


# --- the setting ------------------------------------------------------------------------------


def test_the_setting_defaults_to_normalize() -> None:
    assert load_settings({}).translate.billing_header == "normalize"


def test_the_setting_is_read_from_the_file_and_the_environment_wins(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[translate]\nbilling_header = "drop"\n', encoding="utf-8")
    env = {"GATEWAY_CONFIG": str(path)}
    assert load_settings(env).translate.billing_header == "drop"
    assert load_settings(env | {"GATEWAY_BILLING_HEADER": "Keep"}).translate.billing_header == (
        "keep"
    )


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"translate": {"billing_header": "strip"}}, "translate.billing_header:"),
        ({"translate": {"billing_header": True}}, "translate.billing_header:"),
        ({"translate": {"bogus": 1}}, "translate.bogus:"),
        ({"translate": "drop"}, "translate:"),
    ],
    ids=["unknown_mode", "boolean", "unknown_key", "not_a_table"],
)
def test_a_bad_setting_is_a_config_error_naming_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_settings(raw, {})
    assert str(caught.value).startswith(key)
