"""How a setting is declared, once.

Each field of the settings dataclasses (app/config/schema.py) is made with ``setting(...)``,
which keeps in the field's metadata what the rest of the package needs to know about it: its
default (the field's own), its lowest value, the environment variable that overrides it, whether
it is a secret, the TOML key when it differs from the field's name, and a line for the README's
reference. The loader, the derived tables (ENV_OVERRIDES, the known keys) and the reference read
them from there, so adding a setting is one line.

Only the standard library: the gunicorn master imports this before gevent patches anything.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, Literal, TypeVar

T = TypeVar("T")
METADATA = "gateway.setting"
NO_DEFAULT: Any = dataclasses.MISSING


class ConfigError(Exception):
    """A configuration problem, worded for the operator (names the key and what is wrong)."""


@dataclass(frozen=True)
class Table:
    """One TOML table being read: its values, where it is in the file (for the messages, which
    always name the key) and the environment (for the ``*_env`` secrets)."""

    values: Mapping[str, Any]
    where: str  # "upstream", "backends.2", "" for the top level
    env: Mapping[str, str]

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name


# A check turns the value found under a key into the setting's value, or raises ConfigError
# naming the key; a reader does the same from the whole table, for a setting that reads more
# than its own key (a dialect and its quirks) or whose absence means something.
Check = Callable[[str, Any], Any]
Reader = Callable[[Table, str, Any], Any]


@dataclass(frozen=True)
class Setting:
    """What a field's metadata holds: everything about the setting but its type and default."""

    doc: str
    key: str = ""  # the TOML key, when it is not the field's name
    minimum: float = 0  # for numbers
    env: str = ""  # the environment variable that overrides the TOML key
    secret: bool = False  # hidden from repr; may be given as ``<key>_env``, a variable's name
    table: str = ""  # the TOML table it is in, when not its dataclass's own ("admin")
    check: Check | None = None
    reader: Reader | None = None
    also: tuple[str, ...] = ()  # further TOML keys its check or reader consumes
    inline: bool = False  # a dataclass whose settings sit in the same TOML table (timeouts)
    shown: str = ""  # the default as the README says it, when the value alone does not
    entries: type | None = None  # the dataclass each table of an array value holds

    def toml_key(self, field_name: str) -> str:
        return self.key or field_name


@dataclass(frozen=True)
class Place:
    """A TOML table, array of tables or single key that a section of Settings is built from."""

    path: str  # dotted from the top: "upstream", "auth.keys", "routing.default"
    kind: Literal["table", "array", "key"]
    schema: type | None = None  # the dataclass a table (or each array entry) holds, if any
    env: str = ""  # an environment variable that replaces it

    @property
    def parts(self) -> list[str]:
        return self.path.split(".")


@dataclass(frozen=True)
class Section:
    """A field of Settings built from whole TOML tables by a function of the loader's (the
    backends, routes, client keys) or, with one table and a schema, read like any table."""

    doc: str
    places: tuple[Place, ...]


def setting(
    default: T,
    *,
    doc: str,
    key: str = "",
    minimum: float = 0,
    env: str = "",
    secret: bool = False,
    hidden: bool = False,
    table: str = "",
    check: Check | None = None,
    reader: Reader | None = None,
    also: tuple[str, ...] = (),
    shown: str = "",
) -> T:
    """A dataclass field with its default and its declaration. ``hidden`` keeps a value that
    may carry credentials (a proxy URL, headers) out of repr without making it a secret."""
    meta = Setting(doc, key, minimum, env, secret, table, check, reader, also, shown=shown)
    return _field(default, meta, show=not (secret or hidden))


def inline(default: T, *, doc: str = "") -> T:
    """A dataclass of settings read from the same TOML table as the one holding it."""
    return _field(default, Setting(doc, inline=True), show=True)


def required(
    *,
    doc: str,
    check: Check | None = None,
    reader: Reader | None = None,
    also: tuple[str, ...] = (),
    shown: str = "",
    entries: type | None = None,
) -> Any:
    """A setting with no default: the TOML table must give it."""
    meta = Setting(doc, check=check, reader=reader, also=also, shown=shown, entries=entries)
    return dataclasses.field(metadata={METADATA: meta})


def section(factory: Callable[[], T], *places: Place, doc: str) -> T:
    """A Settings field built from the TOML ``places`` named."""
    return dataclasses.field(default_factory=factory, metadata={METADATA: Section(doc, places)})


def _field(default: T, meta: Setting, *, show: bool) -> T:
    if type(default).__hash__ is None:  # a dict: each instance gets its own copy
        return dataclasses.field(
            default_factory=partial(copy.copy, default), repr=show, metadata={METADATA: meta}
        )
    return dataclasses.field(default=default, repr=show, metadata={METADATA: meta})


def declared(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Setting]]:
    """The fields of a settings dataclass that are settings, with their declarations."""
    for field in dataclasses.fields(cls):
        meta = field.metadata.get(METADATA)
        if isinstance(meta, Setting):
            yield field, meta


def sections(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Section]]:
    for field in dataclasses.fields(cls):
        meta = field.metadata.get(METADATA)
        if isinstance(meta, Section):
            yield field, meta


def default_of(field: dataclasses.Field[Any]) -> Any:
    """The field's default (a fresh one from its factory), or NO_DEFAULT."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return NO_DEFAULT


def default_value(cls: type, name: str) -> Any:
    """The default of ``cls``'s field ``name``, for a loader that must settle it itself."""
    return default_of(next(f for f in dataclasses.fields(cls) if f.name == name))


def inline_schema(field: dataclasses.Field[Any]) -> type:
    """The dataclass an inline field holds (the type of its default)."""
    return type(default_of(field))


def flat(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Setting]]:
    """The settings a TOML table of ``cls`` holds, inline dataclasses opened up."""
    for field, meta in declared(cls):
        if meta.inline:
            yield from flat(inline_schema(field))
        elif not meta.table:
            yield field, meta


@cache
def known_keys(cls: type) -> frozenset[str]:
    """Every key a TOML table of ``cls`` may hold."""
    keys: set[str] = set()
    for field, meta in flat(cls):
        name = meta.toml_key(field.name)
        keys.update((name, *meta.also))
        if meta.secret:
            keys.add(f"{name}_env")
    return frozenset(keys)
