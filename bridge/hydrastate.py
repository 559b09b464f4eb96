"""The Hydra database source's state in the queue database: checkpoint, builds seen, status.

Kept in the same SQLite file as the queue so the checkpoint commits with the events it covers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hydra_db_source (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    checkpoint_stoptime INTEGER,
    checkpoint_build_id INTEGER,
    newest_stoptime INTEGER,
    state TEXT NOT NULL DEFAULT 'disconnected',
    state_since REAL,
    last_error TEXT,
    updated_at REAL
);
-- (source, build, stoptime): a build restarted and finished again has a new stoptime and
-- is a new event (Hydra's manual: build_finished may be delivered again with a new outcome).
CREATE TABLE IF NOT EXISTS hydra_builds_seen (
    source TEXT NOT NULL,
    build_id INTEGER NOT NULL,
    stoptime INTEGER NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (source, build_id, stoptime)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS hydra_builds_seen_age ON hydra_builds_seen (recorded_at);
"""

SeenKey = tuple[int, int]
"""(build id, stoptime)"""


@dataclass(frozen=True)
class SourceStatus:
    """What `status` shows about the Hydra database source."""

    state: str
    state_since: float | None
    last_error: str | None
    checkpoint_stoptime: int | None
    checkpoint_build_id: int | None
    newest_stoptime: int | None
    updated_at: float | None


class HydraState:
    """Reads and writes of the source's tables on one queue connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def ensure_schema(self) -> None:
        """Create the tables (idempotent; the queue's own schema is untouched)."""
        self.conn.executescript(_SCHEMA)
        self.conn.execute("INSERT OR IGNORE INTO hydra_db_source (id) VALUES (1)")

    def checkpoint(self) -> tuple[int, int] | None:
        """(stoptime, build id) of the newest build catch-up has covered, or None."""
        row = self.conn.execute(
            "SELECT checkpoint_stoptime, checkpoint_build_id FROM hydra_db_source WHERE id = 1"
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return int(row[0]), int(row[1] or 0)

    def advance(self, key: tuple[int, int], now: float) -> None:
        """Move the checkpoint forward to key (never back); call in the events' transaction."""
        self.conn.execute(
            "UPDATE hydra_db_source SET checkpoint_stoptime = ?, checkpoint_build_id = ?,"
            " updated_at = ? WHERE id = 1 AND (checkpoint_stoptime IS NULL"
            " OR checkpoint_stoptime < ? OR (checkpoint_stoptime = ? AND checkpoint_build_id < ?))",
            (key[0], key[1], now, key[0], key[0], key[1]),
        )

    def newest(self) -> int | None:
        """Stoptime of the newest build recorded (for the lag gauge after a restart)."""
        row = self.conn.execute(
            "SELECT newest_stoptime FROM hydra_db_source WHERE id = 1"
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def note_newest(self, stoptime: int) -> None:
        """Remember the newest recorded stoptime (never moves back)."""
        self.conn.execute(
            "UPDATE hydra_db_source SET newest_stoptime = ? WHERE id = 1"
            " AND (newest_stoptime IS NULL OR newest_stoptime < ?)",
            (stoptime, stoptime),
        )

    def unseen(self, source: str, keys: Iterable[SeenKey]) -> set[SeenKey]:
        """The keys not recorded yet for this source."""
        wanted = set(keys)
        seen: set[SeenKey] = set()
        ids = sorted({build for build, _ in wanted})
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            seen.update(
                (int(b), int(s))
                for b, s in self.conn.execute(
                    "SELECT build_id, stoptime FROM hydra_builds_seen"  # noqa: S608
                    f" WHERE source = ? AND build_id IN ({marks})",
                    (source, *chunk),
                )
            )
        return wanted - seen

    def mark_seen(self, source: str, keys: Iterable[SeenKey], now: float) -> None:
        """Record keys as handled (recorded, rejected or skipped); call in the transaction."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO hydra_builds_seen (source, build_id, stoptime, recorded_at)"
            " VALUES (?, ?, ?, ?)",
            [(source, build, stop, now) for build, stop in keys],
        )

    def prune_seen(self, before: float) -> int:
        """Forget builds handled before `before` (catch-up no longer reaches them)."""
        return self.conn.execute(
            "DELETE FROM hydra_builds_seen WHERE recorded_at < ?", (before,)
        ).rowcount

    def set_state(self, state: str, error: str | None, now: float) -> None:
        """Record the connection state for `status` (its own short transaction)."""
        self.conn.execute(
            "UPDATE hydra_db_source SET state_since = CASE WHEN state = ? THEN state_since"
            " ELSE ? END, state = ?, last_error = COALESCE(?, last_error), updated_at = ?"
            " WHERE id = 1",
            (state, now, state, error, now),
        )

    def status(self) -> SourceStatus | None:
        """The stored status, or None when the source never ran with this database."""
        try:
            row = self.conn.execute(
                "SELECT state, state_since, last_error, checkpoint_stoptime,"
                " checkpoint_build_id, newest_stoptime, updated_at"
                " FROM hydra_db_source WHERE id = 1"
            ).fetchone()
        except sqlite3.OperationalError:
            return None  # no such table: the source never ran here
        return None if row is None else SourceStatus(*row)
