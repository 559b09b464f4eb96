"""Settings declared once, beside their dataclass field, and the reader that checks TOML tables.

A dataclass field is a TOML key when it is declared with `setting(default, ...)` or with
`field(..., metadata=declared(...))`. Its annotation gives the TOML type, the field its default
and the declaration its bounds and messages. `TableReader.build` reads every declared field of
a dataclass from one table and records `FILE:KEY: message` problems instead of raising; a field
whose type is a dataclass is read from a sub-table, a tuple of dataclasses from an array of
tables. A dataclass may define `check()`, yielding (key, message) for settings that contradict
each other; it runs on the values read (defaults in place of rejected ones).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Default upper bounds that keep every number usable downstream (thread counts, timers,
# buffers): beyond them a value is a mistake, not a wish.
MAX_SECONDS = 365 * 86400.0
MAX_INTEGER = 2**31 - 1

_SETTING = "bridge.settings.Setting"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# A value outside its StrEnum: reported, then the field's default (and no `required` message).
_REJECTED: Any = object()


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one setting is checked beyond its type: bounds, path resolution and messages."""

    minimum: float | None = None
    # None: MAX_INTEGER for integers, MAX_SECONDS for numbers.
    maximum: float | None = None
    # A relative path is taken relative to the config file's directory.
    resolve: bool = False
    # The message when the key is missing, of the wrong type or blank ({choices} may be used).
    required: str | None = None
    # The message for a value outside the field's StrEnum ({value}, {choices}).
    invalid: str = "must be one of {choices}, got {value!r}"
    # What a list's items must be ("must be a list of {items}"); None: strings or integers.
    items: str | None = None


def setting(
    default: T,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    resolve: bool = False,
    invalid: str = Setting.invalid,
    items: str | None = None,
) -> T:
    """A dataclass field that is a TOML setting with this default and these bounds."""
    spec = Setting(minimum, maximum, resolve, None, invalid, items)
    return dataclasses.field(default=default, metadata={_SETTING: spec})


def declared(*, required: str | None = None, resolve: bool = False) -> Mapping[str, Setting]:
    """Field metadata that makes a field without a plain default (or a section) a setting."""
    return {_SETTING: Setting(resolve=resolve, required=required)}


@functools.cache
def _declared(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any, Setting], ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        (f, hints[f.name], f.metadata[_SETTING])
        for f in dataclasses.fields(cls)
        if _SETTING in f.metadata
    )


