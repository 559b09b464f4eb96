"""Producers and the daemon when the spool (or the state dir) is missing, unwritable or full.

End to end: the real sh post-build-hook run by /bin/sh, `enqueue-hook`, `enqueue-hydra`, and
the daemon as a subprocess, with the spool or state dir on a small tmpfs that is filled up.
Producers must fail visibly but never block or leave partial files; the daemon must keep
running, lose nothing already recorded, and catch up when space returns.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemonproc import (
    DaemonProcess,
    bridge,
    enqueue_hydra,
    mirror,
    wait_for,
    write_hook,
)
from tests.nixhelpers import Built, build, narinfo
from tests.reliability.reporting import unmount

pytestmark = pytest.mark.integration

FAST = (
    "[push]\nbackoff_initial_seconds = 0.2\nbackoff_max_seconds = 0.5\nshutdown_grace_seconds = 2\n"
)

# -- report -------------------------------------------------------------------------------


# -- mounts and filling -------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A small tmpfs mounted at path for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        unmount(path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """path (a directory) made read-only by a read-only bind mount over itself."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield path
    finally:
        unmount(path)


def fill(directory: Path) -> Path:
    """Fill the filesystem holding directory to the last byte; return the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 4096, 512, 1):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bfree == 0, "filesystem not full"
    return filler


# -- producers ----------------------------------------------------------------------------


def run_hook(
    hook: Path, built: Built, *, as_nobody: bool = False, timeout: float = 10
) -> subprocess.CompletedProcess[str]:
    """Run the hook with /bin/sh as nix-daemon does: DRV_PATH and OUT_PATHS set."""
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if as_nobody else []
    env = {"PATH": "/usr/bin:/bin", "DRV_PATH": built.drv, "OUT_PATHS": built.out}
    return subprocess.run(
        [*prefix, "/bin/sh", str(hook)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def enqueue_hook(daemon: DaemonProcess, built: Built) -> subprocess.CompletedProcess[str]:
    env = dict(daemon.env, DRV_PATH=built.drv, OUT_PATHS=built.out)
    return bridge("enqueue-hook", "--config", str(daemon.config), env=env, timeout=20)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A non-zero exit with exactly one `hydra-cachix-bridge: …` line naming the problem."""
    assert done.returncode != 0, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{done.stderr}"
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("hydra-cachix-bridge: "), lines[0]
    for needle in needles:
        assert needle in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_hook_reported(done: subprocess.CompletedProcess[str], built: Built) -> str:
    """The hook exited 0 and said on stderr which build it could not record, and why."""
    assert done.returncode == 0, done
    assert "could not record" in done.stderr and built.drv in done.stderr, done.stderr
    assert "missing, not writable or full" in done.stderr, done.stderr
    return done.stderr.strip()


def spool_files(spool: Path) -> dict[str, list[str]]:
    """Names in each spool directory (absent directories are empty)."""
    result = {}
    for sub in ("incoming", "tmp", "hook", "quarantine"):
        directory = spool / sub
        result[sub] = sorted(os.listdir(directory)) if directory.is_dir() else []
    return result


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_idle(daemon: DaemonProcess, seconds: float = 3.0, limit: float = 0.6) -> float:
    """The daemon is alive and does not spin: little CPU over a few seconds."""
    assert daemon.proc is not None
    before = cpu_seconds(daemon.proc.pid)
    time.sleep(seconds)
    assert not daemon.proc_exited(), f"daemon exited:\n{daemon.log()[-3000:]}"
    used = cpu_seconds(daemon.proc.pid) - before
    assert used < limit, f"daemon used {used:.2f}s CPU in {seconds}s (spinning?)"
    return used


def all_arrived(cache: Path, items: list[Built]) -> bool:
    return all(narinfo(cache, item).is_file() for item in items)


# -- spool missing ------------------------------------------------------------------------


