"""Find the live processes a test started, by a marker in their environment."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def process_state(pid: int) -> str:
    """The State letter of /proc/PID/status (R, S, Z, ...), X when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except OSError:
        pass
    return "X"


def live_processes(marker: str, exclude: Iterable[int] = ()) -> dict[int, str]:
    """Running processes (not zombies) whose environment holds `marker` (`NAME=value`):
    pid → command line.

    Mark with something only this test has (its own FAKE_CACHIX_ROOT): tests running beside
    it start the same programs. PID 1 in a container may never reap orphans, so zombies
    are left out: they run nothing.
    """
    wanted = marker.encode()
    skip = {os.getpid(), *exclude}
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if wanted in environ and process_state(pid) not in ("Z", "X"):
            found[pid] = cmdline.decode(errors="replace").strip()
    return found
