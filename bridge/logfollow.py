"""Follow append-only log files and queue the store paths written to them."""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from dataclasses import dataclass, replace

from bridge.clock import Clock
from bridge.config import Config, LogSource
from bridge.events import Event
from bridge.intake import Intake, Recorded
from bridge.statedb import LogOffset, StateDb
from bridge.store import NixStore, StoreQueryError
from bridge.storepath import is_store_path
from exporter.vocabulary import Source

log = logging.getLogger(__name__)

_STORE_PATH_TOKEN = re.compile(rb"/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]+")
READ_CHUNK = 1 << 20
FINGERPRINT_BYTES = 64


@dataclass
class _Follow:
    source: LogSource
    handle: int | None = None
    device: int = 0
    inode: int = 0
    offset: int = 0
    fingerprint: bytes = b""
    unreadable_since: float | None = None
    """Set while the file cannot be opened, so that is logged once, not every poll."""

    @property
    def position(self) -> LogOffset:
        """What is saved in the database."""
        return LogOffset(self.device, self.inode, self.offset, self.fingerprint)


def extract_derivations(data: bytes) -> list[str]:
    """Unique .drv store paths mentioned in data, in order of appearance."""
    found: dict[str, None] = {}
    for match in _STORE_PATH_TOKEN.finditer(data):
        text = match.group().decode("ascii")
        if text.endswith(".drv") and is_store_path(text):
            found[text] = None
    return list(found)


def extract_store_paths(data: bytes) -> list[str]:
    """Unique top-level store paths mentioned in data, in order of appearance."""
    found: dict[str, None] = {}
    for match in _STORE_PATH_TOKEN.finditer(data):
        text = match.group().decode("ascii")
        if text.endswith(".drv"):
            continue
        if is_store_path(text):
            found[text] = None
    return list(found)


