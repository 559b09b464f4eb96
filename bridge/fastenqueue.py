"""`enqueue-hydra` on its common path: a valid payload into a present spool, at the cost of
little more than starting the interpreter.

Hydra's RunCommand starts the command once per finished build, so this module imports only
what the interpreter has loaded at start-up anyway, plus `_json` (the C half of `json`, which
`json.loads` and `json.dumps` use themselves) and `bridge.spooltarget`. It handles only the
case where everything is right: the options are plain, the config names the spool, the
payload passes the same checks as `bridge.events.parse_hydra_payload` and the event file is
written. Anything else (a usage error, an invalid payload, a missing or full spool) returns
None and the command runs again through `bridge.cli`, which gives every message, exit code
and quarantined file; nothing has been written by then. tests/test_fastenqueue.py checks that
both paths accept the same payloads and write the same files.
"""

from __future__ import annotations

import os
import stat
import sys
import time

from bridge.spooltarget import TargetError, config_path, read_spool_target

TYPE_CHECKING = False  # typing itself is too slow to import here; mypy knows the name
if TYPE_CHECKING:
    from typing import Any

SPOOL_FORMAT_VERSION = 1  # bridge.events.SPOOL_FORMAT_VERSION
MAX_NAME_LENGTH = 1024
MAX_OUTPUTS = 10_000
MAX_INT64 = 2**63 - 1
MAX_DEPTH = 64
STORE_PREFIX = "/nix/store/"
BASE32 = frozenset("0123456789abcdfghijklmnpqrsvwxyz")
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-._?=")
OPTIONS = ("--config", "--json-file")


def enqueue_hydra(args: list[str]) -> int | None:
    """Record the payload and return 0, or return None when bridge.cli must handle it."""
    options = _options(args)
    if options is None:
        return None
    try:
        target = read_spool_target(config_path(options.get("--config")))
    except (TargetError, RuntimeError):
        return None
    source = options.get("--json-file") or os.environ.get("HYDRA_JSON")
    if not source:
        return None
    try:
        with open(source, "rb") as handle:
            data = handle.read(target.max_event_bytes + 1)
    except OSError:
        return None
    if len(data) > target.max_event_bytes:
        return None
    payload = hydra_payload(decode_json(data))
    if payload is None:
        return None
    now = time.time()
    envelope = {
        "version": SPOOL_FORMAT_VERSION,
        "kind": "hydra",
        "received_at": now,
        "payload": payload,
    }
    document = encode_json(envelope)
    if document is None or len(document) > target.max_event_bytes:
        return None
    name = write_event(target.spool_dir, "hydra", document)
    if name is None:
        return None
    message = (
        f"recorded build {payload['build']} "
        f"({payload['project']}:{payload['jobset']}:{payload['job']}) as {name}\n"
    )
    _say(message)
    return 0


def _options(args: list[str]) -> dict[str, str] | None:
    """`--config` and `--json-file` as click would parse them, or None for anything else."""
    if any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ):
        return None  # click's shell completion
    options: dict[str, str] = {}
    index = 0
    while index < len(args):
        name, equals, value = args[index].partition("=")
        if name not in OPTIONS or name in options:
            return None
        if not equals:
            index += 1
            if index == len(args):
                return None
            value = args[index]
        if not value or value.startswith("-") or not _click_path_ok(value):
            return None
        options[name] = value
        index += 1
    return options


def _click_path_ok(path: str) -> bool:
    """What click.Path(dir_okay=False) accepts: a missing path, or a readable non-directory."""
    try:
        info = os.stat(path)
    except OSError:
        return True
    return not stat.S_ISDIR(info.st_mode) and os.access(path, os.R_OK)


