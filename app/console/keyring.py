"""The console's view of the client keys and its changes to them: the keys file the CLI
writes (app/keys.py, the same lock), an audit log in the store of every change (who, what,
when; never the key), and a reload of the workers so that every one of them takes it."""

from __future__ import annotations

import calendar
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app import jsonc
from app.config import LIMIT_FIELDS, ClientKey, ConfigError, Settings, build_settings
from app.errors import GatewayError
from app.keys import KeysFileError, read_keys
from app.state.guard import GuardedStore

AUDIT = "audit"  # the store's log of key changes
AUDIT_KEPT = 1000


@dataclass
class KeyRow:
    name: str
    source: str  # "keys file" (the console may change it) or "config"
    state: str  # active, revoked or expired
    expires: float | None
    created: str
    limits: dict[str, float] = field(default_factory=dict)
    month_tokens: int = 0
    day_tokens: int = 0


def key_rows(settings: Settings, store: GuardedStore, now: float) -> tuple[list[KeyRow], str]:
    """Every key the gateway knows (the keys file read now, then the configuration's), with
    this month's and today's tokens; and a problem with the keys file, if there is one."""
    problem = ""
    entries: list[dict[str, Any]] = []
    from_file: tuple[ClientKey, ...] = ()
    if settings.keys_file:
        try:
            entries = read_keys(settings.keys_file)
            from_file = build_settings({"auth": {"keys": entries}}, {}).keys
        except (KeysFileError, ConfigError) as exc:
            problem = str(exc)
    created = {str(e.get("name")): str(e.get("created", "")) for e in entries}
    names = {key.name for key in from_file}
    rows = [_row(key, "keys file", created.get(key.name, ""), now) for key in from_file]
    rows += [_row(key, "config", "", now) for key in settings.keys if key.name not in names]
    _add_use(rows, store, now)
    return rows, problem


def _row(key: ClientKey, source: str, created: str, now: float) -> KeyRow:
    state = "active"
    if key.revoked:
        state = "revoked"
    elif key.expires is not None and now >= key.expires:
        state = "expired"
    limits = {name: float(getattr(key.limits, name)) for name in LIMIT_FIELDS}
    return KeyRow(key.name, source, state, key.expires, created, limits)


def _add_use(rows: list[KeyRow], store: GuardedStore, now: float) -> None:
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    try:
        records = store.usage(today[:8] + "01", today, None, None)
    except GatewayError:
        return  # the store is down: no use shown
    by_name = {row.name: row for row in rows}
    for record in records:
        row = by_name.get(record.key)
        if row is not None:
            tokens = record.input_tokens + record.output_tokens
            row.month_tokens += tokens
            if record.day == today:
                row.day_tokens += tokens


def limits_from(form: Mapping[str, str]) -> dict[str, int | float]:
    """The limits fields of a form; empty or 0 means none."""
    found: dict[str, int | float] = {}
    for name in LIMIT_FIELDS:
        text = (form.get(name) or "").strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            raise KeysFileError(f"{name}: {text!r} is not a number") from None
        if value < 0 or value != value or value == float("inf"):
            raise KeysFileError(f"{name}: give a number of 0 or more")
        if value:
            found[name] = int(value) if value.is_integer() else value
    return found


def expiry_from(form: Mapping[str, str]) -> float | None:
    """The form's expiry day (``YYYY-MM-DD``, the end of that UTC day), or None: never."""
    text = (form.get("expires") or "").strip()
    if not text:
        return None
    try:
        day = time.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise KeysFileError(f"expires: {text!r} is not a day like 2027-01-31") from None
    return float(calendar.timegm(day) + 86400 - 1)


def audit(store: GuardedStore, who: str, action: str, key: str, details: dict[str, Any]) -> None:
    """One change in the audit log: never the key itself, only its name and what changed."""
    entry = {"time": time.time(), "who": who, "action": action, "key": key, **details}
    store.append_log(AUDIT, [jsonc.dumps_str(entry)], AUDIT_KEPT)


def audit_entries(store: GuardedStore, limit: int = 50) -> list[dict[str, Any]]:
    try:
        return [jsonc.loads(entry) for entry in store.read_log(AUDIT, limit)]
    except GatewayError:
        return []


def reload_workers(environ: Mapping[str, Any]) -> bool:
    """Ask gunicorn's master to reload (HUP, as ``systemctl reload`` does): every worker is
    replaced by one that has read the keys file again; streams in flight finish first. Only
    under gunicorn (the WSGI server says so); the master is the worker's parent."""
    if not str(environ.get("SERVER_SOFTWARE", "")).startswith("gunicorn"):
        return False
    os.kill(os.getppid(), signal.SIGHUP)
    return True
