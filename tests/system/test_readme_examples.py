"""The README's "Use it" examples run as a newcomer copies them: each Python block on its own
(imports, client, tools and loop included), and the curl commands, against a gateway on the
fake backend. Only the gateway's address is changed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fakebackend import JSONReply, completion
from inprocess import GatewayServer

README = Path(__file__).resolve().parents[2] / "README.md"
ADDRESS = "http://127.0.0.1:8082"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def use_it_blocks(language: str) -> list[str]:
    """The fenced blocks of one language in the README's "Use it" section."""
    text = README.read_text()
    section = text[text.index("## Use it\n") : text.index("\n## ", text.index("## Use it\n") + 1)]
    return [body for lang, body in FENCE.findall(section) if lang == language]


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    """A command in the test's environment, without any ``GATEWAY_KEY`` but the one given."""
    return subprocess.run(
        command,
        env={k: v for k, v in os.environ.items() if k != "GATEWAY_KEY"} | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def python_block(block: str, gateway: GatewayServer) -> subprocess.CompletedProcess:
    assert ADDRESS in block, "the example should name the gateway's address"
    return run([sys.executable, "-c", block.replace(ADDRESS, gateway.url)])


def test_the_readme_has_two_python_examples_and_two_curl_commands():
    assert len(use_it_blocks("python")) == 2
    curls = use_it_blocks("sh")
    assert len(curls) == 2 and "-N " in curls[1] and '"stream": true' in curls[1]


def test_the_first_python_example_runs_on_its_own(make_gateway):
    done = python_block(use_it_blocks("python")[0], make_gateway())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello") and done.stdout.rstrip().endswith("end_turn")


def test_the_tool_loop_example_runs_on_its_own(make_gateway, backend):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    backend.reply(
        JSONReply(
            completion(None, finish_reason="tool_calls", extra_message={"tool_calls": [call]})
        ),
        JSONReply(completion("It is 3°C and cloudy in Oslo.")),
    )
    done = python_block(use_it_blocks("python")[1], make_gateway())
    assert done.returncode == 0, done.stderr
    assert done.stdout == "It is 3°C and cloudy in Oslo.\n"
    tool_turn = backend.requests[-1].json["messages"][-1]
    assert tool_turn == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "3°C and cloudy in Oslo",
    }


def curls(gateway: GatewayServer, **env: str) -> list[subprocess.CompletedProcess]:
    """The README's curl commands, run by bash as a reader pastes them."""
    done = []
    for block in use_it_blocks("sh"):
        assert block.startswith("curl ") and ADDRESS in block
        done.append(run(["bash", "-c", block.replace(ADDRESS, gateway.url)], **env))
    return done


def assert_answered(whole: subprocess.CompletedProcess, streamed: subprocess.CompletedProcess):
    assert whole.returncode == 0, whole.stderr
    message = json.loads(whole.stdout)
    assert message["type"] == "message" and message["content"][0]["text"] == "Hello"
    assert streamed.returncode == 0, streamed.stderr
    events = re.findall(r"^event: (\w+)$", streamed.stdout, re.MULTILINE)
    assert events[0] == "message_start" and events[-1] == "message_stop"


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@needs_curl
def test_the_curl_commands_work_without_client_keys(make_gateway):
    assert_answered(*curls(make_gateway()))


@needs_curl
def test_the_curl_commands_send_the_client_key_from_gateway_key(backend):
    key = "sk-readme-example"
    digest = hashlib.sha256(key.encode()).hexdigest()
    keys = {"keys": [{"name": "readme", "sha256": digest}]}
    gateway = GatewayServer({"upstream": {"url": backend.url}, "auth": keys})
    try:
        refused = curls(gateway)
        assert_answered(*curls(gateway, GATEWAY_KEY=key))
    finally:
        gateway.close()
    for done in refused:
        assert json.loads(done.stdout)["error"]["type"] == "authentication_error"
