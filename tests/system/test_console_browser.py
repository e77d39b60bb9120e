"""The console in a real browser: Debian's chromium, headless, driven by Playwright (no
browser download: ``executable_path`` is the system's chromium). An operator signs in, creates
a key and sees it once, uses it, finds its usage, revokes it and sees it refused; a cross-site
form and a visit without a session get nothing. Each page is saved as a screenshot (at 1280
and 390 pixels wide, light and dark) in the test's temporary directory.

Run them alone with ``-m browser``; they skip where chromium or Playwright is missing."""

from __future__ import annotations

import shutil
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from consolesite import ADMIN_TOKEN, start
from fakebackend import FakeBackend
from waiting import eventually

pytestmark = pytest.mark.browser

BODY = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
# Without the networking flags a closed network refuses chromium's own connections at start.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs these")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=FLAGS)
        yield chromium
        chromium.close()


class Attacker:
    """A page of another origin whose form posts to the console by itself, as a malicious
    site an operator visits while signed in would."""

    def __init__(self, host: str, target: str, fields: dict[str, str]) -> None:
        inputs = "".join(f'<input name="{k}" value="{v}">' for k, v in fields.items())
        page = (
            f'<form id="f" method="post" action="{target}">{inputs}</form>'
            "<script>document.getElementById('f').submit()</script>"
        ).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def revoked(keys_file: Path, name: str) -> bool:
    entries = tomllib.loads(keys_file.read_text()).get("keys", [])
    return any(entry["name"] == name and entry.get("revoked") for entry in entries)


def test_an_operator_manages_a_key_from_creation_to_revocation(
    browser: Any, tmp_path: Path, backend: FakeBackend
) -> None:
    from playwright.sync_api import expect  # (the browser fixture has it, or skips)

    server = start(tmp_path / "site", backend.url)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    url = server.url
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    # A CSP violation or a script error shows as a console error; the refused cross-site
    # posts (403) and the favicon (404) as "Failed to load resource", which is expected here.
    page.on(
        "console",
        lambda message: (
            problems.append(message.text)
            if message.type == "error" and not message.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on("dialog", lambda dialog: dialog.accept())
    try:
        # Without a session every page is the sign-in page.
        page.goto(url + "/admin/keys")
        assert page.url.endswith("/admin/sign-in")
        page.screenshot(path=shots / "sign-in.png", full_page=True)
        page.fill("#token", "not the token")
        page.click("button[type=submit]")
        assert "not the admin token" in page.content()
        page.fill("#token", ADMIN_TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(url + "/admin/")
        assert page.get_by_role("heading", name="Overview").is_visible()

        # A new key, shown once, copied with the button.
        page.click("nav >> text=Keys")
        page.fill("input[name=name]", "intern")
        page.fill("#create input[name=tokens_per_month]", "1000000")
        page.click("#create button[type=submit]")
        key = page.input_value("#new-key")
        assert key.startswith("sk-gw-")
        page.click("button[data-copy]")
        expect(page.locator("button[data-copy]")).to_have_text("Copied")  # once it is copied
        assert page.evaluate("navigator.clipboard.readText()") == key
        page.screenshot(path=shots / "key-created.png", full_page=True)
        page.goto(url + "/admin/keys")
        assert key not in page.content()  # once
        assert key not in (tmp_path / "site" / "keys.toml").read_text()

        # The key works once the workers have reloaded the keys file.
        def answered() -> bool:
            headers = {"x-api-key": key}
            return (
                requests.post(url + "/v1/messages", json=BODY, headers=headers).status_code == 200
            )

        eventually(answered, "the new key let in")
        for _ in range(2):
            assert answered()

        # Its usage on the usage page, with the chart drawn.
        def usage_row() -> bool:
            page.goto(url + "/admin/report?by=key")
            row = page.locator("#usage tbody tr", has_text="intern")
            return row.count() == 1 and row.locator("td").nth(1).inner_text() == "3"

        eventually(usage_row, "intern's three requests on the usage page")
        page.wait_for_selector(".chart canvas")
        page.screenshot(path=shots / "usage.png", full_page=True)

        page.goto(url + "/admin/")
        page.wait_for_selector(".chart[data-drawn=true] canvas")
        assert page.locator(".chart canvas").count() >= 2
        with page.expect_response("**/admin/live", timeout=15000) as polled:
            pass  # htmx fetches the backends table again every 5 s
        assert polled.value.status == 200
        assert page.locator("#backends td", has_text="default").count() == 1
        page.screenshot(path=shots / "overview.png", full_page=True)
        page.goto(url + "/admin/errors")
        page.screenshot(path=shots / "errors.png", full_page=True)
        page.goto(url + "/admin/batches")
        assert page.locator("#batches").count() == 1
        page.screenshot(path=shots / "batches.png", full_page=True)

        # A cross-site form cannot revoke it: without the cookie (another site) or with it
        # (another origin of the same site), the console refuses.
        keys_file = tmp_path / "site" / "keys.toml"
        for host in ("localhost", "127.0.0.1"):
            attacker = Attacker(host, url + "/admin/keys/revoke", {"name": "intern"})
            try:
                answer = page.goto(attacker.url)
                page.wait_for_url(url + "/admin/keys/revoke")
                assert answer is not None
                assert "Forbidden" in page.content()
            finally:
                attacker.close()
        assert not revoked(keys_file, "intern")

        # Revoked from the page (a confirmation first), refused from then on.
        page.goto(url + "/admin/keys")
        row = page.locator("tr[data-key=intern]")
        row.locator("summary").click()
        row.locator("button.danger").click()
        page.wait_for_url(url + "/admin/keys")  # (it was there already: the row tells)
        expect(row.locator(".pill")).to_have_text("revoked")
        assert revoked(keys_file, "intern")
        eventually(lambda: not answered(), "the revoked key refused")
        page.screenshot(path=shots / "keys.png", full_page=True)
        audit = page.locator("section", has_text="Audit log").locator("tbody tr")
        assert audit.nth(0).inner_text().split("\t")[2:4] == ["revoke", "intern"]
        assert audit.nth(1).inner_text().split("\t")[2:4] == ["create", "intern"]

        # The same pages narrow (a phone) and dark.
        narrow = browser.new_context(
            viewport={"width": 390, "height": 844}, color_scheme="dark", storage_state=None
        )
        narrow.add_cookies(context.cookies())
        phone = narrow.new_page()
        for name, path in (
            ("overview", "/admin/"),
            ("keys", "/admin/keys"),
            ("batches", "/admin/batches"),
        ):
            phone.goto(url + path)
            assert phone.url == url + path
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"{name} scrolls sideways at 390 px ({width} px)"
            background = phone.evaluate("getComputedStyle(document.body).backgroundColor")
            assert background == "rgb(15, 18, 22)", background  # the dark palette
            phone.screenshot(path=shots / f"{name}-390-dark.png", full_page=True)
        narrow.close()
        assert problems == [], problems  # no CSP violation, no script error
    finally:
        context.close()
        server.stop()
    print(f"screenshots in {shots}")
