"""The gunicorn master's last good config: kept in its memory for reloads (HUP), never in the
environment, where every worker, every child process and a new binary started with USR2 would
find the backend key and the admin token, and where USR2 would take its first start for a
reload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fakebackend import FakeBackend
from servers import ROOT, Gunicorn
from waiting import eventually, wait_until_ready

API_KEY = "sk-inline-backend-key-5f1e0c"
ADMIN_TOKEN = "admin-token-inline-9a7b3d"


def good_config(backend: FakeBackend) -> str:
    return (
        f'[upstream]\nurl = "{backend.url}"\napi_key = "{API_KEY}"\n'
        f'[admin]\ntoken = "{ADMIN_TOKEN}"\n'
    )


def environ_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(p) for p in text.split()}


def is_master(pid: int) -> bool:
    """A master started by USR2 is an exec'd child; workers are forks without GUNICORN_PID."""
    try:
        return b"\0GUNICORN_PID=" in b"\0" + environ_of(pid)
    except (FileNotFoundError, ProcessLookupError):
        return False


def assert_no_secret(pids: set[int]) -> None:
    assert pids
    for pid in pids:
        environ = environ_of(pid)
        assert API_KEY.encode() not in environ, pid
        assert ADMIN_TOKEN.encode() not in environ, pid
        assert b"GATEWAY_LAST_GOOD_CONFIG" not in environ, pid


@pytest.fixture
def gateway(module_backend: FakeBackend, tmp_path: Path) -> Iterator[tuple[Gunicorn, Path]]:
    config = tmp_path / "gateway.toml"
    config.write_text(good_config(module_backend))
    env = {"GATEWAY_CONFIG": str(config), "GATEWAY_GRACEFUL_TIMEOUT": "2"}
    server = Gunicorn(env, tmp_path / "gunicorn.log")
    started: list[int] = []
    try:
        yield server, config
    finally:
        for pid in children(server.process.pid):
            if is_master(pid):
                started.append(pid)
                os.kill(pid, signal.SIGTERM)
        try:
            eventually(
                lambda: not any(p in children(server.process.pid) for p in started),
                "the new masters gone",
            )
        finally:
            server.stop()


def hup(server: Gunicorn) -> None:
    """Reload and wait until the workers are new ones that answer."""
    before = children(server.process.pid)
    os.kill(server.process.pid, signal.SIGHUP)
    eventually(lambda: children(server.process.pid) - before, "new workers")
    eventually(lambda: not before & children(server.process.pid), "the old workers gone")
    wait_until_ready(
        lambda: requests.get(server.url + "/healthz", timeout=10).status_code == 200,
        "the reloaded gateway",
        process=server.process,
        log=server.log_path,
    )


def usr2(server: Gunicorn) -> int:
    """Start a new binary as an operator upgrading would; the new master's pid while it runs."""
    os.kill(server.process.pid, signal.SIGUSR2)
    found = eventually(
        lambda: [p for p in children(server.process.pid) if is_master(p)], "a new master"
    )
    return found[0]


def test_no_worker_or_new_binary_inherits_the_keys_in_its_environment(gateway) -> None:
    server, _ = gateway
    master = server.process.pid
    assert_no_secret({master, *children(master)})
    hup(server)
    assert_no_secret({master, *children(master)})
    new_master = usr2(server)
    eventually(lambda: children(new_master), "the new master's workers")
    assert_no_secret({new_master, *children(new_master)})


def test_a_new_binary_started_after_a_reload_fails_on_a_broken_config(gateway) -> None:
    """USR2 starts the gateway afresh: a broken file stops that new master with one line (the
    old one serves on), as any first start; it is not a reload that keeps an old config."""
    server, config = gateway
    hup(server)
    config.write_text("[upstream\nbroken")
    os.kill(server.process.pid, signal.SIGUSR2)
    eventually(
        lambda: "gateway: bad configuration" in server.log_path.read_text(),
        "the new master's refusal logged",
    )
    log = server.log_path.read_text()
    assert "keeping the last good one" not in log
    assert "gateway: bad configuration: GATEWAY_CONFIG=" in log
    eventually(
        lambda: not [p for p in children(server.process.pid) if is_master(p)],
        "the new master gone",
    )
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_a_reload_with_a_broken_file_keeps_the_last_good_config_from_memory(
    gateway, module_backend
) -> None:
    server, config = gateway
    config.write_text("[upstream\nbroken")
    hup(server)
    eventually(
        lambda: "keeping the last good one" in server.log_path.read_text(), "the reload's refusal"
    )
    reply = requests.post(
        server.url + "/v1/messages",
        json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    assert module_backend.requests[-1].headers["authorization"] == f"Bearer {API_KEY}"


CHECK_IN_PROCESS = """
import json, os, sys
from app.config import load_settings_or_last_good, validate_for_master
path = sys.argv[1]
before = dict(os.environ)
first = validate_for_master(os.environ)
changed = {k for k in os.environ if os.environ.get(k) != before.get(k)}
open(path, "w").write("[upstream\\nbroken")
second = validate_for_master(os.environ)
kept = load_settings_or_last_good()
print(json.dumps({"first": first, "second": bool(second), "changed": sorted(changed),
                  "kept": kept.upstream.api_key == sys.argv[2], "admin": kept.admin_token}))
"""


def test_the_master_keeps_the_last_good_config_without_writing_the_environment(
    tmp_path: Path,
) -> None:
    """What gunicorn.conf.py calls, in a process of its own (the held config is per process)."""
    import json

    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[upstream]\nurl = "http://127.0.0.1:1/v1"\napi_key = "{API_KEY}"\n'
        f'[admin]\ntoken = "{ADMIN_TOKEN}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-c", CHECK_IN_PROCESS, str(config), API_KEY],
        cwd=ROOT,
        env={**os.environ, "GATEWAY_CONFIG": str(config), "GATEWAY_STATE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = json.loads(result.stdout)
    assert found == {
        "first": None,
        "second": True,
        "changed": [],
        "kept": True,
        "admin": ADMIN_TOKEN,
    }
