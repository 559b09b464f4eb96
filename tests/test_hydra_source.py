"""The Hydra database source against a real PostgreSQL 15 with Hydra's tables."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bridge import hydrasource
from bridge.clock import SystemClock
from bridge.config import Config, parse_config
from bridge.hydradb import HydraReader, parse_notification
from bridge.hydrasource import HydraDbSource
from bridge.hydrastate import HydraState, SourceStatus
from bridge.intake import Intake
from bridge.statedb import StateDb
from exporter.metrics import BridgeMetrics, HydraDbMetrics
from tests.pghelpers import HydraDatabase, hydra_db, notification_payloads, postgres_server

__all__ = ["hydra_db", "postgres_server"]  # fixtures

DRV = "/nix/store/{h}-pkg-{n}.drv"
OUT = "/nix/store/{h}-pkg-{n}"


def store_paths(n: int, output: str = "") -> tuple[str, str]:
    """A (drv, out) pair of well-formed store paths, distinct per n."""
    digest = f"{n:032d}".replace("0", "a").replace("e", "f").replace("o", "p")[:32]
    return DRV.format(h=digest, n=n), OUT.format(h=digest, n=n) + output


class Harness:
    """A HydraDbSource in a thread, with its queue and metrics.

    The source writes its rows, then its counts and its state, a moment apart: a test that
    waits for one of them and reads a later one waits for the later one (or for `halt`),
    which `-p tests.raceprobe` checks.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = BridgeMetrics(
            self.registry,
            version="test",
            caches={"local": "nix-copy"},
        )
        self.db_metrics = HydraDbMetrics(self.registry)
        self.queue = StateDb(config.database_path, shared=True)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.source: HydraDbSource | None = None

    def _new_source(self) -> HydraDbSource:
        self.stop = threading.Event()
        self.source = HydraDbSource(
            self.config,
            self.queue,
            Intake(self.config.rules, self.metrics, SystemClock()),
            self.db_metrics,
            SystemClock(),
            stop=self.stop,
        )
        return self.source

    def start(self, *, connected: bool = True) -> Harness:
        self.thread = threading.Thread(target=self._new_source().run, daemon=True)
        self.thread.start()
        if connected:
            wait_for(lambda: self.value("hydra_db_connected") == 1, "connected")
        return self

    def halt(self) -> None:
        """Stop the source and join its thread: every write it made is done after this."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=20)
            assert not self.thread.is_alive()

    def run_here(
        self,
        until: Callable[[], Any],
        what: str,
        *,
        meanwhile: Callable[[], None] = lambda: None,
        timeout: float = 60.0,
    ) -> None:
        """Run the source on this thread until `until()` holds, then stop it.

        For thousands of builds: off the main thread the race probe delays each of their
        counts, minutes in all. `meanwhile` (Hydra's side) and the waiting run on a helper
        thread; when this returns, every write of the source is done.
        """
        source = self._new_source()
        failures: list[BaseException] = []

        def drive() -> None:
            try:
                meanwhile()
                wait_for(lambda: self.stop.is_set() or until(), what, timeout)
            except BaseException as exc:
                failures.append(exc)
            finally:
                self.stop.set()

        helper = threading.Thread(target=drive, daemon=True)
        helper.start()
        try:
            source.run()
        finally:
            self.stop.set()
            helper.join(timeout=60)
        assert not helper.is_alive()
        if failures:
            raise failures[0]

    def value(self, name: str, **labels: str) -> float:
        got = self.registry.get_sample_value(f"hydra_cachix_bridge_{name}", labels or None)
        return 0.0 if got is None else got

    def events(self) -> list[tuple[Any, ...]]:
        reader = StateDb(self.config.database_path, create=False)
        try:
            return reader.conn.execute(
                "SELECT source, build_id, project, jobset, job, build_status, outcome, targets,"
                " finished_at FROM events ORDER BY id"
            ).fetchall()
        finally:
            reader.close()

    def status(self) -> SourceStatus | None:
        """The source's stored status as committed (its own connection, as `status` reads it)."""
        reader = StateDb(self.config.database_path, create=False)
        try:
            return HydraState(reader.conn).status()
        finally:
            reader.close()

    def state(self) -> str | None:
        """The source's stored state (listening, catching up, …), or None."""
        status = self.status()
        return None if status is None else status.state

    def checkpoint(self) -> tuple[int, int] | None:
        """The catch-up checkpoint as committed."""
        reader = StateDb(self.config.database_path, create=False)
        try:
            return HydraState(reader.conn).checkpoint()
        finally:
            reader.close()

    def items(self) -> list[tuple[Any, ...]]:
        reader = StateDb(self.config.database_path, create=False)
        try:
            return reader.conn.execute(
                "SELECT cache, path, state, source FROM items ORDER BY id"
            ).fetchall()
        finally:
            reader.close()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def make_config(tmp_path: Path, db: HydraDatabase, extra: str = "", **hydra: Any) -> Config:
    settings = "".join(f"{key} = {value}\n" for key, value in hydra.items())
    return parse_config(
        __import__("tomllib").loads(
            f'state_dir = "{tmp_path / "state"}"\n'
            f'[caches.local]\nbackend = "nix-copy"\nuri = "file://{tmp_path / "cache"}"\n'
            f'[hydra_db]\ndsn = "{db.bridge_dsn}"\n{settings}{extra}'
        ),
        "test.toml",
    )


@pytest.fixture
def harness(tmp_path: Path, hydra_db: HydraDatabase) -> Iterator[Harness]:
    h = Harness(make_config(tmp_path, hydra_db))
    yield h
    h.halt()
    h.queue.close()


def test_parse_notification_follows_hydra_payloads() -> None:
    assert parse_notification("123") == [123]
    assert parse_notification("123\t456\t789") == [123, 456, 789]
    assert parse_notification("123\t456\t123") == [123, 456]
    for bad in ("", "abc", "123\tabc", "12 3", "-1", "\uff11\uff12"):
        with pytest.raises(ValueError):
            parse_notification(bad)
    # Chunks repeat the head id and stay under Hydra's 7000-byte limit.
    chunks = notification_payloads(7, range(100_000, 103_000))
    assert len(chunks) > 1 and all(len(c) <= 7000 and c.startswith("7\t") for c in chunks)


def test_notification_records_the_build_like_runcommand(
    harness: Harness, hydra_db: HydraDatabase
) -> None:
    jobset = hydra_db.jobset("proj", "main")
    harness.start()
    drv, out = store_paths(1)
    build = hydra_db.queue_build(jobset, "pkg.x86_64-linux", drv, [("out", out)])
    hydra_db.finish_build(build, stoptime=int(time.time()))
    wait_for(harness.events, "the event")
    [event] = harness.events()
    assert event[:8] == ("hydra-db", build, "proj", "main", "pkg.x86_64-linux", 0, "matched", 1)
    assert harness.items() == [("local", out, "pending", "hydra-db")]
    # The first catch-up may have read the build: "listening" comes after it.
    wait_for(lambda: harness.state() == "listening", "listening")
    # The counts and the lag follow the event's commit (Intake.announce, then _note).
    harness.halt()
    assert harness.value("events_received_total", source="hydra-db") == 1
    assert harness.value("events_matched_total", source="hydra-db") == 1
    assert harness.value("paths_enqueued_total", cache="local") == 1
    assert 0 <= harness.value("hydra_db_lag_seconds") < 60


def test_split_notification_records_build_and_dependents_once(
    harness: Harness, hydra_db: HydraDatabase
) -> None:
    jobset = hydra_db.jobset()
    head = 0
    dependents: list[int] = []

    def fail_with_dependents() -> None:
        nonlocal head
        wait_for(lambda: harness.state() == "listening", "listening")
        now = int(time.time())
        with hydra_db.connect() as conn:
            head = hydra_db.queue_build(jobset, "dep", *_one(0), conn=conn)
            dependents.extend(
                hydra_db.queue_build(jobset, f"job{n}", *_one(n), conn=conn) for n in range(1, 2500)
            )
            # The queue runner marks the dependents failed (status 2) with the failing
            # build, then notifies once, split into chunks that each repeat the head id.
            for dep in dependents:
                hydra_db.finish_build(dep, status=2, stoptime=now, notify=False, conn=conn)
            hydra_db.finish_build(head, status=1, stoptime=now, dependents=dependents, conn=conn)

    harness.run_here(
        lambda: len(harness.events()) == 2500,
        "2500 events",
        meanwhile=fail_with_dependents,
        timeout=60,
    )
    assert len(notification_payloads(head, dependents)) >= 2
    events = harness.events()
    assert sorted(e[1] for e in events) == sorted([head, *dependents])
    assert {e[6] for e in events} == {"status_filtered"}
    assert harness.items() == []


def _refuse_writes_while(monkeypatch: pytest.MonkeyPatch, broken: threading.Event) -> list[int]:
    """Make the state database refuse every event while `broken` is set; count refusals."""
    real = Intake.record
    refused: list[int] = []

    def record(self: Intake, db: StateDb, event: Any, **kwargs: Any) -> Any:
        if broken.is_set():
            refused.append(event.build_id)
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, db, event, **kwargs)

    monkeypatch.setattr(Intake, "record", record)
    return refused


