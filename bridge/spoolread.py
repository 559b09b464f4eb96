"""Read one spool file into an event, or say why not; nothing is moved, recorded or counted.

Files come from two channels: `incoming/` (written by `enqueue-hydra`, renamed in; the
daemon deletes them once recorded) and the root-only hook directory (one line per build,
written by the post-build-hook; the files stay, the daemon remembers which it consumed).
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from bridge.events import Event, EventRejected, parse_spool_file
from bridge.logsetup import input_logger
from bridge.safeopen import is_transient
from bridge.spool import EventFile, SpoolLayout, read_event_file
from bridge.store import NixStore, StoreQueryError
from exporter.vocabulary import RejectReason, Source

log = input_logger(__name__)

# A file that is not valid JSON yet may still be being written in place (not renamed in):
# give it this long, or until its writer closes it, before it is quarantined.
SETTLE_SECONDS = 5.0

Identity = tuple[int, int, int]
"""A hook file's (inode, mtime_ns, size): what tells a consumed file from a rewritten one."""


class Verdict(Enum):
    """What to do with a file that was read."""

    ACCEPT = "accept"
    REJECT = "reject"
    DEFER = "defer"
    DUPLICATE = "duplicate"
    NOTHING = "nothing"


@dataclass(frozen=True)
class FileRead:
    """The result of reading one spool file."""

    path: Path
    verdict: Verdict
    event: Event | None = None
    digest: str | None = None
    """The SHA-256 of the content: with the name, what makes a file a duplicate."""
    identity: Identity | None = None
    """Set for hook files, which stay where they are."""
    reason: str = ""
    message: str = ""
    """Why it is rejected, or why it is deferred (empty while a file is still settling)."""
    data: bytes = b""
    """A hook file's content, copied into quarantine if it is rejected (the file stays)."""


@dataclass(frozen=True)
class Channels:
    """Which files may be read now, decided at the start of each pass from the spool's
    permissions (hook_seen is the live record of consumed hook files, which grows as the
    pass records or rejects them)."""

    layout: SpoolLayout
    hook_trusted: bool
    """The hook directory is writable only by root or the daemon's own user."""
    incoming_private: bool
    """incoming/ is private to the daemon, so a hook event there is trusted too."""
    hook_seen: Mapping[str, Identity]
    """Hook files consumed already."""


