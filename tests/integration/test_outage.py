"""A cache outage loses nothing and needs no one (issue 12), with the stand-in cachix.

The outage is the stand-in's FAKE_CACHIX_DOWN_FILE: while that file exists every push
fails as an unreachable server would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.daemonproc import DaemonProcess, bridge, enqueue_all, wait_for
from tests.nixhelpers import Built, build, narinfo

pytestmark = [pytest.mark.integration, pytest.mark.nix]

MAX_ATTEMPTS = 3
BACKOFF_MAX = 2.0
OUTAGE_SECONDS = 40.0  # longer than MAX_ATTEMPTS x BACKOFF_MAX, many times over
PUSH = (
    f"[push]\nmax_attempts = {MAX_ATTEMPTS}\nbackoff_initial_seconds = 0.5\n"
    f"backoff_max_seconds = {BACKOFF_MAX}\n"
)


def cachix_config(tmp_path: Path) -> str:
    token = tmp_path / "token"
    token.write_text("outage-token\n")
    return f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{token}"\n'


def pushes(tmp_path: Path) -> list[dict[str, object]]:
    """Invocations of the stand-in cachix so far."""
    log = tmp_path / "cachix-calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def status_text(daemon: DaemonProcess) -> str:
    done = bridge("status", "--config", str(daemon.config), env=daemon.env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def team(daemon: DaemonProcess) -> dict[str, object]:
    [entry] = [e for e in daemon.status()["caches"] if e["cache"] == "team"]
    return dict(entry)


def arrived(root: Path, items: list[Built]) -> int:
    return sum(narinfo(root / "team", item).is_file() for item in items)


def test_outage_loses_nothing_and_a_poison_path_is_still_found(
    daemon_factory: Callable[..., DaemonProcess],
    fake_cachix: Path,
    tmp_path: Path,
    workdir: Path,
) -> None:
    paths = build(workdir, 25, prefix="hcb-outage")
    first, second, (poison, *healthy) = paths[:10], paths[10:20], paths[20:]
    down = tmp_path / "cachix-down"
    daemon = daemon_factory(
        PUSH + cachix_config(tmp_path),
        env={"FAKE_CACHIX_DOWN_FILE": str(down), "FAKE_CACHIX_FAIL_PATHS": poison.hash},
    )
    assert daemon.metric("hydra_cachix_bridge_cache_up", cache="team") == 1

    down.touch()
    outage_started = time.monotonic()
    enqueue_all(daemon, tmp_path, first, first_id=1)
    wait_for(lambda: team(daemon)["state"] == "down", timeout=20, message="cache down")
    # The state is committed first, the gauge set after.
    daemon.wait_metric("hydra_cachix_bridge_cache_up", 0, cache="team")
    text = status_text(daemon)
    assert "team: DOWN since " in text and ", next try at " in text
    assert "last error: cachix push exited 1: " in text and "ConnectionFailure" in text
    time.sleep(OUTAGE_SECONDS / 2 - (time.monotonic() - outage_started))
    enqueue_all(daemon, tmp_path, second, first_id=11)
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage_started)))
    counts = daemon.counts("team")
    assert counts["dead"] == 0 and counts["pushed"] == 0
    assert counts["pending"] + counts["inflight"] == 20
    probes_during = len(pushes(tmp_path))
    down.unlink()
    recovered = time.monotonic()
    outage = recovered - outage_started

    wait_for(
        lambda: arrived(fake_cachix, first + second) == 20,
        timeout=BACKOFF_MAX + 10,
        interval=0.05,
        message="all 20 paths in the cache",
    )
    last_arrival = time.monotonic() - recovered
    assert daemon.counts("team")["dead"] == 0
    wait_for(lambda: team(daemon)["state"] == "up", message="cache up")
    # Committed, then the gauge set, then logged: wait for the log line.
    wait_for(lambda: "cache team is up again" in daemon.log(), message="recovery logged")
    assert daemon.metric("hydra_cachix_bridge_cache_up", cache="team") == 1
    assert daemon.metric("hydra_cachix_bridge_dead_letters_total", cache="team") == 0
    assert "team: up" in status_text(daemon)
    log = daemon.log()
    assert log.count("cache team is down:") == 1
    assert log.count("cache team is up again") == 1
    print(
        f"\noutage {outage:.1f}s (max_attempts={MAX_ATTEMPTS}, backoff_max_seconds="
        f"{BACKOFF_MAX}), {probes_during} cachix invocations during it, 0 dead letters, "
        f"last of 20 paths arrived {last_arrival:.1f}s after recovery"
    )

    # A poison path after recovery: the cache takes its batch-mates, so it is the path.
    enqueue_all(daemon, tmp_path, [poison, *healthy], first_id=21)
    wait_for(
        lambda: daemon.counts("team")["dead"] == 1 and arrived(fake_cachix, healthy) == 4,
        timeout=60,
        message="4 healthy arrived, poison dead-lettered",
    )
    [dead] = daemon.status()["dead_letters"]
    assert dead["path"] == poison.out and dead["attempts"] == MAX_ATTEMPTS
    assert not narinfo(fake_cachix / "team", poison).exists()
    wait_for(lambda: team(daemon)["state"] == "up", message="cache up after the poison")
    # A narinfo is written by cachix before the daemon records the push.
    wait_for(lambda: daemon.counts("team")["pushed"] == 24, message="24 marked pushed")
    counts = daemon.counts("team")
    assert counts["pushed"] == 24 and counts["pending"] == counts["inflight"] == 0


def test_restart_during_an_outage_keeps_the_cache_down(
    daemon_factory: Callable[..., DaemonProcess],
    fake_cachix: Path,
    tmp_path: Path,
    workdir: Path,
) -> None:
    items = build(workdir, 5, prefix="hcb-outage-restart")
    down = tmp_path / "cachix-down"
    down.touch()
    daemon = daemon_factory(
        PUSH + cachix_config(tmp_path), env={"FAKE_CACHIX_DOWN_FILE": str(down)}
    )
    enqueue_all(daemon, tmp_path, items)
    wait_for(lambda: team(daemon)["state"] == "down", timeout=20, message="cache down")
    time.sleep(3)
    assert daemon.terminate() == 0
    down_since = team(daemon)["down_since"]
    assert team(daemon)["state"] == "down"  # recorded, read without a daemon

    daemon.start()
    assert daemon.metric("hydra_cachix_bridge_cache_up", cache="team") == 0
    before = len(pushes(tmp_path))
    wait_for(lambda: len(pushes(tmp_path)) >= before + 5, timeout=30, message="5 more probes")
    entry = team(daemon)
    assert entry["state"] == "down" and entry["down_since"] == down_since
    counts = daemon.counts("team")
    assert counts["dead"] == 0 and counts["pushed"] == 0
    # No attempts spent by the probes after the restart (only the very first failure counts).
    assert "cache team is down since" in daemon.log()  # said once at start

    down.unlink()
    wait_for(lambda: arrived(fake_cachix, items) == 5, timeout=BACKOFF_MAX + 10, interval=0.05)
    wait_for(lambda: team(daemon)["state"] == "up", message="cache up")
    assert daemon.counts("team")["dead"] == 0
