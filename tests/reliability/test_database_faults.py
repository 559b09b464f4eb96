"""The queue database under faults: locked by another process, corrupt, read-only, absent.

End to end with the real daemon and CLI: the daemon must not crash nor lose an event file,
and every command must end with a clear message (naming the file and what to do), never a
Python traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemonproc import DaemonProcess, bridge, enqueue_hydra, mirror, wait_for
from tests.nixhelpers import Built, build, narinfo
from tests.reliability.reporting import unmount

pytestmark = pytest.mark.integration

FAST = (
    "[push]\nbackoff_initial_seconds = 0.2\nbackoff_max_seconds = 0.5\nshutdown_grace_seconds = 2\n"
)
EMPTY = {"pending": 0, "inflight": 0, "pushed": 0, "skipped": 0, "dead": 0}

# -- report -------------------------------------------------------------------------------


# -- helpers ------------------------------------------------------------------------------


def run_hook(daemon: DaemonProcess, directory: Path, built: Built) -> None:
    """Record one build with the real generated sh hook."""
    script = bridge("hook-script", "--config", str(daemon.config), env=daemon.env)
    assert script.returncode == 0, script.stderr
    hook = directory / "post-build-hook.sh"
    hook.write_text(script.stdout)
    done = subprocess.run(
        ["/bin/sh", str(hook)],
        env={"PATH": "/usr/bin:/bin", "DRV_PATH": built.drv, "OUT_PATHS": built.out},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


def arrived(cache: Path, items: list[Built]) -> bool:
    return all(narinfo(cache, item).is_file() for item in items)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hydra-cachix-bridge:")]


def assert_clear_failure(
    done: subprocess.CompletedProcess[str], *needles: str, one_line: bool = False
) -> str:
    """Non-zero exit, no traceback, and a `hydra-cachix-bridge: …` line naming the problem."""
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    errors = error_lines(done.stderr)
    assert errors, done.stderr
    if one_line:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    for needle in needles:
        assert needle.lower() in errors[-1].lower(), f"{needle!r} not in {errors[-1]!r}"
    return errors[-1]


@contextlib.contextmanager
def mounted(*commands: list[str], target: Path) -> Iterator[Path]:
    """Run mount commands on target; unmount (once per mount) afterwards."""
    count = 0
    try:
        for command in commands:
            subprocess.run(command, check=True)
            count += 1 if "remount" not in ",".join(command) else 0
        yield target
    finally:
        for _ in range(count):
            unmount(target)


def spool_snapshot(spool: Path) -> dict[str, bytes]:
    """Every file under the spool with its content."""
    return {
        str(path.relative_to(spool)): path.read_bytes()
        for path in sorted(spool.rglob("*"))
        if path.is_file()
    }


# -- locked -------------------------------------------------------------------------------

LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
print("released", flush=True)
"""


class Locker:
    """Another process holding the queue database's write lock until release()."""

    def __init__(self, kind: str, database: Path) -> None:
        if kind == "python":
            args = [sys.executable, "-c", LOCKER, str(database)]
        else:
            args = ["sqlite3", "-batch", str(database)]
        self.kind = kind
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if kind == "sqlite3":
            self.proc.stdin.write(".timeout 10000\nBEGIN EXCLUSIVE;\nSELECT 'locked';\n")
        self.locked_at = time.monotonic()
        line = self.proc.stdout.readline().strip()
        assert line == "locked", line

    def release(self) -> None:
        assert self.proc.stdin is not None
        if self.kind == "sqlite3":
            self.proc.stdin.write("COMMIT;\n.quit\n")
        else:
            self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.mark.parametrize("kind", ["python", "sqlite3"])
