"""The spool intake: the loop that batches watch notifications and rescans, and what is
done with each file read (record it through the intake, quarantine it, or leave it)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Empty, SimpleQueue

from bridge.clock import Clock
from bridge.config import Config
from bridge.heartbeat import Heartbeat
from bridge.intake import Intake, Recorded
from bridge.logsetup import input_logger
from bridge.quarantine import RejectionCounter
from bridge.reject import Rejecter
from bridge.retrying import FailureBackoff
from bridge.spool import SpoolLayout, is_candidate, unsafe_directory
from bridge.spoolread import Channels, FileRead, Identity, SpoolReader, Verdict, spool_name
from bridge.statedb import StateDb
from bridge.store import NixStore
from bridge.watcher import Notification
from exporter.vocabulary import RejectReason

log = input_logger(__name__)

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


class Ingestor:
    """Ingests spool files: reads them (SpoolReader), records the good ones through the
    intake, quarantines the bad ones; `run` is the ingest loop."""

    def __init__(
        self,
        config: Config,
        db: StateDb,
        store: NixStore,
        intake: Intake,
        clock: Clock,
        *,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.config = config
        self.layout = SpoolLayout.of(config)
        self.db = db
        self.intake = intake
        self.clock = clock
        self.heartbeat = heartbeat or Heartbeat(clock.monotonic, float("inf"))
        self.reader = SpoolReader(
            store, config.spool.max_event_bytes, clock.time, db.seen_spool_file
        )
        self.rejections = RejectionCounter(self.layout, db, intake.count_rejected, clock.time)
        # Hook files consumed so far: read from the database at the first pass (inside the
        # pass, so that a database that fails then is retried like any pass).
        self.hook_seen: dict[str, Identity] = {}
        self._hook_seen_loaded = False
        self.rejecter = Rejecter(self.layout, db, self.rejections, clock.time, self.hook_seen)
        self._hook_problem: str | None = None
        # Set by run(): a stop requested during a pass leaves the files not read yet.
        self.stop: threading.Event | None = None

    def run(self, notifications: SimpleQueue[Notification | None], stop: threading.Event) -> None:
        """Ingest what the watch reports, batched, and rescan the spool every rescan_seconds
        (sooner after a deferred file, at once on a None notification) until stop is set."""
        self.stop = stop
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
        closed = dict.fromkeys(path for path, final in batch if final)
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

    def ingest(self, paths: Iterable[Path], *, writer_closed: bool = False) -> IngestStats:
        """Process files; those left unparsed and still settling are counted as deferred."""
        stats = IngestStats()
        channels = self._channels()
        reads: list[FileRead] = []
        for path in paths:
            if self.stop is not None and self.stop.is_set():
                break  # files not read yet stay in the spool for the next start
            if is_candidate(path.name) and path.parent in (self.layout.hook, self.layout.incoming):
                reads.append(self.reader.read(path, channels, writer_closed=writer_closed))
            self.heartbeat.beat()
            if len(reads) >= FILES_PER_TRANSACTION:
                self._settle(reads, stats)
                reads = []
        self._settle(reads, stats)
        return stats

    def scan(self) -> list[Path]:
        """Every candidate file in incoming/ and every unconsumed one in the hook directory."""
        try:
            with os.scandir(self.layout.incoming) as entries:
                names = sorted(e.name for e in entries if is_candidate(e.name))
        except FileNotFoundError:
            names = []
        return [self.layout.incoming / name for name in names] + self._scan_hook()

    def check_quarantine(self) -> int:
        """Count rejected files that producers put into quarantine/ since the last check."""
        return self.rejections.check()

    def _scan_hook(self) -> list[Path]:
        hook = self.layout.hook
        try:
            with os.scandir(hook) as entries:
                present = {e.name: e for e in entries if is_candidate(e.name)}
        except OSError:
            return []
        seen = self._consumed_hook_files()
        gone = [name for name in seen if name not in present]
        if gone:
            self.db.forget_hook_files(gone)  # aged out by tmpfiles
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

    def _consumed_hook_files(self) -> dict[str, Identity]:
        if not self._hook_seen_loaded:
            self.hook_seen.update(self.db.hook_files())
            self._hook_seen_loaded = True
        return self.hook_seen

    def _channels(self) -> Channels:
        """Which channels may carry hook events now: the hook directory if only the hook's
        user (root, or this daemon's own user) can write it, and incoming/ only if it is
        private to this daemon."""
        trusted = {0, os.geteuid()}
        problem = unsafe_directory(self.layout.hook, trusted)
        if problem is not None and not os.path.lexists(self.layout.hook):
            problem = None  # nothing there to read (a spool without the hook)
        if problem != self._hook_problem and problem is not None:
            log.error(
                "hook directory %s is not safe, its files are not read: %s (run "
                "`hydra-cachix-bridge init` as root, see docs/deployment.md)",
                str(self.layout.hook),
                problem,
            )
        self._hook_problem = problem
        return Channels(
            layout=self.layout,
            hook_trusted=problem is None,
            incoming_private=unsafe_directory(self.layout.incoming, trusted) is None,
            hook_seen=self._consumed_hook_files(),
        )

    def _settle(self, reads: list[FileRead], stats: IngestStats) -> None:
        """Act on what was read: record the accepted files, then quarantine the rejected
        ones and those the database refuses, count the deferred, drop the duplicates."""
        refused = self._record([read for read in reads if read.verdict is Verdict.ACCEPT], stats)
        for read in reads + refused:
            if read.verdict is Verdict.REJECT:
                if self.rejecter.reject(
                    read.path, read.reason, read.message, identity=read.identity, data=read.data
                ):
                    stats.quarantined += 1
            elif read.verdict is Verdict.DEFER:
                stats.deferred += 1
                if read.message:
                    log.warning(
                        "cannot read event file %s for now (%s); trying again",
                        read.path.name,
                        read.message,
                    )
            elif read.verdict is Verdict.DUPLICATE:
                stats.duplicates += 1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(read.path)

    def _record(self, accepted: list[FileRead], stats: IngestStats) -> list[FileRead]:
        """Record the accepted files in one transaction, then delete them (hook files stay:
        tmpfiles ages them out of the root-only directory) and announce them. When the
        database refuses the batch, each file is tried alone; those it still refuses are
        returned as rejected."""
        refused: list[FileRead] = []
        batches = [accepted] if accepted else []
        while batches:
            batch = batches.pop()
            now = self.clock.time()
            recorded: list[Recorded] = []
            try:
                with self.db.transaction():
                    for item in batch:
                        assert item.event is not None
                        name = spool_name(item.path)
                        done = self.intake.record(
                            self.db,
                            item.event,
                            origin=name,
                            spool_name=name,
                            spool_digest=item.digest,
                        )
                        if item.identity is not None:
                            self.db.record_hook_file(item.path.name, item.identity, now)
                        recorded += [done] if done is not None else []
            except sqlite3.OperationalError:
                raise  # disk full, locked: every file stays for the next pass
            except Exception as exc:
                if len(batch) > 1:
                    batches += [[item] for item in reversed(batch)]  # find the one refused
                    continue
                log.exception("cannot record event file %s", batch[0].path.name)
                refused.append(
                    replace(
                        batch[0],
                        verdict=Verdict.REJECT,
                        reason=RejectReason.INVALID_EVENT,
                        message=f"cannot be recorded: {type(exc).__name__}",
                    )
                )
                continue
            for item in batch:
                if item.identity is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(item.path)
                else:
                    self.hook_seen[item.path.name] = item.identity
            stats.duplicates += len(batch) - len(recorded)
            stats.recorded += len(recorded)
            for done in recorded:
                for cache, count in done.enqueued.items():
                    stats.enqueued[cache] = stats.enqueued.get(cache, 0) + count
            self.intake.announce(recorded)
        return refused


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
