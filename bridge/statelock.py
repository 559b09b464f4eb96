"""The state directory's lock: held by the running daemon, tested by `status` and `retry`."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StateLocked(Exception):
    """Another daemon holds the state directory's lock."""


def lock_path(state_dir: Path) -> Path:
    """The file whose lock marks a running daemon."""
    return state_dir / "daemon.lock"


class StateLock:
    """An exclusive lock on a state directory, held for the daemon's lifetime."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; StateLocked when a daemon holds it, OSError when it cannot open it."""
        fd = os.open(lock_path(self.state_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(
                f"another hydra-cachix-bridge daemon is using {self.state_dir}"
            ) from None
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def daemon_running(state_dir: Path) -> bool:
    """True while a daemon holds the lock of state_dir (a missing lock file means none)."""
    try:
        fd = os.open(lock_path(state_dir), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