class SpoolReader:
    """Reads, validates and resolves spool files."""

    def __init__(
        self,
        store: NixStore,
        max_bytes: int,
        now: Callable[[], float],
        recorded_before: Callable[[str, str], bool],
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.now = now
        self.recorded_before = recorded_before

    def read(self, path: Path, channels: Channels, *, writer_closed: bool = False) -> FileRead:
        """Read one file of either channel; every failure becomes a verdict, not an error
        (except the state database's, which stops the whole pass)."""
        hook = channels.layout.in_hook_channel(path)
        if hook and not channels.hook_trusted:
            return FileRead(path, Verdict.NOTHING)
        try:
            raw = read_event_file(path, self.max_bytes)
        except EventRejected as exc:  # not a regular file, too large
            return _rejected(path, exc)
        except Exception as exc:
            return _failed(path, hook, exc)
        # A hook file stays where it is: its identity tells it from a rewritten one.
        identity = (raw.inode, raw.mtime_ns, len(raw.data)) if hook else None
        try:
            return self._judge(raw, identity, channels, writer_closed)
        except EventRejected as exc:
            return _rejected(path, exc, identity, raw.data)
        except Exception as exc:
            return _failed(path, hook, exc, identity, raw.data)

    def _judge(
        self,
        raw: EventFile,
        identity: Identity | None,
        channels: Channels,
        writer_closed: bool,
    ) -> FileRead:
        """The verdict on a file read whole (identity is set for a hook file only); raises
        EventRejected for a bad one."""
        path, data = raw.path, raw.data
        hook = identity is not None
        digest = hashlib.sha256(data).hexdigest()
        if hook:
            if channels.hook_seen.get(path.name) == identity:
                return FileRead(path, Verdict.NOTHING)
            if not data.endswith(b"\n"):
                # The hook writes its whole line at once: until the newline is there the
                # file is being written (or the write failed and the hook removes it).
                if self.now() - raw.mtime < SETTLE_SECONDS:
                    return FileRead(path, Verdict.DEFER)
                raise EventRejected(RejectReason.INCOMPLETE_EVENT, "hook file has no final newline")
        elif self.recorded_before(spool_name(path), digest):
            # Recorded before a crash came between commit and unlink. The content decides,
            # not the name alone: another writer's file of that name is another event.
            return FileRead(path, Verdict.DUPLICATE)
        try:
            event = parse_spool_file(data, raw.mtime)
        except EventRejected as exc:
            settling = self.now() - raw.mtime < SETTLE_SECONDS
            if exc.reason == RejectReason.INVALID_JSON and settling and not writer_closed:
                return FileRead(path, Verdict.DEFER)
            raise
        if hook and event.source != Source.HOOK:
            raise EventRejected(
                RejectReason.INVALID_EVENT, "the hook directory holds hook events only"
            )
        if not hook and event.source == Source.HOOK and not channels.incoming_private:
            raise EventRejected(
                RejectReason.UNTRUSTED_CHANNEL,
                "hook events count only from the hook directory, which only root writes; "
                "incoming/ is writable by other users",
            )
        return FileRead(
            path,
            Verdict.ACCEPT,
            event=self._checked_outputs(event),
            digest=digest,
            identity=identity,
            data=data if hook else b"",  # quarantined if the database refuses the event
        )

    def _checked_outputs(self, event: Event) -> Event:
        """A hook event with only DRV_PATH gets its outputs from the store; a Hydra event
        may name only outputs of its own drvPath (the store, not the payload, says which)."""
        resolve = event.needs_output_resolution
        verify = event.source == Source.HYDRA and bool(event.out_paths)
        if event.drv_path is None or not (resolve or verify):
            return event
        try:
            outputs = self.store.resolve_outputs(event.drv_path)
        except StoreQueryError as exc:
            message = str(exc) if resolve else f"cannot check the outputs of drvPath: {exc}"
            raise EventRejected(RejectReason.UNRESOLVED_OUTPUTS, message) from None
        if resolve:
            return replace(event, out_paths=tuple(outputs))
        known = set(outputs)
        foreign = [path for path in event.out_paths if path not in known]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise EventRejected(
                RejectReason.FOREIGN_OUTPUTS,
                f"{foreign[0]}{more} is not an output of {event.drv_path}",
            )
        return event


def _rejected(
    path: Path, exc: EventRejected, identity: Identity | None = None, data: bytes = b""
) -> FileRead:
    return FileRead(
        path, Verdict.REJECT, identity=identity, reason=exc.reason, message=exc.message, data=data
    )


def _failed(
    path: Path, hook: bool, exc: Exception, identity: Identity | None = None, data: bytes = b""
) -> FileRead:
    """The verdict when reading or judging a file raised something other than a rejection."""
    if isinstance(exc, sqlite3.Error):
        raise exc  # the database, not this file: the whole pass is retried later
    if isinstance(exc, MemoryError):
        return FileRead(path, Verdict.DEFER, message="out of memory")
    if isinstance(exc, FileNotFoundError) or (hook and isinstance(exc, PermissionError)):
        # Gone (taken already, or aged out), or a hook file not for us to read.
        return FileRead(path, Verdict.NOTHING)
    if isinstance(exc, PermissionError):
        message = "event file is not readable by the daemon"
        return FileRead(path, Verdict.REJECT, reason=RejectReason.UNREADABLE, message=message)
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOENT:
            return FileRead(path, Verdict.NOTHING)
        if is_transient(exc):
            return FileRead(path, Verdict.DEFER, message=exc.strerror or str(exc))
        where = "" if hook else " event file"
        message = f"cannot read{where}: {exc.strerror}"
        return FileRead(
            path,
            Verdict.REJECT,
            identity=identity,
            reason=RejectReason.UNREADABLE,
            message=message,
            data=data,
        )
    # Whatever else one file does must not stop the others from being read.
    log.error("unexpected error reading %s", path, exc_info=exc)
    return FileRead(
        path,
        Verdict.REJECT,
        identity=identity,
        reason=RejectReason.INVALID_EVENT,
        message=f"unexpected {type(exc).__name__}",
        data=data,
    )


def spool_name(path: Path) -> str:
    """The file name as stored in the database (undecodable bytes escaped)."""
    return os.fsencode(path.name).decode("utf-8", errors="backslashreplace")