class LogFollower:
    """Reads new complete lines of each log file; survives rename and truncate rotation."""

    def __init__(
        self,
        config: Config,
        db: StateDb,
        intake: Intake,
        clock: Clock,
        store: NixStore | None = None,
    ) -> None:
        self.store = store or NixStore()
        self.config = config
        self.db = db
        self.intake = intake
        self.clock = clock
        self.follows = [_Follow(source) for source in config.log_sources]

    def run(self, stop: threading.Event) -> None:
        """Poll every log_poll_seconds until stop is set, keeping the readable gauges."""
        alive = self.intake.metrics.log_sources_alive
        while not stop.is_set():
            try:
                self.poll()
            except Exception:
                log.exception("log follower pass failed; retrying")
            for follow in self.follows:
                alive.labels(str(follow.source.path)).set(int(follow.handle is not None))
            stop.wait(self.config.log_poll_seconds)

    def close(self) -> None:
        """Close every open file."""
        for follow in self.follows:
            self._close(follow)

    def readable(self) -> list[bool]:
        """Whether each log source is currently open."""
        return [follow.handle is not None for follow in self.follows]

    def poll(self) -> dict[str, int]:
        """Read what was appended since the last poll; return paths queued per cache."""
        total: dict[str, int] = {}
        for follow in self.follows:
            for cache, count in self._poll_one(follow).items():
                total[cache] = total.get(cache, 0) + count
        return total

    def _open(self, follow: _Follow) -> bool:
        path = str(follow.source.path)
        try:
            handle = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if follow.unreadable_since is None:
                follow.unreadable_since = self.clock.time()
                log.warning(
                    "cannot read log source %s: %s; trying again every %gs",
                    path,
                    exc.strerror,
                    self.config.log_poll_seconds,
                )
            return False
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            # A FIFO, device or socket: reading could block or never end.
            os.close(handle)
            if follow.unreadable_since is None:
                follow.unreadable_since = self.clock.time()
                log.warning(
                    "log source %s is not a regular file; trying again every %gs",
                    path,
                    self.config.log_poll_seconds,
                )
            return False
        follow.unreadable_since = None
        follow.handle, follow.device, follow.inode = handle, info.st_dev, info.st_ino
        saved = self.db.log_offset(path)
        follow.offset, follow.fingerprint = 0, b""
        if saved is not None and (saved.device, saved.inode) == (info.st_dev, info.st_ino):
            follow.offset, follow.fingerprint = saved.offset, saved.fingerprint
            if self._rewritten(follow):
                follow.offset, follow.fingerprint = 0, b""
        log.info("following %s from offset %d", path, follow.offset)
        return True

    def _close(self, follow: _Follow) -> None:
        if follow.handle is not None:
            os.close(follow.handle)
            follow.handle = None

    def _poll_one(self, follow: _Follow) -> dict[str, int]:
        if follow.handle is None and not self._open(follow):
            return {}
        assert follow.handle is not None
        # Truncation: the file shrank, or was cut and written again past our offset (then
        # the bytes before the offset are no longer the ones we read).
        if self._rewritten(follow):
            log.info("%s was truncated; reading from the start", follow.source.path)
            follow.offset, follow.fingerprint = 0, b""
            self._save(follow)
        queued = self._drain(follow)
        # Rotation by rename: the name now points at another file.
        try:
            current = os.stat(follow.source.path)
        except FileNotFoundError:
            return queued
        if (current.st_dev, current.st_ino) != (follow.device, follow.inode):
            log.info("%s was rotated; following the new file", follow.source.path)
            self._close(follow)
            if self._open(follow):
                follow.offset, follow.fingerprint = 0, b""
                self._save(follow)
                for cache, count in self._drain(follow).items():
                    queued[cache] = queued.get(cache, 0) + count
        return queued

    def _rewritten(self, follow: _Follow) -> bool:
        assert follow.handle is not None
        if follow.offset == 0:
            return False
        if os.fstat(follow.handle).st_size < follow.offset:
            return True
        size = len(follow.fingerprint)
        return os.pread(follow.handle, size, follow.offset - size) != follow.fingerprint

    def _save(self, follow: _Follow) -> None:
        with self.db.transaction():
            self.db.save_log_offset(str(follow.source.path), follow.position, self.clock.time())

    def _outputs_of(self, derivations: list[str], known: list[str]) -> list[str]:
        """Outputs of derivations named in a log (Nix 2.8 hooks only know DRV_PATH)."""
        found: list[str] = []
        for drv in derivations:
            try:
                outputs = self.store.resolve_outputs(drv)
            except StoreQueryError as exc:
                log.warning("cannot resolve outputs of %s from the log: %s", drv, exc)
                continue
            found += [path for path in outputs if path not in known and path not in found]
        return found

    def _drain(self, follow: _Follow) -> dict[str, int]:
        assert follow.handle is not None
        queued: dict[str, int] = {}
        while True:
            data = os.pread(follow.handle, READ_CHUNK, follow.offset)
            end = data.rfind(b"\n")
            if end < 0:
                # No complete line; a single line longer than a chunk is skipped as garbage.
                if len(data) == READ_CHUNK:
                    follow.offset += len(data)
                    follow.fingerprint = data[-FINGERPRINT_BYTES:]
                    self._save(follow)
                    continue
                return queued
            complete = data[: end + 1]
            paths = extract_store_paths(complete)
            if follow.source.resolve_derivations:
                paths += self._outputs_of(extract_derivations(complete), paths)
            event = Event(source=Source.LOG, received_at=self.clock.time(), out_paths=tuple(paths))
            # The position moves only once the lines' event is committed: a failed commit
            # (a full disk) leaves them to be read again.
            position = replace(
                follow.position,
                offset=follow.offset + len(complete),
                fingerprint=(follow.fingerprint + complete)[-FINGERPRINT_BYTES:],
            )
            recorded: list[Recorded] = []
            with self.db.transaction():
                if paths:
                    done = self.intake.record(self.db, event, origin=str(follow.source.path))
                    recorded += [done] if done is not None else []
                self.db.save_log_offset(str(follow.source.path), position, event.received_at)
            follow.offset, follow.fingerprint = position.offset, position.fingerprint
            self.intake.announce(recorded)
            enqueued = recorded[0].enqueued if recorded else {}
            for cache, count in enqueued.items():
                queued[cache] = queued.get(cache, 0) + count
