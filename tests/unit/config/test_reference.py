"""The README's configuration reference and the example config agree with the schema
(app/config/schema.py): every setting documented, every documented key a setting, the
environment variables and the defaults as the schema declares them."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from app.config import API_KEYS_ENV, ENV_OVERRIDES, KEY_NOTES, LISTS, TABLES, Upstream
from app.config.reference import (
    BEGIN,
    END,
    readme_copy,
    render,
    schema_at,
    setting_at,
    shown_default,
)
from app.config.schema import places, table_keys, top_level_keys
from app.config.setting import known_keys
from app.translate.dialect import Dialect

ROOT = Path(__file__).resolve().parents[3]
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLE = (ROOT / "deploy" / "gateway.example.toml").read_text(encoding="utf-8")
# Variables the README's tables name that are not settings of the file.
NOT_SETTINGS = {"GATEWAY_CONFIG", API_KEYS_ENV}


def section(title: str) -> str:
    """The README's text under ``title`` up to the next heading of the same level or above."""
    level = title.split(" ")[0]
    start = README.index(f"\n{title}\n")
    ends = [README.find(f"\n{'#' * n} ", start + 1) for n in range(1, len(level) + 1)]
    return README[start : min((e for e in ends if e > 0), default=len(README))]


def table_after(text: str, header: str) -> list[list[str]]:
    """The rows (cells) of the markdown table whose header line starts with ``header``."""
    lines = text[text.index(header) :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def code(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def accepted(path: str) -> frozenset[str]:
    """Every key the loader takes in the TOML table or array entries at ``path``."""
    if path == "":
        return top_level_keys() - {*TABLES, *LISTS}
    kinds = {p.path: p.kind for p in places()}
    schema = schema_at(path)
    if kinds.get(path) != "array" and path in TABLES:
        known = table_keys(path)
        assert known is not None
        return known
    assert schema is not None, path
    return known_keys(schema)


def setting_paths() -> list[str]:
    return ["", *TABLES, *LISTS, "routes.targets", "auth.keys"]


# --- the generated reference -----------------------------------------------------------------


def test_the_readme_reference_is_the_one_the_schema_makes() -> None:
    """python -m app.config.reference --write brings it back in line."""
    assert BEGIN in README and END in README
    assert readme_copy(README) == render()


def documented() -> dict[str, dict[str, list[str]]]:
    """The generated reference as read back: table path -> key -> its row's cells."""
    found: dict[str, dict[str, list[str]]] = {}
    paths: list[str] = []
    for line in readme_copy(README).splitlines():
        if line == "Top level:":
            paths = [""]
        elif line.startswith("Each of `"):
            key, parent = re.match(r"Each of `(\w+)` in `\[+([\w.]+)\]+`:", line).groups()
            paths = [f"{parent}.{key}"]
        elif line.startswith("`["):
            paths = re.findall(r"`\[+([\w.]+)\]+`", line.split(":")[0])
        elif line.startswith("| `"):
            cells = [c.strip() for c in line.split(" | ")]
            for path in paths:
                found.setdefault(path, {})[code(cells[0])[0]] = cells
        elif line.startswith("| the `["):
            for path in paths:
                found.setdefault(path, {})[line] = [line]
    return found


@pytest.mark.parametrize("path", setting_paths(), ids=lambda p: p or "top")
def test_every_key_the_loader_takes_is_in_the_reference(path: str) -> None:
    """Keys that only go with another (``api_key_env``, ``quirks``, ``key_env``) are named in
    that key's row; a key's own limits point to the [limits] table."""
    if path == "models":
        assert "`[models]`: client model name = backend model name" in readme_copy(README)
        return
    rows = documented()[path]
    text = " ".join(" ".join(cells) for cells in rows.values())
    limits_row = any("the `[limits]` keys" in k for k in rows)
    for key in accepted(path):
        if limits_row and key in accepted("limits"):
            continue
        assert key in rows or f"`{key}`" in text, f"{path}.{key} is not in the reference"


@pytest.mark.parametrize("path", setting_paths(), ids=lambda p: p or "top")
def test_every_key_in_the_reference_is_one_the_loader_takes(path: str) -> None:
    for key in documented().get(path, {}):
        if not key.startswith("| the"):
            assert key in accepted(path) or key.rpartition(".")[2] in accepted(
                key.rpartition(".")[0]
            ), f"{path}: {key}"


def test_every_environment_variable_is_in_the_row_of_its_key() -> None:
    rows = documented()
    for variable, (table, key) in ENV_OVERRIDES.items():
        row = rows[table].get(key)
        assert row is not None and row[1] == f"`{variable}`", variable


# --- the tables written by hand ------------------------------------------------------------


def test_the_environment_table_names_every_variable_with_its_key_and_default() -> None:
    rows = table_after(section("## Configuration"), "| Variable | TOML key | Default |")
    seen = set()
    for variable, key_cell, default in rows:
        if variable == "—":
            continue
        name = code(variable)[0]
        seen.add(name)
        if name in NOT_SETTINGS:
            continue
        assert name in ENV_OVERRIDES, f"{name} is not a setting's variable"
        table, key = ENV_OVERRIDES[name]
        assert code(key_cell)[0] == (f"{table}.{key}" if table else key), name
        found = setting_at(table, key)
        assert found is not None
        assert default == shown_default(*found), f"{name}: the schema's default differs"
    assert set(ENV_OVERRIDES) - seen == set(), "variables missing from the table"


def test_the_backend_connections_table_has_the_schemas_keys_and_defaults() -> None:
    rows = table_after(section("### Backend connections"), "| Key | Default | Meaning |")
    assert rows
    for keys, default, _ in rows:
        for key in code(keys):
            found = setting_at("upstream", key)
            assert found is not None, f"upstream.{key} is not a setting"
            assert default == shown_default(*found), key


def test_the_quirks_table_names_every_dialect_field() -> None:
    rows = table_after(section("## Configuration"), "| Quirk | What it does |")
    named = {key for row in rows for key in code(row[0])}
    assert named == {f.name for f in fields(Dialect)} - {"name"}


def prose(text: str) -> str:
    """The README without its generated reference and its code blocks: the text written by
    hand, where a default quoted in passing is the one to go stale."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return re.sub(r"```.*?```", "", text[:start] + text[end:], flags=re.S)


# A literal as prose quotes it: a number (``900``, ``0.5``; `` s`` may follow) or a code span
# that starts with a digit (```127.0.0.1:8082```), never another key's name.
_VALUE = r"(?:`(?P<{0}c>[0-9][^`\s]*)`|(?P<{0}n>[0-9](?:[0-9.]*[0-9])?))(?: s\b)?"
# A key (or its GATEWAY_ variable) and the default quoted for it in the same clause: "`key`
# (900)", "`key` (default 2)", "`key` (first byte, default 900 s)", "`GATEWAY_X`, by default
# `v`", "`key` is 15 s by default". No other code span, and no full stop, may come between.
QUOTED_DEFAULT = re.compile(
    r"`(?P<key>[a-z][a-z_]*|GATEWAY_[A-Z_]+)`(?:"
    r" \(" + _VALUE.format("paren") + r"[,)]"
    r"|[^`.;:\n]{0,60}?\bdefault(?:s to| is| of|:)? "
    + _VALUE.format("default")
    + r"|[^`.;:\n]{0,60}?\b"
    + _VALUE.format("by")
    + r" by default"
    r")"
)


def quoted_defaults(text: str) -> list[tuple[str, str]]:
    """(key or variable, the value quoted as its default) for each default the prose quotes.
    Error codes (``thread_…``) are followed by their HTTP status, not a default; a variable
    that is not a setting's (``GATEWAY_BIND``: gunicorn's) has its own table."""
    found = []
    for match in QUOTED_DEFAULT.finditer(prose(text)):
        key = match.group("key")
        value = next(v for name, v in match.groupdict().items() if name != "key" and v)
        if key.startswith("thread_") or (key.startswith("GATEWAY_") and key not in ENV_OVERRIDES):
            continue
        found.append((key, value))
    return found


@pytest.mark.parametrize(("key", "quoted"), quoted_defaults(README))
def test_defaults_quoted_in_the_text_are_the_schemas(key: str, quoted: str) -> None:
    places_of_key = [ENV_OVERRIDES[key]] if key in ENV_OVERRIDES else []
    places_of_key += [(path, key) for path in setting_paths()]
    found = [setting_at(path, name) for path, name in places_of_key]
    defaults = {shown_default(*f).strip("`") for f in found if f is not None}
    assert defaults, f"`{key}` is not a setting"
    assert quoted in defaults, f"`{key}`: the text says {quoted}, the schema {defaults}"


def test_the_quoted_defaults_are_found_in_each_form_the_text_uses() -> None:
    """The pattern itself: each way of quoting a default is read, and a number that is not
    one (a status, a count in passing) is not."""
    text = (
        "`a_key` (900). `b_key` (default 2, more). `c_key` (first byte, default 900 s). "
        "`d_key` is 15 s by default. `GATEWAY_READ_TIMEOUT`, by default `600`. "
        "`e_key` takes `f_key` 3 times. `thread_gone` (404). `g_key` defaults to `h_key`."
    )
    assert quoted_defaults(BEGIN + END + text) == [
        ("a_key", "900"),
        ("b_key", "2"),
        ("c_key", "900"),
        ("d_key", "15"),
        ("GATEWAY_READ_TIMEOUT", "600"),
    ]


# --- TOML examples: the README's blocks and deploy/gateway.example.toml --------------------


def uncommented(text: str) -> str:
    """The TOML with its commented-out tables and settings (``# key = value``) put back."""
    setting = re.compile(r"^# ?(\[.*\]|[a-z_0-9]+ = .*)$")
    return "\n".join(setting.sub(r"\1", line) for line in text.splitlines())


def unknown_keys(raw: dict[str, Any]) -> list[str]:
    """The keys of a parsed TOML document that no setting takes, dotted."""
    bad = [key for key in raw if key not in top_level_keys()]
    for path, value in raw.items():
        entries = value if isinstance(value, list) else [value]
        for entry in entries:
            if path in ("models",) or not isinstance(entry, dict):
                continue
            bad += [f"{path}.{k}" for k in entry if k not in accepted(path)]
            bad += nested_unknown(path, entry)
    return bad


def nested_unknown(path: str, entry: dict[str, Any]) -> list[str]:
    bad = []
    quirks = {f.name for f in fields(Dialect)} - {"name"}
    bad += [f"{path}.quirks.{k}" for k in entry.get("quirks", {}) if k not in quirks]
    for target in entry.get("targets", []) if path == "routes" else []:
        bad += [f"routes.targets.{k}" for k in target if k not in accepted("routes.targets")]
    for key in entry.get("keys", []) if path == "auth" else []:
        bad += [f"auth.keys.{k}" for k in key if k not in accepted("auth.keys") | {*KEY_NOTES}]
    return bad


def readme_toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README, re.S)


@pytest.mark.parametrize(
    "block", readme_toml_blocks(), ids=[f"block{i}" for i in range(len(readme_toml_blocks()))]
)
def test_toml_in_the_readme_uses_only_settings_that_exist(block: str) -> None:
    assert unknown_keys(tomllib.loads(uncommented(block))) == []


def test_the_example_config_uses_only_settings_that_exist() -> None:
    assert unknown_keys(tomllib.loads(uncommented(EXAMPLE))) == []


def commented_settings(text: str) -> list[tuple[str, str, str, str]]:
    """(table, key, value, comment) for each ``key = value  # comment`` line, commented-out
    ones too, with the table the line is in."""
    table = ""
    found = []
    for line in uncommented(text).splitlines():
        header = re.match(r"^\[+([\w.]+)\]+", line)
        if header:
            table = header.group(1)
        setting = re.match(r"^([a-z_]+) = (.+?)\s+# (.*)$", line)
        if setting:
            found.append((table, *setting.groups()))
    return found


@pytest.mark.parametrize("where", ["readme", "example"])
def test_variables_and_defaults_in_toml_comments_are_the_schemas(where: str) -> None:
    """``url = "…"  # GATEWAY_UPSTREAM_URL`` names that key's variable; ``# the default``
    marks the schema's default."""
    text = EXAMPLE if where == "example" else "\n".join(readme_toml_blocks())
    checked = 0
    for table, key, value, comment in commented_settings(text):
        found = setting_at(table, key)
        for variable in re.findall(r"GATEWAY_[A-Z_]+", comment):
            assert found is not None and found[1].env == variable, f"{table}.{key}: {variable}"
            checked += 1
        if comment.startswith("the default"):
            assert found is not None and tomllib.loads(f"v = {value}")["v"] == found[0].default
            checked += 1
    assert checked


def test_each_setting_in_the_example_names_its_variable() -> None:
    """The example says that a value whose comment names a variable can be overridden by it:
    so each setting that has one names it."""
    table = ""
    for line in uncommented(EXAMPLE).splitlines():
        header = re.match(r"^\[+([\w.]+)\]+", line)
        table = header.group(1) if header else table
        setting = re.match(r"^([a-z_]+) = ", line)
        found = setting_at(table, setting.group(1)) if setting else None
        # [[backends]] take [upstream]'s keys, not its variables.
        if found is not None and found[1].env and table != "backends":
            assert found[1].env in line, f"{table}.{setting.group(1)}: {found[1].env}"
    assert "A value whose comment names a GATEWAY_ variable" in EXAMPLE


def test_backends_take_the_keys_of_upstream() -> None:
    """The reference documents [upstream] and [[backends]] in one table."""
    assert known_keys(Upstream) == accepted("backends")
