"""The console at /admin/ under real gunicorn (two workers): every route refuses a request
without a session, every POST one without its CSRF token or from another origin; the session
cookie's flags; a session known to every worker, ended by signing out or by a new admin token;
sign-in attempts held to a rate; key names escaped; the usage page's numbers those of
``python -m app.usage``; failed requests on the Errors page."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from consolesite import (
    ADMIN_TOKEN,
    OPS_KEY,
    booted,
    csrf_of,
    signed_in,
    start,
    wait_reloaded,
    write_config,
)
from fakebackend import FakeBackend, JSONReply, completion
from servers import ROOT, Gunicorn
from waiting import eventually

from app.config import load_settings
from app.console.views import PUBLIC
from app.serving.web import build_app

BODY = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, module_backend: FakeBackend) -> Iterator:
    directory = tmp_path_factory.mktemp("console")
    server = start(directory, module_backend.url)
    yield server, directory
    server.stop()


def console_rules(config: Path) -> list[tuple[str, str]]:
    """Every (method, path) the app's url_map routes to the console, but the public ones."""
    app = build_app(load_settings({"GATEWAY_CONFIG": str(config), "OPS_KEY": OPS_KEY}))
    found = []
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("console.") or rule.endpoint in PUBLIC:
            continue
        assert not rule.arguments, f"{rule}: a console route with arguments needs a case here"
        found += [(method, rule.rule) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return found


def names(keys_file: Path) -> list[str]:
    if not keys_file.exists():
        return []
    return [entry["name"] for entry in tomllib.loads(keys_file.read_text()).get("keys", [])]


def page_with(session: requests.Session, url: str, text: str, **params: object) -> str | None:
    found = session.get(url, params=params).text
    return found if text in found else None


def test_every_console_route_refuses_a_request_without_a_session(site) -> None:
    server, directory = site
    rules = console_rules(directory / "gateway.toml")
    assert ("GET", "/admin/keys") in rules and ("POST", "/admin/keys/revoke") in rules
    assert len(rules) >= 10
    for cookies in ({}, {"gateway_console": "forged-session-id"}):
        for method, path in rules:
            answer = requests.request(
                method,
                server.url + path,
                cookies=cookies,
                headers={"Origin": server.url},
                data={"name": "ops", "csrf": "0" * 64},
                allow_redirects=False,
            )
            where = f"{method} {path} with {cookies}"
            if method == "GET":
                assert answer.status_code == 302, where
                assert answer.headers["Location"].endswith("/admin/sign-in"), where
            else:
                assert answer.status_code == 403, where
            assert "ops" not in answer.text and "csrf" not in answer.text, where
    assert not (directory / "keys.toml").exists()  # no POST reached its view
    partial = requests.get(server.url + "/admin/live", headers={"HX-Request": "true"})
    assert partial.status_code == 403 and "default" not in partial.text


def test_the_json_admin_routes_still_answer_to_the_admin_token_alone(site) -> None:
    server, _ = site
    session = signed_in(server.url)
    assert session.get(server.url + "/admin/usage").status_code == 401  # a cookie is no token
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert requests.get(server.url + "/admin/usage", headers=bearer).json()["group_by"]
    assert requests.get(server.url + "/status", headers=bearer).status_code == 200


def test_a_post_without_its_csrf_token_or_from_another_origin_is_refused(site) -> None:
    server, directory = site
    session = signed_in(server.url)
    csrf = csrf_of(session, server.url)
    url = server.url + "/admin/keys"
    other = signed_in(server.url)  # another session's token is no good either
    refused = [
        session.post(url, data={"name": "a1"}),
        session.post(url, data={"name": "a2", "csrf": "0" * 64}),
        session.post(url, data={"name": "a3", "csrf": csrf_of(other, server.url)}),
        session.post(
            url, data={"name": "a4", "csrf": csrf}, headers={"Origin": "http://evil.test"}
        ),
        session.post(url, data={"name": "a5", "csrf": csrf}, headers={"Origin": "null"}),
    ]
    bare = requests.post(url, data={"name": "a6", "csrf": csrf}, cookies=session.cookies)
    assert [r.status_code for r in [*refused, bare]] == [403] * 6
    keys_file = directory / "keys.toml"
    assert names(keys_file) == []
    before = booted(server)
    same_site = session.post(
        url,
        data={"name": "a7", "csrf": csrf},
        headers={"Origin": None, "Sec-Fetch-Site": "same-origin"},
    )
    assert same_site.status_code == 200 and "sk-gw-" in same_site.text
    assert names(keys_file) == ["a7"]
    wait_reloaded(server, before)


def test_the_session_cookie_is_httponly_samesite_strict_path_scoped_and_secure_over_tls(
    site,
) -> None:
    server, _ = site
    for proto, secure in (("http", False), ("https", True)):
        answer = requests.post(
            server.url + "/admin/sign-in",
            data={"token": ADMIN_TOKEN},
            # As nginx forwards a TLS request (gunicorn trusts 127.0.0.1 for it).
            headers={"X-Forwarded-Proto": proto, "Origin": f"{proto}://127.0.0.1:{server.port}"},
            allow_redirects=False,
        )
        cookie = answer.headers["Set-Cookie"]
        parts = [part.strip() for part in cookie.split(";")]
        assert parts[0].startswith("gateway_console=") and ADMIN_TOKEN not in cookie
        assert "HttpOnly" in parts and "SameSite=Strict" in parts and "Path=/admin/" in parts
        assert ("Secure" in parts) is secure
    page = signed_in(server.url).get(server.url + "/admin/keys")
    policy = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert "script-src 'self'" in policy and page.headers["X-Frame-Options"] == "DENY"
    assert ' style="' not in page.text and "<script>" not in page.text  # nothing inline


def test_a_session_is_known_to_every_worker(site) -> None:
    server, _ = site
    cookie = signed_in(server.url).cookies["gateway_console"]
    seen: set[str] = set()

    def workers() -> set[int]:
        """Workers that answered a batch more of new connections with the session: which
        worker accepts one is up to them, so batches go on until two have."""
        for _ in range(20):
            answer = requests.get(
                server.url + "/admin/keys",
                cookies={"gateway_console": cookie},
                headers={"Connection": "close"},
                allow_redirects=False,
            )
            assert answer.status_code == 200
            seen.add(answer.headers["request-id"])
        found = {line["worker"] for line in server.access_lines() if line["request_id"] in seen}
        return found if len(found) >= 2 else set()

    eventually(workers, "requests with one session answered by two workers")


def test_signing_out_ends_the_session_on_the_server(site) -> None:
    server, _ = site
    session = signed_in(server.url)
    cookie = session.cookies["gateway_console"]
    csrf = csrf_of(session, server.url)
    assert session.post(server.url + "/admin/sign-out", data={"csrf": csrf}).status_code == 200
    replayed = requests.get(
        server.url + "/admin/keys", cookies={"gateway_console": cookie}, allow_redirects=False
    )
    assert replayed.status_code == 302  # the old cookie, kept by an attacker, opens nothing


def test_what_an_operator_typed_is_escaped_on_the_page(site) -> None:
    server, _ = site
    session = signed_in(server.url)
    csrf = csrf_of(session, server.url)
    typed = '<script>alert("x")</script>'
    for form in ({"name": typed}, {"name": "b1", "tokens_per_day": typed}):
        answer = session.post(server.url + "/admin/keys", data={**form, "csrf": csrf})
        assert answer.status_code == 400
        assert "<script>alert" not in answer.text
    assert "&lt;script&gt;alert" in answer.text  # the limit's value, quoted in the refusal


def test_the_usage_page_has_the_numbers_of_the_usage_command(site, module_backend) -> None:
    server, directory = site
    for _ in range(3):
        answer = requests.post(
            server.url + "/v1/messages", json=BODY, headers={"x-api-key": OPS_KEY}
        )
        assert answer.status_code == 200
    session = signed_in(server.url)
    args = {"by": ["day", "key", "model"]}
    csv = eventually(
        lambda: page_with(session, server.url + "/admin/report.csv", "ops,m,3", **args),
        "the three requests in the usage records",
    )
    env = {
        **os.environ,
        "GATEWAY_CONFIG": str(directory / "gateway.toml"),
        "OPS_KEY": OPS_KEY,
        "GATEWAY_STATE_DIR": str((directory / "gunicorn.log").with_suffix(".state")),
    }
    command = [sys.executable, "-m", "app.usage", "--by", "day,key,model", "--format", "csv"]
    printed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert printed.returncode == 0, printed.stderr
    assert csv == printed.stdout
    page = session.get(server.url + "/admin/report", params=args).text
    assert '<script type="application/json" id="chart">' in page and ">ops<" in page
    nobody = session.get(server.url + "/admin/report", params={**args, "key": "nobody"}).text
    assert ">ops<" not in nobody and "No usage in this period" in nobody


def test_failed_requests_are_listed_on_the_errors_page(site) -> None:
    server, _ = site
    refused = requests.post(server.url + "/v1/messages", json=BODY, headers={"x-api-key": "sk-no"})
    assert refused.status_code == 401
    request_id = refused.headers["request-id"]
    session = signed_in(server.url)
    page = eventually(
        lambda: page_with(session, server.url + "/admin/errors", request_id),
        "the refused request on the errors page",
    )
    assert "authentication_error" in page and "sk-no" not in page


def test_sign_in_attempts_are_held_to_a_rate(tmp_path: Path, backend: FakeBackend) -> None:
    server = start(tmp_path, backend.url, workers=1)
    try:
        url = server.url + "/admin/sign-in"
        origin = {"Origin": server.url}
        for _ in range(10):  # a sign-in that succeeds does not count
            assert requests.post(url, data={"token": ADMIN_TOKEN}, headers=origin).ok
        statuses = [
            requests.post(url, data={"token": "guess"}, headers=origin).status_code
            for _ in range(6)
        ]
        assert statuses == [401] * 5 + [429]
        right = requests.post(url, data={"token": ADMIN_TOKEN}, headers={"Origin": server.url})
        assert right.status_code == 429 and "Set-Cookie" not in right.headers
    finally:
        server.stop()


def test_a_new_admin_token_ends_every_session(tmp_path: Path, backend: FakeBackend) -> None:
    server = start(tmp_path, backend.url)
    try:
        cookie = signed_in(server.url).cookies["gateway_console"]
        assert (
            requests.get(
                server.url + "/admin/keys", cookies={"gateway_console": cookie}
            ).status_code
            == 200
        )
        write_config(tmp_path, backend.url, admin_token="a-new-admin-token-9876543210")
        server.process.send_signal(signal.SIGHUP)

        def refused() -> bool:
            answer = requests.get(
                server.url + "/admin/keys",
                cookies={"gateway_console": cookie},
                headers={"Connection": "close"},
                allow_redirects=False,
            )
            return answer.status_code == 302

        eventually(refused, "the old session refused after the new token")
        time.sleep(1)  # every old worker gone
        for _ in range(6):
            assert refused()
        signed_in(server.url, token="a-new-admin-token-9876543210")
    finally:
        server.stop()


def test_the_console_is_off_without_an_admin_token(tmp_path: Path, backend: FakeBackend) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[upstream]\nurl = "{backend.url}"\n')
    server = Gunicorn({"GATEWAY_CONFIG": str(config)}, tmp_path / "gunicorn.log")
    try:
        for path in ("/admin/", "/admin/keys", "/admin/sign-in"):
            assert requests.get(server.url + path, allow_redirects=False).status_code == 404
        answer = requests.post(
            server.url + "/admin/sign-in", data={"token": ""}, headers={"Origin": server.url}
        )
        assert answer.status_code == 404
    finally:
        server.stop()


def hour_requests(session: requests.Session, url: str) -> int:
    page = session.get(url + "/admin/", params={"range": "hour"}).text
    found = re.search(r'<script type="application/json" id="series">(.*?)</script>', page, re.S)
    assert found, "no series on the overview"
    return int(sum(json.loads(found.group(1))["requests"]))


def test_the_overview_counts_the_service_s_requests_of_the_last_hour(site) -> None:
    server, _ = site
    session = signed_in(server.url)
    before = hour_requests(session, server.url)
    for key in (OPS_KEY, "sk-unknown"):  # answered and refused: both count
        requests.post(server.url + "/v1/messages", json=BODY, headers={"x-api-key": key})
    eventually(
        lambda: hour_requests(session, server.url) == before + 2,
        "two more requests in the last hour's counts",
    )


def test_a_session_opened_on_one_host_holds_on_another_sharing_its_redis(
    tmp_path: Path, backend: FakeBackend, redis_server
) -> None:
    first = start(tmp_path / "a", backend.url, workers=1, redis_url=redis_server.url)
    second = start(tmp_path / "b", backend.url, workers=1, redis_url=redis_server.url)
    try:
        session = signed_in(first.url)
        cookie = {"gateway_console": session.cookies["gateway_console"]}
        page = requests.get(second.url + "/admin/errors", cookies=cookie, allow_redirects=False)
        assert page.status_code == 200
        csrf = csrf_of(session, first.url)
        ended = session.post(first.url + "/admin/sign-out", data={"csrf": csrf})
        assert ended.status_code == 200
        again = requests.get(second.url + "/admin/errors", cookies=cookie, allow_redirects=False)
        assert again.status_code == 302  # signed out on one host: out on every host
    finally:
        first.stop()
        second.stop()


def test_a_key_s_limits_and_expiry_are_changed_and_the_change_audited(site) -> None:
    server, directory = site
    session = signed_in(server.url)
    csrf = csrf_of(session, server.url)
    created = session.post(
        server.url + "/admin/keys",
        data={"name": "c1", "csrf": csrf, "requests_per_minute": "60", "burst": "5"},
    )
    assert created.status_code == 200
    key = re.search(r'id="new-key" readonly value="([^"]+)"', created.text).group(1)
    changed = session.post(
        server.url + "/admin/keys/change",
        data={"name": "c1", "csrf": csrf, "tokens_per_day": "5000", "expires": "2031-01-31"},
    )
    assert changed.status_code == 200  # the keys page, after the redirect
    entry = next(
        e for e in tomllib.loads((directory / "keys.toml").read_text())["keys"] if e["name"] == "c1"
    )
    assert entry["tokens_per_day"] == 5000 and entry["expires"] == "2031-01-31T23:59:59Z"
    assert "requests_per_minute" not in entry and "burst" not in entry  # left empty: none
    audit = changed.text[changed.text.index("Audit log") :]
    assert audit.index(">change<") < audit.index(">create<")  # newest first
    assert key not in changed.text and key not in audit


def test_the_batches_page_shows_every_keys_batches_with_progress_and_cancels_one(
    site, module_backend: FakeBackend
) -> None:
    server, _ = site
    before = module_backend.default
    module_backend.default = JSONReply(completion("slow"), delay=5)  # the first item holds
    try:
        params = {**BODY, "messages": [{"role": "user", "content": "batched"}]}
        made = requests.post(
            server.url + "/v1/messages/batches",
            json={"requests": [{"custom_id": f"c{i}", "params": params} for i in range(20)]},
            headers={"x-api-key": OPS_KEY},
            timeout=30,
        )
        assert made.status_code == 200, made.text
        batch_id = made.json()["id"]
        session = signed_in(server.url)
        page = session.get(server.url + "/admin/batches").text
        assert batch_id in page and "in_progress" in page and "ops" in page
        assert 'href="/admin/batches"' in page  # in the navigation
        csrf = csrf_of(session, server.url)
        url = server.url + "/admin/batches/cancel"
        assert session.post(url, data={"id": batch_id}).status_code == 403  # no CSRF token
        canceled = session.post(url, data={"id": batch_id, "csrf": csrf}, allow_redirects=False)
        assert canceled.status_code == 303
        status = requests.get(
            f"{server.url}/v1/messages/batches/{batch_id}",
            headers={"x-api-key": OPS_KEY},
            timeout=30,
        ).json()
        assert status["processing_status"] in ("canceling", "ended")
        assert status["cancel_initiated_at"] is not None
        unknown = session.post(url, data={"id": "msgbatch_none", "csrf": csrf})
        assert unknown.status_code == 404
        audit = session.get(server.url + "/admin/keys").text
        assert "cancel batch" in audit
    finally:
        module_backend.default = before
