"""Settings: a TOML file (path in ``GATEWAY_CONFIG``) with environment overrides.

- app/config/schema.py: the settings, each declared once (type, default, bounds, environment
  variable, secret or not, what it does);
- app/config/loader.py: reads the file and the environment by walking those declarations;
- app/config/checks.py and values.py: what a value must be (URLs, paths, numbers, choices);
- app/config/last_good.py: the gunicorn master's last good config, for reloads;
- app/config/reference.py: the README's table of every setting, made from the schema.

Only the standard library is imported here, because the gunicorn master loads this package
before the workers monkey-patch the network stack.
"""

from app.config.checks import KEY_NAME, parse_instant
from app.config.last_good import has_last_good, load_settings_or_last_good, validate_for_master
from app.config.loader import build_settings, load_settings, read_keys_file, read_raw
from app.config.schema import (
    API_KEYS_ENV,
    BILLING_HEADER_MODES,
    DEFAULT_BACKEND,
    ENGINES,
    ENV_OVERRIDES,
    KEY_NOTES,
    LIMIT_FIELDS,
    LISTS,
    LOG_LEVELS,
    PROTOCOLS,
    STRATEGIES,
    TABLES,
    WORKER_CONNECTIONS,
    BackendProtocol,
    BatchSettings,
    ClientKey,
    Engine,
    Limits,
    LogLevel,
    OnFailure,
    Route,
    Routing,
    Settings,
    StateSettings,
    Strategy,
    Target,
    ThreadSettings,
    Timeouts,
    TranslateSettings,
    Upstream,
)
from app.config.setting import ConfigError

__all__ = [
    "API_KEYS_ENV",
    "BILLING_HEADER_MODES",
    "DEFAULT_BACKEND",
    "ENGINES",
    "ENV_OVERRIDES",
    "KEY_NAME",
    "KEY_NOTES",
    "LIMIT_FIELDS",
    "LISTS",
    "LOG_LEVELS",
    "PROTOCOLS",
    "STRATEGIES",
    "TABLES",
    "WORKER_CONNECTIONS",
    "BackendProtocol",
    "ClientKey",
    "ConfigError",
    "Engine",
    "Limits",
    "LogLevel",
    "OnFailure",
    "Route",
    "Routing",
    "Settings",
    "StateSettings",
    "Strategy",
    "Target",
    "BatchSettings",
    "ThreadSettings",
    "Timeouts",
    "TranslateSettings",
    "Upstream",
    "build_settings",
    "has_last_good",
    "load_settings",
    "load_settings_or_last_good",
    "parse_instant",
    "read_keys_file",
    "read_raw",
    "validate_for_master",
]
