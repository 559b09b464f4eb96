"""SIGTERM during heavy pushing: a clean, bounded exit that loses nothing and leaves no push.

Three SIGTERM cycles while four workers push slow batches to the stand-in Cachix (each push
finishes within the grace period), then a case where the pushes outlive the grace period
and are killed. Randomness is only in when SIGTERM comes; its seed is printed and can be
fixed with RELIABILITY_SEED.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.events import hydra_envelope
from bridge.spool import SpoolLayout, write_event
from tests.integration.daemonproc import DaemonProcess, wait_for
from tests.nixhelpers import Built, build, hydra_payload
from tests.processes import live_processes, process_state
from tests.reliability.reporting import query, write_report

KILL_GRACE_SECONDS = 5.0  # bridge.process: SIGTERM to the push's group, then SIGKILL after this
EXIT_MARGIN_SECONDS = 3.0


def states(db: Path) -> dict[str, int]:
    """Item count per state."""
    counts = dict.fromkeys(("pending", "inflight", "pushed", "skipped", "dead"), 0)
    counts.update(dict(query(db, "SELECT state, COUNT(*) FROM items GROUP BY state")))
    return counts


def push_processes(root: Path) -> list[str]:
    """Live processes of this test's stand-in cachix (and the nix commands it runs)."""
    found = live_processes(f"FAKE_CACHIX_ROOT={root}")
    return [f"{pid} {process_state(pid)} {cmdline[:200]}" for pid, cmdline in found.items()]


def narinfo(cache_dir: Path, path: str) -> Path:
    return cache_dir / f"{Path(path).name.split('-', 1)[0]}.narinfo"


def enqueue(layout: SpoolLayout, items: list[Built]) -> None:
    """One Hydra event per path, straight into the spool."""
    for build_id, item in enumerate(items, 1):
        write_event(layout, "hydra", hydra_envelope(hydra_payload(build_id, item), time.time()))


