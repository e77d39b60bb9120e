"""Key management: ``python -m app.keys`` writes the keys file, and a running gunicorn reads it
again on HUP: a created key works and a revoked one stops, with no restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fakebackend import FakeBackend
from servers import ROOT, Gunicorn
from waiting import eventually

from app.config import load_settings

BODY = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def keys(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.keys", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def setup(tmp_path: Path, backend: FakeBackend) -> dict[str, Any]:
    config = tmp_path / "gateway.toml"
    keys_file = tmp_path / "keys.toml"
    config.write_text(
        f'[upstream]\nurl = "{backend.url}"\n[auth]\nkeys_file = "{keys_file}"\n'
        '[[auth.keys]]\nname = "ops"\nkey_env = "OPS_KEY"\n'
    )
    env = {"GATEWAY_CONFIG": str(config), "OPS_KEY": "sk-gw-ops-0123456789"}
    return {"env": env, "keys_file": keys_file, "dir": tmp_path}


def created_key(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("sk-gw-") and len(key) > 40
    return key


def test_create_prints_the_key_once_and_keeps_only_its_digest(setup) -> None:
    result = keys(
        setup["env"], "create", "alice", "--expires", "30d", "--limit", "max_concurrent=2"
    )
    key = created_key(result)
    text = setup["keys_file"].read_text()
    assert key not in text and "sha256" in text and key not in result.stderr
    assert "systemctl reload" in result.stderr
    assert oct(setup["keys_file"].stat().st_mode & 0o777) == "0o640"
    settings = load_settings(setup["env"])
    alice = next(k for k in settings.keys if k.name == "alice")
    assert alice.limits.max_concurrent == 2
    assert alice.expires is not None and 29 * 86400 < alice.expires - time.time() <= 30 * 86400
    assert tomllib.loads(text)["keys"][0]["created"].endswith("Z")


def test_list_shows_every_key_and_its_state(setup) -> None:
    created_key(keys(setup["env"], "create", "alice"))
    created_key(keys(setup["env"], "create", "bob", "--expires", "2020-01-01"))
    created_key(keys(setup["env"], "create", "carol"))
    assert keys(setup["env"], "revoke", "carol").returncode == 0
    listing = keys(setup["env"], "list")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows["ops"][1] == "active" and rows["ops"][3] == "config"
    assert rows["alice"][1] == "active"
    assert rows["bob"][1:3] == ["expired", "2020-01-01T00:00:00Z"]
    assert rows["carol"][1] == "revoked"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create", "alice"), "a key named 'alice' exists"),
        (("create", "a b"), "name"),
        (("create", "x", "--limit", "speed=9"), "--limit 'speed=9'"),
        (("create", "x", "--expires", "soon"), "--expires: must be a date"),
        (("revoke", "ops"), "a key of the configuration file is revoked there"),
        (("revoke", "nobody"), "no key 'nobody'"),
    ],
)
def test_mistakes_are_one_line_errors_and_change_nothing(setup, args, message) -> None:
    created_key(keys(setup["env"], "create", "alice"))
    before = setup["keys_file"].read_text()
    result = keys(setup["env"], *args)
    assert result.returncode == 1 and not result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr
    assert setup["keys_file"].read_text() == before


def test_without_a_keys_file_configured_create_says_where_to_set_it(tmp_path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[upstream]\nurl = "http://127.0.0.1:9/v1"\n')
    result = keys({"GATEWAY_CONFIG": str(config)}, "create", "alice")
    assert result.returncode == 1 and "set [auth] keys_file" in result.stderr


# --- the running gateway reads the file again on HUP -----------------------------------------


@pytest.fixture
def gateway(setup) -> Iterator[Gunicorn]:
    server = Gunicorn({**setup["env"], "GATEWAY_WORKERS": "2"}, setup["dir"] / "gunicorn.log")
    yield server
    server.stop()


def status(gateway: Gunicorn, key: str) -> int:
    headers = {"x-api-key": key, "connection": "close"}
    return requests.post(
        gateway.url + "/v1/messages", json=BODY, headers=headers, timeout=10
    ).status_code


def reload(gateway: Gunicorn, key: str, expected: int) -> None:
    """HUP the master, then wait until every worker answers ``key`` with ``expected``."""
    gateway.process.send_signal(signal.SIGHUP)
    eventually(
        lambda: all(status(gateway, key) == expected for _ in range(6)),
        f"after HUP the key still does not answer {expected}",
    )


def test_a_key_created_then_revoked_takes_effect_on_hup(setup, gateway) -> None:
    key = created_key(keys(setup["env"], "create", "alice"))
    assert status(gateway, key) == 401  # not before the reload
    reload(gateway, key, 200)
    assert keys(setup["env"], "revoke", "alice").returncode == 0
    reload(gateway, key, 401)
    refused = requests.post(
        gateway.url + "/v1/messages", json=BODY, headers={"x-api-key": key}, timeout=10
    )
    assert refused.json()["error"] == {
        "type": "authentication_error",
        "message": "this API key was revoked",
    }
    assert refused.headers["x-should-retry"] == "false"
    assert status(gateway, setup["env"]["OPS_KEY"]) == 200  # the others never stopped


def test_a_broken_keys_file_on_hup_keeps_the_last_good_keys(setup, gateway) -> None:
    key = created_key(keys(setup["env"], "create", "alice"))
    reload(gateway, key, 200)
    setup["keys_file"].write_text("[[keys]]\nname = \n")  # an editor's half-saved file
    said = gateway.log_path.read_text().count("keys_file")
    gateway.process.send_signal(signal.SIGHUP)
    eventually(
        lambda: gateway.log_path.read_text().count("keys_file") > said, "the master saying why"
    )
    assert gateway.process.poll() is None
    assert all(status(gateway, key) == 200 for _ in range(6))