def test_missing_spool_every_producer_reports_and_nothing_is_created(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    report: dict[str, Any],
) -> None:
    cache = tmp_path / "cache"
    spool = tmp_path / "never-created" / "spool"
    daemon = daemon_factory(FAST + mirror(cache), start=False, extra_top=f'spool_dir = "{spool}"\n')
    hook = write_hook(daemon, tmp_path)
    before = build(workdir, 1)
    (item,) = before

    started = time.monotonic()
    hooked = run_hook(hook, item)
    report["hook_seconds"] = round(time.monotonic() - started, 3)
    report["hook_stderr"] = assert_hook_reported(hooked, item)
    warned = enqueue_hook(daemon, item)
    assert warned.returncode == 0, warned.stderr
    assert "warning: build not recorded" in warned.stderr and "missing" in warned.stderr
    assert "Traceback" not in warned.stderr
    report["enqueue_hook_stderr"] = warned.stderr.strip()
    failed = enqueue_hydra(daemon, tmp_path, 1, item)
    report["enqueue_hydra_stderr"] = assert_one_line_error(failed, "missing", str(spool))
    # No producer created the spool (half-way) on its own.
    assert not spool.exists() and not spool.parent.exists()

    # Once the daemon has created the spool, the same producers record and it pushes.
    daemon.start()
    after = build(workdir, 3)
    assert run_hook(hook, after[0]).stderr == ""
    assert enqueue_hook(daemon, after[1]).returncode == 0
    assert enqueue_hydra(daemon, tmp_path, 2, after[2]).returncode == 0
    wait_for(lambda: all_arrived(cache, after), message="pushes once the spool exists")
    assert not narinfo(cache, item).is_file()


# -- spool not writable -------------------------------------------------------------------


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory under /tmp that `nobody` may traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="hcb-reliability-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_spool_not_writable_by_the_hook_user(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    public_dir: Path,
    report: dict[str, Any],
) -> None:
    cache = tmp_path / "cache"
    spool = public_dir / "spool"
    daemon = daemon_factory(FAST + mirror(cache), extra_top=f'spool_dir = "{spool}"\n')
    hook = write_hook(daemon, public_dir)
    # Readable and traversable for everybody, writable only by root (root ignores modes,
    # so the hook runs as `nobody`, like a hook user outside the spool's group).
    spool.chmod(0o755)
    (spool / "incoming").chmod(0o755)
    items = build(workdir, 2)

    started = time.monotonic()
    done = run_hook(hook, items[0], as_nobody=True)
    report["hook_seconds"] = round(time.monotonic() - started, 3)
    report["hook_stderr"] = assert_hook_reported(done, items[0])
    files = spool_files(spool)
    assert files["incoming"] == [] and files["tmp"] == [] and files["hook"] == []

    # Nothing is broken for the hook's rightful user.
    assert run_hook(hook, items[1]).stderr == ""
    wait_for(lambda: all_arrived(cache, items[1:]), message="root-run hook still records")
    assert not narinfo(cache, items[0]).is_file()
    assert daemon.health()[0] == 200


def test_read_only_spool_every_producer_reports_and_daemon_recovers(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    report: dict[str, Any],
) -> None:
    cache = tmp_path / "cache"
    spool = tmp_path / "spool"
    daemon = daemon_factory(FAST + mirror(cache), extra_top=f'spool_dir = "{spool}"\n')
    hook = write_hook(daemon, tmp_path)
    items = build(workdir, 6)
    # Recorded before the fault.
    assert run_hook(hook, items[0]).stderr == ""
    wait_for(lambda: all_arrived(cache, items[:1]), message="first push")

    with read_only(spool):
        report["hook_stderr"] = assert_hook_reported(run_hook(hook, items[1]), items[1])
        warned = enqueue_hook(daemon, items[2])
        assert warned.returncode == 0 and "warning: build not recorded" in warned.stderr
        assert "read-only file system" in warned.stderr and "Traceback" not in warned.stderr
        report["enqueue_hook_stderr"] = warned.stderr.strip()
        failed = enqueue_hydra(daemon, tmp_path, 3, items[3])
        report["enqueue_hydra_stderr"] = assert_one_line_error(failed, "read-only file system")
        files = spool_files(spool)
        assert files["incoming"] == [] and files["tmp"] == []
        assert len(files["hook"]) == 1  # the first build's; the daemon never deletes there
        assert daemon.health()[0] == 200
        assert_idle(daemon, seconds=2)

    assert run_hook(hook, items[4]).stderr == ""
    assert enqueue_hydra(daemon, tmp_path, 5, items[5]).returncode == 0
    wait_for(lambda: all_arrived(cache, [items[4], items[5]]), message="pushes after remount")
    assert not any(narinfo(cache, item).is_file() for item in items[1:4])


