"""Hydra's PostgreSQL as an event source: LISTEN build_finished, and catch up by query.

Two connections: one only LISTENs (so no notification can arrive while it runs a query),
the other reads. On every (re)connect the reader catches up from the checkpoint kept in
the state database; while connected it polls the same way every poll_seconds, which also
covers a build whose NOTIFY was never sent (Hydra's queue runner notifies in a separate
transaction after the build's row is committed: hydra-queue-runner/src/state/mod.rs).

The checkpoint is on finish time (builds.stoptime), not on builds.id: ids are assigned when
a build is queued, so a lower id can finish after a higher one. Catch-up re-reads an
overlap window before the checkpoint and skips builds already recorded (dedup by build id
and stoptime), so a build committed late, a notification that arrives during catch-up, or a
chunk of a split notification is recorded once.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg

from bridge.clock import Clock
from bridge.config import Config, HydraDbSettings
from bridge.events import Event, EventRejected
from bridge.hydradb import BuildRow, HydraReader, connect, parse_notification, to_event
from bridge.hydrastate import HydraState, SeenKey
from bridge.intake import Intake, Recorded
from bridge.retrying import FailureBackoff
from bridge.secrets import SecretError
from bridge.statedb import StateDb
from exporter.metrics import HydraDbMetrics
from exporter.vocabulary import RejectReason, Source

log = logging.getLogger(__name__)

SOURCE = Source.HYDRA_DB
CHANNEL = "build_finished"
PAGE = 5000
WAIT_SLICE_SECONDS = 0.5
PRUNE_EVERY_SECONDS = 3600.0
WAITING_FOR_STATE_DB = "waiting for the state database"

Connector = Callable[[HydraDbSettings], "psycopg.Connection[Any]"]


class HydraRecorder:
    """Validates build rows and records the new ones as events, with the checkpoint."""

    def __init__(
        self,
        db: StateDb,
        intake: Intake,
        clock: Clock,
        *,
        source: str = SOURCE,
    ) -> None:
        self.db = db
        self.state = HydraState(db.conn)
        self.state.ensure_schema()
        self.intake = intake
        self.clock = clock
        self.source = source

    def record(
        self,
        reader: HydraReader,
        rows: Sequence[BuildRow],
        *,
        advance_to: tuple[int, int] | None = None,
        dry_run: bool = False,
    ) -> tuple[list[Event], int]:
        """Record the finished, not yet seen rows; return (new events, rows rejected).

        advance_to moves the checkpoint in the same transaction. With dry_run nothing
        is written: the events are only returned.
        """
        finished = [row for row in rows if row.finished == 1]
        keys: dict[SeenKey, BuildRow] = {(row.id, row.stop_time or 0): row for row in finished}
        new = self.state.unseen(self.source, keys)
        if not new and advance_to is None:
            return [], 0
        wanted = [row for key, row in keys.items() if key in new and not row.cancelled]
        outputs = reader.outputs(row.id for row in wanted) if wanted else {}
        now = self.clock.time()
        events: list[Event] = []
        rejected: list[str] = []
        for row in wanted:
            try:
                events.append(to_event(row, outputs[row.id], self.source, now))
            except EventRejected as exc:
                rejected.append(exc.message)
        if dry_run:
            return events, len(rejected)
        with self.db.transaction():
            recorded = [self._record(event) for event in events]
            self.state.mark_seen(self.source, new, now)
            if events:
                self.state.note_newest(max(int(e.finished_at or 0) for e in events))
            if advance_to is not None:
                self.state.advance(advance_to, now)
        for message in rejected:
            self.intake.count_rejected(RejectReason.INVALID_BUILD_ROW)
            log.warning("skipped a build row Hydra's database holds: %s", message)
        self.intake.announce(recorded)
        return events, len(rejected)

    def _record(self, event: Event) -> Recorded:
        recorded = self.intake.record(self.db, event)
        assert recorded is not None  # only spool files are duplicate rows
        return recorded


class HydraDbSource:
    """Follows Hydra's finished builds until stopped, reconnecting with backoff."""

    def __init__(
        self,
        config: Config,
        db: StateDb,
        intake: Intake,
        db_metrics: HydraDbMetrics,
        clock: Clock,
        *,
        stop: threading.Event,
        connector: Connector = connect,
    ) -> None:
        assert config.hydra_db is not None
        self.settings = config.hydra_db
        self.recorder = HydraRecorder(db, intake, clock)
        self.state = self.recorder.state
        self.db_metrics = db_metrics
        self.clock = clock
        self.stop = stop
        self.connector = connector
        self.retention_seconds = config.retention_days * 86400
        self._newest = self.state.newest()
        self._next_prune = 0.0
        self.state_backoff = FailureBackoff(
            "recording Hydra's builds in the state database", log, initial=1.0, maximum=60.0
        )
        db_metrics.connected.set(0)
        db_metrics.lag.set_function(self._lag)

    def _lag(self) -> float:
        newest = self._newest
        return 0.0 if newest is None else max(0.0, self.clock.time() - newest)

    def run(self) -> None:
        """Connect, catch up and follow notifications until stop is set."""
        backoff = FailureBackoff("reading Hydra's database", log, initial=1.0, maximum=60.0)
        while not self.stop.is_set():
            connections: list[psycopg.Connection[Any]] = []
            try:
                self._session(connections, backoff)
            except (psycopg.Error, OSError, SecretError) as exc:
                self.db_metrics.connected.set(0)
                self.db_metrics.reconnects.inc()
                self._set_state("disconnected", _describe(exc))
                self.stop.wait(backoff.failed(exc))
            except sqlite3.Error as exc:
                # Our own state database (disk full, locked) during the first catch-up:
                # wait, then connect and catch up again from the checkpoint it reached.
                self.db_metrics.connected.set(0)
                self._set_state(WAITING_FOR_STATE_DB, _describe(exc))
                self.stop.wait(self.state_backoff.failed(exc))
            finally:
                for conn in connections:
                    _close(conn)
        self.db_metrics.connected.set(0)
        self._set_state("stopped", None)

    def _session(self, connections: list[psycopg.Connection[Any]], backoff: FailureBackoff) -> None:
        # LISTEN before the catch-up query: a build finishing in between is then both
        # notified and read, and dedup records it once.
        listener = self.connector(self.settings)
        connections.append(listener)
        listener.execute(f"LISTEN {CHANNEL}")
        reader_conn = self.connector(self.settings)
        connections.append(reader_conn)
        reader = HydraReader(reader_conn)
        self._set_state("catching up", None)
        self.db_metrics.connected.set(1)
        caught = self.catch_up(reader)
        backoff.succeeded()
        self.state_backoff.succeeded()
        log.info("Hydra database: caught up (%d new build(s)); listening for %s", caught, CHANNEL)
        self._set_state("listening", None)
        next_poll = self.clock.monotonic() + self.settings.poll_seconds
        while not self.stop.is_set():
            wait = min(WAIT_SLICE_SECONDS, max(0.0, next_poll - self.clock.monotonic()))
            ids = self._wait_for_builds(listener, wait)
            try:
                if ids and not self.state_backoff.failures:
                    self.handle(reader, ids)
                if self.clock.monotonic() >= next_poll:
                    self.catch_up(reader)
                    self._maybe_prune()
                    next_poll = self.clock.monotonic() + self.settings.poll_seconds
                    if self.state_backoff.failures:
                        self.state_backoff.succeeded()
                        self._set_state("listening", None)
            except sqlite3.Error as exc:
                # Our state database refused a write (disk full, locked): Hydra's side is
                # fine, so stay connected. What that write held was not recorded and the
                # checkpoint stays before it; the next catch-up, after a pause, reads those
                # builds again (and skips those recorded already).
                next_poll = self.clock.monotonic() + self.state_backoff.failed(exc)
                self._set_state(WAITING_FOR_STATE_DB, _describe(exc))

    def _wait_for_builds(self, listener: psycopg.Connection[Any], timeout: float) -> list[int]:
        payloads = [n.payload for n in listener.notifies(timeout=timeout, stop_after=1)]
        if payloads:
            # Whatever else has arrived by now goes in the same batch and transaction.
            payloads += [n.payload for n in listener.notifies(timeout=0)]
        ids: dict[int, None] = {}
        for payload in payloads:
            try:
                ids.update(dict.fromkeys(parse_notification(payload)))
            except ValueError as exc:
                log.warning("ignored a %s notification: %s", CHANNEL, exc)
        return list(ids)

    def handle(self, reader: HydraReader, ids: Iterable[int]) -> int:
        """Record the notified builds (and their dependents) not recorded yet."""
        rows = reader.builds(ids)
        events, _ = self.recorder.record(reader, rows)
        self._note(events)
        return len(events)

    def catch_up(self, reader: HydraReader) -> int:
        """Record every finished build from the checkpoint minus the overlap window."""
        checkpoint = self.state.checkpoint()
        overlap = int(self.settings.overlap_seconds)
        if checkpoint is None:
            # First start: follow from now on; older builds are `backfill`'s job.
            start = int(self.clock.time()) - overlap
            log.info(
                "Hydra database: no checkpoint yet; following builds finished since %s "
                "(run `hydra-cachix-bridge backfill` for older ones)",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
            )
            with self.recorder.db.transaction():
                self.state.advance((start, 0), self.clock.time())
        else:
            start = checkpoint[0] - overlap
        after = (start, -1)
        total = 0
        while not self.stop.is_set():
            rows = reader.finished_after(after, PAGE)
            if not rows:
                break
            after = rows[-1].key
            events, _ = self.recorder.record(reader, rows, advance_to=after)
            self.db_metrics.caught_up.inc(len(events))
            self._note(events)
            total += len(events)
            if len(rows) < PAGE:
                break
        return total

    def _note(self, events: Sequence[Event]) -> None:
        stops = [int(e.finished_at) for e in events if e.finished_at is not None]
        if stops and (self._newest is None or max(stops) > self._newest):
            self._newest = max(stops)

    def _maybe_prune(self) -> None:
        now = self.clock.time()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY_SECONDS
        # A seen row matters while catch-up can still read its build: keep it for the
        # overlap window, and for the retention period like the events themselves.
        keep = max(self.retention_seconds, 2 * self.settings.overlap_seconds)
        with self.recorder.db.transaction():
            self.state.prune_seen(now - keep)

    def _set_state(self, state: str, error: str | None) -> None:
        try:
            with self.recorder.db.transaction():
                self.state.set_state(state, error, self.clock.time())
        except sqlite3.Error as exc:
            # The state database is what fails: the caller's backoff logs that already.
            log.debug("cannot record the Hydra database source's state: %s", exc)
        except Exception:
            log.exception("cannot record the Hydra database source's state")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _close(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.close()
    except Exception:
        log.debug("closing a Hydra database connection failed", exc_info=True)
