"""Run a command in its own process group with a timeout, capturing the tail of its output."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

OUTPUT_TAIL_BYTES = 64 * 1024
KILL_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class CommandResult:
    """How a command ended; exactly one of spawn_error, timed_out, cancelled or returncode."""

    returncode: int | None
    output: str
    duration: float
    timed_out: bool = False
    cancelled: bool = False
    spawn_error: str | None = None
    spawn_errno: int | None = None

    @property
    def ok(self) -> bool:
        """True when the command ran and exited 0."""
        return self.returncode == 0 and not (self.timed_out or self.cancelled or self.spawn_error)

    @property
    def signal_name(self) -> str | None:
        """Name of the signal that killed the command, if one did."""
        if self.returncode is None or self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(handle: BinaryIO) -> str:
    handle.flush()
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - OUTPUT_TAIL_BYTES))
    data = handle.read()
    if size <= len(data):
        return data.decode("utf-8", errors="replace")
    # Drop the cut first line: it could hold the end of a secret that can no longer be
    # recognised (and redacted) as a whole.
    newline = data.find(b"\n")
    data = data[newline + 1 :] if newline >= 0 else b""
    note = f"[… {size - len(data)} bytes of output omitted …]\n"
    return note + data.decode("utf-8", errors="replace")


def run_command(
    args: Sequence[str],
    *,
    timeout: float,
    stdin_data: bytes = b"",
    env: Mapping[str, str] | None = None,
    cancel: threading.Event | None = None,
    poll_interval: float = 0.05,
) -> CommandResult:
    """Run args (never through a shell) in a new session; kill the whole group on timeout."""
    started = time.monotonic()
    files = contextlib.ExitStack()
    try:
        # Both are closed by `with files` below; creating them is what can fail (EMFILE).
        stdin_file = files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
        output = files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
    except OSError as exc:  # out of descriptors or disk before anything ran
        files.close()
        return CommandResult(
            returncode=None,
            output="",
            duration=time.monotonic() - started,
            spawn_error=f"{args[0]}: cannot create its output file: {exc.strerror}",
            spawn_errno=exc.errno,
        )
    with files:
        stdin_file.write(stdin_data)
        stdin_file.seek(0)
        try:
            proc = subprocess.Popen(
                list(args),
                stdin=stdin_file,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                close_fds=True,
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in an argument or env
            return CommandResult(
                returncode=None,
                output="",
                duration=time.monotonic() - started,
                spawn_error=f"{args[0]}: {getattr(exc, 'strerror', None) or exc}",
                spawn_errno=getattr(exc, "errno", None),
            )
        timed_out = cancelled = False
        deadline = started + timeout
        while True:
            try:
                proc.wait(timeout=max(0.0, min(poll_interval, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                pass
            if cancel is not None and cancel.is_set():
                cancelled = True
            elif time.monotonic() >= deadline:
                timed_out = True
            else:
                continue
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
            break
        # Whatever the outcome, leave no orphaned grandchildren behind.
        _kill_group(proc.pid, signal.SIGKILL)
        return CommandResult(
            returncode=proc.returncode,
            output=_tail(output),
            duration=time.monotonic() - started,
            timed_out=timed_out,
            cancelled=cancelled,
        )
