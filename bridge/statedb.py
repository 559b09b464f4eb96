"""The state database (SQLite, WAL): the durable queue of (cache, path) items, the record of
events, cache health, log offsets and the files already consumed."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bridge.events import Event
from exporter.vocabulary import ItemState

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    spool_name TEXT UNIQUE,
    -- SHA-256 of the spool file's content: a file is a duplicate only with the same content.
    spool_digest TEXT,
    source TEXT NOT NULL,
    received_at REAL NOT NULL,
    recorded_at REAL NOT NULL,
    build_id INTEGER,
    project TEXT,
    jobset TEXT,
    job TEXT,
    build_status INTEGER,
    drv_path TEXT,
    finished_at REAL,
    outcome TEXT NOT NULL,
    targets INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    cache TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'inflight', 'pushed', 'skipped', 'dead')),
    event_id INTEGER,
    source TEXT NOT NULL,
    origin_at REAL NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    batch_limit INTEGER,
    updated_at REAL NOT NULL,
    last_reason TEXT,
    last_error TEXT,
    UNIQUE (cache, path)
);
CREATE INDEX IF NOT EXISTS items_due ON items (cache, state, next_attempt_at, id);
CREATE INDEX IF NOT EXISTS items_state_updated ON items (state, updated_at);
CREATE INDEX IF NOT EXISTS items_age ON items (cache, state, enqueued_at);
-- Counts per (cache, state), kept by triggers so that a scrape costs the same at a
-- thousand items as at millions (pushed items stay for retention_days).
CREATE TABLE IF NOT EXISTS item_counts (
    cache TEXT NOT NULL,
    state TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (cache, state)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS item_counts_insert AFTER INSERT ON items BEGIN
    -- Not INSERT OR IGNORE: an outer statement's conflict policy would override it.
    INSERT INTO item_counts (cache, state, n) SELECT NEW.cache, NEW.state, 0
    WHERE NOT EXISTS (SELECT 1 FROM item_counts WHERE cache = NEW.cache AND state = NEW.state);
    UPDATE item_counts SET n = n + 1 WHERE cache = NEW.cache AND state = NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS item_counts_delete AFTER DELETE ON items BEGIN
    UPDATE item_counts SET n = n - 1 WHERE cache = OLD.cache AND state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS item_counts_update AFTER UPDATE OF cache, state ON items
WHEN OLD.cache IS NOT NEW.cache OR OLD.state IS NOT NEW.state BEGIN
    UPDATE item_counts SET n = n - 1 WHERE cache = OLD.cache AND state = OLD.state;
    -- Not INSERT OR IGNORE: an outer statement's conflict policy would override it.
    INSERT INTO item_counts (cache, state, n) SELECT NEW.cache, NEW.state, 0
    WHERE NOT EXISTS (SELECT 1 FROM item_counts WHERE cache = NEW.cache AND state = NEW.state);
    UPDATE item_counts SET n = n + 1 WHERE cache = NEW.cache AND state = NEW.state;
END;
CREATE TABLE IF NOT EXISTS cache_status (
    cache TEXT PRIMARY KEY,
    last_success_at REAL,
    last_failure_at REAL,
    last_error TEXT
);
-- The spool's quarantine/ .reason files already counted in events_rejected_total, so
-- each rejected file is counted once across daemon restarts.
CREATE TABLE IF NOT EXISTS quarantine_counted (
    name TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    counted_at REAL NOT NULL
) WITHOUT ROWID;
-- A cache is down while every push to it fails: items wait with it, no attempts are spent.
-- Kept here so that a restart during an outage goes on probing instead of burning attempts.
CREATE TABLE IF NOT EXISTS cache_health (
    cache TEXT PRIMARY KEY,
    down_since REAL,
    next_try_at REAL,
    failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
-- Files the daemon consumed from the hook's root-only directory, which it may not delete
-- from (tmpfiles ages them out): a file counts as new again when its identity changes.
CREATE TABLE IF NOT EXISTS hook_files (
    name TEXT PRIMARY KEY,
    inode INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    consumed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS log_offsets (
    path TEXT PRIMARY KEY,
    device INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    fingerprint BLOB NOT NULL DEFAULT x'',
    updated_at REAL NOT NULL
);
"""


