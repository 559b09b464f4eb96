"""Put a rejected spool file into quarantine/ with its reason, count it once and log it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from bridge.logsetup import input_logger
from bridge.quarantine import RejectionCounter
from bridge.spool import SpoolLayout, quarantine, quarantine_bytes
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
            if hook and identity is None:
                info = os.lstat(path)
                identity = (info.st_ino, info.st_mtime_ns, info.st_size)
            if hook:
                target = quarantine_bytes(self.layout, "hook", data, reason, message, self.now())
            else:
                target = quarantine(self.layout, path, reason, message, self.now())
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
        if hook and identity is not None:
            with self.db.transaction():
                self.db.record_hook_file(path.name, identity, self.now())
            self.hook_seen[path.name] = identity
        # Claimed, so that the quarantine rescan does not count this file a second time.
        if self.counter.claim(target, reason):
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