def cachix_calls(tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "cachix-calls.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def token_config(tmp_path: Path) -> str:
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    return f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{token}"\n'


PATHS = 120
CYCLES = 3
GRACE = 5.0
SLOW_PUSH = "0.8"


@pytest.mark.timing
def test_sigterm_during_heavy_pushing_exits_cleanly_and_resumes(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    nix_available: None,
) -> None:
    seed = int(os.environ.get("RELIABILITY_SEED") or time.time_ns() % 1_000_000_007)
    print(f"\ngraceful shutdown: seed {seed} (set RELIABILITY_SEED={seed} to repeat)")
    timing = random.Random(seed)
    started = time.monotonic()
    items = build(workdir, PATHS, prefix="sigterm")
    daemon = daemon_factory(
        f"[push]\nworkers = 4\nbatch_size = 2\nshutdown_grace_seconds = {GRACE}\n"
        "backoff_initial_seconds = 0.2\nbackoff_max_seconds = 1\n" + token_config(tmp_path),
        env={"FAKE_CACHIX_SLEEP": SLOW_PUSH},
    )
    db = tmp_path / "state" / "queue.sqlite3"
    layout = SpoolLayout(tmp_path / "state" / "spool")
    enqueue(layout, items)
    cache_dir = fake_cachix / "team"
    all_paths = {item.out for item in items}
    cycles: list[dict[str, Any]] = []

    for cycle in range(1, CYCLES + 1):
        wait_for(lambda: states(db)["inflight"] >= 4, timeout=30, message="four pushes running")
        time.sleep(timing.uniform(0.2, 1.5))
        before = states(db)
        assert before["inflight"] > 0 and before["pending"] > 0, before
        assert daemon.proc is not None
        sent = time.monotonic()
        code = daemon.terminate(timeout=GRACE + 30)
        took = time.monotonic() - sent
        after = states(db)
        leftovers = push_processes(fake_cachix)
        pushed = {p for (p,) in query(db, "SELECT path FROM items WHERE state = 'pushed'")}
        arrived = {p for p in all_paths if narinfo(cache_dir, p).is_file()}
        cycles.append(
            {"cycle": cycle, "exit_seconds": round(took, 2), "before": before, "after": after}
        )
        print(
            f"graceful shutdown: cycle {cycle}: exit {code} after {took:.2f}s, "
            f"before {before}, after {after}"
        )
        assert code == 0, daemon.log()[-2000:]
        assert took <= GRACE + EXIT_MARGIN_SECONDS
        assert after["inflight"] == 0
        assert after["pushed"] + after["pending"] == PATHS, after
        assert after["dead"] == after["skipped"] == 0
        assert leftovers == [], f"push processes left running: {leftovers}"
        # Every push that ran finished within the grace period and its result was recorded.
        assert pushed == arrived, (
            f"in the cache but not recorded: {sorted(arrived - pushed)[:5]}; "
            f"recorded but not in the cache: {sorted(pushed - arrived)[:5]}"
        )
        assert all(call["exit"] == 0 for call in cachix_calls(tmp_path))
        assert query(db, "SELECT COUNT(*) FROM items WHERE attempts > 0")[0][0] == 0
        if cycle < CYCLES:
            daemon.start()

    log = daemon.log()
    assert "killing running pushes" not in log and "cancelled at shutdown" not in log
    daemon.env["FAKE_CACHIX_SLEEP"] = "0.05"
    daemon.start()
    wait_for(lambda: states(db)["pushed"] == PATHS, timeout=60, message="everything pushed")
    assert all(narinfo(cache_dir, p).is_file() for p in all_paths)
    assert daemon.metric("hydra_cachix_bridge_retries_total") == 0
    assert daemon.metric("hydra_cachix_bridge_pushes_failed_total") == 0
    duration = time.monotonic() - started
    print(
        f"graceful shutdown: {CYCLES} SIGTERM cycles, exit times "
        f"{[c['exit_seconds'] for c in cycles]} s (grace {GRACE:.0f}s), {PATHS} paths pushed "
        f"after restart, seed={seed}, duration={duration:.1f}s"
    )
    write_report(
        "graceful_shutdown.json",
        {
            "paths": PATHS,
            "grace_seconds": GRACE,
            "push_sleep_seconds": float(SLOW_PUSH),
            "cycles": cycles,
            "seed": seed,
            "duration_seconds": round(duration, 1),
        },
    )


SHORT_GRACE = 2.0
HUNG_PUSH = "60"  # far longer than the grace period


def test_sigterm_when_pushes_outlive_the_grace_period(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    nix_available: None,
) -> None:
    items = build(workdir, 8, prefix="sigterm-late")
    daemon = daemon_factory(
        f"[push]\nworkers = 4\nbatch_size = 1\nshutdown_grace_seconds = {SHORT_GRACE}\n"
        + token_config(tmp_path),
        env={"FAKE_CACHIX_SLEEP": HUNG_PUSH},
    )
    db = tmp_path / "state" / "queue.sqlite3"
    enqueue(SpoolLayout(tmp_path / "state" / "spool"), items)
    # A worker marks its item inflight before it starts cachix: wait for the processes.
    wait_for(lambda: states(db)["inflight"] == 4, timeout=30, message="four pushes claimed")
    wait_for(
        lambda: len(push_processes(fake_cachix)) >= 4, timeout=30, message="four pushes running"
    )
    sent = time.monotonic()
    code = daemon.terminate(timeout=60)
    took = time.monotonic() - sent
    after = states(db)
    rows = query(db, "SELECT attempts, last_error FROM items")
    leftovers = push_processes(fake_cachix)
    print(
        f"\ngraceful shutdown past grace: exit {code} after {took:.2f}s "
        f"(grace {SHORT_GRACE:.0f}s), after {after}"
    )
    assert code == 0, daemon.log()[-2000:]
    assert took <= SHORT_GRACE + KILL_GRACE_SECONDS + EXIT_MARGIN_SECONDS
    assert after["pending"] == 8 and after["inflight"] == 0 and after["dead"] == 0
    # Killed at shutdown is not a failure: no attempt counted, no error recorded.
    assert rows == [(0, None)] * 8, rows
    assert leftovers == [], f"push processes left running: {leftovers}"
    assert not any(narinfo(fake_cachix / "team", item.out).is_file() for item in items)
    log = daemon.log()
    assert "killing running pushes" in log and "cancelled at shutdown" in log

    daemon.env.pop("FAKE_CACHIX_SLEEP")
    daemon.start()
    wait_for(lambda: states(db)["pushed"] == 8, timeout=60, message="pushed after restart")
    assert daemon.metric("hydra_cachix_bridge_retries_total") == 0
    assert daemon.metric("hydra_cachix_bridge_pushes_failed_total") == 0
    assert query(db, "SELECT MAX(attempts) FROM items")[0][0] == 0
    write_report(
        "graceful_shutdown_past_grace.json",
        {
            "grace_seconds": SHORT_GRACE,
            "push_sleep_seconds": float(HUNG_PUSH),
            "exit_seconds": round(took, 2),
            "pushes_killed": 4,
        },
    )


BURST_FILES = 6000
BURST_PATHS = 60


@pytest.mark.timing
def test_sigterm_during_an_ingest_burst_stops_claims_at_once(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    nix_available: None,
) -> None:
    """SIGTERM while the daemon reads a large backlog of event files and pushes meanwhile.

    The ingest pass that is running is allowed to finish (its files are committed or left
    for the next start), but no push may start once the daemon has said it is stopping.
    """
    items = build(workdir, BURST_PATHS, prefix="sigterm-burst")
    daemon = daemon_factory(
        "[push]\nworkers = 4\nbatch_size = 1\nshutdown_grace_seconds = 5\n" + token_config(tmp_path)
    )
    db = tmp_path / "state" / "queue.sqlite3"
    layout = SpoolLayout(tmp_path / "state" / "spool")
    # Hook events with an empty OUT_PATHS (the daemon reads each .drv), prepared in tmp/ and
    # renamed in all at once, as after a burst of builds.
    names = [f"burst-{i:05d}.json" for i in range(BURST_FILES)]
    for i, name in enumerate(names):
        item = items[i % BURST_PATHS]
        document = {"version": 1, "kind": "hook", "drv_path": item.drv, "out_paths": ""}
        (layout.tmp / name).write_text(json.dumps(document))
    for name in names:
        os.rename(layout.tmp / name, layout.incoming / name)

    def mid_burst() -> bool:
        recorded = query(db, "SELECT COUNT(*) FROM events")[0][0]
        waiting = sum(1 for _ in os.scandir(layout.incoming))
        return recorded >= 1000 and waiting >= 2000 and states(db)["inflight"] > 0

    wait_for(mid_burst, timeout=30, interval=0.02, message="the daemon in the middle of the burst")
    sent = time.monotonic()
    code = daemon.terminate(timeout=60)
    took = time.monotonic() - sent
    after = states(db)
    recorded = query(db, "SELECT COUNT(*) FROM events")[0][0]
    waiting = sum(1 for _ in os.scandir(layout.incoming))
    leftovers = push_processes(fake_cachix)
    log = daemon.log().splitlines()
    stopping = max(n for n, line in enumerate(log) if "stopping: no new pushes" in line)
    late = [line for line in log[stopping:] if " bridge.worker: pushing " in line]
    print(
        f"\ngraceful shutdown mid-burst: exit {code} after {took:.2f}s, {recorded} events "
        f"recorded and {waiting} files waiting of {BURST_FILES}, items {after}, "
        f"{len(late)} push(es) started after 'stopping: no new pushes'"
    )
    assert code == 0
    assert after["inflight"] == 0 and after["pushed"] + after["pending"] == BURST_PATHS, after
    assert recorded + waiting == BURST_FILES  # nothing lost, nothing read twice
    assert leftovers == [], f"push processes left running: {leftovers}"

    daemon.start()
    wait_for(
        lambda: (
            query(db, "SELECT COUNT(*) FROM events")[0][0] == BURST_FILES
            and states(db)["pushed"] == BURST_PATHS
            # A file is unlinked once its event is committed: wait for that too.
            and not any(os.scandir(layout.incoming))
        ),
        timeout=60,
        message="the rest of the burst recorded and everything pushed after restart",
    )
    assert list(layout.incoming.iterdir()) == [] and list(layout.quarantine.iterdir()) == []

    # README: "On SIGTERM the daemon stops claiming work". Daemon.shutdown() sets
    # PushWorkers.stopping only after stopping the watcher and joining the ingest thread
    # (up to 10 s each), so workers go on claiming while the ingest pass finishes.
    assert late == [], (
        f"{len(late)} push(es) started after SIGTERM, once the daemon had logged "
        f"'stopping: no new pushes'; first: {late[0] if late else ''}"
    )
