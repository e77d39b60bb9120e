"""The last configuration the gunicorn master validated, kept in the master's memory.

A reload (HUP) with a broken file must not leave the service without workers: the master
checks the file on every (re)load of gunicorn.conf.py and keeps what it found good here.
Workers are forked from the master after that, so they inherit it; nothing goes into the
environment, which every child process (and a new binary started with USR2) would inherit with
the backend keys and the admin token in it. A master started afresh, by USR2 too, has nothing
held and so fails on a bad config as any first start does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from app.config.loader import load_settings
from app.config.schema import Settings
from app.config.setting import ConfigError


class _Held:
    settings: Settings | None = None


_held = _Held()


def has_last_good() -> bool:
    """Whether this process has validated a config before: false on a first start."""
    return _held.settings is not None


def validate_for_master(environ: Mapping[str, str]) -> str | None:
    """Check the config in the gunicorn master; keep it when good, else say why.

    Returns the problem, or None. The first start with a bad config must fail; a reload with
    one keeps the last good config for the new workers.
    """
    try:
        _held.settings = load_settings(environ)
    except ConfigError as exc:
        return str(exc)
    return None


def load_settings_or_last_good(environ: Mapping[str, str] | None = None) -> Settings:
    """``load_settings``, falling back to the master's last validated config if the file has
    gone bad since (the master already said so in its log)."""
    try:
        return load_settings(os.environ if environ is None else environ)
    except ConfigError:
        if _held.settings is None:
            raise
        return _held.settings
