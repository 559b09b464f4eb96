"""A loop's heartbeat: how long it has been busy without progress (idle waits are fine)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Heartbeat:
    """Marks a loop busy or idle and notes each step of progress; reports a stall."""

    def __init__(self, monotonic: Callable[[], float], bound: float) -> None:
        self.monotonic = monotonic
        self.bound = bound
        self._lock = threading.Lock()
        self._last: float | None = None  # None while idle (waiting for work)

    def busy(self) -> None:
        """The loop starts work: from now on it must make progress within the bound."""
        with self._lock:
            self._last = self.monotonic()

    def beat(self) -> None:
        """One step of progress (one file read, one pass finished)."""
        with self._lock:
            if self._last is not None:
                self._last = self.monotonic()

    def idle(self) -> None:
        """The loop waits for work; waiting is never a stall."""
        with self._lock:
            self._last = None

    def stalled_for(self) -> float | None:
        """Seconds without progress while busy, when beyond the bound; else None."""
        with self._lock:
            last = self._last
        if last is None:
            return None
        quiet = self.monotonic() - last
        return quiet if quiet > self.bound else None