def decode_json(data: bytes) -> object | None:
    """What bridge.events.decode_json returns for `data`, or None where it would reject it
    (or, for \\ud escapes, might: the full path checks those)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\\ud" in text.lower():
        return None
    try:
        import _json
    except ImportError:
        return None
    try:
        start = _skip_whitespace(text, 0)
        scanner = _json.make_scanner(_DecodeContext())  # type: ignore[arg-type]
        document: object
        document, end = scanner(text, start)
    except Exception:  # the full path reports it
        return None
    if _skip_whitespace(text, end) != len(text) or _depth_exceeds(document, MAX_DEPTH):
        return None
    return document


class _DecodeContext:
    """The attributes json.JSONDecoder gives its C scanner, as decode_json sets them."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_int = int

    @staticmethod
    def parse_float(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")) or value != value:
            raise ValueError(f"number {text[:32]} overflows")
        return value

    @staticmethod
    def parse_constant(name: str) -> object:
        raise ValueError(f"non-standard JSON constant {name}")


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\n\r":
        index += 1
    return index


def _depth_exceeds(document: object, limit: int) -> bool:
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return False


def encode_json(document: object) -> bytes | None:
    """`json.dumps(document, separators=(",", ":")).encode("ascii")`, as spool.write_event."""
    try:
        import _json
    except ImportError:
        return None
    try:
        encoder = _json.make_encoder(
            {}, _unserializable, _json.encode_basestring_ascii, None, ":", ",", False, False, True
        )
        return "".join(encoder(document, 0)).encode("ascii")
    except Exception:  # the full path reports it
        return None


def _unserializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def write_event(spool_dir: str, kind: str, data: bytes) -> str | None:
    """bridge.spool.write_event: tmp, fsync, rename into incoming; the name, or None."""
    name = f"{kind}-{time.time_ns()}-{os.getpid()}-{os.urandom(4).hex()}.json"
    incoming, tmp_dir = f"{spool_dir}/incoming", f"{spool_dir}/tmp"
    if not os.path.isdir(incoming) or not os.path.isdir(tmp_dir):
        return None
    tmp = f"{tmp_dir}/{name}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o660)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, f"{incoming}/{name}")
    except OSError:
        try:  # noqa: SIM105 (contextlib imports functools and collections: too slow here)
            os.unlink(tmp)
        except OSError:
            pass
        return None
    return name


def _say(message: str) -> None:
    """Print as click.echo does: an ASCII-only stdout gets UTF-8 with replacements."""
    stream = sys.stdout
    encoding = (getattr(stream, "encoding", None) or "utf-8").lower()
    if encoding in ("ascii", "us-ascii", "ansi_x3.4-1968"):
        encoding = "utf-8"
    try:
        stream.flush()
        stream.buffer.write(message.encode(encoding, "replace"))
        stream.buffer.flush()
    except (AttributeError, OSError, LookupError):
        return


# -- the checks of bridge.events.parse_hydra_payload and bridge.storepath ---------------


def is_store_path(value: object) -> bool:
    """bridge.storepath.is_store_path without the regular expression module."""
    if not isinstance(value, str) or not value.startswith(STORE_PREFIX):
        return False
    digest, dash, name = value[11:43], value[43:44], value[44:]
    return (
        len(digest) == 32
        and set(digest) <= BASE32
        and dash == "-"
        and 1 <= len(name) <= 211
        and set(name) <= NAME_CHARS
        and not name.startswith(".")
    )


def hydra_payload(payload: object) -> dict[str, Any] | None:
    """The payload if bridge.events.parse_hydra_payload accepts it, else None."""
    if isinstance(payload, dict) and valid_hydra_payload(payload):
        return payload
    return None


def valid_hydra_payload(payload: dict[str, Any]) -> bool:
    """True when bridge.events.parse_hydra_payload accepts the decoded payload."""
    if "event" in payload and payload["event"] != "buildFinished":
        return False
    build = payload.get("build")
    if not isinstance(build, int) or isinstance(build, bool) or not 0 <= build <= MAX_INT64:
        return False
    if "finished" in payload and not isinstance(payload["finished"], bool):
        return False
    for key in ("timestamp", "startTime", "stopTime"):
        if not _time_ok(payload.get(key)):
            return False
    for key in ("project", "jobset", "job"):
        value = payload.get(key)
        if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
            return False
        if any(ord(c) < 32 or c == "\x7f" for c in value):
            return False
    drv = payload.get("drvPath")
    if not is_store_path(drv) or not isinstance(drv, str) or not drv.endswith(".drv"):
        return False
    if "buildStatus" not in payload:
        return False
    status = payload["buildStatus"]
    if status is not None and (
        not isinstance(status, int) or isinstance(status, bool) or not -(2**31) <= status < 2**31
    ):
        return False
    for key in ("nixName", "system", "homepage", "description", "license"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            return False
    for key in ("products", "metrics"):
        items = payload.get(key)
        if items is not None and (
            not isinstance(items, list) or not all(isinstance(i, dict) for i in items)
        ):
            return False
    outputs = payload.get("outputs")
    if not isinstance(outputs, list) or len(outputs) > MAX_OUTPUTS:
        return False
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            return False
        if "path" not in output:
            return False
        path = output["path"]
        if path is not None and not is_store_path(path):
            return False
    return True


def _time_ok(value: object) -> bool:
    """bridge.events._finite: absent, null, or a finite non-negative number."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return number == number and number not in (float("inf"), float("-inf")) and number >= 0
