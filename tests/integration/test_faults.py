"""Retries, timeouts, bisection, dead letters, `retry`, SIGKILL and SIGTERM, with real pushes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.daemonproc import DaemonProcess, bridge, enqueue_all, wait_for
from tests.nixhelpers import build, hydra_payload, narinfo
from tests.processes import live_processes

PUSH = "[push]\nbackoff_initial_seconds = 0.2\nbackoff_max_seconds = 0.5\n"


def cachix_cache(name: str = "team", token: Path | None = None) -> str:
    """Config of one cachix cache with a token file."""
    return f'[caches.{name}]\nbackend = "cachix"\nauth_token_file = "{token}"\n'


def calls(tmp_path: Path) -> list[dict[str, object]]:
    """Invocations of the stand-in cachix, from its log."""
    log = tmp_path / "cachix-calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("secret-token\n")
    return path


def test_transient_failures_are_retried_until_pushed(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
) -> None:
    daemon = daemon_factory(
        PUSH + cachix_cache(token=token_file(tmp_path)),
        env={"FAKE_CACHIX_FAIL_COUNT_FILE": str(tmp_path / "fails"), "FAKE_CACHIX_FAIL_TIMES": "2"},
    )
    items = build(workdir, 2)
    enqueue_all(daemon, tmp_path, items)
    for item in items:
        wait_for(
            lambda item=item: narinfo(fake_cachix / "team", item).is_file(),
            message="push after retries",
        )
    # cachix wrote the narinfo; the daemon records the push once cachix has exited.
    wait_for(lambda: daemon.counts("team").get("pushed") == 2, message="both marked pushed")
    assert (
        daemon.metric("hydra_cachix_bridge_pushes_failed_total", cache="team", reason="exit_status")
        >= 2
    )
    assert daemon.metric("hydra_cachix_bridge_retries_total", cache="team") >= 2
    assert daemon.metric("hydra_cachix_bridge_dead_letters_total", cache="team") == 0
    assert daemon.metric("hydra_cachix_bridge_last_failure_timestamp_seconds", cache="team") > 0


def test_poison_path_is_isolated_by_bisection_and_dead_lettered_then_retried(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
) -> None:
    items = build(workdir, 6)
    poison = items[3]
    daemon = daemon_factory(
        PUSH
        + "max_attempts = 2\nbatch_size = 8\nworkers = 1\n"
        + cachix_cache(token=token_file(tmp_path)),
        env={"FAKE_CACHIX_FAIL_PATHS": poison.name},
    )
    # Everything is in the spool before the daemon starts again, so the first push is one batch.
    assert daemon.terminate() == 0
    enqueue_all(daemon, tmp_path, items)
    daemon.start()
    wait_for(
        lambda: daemon.counts("team").get("pushed") == 5 and daemon.counts("team").get("dead") == 1,
        message="five pushed, one dead-lettered",
    )
    counts = daemon.counts("team")
    assert counts["dead"] == 1 and counts["pending"] == 0 and counts["inflight"] == 0
    for item in items:
        assert narinfo(fake_cachix / "team", item).is_file() == (item is not poison)
    first = calls(tmp_path)[0]
    assert len(first["paths"]) == 6  # one batch of all six at first, then split
    dead = daemon.status()["dead_letters"]
    assert [d["path"] for d in dead] == [poison.out]
    assert "exited 1" in dead[0]["error"] and dead[0]["attempts"] >= 2
    # Counted once the dead letter is committed.
    daemon.wait_metric("hydra_cachix_bridge_dead_letters_total", 1, cache="team")

    # The operator fixes the cause (here: restart without the fault) and retries.
    assert daemon.terminate() == 0
    daemon.env.pop("FAKE_CACHIX_FAIL_PATHS")
    daemon.start()
    done = bridge("retry", "--config", str(daemon.config), str(dead[0]["id"]), env=daemon.env)
    assert done.returncode == 0, done.stderr
    assert "1 dead-lettered path(s) queued again" in done.stdout
    wait_for(lambda: narinfo(fake_cachix / "team", poison).is_file(), message="retried push")
    wait_for(lambda: daemon.counts("team").get("pushed") == 6, message="retried push recorded")
    assert daemon.counts("team")["dead"] == 0


def test_hung_push_is_killed_with_its_process_group_at_timeout(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
) -> None:
    daemon = daemon_factory(
        PUSH + "timeout_seconds = 2\nmax_attempts = 1\n" + cachix_cache(token=token_file(tmp_path)),
        env={"FAKE_CACHIX_HANG": "1"},
    )
    (item,) = build(workdir, 1)
    enqueue_all(daemon, tmp_path, [item])
    wait_for(lambda: daemon.counts("team").get("dead") == 1, timeout=60, message="dead letter")
    # The daemon commits the dead letter first and counts the failed push after.
    daemon.wait_metric("hydra_cachix_bridge_pushes_failed_total", 1, cache="team", reason="timeout")
    assert "timed out" in daemon.status()["dead_letters"][0]["error"]
    # Neither the hung cachix nor the `sleep` child it started survives.
    leftovers = live_processes(
        f"FAKE_CACHIX_ROOT={fake_cachix}",
        exclude=[daemon.proc.pid],  # type: ignore[union-attr]
    )
    assert leftovers == {}


def test_sigkill_mid_push_loses_nothing(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
) -> None:
    items = build(workdir, 8)
    daemon = daemon_factory(
        "[push]\nbatch_size = 2\nworkers = 2\n" + cachix_cache(token=token_file(tmp_path)),
        env={"FAKE_CACHIX_SLEEP": "1.5"},
    )
    enqueue_all(daemon, tmp_path, items)
    wait_for(lambda: daemon.counts("team").get("inflight", 0) > 0, message="a push in flight")
    daemon.kill()
    before = daemon.counts("team")
    assert before["inflight"] > 0 and before["pushed"] < 8
    daemon.env.pop("FAKE_CACHIX_SLEEP")
    daemon.start()
    for item in items:
        wait_for(
            lambda item=item: narinfo(fake_cachix / "team", item).is_file(),
            message=f"{item.out} after restart",
        )
    wait_for(lambda: daemon.counts("team").get("pushed") == 8, message="all marked pushed")
    counts = daemon.counts("team")
    assert counts["pushed"] == 8 and counts["inflight"] == 0 and counts["pending"] == 0
    assert "in flight when the last run stopped" in daemon.log()


def test_sigterm_lets_running_push_finish_and_keeps_the_rest(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
) -> None:
    items = build(workdir, 4)
    daemon = daemon_factory(
        "[push]\nbatch_size = 1\nworkers = 1\nshutdown_grace_seconds = 20\n"
        + cachix_cache(token=token_file(tmp_path)),
        env={"FAKE_CACHIX_SLEEP": "2"},
    )
    enqueue_all(daemon, tmp_path, items)
    wait_for(lambda: daemon.counts("team").get("inflight", 0) == 1, message="a push in flight")
    started = time.monotonic()
    assert daemon.terminate() == 0
    assert time.monotonic() - started < 20
    counts = daemon.counts("team")
    # The running push finished (nothing is left in flight); the rest waits for the next start.
    assert counts["inflight"] == 0
    assert counts["pushed"] >= 1 and counts["pushed"] + counts["pending"] == 4
    assert all(call["exit"] == 0 for call in calls(tmp_path))
    daemon.env.pop("FAKE_CACHIX_SLEEP")
    daemon.start()
    wait_for(lambda: daemon.counts("team")["pushed"] == 4, message="all pushed after restart")


def test_sigterm_past_grace_kills_the_push_and_leaves_it_pending(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
) -> None:
    (item,) = build(workdir, 1)
    daemon = daemon_factory(
        "[push]\nshutdown_grace_seconds = 1\n" + cachix_cache(token=token_file(tmp_path)),
        env={"FAKE_CACHIX_HANG": "1"},
    )
    enqueue_all(daemon, tmp_path, [item])
    wait_for(lambda: daemon.counts("team").get("inflight", 0) == 1, message="a push in flight")
    started = time.monotonic()
    assert daemon.terminate() == 0
    assert time.monotonic() - started < 15
    counts = daemon.counts("team")
    assert counts["pending"] == 1 and counts["dead"] == 0
    assert "cancelled at shutdown" in daemon.log()


@pytest.mark.nix
def test_garbage_collected_path_is_skipped_not_retried(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
) -> None:
    cache = tmp_path / "cache"
    daemon = daemon_factory(f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{cache}"\n')
    (item,) = build(workdir, 1)
    # Garbage-collected after its build: the payload is genuine (its output is one of its
    # drvPath's, as the daemon checks), the path no longer valid.
    subprocess.run(
        ["nix-store", "--delete", item.out], capture_output=True, check=True, timeout=120
    )
    payload = hydra_payload(9, item)
    path = tmp_path / "ghost.json"
    path.write_text(json.dumps(payload))
    assert (
        bridge(
            "enqueue-hydra",
            "--config",
            str(daemon.config),
            "--json-file",
            str(path),
            env=daemon.env,
        ).returncode
        == 0
    )
    wait_for(lambda: daemon.counts("c").get("skipped") == 1, message="skipped")
    # Committed first, counted after: wait for the counts.
    daemon.wait_metric(
        "hydra_cachix_bridge_paths_skipped_total", 1, cache="c", reason="invalid_path"
    )
    # The failed push revealed the missing path; it is never tried again.
    daemon.wait_metric(
        "hydra_cachix_bridge_pushes_failed_total", 1, cache="c", reason="invalid_path"
    )
    time.sleep(1)
    assert daemon.metric("hydra_cachix_bridge_pushes_started_total", cache="c") == 1
    assert daemon.counts("c")["pending"] == 0


def test_spool_directory_removed_is_noticed_and_restored(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
) -> None:
    cache = tmp_path / "cache"
    daemon = daemon_factory(f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{cache}"\n')
    incoming = tmp_path / "state" / "spool" / "incoming"
    incoming.rename(tmp_path / "moved-away")
    wait_for(lambda: daemon.health()[0] == 200 and incoming.is_dir(), message="watch restored")
    assert "spool watch" in daemon.log()
    (item,) = build(workdir, 1)
    enqueue_all(daemon, tmp_path, [item])
    wait_for(lambda: narinfo(cache, item).is_file(), message="push after restore")
    os.kill(daemon.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
