"""An unmodified Claude Code CLI, headless and offline, through real gunicorn to the fake backend.

The backend plays the model: its first answer calls Claude Code's own ``Bash`` tool, so the CLI
runs the command and sends the ``tool_result`` back; its second answer ends the session. That is
a complete agent loop, with Claude Code's real request shapes (24 tools with 2020-12 schemas,
adaptive thinking, effort, context_management, ``role: "system"`` inside messages, streaming).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakebackend import FakeBackend, StreamReply, chunk, chunks
from servers import ROOT, Gunicorn

CLAUDE = ROOT / "tests" / "system" / "e2e" / "node_modules" / ".bin" / "claude"
# Everything that would make the CLI talk to anything but the gateway is switched off.
OFFLINE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "TERM": "dumb",
    "LANG": "C.UTF-8",
    "ANTHROPIC_API_KEY": "gateway-test",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_BUG_COMMAND": "1",
    "CLAUDE_CODE_SKIP_VERSION_CHECK": "1",
    "IS_SANDBOX": "1",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[FakeBackend, Gunicorn]]:
    if not CLAUDE.exists():
        if os.environ.get("CI"):
            pytest.fail(
                "tests/system/e2e/node_modules is required in CI (scripts/test installs it)"
            )
        pytest.skip("Claude Code is not installed; run ./scripts/test")
    with FakeBackend() as backend:
        log = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
        server = Gunicorn(
            {"GATEWAY_UPSTREAM_URL": backend.url, "GATEWAY_UPSTREAM_MODEL": "qwen3"}, log
        )
        try:
            yield backend, server
        finally:
            server.stop()


def run_claude(
    server: Gunicorn,
    workdir: Path,
    home: Path,
    prompt: str,
    credentials: dict[str, str] | None = None,
    check: bool = True,
) -> dict:
    """``credentials`` replace the default ANTHROPIC_API_KEY."""
    env = {**OFFLINE_ENV, "HOME": str(home), "ANTHROPIC_BASE_URL": server.url}
    if credentials is not None:
        del env["ANTHROPIC_API_KEY"]
        env.update(credentials)
    result = subprocess.run(
        [str(CLAUDE), "-p", prompt, "--output-format", "json", "--dangerously-skip-permissions"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def bash_call(command: str) -> list[dict]:
    arguments = json.dumps({"command": command, "description": "write the file"})
    first = {
        "index": 0,
        "id": "call_e2e",
        "type": "function",
        "function": {"name": "Bash", "arguments": ""},
    }
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "The user wants a file written."}),
        chunk({"content": "Writing it."}),
        chunk({"tool_calls": [first]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[:20]}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[20:]}}]}),
        chunk({}, "tool_calls"),
    ]


def test_claude_code_runs_a_tool_loop_through_the_gateway(stack, tmp_path):
    backend, server = stack
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    backend.reply(
        StreamReply(bash_call("echo gateway-e2e > out.txt"), delay=0.01),
        StreamReply(chunks(["All ", "done."]), delay=0.01),
    )
    output = run_claude(server, workdir, home, "write the file")

    assert output["is_error"] is False, output
    assert output["result"] == "All done."
    assert (workdir / "out.txt").read_text() == "gateway-e2e\n"

    first, second = (r.json for r in backend.requests[-2:])
    assert first["model"] == "qwen3" and first["stream"] is True
    assert "Bash" in [tool["function"]["name"] for tool in first["tools"]]
    assert first["messages"][0]["role"] == "system"
    assert all(m["role"] != "system" for m in first["messages"][1:])
    roles = [m["role"] for m in second["messages"]]
    assert roles[-2:] == ["assistant", "tool"]
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_e2e"
    assert second["messages"][-1]["tool_call_id"] == "call_e2e"


TEAM_KEY = "sk-gw-team-e2e-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_stack(stack, tmp_path_factory) -> Iterator[tuple[FakeBackend, Gunicorn]]:
    """The same backend behind a gateway that wants a client key."""
    backend, _ = stack
    log = tmp_path_factory.mktemp("gunicorn-keys") / "gunicorn.log"
    digest = hashlib.sha256(TEAM_KEY.encode()).hexdigest()
    env = {
        "GATEWAY_UPSTREAM_URL": backend.url,
        "GATEWAY_UPSTREAM_MODEL": "qwen3",
        "GATEWAY_API_KEYS": f"team:{digest}",
    }
    server = Gunicorn(env, log)
    try:
        yield backend, server
    finally:
        server.stop()


@pytest.mark.parametrize("variable", ["ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY"])
def test_claude_code_gets_in_with_a_client_key(keyed_stack, tmp_path, variable):
    backend, server = keyed_stack
    backend.reply(StreamReply(chunks(["Keyed ", "in."]), delay=0.01))
    output = run_claude(server, tmp_path, tmp_path, "say hi", {variable: TEAM_KEY})
    assert output["is_error"] is False, output
    assert output["result"] == "Keyed in."
    lines = [e for e in server.access_lines() if e.get("path") == "/v1/messages"]
    assert lines and all(e["key"] == "team" and e["status"] == 200 for e in lines)


def test_claude_code_with_a_wrong_key_is_refused(keyed_stack, tmp_path):
    backend, server = keyed_stack
    sent = len(backend.requests)
    output = run_claude(
        server, tmp_path, tmp_path, "say hi", {"ANTHROPIC_AUTH_TOKEN": "sk-wrong"}, check=False
    )
    assert output["is_error"] is True, output
    assert len(backend.requests) == sent
    refused = [e for e in server.access_lines() if e.get("status") == 401]
    assert refused and all(e["key"] is None for e in refused)
