"""The settings whose values need more than a type: URLs, file paths, header tables, a
dialect and its quirks, client keys and dates. Each takes the key (for its message) and the
value found, and returns what the settings hold or raises ConfigError naming the key."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import fields, replace
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import SplitResult, urlsplit

from app.config.setting import ConfigError, Table
from app.config.values import boolean, integer
from app.translate.dialect import DIALECTS, Dialect

HTTP_SCHEMES = ("http", "https")
REDIS_SCHEMES = ("redis", "rediss", "unix")
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
PORT = re.compile(r"[0-9]{1,5}")
ZONE = re.compile(r"[A-Za-z0-9._~-]+")


def backend_url(key: str, value: Any) -> str:
    """An http(s) URL with a host and, if it has one, a port that is a port: checked here, as
    a bad one would otherwise pass and then stop every worker at boot."""
    return _url(key, value, HTTP_SCHEMES).rstrip("/")


def proxy_url(key: str, value: Any) -> str:
    if value == "":
        return ""
    return _url(key, value, HTTP_SCHEMES).rstrip("/")


def redis_url(key: str, value: str) -> str:
    """A Redis URL (``unix://`` names a socket path, not a host)."""
    if not value.startswith(tuple(f"{scheme}://" for scheme in REDIS_SCHEMES)):
        raise ConfigError(f"{key}: a redis://, rediss:// or unix:// URL is required")
    if value.startswith("unix://"):
        return value
    return _url(key, value, REDIS_SCHEMES, need_host=False)


def _url(key: str, value: Any, schemes: tuple[str, ...], *, need_host: bool = True) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string URL")
    wanted = " or ".join(f"{scheme}://" for scheme in schemes)
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ConfigError(f"{key}: not a URL (got {_shown(value)!r})") from None
    if parts.scheme not in schemes or not value.startswith(f"{parts.scheme}://"):
        raise ConfigError(f"{key}: must start with {wanted} (got {_shown(value, parts)!r})")
    host, port = _host_and_port(parts.netloc.rpartition("@")[2])
    if any(c.isspace() or not c.isprintable() for c in value) or not _valid_host(host, need_host):
        raise ConfigError(f"{key}: no valid host in {_shown(value, parts)!r}")
    if port is not None and not (PORT.fullmatch(port) and 1 <= int(port) <= 65535):
        raise ConfigError(
            f"{key}: the port must be a number from 1 to 65535 (got {_shown(value, parts)!r})"
        )
    return value


def _host_and_port(authority: str) -> tuple[str | None, str | None]:
    """The host and the port text of ``host[:port]``; a host of None when nothing but a port
    may follow a bracketed address and something else does."""
    if authority.startswith("["):
        literal, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None, None
        return f"[{literal}]", rest[1:] if rest else None
    host, colon, port = authority.rpartition(":")
    return (host, port) if colon else (authority, None)


def _valid_host(host: str | None, need_host: bool) -> bool:
    """A host requests and urllib3 will take, checked strictly rather than as they parse it:
    DNS labels (``_`` allowed, as container names have it), a dotted IPv4 address, or an IPv6
    address in brackets with an optional zone. What passes here cannot fail them at boot."""
    if host is None:
        return False
    if not host:
        return not need_host
    if host.startswith("["):
        address, percent, zone = host[1:-1].partition("%")
        return _is_address(address, ipaddress.IPv6Address) and (
            not percent or ZONE.fullmatch(zone) is not None
        )
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        return _is_address(host, ipaddress.IPv4Address)
    return all(LABEL.fullmatch(label) for label in labels)


def _is_address(text: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _shown(value: str, parts: SplitResult | None = None) -> str:
    """The URL as an error may quote it: without a password (a proxy's may carry one)."""
    if parts is None or "@" not in parts.netloc:
        return value if "@" not in value else "<a URL with credentials>"
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"***@{host}").geturl()


def readable_path(key: str, value: Any) -> str:
    """A file (or directory) the gateway must be able to read: checked at start, so that a
    wrong path stops the service with its key named instead of failing every request."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a path")
    if value and not os.access(value, os.R_OK):
        raise ConfigError(f"{key}: cannot read {value!r}")
    return value


def header_table(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{key}: must be a table of header name = string value")
    return dict(value)


def dialect(table: Table, key: str, fallback: Dialect) -> Dialect:
    """A dialect preset by name (else ``fallback``), with the table's ``quirks`` over it."""
    where = table.key(key)
    name = table.values.get(key, fallback.name)
    if not isinstance(name, str) or name not in DIALECTS:
        raise ConfigError(f"{where}: unknown dialect {name!r}; one of {', '.join(DIALECTS)}")
    quirks = table.values.get("quirks", {})
    if not isinstance(quirks, dict):
        raise ConfigError(f"{table.key('quirks')}: must be a table")
    base = DIALECTS[name]
    changes = {k: _quirk(table.key(f"quirks.{k}"), base, k, v) for k, v in quirks.items()}
    try:
        return replace(base, **changes)
    except ValueError as exc:
        raise ConfigError(f"{table.key('quirks')}.{exc}") from None


def _quirk(key: str, base: Dialect, name: str, value: Any) -> Any:
    allowed = {f.name for f in fields(Dialect)} - {"name"}
    if name not in allowed:
        raise ConfigError(f"{key}: unknown setting; one of {', '.join(sorted(allowed))}")
    current = getattr(base, name)
    if isinstance(current, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings")
        return tuple(value)
    if isinstance(current, bool):
        return boolean(key, value)
    if isinstance(current, int):
        return integer(key, value, 0)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string")
    return value


def key_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not KEY_NAME.fullmatch(value):
        raise ConfigError(
            f"{key}: required; up to 64 letters, digits and . _ @ + - "
            "(it shows in logs and metrics)"
        )
    return value


def key_digest(table: Table, key: str, fallback: Any) -> bytes:
    """The SHA-256 of a client key: given in hex, or computed from the variable ``key_env``
    names. Errors never repeat the key."""
    values = table.values
    if ("sha256" in values) == ("key_env" in values):
        raise ConfigError(f"{table.where}: give either sha256 or key_env")
    if "sha256" in values:
        digest = values["sha256"]
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ConfigError(
                f"{table.key('sha256')}: must be 64 hexadecimal digits (python -m app.keys hash)"
            )
        return bytes.fromhex(digest)
    variable = str(values["key_env"])
    value = table.env.get(variable, "")
    if not value:
        raise ConfigError(f"{table.key('key_env')}: environment variable {variable} is empty")
    if not (value.isascii() and value.isprintable()) or value != value.strip():
        raise ConfigError(
            f"{table.key('key_env')}: the key in {variable} must be printable ASCII without "
            "spaces around it"
        )
    return hashlib.sha256(value.encode()).digest()


def parse_instant(key: str, value: Any) -> float | None:
    """A date or date and time (TOML's own, or ISO 8601 text), as epoch seconds (UTC when
    no zone is given); a bare date means its first second."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{key}: must be a date like 2027-01-31 (got {value!r})") from None
    moment: datetime
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        raise ConfigError(f"{key}: must be a date like 2027-01-31")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
