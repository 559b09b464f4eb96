"""The event model and the validation of spool event files and Hydra payloads."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from bridge.storepath import is_derivation_path, is_store_path
from exporter.vocabulary import RejectReason, Source

SPOOL_FORMAT_VERSION = 1
MAX_NAME_LENGTH = 1024
MAX_OUTPUTS = 10_000
MAX_INT64 = 2**63 - 1
# Hydra payloads are a few levels deep; far deeper input is hostile and would only
# trouble json.dumps (recursion) when written back to the spool.
MAX_DEPTH = 64


class EventRejected(Exception):
    """An event that cannot be accepted; `reason` is a RejectReason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Event:
    """One validated build event: which store paths a build produced and where it came from."""

    source: str
    received_at: float
    out_paths: tuple[str, ...]
    drv_path: str | None = None
    build_id: int | None = None
    project: str | None = None
    jobset: str | None = None
    job: str | None = None
    build_status: int | None = None
    finished_at: float | None = None
    skipped_outputs: int = 0

    @property
    def hydra_job(self) -> tuple[str, str, str] | None:
        """The event's Hydra (project, jobset, job), or None when it does not know all three."""
        if self.project is None or self.jobset is None or self.job is None:
            return None
        return self.project, self.jobset, self.job

    @property
    def needs_output_resolution(self) -> bool:
        """True for hook events whose outputs must be looked up from the derivation."""
        return self.source == Source.HOOK and not self.out_paths and self.drv_path is not None


def _reject(message: str, reason: RejectReason = RejectReason.INVALID_EVENT) -> EventRejected:
    return EventRejected(reason, message)


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} overflows")
    return value


