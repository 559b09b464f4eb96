"""The daemon speaks sd_notify (READY, WATCHDOG, STOPPING) and stops cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.daemonproc import DaemonProcess


def test_ready_watchdog_and_stopping_on_a_real_notify_socket(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        cache = tmp_path / "cache"
        daemon = daemon_factory(
            f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{cache}"\n',
            env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"},
        )
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1"), first
        # READY comes after the first spool scan: the spool exists and is watched.
        assert (tmp_path / "state" / "spool" / "incoming").is_dir()
        watchdog = [sock.recv(4096).decode() for _ in range(2)]
        assert watchdog == ["WATCHDOG=1", "WATCHDOG=1"]
        daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        messages = []
        deadline = time.monotonic() + 30
        while "STOPPING=1" not in messages and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        assert "STOPPING=1" in messages
        assert daemon.proc.wait(timeout=30) == 0  # type: ignore[union-attr]


def test_sigint_stops_cleanly(daemon_factory: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    daemon = daemon_factory(f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{tmp_path}/c"\n')
    os.kill(daemon.proc.pid, signal.SIGINT)  # type: ignore[union-attr]
    assert daemon.proc.wait(timeout=30) == 0  # type: ignore[union-attr]
    assert "stopped" in daemon.log()
    # The lock is released: another daemon can start on the same state at once.
    daemon.start()
    assert daemon.terminate() == 0