def test_database_locked_by_another_process_delays_but_loses_nothing(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    kind: str,
    report: dict[str, Any],
) -> None:
    cache = tmp_path / "cache"
    daemon = daemon_factory(FAST + mirror(cache))
    database = tmp_path / "state" / "queue.sqlite3"
    incoming = tmp_path / "state" / "spool" / "incoming"
    items = build(workdir, 3)
    locker = Locker(kind, database)
    retry: subprocess.Popen[str] | None = None
    try:
        # Producers never touch the database: they record at once.
        for offset, item in enumerate(items[:2]):
            started = time.monotonic()
            assert enqueue_hydra(daemon, tmp_path, 1 + offset, item).returncode == 0
            assert time.monotonic() - started < 5
        run_hook(daemon, tmp_path, items[2])

        started = time.monotonic()
        status = bridge("status", "--config", str(daemon.config), env=daemon.env, timeout=60)
        report["status_seconds_while_locked"] = round(time.monotonic() - started, 2)
        report["status_exit_while_locked"] = status.returncode
        assert "Traceback" not in status.stderr, status.stderr
        if status.returncode != 0:
            assert_clear_failure(status, str(database), one_line=True)
        retry = subprocess.Popen(
            [sys.executable, "-m", "bridge", "retry", "--all", "--config", str(daemon.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=daemon.env,
        )

        # Hold the lock a few seconds: the events wait in the spool, the daemon lives on.
        time.sleep(max(0.0, locker.locked_at + 3 - time.monotonic()))
        # Two from RunCommand in incoming/, the hook's in its own directory.
        assert len(os.listdir(incoming)) == 2
        assert len(os.listdir(incoming.parent / "hook")) == 1
        assert not daemon.proc_exited()
        report["healthz_while_locked"] = list(daemon.health())
        assert daemon.counts("mirror") == EMPTY
        assert retry.poll() is None, "retry neither waited for the lock nor failed clearly"
        report["lock_held_seconds"] = round(time.monotonic() - locker.locked_at, 2)
        locker.release()

        wait_for(lambda: arrived(cache, items), message="pushes after the lock is released")
        # Marked pushed just after the copy lands in the cache.
        wait_for(lambda: daemon.counts("mirror").get("pushed") == 3, message="all pushed")
        assert os.listdir(incoming) == []
        out, err = retry.communicate(timeout=30)
        report["retry_while_locked"] = {"exit": retry.returncode, "stdout": out.strip()}
        assert "Traceback" not in err, err
        assert retry.returncode == 0 and "0 dead-lettered path(s) queued again" in out, err
        assert daemon.counts("mirror")["pushed"] == 3
        assert daemon.health()[0] == 200
        assert "Traceback" not in daemon.log(), daemon.log()[-3000:]
    finally:
        locker.kill()
        if retry is not None and retry.poll() is None:
            retry.kill()
            retry.wait(timeout=10)


# -- corrupt ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["all_garbage", "header_kept"])
def test_corrupt_database_at_start_is_a_clear_error_and_spool_is_untouched(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    damage: str,
    report: dict[str, Any],
) -> None:
    cache = tmp_path / "cache"
    daemon = daemon_factory(FAST + mirror(cache))
    database = tmp_path / "state" / "queue.sqlite3"
    spool = tmp_path / "state" / "spool"
    first, *items = build(workdir, 3)
    assert enqueue_hydra(daemon, tmp_path, 1, first).returncode == 0
    wait_for(lambda: arrived(cache, [first]), message="first push")
    assert daemon.terminate() == 0
    # Events recorded while the daemon is down, then the database is damaged.
    for offset, item in enumerate(items):
        assert enqueue_hydra(daemon, tmp_path, 2 + offset, item).returncode == 0
    before = spool_snapshot(spool)
    assert len([name for name in before if name.startswith("incoming/")]) == 2
    good = database.read_bytes()
    keep = 100 if damage == "header_kept" else 0
    database.write_bytes(good[:keep] + os.urandom(len(good) - keep))

    started = time.monotonic()
    done = bridge("run", "--config", str(daemon.config), env=daemon.env, timeout=60)
    report["run_seconds"] = round(time.monotonic() - started, 2)
    report["run_error"] = assert_clear_failure(done, str(database), "corrupt", ".recover")
    assert spool_snapshot(spool) == before, "the spool changed"
    report["status_error"] = assert_clear_failure(
        bridge("status", "--config", str(daemon.config), env=daemon.env),
        str(database),
        one_line=True,
    )
    assert_clear_failure(
        bridge("retry", "--all", "--config", str(daemon.config), env=daemon.env),
        str(database),
        one_line=True,
    )

    # Following the advice (start empty) loses no event still in the spool.
    for suffix in ("", "-wal", "-shm"):
        damaged = Path(f"{database}{suffix}")
        if damaged.exists():
            damaged.rename(tmp_path / f"damaged{suffix}")
    daemon.start()
    wait_for(lambda: arrived(cache, items), message="events pushed after recovery")
    wait_for(lambda: daemon.counts("mirror").get("pushed") == 2, message="both marked pushed")


# -- read-only ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["fresh_state", "fresh_state_spool_elsewhere", "existing_state"])
def test_read_only_state_dir_is_a_clear_error(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    layout: str,
    report: dict[str, Any],
) -> None:
    state = tmp_path / "state"
    cache = tmp_path / "cache"
    extra = f'spool_dir = "{tmp_path / "spool"}"\n' if layout.endswith("elsewhere") else ""
    daemon = daemon_factory(FAST + mirror(cache), start=layout == "existing_state", extra_top=extra)
    if layout == "existing_state":
        (item,) = build(workdir, 1)
        assert enqueue_hydra(daemon, tmp_path, 1, item).returncode == 0
        wait_for(lambda: arrived(cache, [item]), message="first push")
        assert daemon.terminate() == 0
        commands = [
            ["mount", "--bind", str(state), str(state)],
            ["mount", "-o", "remount,bind,ro", str(state)],
        ]
    else:
        state.mkdir()
        commands = [["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(state)]]
    with mounted(*commands, target=state):
        done = bridge("run", "--config", str(daemon.config), env=daemon.env, timeout=60)
        status = bridge("status", "--config", str(daemon.config), env=daemon.env)
    report["run_exit"] = done.returncode
    report["run_stderr_tail"] = done.stderr.strip().splitlines()[-3:]
    report["status"] = {"exit": status.returncode, "stderr": status.stderr.strip()}
    report["run_error"] = assert_clear_failure(done, "read-only file system", str(state))
    assert "Traceback" not in status.stderr
    if status.returncode != 0:
        assert_clear_failure(status, str(state), one_line=True)


# -- absent -------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["no_state_dir", "state_dir_without_database"])
def test_status_and_retry_without_a_database(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    state: str,
    report: dict[str, Any],
) -> None:
    daemon = daemon_factory(FAST + mirror(tmp_path / "cache"), start=False)
    state_dir = tmp_path / "state"
    if state == "state_dir_without_database":
        state_dir.mkdir()
    database = state_dir / "queue.sqlite3"

    status = bridge("status", "--config", str(daemon.config), env=daemon.env)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert "not running" in status.stdout and "mirror" in status.stdout
    as_json = bridge("status", "--json", "--config", str(daemon.config), env=daemon.env)
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["daemon_running"] is False
    assert [entry["counts"] for entry in document["caches"]] == [EMPTY]
    report["status_stdout"] = status.stdout.strip().splitlines()
    for args in (["--all"], ["1", "2"]):
        retry = bridge("retry", *args, "--config", str(daemon.config), env=daemon.env)
        line = assert_clear_failure(retry, "no queue database", str(database), one_line=True)
        report[f"retry {' '.join(args)}"] = line
    # Neither command created anything on its own.
    assert not database.exists()
    assert state_dir.exists() == (state == "state_dir_without_database")
