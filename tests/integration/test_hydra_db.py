"""The daemon following a real PostgreSQL with Hydra's tables, pushing real Nix paths."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.daemonproc import DaemonProcess, bridge, wait_for
from tests.nixhelpers import Built, build, narinfo
from tests.pghelpers import HydraDatabase, hydra_db, postgres_server

__all__ = ["hydra_db", "postgres_server"]  # fixtures


def source_config(cache: Path, db: HydraDatabase) -> str:
    return (
        f'[caches.local]\nbackend = "nix-copy"\nuri = "file://{cache}"\n'
        '[[rules]]\njobs = ["proj:*:*"]\ncaches = ["local"]\nsources = ["hydra-db", "backfill"]\n'
        f'[hydra_db]\ndsn = "{db.bridge_dsn}"\npoll_seconds = 5\n'
    )


def add_builds(db: HydraDatabase, jobset: int, built: list[Built]) -> list[int]:
    return [
        db.queue_build(jobset, f"{item.name}.x86_64-linux", item.drv, [("out", item.out)])
        for item in built
    ]


def test_notification_to_push_with_real_nix_paths(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    hydra_db: HydraDatabase,
) -> None:
    cache = tmp_path / "cache"
    jobset = hydra_db.jobset("proj", "main")
    other = hydra_db.jobset("elsewhere", "main")
    built = build(workdir, 3)
    daemon = daemon_factory(source_config(cache, hydra_db))
    wait_for(lambda: daemon.metric("hydra_cachix_bridge_hydra_db_connected") == 1)
    ours = add_builds(hydra_db, jobset, built[:2])
    [theirs] = add_builds(hydra_db, other, built[2:])
    for build_id in [*ours, theirs]:
        hydra_db.finish_build(build_id)
    for item in built[:2]:
        text = wait_for(lambda item=item: narinfo(cache, item).is_file(), message=item.out)
        assert text
        assert f"StorePath: {item.out}" in narinfo(cache, item).read_text()
    wait_for(
        lambda: daemon.metric("hydra_cachix_bridge_events_received_total", source="hydra-db") == 3
    )
    assert not narinfo(cache, built[2]).exists()  # rule: only project proj
    # An event is counted received, then matched or ignored: wait for the last count.
    daemon.wait_metric("hydra_cachix_bridge_events_ignored_total", 1, reason="no_rule")
    status = daemon.status()
    assert status["hydra_db"]["state"] == "listening"
    assert status["hydra_db"]["checkpoint_stoptime"] is not None
    text = bridge("status", "--config", str(daemon.config), env=daemon.env).stdout
    assert "hydra database source: listening" in text
    assert daemon.terminate() == 0


def test_postgresql_restart_under_a_running_daemon_loses_and_duplicates_nothing(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    hydra_db: HydraDatabase,
) -> None:
    cache = tmp_path / "cache"
    jobset = hydra_db.jobset("proj", "main")
    built = build(workdir, 40)
    ids = add_builds(hydra_db, jobset, built)
    daemon = daemon_factory(source_config(cache, hydra_db))
    wait_for(lambda: daemon.metric("hydra_cachix_bridge_hydra_db_connected") == 1)
    finished: list[int] = []
    restarted = threading.Event()

    def hydra_finishes_builds() -> None:
        # Hydra keeps finishing builds; writes while the server is down are retried,
        # as the queue runner retries its transaction.
        for build_id in ids:
            while True:
                try:
                    hydra_db.finish_build(build_id)
                    break
                except Exception:
                    time.sleep(0.1)
            finished.append(build_id)
            time.sleep(0.05)

    writer = threading.Thread(target=hydra_finishes_builds)
    writer.start()
    wait_for(lambda: len(finished) >= 15, message="15 builds finished")
    before = daemon.metric("hydra_cachix_bridge_events_received_total", source="hydra-db")
    hydra_db.server.restart()
    restarted.set()
    writer.join(timeout=120)
    assert len(finished) == len(ids)
    wait_for(
        lambda: (
            daemon.metric("hydra_cachix_bridge_events_received_total", source="hydra-db")
            >= len(ids)
        ),
        timeout=90,
        message="every build recorded",
    )

    def state() -> str:
        status = bridge("status", "--json", "--config", str(daemon.config), env=daemon.env)
        return str(json.loads(status.stdout)["hydra_db"]["state"])

    # The catch-up after the reconnect says "listening" once it has recorded and counted
    # its last page.
    wait_for(lambda: state() == "listening", timeout=60, message="listening after the catch-up")
    time.sleep(1)  # a duplicate would show up now
    assert state() == "listening"
    total = daemon.metric("hydra_cachix_bridge_events_received_total", source="hydra-db")
    for item in built:
        wait_for(lambda item=item: narinfo(cache, item).is_file(), message=item.out)
    recorded = _recorded_builds(tmp_path)
    lost = len(ids) - len({*ids} & set(recorded))
    duplicated = len(recorded) - len(set(recorded))
    print(
        f"\nrestart figures: {int(before)} events before the restart, "
        f"{int(total - before)} after; {lost} lost, {duplicated} duplicated; "
        f"reconnects {int(daemon.metric('hydra_cachix_bridge_hydra_db_reconnects_total'))}"
    )
    assert total == len(ids) and lost == 0 and duplicated == 0
    assert daemon.metric("hydra_cachix_bridge_hydra_db_reconnects_total") >= 1
    assert daemon.metric("hydra_cachix_bridge_hydra_db_connected") == 1
    assert daemon.terminate() == 0


def _recorded_builds(tmp_path: Path, source: str = "hydra-db") -> list[int]:
    """Build ids of the events recorded with this source, duplicates included."""
    import sqlite3

    conn = sqlite3.connect(tmp_path / "state" / "queue.sqlite3")
    try:
        return [
            int(row[0])
            for row in conn.execute("SELECT build_id FROM events WHERE source = ?", (source,))
        ]
    finally:
        conn.close()


def test_backfill_dry_run_then_record_then_rerun(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    hydra_db: HydraDatabase,
) -> None:
    cache = tmp_path / "cache"
    jobset = hydra_db.jobset("proj", "main")
    built = build(workdir, 4)
    ids = add_builds(hydra_db, jobset, built)
    old_eval = hydra_db.add_eval(jobset, ids[:1])
    latest = hydra_db.add_eval(jobset, ids[1:])
    for build_id in ids:
        hydra_db.finish_build(build_id, notify=False)
    hydra_db.finish_build(ids[3], status=1, notify=False)  # a failure: no rule pushes it
    daemon = daemon_factory(source_config(cache, hydra_db), start=False)
    env = daemon.env
    config = str(daemon.config)

    dry = bridge("backfill", "--config", config, "--jobset", "proj:main", "--latest", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"proj:main evaluation {latest}: 3 finished build(s); would record 3" in dry.stdout
    assert "local: 2 build(s), 2 path(s)" in dry.stdout
    assert "1 match no cache: status_filtered" in dry.stdout
    database = tmp_path / "state" / "queue.sqlite3"
    assert not database.exists() or not _recorded_builds(tmp_path, "backfill")

    done = bridge("backfill", "--config", config, "--jobset", "proj:main", "--latest", env=env)
    assert done.returncode == 0, done.stderr
    assert "recorded 3 as events (source backfill)" in done.stdout
    again = bridge("backfill", "--config", config, "--jobset", "proj:main", "--latest", env=env)
    assert "recorded 0 as events" in again.stdout and "3 skipped" in again.stdout
    assert sorted(_recorded_builds(tmp_path, "backfill")) == sorted(ids[1:])

    one = bridge(
        "backfill", "--config", config, "--jobset", "proj:main", "--eval", str(old_eval), env=env
    )
    assert "recorded 1 as events" in one.stdout, one.stdout + one.stderr
    since = bridge(
        "backfill", "--config", config, "--jobset", "proj:main", "--since", "2000-01-01", env=env
    )
    assert "4 finished build(s); recorded 0" in since.stdout, since.stdout

    # The daemon pushes what backfill recorded.
    daemon.start()
    for item in built[:3]:
        wait_for(lambda item=item: narinfo(cache, item).is_file(), message=item.out)
    assert not narinfo(cache, built[3]).exists()
    assert daemon.terminate() == 0

    for args, message in (
        (["--jobset", "nope:main", "--latest"], "Hydra has no jobset nope:main"),
        (["--jobset", "proj:main", "--eval", "99999"], "evaluation 99999 does not exist"),
        (["--jobset", "proj:main"], "give --eval ID, --latest or --since DATE"),
        (["--jobset", "projmain", "--latest"], "--jobset must be PROJECT:JOBSET"),
    ):
        failed = bridge("backfill", "--config", config, *args, env=env)
        assert failed.returncode != 0 and message in failed.stderr, failed.stderr
