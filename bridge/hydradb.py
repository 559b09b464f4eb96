"""Read finished builds from Hydra's PostgreSQL and describe them as RunCommand would.

Column names and types follow Hydra's sql/hydra.sql (tables builds, jobsets, buildoutputs,
jobsetevals, jobsetevalmembers); unquoted identifiers, so all lowercase. Every query here is
a SELECT: the connection is also opened with default_transaction_read_only=on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from bridge.config import HydraDbSettings
from bridge.events import Event, EventRejected, parse_hydra_payload
from bridge.secrets import read_secret

# buildstatus codes Hydra documents for builds (sql/hydra.sql, "Status codes used for
# builds and steps"): 0-12. Anything else is a row we do not understand.
KNOWN_BUILD_STATUSES = frozenset(range(13))
# Hydra's web UI cancels a queued build by setting finished = 1, buildstatus = 4; the queue
# runner sends no build_finished for it and RunCommand never sees it, so neither do we.
CANCELLED = 4
READ_CHUNK = 1000

_BUILD_COLUMNS = (
    "b.id, b.jobset_id, j.project, j.name, b.job, b.drvpath, b.finished, b.buildstatus,"
    " b.timestamp, b.starttime, b.stoptime"
)
# LEFT JOIN: a build whose jobset row is missing is reported as a bad row, not dropped.
_FROM = " FROM builds b LEFT JOIN jobsets j ON j.id = b.jobset_id"


@dataclass(frozen=True)
class BuildRow:
    """One row of builds (with its jobset's names), before validation."""

    id: int
    jobset_id: int | None
    project: str | None
    jobset: str | None
    job: str | None
    drv_path: str | None
    finished: int | None
    build_status: int | None
    timestamp: int | None
    start_time: int | None
    stop_time: int | None

    @property
    def key(self) -> tuple[int, int]:
        """(stoptime, id): the order catch-up reads in, and the dedup key with the id."""
        return (self.stop_time or 0, self.id)

    @property
    def cancelled(self) -> bool:
        """A build cancelled before it ran (never notified, never seen by RunCommand)."""
        return self.build_status == CANCELLED


Outputs = list[tuple[str, str | None]]


def connect(settings: HydraDbSettings) -> psycopg.Connection[Any]:
    """Open a read-only autocommit connection; the password file is read now, never logged."""
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": max(1, int(settings.connect_timeout_seconds)),
        "application_name": "hydra-cachix-bridge",
        "options": "-c default_transaction_read_only=on",
    }
    if settings.password_file is not None:
        kwargs["password"] = read_secret(settings.password_file)
    return psycopg.connect(settings.dsn, **kwargs)


def parse_notification(payload: str) -> list[int]:
    """Build ids of a build_finished payload: `buildId[\\tdependentId...]`.

    Hydra's queue runner repeats the finished build's id at the head of every chunk when
    it splits a long dependents list (crates/db notify_build_finished); the dependents are
    builds that failed with it and are finished too. Non-integer fields make the payload
    invalid, as in Hydra's own parser (lib/Hydra/Event/BuildFinished.pm).
    """
    fields = payload.split("\t")
    if not fields or not all(f.isascii() and f.isdigit() for f in fields):
        raise ValueError(f"build_finished payload is not tab-separated build ids: {payload[:80]!r}")
    return list(dict.fromkeys(int(f) for f in fields))


def to_event(row: BuildRow, outputs: Outputs, source: str, received_at: float) -> Event:
    """Validate a row as the RunCommand payload Hydra would send for it, then retag it."""
    where = f"build {row.id}"
    if row.project is None or row.jobset is None:
        raise EventRejected("invalid_build_row", f"{where}: jobset id {row.jobset_id} not found")
    if row.build_status not in KNOWN_BUILD_STATUSES:
        raise EventRejected(
            "invalid_build_row", f"{where}: unknown buildstatus {row.build_status!r}"
        )
    # The same fields and types as Hydra's buildFinished payload (lib/Hydra/Plugin/
    # RunCommand.pm makeJsonPayload), so both sources are validated by the same code.
    payload = {
        "event": "buildFinished",
        "build": row.id,
        "finished": bool(row.finished),
        "timestamp": row.timestamp,
        "startTime": row.start_time,
        "stopTime": row.stop_time,
        "project": row.project,
        "jobset": row.jobset,
        "job": row.job,
        "drvPath": row.drv_path,
        "buildStatus": row.build_status,
        "outputs": [{"name": name, "path": path} for name, path in outputs],
    }
    try:
        event = parse_hydra_payload(payload, received_at)
    except EventRejected as exc:
        raise EventRejected("invalid_build_row", f"{where}: {exc.message}") from None
    return dataclasses.replace(event, source=source)


