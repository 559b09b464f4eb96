"""A stalled ingest loop turns /healthz to 503 and stops feeding the systemd watchdog."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bridge.config import MetricsSettings, default_config
from bridge.daemon import Daemon
from bridge.events import hook_envelope
from bridge.spool import write_event
from bridge.store import NixStore

OUT = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hcb-stall"
DRV = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hcb-stall.drv"


class StuckStore(NixStore):
    """A store whose output lookup hangs until released, as a read of a FIFO once did."""

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "entered", threading.Event())
        object.__setattr__(self, "release", threading.Event())

    def resolve_outputs(self, drv_path: str) -> list[str]:
        self.entered.set()  # type: ignore[attr-defined]
        self.release.wait(60)  # type: ignore[attr-defined]
        return [OUT]

    def invalid_paths(self, paths: Sequence[str]) -> set[str]:
        return set()


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    address = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # fed every 0.2 s while healthy
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield sock
    sock.close()


def received(sock: socket.socket, seconds: float) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            messages.append(sock.recv(4096).decode())
    return messages


def test_stalled_ingest_is_unhealthy_and_starves_the_watchdog(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    config = replace(
        default_config(tmp_path / "state"),
        metrics=MetricsSettings(listen_address="127.0.0.1", port=0),
    )
    store = StuckStore()
    daemon = Daemon(
        config,
        registry=CollectorRegistry(),
        store=store,
        backends={},
        ingest_stall_seconds=0.5,
    )
    daemon.start()
    stop = threading.Event()
    runner = threading.Thread(target=daemon.run_until, args=(stop,), daemon=True)
    runner.start()
    try:
        assert daemon.server is not None
        port = daemon.server.port
        assert healthz(port)[0] == 200
        assert "WATCHDOG=1" in received(notify_socket, 0.6)

        write_event(daemon.layout, "hook", hook_envelope(DRV, "", time.time()))
        assert store.entered.wait(10)  # type: ignore[attr-defined]
        time.sleep(0.8)  # beyond the stall bound
        code, body = healthz(port)
        assert code == 503 and "ingest loop stalled" in body
        received(notify_socket, 0.3)  # drain what was sent before the stall was seen
        assert "WATCHDOG=1" not in received(notify_socket, 0.8)

        store.release.set()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while healthz(port)[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert healthz(port)[0] == 200
        assert "WATCHDOG=1" in received(notify_socket, 0.8)
    finally:
        store.release.set()  # type: ignore[attr-defined]
        stop.set()
        runner.join(timeout=30)