def _depth_exceeds(document: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return False


def decode_json(data: bytes) -> Any:
    """Decode strict UTF-8 JSON bytes, rejecting NaN/Infinity, overflowing numbers, lone
    surrogates (\\ud800 escapes that cannot be written back as UTF-8) and deep nesting."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _reject(
            f"not UTF-8: {exc.reason} at byte {exc.start}", RejectReason.INVALID_ENCODING
        ) from None
    try:
        document = json.loads(text, parse_constant=_no_constants, parse_float=_finite_float)
    except RecursionError:
        raise _reject("JSON nested too deeply", RejectReason.INVALID_JSON) from None
    except ValueError as exc:
        raise _reject(f"invalid JSON: {exc}", RejectReason.INVALID_JSON) from None
    if _depth_exceeds(document, MAX_DEPTH):
        raise _reject(f"JSON nested deeper than {MAX_DEPTH} levels", RejectReason.INVALID_JSON)
    # Surrogates can only come from \\u escapes; only then is the round trip worth checking.
    if "\\ud" in text.lower():
        try:
            json.dumps(document, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _reject(
                "JSON string with a lone UTF-16 surrogate", RejectReason.INVALID_ENCODING
            ) from None
        except RecursionError:
            raise _reject("JSON nested too deeply", RejectReason.INVALID_JSON) from None
    return document


def _field(
    obj: dict[str, Any],
    key: str,
    types: tuple[type, ...],
    *,
    nullable: bool,
    required: bool,
    where: str,
) -> Any:
    if key not in obj:
        if required:
            raise _reject(f"{where}: missing field {key!r}")
        return None
    value = obj[key]
    if value is None:
        if nullable:
            return None
        raise _reject(f"{where}: field {key!r} must not be null")
    # bool is an int subclass; never accept it where a number is expected.
    if isinstance(value, bool) and bool not in types:
        raise _reject(f"{where}: field {key!r} has type bool")
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in types)
        raise _reject(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _name(obj: dict[str, Any], key: str, where: str) -> str:
    value: str = _field(obj, key, (str,), nullable=False, required=True, where=where)
    if not value or len(value) > MAX_NAME_LENGTH or any(ord(c) < 32 or c == "\x7f" for c in value):
        raise _reject(f"{where}: field {key!r} is empty, too long or has control characters")
    return value


def _finite(value: float | int | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        result = float(value)
    except OverflowError:
        raise _reject(f"{what} is out of range") from None
    if not math.isfinite(result) or result < 0:
        raise _reject(f"{what} must be a finite non-negative number")
    return result


def _store_paths(drv: tuple[str, str] | None, outputs: list[tuple[str, str]]) -> list[str]:
    """Check the derivation and the output paths, each given with the message that rejects
    it, in that order; return the outputs without repeats, in order."""
    if drv is not None and not is_derivation_path(drv[0]):
        raise _reject(drv[1], RejectReason.INVALID_STORE_PATH)
    paths: dict[str, None] = {}
    for path, message in outputs:
        if not is_store_path(path):
            raise _reject(message, RejectReason.INVALID_STORE_PATH)
        paths[path] = None
    return list(paths)


def parse_hydra_payload(payload: Any, received_at: float) -> Event:
    """Validate a Hydra RunCommand payload (buildFinished) into an Event."""
    where = "hydra payload"
    if not isinstance(payload, dict):
        raise _reject(f"{where}: must be a JSON object")
    kind = _field(payload, "event", (str,), nullable=False, required=False, where=where)
    if kind is not None and kind != "buildFinished":
        raise _reject(f"{where}: unsupported event {kind[:64]!r}")
    build_id = _field(payload, "build", (int,), nullable=False, required=True, where=where)
    if not 0 <= build_id <= MAX_INT64:
        raise _reject(f"{where}: build id out of range")
    _field(payload, "finished", (bool,), nullable=False, required=False, where=where)
    for key in ("timestamp", "startTime"):
        _finite(_field(payload, key, (int, float), nullable=True, required=False, where=where), key)
    stop_time = _finite(
        _field(payload, "stopTime", (int, float), nullable=True, required=False, where=where),
        "stopTime",
    )
    project = _name(payload, "project", where)
    jobset = _name(payload, "jobset", where)
    job = _name(payload, "job", where)
    drv_path = _field(payload, "drvPath", (str,), nullable=False, required=True, where=where)
    status = _field(payload, "buildStatus", (int,), nullable=True, required=True, where=where)
    if status is not None and not -(2**31) <= status < 2**31:
        raise _reject(f"{where}: buildStatus out of range")
    for key in ("nixName", "system", "homepage", "description", "license"):
        _field(payload, key, (str,), nullable=True, required=False, where=where)
    for key in ("products", "metrics"):
        items = _field(payload, key, (list,), nullable=True, required=False, where=where)
        if items is not None and not all(isinstance(i, dict) for i in items):
            raise _reject(f"{where}: every entry of {key!r} must be an object")
    outputs = _field(payload, "outputs", (list,), nullable=False, required=True, where=where)
    if len(outputs) > MAX_OUTPUTS:
        raise _reject(f"{where}: more than {MAX_OUTPUTS} outputs")
    named: list[tuple[str, str]] = []
    skipped = 0
    for index, output in enumerate(outputs):
        owhere = f"{where}: outputs[{index}]"
        if not isinstance(output, dict):
            raise _reject(f"{owhere} must be an object")
        _field(output, "name", (str,), nullable=False, required=True, where=owhere)
        path = _field(output, "path", (str,), nullable=True, required=True, where=owhere)
        if path is None:
            skipped += 1  # a content-addressed output that was never realised
            continue
        named.append((path, f"{owhere}: path is not a store path"))
    paths = _store_paths((drv_path, f"{where}: drvPath is not a derivation store path"), named)
    return Event(
        source=Source.HYDRA,
        received_at=received_at,
        out_paths=tuple(paths),
        drv_path=drv_path,
        build_id=build_id,
        project=project,
        jobset=jobset,
        job=job,
        build_status=status,
        finished_at=stop_time,
        skipped_outputs=skipped,
    )


def parse_hook_fields(drv_path: Any, out_paths: Any, received_at: float) -> Event:
    """Validate post-build-hook values (DRV_PATH, space-separated OUT_PATHS) into an Event."""
    if not isinstance(drv_path, str) or not isinstance(out_paths, str):
        raise _reject("hook event: drv_path and out_paths must be strings")
    drv = drv_path.strip() or None
    paths = _store_paths(
        None if drv is None else (drv, "hook event: DRV_PATH is not a derivation store path"),
        [(path, "hook event: OUT_PATHS has a non-store path") for path in out_paths.split()],
    )
    if len(paths) > MAX_OUTPUTS:
        raise _reject(f"hook event: more than {MAX_OUTPUTS} outputs")
    if drv is None and not paths:
        raise _reject("hook event: neither DRV_PATH nor OUT_PATHS is set")
    return Event(source=Source.HOOK, received_at=received_at, out_paths=tuple(paths), drv_path=drv)


def parse_spool_document(doc: Any, fallback_time: float) -> Event:
    """Validate one decoded spool event file (the envelope written by producers)."""
    if not isinstance(doc, dict):
        raise _reject("event file: must be a JSON object")
    version = doc.get("version")
    if version != SPOOL_FORMAT_VERSION or isinstance(version, bool):
        raise _reject(f"event file: unsupported version {str(version)[:32]!r}")
    received = _finite(
        _field(doc, "received_at", (int, float), nullable=True, required=False, where="event file"),
        "received_at",
    )
    received_at = fallback_time if received is None else received
    kind = doc.get("kind")
    if kind == "hydra":
        return parse_hydra_payload(doc.get("payload"), received_at)
    if kind == "hook":
        return parse_hook_fields(doc.get("drv_path", ""), doc.get("out_paths", ""), received_at)
    raise _reject(f"event file: unknown kind {str(kind)[:32]!r}")


def parse_spool_file(data: bytes, fallback_time: float) -> Event:
    """Decode and validate the bytes of one spool event file."""
    document = decode_json(data)
    return parse_spool_document(document, fallback_time)


def hydra_envelope(payload: Any, received_at: float) -> dict[str, Any]:
    """Wrap a Hydra payload in the spool envelope."""
    return {
        "version": SPOOL_FORMAT_VERSION,
        "kind": "hydra",
        "received_at": received_at,
        "payload": payload,
    }


def hook_envelope(drv_path: str, out_paths: str, received_at: float) -> dict[str, Any]:
    """Wrap post-build-hook values in the spool envelope."""
    return {
        "version": SPOOL_FORMAT_VERSION,
        "kind": "hook",
        "received_at": received_at,
        "drv_path": drv_path,
        "out_paths": out_paths,
    }