class HydraReader:
    """The SELECTs the source and backfill need, on one connection."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def _rows(self, sql: str, params: Sequence[Any]) -> list[BuildRow]:
        return [BuildRow(*row) for row in self.conn.execute(sql, params).fetchall()]

    def finished_after(self, after: tuple[int, int], limit: int) -> list[BuildRow]:
        """Finished builds after (stoptime, id), in that order (index on finished, stoptime)."""
        stop, build = after
        return self._rows(
            f"SELECT {_BUILD_COLUMNS}{_FROM} WHERE b.finished = 1 AND b.stoptime >= %s"
            " AND (b.stoptime > %s OR b.id > %s) ORDER BY b.stoptime, b.id LIMIT %s",
            (stop, stop, build, limit),
        )

    def builds(self, ids: Iterable[int]) -> list[BuildRow]:
        """The rows of these build ids (those that exist), finished or not."""
        wanted = list(ids)
        rows: list[BuildRow] = []
        for start in range(0, len(wanted), READ_CHUNK):
            chunk = wanted[start : start + READ_CHUNK]
            rows += self._rows(
                f"SELECT {_BUILD_COLUMNS}{_FROM} WHERE b.id = ANY(%s) ORDER BY b.id", (chunk,)
            )
        return rows

    def outputs(self, ids: Iterable[int]) -> dict[int, Outputs]:
        """Each build's outputs (name, path or None), by output name."""
        wanted = list(ids)
        result: dict[int, Outputs] = {build: [] for build in wanted}
        for start in range(0, len(wanted), READ_CHUNK):
            chunk = wanted[start : start + READ_CHUNK]
            for build, name, path in self.conn.execute(
                "SELECT build, name, path FROM buildoutputs WHERE build = ANY(%s)"
                " ORDER BY build, name",
                (chunk,),
            ):
                result[build].append((name, path))
        return result

    def jobset_id(self, project: str, jobset: str) -> int | None:
        """The id of a jobset, or None."""
        row = self.conn.execute(
            "SELECT id FROM jobsets WHERE project = %s AND name = %s", (project, jobset)
        ).fetchone()
        return None if row is None else int(row[0])

    def latest_eval(self, jobset_id: int) -> int | None:
        """The newest evaluation that recorded its builds (hasnewbuilds = 1; an evaluation
        without new builds has no jobsetevalmembers rows, per sql/hydra.sql)."""
        row = self.conn.execute(
            "SELECT id FROM jobsetevals WHERE jobset_id = %s AND hasnewbuilds = 1"
            " ORDER BY id DESC LIMIT 1",
            (jobset_id,),
        ).fetchone()
        return None if row is None else int(row[0])

    def eval_jobset(self, eval_id: int) -> int | None:
        """The jobset id of an evaluation, or None when there is no such evaluation."""
        row = self.conn.execute(
            "SELECT jobset_id FROM jobsetevals WHERE id = %s", (eval_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _selection(
        self, jobset_id: int, eval_id: int | None, since: int | None
    ) -> tuple[str, list[Any]]:
        where = " WHERE b.jobset_id = %s AND b.finished = 1"
        params: list[Any] = [jobset_id]
        if eval_id is not None:
            where += " AND b.id IN (SELECT build FROM jobsetevalmembers WHERE eval = %s)"
            params.append(eval_id)
        if since is not None:
            where += " AND b.stoptime >= %s"
            params.append(since)
        return where, params

    def count_selected(self, jobset_id: int, eval_id: int | None, since: int | None) -> int:
        """How many finished builds a backfill selection holds."""
        where, params = self._selection(jobset_id, eval_id, since)
        sql = f"SELECT COUNT(*) FROM builds b{where}"  # noqa: S608 (fixed fragments)
        row = self.conn.execute(sql, params).fetchone()
        return 0 if row is None else int(row[0])

    def selected(
        self, jobset_id: int, eval_id: int | None, since: int | None, page: int
    ) -> Iterator[list[BuildRow]]:
        """The finished builds of a backfill selection, a page at a time, by id."""
        where, params = self._selection(jobset_id, eval_id, since)
        last = -1
        while True:
            rows = self._rows(
                f"SELECT {_BUILD_COLUMNS}{_FROM}{where} AND b.id > %s ORDER BY b.id LIMIT %s",
                [*params, last, page],
            )
            if not rows:
                return
            yield rows
            last = rows[-1].id
