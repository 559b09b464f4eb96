"""Backend faults end to end: the real daemon, the stand-in cachix and real nix-copy caches.

Each scenario ends in the right item state, with the right metric and log line: a push that
hangs (killed at its timeout with its whole process group), exits non-zero, dies by a
signal, cannot be spawned, floods its output, or fails for one path of a batch; and a cache
that is down never holds up another.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemonproc import DaemonProcess, bridge, enqueue_all, wait_for, write_hook
from tests.nixhelpers import Built, build, narinfo
from tests.processes import live_processes, process_state

pytestmark = pytest.mark.integration

FAST = "[push]\nbackoff_initial_seconds = 0.2\nbackoff_max_seconds = 0.5\n"
FAILED = "hydra_cachix_bridge_pushes_failed_total"
DEAD = "hydra_cachix_bridge_dead_letters_total"

# -- report -------------------------------------------------------------------------------


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "cachix-token"
    path.write_text("reliability-secret-token\n")
    return path


def cachix(name: str, token: Path, extra: str = "") -> str:
    return f'[caches.{name}]\nbackend = "cachix"\nauth_token_file = "{token}"\n{extra}'


def nix_copy(name: str, cache: Path) -> str:
    return f'[caches.{name}]\nbackend = "nix-copy"\nuri = "file://{cache}"\n'


def arrived(cache: Path, items: list[Built]) -> bool:
    return all(narinfo(cache, item).is_file() for item in items)


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def status_of(daemon: DaemonProcess) -> dict[str, Any]:
    return daemon.status()


def cache_entry(daemon: DaemonProcess, cache: str) -> dict[str, Any]:
    for entry in status_of(daemon)["caches"]:
        if entry["cache"] == cache:
            return dict(entry)
    raise AssertionError(f"no cache {cache} in status")


def calls(tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "cachix-calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# -- one cache down, the other keeps flowing ----------------------------------------------

TIMEOUT = 6


def test_hanging_cache_is_killed_at_timeout_and_never_delays_the_other_cache(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    token: Path,
    report: dict[str, Any],
) -> None:
    mirror = tmp_path / "mirror"
    daemon = daemon_factory(
        FAST
        + f"workers = 2\nbatch_size = 8\ntimeout_seconds = {TIMEOUT}\nmax_attempts = 3\n"
        + "shutdown_grace_seconds = 1\n"
        + cachix("team", token)
        + nix_copy("mirror", mirror),
        env={"FAKE_CACHIX_HANG": "1"},
    )
    assert daemon.proc is not None
    hook = write_hook(daemon, tmp_path)
    marker = f"FAKE_CACHIX_ROOT={fake_cachix}"
    exclude = {os.getpid(), daemon.proc.pid}

    started = time.monotonic()
    items = build(workdir, 4, hook=hook)  # the real hook records every build
    wait_for(
        lambda: arrived(mirror, items) and daemon.counts("mirror")["pushed"] == 4,
        timeout=TIMEOUT,
        message="mirror pushes",
    )
    report["mirror_complete_after_seconds"] = round(time.monotonic() - started, 2)
    # Everything reached the healthy cache before the broken one's first timeout.
    assert daemon.metric(FAILED, cache="team", reason="timeout") == 0
    assert daemon.counts("team")["inflight"] >= 1

    # The hung push: cachix and the `sleep` it started in its process group.
    hung = wait_for(
        lambda: (
            procs
            if len(procs := live_processes(marker, exclude)) >= 2
            and any("sleep" in c for c in procs.values())
            else None
        ),
        message="the hung cachix and its child",
    )
    report["hung_processes"] = sorted(hung.values())
    wait_for(
        lambda: daemon.metric(FAILED, cache="team", reason="timeout") >= 1,
        timeout=TIMEOUT + 10,
        message="the first timeout",
    )
    wait_for(
        lambda: not any(process_state(pid) not in ("Z", "X") for pid in hung),
        timeout=3,
        message="the hung process group killed",
    )
    # The failed push is counted first and logged last.
    wait_for(
        lambda: "to team failed (timeout, attempt 1" in daemon.log(),
        message="the failed push logged",
    )
    log = daemon.log()
    assert "to team failed (timeout, attempt 1" in log
    assert f"cachix push timed out after {TIMEOUT}s; process group killed" in log
    assert daemon.health()[0] == 200
    counts = daemon.counts("team")
    assert counts["pushed"] == 0 and counts["dead"] == 0
    assert counts["pending"] + counts["inflight"] == 4

    # Stopping kills the retry that hangs now; nothing of this test's cachix survives.
    assert daemon.terminate() == 0
    wait_for(
        lambda: not live_processes(marker, exclude),
        timeout=5,
        message="no cachix process left",
    )
    assert daemon.counts("team")["pending"] == 4


def test_always_failing_cache_is_down_and_waits_while_the_other_cache_receives_everything(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    token: Path,
    report: dict[str, Any],
) -> None:
    # Issue 12 changed this: a cache that fails every push is down, and its paths wait
    # with it (no attempts spent) instead of being dead-lettered.
    mirror = tmp_path / "mirror"
    daemon = daemon_factory(
        FAST
        + "workers = 2\nbatch_size = 8\nmax_attempts = 2\n"
        + cachix("team", token)
        + nix_copy("mirror", mirror),
        env={"FAKE_CACHIX_FAIL": "1"},
    )
    hook = write_hook(daemon, tmp_path)
    started = time.monotonic()
    items = build(workdir, 4, hook=hook)
    wait_for(
        lambda: arrived(mirror, items) and daemon.counts("mirror")["pushed"] == 4,
        timeout=TIMEOUT,
        message="mirror pushes",
    )
    report["mirror_complete_after_seconds"] = round(time.monotonic() - started, 2)
    wait_for(lambda: daemon.metric(FAILED, cache="team", reason="exit_status") >= 6)
    report["team_failed_pushes"] = daemon.metric(FAILED, cache="team", reason="exit_status")
    assert daemon.counts("mirror") == {
        "pending": 0,
        "inflight": 0,
        "pushed": 4,
        "skipped": 0,
        "dead": 0,
    }
    team = daemon.counts("team")
    assert team["pushed"] == team["dead"] == 0
    assert team["pending"] + team["inflight"] == 4
    assert daemon.metric(DEAD, cache="team") == 0
    assert daemon.metric(DEAD, cache="mirror") == 0
    assert daemon.metric("hydra_cachix_bridge_cache_up", cache="team") == 0
    assert daemon.metric("hydra_cachix_bridge_cache_up", cache="mirror") == 1
    assert daemon.metric(FAILED, cache="mirror") == 0
    log = daemon.log()
    assert "dead-lettered /nix/store/" not in log
    assert log.count("cache team is down:") == 1
    assert "to team failed (exit_status" in log
    [entry] = [c for c in status_of(daemon)["caches"] if c["cache"] == "team"]
    assert entry["state"] == "down"
    assert "cachix push exited 1" in entry["down_error"]
    assert "injected failure" in entry["down_error"]
    assert daemon.health()[0] == 200


# -- single faults ------------------------------------------------------------------------


def test_backend_killed_by_a_signal_is_counted_logged_and_dead_lettered(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    token: Path,
    report: dict[str, Any],
) -> None:
    # The cache first takes one path, so that a path that then crashes cachix every time is
    # the path's fault (issue 12: with no push succeeding at all, the cache would be down).
    (good, item) = build(workdir, 2)
    shim = tmp_path / "cachix-shim"
    shim.write_text(
        "#!/bin/sh\ninput=$(cat)\n"
        f'case "$input" in *{item.hash}*) export FAKE_CACHIX_CRASH=1 ;; esac\n'
        # exec with the paths on stdin, so that the signal ends this very process
        f'exec {fake_cachix.parent / "fake-bin" / "cachix"} "$@" <<EOF\n$input\nEOF\n'
    )
    shim.chmod(0o755)
    daemon = daemon_factory(
        FAST + "max_attempts = 2\n" + cachix("team", token, f'executable = "{shim}"\n')
    )
    enqueue_all(daemon, tmp_path, [good])
    wait_for(lambda: daemon.counts("team").get("pushed") == 1, message="first path pushed")
    enqueue_all(daemon, tmp_path, [item], first_id=2)
    wait_for(lambda: daemon.counts("team").get("dead") == 1, message="dead letter")
    # The worker commits the dead letter, then counts the failure, and logs it last.
    wait_for(lambda: f"dead-lettered {item.out} for team" in daemon.log(), message="its log")
    assert daemon.metric(FAILED, cache="team", reason="signal") == 2
    assert daemon.metric(FAILED, cache="team", reason="exit_status") == 0
    assert daemon.metric("hydra_cachix_bridge_retries_total", cache="team") == 1
    assert daemon.metric(DEAD, cache="team") == 1
    lines = [line for line in daemon.log().splitlines() if "killed by SIGSEGV" in line]
    report["log_lines"] = lines
    assert any("to team failed (signal, attempt 2)" in line for line in lines), daemon.log()
    (dead,) = status_of(daemon)["dead_letters"]
    assert dead["path"] == item.out and dead["reason"] == "signal"
    assert "cachix push killed by SIGSEGV" in dead["error"]
    crashes = [c["exit"] for c in calls(tmp_path) if item.out in c["paths"]]
    assert crashes == [-11, -11]
    assert not narinfo(fake_cachix / "team", item).is_file()
    assert daemon.health()[0] == 200


def test_missing_backend_executable_is_a_spawn_error_and_the_daemon_stays_healthy(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    token: Path,
    report: dict[str, Any],
) -> None:
    mirror = tmp_path / "mirror"
    daemon = daemon_factory(
        FAST
        + "max_attempts = 2\n"
        + cachix("team", token, 'executable = "/nonexistent/cachix"\n')
        + nix_copy("mirror", mirror)
    )
    items = build(workdir, 2)
    enqueue_all(daemon, tmp_path, items[:1])
    # Issue 12: every push fails, so the cache is down and the path waits (not dead).
    wait_for(lambda: daemon.metric(FAILED, cache="team", reason="spawn_error") >= 2)
    assert daemon.metric(DEAD, cache="team") == 0
    assert daemon.counts("team")["dead"] == 0
    [entry] = [c for c in status_of(daemon)["caches"] if c["cache"] == "team"]
    report["down_error"] = entry["down_error"]
    assert entry["state"] == "down"
    assert entry["down_error"] == "/nonexistent/cachix: No such file or directory"
    assert "to team failed (spawn_error, attempt 1): /nonexistent/cachix" in daemon.log()
    text = bridge("status", "--config", str(daemon.config), env=daemon.env)
    assert text.returncode == 0 and "/nonexistent/cachix: No such file or directory" in text.stdout
    # Healthy, and the other cache still works, before and after.
    assert daemon.health()[0] == 200
    wait_for(lambda: arrived(mirror, items[:1]), message="the other cache works")
    enqueue_all(daemon, tmp_path, items[1:], first_id=2)
    wait_for(lambda: arrived(mirror, items), message="the other cache keeps working")
    assert not daemon.proc_exited()


def test_megabytes_of_backend_output_neither_bloat_the_daemon_nor_the_stored_error(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    token: Path,
    report: dict[str, Any],
) -> None:
    spam = 5_000_000
    daemon = daemon_factory(
        FAST + "max_attempts = 3\n" + cachix("team", token),
        env={
            "FAKE_CACHIX_SPAM_BYTES": str(spam),
            # The first push fails after its spam (so an error is stored), the second succeeds.
            "FAKE_CACHIX_FAIL_COUNT_FILE": str(tmp_path / "fail-count"),
            "FAKE_CACHIX_FAIL_TIMES": "1",
        },
    )
    assert daemon.proc is not None
    pid = daemon.proc.pid
    (item,) = build(workdir, 1)
    # Warm up code paths (ingest, a push, metrics) so the baseline is a working daemon.
    daemon.metrics_text()
    before = vm_kib(pid, "VmHWM")
    enqueue_all(daemon, tmp_path, [item])
    wait_for(lambda: daemon.counts("team").get("pushed") == 1, message="pushed despite spam")
    after = vm_kib(pid, "VmHWM")
    report["peak_rss_kib_before_after"] = [before, after]
    assert narinfo(fake_cachix / "team", item).is_file()
    assert [c["exit"] for c in calls(tmp_path)] == [1, 0]
    assert daemon.metric(FAILED, cache="team", reason="exit_status") == 1
    assert daemon.metric("hydra_cachix_bridge_pushes_succeeded_total", cache="team") == 1
    # Twice 5 MB went through the daemon's hands: its peak RSS must not grow by that much.
    assert (after - before) * 1024 < spam, f"peak RSS grew by {after - before} KiB"

    entry = cache_entry(daemon, "team")
    error = entry["last_error"]
    report["stored_error_chars"] = len(error)
    assert "cachix push exited 1" in error and "injected failure" in error
    assert len(error) <= 2000, f"stored error is {len(error)} characters"
    raw = bridge("status", "--json", "--config", str(daemon.config), env=daemon.env).stdout
    assert len(raw) < 20_000
    log_size = daemon.log_file.stat().st_size
    report["daemon_log_bytes"] = log_size
    assert log_size < 200_000, f"daemon log is {log_size} bytes"


def test_one_poisoned_path_in_a_hook_batch_is_isolated_and_the_rest_arrive(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    token: Path,
    report: dict[str, Any],
) -> None:
    mirror = tmp_path / "mirror"
    poison_tag = "poisoned"
    daemon = daemon_factory(
        FAST
        + "workers = 2\nbatch_size = 8\nmax_attempts = 2\n"
        + cachix("team", token)
        + nix_copy("mirror", mirror),
        env={"FAKE_CACHIX_FAIL_PATHS": poison_tag},
    )
    hook = write_hook(daemon, tmp_path)
    # Stopped while the builds run, so all six events are queued at once: one batch.
    assert daemon.terminate() == 0
    good = build(workdir, 5, hook=hook)
    (poison,) = build(workdir, 1, prefix=f"hcb-{poison_tag}", hook=hook)
    daemon.start()
    # Isolating it takes about ten pushes: a generous deadline for a slow or probed run.
    wait_for(
        lambda: daemon.counts("team").get("dead") == 1,
        timeout=120,
        message="the poison dead-lettered",
    )
    wait_for(lambda: arrived(mirror, [*good, poison]), message="mirror has all six")
    wait_for(
        lambda: (
            daemon.counts("team")
            == {"pending": 0, "inflight": 0, "pushed": 5, "skipped": 0, "dead": 1}
        ),
        message="five pushed, one dead",
    )
    assert arrived(fake_cachix / "team", good)
    assert not narinfo(fake_cachix / "team", poison).is_file()
    first = calls(tmp_path)[0]
    assert len(first["paths"]) == 6, first
    report["team_invocations"] = [len(c["paths"]) for c in calls(tmp_path)]
    (dead,) = status_of(daemon)["dead_letters"]
    assert dead["path"] == poison.out and "poison path" in dead["error"]
    # The worker commits the dead letter, then counts the failure, and logs it last.
    wait_for(lambda: f"dead-lettered {poison.out} for team" in daemon.log(), message="its log")
    assert daemon.metric(DEAD, cache="team") == 1
    wait_for(
        lambda: daemon.metric(FAILED, cache="team", reason="exit_status") >= 3,
        message="3 failed pushes counted",
    )
    assert daemon.metric(FAILED, cache="mirror") == 0
    log = daemon.log()
    assert "push of 6 path(s) to team failed (exit_status, attempt 1, split into 2 batches)" in log
    dead_lines = [line for line in log.splitlines() if "dead-lettered" in line]
    report["dead_letter_log_lines"] = dead_lines
    assert len(dead_lines) == 1 and poison.out in dead_lines[0] and "for team" in dead_lines[0]
