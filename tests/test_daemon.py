"""bridge/daemon.py in process: its public surface with an injected clock, backends, store and
registry, observed through the spool, the state database and the metric values."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client import CollectorRegistry

from bridge.backends import PushOutcome
from bridge.config import (
    CacheConfig,
    Config,
    LogSource,
    MetricsSettings,
    PushSettings,
    SpoolSettings,
)
from bridge.daemon import Daemon, DaemonError
from bridge.events import Event, hook_envelope
from bridge.matching import Rule
from bridge.producers import record_hydra_payload
from bridge.spool import SpoolLayout, write_event
from bridge.statedb import CacheHealth, StateDb
from bridge.store import NixStore
from tests.integration.daemonproc import wait_for
from tests.nixhelpers import Built, build, hydra_payload

P = "hydra_cachix_bridge_"
EPOCH = 2_000_000_000.0  # far from the real time: values from the injected clock stand out


class ManualClock:
    """A clock the test moves: both times run with real time, plus what advance() added."""

    def __init__(self, start: float = EPOCH) -> None:
        self._lock = threading.Lock()
        self._origin = time.monotonic()
        self._start = start
        self._added = 0.0

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._added += seconds

    def monotonic(self) -> float:
        with self._lock:
            return time.monotonic() + self._added

    def time(self) -> float:
        with self._lock:
            return self._start + (time.monotonic() - self._origin) + self._added


class RecordingBackend:
    """A backend (bridge.backends.Backend) that records every batch it is given; it fails
    while `failing` is set and holds a push while `holding` is set (until cancelled)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.batches: list[list[str]] = []
        self.failing = threading.Event()
        self.holding = threading.Event()
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def push(self, paths: Sequence[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        with self._lock:
            self.batches.append(list(paths))
        self.entered.set()
        if self.holding.is_set():
            cancel.wait(timeout)
            return PushOutcome(False, 0.0, "timeout", "cancelled at shutdown", cancelled=True)
        if self.failing.is_set():
            return PushOutcome(False, 0.01, "exit_status", "cachix push exited 1: told to fail")
        return PushOutcome(True, 0.01)

    def paths(self) -> list[str]:
        with self._lock:
            return [path for batch in self.batches for path in batch]


class Bridge:
    """One in-process daemon under tmp_path with everything injected, and its observers."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        log_sources: tuple[LogSource, ...] = (),
        push: PushSettings | None = None,
    ) -> None:
        self.config = Config(
            state_dir=tmp_path / "state",
            spool_dir=tmp_path / "state" / "spool",
            caches=MappingProxyType(
                {"c": CacheConfig(name="c", backend="nix-copy", uri="file:///unused")}
            ),
            rules=(Rule(caches=("c",)),),
            push=push or PushSettings(workers=2, shutdown_grace_seconds=1.0),
            spool=SpoolSettings(rescan_seconds=30.0),
            metrics=MetricsSettings(enabled=False),
            log_sources=log_sources,
            log_poll_seconds=0.05,
        )
        self.layout = SpoolLayout.of(self.config)
        self.clock = ManualClock()
        self.registry = CollectorRegistry()
        self.backend = RecordingBackend("c")
        self.daemons: list[Daemon] = []
        self.stop = threading.Event()
        self.runner: threading.Thread | None = None

    def daemon(self, registry: CollectorRegistry | None = None) -> Daemon:
        daemon = Daemon(
            self.config,
            registry=registry or self.registry,
            clock=self.clock,
            backends={"c": self.backend},
            store=NixStore(),
            rng=random.Random(7),
            serve_metrics=False,
        )
        self.daemons.append(daemon)
        return daemon

    def run(self, daemon: Daemon) -> Daemon:
        """Run the maintenance loop of a started daemon in a thread, as `run` does."""
        self.stop = threading.Event()
        self.runner = threading.Thread(target=daemon.run_until, args=(self.stop,), daemon=True)
        self.runner.start()
        return daemon

    def start(self) -> Daemon:
        daemon = self.daemon()
        daemon.start()
        return self.run(daemon)

    def finish(self) -> None:
        """Stop the loop (it shuts the daemon down) and shut down every daemon made."""
        self.stop.set()
        if self.runner is not None:
            self.runner.join(timeout=60)
            assert not self.runner.is_alive(), "run_until did not return after stop"
        for daemon in self.daemons:
            daemon.shutdown()

    def quiesce(self) -> None:
        """Stop the daemons and check that every thread of theirs has ended.

        The sources commit an event, then count and log it; a worker commits a push's rows,
        then counts and logs it. A test that saw the rows reads the metrics after this.
        """
        self.finish()
        for daemon in self.daemons:
            # Daemon.shutdown joins with timeouts and does not say whether a join timed out.
            threads = daemon._threads + (daemon.workers._threads if daemon.workers else [])
            alive = [thread.name for thread in threads if thread.is_alive()]
            assert not alive, f"daemon thread(s) still running after shutdown: {alive}"

    def value(self, name: str, **labels: str) -> float:
        sample = self.registry.get_sample_value(P + name, labels)
        return 0.0 if sample is None else sample

    def states(self) -> dict[str, str]:
        """path -> state of every item of cache c, read from the state database."""
        db = StateDb(self.config.database_path)
        try:
            rows = db.conn.execute("SELECT path, state FROM items WHERE cache = 'c'").fetchall()
        finally:
            db.close()
        return dict(rows)

    def events(self) -> list[tuple[str, str]]:
        """(source, outcome) of every recorded event, in order."""
        db = StateDb(self.config.database_path)
        try:
            rows = db.conn.execute("SELECT source, outcome FROM events ORDER BY id").fetchall()
        finally:
            db.close()
        return [(source, outcome) for source, outcome in rows]

    def drop(self, name: str, data: bytes) -> Path:
        """Write a file like a producer: into tmp/, then rename into incoming/."""
        tmp = self.layout.tmp / f"w-{name}"
        tmp.write_bytes(data)
        target = self.layout.incoming / name
        os.rename(tmp, target)
        return target


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[Bridge]:
    harness = Bridge(tmp_path)
    yield harness
    harness.finish()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> list[Built]:
    return build(tmp_path_factory.mktemp("daemon-nix"), 6, prefix="hcb-daemon")


def hydra_bytes(built: Built, build_id: int) -> bytes:
    return json.dumps(hydra_payload(build_id, built)).encode()


# -- start --------------------------------------------------------------------------------


@pytest.mark.nix
def test_start_queues_again_what_the_last_run_left_in_flight(
    bridge: Bridge, built: list[Built], caplog: pytest.LogCaptureFixture
) -> None:
    bridge.layout.ensure()
    bridge.config.state_dir.mkdir(parents=True, exist_ok=True)
    db = StateDb(bridge.config.database_path)
    try:
        event = Event(source="hook", received_at=EPOCH - 60, out_paths=(built[0].out,))
        with db.transaction():
            db.record_event(
                event,
                spool_name=None,
                outcome="matched",
                targets=[("c", built[0].out)],
                now=EPOCH - 60,
            )
        [claimed] = db.claim("c", 10, EPOCH - 50)  # the previous run took it, then died
    finally:
        db.close()
    assert bridge.states() == {built[0].out: "inflight"}

    with caplog.at_level(logging.WARNING, logger="bridge.daemon"):
        bridge.start()
    assert "1 path(s) were in flight when the last run stopped; queued again" in caplog.text
    wait_for(lambda: bridge.states() == {built[0].out: "pushed"}, 20, message="recovered push")
    assert bridge.backend.batches == [[claimed.path]]
    assert bridge.value("pushes_succeeded_total", cache="c", backend="nix-copy") == 1
    assert bridge.value("queue_items", cache="c", state="inflight") == 0
    assert bridge.value("queue_items", cache="c", state="pushed") == 1


def test_a_cache_down_before_the_restart_is_down_on_the_first_scrape(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /metrics is served before the initial spool scan, which takes a while after a long
    # outage: the recorded state must be on the gauge by then, not only once workers start.
    bridge.config.state_dir.mkdir(parents=True, exist_ok=True)
    db = StateDb(bridge.config.database_path)
    try:
        down = CacheHealth("c", down_since=EPOCH - 600, next_try_at=EPOCH + 600, failures=4)
        db.save_cache_health(down, EPOCH - 10, failed=True)
    finally:
        db.close()
    served: list[float | None] = []
    serve = Daemon._serve_metrics

    def serve_and_look(daemon: Daemon) -> None:
        serve(daemon)
        served.append(
            bridge.registry.get_sample_value("hydra_cachix_bridge_cache_up", {"cache": "c"})
        )

    monkeypatch.setattr(Daemon, "_serve_metrics", serve_and_look)
    bridge.start()
    assert served == [0.0]
    assert bridge.value("cache_up", cache="c") == 0


def test_second_daemon_on_the_same_state_directory_cannot_start(bridge: Bridge) -> None:
    first = bridge.start()
    assert first.ready.is_set()
    second = bridge.daemon(registry=CollectorRegistry())
    with pytest.raises(DaemonError, match="another hydra-cachix-bridge daemon") as raised:
        second.start()
    assert str(bridge.config.state_dir) in str(raised.value)
    assert not second.ready.is_set()
    assert first.health() == []


def test_health_names_the_first_scan_before_ready_and_is_empty_when_running(
    bridge: Bridge,
) -> None:
    daemon = bridge.daemon()
    assert not daemon.ready.is_set()
    problems = daemon.health()
    assert "starting: the first spool scan has not finished" in problems
    assert any("spool watch" in p and "is not alive" in p for p in problems)
    daemon.start()
    bridge.run(daemon)
    assert daemon.ready.is_set()
    assert daemon.health() == []
    assert bridge.value("spool_watch_alive") == 1
    assert "Health: problems" not in daemon.landing_page()


@pytest.mark.nix
def test_a_dead_spool_watch_is_a_health_problem_until_it_is_restored(
    bridge: Bridge, built: list[Built], caplog: pytest.LogCaptureFixture
) -> None:
    daemon = bridge.daemon()
    daemon.start()  # no maintenance loop yet: nothing restores the watch
    assert daemon.health() == []
    os.rename(bridge.layout.incoming, bridge.layout.root / "incoming.replaced")
    problems = daemon.health()
    assert problems == [f"spool watch on {bridge.layout.incoming} is not alive"]
    assert "Health: problems" in daemon.landing_page()

    with caplog.at_level(logging.ERROR, logger="bridge.daemon"):
        bridge.run(daemon)  # the maintenance loop recreates incoming/ and watches it again
        wait_for(lambda: daemon.health() == [], 20, message="the spool watch restored")
        # The loop logs the loss, restores the watch (health turns empty), then sets the gauge.
        wait_for(
            lambda: bridge.value("spool_watch_alive") == 1, 20, message="the spool watch gauge"
        )
    assert f"spool watch on {bridge.layout.incoming} lost" in caplog.text
    assert bridge.value("spool_watch_alive") == 1
    write_event(bridge.layout, "hook", hook_envelope(built[1].drv, built[1].out, EPOCH))
    wait_for(lambda: built[1].out in bridge.backend.paths(), 20, message="push after restore")


# -- events -------------------------------------------------------------------------------


@pytest.mark.nix
def test_an_event_file_is_recorded_pushed_and_counted(bridge: Bridge, built: list[Built]) -> None:
    bridge.start()
    event, target = record_hydra_payload(
        bridge.layout, hydra_bytes(built[2], 42), bridge.config.spool.max_event_bytes, time.time()
    )
    assert target.parent == bridge.layout.incoming and event.out_paths == (built[2].out,)

    wait_for(lambda: bridge.states() == {built[2].out: "pushed"}, 20, message="event pushed")
    bridge.quiesce()  # the rows come first, the counts after (both the intake's and the push's)
    assert not target.exists()
    assert bridge.events() == [("hydra", "matched")]
    assert bridge.backend.batches == [[built[2].out]]
    assert bridge.value("events_received_total", source="hydra") == 1
    assert bridge.value("events_matched_total", source="hydra") == 1
    assert bridge.value("paths_enqueued_total", cache="c") == 1
    assert bridge.value("pushes_started_total", cache="c", backend="nix-copy") == 1
    assert bridge.value("pushes_succeeded_total", cache="c", backend="nix-copy") == 1
    assert bridge.value("paths_pushed_total", cache="c") == 1
    # The injected clock stamps the push.
    pushed_at = bridge.value("last_success_timestamp_seconds", cache="c")
    assert EPOCH <= pushed_at <= bridge.clock.time()


@pytest.mark.nix
def test_a_failed_push_waits_for_its_backoff_on_the_injected_clock(
    tmp_path: Path, built: list[Built]
) -> None:
    bridge = Bridge(
        tmp_path,
        push=PushSettings(
            workers=1,
            backoff_initial_seconds=600.0,
            backoff_max_seconds=600.0,
            shutdown_grace_seconds=1.0,
        ),
    )
    try:
        bridge.backend.failing.set()
        bridge.start()
        write_event(bridge.layout, "hook", hook_envelope(built[3].drv, built[3].out, EPOCH))
        wait_for(lambda: bridge.backend.batches, 20, message="first push")
        wait_for(
            lambda: bridge.value("cache_up", cache="c") == 0, 20, message="the cache marked down"
        )
        # The worker marks the cache down, then records the failed items, then counts the push.
        failed = {"cache": "c", "backend": "nix-copy", "reason": "exit_status"}
        wait_for(
            lambda: bridge.value("pushes_failed_total", **failed) == 1,
            20,
            message="the failed push counted",
        )
        time.sleep(1.0)  # the backoff is 300 to 600 s on the daemon's clock: no retry yet
        assert len(bridge.backend.batches) == 1
        assert bridge.states() == {built[3].out: "pending"}

        bridge.backend.failing.clear()
        bridge.clock.advance(601.0)
        wait_for(lambda: bridge.states() == {built[3].out: "pushed"}, 20, message="the retry")
        assert bridge.backend.batches == [[built[3].out], [built[3].out]]
        # Marked up right after the push is recorded.
        wait_for(lambda: bridge.value("cache_up", cache="c") == 1, 20, message="the cache up")
    finally:
        bridge.finish()


def test_a_bad_file_is_quarantined_and_counted(bridge: Bridge) -> None:
    daemon = bridge.start()
    bridge.drop("broken.json", b"{")
    # The count comes last: the reason file is written before the move, by design.
    wait_for(
        lambda: bridge.value("events_rejected_total", reason="invalid_json") == 1,
        20,
        message="quarantine",
    )
    assert not (bridge.layout.incoming / "broken.json").exists()
    assert (bridge.layout.quarantine / "broken.json").read_bytes() == b"{"
    reason = json.loads((bridge.layout.quarantine / "broken.json.reason").read_text())
    assert reason["reason"] == "invalid_json"
    assert bridge.value("events_rejected_total", reason="invalid_json") == 1
    assert bridge.value("events_received_total", source="hook") == 0
    assert bridge.events() == []
    assert bridge.backend.batches == []
    assert daemon.health() == []
    assert "broken.json" in daemon.landing_page()


@pytest.mark.nix
def test_a_file_left_in_the_spool_is_read_at_start(bridge: Bridge, built: list[Built]) -> None:
    bridge.layout.ensure()
    write_event(bridge.layout, "hook", hook_envelope(built[4].drv, built[4].out, EPOCH))
    bridge.drop("left-broken.json", b"[")
    daemon = bridge.daemon()
    daemon.start()
    # The initial scan is part of start(): recorded (or quarantined) before ready.
    assert daemon.ready.is_set()
    assert os.listdir(bridge.layout.incoming) == []
    assert bridge.value("events_received_total", source="hook") == 1
    assert bridge.value("events_rejected_total", reason="invalid_json") == 1
    bridge.run(daemon)
    wait_for(lambda: bridge.states() == {built[4].out: "pushed"}, 20, message="pushed")


# -- shutdown -----------------------------------------------------------------------------


@pytest.mark.nix
def test_shutdown_releases_in_flight_items_and_the_lock(bridge: Bridge, built: list[Built]) -> None:
    bridge.backend.holding.set()
    daemon = bridge.start()
    write_event(bridge.layout, "hook", hook_envelope(built[5].drv, built[5].out, EPOCH))
    assert bridge.backend.entered.wait(20)
    assert bridge.states() == {built[5].out: "inflight"}

    bridge.stop.set()  # run_until returns through shutdown()
    assert bridge.runner is not None
    bridge.runner.join(timeout=30)
    assert not bridge.runner.is_alive()
    assert bridge.states() == {built[5].out: "pending"}
    assert daemon.health() != []  # stopped: no watch, no database

    # The lock is free again: the next daemon starts and pushes what was left.
    bridge.backend.holding.clear()
    bridge.registry = CollectorRegistry()
    bridge.start()
    wait_for(lambda: bridge.states() == {built[5].out: "pushed"}, 20, message="pushed again")
    assert bridge.backend.batches == [[built[5].out], [built[5].out]]


# -- log sources --------------------------------------------------------------------------


@pytest.mark.nix
def test_a_configured_log_source_is_followed(tmp_path: Path, built: list[Built]) -> None:
    log_file = tmp_path / "logs" / "hook.log"
    log_file.parent.mkdir()
    log_file.write_text(f"post-build-hook: uploading {built[0].out}\n")
    bridge = Bridge(tmp_path, log_sources=(LogSource(log_file),))
    try:
        daemon = bridge.start()
        wait_for(lambda: bridge.states().get(built[0].out) == "pushed", 20, message="first line")
        with log_file.open("a") as handle:
            handle.write(f"post-build-hook: uploading {built[1].out}\n")
        wait_for(lambda: bridge.states().get(built[1].out) == "pushed", 20, message="appended")
        wait_for(
            lambda: bridge.value("log_source_readable", path=str(log_file)) == 1,
            10,
            message="the log source readable gauge",
        )
        assert daemon.health() == []
        assert str(log_file) in daemon.landing_page()
        # The follower commits the event, then counts it: a worker may push it in between.
        bridge.quiesce()
        assert bridge.events() == [("log", "matched"), ("log", "matched")]
        assert bridge.value("events_received_total", source="log") == 2
        assert bridge.value("paths_enqueued_total", cache="c") == 2
    finally:
        bridge.finish()
