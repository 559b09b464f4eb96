"""bridge/process.py run_command with real commands and real process groups."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import bridge.process
from bridge.process import OUTPUT_TAIL_BYTES, run_command


def live_group_members(pgid: int) -> list[int]:
    """Pids of processes in process group pgid that are still running (zombies excluded).

    PID 1 of the test machine may not reap orphans, so a killed orphan can stay a zombie:
    os.killpg(pgid, 0) alone would still succeed for it.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(entry))
    return members


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return not live_group_members(pgid)


def read_pid(path: Path) -> int:
    assert wait_for(lambda: path.exists() and path.read_text().strip() != "", 5)
    return int(path.read_text().split()[0])


def test_success_captures_output() -> None:
    result = run_command(["sh", "-c", "echo out; echo err >&2"], timeout=10)
    assert result.ok
    assert result.returncode == 0
    assert result.signal_name is None
    assert not result.timed_out and not result.cancelled and result.spawn_error is None
    assert "out" in result.output and "err" in result.output  # stderr merged into output
    assert 0 <= result.duration < 10


@pytest.mark.parametrize("code", [1, 3, 127])
def test_exit_status_is_reported(code: int) -> None:
    result = run_command(["sh", "-c", f"echo failing; exit {code}"], timeout=10)
    assert not result.ok
    assert result.returncode == code
    assert result.signal_name is None
    assert "failing" in result.output


def test_death_by_signal_is_named() -> None:
    result = run_command(["sh", "-c", "kill -SEGV $$"], timeout=10)
    assert not result.ok
    assert result.returncode == -11
    assert result.signal_name == "SIGSEGV"
    assert not result.timed_out


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    script = f"sleep 300 & echo $$ $! > {pidfile}; sleep 300"
    started = time.monotonic()
    result = run_command(["sh", "-c", script], timeout=1.0)
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert not result.ok
    assert not result.cancelled
    assert 0.9 <= elapsed < 6
    shell_pid, background_pid = (int(x) for x in pidfile.read_text().split())
    # start_new_session: the shell leads its own group, and the background sleep is in it.
    assert wait_for(lambda: group_gone(shell_pid)), live_group_members(shell_pid)
    assert background_pid not in live_group_members(shell_pid)


def test_group_ignoring_sigterm_is_killed_after_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge.process, "KILL_GRACE_SECONDS", 0.5)
    pidfile = tmp_path / "pid"
    script = f"trap '' TERM; echo $$ > {pidfile}; sleep 300 & sleep 300; sleep 300"
    started = time.monotonic()
    result = run_command(["sh", "-c", script], timeout=0.5)
    assert result.timed_out
    assert time.monotonic() - started < 5
    pgid = read_pid(pidfile)
    assert wait_for(lambda: group_gone(pgid)), live_group_members(pgid)


def test_grandchildren_left_behind_by_a_finished_command_are_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    result = run_command(["sh", "-c", f"sleep 300 & echo $$ > {pidfile}; exit 0"], timeout=10)
    assert result.ok
    pgid = read_pid(pidfile)
    assert wait_for(lambda: group_gone(pgid)), live_group_members(pgid)


def test_cancel_event_stops_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    started = time.monotonic()
    try:
        result = run_command(
            ["sh", "-c", f"echo $$ > {pidfile}; sleep 300 & sleep 300"],
            timeout=60,
            cancel=cancel,
        )
    finally:
        timer.cancel()
    assert result.cancelled
    assert not result.timed_out
    assert not result.ok
    assert time.monotonic() - started < 6
    pgid = read_pid(pidfile)
    assert wait_for(lambda: group_gone(pgid)), live_group_members(pgid)


def test_large_output_keeps_only_the_tail() -> None:
    total = 3 * 1024 * 1024
    # 3 MiB of 'a' lines, then a final marker line.
    script = f"head -c {total} /dev/zero | tr '\\0' 'a' | fold -w 99; echo THE-END"
    result = run_command(["sh", "-c", script], timeout=30)
    assert result.ok
    note, _, body = result.output.partition("\n")
    assert note.startswith("[… ") and note.endswith(" bytes of output omitted …]")
    omitted = int(note.split()[1])
    # The tail starts at a line boundary (a cut first line is dropped, it could hide part
    # of a secret from redaction), so it is at most OUTPUT_TAIL_BYTES and nearly that.
    assert OUTPUT_TAIL_BYTES - 100 <= len(body.encode()) <= OUTPUT_TAIL_BYTES
    assert body.splitlines()[0] == "a" * 99
    full_size = total + total // 99 + len("THE-END\n")
    assert omitted + len(body.encode()) == full_size
    assert body.rstrip("\n").endswith("THE-END")


def test_small_output_has_no_omission_note() -> None:
    result = run_command(["sh", "-c", "printf 'x%.0s' $(seq 100)"], timeout=10)
    assert result.output == "x" * 100


def test_stdin_data_is_delivered() -> None:
    data = b"".join(f"/nix/store/line-{i}\n".encode() for i in range(1000))
    result = run_command(["sh", "-c", "cat; echo END"], timeout=10, stdin_data=data)
    assert result.ok
    assert result.output == data.decode() + "END\n"
    # Larger than a pipe buffer: still delivered whole (counted by the child).
    big = b"x" * (5 * 1024 * 1024)
    counted = run_command(["wc", "-c"], timeout=10, stdin_data=big)
    assert counted.output.strip() == str(len(big))


def test_no_stdin_data_gives_empty_stdin() -> None:
    result = run_command(["wc", "-c"], timeout=10)
    assert result.ok
    assert result.output.strip() == "0"


def test_missing_executable_is_a_spawn_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-program")
    result = run_command([missing, "arg"], timeout=10)
    assert not result.ok
    assert result.returncode is None
    assert result.spawn_error is not None
    assert missing in result.spawn_error
    assert "No such file" in result.spawn_error
    assert result.signal_name is None


def test_non_executable_file_is_a_spawn_error(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result = run_command([str(script)], timeout=10)
    assert result.spawn_error is not None
    assert "Permission denied" in result.spawn_error


def test_environment_is_passed_exactly(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HCB_TEST_VALUE": "hello world"}
    result = run_command(["sh", "-c", 'echo "$HCB_TEST_VALUE"; env'], timeout=10, env=env)
    assert result.ok
    lines = result.output.splitlines()
    assert lines[0] == "hello world"
    assert "HCB_TEST_VALUE=hello world" in lines
    # Only what we passed (plus what sh itself sets), not the caller's environment.
    assert not any(line.startswith("NIX_CONFIG=") for line in lines)


def test_environment_defaults_to_the_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HCB_INHERITED", "from-parent")
    result = run_command(["sh", "-c", 'echo "$HCB_INHERITED"'], timeout=10)
    assert result.output.strip() == "from-parent"


def test_arguments_are_not_interpreted_by_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    result = run_command(["echo", f"$(touch {marker}); `id`"], timeout=10)
    assert result.ok
    assert result.output.strip() == f"$(touch {marker}); `id`"
    assert not marker.exists()