# -- spool on a full filesystem -----------------------------------------------------------


def test_full_spool_producers_fail_cleanly_nothing_recorded_is_lost_and_daemon_recovers(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    report: dict[str, Any],
) -> None:
    cache = tmp_path / "cache"
    with tmpfs(tmp_path / "spoolfs") as spoolfs:
        spool = spoolfs / "spool"
        daemon = daemon_factory(FAST + mirror(cache), extra_top=f'spool_dir = "{spool}"\n')
        hook = write_hook(daemon, tmp_path)
        try:
            # Events recorded while the daemon is stopped, then the disk fills up.
            assert daemon.terminate() == 0
            before = build(workdir, 4)
            assert run_hook(hook, before[0]).stderr == ""
            assert run_hook(hook, before[1]).stderr == ""
            assert enqueue_hook(daemon, before[2]).stderr == ""
            assert enqueue_hydra(daemon, tmp_path, 1, before[3]).returncode == 0
            # The hook's events (sh and enqueue-hook) in its own directory, Hydra's in incoming/.
            recorded = spool_files(spool)["incoming"]
            recorded_by_hooks = spool_files(spool)["hook"]
            assert len(recorded) == 1 and len(recorded_by_hooks) == 3
            filler = fill(spoolfs)

            after = build(workdir, 3)
            started = time.monotonic()
            hooked = run_hook(hook, after[0])
            report["hook_seconds"] = round(time.monotonic() - started, 3)
            report["hook_stderr"] = assert_hook_reported(hooked, after[0])
            warned = enqueue_hook(daemon, after[1])
            assert warned.returncode == 0 and "warning: build not recorded" in warned.stderr
            assert "no space left on device" in warned.stderr and "Traceback" not in warned.stderr
            report["enqueue_hook_stderr"] = warned.stderr.strip()
            failed = enqueue_hydra(daemon, tmp_path, 2, after[2])
            report["enqueue_hydra_stderr"] = assert_one_line_error(
                failed, "no space left on device"
            )
            files = spool_files(spool)
            assert files["incoming"] == recorded, "a partial event file was left in incoming/"
            assert files["tmp"] == [] and files["hook"] == recorded_by_hooks, files

            # The daemon starts with its spool on the full filesystem and pushes everything
            # recorded before the disk filled.
            daemon.start()
            wait_for(lambda: all_arrived(cache, before), message="events recorded before full")
            assert spool_files(spool)["incoming"] == []
            assert daemon.health()[0] == 200
            report["daemon_cpu_seconds_in_3s_while_full"] = round(assert_idle(daemon), 3)

            # Space returns: new events are recorded and pushed.
            filler.unlink()
            assert run_hook(hook, after[0]).stderr == ""
            assert enqueue_hook(daemon, after[1]).stderr == ""
            assert enqueue_hydra(daemon, tmp_path, 3, after[2]).returncode == 0
            wait_for(lambda: all_arrived(cache, after), message="events after space returned")
            # Marked pushed just after the copy lands in the cache.
            wait_for(lambda: daemon.counts("mirror").get("pushed") == 7, message="all pushed")
            assert daemon.counts("mirror") == {
                "pending": 0,
                "inflight": 0,
                "pushed": 7,
                "skipped": 0,
                "dead": 0,
            }
            assert daemon.health()[0] == 200
        finally:
            daemon.cleanup()


