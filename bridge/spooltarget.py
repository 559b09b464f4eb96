"""Where the producers write: the spool and its size limit, read from the config without
the full loader.

`enqueue-hydra` runs once per finished build and `enqueue-hook` once per local build, so
they read only the three settings they need (`state_dir`, `spool_dir`,
`spool.max_event_bytes`), checked exactly as `bridge.config` checks them and reported with
the same `FILE:KEY: message` lines. Nothing else in the file is validated here: that is the
daemon's and `check-config`'s job. Only stdlib modules that the interpreter has already
loaded at start-up are imported on the common path: a simple TOML file (the NixOS module
writes one) is read by a small reader that gives up on anything it does not fully
understand, and only then is `tomllib` (slow to import) asked.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself is too slow to import here; mypy knows the name
if TYPE_CHECKING:
    from collections.abc import Mapping

# The same names and bounds as bridge.config (CONFIG_ENV, SpoolSettings, MAX_EVENT_BYTES);
# tests/test_spooltarget.py compares the two readers over many configs.
CONFIG_ENV = "HYDRA_CACHIX_BRIDGE_CONFIG"
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
MIN_EVENT_BYTES = 256
MAX_EVENT_BYTES = 64 * 1024 * 1024
# bridge.settings._type_name, by type name (tomllib's dates would need the datetime module).
TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "list": "a list",
    "dict": "a table",
    "datetime": "a date-time",
    "date": "a date",
    "time": "a time",
}


class TargetError(Exception):
    """The config cannot say where the spool is; `problems` are `FILE:KEY: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class SpoolTarget:
    """The spool directory (absolute) and the largest event file the daemon reads."""

    __slots__ = ("max_event_bytes", "spool_dir")

    def __init__(self, spool_dir: str, max_event_bytes: int) -> None:
        self.spool_dir = spool_dir
        self.max_event_bytes = max_event_bytes


def pure_path(text: str) -> str:
    """`str(pathlib.PurePosixPath(text))`: empty and `.` parts dropped, `//` kept."""
    stripped = text.lstrip("/")
    slashes = len(text) - len(stripped)
    root = "//" if slashes == 2 else "/" if slashes else ""
    parts = [p for p in stripped.split("/") if p and p != "."]
    return root + "/".join(parts) if root or parts else "."


def join_path(base: str, text: str) -> str:
    """`str(PurePosixPath(base) / text)` for a normalised base."""
    if text.startswith("/"):
        return pure_path(text)
    rest = pure_path(text)
    if rest == ".":
        return base
    if base == ".":
        return rest
    return base + rest if base.endswith("/") else base + "/" + rest


def absolute(path: str) -> str:
    """`str(Path(path).absolute())`: relative to the working directory, not resolved."""
    return path if path.startswith("/") else join_path(pure_path(os.getcwd()), path)


def parent(path: str) -> str:
    """`str(PurePosixPath(path).parent)` for a normalised path."""
    head, sep, _ = path.rpartition("/")
    if not sep:
        return "."
    return head if head.strip("/") else path[: len(path) - len(path.lstrip("/"))]


def default_state_dir() -> str:
    """bridge.config.default_state_dir: $XDG_STATE_HOME or ~/.local/state, plus our name."""
    base = os.environ.get("XDG_STATE_HOME")
    if not base:
        home = os.path.expanduser("~")
        if home.startswith("~"):
            raise RuntimeError("Could not determine home directory.")
        base = join_path(pure_path(home), ".local/state")
    return join_path(pure_path(base), "hydra-cachix-bridge")


def config_path(explicit: str | None) -> str | None:
    """The config file: --config, else $HYDRA_CACHIX_BRIDGE_CONFIG, else None (defaults)."""
    if explicit is not None:
        return explicit
    return os.environ.get(CONFIG_ENV) or None