def test_a_full_state_database_is_waited_out_while_connected(
    harness: Harness, hydra_db: HydraDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = threading.Event()
    refused = _refuse_writes_while(monkeypatch, broken)
    jobset = hydra_db.jobset()
    harness.start()
    wait_for(lambda: harness.state() == "listening", "listening")
    broken.set()
    build = hydra_db.queue_build(jobset, "while-full", *_one(1))
    hydra_db.finish_build(build, stoptime=int(time.time()))
    wait_for(lambda: refused, "the refused write")
    wait_for(lambda: harness.state() == hydrasource.WAITING_FOR_STATE_DB, "the waiting state")
    first = _updated_at(harness)
    # Polls meanwhile must not end the thread: the one after the pause is refused too and
    # waited out again, its state (with a new time) the last thing it writes.
    wait_for(lambda: len(refused) >= 2, "the poll's refused write")
    wait_for(lambda: _updated_at(harness) > first, "the waiting state, again")
    assert harness.state() == hydrasource.WAITING_FOR_STATE_DB
    assert harness.thread is not None and harness.thread.is_alive()
    assert harness.events() == []
    broken.clear()
    # No new notification: the catch-up after the pause reads the build again.
    wait_for(lambda: len(harness.events()) == 1, "the build, once the disk has room", 20)
    assert harness.events()[0][1] == build
    wait_for(lambda: harness.state() == "listening", "listening again")
    assert harness.value("hydra_db_connected") == 1
    assert harness.value("hydra_db_reconnects_total") == 0
    assert harness.thread.is_alive()


def test_a_full_state_database_during_the_first_catch_up_is_waited_out(
    harness: Harness, hydra_db: HydraDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = threading.Event()
    refused = _refuse_writes_while(monkeypatch, broken)
    jobset = hydra_db.jobset()
    build = hydra_db.queue_build(jobset, "before-start", *_one(1))
    hydra_db.finish_build(build, stoptime=int(time.time()), notify=False)
    broken.set()
    harness.start(connected=False)  # connected only until the first catch-up fails
    wait_for(lambda: refused, "the refused write")
    wait_for(lambda: harness.state() == hydrasource.WAITING_FOR_STATE_DB, "the waiting state")
    assert harness.thread is not None and harness.thread.is_alive()
    broken.clear()
    wait_for(lambda: len(harness.events()) == 1, "the build, once the disk has room", 20)
    assert harness.events()[0][1] == build
    wait_for(lambda: harness.state() == "listening", "listening again")
    assert harness.value("hydra_db_reconnects_total") == 0


def _updated_at(harness: Harness) -> float:
    status = harness.status()
    assert status is not None and status.updated_at is not None
    return status.updated_at


def _one(n: int) -> tuple[str, list[tuple[str, str | None]]]:
    drv, out = store_paths(n)
    return drv, [("out", out)]


def test_catch_up_after_downtime_keeps_a_lower_id_that_finishes_later(
    harness: Harness, hydra_db: HydraDatabase
) -> None:
    jobset = hydra_db.jobset()
    now = int(time.time())
    low = hydra_db.queue_build(jobset, "slow", *_one(1))
    high = hydra_db.queue_build(jobset, "fast", *_one(2))
    assert low < high
    harness.start()
    hydra_db.finish_build(high, stoptime=now - 100)
    wait_for(lambda: len(harness.events()) == 1, "the higher id")
    harness.halt()
    # While the bridge is stopped: the lower id finishes (its NOTIFY goes nowhere), and a
    # third build whose transaction committed late, with a stoptime before the checkpoint.
    hydra_db.finish_build(low, stoptime=now - 50)
    late = hydra_db.queue_build(jobset, "late-commit", *_one(3))
    hydra_db.finish_build(late, stoptime=now - 120)
    checkpoint = harness.checkpoint()
    assert checkpoint is not None
    # The first run may have read the higher id by catch-up too, had it finished before
    # that run's first query: count only what this run catches up.
    caught_before = harness.value("hydra_db_catch_up_builds_total")
    harness.start()
    wait_for(lambda: len(harness.events()) == 3, "the builds finished while stopped")
    assert [e[1] for e in harness.events()] == [high, late, low]
    # Catch-up counts a page after its commit; "listening" follows the whole catch-up.
    wait_for(lambda: harness.state() == "listening", "the end of the catch-up")
    assert harness.value("hydra_db_catch_up_builds_total") - caught_before == 2
    new_checkpoint = harness.checkpoint()
    assert new_checkpoint is not None and new_checkpoint >= (now - 50, low)
    # A further restart reads the overlap window again: no duplicates once it listens.
    harness.halt()
    harness.start()
    wait_for(lambda: harness.state() == "listening", "the end of the restart's catch-up")
    assert len(harness.events()) == 3


def test_null_output_paths_are_skipped(harness: Harness, hydra_db: HydraDatabase) -> None:
    jobset = hydra_db.jobset()
    harness.start()
    drv, out = store_paths(1)
    some = hydra_db.queue_build(jobset, "ca", drv, [("out", out), ("dev", None)])
    hydra_db.finish_build(some)
    drv2, _ = store_paths(2)
    none = hydra_db.queue_build(jobset, "ca-none", drv2, [("out", None)])
    hydra_db.finish_build(none)
    wait_for(lambda: len(harness.events()) == 2, "both events")
    outcomes = {e[1]: (e[6], e[7]) for e in harness.events()}
    assert outcomes == {some: ("matched", 1), none: ("no_outputs", 0)}
    assert [i[1] for i in harness.items()] == [out]


def test_bad_rows_are_skipped_and_do_not_block_later_builds(
    harness: Harness, hydra_db: HydraDatabase
) -> None:
    jobset = hydra_db.jobset()
    now = int(time.time())
    with hydra_db.connect() as conn:
        # A build whose jobset row is gone (foreign keys bypassed, as a botched manual
        # cleanup or restore would leave it) and one with a status Hydra never documents.
        conn.execute("SET session_replication_role = replica")
        orphan = hydra_db.queue_build(9999, "orphan", *_one(1), conn=conn)
        hydra_db.finish_build(orphan, stoptime=now - 30, notify=False, conn=conn)
    odd = hydra_db.queue_build(jobset, "odd", *_one(2))
    hydra_db.finish_build(odd, status=42, stoptime=now - 20, notify=False)
    harness.start()
    good = hydra_db.queue_build(jobset, "good", *_one(3))
    hydra_db.finish_build(good, stoptime=now)
    wait_for(harness.events, "the good build")
    assert [e[1] for e in harness.events()] == [good]
    # The bad rows are counted after their page's commit, in the first catch-up (which
    # may have read the good build too); "listening" comes after it.
    wait_for(lambda: harness.state() == "listening", "the end of the first catch-up")
    assert harness.value("events_rejected_total", reason="invalid_build_row") == 2
    assert harness.thread is not None and harness.thread.is_alive()
    checkpoint = harness.checkpoint()
    assert checkpoint is not None and checkpoint[0] >= now - 20
    # A notification for a bad row is handled the same way, once.
    with hydra_db.connect() as conn:
        conn.execute("SELECT pg_notify('build_finished', %s)", (str(odd),))
    later = hydra_db.queue_build(jobset, "later", *_one(4))
    hydra_db.finish_build(later, stoptime=now + 1)
    wait_for(lambda: len(harness.events()) == 2, "the later build")
    # Had the odd row been rejected again, in the later build's batch, it would be counted
    # after that batch's commit: read the count once the source has stopped.
    harness.halt()
    assert harness.value("events_rejected_total", reason="invalid_build_row") == 2


def test_cancelled_and_restarted_builds(harness: Harness, hydra_db: HydraDatabase) -> None:
    jobset = hydra_db.jobset()
    harness.start()
    cancelled = hydra_db.queue_build(jobset, "cancelled", *_one(1))
    hydra_db.finish_build(cancelled, status=4)
    flaky = hydra_db.queue_build(jobset, "flaky", *_one(2))
    now = int(time.time())
    hydra_db.finish_build(flaky, status=1, stoptime=now - 10)
    wait_for(harness.events, "the failure")
    # Restarted and then successful: a new finish time, so a new event (Hydra's manual:
    # build_finished is delivered again with the new outcome).
    with hydra_db.connect() as conn:
        conn.execute("UPDATE builds SET finished = 0 WHERE id = %s", (flaky,))
    hydra_db.finish_build(flaky, status=0, stoptime=now)
    wait_for(lambda: len(harness.events()) == 2, "the success")
    assert [(e[1], e[5], e[6]) for e in harness.events()] == [
        (flaky, 1, "status_filtered"),
        (flaky, 0, "matched"),
    ]


def test_dropped_connection_during_catch_up_loses_and_duplicates_nothing(
    harness: Harness, hydra_db: HydraDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobset = hydra_db.jobset()
    now = int(time.time())
    expected = []
    with hydra_db.connect() as conn:
        for n in range(1200):
            build = hydra_db.queue_build(jobset, f"job{n}", *_one(n), conn=conn)
            hydra_db.finish_build(build, stoptime=now - 600 + n // 10, notify=False, conn=conn)
            expected.append(build)
    # Make the first start think it ran before (catch up from long ago), read small pages,
    # and have PostgreSQL drop the bridge's connections after the second page; a build
    # finishing (and notified) in the middle of the catch-up must be recorded once.
    HydraState(harness.queue.conn).ensure_schema()
    with harness.queue.transaction():
        HydraState(harness.queue.conn).advance((now - 3600, 0), time.time())
    monkeypatch.setattr(hydrasource, "PAGE", 100)
    pages = {"n": 0}
    original = HydraReader.finished_after
    extra: list[int] = []

    def finished_after(self: HydraReader, after: tuple[int, int], limit: int) -> Any:
        pages["n"] += 1
        if pages["n"] == 2:
            build = hydra_db.queue_build(jobset, "during", *_one(5000))
            hydra_db.finish_build(build, stoptime=now + 5)
            extra.append(build)
        if pages["n"] == 3:
            assert hydra_db.terminate_bridge_connections() == 2
        return original(self, after, limit)

    monkeypatch.setattr(HydraReader, "finished_after", finished_after)
    # Until connected again and listening: the catch-up after the reconnection is complete.
    harness.run_here(
        lambda: (
            harness.state() == "listening"
            and harness.value("hydra_db_connected") == 1
            and len(harness.events()) >= 1201
        ),
        "every build, connected again",
    )
    events = [e[1] for e in harness.events()]
    assert sorted(events) == sorted([*expected, *extra])  # nothing lost, nothing twice
    assert harness.value("hydra_db_reconnects_total") >= 1


def test_postgresql_restart_under_a_running_source(
    harness: Harness, hydra_db: HydraDatabase
) -> None:
    jobset = hydra_db.jobset()
    harness.start()
    first = hydra_db.queue_build(jobset, "before", *_one(1))
    hydra_db.finish_build(first)
    wait_for(harness.events, "the first build")
    hydra_db.server.stop()
    try:
        wait_for(lambda: harness.value("hydra_db_connected") == 0, "disconnected")
    finally:
        hydra_db.server.start()
    # Finished while the bridge was reconnecting: no NOTIFY reaches it.
    second = hydra_db.queue_build(jobset, "while-down", *_one(2))
    hydra_db.finish_build(second)
    wait_for(lambda: harness.value("hydra_db_connected") == 1, "reconnected", timeout=60)
    third = hydra_db.queue_build(jobset, "after", *_one(3))
    hydra_db.finish_build(third)
    wait_for(lambda: len(harness.events()) == 3, "all three builds", timeout=60)
    assert [e[1] for e in harness.events()] == [first, second, third]
    status = harness.status()
    assert status is not None and status.last_error is not None


def test_the_source_never_writes_to_hydras_database(hydra_db: HydraDatabase) -> None:
    import psycopg

    from bridge.config import HydraDbSettings
    from bridge.hydradb import connect

    conn = connect(HydraDbSettings(dsn=hydra_db.bridge_dsn))
    with conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("UPDATE builds SET keep = 1")
