"""``python -m app.keys``: client keys without hand-editing hashes.

    create NAME [--expires WHEN] [--limit FIELD=VALUE ...]   a new key, printed once
    list                                                      every key and its state
    revoke NAME                                               a key stops opening the door
    hash < key.txt                                            the config line of a key you made

``create`` and ``revoke`` write the keys file (``[auth] keys_file`` of the configuration
``GATEWAY_CONFIG`` names, or ``--file``): ``[[keys]]`` tables holding each key's SHA-256, never
the key. The running gateway reads it again on HUP (``systemctl reload anthropic-gateway``):
new keys work and revoked ones stop, with no restart and no stream cut. The file is rewritten
whole (a temporary file renamed over it, under a lock), so a reload never reads half of it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import secrets
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from app.config import LIMIT_FIELDS, ClientKey, ConfigError, build_settings, parse_instant, read_raw
from app.policy.auth import config_line

PREFIX = "sk-gw-"
DURATION_UNITS = {"d": 86400, "h": 3600}


def new_key() -> str:
    """A key as clients send it: 256 random bits, URL-safe, recognisable by its prefix."""
    return PREFIX + secrets.token_urlsafe(32)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, KeysFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


class KeysFileError(Exception):
    """A key that cannot be made or changed as asked."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.keys", description=__doc__.split("\n")[0])
    parser.add_argument("--file", help="the keys file (default: [auth] keys_file of the config)")
    commands = parser.add_subparsers(required=True, metavar="command")
    create = commands.add_parser("create", help="make a key; it is printed once")
    create.add_argument("name")
    create.add_argument("--expires", help="ISO date or time (UTC), or 30d / 12h from now")
    create.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=f"one of {', '.join(LIMIT_FIELDS)}; repeat for several",
    )
    create.set_defaults(run=_create)
    listing = commands.add_parser("list", help="every key the gateway knows, and its state")
    listing.set_defaults(run=_list)
    revoke = commands.add_parser("revoke", help="stop a key opening the door")
    revoke.add_argument("name")
    revoke.set_defaults(run=_revoke)
    digest = commands.add_parser("hash", help="the sha256 line of a key read from stdin")
    digest.set_defaults(run=_hash)
    return parser


# --- commands --------------------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    limits: dict[str, int | float] = {}
    for item in args.limit:
        field, _, value = item.partition("=")
        if field not in LIMIT_FIELDS or not value.strip():
            raise KeysFileError(f"--limit {item!r}: give FIELD=VALUE ({', '.join(LIMIT_FIELDS)})")
        limits[field] = _number(value)
    key = add_key(path, args.name, _when(args.expires) if args.expires else None, limits)
    print(key)
    print(
        f"\nThe key above is shown once; the gateway keeps only its digest. Added to {path}:\n"
        f"  name = {json.dumps(args.name)}\n  {config_line(key)}\n"
        "It works once the gateway reloads: systemctl reload anthropic-gateway",
        file=sys.stderr,
    )
    return 0


def add_key(path: str, name: str, expires: float | None, limits: dict[str, int | float]) -> str:
    """A new key in the keys file, checked by the gateway's own rules; the key, returned
    here once, is kept only as its digest."""
    key = new_key()
    entry: dict[str, Any] = {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest()}
    entry["created"] = _iso(time.time())
    if expires is not None:
        entry["expires"] = _iso(expires)
    entry.update((field, value) for field, value in limits.items() if value)
    with _locked(path):
        keys = _read(path)
        _check_new(name, keys)
        _validate([*keys, entry])
        _write(path, [*keys, entry])
    return key


def change_key(path: str, name: str, expires: float | None, limits: dict[str, int | float]) -> None:
    """A key of the keys file given new limits (0 or absent: none) and expiry (None: never)."""
    with _locked(path):
        keys = _read(path)
        entry = _entry(path, name, keys, "changed")
        for field in (*LIMIT_FIELDS, "expires"):
            entry.pop(field, None)
        if expires is not None:
            entry["expires"] = _iso(expires)
        entry.update((field, value) for field, value in limits.items() if value)
        _validate(keys)
        _write(path, keys)


def revoke_key(path: str, name: str) -> None:
    with _locked(path):
        keys = _read(path)
        entry = _entry(path, name, keys, "revoked")
        entry["revoked"] = True
        entry["revoked_at"] = _iso(time.time())
        _write(path, keys)


def read_keys(path: str) -> list[dict[str, Any]]:
    """The ``[[keys]]`` tables of the keys file, as written."""
    return _read(path)


