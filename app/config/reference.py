"""The README's reference of every setting, made from the schema so that it cannot drift:
``python -m app.config.reference`` prints it, ``--write`` puts it in README.md between its
markers, and tests/unit/config/test_reference.py fails while the README's copy differs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import Field
from pathlib import Path
from typing import Any

from app.config.schema import Settings, places
from app.config.setting import (
    NO_DEFAULT,
    Place,
    Setting,
    declared,
    default_of,
    flat,
    inline_schema,
    sections,
)

BEGIN = "<!-- settings reference: made by python -m app.config.reference --write -->"
END = "<!-- end of settings reference -->"
README = Path(__file__).resolve().parents[2] / "README.md"
HEADER = ["| Key | Variable | Default | What it sets |", "|---|---|---|---|"]
Row = tuple[str, str, str, str]


def shown_default(field: Field[Any], meta: Setting) -> str:
    """The default as the README says it: numbers plain (sizes in MiB), words in backticks."""
    if meta.shown:
        return meta.shown
    value = default_of(field)
    if value is NO_DEFAULT:
        return "required"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and field.name.endswith("bytes") and value % (1 << 20) == 0:
        return f"{value >> 20} MiB"
    if isinstance(value, int | float):
        return f"{value:g}"
    if isinstance(value, str):
        return f"`{value}`" if value else "none"
    raise ValueError(f"{field.name}: say how its default reads (shown=...)")


def schema_at(path: str) -> type | None:
    """The dataclass the TOML table (or each entry of the array) at ``path`` holds, if any."""
    for place in places():
        if place.path == path:
            return place.schema
    parent, _, key = path.rpartition(".")
    schema = schema_at(parent) if parent else None
    for field, meta in declared(schema) if schema else ():
        if meta.toml_key(field.name) == key and meta.entries is not None:
            return meta.entries
    return None


def setting_at(path: str, key: str) -> tuple[Field[Any], Setting] | None:
    """The setting the key ``key`` of the TOML table ``path`` ("" for the top level) sets."""
    for field, meta in declared(Settings):
        if meta.table == path and meta.toml_key(field.name) == key:
            return field, meta
    schema = schema_at(path)
    for field, meta in flat(schema) if schema else ():
        if meta.toml_key(field.name) == key:
            return field, meta
    return None


def _row(field: Field[Any], meta: Setting) -> Row:
    variable = f"`{meta.env}`" if meta.env else ""
    return f"`{meta.toml_key(field.name)}`", variable, shown_default(field, meta), meta.doc


def _schema_rows(schema: type, tables: dict[type, str]) -> Iterator[Row]:
    """A table's keys; an inline dataclass that has a table of its own (a key's limits) is
    one row that points there."""
    for field, meta in declared(schema):
        if meta.table:
            continue
        if not meta.inline:
            yield _row(field, meta)
        elif inline_schema(field) in tables:
            yield f"the {tables[inline_schema(field)]} keys", "", "", meta.doc
        else:
            yield from _schema_rows(inline_schema(field), tables)


def _own_rows(path: str) -> Iterator[Row]:
    """Settings' own settings in the table ``path`` ("" for the top level), and the keys and
    arrays other sections read there (``routing.default``, ``auth.keys``)."""
    for field, meta in declared(Settings):
        if meta.table == path:
            yield _row(field, meta)
    for _, section in sections(Settings):
        for place in section.places:
            parent, _, key = place.path.rpartition(".")
            if parent == path and "." in place.path:
                variable = f"`{place.env}`" if place.env else ""
                if place.kind == "array":
                    yield f"`{key}`", variable, "none", f"{section.doc}: `[[{place.path}]]`"
                else:
                    yield f"`{key}`", variable, "none", section.doc


def _tables() -> list[tuple[list[Place], type | None]]:
    """The TOML tables in the order Settings declares them; tables of one schema together."""
    found: list[tuple[list[Place], type | None]] = []

    def add(place: Place) -> None:
        for i, (names, schema) in enumerate(found):
            if any(p.path == place.path for p in names):
                found[i] = (names, schema or place.schema)
                return
            if place.schema is not None and schema is place.schema:
                names.append(place)
                return
        found.append(([place], place.schema))

    for place in places():
        if "." in place.path:
            add(Place(place.path.rpartition(".")[0], "table"))
        if place.kind != "key":
            add(place)
    for _, meta in declared(Settings):
        if meta.table:
            add(Place(meta.table, "table"))
    return found


def _doc_of(path: str) -> str:
    return next(s.doc for _, s in sections(Settings) for p in s.places if p.path == path)


def _title(names: list[Place]) -> str:
    return ", ".join(f"`[[{p.path}]]`" if p.kind == "array" else f"`[{p.path}]`" for p in names)


def render() -> str:
    """The reference: the top level, then each TOML table or array of tables."""
    tables = _tables()
    own = {schema: _title(names) for names, schema in tables if schema is not None}
    out = [BEGIN, "", "Top level:", "", *HEADER, *map(_line, _own_rows(""))]
    for names, schema in tables:
        rows = list(_schema_rows(schema, own)) if schema else []
        rows += [r for p in names for r in _own_rows(p.path)]
        if not rows:
            out += ["", f"{_title(names)}: {_doc_of(names[0].path)} (any names)."]
            continue
        out += ["", f"{_title(names)}:", "", *HEADER, *map(_line, rows)]
        for field, meta in declared(schema) if schema else ():
            if meta.entries is not None:
                title = f"Each of `{meta.toml_key(field.name)}` in {_title(names)}"
                out += ["", f"{title}:", "", *HEADER]
                out += map(_line, _schema_rows(meta.entries, own))
    out += ["", END]
    return "\n".join(out)


def _line(cells: Row) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def readme_copy(text: str) -> str:
    """The reference as the README has it (empty if its markers are missing)."""
    start, end = text.find(BEGIN), text.find(END)
    return text[start : end + len(END)] if 0 <= start < end else ""


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        text = README.read_text(encoding="utf-8")
        current = readme_copy(text)
        if not current:
            print(f"README.md: no {BEGIN!r} marker", file=sys.stderr)
            return 1
        README.write_text(text.replace(current, render()), encoding="utf-8")
        return 0
    print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