def test_quarantine_on_a_full_spool_does_not_spin_and_completes_when_space_returns(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    report: dict[str, Any],
) -> None:
    cache = tmp_path / "cache"
    with tmpfs(tmp_path / "spoolfs") as spoolfs:
        spool = spoolfs / "spool"
        daemon = daemon_factory(FAST + mirror(cache), extra_top=f'spool_dir = "{spool}"\n')
        try:
            assert daemon.terminate() == 0
            # An invalid event (valid JSON, not a store path), renamed in like a producer does.
            bad = {"version": 1, "kind": "hook", "drv_path": "/etc/passwd", "out_paths": ""}
            staged = spool / "tmp" / "hook-bad.json"
            staged.write_text(json.dumps(bad))
            staged.rename(spool / "incoming" / "hook-bad.json")
            filler = fill(spoolfs)

            daemon.start()
            wait_for(
                lambda: "hook-bad.json" in daemon.log() and "quarantin" in daemon.log(),
                message="quarantine attempt",
            )
            attempts = daemon.log().count("hook-bad.json")
            report["daemon_cpu_seconds_in_3s_while_full"] = round(assert_idle(daemon), 3)
            assert daemon.log().count("hook-bad.json") <= attempts + 2, "retrying in a loop"
            assert daemon.health()[0] == 200
            report["while_full"] = spool_files(spool)
            report["log_lines"] = [
                line for line in daemon.log().splitlines() if "hook-bad.json" in line
            ]

            filler.unlink()
            (item,) = build(workdir, 1)
            assert enqueue_hydra(daemon, tmp_path, 1, item).returncode == 0
            wait_for(lambda: narinfo(cache, item).is_file(), message="push after space returned")
            report["after_space_returned"] = spool_files(spool)
            report["reason_file_sizes"] = {
                p.name: p.stat().st_size for p in (spool / "quarantine").glob("*.reason")
            }

            # The documented outcome: the bad file is in quarantine/ beside a readable
            # NAME.reason JSON file, and it is counted as rejected.
            def quarantined() -> bool:
                names = spool_files(spool)["quarantine"]
                reasons = [n for n in names if n.endswith(".reason")]
                if len(reasons) != 1:
                    return False
                try:
                    doc = json.loads((spool / "quarantine" / reasons[0]).read_text())
                except ValueError:
                    return False
                return bool(doc.get("reason"))

            wait_for(quarantined, timeout=8, message="a complete quarantine .reason file")
            # Counted after the move, which comes after the .reason file.
            wait_for(
                lambda: daemon.metric("hydra_cachix_bridge_events_rejected_total") >= 1,
                timeout=8,
                message="the rejection counted",
            )
            time.sleep(0.5)  # a second count would come within this
            rejected = daemon.metric("hydra_cachix_bridge_events_rejected_total")
            assert rejected == 1, f"events_rejected_total is {rejected}"
        finally:
            daemon.cleanup()


# -- the daemon's state dir (SQLite) on a full filesystem ---------------------------------


def test_full_state_dir_keeps_events_in_the_spool_until_the_database_can_commit(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    report: dict[str, Any],
) -> None:
    cache = tmp_path / "cache"
    spool = tmp_path / "spool"
    with tmpfs(tmp_path / "state") as state:
        daemon = daemon_factory(FAST + mirror(cache), extra_top=f'spool_dir = "{spool}"\n')
        hook = write_hook(daemon, tmp_path)
        try:
            first, *items = build(workdir, 4)
            assert enqueue_hydra(daemon, tmp_path, 1, first).returncode == 0
            # Recorded as pushed (not only copied) before the disk fills.
            wait_for(lambda: daemon.counts("mirror").get("pushed") == 1, message="first push")
            filler = fill(state)

            assert enqueue_hydra(daemon, tmp_path, 2, items[0]).returncode == 0
            assert run_hook(hook, items[1]).stderr == ""
            assert enqueue_hook(daemon, items[2]).stderr == ""
            recorded = spool_files(spool)["incoming"]
            assert len(recorded) == 1 and len(spool_files(spool)["hook"]) == 2
            wait_for(lambda: "database or disk is full" in daemon.log(), message="a failed commit")
            report["daemon_cpu_seconds_in_3s_while_full"] = round(assert_idle(daemon), 3)
            # Not recorded, so not deleted: every event file is still in the spool.
            assert spool_files(spool)["incoming"] == recorded
            assert daemon.counts("mirror")["pushed"] == 1
            report["healthz_while_full"] = daemon.health()

            filler.unlink()
            wait_for(lambda: all_arrived(cache, items), message="catch-up after space returned")
            assert spool_files(spool)["incoming"] == []
            wait_for(lambda: daemon.counts("mirror").get("pushed") == 4, message="all pushed")
            counts = daemon.counts("mirror")
            assert counts["pushed"] == 4 and counts["pending"] == counts["inflight"] == 0
            assert daemon.health()[0] == 200
        finally:
            daemon.cleanup()


