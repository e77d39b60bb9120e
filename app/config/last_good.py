"""The last configuration the gunicorn master validated, for its workers: a reload (HUP) with a
broken file must not leave the service without workers."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping

from app.config.loader import build_settings, load_settings, read_raw
from app.config.schema import Settings
from app.config.setting import ConfigError

# The last good configuration, as JSON, in the environment the workers inherit.
LAST_GOOD_ENV = "GATEWAY_LAST_GOOD_CONFIG"


def load_settings_or_last_good(environ: Mapping[str, str] | None = None) -> Settings:
    """``load_settings``, falling back to the master's last validated config if the file has
    gone bad since (the master already said so in its log)."""
    env = os.environ if environ is None else environ
    try:
        return load_settings(env)
    except ConfigError:
        if not env.get(LAST_GOOD_ENV):
            raise
        return build_settings(json.loads(env[LAST_GOOD_ENV]), env)


def validate_for_master(environ: MutableMapping[str, str]) -> str | None:
    """Check the config in the gunicorn master; remember it when good, else say why.

    Returns the problem, or None. The first start with a bad config must fail; a reload with
    one keeps the last good config for the new workers.
    """
    try:
        raw = read_raw(environ)
        build_settings(raw, environ)
    except ConfigError as exc:
        return str(exc)
    environ[LAST_GOOD_ENV] = json.dumps(raw, default=str)
    return None
