"""A gunicorn gateway with the console on (an admin token, a keys file), and a signed-in
``requests`` session on it, for the console's system and browser tests."""

from __future__ import annotations

import re
from pathlib import Path

import requests
from servers import Gunicorn

ADMIN_TOKEN = "admin-token-for-console-tests-0123456789"
OPS_KEY = "sk-gw-ops-0123456789abcdef"
CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


def write_config(directory: Path, backend_url: str, admin_token: str = ADMIN_TOKEN) -> Path:
    config = directory / "gateway.toml"
    config.write_text(
        f'[upstream]\nurl = "{backend_url}"\n[admin]\ntoken = "{admin_token}"\n'
        f'[auth]\nkeys_file = "{directory / "keys.toml"}"\n'
        '[[auth.keys]]\nname = "ops"\nkey_env = "OPS_KEY"\n'
    )
    return config


def start(directory: Path, backend_url: str, workers: int = 2, redis_url: str = "") -> Gunicorn:
    """A gateway with the console on; with ``redis_url``, on that Redis (one of several
    hosts), else on SQLite in a state directory of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(directory, backend_url)
    env = {"GATEWAY_CONFIG": str(config), "OPS_KEY": OPS_KEY, "GATEWAY_WORKERS": str(workers)}
    if redis_url:
        env["GATEWAY_REDIS_URL"] = redis_url
    return Gunicorn(env, directory / "gunicorn.log")


def signed_in(url: str, token: str = ADMIN_TOKEN) -> requests.Session:
    session = requests.Session()
    session.headers["Origin"] = url
    answer = session.post(f"{url}/admin/sign-in", data={"token": token}, allow_redirects=False)
    assert answer.status_code == 303, (answer.status_code, answer.text[:300])
    return session


def csrf_of(session: requests.Session, url: str) -> str:
    page = session.get(f"{url}/admin/keys")
    assert page.status_code == 200, page.status_code
    found = CSRF.search(page.text)
    assert found, "no CSRF token on the keys page"
    return found.group(1)


def booted(server: Gunicorn) -> int:
    """Workers gunicorn has started so far (a reload starts a new set)."""
    return server.log_path.read_text().count("Booting worker")


def wait_reloaded(server: Gunicorn, before: int, workers: int = 2) -> None:
    """A console change reloads the workers (HUP): wait for the new set, and for the old one
    to be gone, so that the next request does not meet a worker on its way out."""
    from waiting import eventually

    eventually(lambda: booted(server) >= before + workers, "the workers reloaded")
    eventually(
        lambda: server.log_path.read_text().count("Worker exiting") >= before,
        "the old workers gone",
    )
