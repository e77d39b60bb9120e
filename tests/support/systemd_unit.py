"""The shipped systemd unit (deploy/systemd/anthropic-gateway.service), parsed: for the checks
of its directives (tests/unit/deploy) and the tools that run its command line (tests/system)."""

from __future__ import annotations

import shlex

from servers import ROOT

UNIT = ROOT / "deploy" / "systemd" / "anthropic-gateway.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; repeated keys (Environment=...) keep every value."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line}"
        assert not line.endswith("\\"), "keep directives on one line"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


SERVICE = parse_unit(UNIT.read_text())["Service"]


def one(key: str) -> str:
    values = SERVICE.get(key)
    assert values, f"{key}= missing from {UNIT.name}"
    return values[-1]


def environment() -> dict[str, str]:
    env = {}
    for value in SERVICE.get("Environment", []):
        for item in shlex.split(value):
            name, _, setting = item.partition("=")
            env[name] = setting
    return env
