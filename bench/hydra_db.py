"""Benchmark scenarios of the Hydra database source, on a real PostgreSQL 15 (bench/run.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from bridge.clock import SystemClock
from bridge.config import load_config
from bridge.hydradb import HydraReader, connect
from bridge.hydrasource import HydraDbSource
from bridge.hydrastate import HydraState
from bridge.intake import Intake
from bridge.statedb import StateDb
from exporter.metrics import BridgeMetrics, HydraDbMetrics
from tests.integration.daemonproc import configured, running, wait_for
from tests.pghelpers import HydraDatabase, PostgresServer


def _insert_finished(db: HydraDatabase, jobset: int, count: int, stop_from: int) -> None:
    """`count` finished builds with one output each, in a few set-based statements."""
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO builds (finished, timestamp, jobset_id, job, drvpath, system,"
            " starttime, stoptime, buildstatus, iscachedbuild)"
            " SELECT 1, %s, %s, 'job' || n, '/nix/store/' || lpad(n::text, 32, 'a')"
            " || '-bench-' || n || '.drv', 'x86_64-linux', %s + n / 100, %s + n / 100, 0, 0"
            " FROM generate_series(1, %s) AS n",
            (stop_from, jobset, stop_from, stop_from, count),
        )
        conn.execute(
            "INSERT INTO buildoutputs (build, name, path)"
            " SELECT id, 'out', '/nix/store/' || lpad(id::text, 32, 'b') || '-bench-' || id"
            " FROM builds WHERE jobset_id = %s",
            (jobset,),
        )
        conn.execute("ANALYZE")


def _metrics() -> tuple[BridgeMetrics, HydraDbMetrics]:
    registry = CollectorRegistry()
    metrics = BridgeMetrics(
        registry,
        version="bench",
        caches={"instant": "cachix"},
    )
    return metrics, HydraDbMetrics(registry)


def catch_up_rate(work: Path, builds: int, instant_cache: str) -> tuple[float, float, int]:
    """Catch-up of `builds` finished builds into the queue: (seconds, builds/s, events)."""
    server = PostgresServer()
    server.start()
    try:
        db = server.create_hydra_database()
        jobset = db.jobset("bench", "main")
        stop_from = int(time.time()) - 86400
        _insert_finished(db, jobset, builds, stop_from)
        config_path = work / "bridge.toml"
        config_path.write_text(
            f'state_dir = "{work / "state"}"\n{instant_cache}'
            f'[hydra_db]\ndsn = "{db.bridge_dsn}"\noverlap_seconds = 0\n'
        )
        config = load_config(config_path)
        assert config.hydra_db is not None
        queue = StateDb(config.database_path)
        state = HydraState(queue.conn)
        state.ensure_schema()
        with queue.transaction():
            state.advance((stop_from - 1, 0), time.time())
        metrics, db_metrics = _metrics()
        source = HydraDbSource(
            config,
            queue,
            Intake(config.rules, metrics, SystemClock()),
            db_metrics,
            SystemClock(),
            stop=threading.Event(),
        )
        conn = connect(config.hydra_db)
        try:
            started = time.perf_counter()
            recorded = source.catch_up(HydraReader(conn))
            seconds = time.perf_counter() - started
        finally:
            conn.close()
            queue.close()
        return seconds, builds / seconds, recorded
    finally:
        server.destroy()


def notification_latency(
    work: Path,
    rate: int,
    seconds: float,
    stamp_backend: str,
) -> list[float]:
    """Seconds from Hydra's NOTIFY to the push process starting, per build."""
    server = PostgresServer()
    server.start()
    try:
        db = server.create_hydra_database()
        jobset = db.jobset("bench", "main")
        total = max(1, int(rate * seconds))
        with db.connect() as conn:
            ids = [
                db.queue_build(
                    jobset,
                    f"job{n}",
                    f"/nix/store/{n:032d}-lat-{n}.drv".replace("0", "c"),
                    [("out", f"/nix/store/{n:032d}-lat-{n}".replace("0", "d"))],
                    conn=conn,
                )
                for n in range(total)
            ]
        stamps = work / "stamps"
        backend = work / "stamp-backend"
        backend.write_text(stamp_backend)
        backend.chmod(0o755)
        body = (
            f'[caches.instant]\nbackend = "cachix"\nexecutable = "{backend}"\n'
            f'[hydra_db]\ndsn = "{db.bridge_dsn}"\n'
        )
        notified: dict[str, float] = {}
        daemon = configured(work, body, env={"STAMPS": str(stamps)})
        with running(daemon, 600, notify_ready=True), db.connect() as conn:
            time.sleep(1.0)  # the source connects and catches up after READY
            interval = 1.0 / rate
            started = time.monotonic()
            for index, build_id in enumerate(ids):
                due = started + index * interval
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                conn.execute(
                    "UPDATE builds SET finished = 1, buildstatus = 0, starttime = %s,"
                    " stoptime = %s WHERE id = %s",
                    (int(time.time()), int(time.time()), build_id),
                )
                path = f"/nix/store/{index:032d}-lat-{index}".replace("0", "d")
                notified[path] = time.time()
                conn.execute("SELECT pg_notify('build_finished', %s)", (str(build_id),))
            wait_for(
                lambda: stamps.exists() and stamps.read_text().count("\n") >= total,
                120,
                message="every notified build at the backend",
            )
        latencies = []
        for line in stamps.read_text().splitlines():
            when, path = line.split(" ", 1)
            latencies.append(float(when) - notified[path])
        return latencies
    finally:
        server.destroy()