def test_full_state_dir_during_a_push_then_the_outcome_is_recorded_when_space_returns(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    report: dict[str, Any],
) -> None:
    token = tmp_path / "token"
    token.write_text("reliability-token\n")
    spool = tmp_path / "spool"
    with tmpfs(tmp_path / "state") as state:
        daemon = daemon_factory(
            FAST + f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{token}"\n',
            env={"FAKE_CACHIX_SLEEP": "3"},
            extra_top=f'spool_dir = "{spool}"\n',
        )
        try:
            # Both events queued at once (daemon stopped), so one push holds both paths.
            assert daemon.terminate() == 0
            items = build(workdir, 2)
            for offset, item in enumerate(items):
                assert enqueue_hydra(daemon, tmp_path, 1 + offset, item).returncode == 0
            daemon.start()
            wait_for(lambda: daemon.counts("team").get("inflight") == 2, message="in flight")
            filler = fill(state)
            # The pushes themselves succeed; recording that needs the database.
            wait_for(lambda: all_arrived(fake_cachix / "team", items), message="cachix copies")
            time.sleep(2)
            assert not daemon.proc_exited(), daemon.log()[-3000:]
            report["counts_while_full"] = daemon.counts("team")
            report["healthz_while_full"] = daemon.health()

            filler.unlink()
            try:
                wait_for(
                    lambda: daemon.counts("team").get("pushed") == 2,
                    timeout=30,
                    message="the pushes recorded once space returned",
                )
            finally:
                report["counts_after_space_returned"] = daemon.counts("team")
                report["healthz_after_space_returned"] = daemon.health()
                report["worker_threads_died"] = daemon.log().count("Exception in thread push-")
            counts = daemon.counts("team")
            assert counts["inflight"] == 0 and counts["pending"] == 0
            # The workers are still there: a new event is pushed too.
            (extra,) = build(workdir, 1)
            assert enqueue_hydra(daemon, tmp_path, 9, extra).returncode == 0
            wait_for(lambda: daemon.counts("team").get("pushed") == 3, message="a later push")
        finally:
            daemon.cleanup()


@pytest.mark.parametrize("previous_stop", ["clean", "sigkill"])
def test_daemon_started_on_a_full_state_dir_does_not_crash_loop(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    previous_stop: str,
    report: dict[str, Any],
) -> None:
    cache = tmp_path / "cache"
    spool = tmp_path / "spool"
    with tmpfs(tmp_path / "state") as state:
        daemon = daemon_factory(FAST + mirror(cache), extra_top=f'spool_dir = "{spool}"\n')
        try:
            if previous_stop == "clean":
                assert daemon.terminate() == 0
            else:
                daemon.kill()
            items = build(workdir, 2)
            for offset, item in enumerate(items):
                assert enqueue_hydra(daemon, tmp_path, 1 + offset, item).returncode == 0
            recorded = {p.name: p.read_bytes() for p in (spool / "incoming").iterdir()}
            filler = fill(state)

            # What a service manager would see: under Restart=on-failure an exit here
            # restarts it every RestartSec for as long as the disk stays full.
            with contextlib.suppress(AssertionError):
                daemon.start(ready_timeout=6)
            time.sleep(2)
            report["exited"] = daemon.proc_exited()
            report["exit_status"] = daemon.proc.poll() if daemon.proc else None
            tail = daemon.log().strip().splitlines()[-1:] if daemon.log() else []
            report["last_log_line"] = tail[0][:600] if tail else ""
            report["traceback"] = "Traceback" in daemon.log()
            # Whatever it does, no event file was lost.
            assert {p.name: p.read_bytes() for p in (spool / "incoming").iterdir()} == recorded
            report["event_files_intact"] = True
            assert not daemon.proc_exited(), (
                "daemon exited on a full state dir (a crash loop under Restart=on-failure):\n"
                + daemon.log()[-2500:]
            )
            assert_idle(daemon)

            filler.unlink()
            wait_for(lambda: all_arrived(cache, items), timeout=20, message="catch-up")
            assert list((spool / "incoming").iterdir()) == []
        finally:
            daemon.cleanup()
