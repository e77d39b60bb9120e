"""The console in process: a keys file it cannot write is a refusal on the keys page that says
why, never a 500, and nothing else changes."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import load_settings
from app.serving.web import build_app

TOKEN = "admin-token-in-process-0123456789"


def test_a_keys_file_the_console_cannot_write_is_a_refusal_that_says_why(
    tmp_path: Path, backend
) -> None:
    config = tmp_path / "gateway.toml"
    missing = tmp_path / "no-such-directory" / "keys.toml"
    config.write_text(
        f'[upstream]\nurl = "{backend.url}"\n[admin]\ntoken = "{TOKEN}"\n'
        f'[auth]\nkeys_file = "{missing}"\n'
    )
    app = build_app(load_settings({"GATEWAY_CONFIG": str(config)}))
    client = app.test_client()
    origin = {"Origin": "http://localhost"}
    signed = client.post("/admin/sign-in", data={"token": TOKEN}, headers=origin)
    assert signed.status_code == 303
    page = client.get("/admin/keys").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    answer = client.post("/admin/keys", data={"name": "a", "csrf": csrf}, headers=origin)
    assert answer.status_code == 400
    text = answer.get_data(as_text=True)
    assert "cannot write the keys file" in text and "No such file or directory" in text
    assert not missing.parent.exists()
