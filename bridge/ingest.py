"""The spool intake: read, validate and resolve event files, hand them to the intake path,
quarantine the bad ones; and the loop that batches watch notifications and rescans."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue

from bridge.clock import Clock
from bridge.config import Config
from bridge.events import Event, EventRejected, decode_json, parse_spool_document
from bridge.heartbeat import Heartbeat
from bridge.intake import Intake, Recorded
from bridge.logsetup import printable
from bridge.quarantine import RejectionCounter
from bridge.retrying import FailureBackoff
from bridge.safeopen import is_transient
from bridge.spool import (
    EventFile,
    SpoolLayout,
    is_candidate,
    quarantine,
    quarantine_bytes,
    read_event_file,
    unsafe_directory,
)
from bridge.statedb import StateDb
from bridge.store import NixStore, StoreQueryError
from bridge.watcher import Notification

log = logging.getLogger(__name__)

# A file that is not valid JSON yet may still be being written in place (not renamed in):
# give it this long, or until its writer closes it, before it is quarantined.
SETTLE_SECONDS = 5.0
FILES_PER_TRANSACTION = 500
# A file that was deferred (settling, or the machine could not read it) is looked at again
# this soon, instead of at the next full rescan.
DEFERRED_RECHECK_SECONDS = 1.0


@dataclass
class IngestStats:
    """What one ingest pass did."""

    recorded: int = 0
    duplicates: int = 0
    quarantined: int = 0
    deferred: int = 0
    enqueued: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Accepted:
    path: Path
    event: Event
    # The SHA-256 of the file's content: with the name, what makes it a duplicate.
    digest: str | None = None
    # A hook file's (inode, mtime_ns, size): hook files stay, the daemon remembers them.
    hook_identity: tuple[int, int, int] | None = None


class Ingestor:
    """Reads and validates event files, records them through the intake, quarantines the
    bad ones; `run` is the ingest loop."""

    def __init__(
        self,
        config: Config,
        queue: StateDb,
        store: NixStore,
        intake: Intake,
        clock: Clock,
        *,
        stop: threading.Event | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.stop = stop
        self.config = config
        self.layout = SpoolLayout.of(config)
        self.queue = queue
        self.store = store
        self.intake = intake
        self.clock = clock
        self.heartbeat = heartbeat or Heartbeat(clock.monotonic, float("inf"))
        self.rejections = RejectionCounter(self.layout, queue, intake.count_rejected, clock.time)
        # Hook files consumed so far (loaded from the database on first use).
        self._hook_seen: dict[str, tuple[int, int, int]] | None = None
        self._hook_problem: str | None = None
        self._incoming_private = False

    def run(self, notifications: SimpleQueue[Notification | None], stop: threading.Event) -> None:
        """Ingest what the watch reports, batched, and rescan the spool every rescan_seconds
        (sooner after a deferred file, at once on a None notification) until stop is set."""
        next_rescan = self.clock.monotonic() + self.config.spool.rescan_seconds
        backoff = FailureBackoff("ingest pass", log)
        while not stop.is_set():
            self.heartbeat.idle()
            batch, rescan_now = _next_batch(
                notifications, max(0.0, next_rescan - self.clock.monotonic())
            )
            if rescan_now:
                next_rescan = self.clock.monotonic()
            if stop.is_set():
                break
            self.heartbeat.busy()
            try:
                next_rescan = self._pass(batch, next_rescan)
            except Exception as exc:
                # Files stay in the spool; the rescan after the pause picks them up.
                next_rescan = self.clock.monotonic() + backoff.failed(exc)
            else:
                backoff.succeeded()

    def _pass(self, batch: list[Notification], next_rescan: float) -> float:
        """Ingest the notified files, and rescan when due; return when to rescan next."""
        closed = list(dict.fromkeys(path for path, final in batch if final))
        created = [p for p in dict.fromkeys(p for p, _ in batch) if p not in closed]
        deferred = self.ingest(closed, writer_closed=True).deferred
        deferred += self.ingest(created).deferred
        if self.clock.monotonic() >= next_rescan:
            deferred += self.ingest(self.scan()).deferred
            self.check_quarantine()
            next_rescan = self.clock.monotonic() + self.config.spool.rescan_seconds
        if deferred:
            next_rescan = min(next_rescan, self.clock.monotonic() + DEFERRED_RECHECK_SECONDS)
        return next_rescan

    def scan(self) -> list[Path]:
        """Every candidate file in incoming/ and every unconsumed one in the hook directory."""
        try:
            with os.scandir(self.layout.incoming) as entries:
                names = sorted(e.name for e in entries if is_candidate(e.name))
        except FileNotFoundError:
            names = []
        return [self.layout.incoming / name for name in names] + self._scan_hook()

    def _scan_hook(self) -> list[Path]:
        hook = self.layout.hook
        try:
            with os.scandir(hook) as entries:
                present = {e.name: e for e in entries if is_candidate(e.name)}
        except OSError:
            return []
        seen = self._seen_hook_files()
        gone = [name for name in seen if name not in present]
        if gone:
            self.queue.forget_hook_files(gone)  # aged out by tmpfiles
            for name in gone:
                del seen[name]
        fresh = []
        for name in sorted(present):
            known = seen.get(name)
            if known is not None:
                try:
                    info = present[name].stat(follow_symlinks=False)
                except OSError:
                    continue
                if (info.st_ino, info.st_mtime_ns, info.st_size) == known:
                    continue
            fresh.append(hook / name)
        return fresh

    def _seen_hook_files(self) -> dict[str, tuple[int, int, int]]:
        if self._hook_seen is None:
            self._hook_seen = self.queue.hook_files()
        return self._hook_seen

    def _check_channels(self) -> None:
        """Which channels may carry hook events now: the hook directory if only the hook's
        user (root, or this daemon's own user) can write it, and incoming/ only if it is
        private to this daemon."""
        trusted = {0, os.geteuid()}
        self._incoming_private = unsafe_directory(self.layout.incoming, trusted) is None
        problem = unsafe_directory(self.layout.hook, trusted)
        if problem is not None and not os.path.lexists(self.layout.hook):
            problem = None  # nothing there to read (a spool without the hook)
        if problem != self._hook_problem and problem is not None:
            log.error(
                "hook directory %s is not safe, its files are not read: %s (run "
                "`hydra-cachix-bridge init` as root, see docs/deployment.md)",
                printable(str(self.layout.hook)),
                printable(problem),
            )
        self._hook_problem = problem

    def check_quarantine(self) -> int:
        """Count rejected files that producers put into quarantine/ since the last check."""
        return self.rejections.check()

    def ingest(self, paths: Iterable[Path], *, writer_closed: bool = False) -> IngestStats:
        """Process files; those left unparsed and still settling are counted as deferred."""
        stats = IngestStats()
        chunk: list[_Accepted] = []
        self._check_channels()
        for path in paths:
            if self.stop is not None and self.stop.is_set():
                break  # files not read yet stay in the spool for the next start
            accepted = self._accept(path, stats, writer_closed)
            self.heartbeat.beat()
            if accepted is not None:
                chunk.append(accepted)
            if len(chunk) >= FILES_PER_TRANSACTION:
                self._commit(chunk, stats)
                chunk = []
        if chunk:
            self._commit(chunk, stats)
        return stats

    def _accept(self, path: Path, stats: IngestStats, writer_closed: bool) -> _Accepted | None:
        if not is_candidate(path.name):
            return None
        if path.parent == self.layout.hook and path.parent != self.layout.incoming:
            if self._hook_problem is not None:
                return None
            try:
                return self._read_hook(path, stats)
            except sqlite3.Error:
                raise
            except Exception as exc:
                log.exception("unexpected error reading hook file %s", printable(path.name))
                self._reject_hook(path, None, "invalid_event", f"unexpected {type(exc).__name__}")
                stats.quarantined += 1
                return None
        if path.parent != self.layout.incoming:
            return None
        try:
            return self._read(path, stats, writer_closed)
        except sqlite3.Error:
            raise  # the database, not this file: the whole pass is retried later
        except MemoryError:
            self._defer_transient(path, "out of memory", stats)
            return None
        except Exception as exc:
            # Whatever else one file does must not stop the others from being read.
            log.exception("unexpected error reading event file %s", printable(path.name))
            self._quarantine(path, "invalid_event", f"unexpected {type(exc).__name__}", stats)
            return None

    def _read(self, path: Path, stats: IngestStats, writer_closed: bool) -> _Accepted | None:
        now = self.clock.time()
        try:
            raw = read_event_file(path, self.config.spool.max_event_bytes)
            digest = hashlib.sha256(raw.data).hexdigest()
            if self.queue.seen_spool_file(spool_name(path), digest):
                # Recorded before a crash took us between commit and unlink. The content
                # decides, not the name alone: another writer's file of the same name is
                # a different event.
                stats.duplicates += 1
                _unlink(path)
                return None
            try:
                event = parse_spool_document(decode_json(raw.data), fallback_time=raw.mtime)
            except EventRejected as exc:
                settling = now - raw.mtime < SETTLE_SECONDS
                if exc.reason == "invalid_json" and settling and not writer_closed:
                    stats.deferred += 1
                    return None
                raise
            if event.source == "hook" and not self._incoming_private:
                raise EventRejected(
                    "untrusted_channel",
                    "hook events count only from the hook directory, which only root writes; "
                    "incoming/ is writable by other users",
                )
            if event.needs_output_resolution and event.drv_path is not None:
                event = self._resolve(event)
            elif event.source == "hydra" and event.drv_path is not None:
                self._verify_outputs(event)
        except FileNotFoundError:
            return None  # already taken (a second notification for the same file)
        except PermissionError:
            self._quarantine(path, "unreadable", "event file is not readable by the daemon", stats)
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOENT,):
                return None
            if is_transient(exc):
                self._defer_transient(path, exc.strerror or str(exc), stats)
                return None
            self._quarantine(path, "unreadable", f"cannot read event file: {exc.strerror}", stats)
            return None
        except EventRejected as exc:
            self._quarantine(path, exc.reason, exc.message, stats)
            return None
        return _Accepted(path, event, digest)

    def _read_hook(self, path: Path, stats: IngestStats) -> _Accepted | None:
        """Read one file of the hook directory; it stays there whatever happens."""
        now = self.clock.time()
        try:
            raw = read_event_file(path, self.config.spool.max_event_bytes)
        except (FileNotFoundError, PermissionError):
            return None  # gone (aged out), or not for us to read: nothing to remember
        except OSError as exc:
            if is_transient(exc):
                self._defer_transient(path, exc.strerror or str(exc), stats)
                return None
            self._reject_hook(path, None, "unreadable", f"cannot read: {exc.strerror}")
            stats.quarantined += 1
            return None
        except EventRejected as exc:
            self._reject_hook(path, None, exc.reason, exc.message)
            stats.quarantined += 1
            return None
        identity = (raw.inode, raw.mtime_ns, len(raw.data))
        if self._seen_hook_files().get(path.name) == identity:
            return None
        if not raw.data.endswith(b"\n"):
            # The hook writes the whole line at once; until its newline is there the file
            # is being written (or the write failed and the hook is removing it).
            if now - raw.mtime < SETTLE_SECONDS:
                stats.deferred += 1
                return None
            self._reject_hook(path, raw, "incomplete_event", "hook file has no final newline")
            stats.quarantined += 1
            return None
        try:
            event = parse_spool_document(decode_json(raw.data), fallback_time=raw.mtime)
            if event.source != "hook":
                raise EventRejected("invalid_event", "the hook directory holds hook events only")
            if event.needs_output_resolution and event.drv_path is not None:
                event = self._resolve(event)
        except EventRejected as exc:
            self._reject_hook(path, raw, exc.reason, exc.message)
            stats.quarantined += 1
            return None
        digest = hashlib.sha256(raw.data).hexdigest()
        return _Accepted(path, event, digest, identity)

    def _reject_hook(self, path: Path, raw: EventFile | None, reason: str, message: str) -> None:
        """Copy a bad hook file into quarantine (it cannot be moved) and remember it."""
        now = self.clock.time()
        if raw is not None:
            identity = (raw.inode, raw.mtime_ns, len(raw.data))
            data = raw.data
        else:
            try:
                info = os.lstat(path)
            except OSError:
                return
            identity = (info.st_ino, info.st_mtime_ns, info.st_size)
            data = b""
        try:
            target = quarantine_bytes(self.layout, "hook", data, reason, message, now)
        except OSError as exc:
            log.error(
                "cannot quarantine hook file %s (%s): %s; tried again at the next rescan",
                printable(path.name),
                reason,
                exc.strerror,
            )
            return
        with self.queue.transaction():
            self.queue.record_hook_file(path.name, identity, now)
        self._seen_hook_files()[path.name] = identity
        # Claimed, so that the quarantine rescan does not count the copy a second time.
        if self.rejections.claim(target, reason):
            self.intake.count_rejected(reason)
        log.warning(
            "rejected hook file %s as %s: %s (copy in %s)",
            printable(path.name),
            reason,
            message,
            printable(str(target)),
        )

    def _defer_transient(self, path: Path, why: str, stats: IngestStats) -> None:
        """Leave a file for the next pass: the machine, not the file, is at fault."""
        stats.deferred += 1
        log.warning(
            "cannot read event file %s for now (%s); trying again", printable(path.name), why
        )

    def _verify_outputs(self, event: Event) -> None:
        """A Hydra event may name only outputs of its own drvPath (the store says which)."""
        assert event.drv_path is not None
        if not event.out_paths:
            return
        try:
            foreign = self.store.foreign_outputs(event.drv_path, event.out_paths)
        except StoreQueryError as exc:
            raise EventRejected(
                "unresolved_outputs", f"cannot check the outputs of drvPath: {exc}"
            ) from None
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise EventRejected(
                "foreign_outputs",
                f"{foreign[0]}{more} is not an output of {event.drv_path}",
            )

    def _resolve(self, event: Event) -> Event:
        assert event.drv_path is not None
        try:
            outputs = self.store.resolve_outputs(event.drv_path)
        except StoreQueryError as exc:
            raise EventRejected("unresolved_outputs", str(exc)) from None
        return Event(
            source=event.source,
            received_at=event.received_at,
            out_paths=tuple(outputs),
            drv_path=event.drv_path,
        )

    def _commit(self, chunk: list[_Accepted], stats: IngestStats) -> None:
        try:
            self._commit_together(chunk, stats)
        except sqlite3.OperationalError:
            raise  # disk full, locked: every file stays for the next pass
        except Exception as exc:
            if len(chunk) > 1:
                # Find the event the database refuses; commit the others.
                for item in chunk:
                    self._commit([item], stats)
                return
            log.exception("cannot record event file %s", printable(chunk[0].path.name))
            message = f"cannot be recorded: {type(exc).__name__}"
            if chunk[0].hook_identity is not None:
                self._reject_hook(chunk[0].path, None, "invalid_event", message)
                stats.quarantined += 1
                return
            self._quarantine(chunk[0].path, "invalid_event", message, stats)

    def _commit_together(self, chunk: list[_Accepted], stats: IngestStats) -> None:
        now = self.clock.time()
        recorded: list[Recorded] = []
        with self.queue.transaction():
            for item in chunk:
                done = self.intake.record(
                    self.queue,
                    item.event,
                    origin=_origin(item),
                    spool_name=spool_name(item.path),
                    spool_digest=item.digest,
                )
                if item.hook_identity is not None:
                    self.queue.record_hook_file(item.path.name, item.hook_identity, now)
                if done is None:
                    stats.duplicates += 1
                else:
                    recorded.append(done)
        # Only now that the rows are durable may the files go (hook files stay: tmpfiles
        # ages them out of the root-only directory).
        for item in chunk:
            if item.hook_identity is None:
                _unlink(item.path)
            else:
                self._seen_hook_files()[item.path.name] = item.hook_identity
        stats.recorded += len(recorded)
        for done in recorded:
            for cache, count in done.enqueued.items():
                stats.enqueued[cache] = stats.enqueued.get(cache, 0) + count
        self.intake.announce(recorded)

    def _quarantine(self, path: Path, reason: str, message: str, stats: IngestStats) -> None:
        try:
            target = quarantine(self.layout, path, reason, message, self.clock.time())
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error(
                "cannot quarantine %s (%s): %s; it stays in incoming/ for the next rescan",
                printable(path.name),
                reason,
                exc.strerror,
            )
            return
        stats.quarantined += 1
        if self.rejections.claim(target, reason):
            self.intake.count_rejected(reason)
        log.warning(
            "quarantined %s as %s: %s (%s)",
            printable(path.name),
            reason,
            message,
            printable(str(target)),
        )


def spool_name(path: Path) -> str:
    """The file name as stored in the database (undecodable bytes escaped)."""
    return os.fsencode(path.name).decode("utf-8", errors="backslashreplace")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _origin(item: _Accepted) -> str:
    """`build 17 p:j:job, NAME` or `DRV, NAME` or `NAME`: what the file names, and the file."""
    name = spool_name(item.path)
    event = item.event
    if event.build_id is not None:
        return f"build {event.build_id} {event.project}:{event.jobset}:{event.job}, {name}"
    if event.drv_path:
        return f"{event.drv_path}, {name}"
    return name


def _next_batch(
    notifications: SimpleQueue[Notification | None], timeout: float
) -> tuple[list[Notification], bool]:
    """Wait up to timeout for a notification, then take every one queued behind it; and
    whether a rescan was asked for (a None: the watch was restored, or a scan failed)."""
    batch: list[Notification] = []
    rescan = False
    try:
        first = notifications.get(timeout=timeout)
        while True:
            if first is None:
                rescan = True
            else:
                batch.append(first)
            first = notifications.get_nowait()
    except Empty:
        pass
    return batch, rescan
