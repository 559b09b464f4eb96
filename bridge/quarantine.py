"""What sits in the spool's quarantine/: read it for people, count new rejections once."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bridge.logsetup import input_logger
from bridge.spool import REASON_SUFFIX, SpoolLayout, reason_path
from bridge.statedb import StateDb
from exporter.vocabulary import RejectReason

log = input_logger(__name__)

# A .reason file that cannot be read or names no known reason is counted under this one,
# so the metric's label set stays bounded.
FALLBACK_REASON = RejectReason.INVALID_EVENT


@dataclass(frozen=True)
class QuarantinedFile:
    """One rejected event, as described by its `.reason` file."""

    reason_file: str
    file: str
    quarantined_as: str
    reason: str
    message: str
    quarantined_at: float | None


@dataclass(frozen=True)
class QuarantineSummary:
    """How many files are in quarantine and the newest of them."""

    directory: Path
    count: int
    newest: tuple[QuarantinedFile, ...]
    error: str | None = None


def reason_files(layout: SpoolLayout) -> list[str]:
    """Names of the `.reason` files in quarantine/ (empty when it does not exist)."""
    try:
        with os.scandir(layout.quarantine) as entries:
            return sorted(e.name for e in entries if e.name.endswith(REASON_SUFFIX))
    except FileNotFoundError:
        return []


def read_reason(layout: SpoolLayout, name: str) -> QuarantinedFile:
    """Parse one `.reason` file; an unreadable or odd one still gives an entry."""
    stem = name.removesuffix(REASON_SUFFIX)
    path = layout.quarantine / name
    record: dict[str, object] = {}
    problem = ""
    try:
        with open(path, "rb") as handle:
            loaded = json.loads(handle.read(65536))
        if isinstance(loaded, dict):
            record = loaded
        else:
            problem = "the reason file is not a JSON object"
    except (OSError, ValueError) as exc:
        problem = f"cannot read the reason file: {getattr(exc, 'strerror', None) or exc}"
    reason = record.get("reason")
    if not isinstance(reason, str) or reason not in set(RejectReason):
        reason = FALLBACK_REASON
    at = record.get("quarantined_at")
    when: float | None = float(at) if isinstance(at, int | float) else None
    if when is None:
        try:
            when = os.stat(path).st_mtime
        except OSError:
            when = None
    message = record.get("message")
    original = record.get("file")
    saved = record.get("quarantined_as")
    return QuarantinedFile(
        reason_file=name,
        file=_text(original if isinstance(original, str) else stem),
        quarantined_as=_text(saved if isinstance(saved, str) else stem),
        reason=reason,
        message=_text(message if isinstance(message, str) else problem),
        quarantined_at=when,
    )


def _text(value: str) -> str:
    """Valid UTF-8 text: undecodable file name bytes shown as backslash escapes."""
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:
        raw = value.encode("utf-8", errors="backslashreplace")
    return raw.decode("utf-8", errors="backslashreplace")


def ledger_name(name: str) -> str:
    """A quarantine file name as stored in the database (undecodable bytes escaped)."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def summarize(layout: SpoolLayout, newest: int = 5) -> QuarantineSummary:
    """Count the quarantined files and describe the newest (for `status` and the page)."""
    try:
        names = reason_files(layout)
    except OSError as exc:
        return QuarantineSummary(layout.quarantine, 0, (), f"cannot list: {exc.strerror}")
    entries = [read_reason(layout, name) for name in names]
    entries.sort(key=lambda e: (e.quarantined_at or 0.0, e.reason_file), reverse=True)
    return QuarantineSummary(layout.quarantine, len(entries), tuple(entries[:newest]))


class RejectionCounter:
    """Counts each file in quarantine/ once, whoever put it there, across restarts.

    Producers (`enqueue-hydra`) quarantine refused payloads themselves and exit 1; the
    daemon finds their `.reason` files on its rescan. Which ones were counted is kept in
    the queue database, so a restart counts nothing twice. Files the daemon quarantines
    itself are recorded as counted at once (see `claim`).
    """

    def __init__(
        self,
        layout: SpoolLayout,
        db: StateDb,
        count: Callable[[str], None],
        clock: Callable[[], float],
    ) -> None:
        self.layout = layout
        self.db = db
        self.count = count
        self.clock = clock

    def claim(self, target: Path, reason: str) -> bool:
        """Record that the daemon itself counts this just-quarantined file; False if it
        was counted before or cannot be recorded now (the next check counts it then)."""
        try:
            with self.db.transaction():
                return self.mark(target, reason)
        except sqlite3.Error as exc:
            log.debug("cannot record quarantined %s as counted yet: %s", target.name, exc)
            return False

    def mark(self, target: Path, reason: str) -> bool:
        """`claim` inside the caller's transaction; False if it was counted before."""
        name = ledger_name(reason_path(target).name)
        return self.db.mark_quarantine_counted(name, reason, self.clock())

    def check(self) -> int:
        """Count, log and remember every `.reason` file not counted yet; return how many."""
        try:
            names = reason_files(self.layout)
        except OSError as exc:
            log.error("cannot list %s: %s", self.layout.quarantine, exc.strerror)
            return 0
        counted = self.db.quarantine_counted()
        keys = {name: ledger_name(name) for name in names}
        new = [name for name in names if keys[name] not in counted]
        gone = counted.difference(keys.values())
        found = 0
        for name in new:
            entry = read_reason(self.layout, name)
            with self.db.transaction():
                fresh = self.db.mark_quarantine_counted(keys[name], entry.reason, self.clock())
            if not fresh:
                continue
            found += 1
            self.count(entry.reason)
            log.warning(
                "rejected event %s found in quarantine as %s: %s: %s",
                entry.file,
                entry.quarantined_as,
                entry.reason,
                entry.message,
            )
        if gone:
            # Removed by the operator: forget them, so the table does not grow forever.
            with self.db.transaction():
                self.db.forget_quarantine_counted(gone)
        return found
