"""Row counts of the state database, read straight with SQL (the code under test has no need)."""

from __future__ import annotations

from bridge.statedb import StateDb


def event_rows(db: StateDb) -> int:
    """How many events the database has recorded."""
    row = db.conn.execute("SELECT COUNT(*) FROM events").fetchone()
    return int(row[0])