def declared_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """The default of every declared setting of cls by dotted key, inside sections too."""
    defaults: dict[str, Any] = {}
    for f, hint, _ in _declared(cls):
        if f.default_factory is not dataclasses.MISSING and _is_dataclass(hint):
            defaults.update(declared_defaults(hint, f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            defaults[f"{prefix}{f.name}"] = f.default
    return defaults


def key_part(name: str) -> str:
    """A TOML key as it is written in a file: bare when it can be, else quoted and escaped."""
    if _BARE_KEY.fullmatch(name):
        return name
    escaped = "".join(
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else "\\" + c if c in '"\\' else c
        for c in name
    )
    return f'"{escaped}"'


class TableReader:
    """Typed access to one TOML table that records problems instead of raising."""

    def __init__(
        self, file: str, table: dict[str, Any], prefix: str, problems: list[str], base: Path
    ) -> None:
        self.file, self.table, self.prefix, self.problems = file, table, prefix, problems
        self.base = base
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        """The dotted key of `name` in this table, as errors show it."""
        return f"{self.prefix}{key_part(name)}"

    def error(self, name: str, message: str) -> None:
        """Record a problem with the key `name` of this table."""
        self.problems.append(f"{self.file}:{self.key(name)}: {message}")

    def sub(self, table: dict[str, Any], prefix: str) -> TableReader:
        """A reader for a nested table, reporting to the same list."""
        return TableReader(self.file, table, prefix, self.problems, self.base)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        """The value of `name` if it has one of the TOML types `kind`, else default."""
        self.seen.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = False if isinstance(value, bool) and bool not in kinds else isinstance(value, kinds)
        if not ok:
            names = " or ".join(_type_name(k) for k in kinds)
            self.error(name, f"must be {names}, got {_type_name(type(value))}")
            return default
        if isinstance(value, str) and "\0" in value:
            self.error(name, "must not contain a NUL character")
            return default
        return value

    def strings(self, name: str, default: Any) -> Any:
        """A list of strings as a tuple, else default."""
        value = self.get(name, list, None)
        if value is None:
            return default
        if not all(isinstance(v, str) for v in value):
            self.error(name, "must be a list of strings")
            return default
        if any("\0" in v for v in value):
            self.error(name, "must not contain a NUL character")
            return default
        return tuple(value)

    def path(self, name: str) -> Path | None:
        """A non-empty string as a Path, else None."""
        value = self.get(name, str, None)
        if value is None:
            return None
        if not value:
            self.error(name, "must not be empty")
            return None
        return Path(value)

    def table_of(self, name: str) -> dict[str, Any]:
        """A sub-table, or {} when it is missing or not a table."""
        value = self.get(name, dict, {})
        return value if isinstance(value, dict) else {}

    def subtables(self, name: str, items: list[Any]) -> Iterator[TableReader]:
        """A reader for each table of the array `name`; any other item is reported."""
        for index, item in enumerate(items):
            if isinstance(item, dict):
                yield self.sub(item, f"{self.key(name)}[{index}].")
            else:
                self.problems.append(f"{self.file}:{self.key(name)}[{index}]: must be a table")

    def values(self, cls: type) -> dict[str, Any]:
        """Every declared setting of the dataclass cls, read from this table."""
        values: dict[str, Any] = {}
        for f, hint, spec in _declared(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            value = self._read(f.name, hint, spec, default)
            if value is _REJECTED:
                value = default
            elif spec.required is not None and _blank(value):
                self.error(f.name, spec.required.format(choices=_choices(hint)))
            values[f.name] = value
        return values

    def build(self, cls: type[T], **given: Any) -> T:
        """An instance of the dataclass cls from this table (plus `given`), then its check()."""
        instance = cls(**self.values(cls), **given)
        check = getattr(instance, "check", None)
        if check is not None:
            for name, message in check():
                self.error(name, message)
        return instance

    def finish(self) -> None:
        """Report every key of this table that nothing read."""
        for name in sorted(set(self.table) - self.seen):
            self.error(name, "unknown key")

    def _read(self, name: str, hint: Any, spec: Setting, default: Any) -> Any:
        self.seen.add(name)
        if name not in self.table:
            return default
        hint = _without_none(hint)
        if _is_dataclass(hint):
            section = self.sub(self.table_of(name), f"{self.key(name)}.")
            value = section.build(hint)
            section.finish()
            return value
        if typing.get_origin(hint) is tuple:
            return self._list(name, typing.get_args(hint)[0], spec, default)
        if hint is bool or hint is str:
            return self.get(name, hint, default)
        if hint is int or hint is float:
            return self._number(name, hint is int, spec, default)
        if hint is Path:
            path = self.path(name)
            if path is None:
                return default
            return (self.base / path).absolute() if spec.resolve else path
        if _is_enum(hint):
            value = self.get(name, str, None)
            if value is None:
                return default
            if value not in {member.value for member in hint}:
                self.error(name, spec.invalid.format(value=value, choices=_choices(hint)))
                return _REJECTED
            return hint(value)
        raise TypeError(f"{name}: no TOML reading for {hint!r}")

    def _number(self, name: str, integer: bool, spec: Setting, default: Any) -> Any:
        value = self.get(name, int if integer else (int, float), None)
        if value is None:
            return default
        if isinstance(value, float) and not math.isfinite(value):
            self.error(name, "must be a finite number")
            return default
        if spec.minimum is not None and value < spec.minimum:
            self.error(name, f"must be at least {spec.minimum:g}")
            return default
        maximum = spec.maximum
        if maximum is None:
            maximum = MAX_INTEGER if integer else MAX_SECONDS
        if value > maximum:
            self.error(name, f"must be at most {maximum:g}")
            return default
        return value if integer else float(value)

    def _list(self, name: str, item: Any, spec: Setting, default: Any) -> Any:
        if _is_dataclass(item):
            tables = self.get(name, list, None)
            if tables is None:
                return default
            built = []
            for reader in self.subtables(name, tables):
                built.append(reader.build(item))
                reader.finish()
            return tuple(built)
        if item is int:
            numbers = self.get(name, list, None)
            if numbers is None:
                return default
            low = -math.inf if spec.minimum is None else spec.minimum
            high = MAX_INTEGER if spec.maximum is None else spec.maximum
            if not all(
                isinstance(n, int) and not isinstance(n, bool) and low <= n <= high for n in numbers
            ):
                self.error(name, f"must be a list of {spec.items or 'integers'}")
                return default
            return tuple(numbers)
        texts = self.strings(name, None)
        if texts is None:
            return default
        if not _is_enum(item):
            return texts
        members = {member.value: member for member in item}
        for text in texts:
            if text not in members:
                self.error(name, spec.invalid.format(value=text, choices=_choices(item)))
        # Unknown values stay as written, so that later checks see what the file says.
        return tuple(members.get(text, text) for text in texts)


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        (inner,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        return inner
    return hint


def _is_dataclass(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, StrEnum)


def _choices(hint: Any) -> str:
    hint = _without_none(hint)
    return ", ".join(hint) if _is_enum(hint) else ""


def _blank(value: Any) -> bool:
    return value is None or value == () or (isinstance(value, str) and not value.strip())


def _type_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
        datetime.datetime: "a date-time",
        datetime.date: "a date",
        datetime.time: "a time",
    }.get(kind, kind.__name__)
