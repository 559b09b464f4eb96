"""Put a rejected spool file into quarantine/ with its reason, count it once and log it."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from bridge.logsetup import input_logger
from bridge.quarantine import RejectionCounter
from bridge.spool import SpoolLayout, discard_quarantined, quarantine, quarantine_bytes
from bridge.spoolread import Identity
from bridge.statedb import StateDb

log = input_logger(__name__)


class Rejecter:
    """Quarantines rejected files of both spool channels: a file of incoming/ is moved
    there; a hook file is copied (it must stay in the root-only directory) and remembered
    as consumed, so it is not read again."""

    def __init__(
        self,
        layout: SpoolLayout,
        db: StateDb,
        counter: RejectionCounter,
        now: Callable[[], float],
        hook_seen: dict[str, Identity],
    ) -> None:
        self.layout = layout
        self.db = db
        self.counter = counter
        self.now = now
        self.hook_seen = hook_seen

    def reject(
        self,
        path: Path,
        reason: str,
        message: str,
        *,
        identity: Identity | None = None,
        data: bytes = b"",
    ) -> bool:
        """Quarantine one file; False when it could not be (it is tried again later)."""
        hook = self.layout.in_hook_channel(path)
        try:
            if hook:
                target = self._copy_hook_file(path, identity, data, reason, message)
                fresh = True
            else:
                target = quarantine(self.layout, path, reason, message, self.now())
                # Claimed, so that the quarantine rescan does not count it a second time.
                fresh = self.counter.claim(target, reason)
        except FileNotFoundError:
            return False  # gone meanwhile: nothing left to quarantine
        except OSError as exc:
            log.error(
                "cannot quarantine %s%s (%s): %s; %s",
                "hook file " if hook else "",
                path.name,
                reason,
                exc.strerror,
                "tried again at the next rescan"
                if hook
                else "it stays in incoming/ for the next rescan",
            )
            return False
        if fresh:
            self.counter.count(reason)
        if hook:
            log.warning(
                "rejected hook file %s as %s: %s (copy in %s)",
                path.name,
                reason,
                message,
                str(target),
            )
        else:
            log.warning("quarantined %s as %s: %s (%s)", path.name, reason, message, str(target))
        return True

    def _copy_hook_file(
        self, path: Path, identity: Identity | None, data: bytes, reason: str, message: str
    ) -> Path:
        """Copy a hook file into quarantine, remembered as consumed and counted in one
        transaction: if the database refuses, the copy goes too, so the next pass neither
        copies nor counts the file a second time. (A crash between the copy and the
        commit leaves the copy, which the quarantine rescan counts; the file is then
        copied once more. Rare enough not to be worth a journal.)"""
        if identity is None:
            info = os.lstat(path)
            identity = (info.st_ino, info.st_mtime_ns, info.st_size)
        now = self.now()
        target: Path | None = None
        try:
            with self.db.transaction():
                self.db.record_hook_file(path.name, identity, now)
                target = quarantine_bytes(self.layout, "hook", data, reason, message, now)
                self.counter.mark(target, reason)
        except sqlite3.Error:
            if target is not None:
                discard_quarantined(target)
            raise
        self.hook_seen[path.name] = identity
        return target