def read_spool_target(path: str | None) -> SpoolTarget:
    """The spool of the config at `path` (None: the embedded defaults); raise TargetError."""
    if path is None:
        return SpoolTarget(absolute(default_state_dir()) + "/spool", DEFAULT_MAX_EVENT_BYTES)
    file = pure_path(os.fspath(path))
    try:
        with open(file, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise TargetError([f"{file}: file not found"]) from None
    except OSError as exc:
        raise TargetError([f"{file}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TargetError([f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    document = read_simple_toml(text)
    if document is None:
        import tomllib

        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TargetError([f"{file}: invalid TOML: {exc}"]) from None
    return spool_target(document, file, absolute(parent(file)))


def spool_target(document: Mapping[str, object], file: str, base: str) -> SpoolTarget:
    """Check the three settings as bridge.config.parse_config does and resolve the spool."""
    problems: list[str] = []
    state = _path_setting(document, "state_dir", "", file, problems) or default_state_dir()
    state_dir = absolute(join_path(base, state))
    spool = _path_setting(document, "spool_dir", "", file, problems)
    spool_dir = absolute(join_path(base, spool)) if spool else join_path(state_dir, "spool")
    table = _typed(document, "spool", dict, "", file, problems)
    max_bytes = DEFAULT_MAX_EVENT_BYTES
    if isinstance(table, dict):
        value = _typed(table, "max_event_bytes", int, "spool.", file, problems)
        if isinstance(value, int):
            if value < MIN_EVENT_BYTES:
                problems.append(
                    f"{file}:spool.max_event_bytes: must be at least {MIN_EVENT_BYTES:g}"
                )
            elif value > MAX_EVENT_BYTES:
                problems.append(
                    f"{file}:spool.max_event_bytes: must be at most {MAX_EVENT_BYTES:g}"
                )
            else:
                max_bytes = value
    if problems:
        raise TargetError(problems)
    return SpoolTarget(spool_dir, max_bytes)


def _typed(
    table: Mapping[str, object], name: str, kind: type, prefix: str, file: str, problems: list[str]
) -> object:
    """TableReader.get of bridge.settings: the value if it has the type, else a problem and None."""
    if name not in table:
        return None
    value = table[name]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        got = TYPE_NAMES.get(type(value).__name__, type(value).__name__)
        problems.append(f"{file}:{prefix}{name}: must be {TYPE_NAMES[kind.__name__]}, got {got}")
        return None
    if isinstance(value, str) and "\0" in value:
        problems.append(f"{file}:{prefix}{name}: must not contain a NUL character")
        return None
    return value


def _path_setting(
    table: Mapping[str, object], name: str, prefix: str, file: str, problems: list[str]
) -> str | None:
    value = _typed(table, name, str, prefix, file, problems)
    if not isinstance(value, str):
        return None
    if not value:
        problems.append(f"{file}:{prefix}{name}: must not be empty")
        return None
    return value


# -- a reader for simple TOML --------------------------------------------------------------
#
# Sound, not complete: it returns None (and tomllib decides) for anything beyond one-line
# `key = value` pairs with bare keys, `[table]` and `[[array]]` headers of bare keys,
# comments, and values that are strings without escapes, decimal integers, plain decimal
# floats, booleans or one-line arrays of those. Whatever it returns is what tomllib returns.

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS = frozenset("0123456789")
_SPACE = " \t"


class _Unsure(Exception):
    """The reader cannot be sure what tomllib would make of the text."""


def read_simple_toml(text: str) -> dict[str, object] | None:
    """The document tomllib would return for a simple TOML text, or None if not simple."""
    try:
        return _SimpleToml(text).document
    except _Unsure:
        return None


class _SimpleToml:
    def __init__(self, text: str) -> None:
        self.document: dict[str, object] = {}
        self.headers: set[tuple[str, ...]] = set()
        self.arrays: set[tuple[str, ...]] = set()
        self.keys: list[tuple[tuple[str, ...], str]] = []
        current: dict[str, object] = self.document
        path: tuple[str, ...] = ()
        for line in text.split("\n"):
            if line.endswith("\r"):
                line = line[:-1]
            if any((c < " " and c != "\t") or c == "\x7f" for c in line):
                raise _Unsure
            line = line.strip(_SPACE)
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                current, path = self._header(line)
            else:
                self._pair(line, current, path)
        self._check_overlaps()

    def _header(self, line: str) -> tuple[dict[str, object], tuple[str, ...]]:
        is_array = line.startswith("[[")
        close = "]]" if is_array else "]"
        end = line.find(close)
        if end < 0:
            raise _Unsure
        names = tuple(line[2 if is_array else 1 : end].split("."))
        if not all(n and set(n) <= _BARE for n in names):
            raise _Unsure
        _end_of_line(line, end + len(close))
        if names in self.headers or (not is_array and names in self.arrays):
            raise _Unsure
        table: dict[str, object] = self.document
        for name in names[:-1]:
            table = _child(table, name)
        last = names[-1]
        if not is_array:
            self.headers.add(names)
            return _child(table, last), names
        if names not in self.arrays:
            if last in table:
                raise _Unsure
            self.arrays.add(names)
            table[last] = []
        entries = table[last]
        if not isinstance(entries, list):
            raise _Unsure
        entry: dict[str, object] = {}
        entries.append(entry)
        return entry, (*names, str(len(entries)))

    def _pair(self, line: str, table: dict[str, object], path: tuple[str, ...]) -> None:
        end = 0
        while end < len(line) and line[end] in _BARE:
            end += 1
        key = line[:end]
        rest = line[end:].lstrip(_SPACE)
        if not key or not rest.startswith("="):
            raise _Unsure
        value, position = _value(rest, _skip(rest, 1), allow_array=True)
        _end_of_line(rest, position)
        if key in table:
            raise _Unsure
        table[key] = value
        self.keys.append((path, key))

    def _check_overlaps(self) -> None:
        # A header under an array of tables, or under a key holding a value: legal or not,
        # tomllib's answer is not worth guessing.
        for header in self.headers | self.arrays:
            for length in range(1, len(header)):
                if header[:length] in self.arrays:
                    raise _Unsure
        for path, key in self.keys:
            below = (*path, key)
            if any(h[: len(below)] == below for h in self.headers | self.arrays):
                raise _Unsure


def _child(table: dict[str, object], name: str) -> dict[str, object]:
    child = table.setdefault(name, {})
    if not isinstance(child, dict):
        raise _Unsure
    return child


def _skip(line: str, position: int) -> int:
    while position < len(line) and line[position] in _SPACE:
        position += 1
    return position


def _end_of_line(line: str, position: int) -> None:
    position = _skip(line, position)
    if position < len(line) and line[position] != "#":
        raise _Unsure


def _value(line: str, position: int, *, allow_array: bool) -> tuple[object, int]:
    if position >= len(line):
        raise _Unsure
    first = line[position]
    if first in "\"'":
        if line.startswith(first * 3, position):
            raise _Unsure
        end = line.find(first, position + 1)
        text = line[position + 1 : end]
        if end < 0 or (first == '"' and "\\" in text):
            raise _Unsure
        return text, end + 1
    if first == "[" and allow_array:
        return _array(line, position + 1)
    end = position
    while end < len(line) and line[end] not in " \t,]#":
        end += 1
    word = line[position:end]
    if word in ("true", "false"):
        return word == "true", end
    return _number(word), end


def _array(line: str, position: int) -> tuple[list[object], int]:
    items: list[object] = []
    while True:
        position = _skip(line, position)
        if line.startswith("]", position):
            return items, position + 1
        item, position = _value(line, position, allow_array=False)
        items.append(item)
        position = _skip(line, position)
        if line.startswith(",", position):
            position += 1
        elif not line.startswith("]", position):
            raise _Unsure


def _number(word: str) -> int | float:
    if len(word) > 64:  # tomllib's answer for huge numbers is not worth guessing
        raise _Unsure
    digits = word[1:] if word[:1] in ("-", "+") else word
    whole, dot, fraction = digits.partition(".")
    if not whole or not set(whole) <= _DIGITS or (len(whole) > 1 and whole[0] == "0"):
        raise _Unsure
    if not dot:
        return int(word)
    if not fraction or not set(fraction) <= _DIGITS:
        raise _Unsure
    return float(word)