def spool_key(name: str, digest: str) -> str:
    """How a spool file is recorded: its name and its content's SHA-256, so that a file of
    the same name from another writer is another event, not a duplicate."""
    return f"{name} sha256:{digest}"


class StateDbError(Exception):
    """The queue database cannot be opened or used."""


class StateDbUnavailable(StateDbError):
    """The database cannot be opened for now (disk full, read-only, locked): not corrupt."""


@dataclass(frozen=True)
class Item:
    """One claimed (cache, path) push."""

    id: int
    cache: str
    path: str
    attempts: int
    origin_at: float
    enqueued_at: float
    event_id: int | None
    source: str
    project: str | None = None
    jobset: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered item for `status`."""

    id: int
    cache: str
    path: str
    attempts: int
    updated_at: float
    reason: str | None
    error: str | None


@dataclass(frozen=True)
class CacheHealth:
    """Whether a cache takes pushes: down (since when, next probe, why) or up."""

    cache: str
    down_since: float | None = None
    next_try_at: float | None = None
    failures: int = 0
    last_error: str | None = None

    @property
    def up(self) -> bool:
        """True unless every push to the cache fails."""
        return self.down_since is None


@dataclass(frozen=True)
class CacheStatus:
    """Per-cache summary for `status` and metrics."""

    cache: str
    counts: dict[str, int]
    oldest_pending_at: float | None
    last_success_at: float | None
    last_failure_at: float | None
    last_error: str | None
    health: CacheHealth | None = None


@dataclass(frozen=True)
class LogOffset:
    """Where the log follower stopped reading one file."""

    device: int
    inode: int
    offset: int
    fingerprint: bytes = b""
    """The bytes just before offset: if they change, the file was truncated or rewritten."""


def open_database(
    path: Path,
    *,
    timeout: float = 30.0,
    shared: bool = False,
    create: bool = True,
    durable: bool = True,
) -> sqlite3.Connection:
    """Open the queue database in WAL mode.

    With create=False (the `status` and `retry` commands, which may run as another user)
    nothing is created or written just by opening. durable=False (push workers) commits
    without fsync: safe against a crash of the daemon, and after a power cut only an
    item's latest state change can be lost, so at worst a path is pushed again.
    Ingest, which deletes event files after its commit, always stays durable.
    """
    if not create and not path.is_file():
        raise StateDbError(f"no queue database at {path} (has the daemon run with this config?)")
    try:
        new = create and not path.exists()
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            path, timeout=timeout, isolation_level=None, check_same_thread=not shared
        )
        if new:
            # Private before the -wal and -shm files exist (SQLite gives them this mode).
            # chmod, never open+close: closing any descriptor of the database file would
            # drop every POSIX lock SQLite holds on it in this process.
            os.chmod(path, 0o600)
        conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        if create:
            conn.execute("PRAGMA journal_mode=WAL")
            had_counts = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'item_counts'"
            ).fetchone()
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
            if "spool_digest" not in columns:  # a database from before content-keyed dedup
                conn.execute("ALTER TABLE events ADD COLUMN spool_digest TEXT")
            if had_counts is None:
                conn.execute(
                    "INSERT OR REPLACE INTO item_counts (cache, state, n)"
                    " SELECT cache, state, COUNT(*) FROM items GROUP BY cache, state"
                )
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError as exc:
        raise StateDbUnavailable(
            f"cannot open queue database {path}: {exc} (is its filesystem full, read-only, or "
            "the file not writable by this user?)"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise StateDbError(
            f"cannot open queue database {path}: {exc}. If the file is corrupt: stop the daemon, "
            f"move {path} and its -wal/-shm files aside, rebuild what can be read with "
            f"`sqlite3 OLD .recover | sqlite3 {path}` (or start empty), and start again; event "
            "files still in the spool are read again either way"
        ) from None
    except OSError as exc:
        raise StateDbUnavailable(f"cannot open queue database {path}: {exc.strerror}") from None
    if row is None or row[0] != str(SCHEMA_VERSION):
        conn.close()
        raise StateDbError(
            f"queue database {path} has schema {row and row[0]}, "
            f"this version needs {SCHEMA_VERSION}"
        )
    return conn


class StateDb:
    """All reads and writes of the state database; one instance per thread."""

    def __init__(
        self,
        path: Path,
        *,
        timeout: float = 30.0,
        shared: bool = False,
        create: bool = True,
        durable: bool = True,
    ) -> None:
        self.conn = open_database(
            path, timeout=timeout, shared=shared, create=create, durable=durable
        )

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on error."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- ingest ---------------------------------------------------------------------------

    def seen_spool_file(self, name: str, digest: str | None = None) -> bool:
        """True if an event file of this name was recorded (with this content digest, when
        one is given: a file of the same name and other content is another event)."""
        if digest is None:
            row = self.conn.execute("SELECT 1 FROM events WHERE spool_name = ?", (name,)).fetchone()
        else:
            row = self.conn.execute(
                "SELECT 1 FROM events WHERE spool_name IN (?, ?) AND spool_digest = ?",
                (name, spool_key(name, digest), digest),
            ).fetchone()
        return row is not None

    def hook_files(self) -> dict[str, tuple[int, int, int]]:
        """Every consumed hook file: name → (inode, mtime_ns, size)."""
        rows = self.conn.execute("SELECT name, inode, mtime_ns, size FROM hook_files")
        return {name: (inode, mtime_ns, size) for name, inode, mtime_ns, size in rows}

    def record_hook_file(self, name: str, identity: tuple[int, int, int], now: float) -> None:
        """Remember a hook file as consumed (call inside transaction() with its event)."""
        inode, mtime_ns, size = identity
        self.conn.execute(
            "INSERT INTO hook_files (name, inode, mtime_ns, size, consumed_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET inode = excluded.inode,"
            " mtime_ns = excluded.mtime_ns, size = excluded.size,"
            " consumed_at = excluded.consumed_at",
            (name, inode, mtime_ns, size, now),
        )

    def forget_hook_files(self, names: Iterable[str]) -> int:
        """Drop the records of hook files that are gone (aged out); return how many."""
        with self.transaction():
            cur = self.conn.executemany(
                "DELETE FROM hook_files WHERE name = ?", ((name,) for name in names)
            )
            return cur.rowcount

    def record_event(
        self,
        event: Event,
        *,
        spool_name: str | None,
        outcome: str,
        targets: Sequence[tuple[str, str]],
        now: float,
        spool_digest: str | None = None,
    ) -> dict[str, int] | None:
        """Record an event and enqueue its targets (call inside transaction()).

        Returns the number of newly queued paths per cache, or None when this spool file
        was recorded before (a re-read after a crash between commit and unlink). With a
        digest, only the same name *and* content is a duplicate: a file of a name already
        recorded with other content is recorded as `NAME sha256:DIGEST`.
        """
        if spool_name is not None and spool_digest is not None:
            if self.seen_spool_file(spool_name, spool_digest):
                return None
            taken = self.conn.execute(
                "SELECT 1 FROM events WHERE spool_name = ?", (spool_name,)
            ).fetchone()
            if taken is not None:
                spool_name = spool_key(spool_name, spool_digest)
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO events (spool_name, spool_digest, source, received_at,"
            " recorded_at, build_id, project, jobset, job, build_status, drv_path, finished_at,"
            " outcome, targets)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                spool_name,
                spool_digest,
                event.source,
                event.received_at,
                now,
                event.build_id,
                event.project,
                event.jobset,
                event.job,
                event.build_status,
                event.drv_path,
                event.finished_at,
                outcome,
                len(targets),
            ),
        )
        if cur.rowcount == 0:
            return None
        event_id = cur.lastrowid
        origin = event.finished_at if event.finished_at is not None else event.received_at
        enqueued: dict[str, int] = {}
        for cache, path in targets:
            cur = self.conn.execute(
                "INSERT INTO items (cache, path, state, event_id, source, origin_at, enqueued_at,"
                " attempts, next_attempt_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)"
                " ON CONFLICT (cache, path) DO UPDATE SET state = excluded.state, attempts = 0,"
                " event_id = excluded.event_id, source = excluded.source,"
                " origin_at = excluded.origin_at, enqueued_at = excluded.enqueued_at,"
                " next_attempt_at = excluded.next_attempt_at, batch_limit = NULL,"
                " updated_at = excluded.updated_at, last_reason = NULL, last_error = NULL"
                " WHERE items.state IN (?, ?)",
                (
                    cache,
                    path,
                    ItemState.PENDING,
                    event_id,
                    event.source,
                    origin,
                    now,
                    now,
                    now,
                    ItemState.DEAD,
                    ItemState.SKIPPED,
                ),
            )
            if cur.rowcount:
                enqueued[cache] = enqueued.get(cache, 0) + 1
        return enqueued

    # -- workers --------------------------------------------------------------------------

    def claim(self, cache: str, batch_size: int, now: float) -> list[Item]:
        """Take up to batch_size due items of a cache, honouring per-item split limits."""
        with self.transaction():
            rows = self.conn.execute(
                "SELECT items.id, path, attempts, origin_at, enqueued_at, event_id, items.source,"
                " batch_limit, events.project, events.jobset"
                " FROM items LEFT JOIN events ON events.id = items.event_id"
                " WHERE cache = ? AND state = ? AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, items.id LIMIT ?",
                (cache, ItemState.PENDING, now, batch_size),
            ).fetchall()
            batch: list[Item] = []
            cap = batch_size
            for row in rows:
                limit = row[7] if row[7] is not None else batch_size
                # Every item in a batch must allow a batch at least this large.
                if batch and len(batch) + 1 > min(cap, limit):
                    break
                cap = min(cap, limit)
                batch.append(
                    Item(
                        row[0],
                        cache,
                        row[1],
                        row[2],
                        row[3],
                        row[4],
                        row[5],
                        row[6],
                        row[8],
                        row[9],
                    )
                )
            if batch:
                self.conn.executemany(
                    "UPDATE items SET state = ?, updated_at = ? WHERE id = ?",
                    [(ItemState.INFLIGHT, now, item.id) for item in batch],
                )
        return batch

    def claim_probe(self, cache: str, now: float) -> list[Item]:
        """Take the one pending item of a down cache that waited longest for a probe push."""
        with self.transaction():
            row = self.conn.execute(
                "SELECT items.id, path, attempts, origin_at, enqueued_at, event_id, items.source,"
                " events.project, events.jobset"
                " FROM items LEFT JOIN events ON events.id = items.event_id"
                " WHERE cache = ? AND state = ? ORDER BY next_attempt_at, items.id LIMIT 1",
                (cache, ItemState.PENDING),
            ).fetchone()
            if row is None:
                return []
            self.conn.execute(
                "UPDATE items SET state = ?, updated_at = ? WHERE id = ?",
                (ItemState.INFLIGHT, now, row[0]),
            )
        return [Item(row[0], cache, *row[1:])]

    def has_pending(self, cache: str) -> bool:
        """True when the cache has an item waiting."""
        row = self.conn.execute(
            "SELECT 1 FROM items WHERE cache = ? AND state = ? LIMIT 1", (cache, ItemState.PENDING)
        ).fetchone()
        return row is not None

    def recently_pushed(self, cache: str, limit: int = 5) -> list[str]:
        """Paths most recently pushed to a cache (for a probe that can only succeed or not)."""
        return [
            row[0]
            for row in self.conn.execute(
                "SELECT path FROM items WHERE cache = ? AND state = ?"
                " ORDER BY updated_at DESC, id DESC LIMIT ?",
                (cache, ItemState.PUSHED, limit),
            )
        ]

    def defer(
        self, items: Iterable[Item], until: float, *, reason: str, error: str, now: float
    ) -> None:
        """A failed push to a down cache: items wait until until, no attempt counted."""
        items = list(items)
        with self.transaction():
            self.conn.executemany(
                "UPDATE items SET state = ?, updated_at = ?, next_attempt_at = ?,"
                " last_reason = ?, last_error = ? WHERE id = ?",
                [(ItemState.PENDING, now, until, reason, error, item.id) for item in items],
            )
            if items:
                self._record_failure(items[0].cache, error, now)

    def _record_failure(self, cache: str, error: str, now: float) -> None:
        self.conn.execute(
            "INSERT INTO cache_status (cache, last_failure_at, last_error) VALUES (?, ?, ?)"
            " ON CONFLICT (cache) DO UPDATE SET last_failure_at = excluded.last_failure_at,"
            " last_error = excluded.last_error",
            (cache, now, error),
        )

    def cache_health(self) -> dict[str, CacheHealth]:
        """The recorded up/down state of every cache that has one."""
        try:
            rows = self.conn.execute(
                "SELECT cache, down_since, next_try_at, failures, last_error FROM cache_health"
            ).fetchall()
        except sqlite3.OperationalError:
            # A database the daemon has not opened since an upgrade, read by `status`.
            return {}
        return {row[0]: CacheHealth(*row) for row in rows}

    def save_cache_health(self, health: CacheHealth, now: float, failed: bool = False) -> None:
        """Record a cache's state; coming up makes its waiting items due at once."""
        with self.transaction():
            self.conn.execute(
                "INSERT INTO cache_health (cache, down_since, next_try_at, failures, last_error)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (cache) DO UPDATE SET"
                " down_since = excluded.down_since, next_try_at = excluded.next_try_at,"
                " failures = excluded.failures, last_error = excluded.last_error",
                (
                    health.cache,
                    health.down_since,
                    health.next_try_at,
                    health.failures,
                    health.last_error,
                ),
            )
            if failed and health.last_error is not None:
                self._record_failure(health.cache, health.last_error, now)
            if health.up:
                self.conn.execute(
                    "UPDATE items SET next_attempt_at = ? WHERE cache = ? AND state = ?"
                    " AND next_attempt_at > ?",
                    (now, health.cache, ItemState.PENDING, now),
                )

    def next_due_at(self, cache: str) -> float | None:
        """When the next pending item of a cache becomes due."""
        row = self.conn.execute(
            "SELECT MIN(next_attempt_at) FROM items WHERE cache = ? AND state = ?",
            (cache, ItemState.PENDING),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def mark_pushed(self, items: Iterable[Item], now: float) -> None:
        """Items arrived in their cache."""
        items = list(items)
        if not items:
            return
        with self.transaction():
            self.conn.executemany(
                "UPDATE items SET state = ?, updated_at = ?, last_reason = NULL,"
                " last_error = NULL WHERE id = ?",
                [(ItemState.PUSHED, now, item.id) for item in items],
            )
            self.conn.execute(
                "INSERT INTO cache_status (cache, last_success_at) VALUES (?, ?)"
                " ON CONFLICT (cache) DO UPDATE SET last_success_at = excluded.last_success_at",
                (items[0].cache, now),
            )

    def mark_skipped(self, items: Iterable[Item], reason: str, message: str, now: float) -> None:
        """Items that will never be pushed, with the reason (e.g. garbage-collected)."""
        with self.transaction():
            self.conn.executemany(
                "UPDATE items SET state = ?, updated_at = ?, last_reason = ?,"
                " last_error = ? WHERE id = ?",
                [(ItemState.SKIPPED, now, reason, message, item.id) for item in items],
            )

    def mark_failed(
        self,
        groups: Sequence[tuple[Sequence[Item], float]],
        *,
        reason: str,
        error: str,
        max_attempts: int,
        now: float,
    ) -> list[Item]:
        """Record a failed push of the union of groups; return the items dead-lettered.

        Each group is (items, next attempt time). A group keeps its size as the batch limit,
        so a failing batch is retried split; a path that failed alone is dead-lettered once
        its attempts reach max_attempts.
        """
        dead: list[Item] = []
        # Only a path that failed alone is known to be at fault; batch-mates of a poison
        # path are split off and retried, never dead-lettered for its failures.
        alone = sum(len(items) for items, _ in groups) == 1
        with self.transaction():
            for items, retry_at in groups:
                limit = len(items)
                for item in items:
                    attempts = item.attempts + 1
                    if alone and attempts >= max_attempts:
                        dead.append(item)
                        self.conn.execute(
                            "UPDATE items SET state = ?, attempts = ?, updated_at = ?,"
                            " last_reason = ?, last_error = ? WHERE id = ?",
                            (ItemState.DEAD, attempts, now, reason, error, item.id),
                        )
                    else:
                        self.conn.execute(
                            "UPDATE items SET state = ?, attempts = ?, updated_at = ?,"
                            " next_attempt_at = ?, batch_limit = ?, last_reason = ?,"
                            " last_error = ? WHERE id = ?",
                            (
                                ItemState.PENDING,
                                attempts,
                                now,
                                retry_at,
                                limit,
                                reason,
                                error,
                                item.id,
                            ),
                        )
            cache = next((items[0].cache for items, _ in groups if items), None)
            if cache is not None:
                self.conn.execute(
                    "INSERT INTO cache_status (cache, last_failure_at, last_error) VALUES (?, ?, ?)"
                    " ON CONFLICT (cache) DO UPDATE SET last_failure_at = excluded.last_failure_at,"
                    " last_error = excluded.last_error",
                    (cache, now, error),
                )
        return dead

    def release(self, items: Iterable[Item], now: float) -> None:
        """Put claimed items back as pending without counting an attempt."""
        with self.transaction():
            self.conn.executemany(
                "UPDATE items SET state = ?, updated_at = ? WHERE id = ? AND state = ?",
                [(ItemState.PENDING, now, item.id, ItemState.INFLIGHT) for item in items],
            )

    def release_orphans(self, held: set[int], older_than: float, now: float) -> int:
        """In-flight items claimed before older_than and not in held become pending."""
        with self.transaction():
            rows = self.conn.execute(
                "SELECT id FROM items WHERE state = ? AND updated_at < ?",
                (ItemState.INFLIGHT, older_than),
            ).fetchall()
            orphans = [
                (ItemState.PENDING, now, item_id) for (item_id,) in rows if item_id not in held
            ]
            self.conn.executemany(
                "UPDATE items SET state = ?, updated_at = ? WHERE id = ?", orphans
            )
        return len(orphans)

    def release_all_inflight(self, now: float) -> int:
        """At start: items a previous process claimed but never finished become pending."""
        with self.transaction():
            cur = self.conn.execute(
                "UPDATE items SET state = ?, updated_at = ? WHERE state = ?",
                (ItemState.PENDING, now, ItemState.INFLIGHT),
            )
        return cur.rowcount

    def retry_dead(self, ids: Sequence[int] | None, now: float) -> int:
        """Put dead-lettered items (all, or those ids) back in the queue; return how many."""
        sql = (
            "UPDATE items SET state = ?, attempts = 0, batch_limit = NULL,"
            " next_attempt_at = ?, updated_at = ? WHERE state = ?"
        )
        params = (ItemState.PENDING, now, now, ItemState.DEAD)
        with self.transaction():
            if ids is None:
                return self.conn.execute(sql, params).rowcount
            return sum(
                self.conn.execute(sql + " AND id = ?", (*params, item_id)).rowcount
                for item_id in ids
            )

    def prune(self, before: float) -> int:
        """Forget pushed and skipped items, and events, older than `before`."""
        with self.transaction():
            removed = self.conn.execute(
                "DELETE FROM items WHERE state IN (?, ?) AND updated_at < ?",
                (ItemState.PUSHED, ItemState.SKIPPED, before),
            ).rowcount
            self.conn.execute(
                "DELETE FROM events WHERE recorded_at < ? AND id NOT IN"
                " (SELECT event_id FROM items WHERE event_id IS NOT NULL)",
                (before,),
            )
        return removed

    # -- quarantine -----------------------------------------------------------------------

    def quarantine_counted(self) -> set[str]:
        """Names of the quarantine .reason files already counted."""
        return {row[0] for row in self.conn.execute("SELECT name FROM quarantine_counted")}

    def mark_quarantine_counted(self, name: str, reason: str, now: float) -> bool:
        """Remember a .reason file as counted (call inside transaction()); False if it was."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO quarantine_counted (name, reason, counted_at) VALUES (?, ?, ?)",
            (name, reason, now),
        )
        return cur.rowcount > 0

    def forget_quarantine_counted(self, names: Iterable[str]) -> None:
        """Forget files no longer in quarantine (call inside transaction())."""
        self.conn.executemany(
            "DELETE FROM quarantine_counted WHERE name = ?", ((name,) for name in names)
        )

    # -- log follower ---------------------------------------------------------------------

    def log_offset(self, path: str) -> LogOffset | None:
        """The saved position in a followed log file."""
        row = self.conn.execute(
            "SELECT device, inode, offset, fingerprint FROM log_offsets WHERE path = ?", (path,)
        ).fetchone()
        return LogOffset(*row) if row else None

    def save_log_offset(self, path: str, offset: LogOffset, now: float) -> None:
        """Save the position (call inside the transaction that queued what was read)."""
        self.conn.execute(
            "INSERT INTO log_offsets (path, device, inode, offset, fingerprint, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (path) DO UPDATE SET device = excluded.device, inode = excluded.inode,"
            " offset = excluded.offset, fingerprint = excluded.fingerprint,"
            " updated_at = excluded.updated_at",
            (path, offset.device, offset.inode, offset.offset, offset.fingerprint, now),
        )

    # -- status ---------------------------------------------------------------------------

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of items per (cache, state), from the trigger-maintained table."""
        return {
            (cache, state): count
            for cache, state, count in self.conn.execute(
                "SELECT cache, state, n FROM item_counts WHERE n > 0"
            )
        }

    def oldest_pending(self) -> dict[str, float]:
        """Enqueue time of the oldest pending or in-flight item per cache."""
        result: dict[str, float] = {}
        waiting = self.conn.execute(
            "SELECT cache, state FROM item_counts WHERE n > 0 AND state IN (?, ?)",
            (ItemState.PENDING, ItemState.INFLIGHT),
        ).fetchall()
        for cache, state in waiting:
            # One index seek each (items_age), not a scan of the queue.
            row = self.conn.execute(
                "SELECT MIN(enqueued_at) FROM items WHERE cache = ? AND state = ?", (cache, state)
            ).fetchone()
            if row is not None and row[0] is not None:
                result[cache] = min(float(row[0]), result.get(cache, float(row[0])))
        return result

    def cache_statuses(self, caches: Iterable[str]) -> list[CacheStatus]:
        """Per-cache counts, oldest pending and last success and failure."""
        counts = self.counts()
        oldest = self.oldest_pending()
        known = {
            row[0]: row[1:]
            for row in self.conn.execute(
                "SELECT cache, last_success_at, last_failure_at, last_error FROM cache_status"
            )
        }
        health = self.cache_health()
        names = list(dict.fromkeys([*caches, *(c for c, _ in counts), *known]))
        return [
            CacheStatus(
                cache=name,
                counts={state: counts.get((name, state), 0) for state in ItemState},
                oldest_pending_at=oldest.get(name),
                last_success_at=known.get(name, (None, None, None))[0],
                last_failure_at=known.get(name, (None, None, None))[1],
                last_error=known.get(name, (None, None, None))[2],
                health=health.get(name, CacheHealth(name)),
            )
            for name in names
        ]

    def dead_letters(self, limit: int = 10) -> list[DeadLetter]:
        """The most recently dead-lettered items."""
        return [
            DeadLetter(*row)
            for row in self.conn.execute(
                "SELECT id, cache, path, attempts, updated_at, last_reason, last_error FROM items"
                " WHERE state = ? ORDER BY updated_at DESC, id DESC LIMIT ?",
                (ItemState.DEAD, limit),
            )
        ]

    def ping(self) -> bool:
        """True when the database answers a query."""
        try:
            self.conn.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True