def _entry(path: str, name: str, keys: list[dict[str, Any]], done: str) -> dict[str, Any]:
    for entry in keys:
        if entry.get("name") == name:
            return entry
    raise KeysFileError(
        f"no key {name!r} in {path}; a key of the configuration file is {done} "
        "there (revoked = true, or remove it)"
    )


def _list(args: argparse.Namespace) -> int:
    """The keys the gateway would load now (the configuration's and the keys file's), or
    with ``--file`` those of that file alone."""
    if args.file:
        raw: dict[str, Any] = {"auth": {"keys": _read(args.file)}}
        path = args.file
    else:
        raw = read_raw(os.environ)
        path = (raw.get("auth") or {}).get("keys_file")
    settings = build_settings(raw, os.environ)
    from_file = {entry.get("name") for entry in _read(path)} if path else set()
    rows = [("NAME", "STATE", "EXPIRES", "FROM", "LIMITS")]
    for key in settings.keys:
        source = "keys file" if key.name in from_file else "config"
        rows.append((key.name, _state(key), _iso(key.expires), source, _limits(key) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


def _state(key: ClientKey) -> str:
    if key.revoked:
        return "revoked"
    if key.expires is not None and time.time() >= key.expires:
        return "expired"
    return "active"


def _limits(key: ClientKey) -> str:
    values = ((field, getattr(key.limits, field)) for field in LIMIT_FIELDS)
    return ", ".join(f"{field}={value:g}" for field, value in values if value)


def _revoke(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    revoke_key(path, args.name)
    print(
        f"{args.name}: revoked in {path}. It stops working once the gateway reloads: "
        "systemctl reload anthropic-gateway",
        file=sys.stderr,
    )
    return 0


def _hash(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key or not key.isascii() or not key.isprintable():
        print("error: give one printable ASCII key on stdin", file=sys.stderr)
        return 1
    print(config_line(key))
    return 0


# --- the keys file ---------------------------------------------------------------------------


def _keys_file(args: argparse.Namespace) -> str:
    if args.file:
        return args.file
    path = (read_raw(os.environ).get("auth") or {}).get("keys_file")
    if not path:
        raise KeysFileError(
            "no keys file: set [auth] keys_file in the configuration GATEWAY_CONFIG names, "
            "or give --file"
        )
    return str(path)


def _read(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    try:
        with open(path, "rb") as fh:
            return list(tomllib.load(fh).get("keys", []))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KeysFileError(f"cannot read {path}: {exc}") from None


def _check_new(name: str, keys: list[dict[str, Any]]) -> None:
    if any(entry.get("name") == name for entry in keys):
        raise KeysFileError(f"a key named {name!r} exists; revoke it and pick another name")


def _validate(keys: list[dict[str, Any]]) -> None:
    """The file as the gateway will read it, checked by the gateway's own rules."""
    build_settings({"auth": {"keys": keys}}, {})


def _write(path: str, keys: list[dict[str, Any]]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    before = os.stat(path) if os.path.exists(path) else None
    handle, temporary = tempfile.mkstemp(prefix=".keys-", dir=directory)
    try:
        with os.fdopen(handle, "w") as fh:
            fh.write("# Written by python -m app.keys: digests only, never a key.\n")
            for entry in keys:
                fh.write("\n[[keys]]\n")
                for field, value in entry.items():
                    fh.write(f"{field} = {_toml(value)}\n")
        # Readable by the service's group, as the configuration is (deploy/README.md).
        os.chmod(temporary, before.st_mode & 0o777 if before else 0o640)
        _same_owner(temporary, before, directory)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _same_owner(path: str, before: os.stat_result | None, directory: str) -> None:
    try:
        if before is not None:
            os.chown(path, before.st_uid, before.st_gid)
        else:
            os.chown(path, -1, os.stat(directory).st_gid)
    except PermissionError:
        pass  # not root: the file stays the caller's


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """One writer at a time: two operators creating keys at once both get theirs."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- values ----------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def _number(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise KeysFileError(f"--limit: {text!r} is not a number") from None
    return int(value) if value.is_integer() else value


def _when(text: str) -> float:
    """``--expires``: 30d or 12h from now, or a date or time (UTC unless it says)."""
    unit = DURATION_UNITS.get(text[-1:])
    if unit and text[:-1].isdigit():
        return time.time() + int(text[:-1]) * unit
    moment = parse_instant("--expires", text)
    assert moment is not None
    return moment


def _iso(moment: float | None) -> str:
    return "-" if moment is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


if __name__ == "__main__":
    sys.exit(main())
