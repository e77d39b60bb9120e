"""Two real llama.cpp replicas behind an ``affinity`` route: each conversation's follow-up
turns are served from the prompt cache of the replica that served its earlier turns.

Each conversation carries a file of its own (a few hundred tokens) after the shared system
prompt, so only the replica that evaluated it before can answer a follow-up from its cache;
any other replica would have the shared system prompt at most. Skipped, with the command that
builds the server, when scripts/llama-server has not been run."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
from llama import BUILD_HINT, LlamaServer, llama_dir
from servers import Gunicorn
from waiting import eventually

from app.config import API_KEYS_ENV, ENV_OVERRIDES

pytestmark = pytest.mark.llama_cpp

SYSTEM = "You are Claude Code, a CLI for software engineering. Keep answers short.\n" + "\n".join(
    f"- Rule {i}: prefer editing existing files, and run the tests before saying it is done."
    for i in range(12)
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[tuple[Gunicorn, list[LlamaServer]]]:
    home = llama_dir()
    if home is None:
        if os.environ.get("CI"):
            pytest.fail(f"{BUILD_HINT}; .ci/run builds it before the tests")
        pytest.skip(BUILD_HINT)
    logs = tmp_path_factory.mktemp("llama-fleet")
    with ExitStack() as stack:
        replicas = []
        for i in range(2):
            replica = LlamaServer(home, logs / f"replica{i}.log", ctx=4096, slots=2)
            stack.callback(replica.stop)
            replicas.append(replica)
        config = _config(logs / "gateway.toml", replicas)
        blank = {v: "" for v in (*ENV_OVERRIDES, API_KEYS_ENV) if v != "GATEWAY_STATE_DIR"}
        env = {**blank, "GATEWAY_CONFIG": str(config), "GATEWAY_WORKERS": "2"}
        gateway = Gunicorn(env, logs / "gateway.log")
        stack.callback(gateway.stop)
        yield gateway, replicas


def _config(path: Path, replicas: list[LlamaServer]) -> Path:
    lines = []
    for i, replica in enumerate(replicas):
        lines += ["[[backends]]", f'name = "r{i}"', f'url = "{replica.v1}"', 'dialect = "llamacpp"']
    lines += [
        "[[routes]]",
        'name = "fleet"',
        'match = "*"',
        'strategy = "affinity"',
        'targets = [{ backend = "r0" }, { backend = "r1" }]',
        "[routing]",
        "retries = 0",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _file(name: str) -> str:
    return "\n".join(f"{name}_{i} = compute_{name}({i}) + offset_{i % 7}" for i in range(60))


def _send(gateway: Gunicorn, messages: list[dict[str, Any]]) -> dict[str, Any]:
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 8,
        "temperature": 0,
        "system": SYSTEM,
        "messages": messages,
    }
    # A whole prompt evaluated on one thread of a machine busy with other work can take
    # minutes; the test is about which replica had it cached, not how fast.
    response = requests.post(f"{gateway.url}/v1/messages", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def _send_to(gateway: Gunicorn) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    return lambda messages: _send(gateway, messages)


def test_follow_up_turns_are_served_from_their_replicas_cache(fleet):
    gateway, _ = fleet
    names = ["alpha", "beta", "gamma", "delta"]
    conversations: dict[str, list[dict[str, Any]]] = {
        name: [{"role": "user", "content": f"Read this file:\n{_file(name)}\nWhat does it do?"}]
        for name in names
    }
    prompts: dict[str, list[int]] = {name: [] for name in names}
    cached: dict[str, list[int]] = {name: [] for name in names}
    for turn in range(3):
        if turn == 0:  # the first turns at once: new conversations go to the least busy
            with ThreadPoolExecutor(4) as pool:
                answers = pool.map(_send_to(gateway), conversations.values())
                firsts = dict(zip(names, answers, strict=True))
        for name in names:  # then the conversations interleaved, as several users' would be
            answer = firsts[name] if turn == 0 else _send(gateway, conversations[name])
            usage = answer["usage"]
            prompts[name].append(usage["input_tokens"] + usage["cache_read_input_tokens"])
            cached[name].append(usage["cache_read_input_tokens"])
            text = "".join(b.get("text", "") for b in answer["content"]) or "ok"
            conversations[name] = conversations[name] + [
                {"role": "assistant", "content": text},
                {"role": "user", "content": f"Turn {turn + 1}: and line {turn} of {name}?"},
            ]

    def lines() -> list[dict[str, Any]]:
        found = [x for x in gateway.access_lines() if x["path"] == "/v1/messages"]
        return found if len(found) >= 12 else []

    logged = eventually(lines, "12 access lines")
    backends = {x["backend"] for x in logged}
    assert backends == {"r0", "r1"}  # the four conversations share the two replicas
    assert sorted(x["routed"] for x in logged) == ["new"] * 4 + ["prefix"] * 8
    for name in names:
        assert prompts[name][0] > 500  # the shared prompt and its own file
        for turn in (1, 2):
            # Everything the previous turn sent comes from the cache, its file included.
            assert cached[name][turn] >= prompts[name][turn - 1] - 4, (name, cached, prompts)
