"""Fixtures for integration tests: a daemon subprocess with a config of the test's choosing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.daemonproc import DaemonProcess, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Make daemons from a TOML body; state, spool and metrics port are filled in."""
    made: list[DaemonProcess] = []
    port = free_port()

    def make(
        body: str, *, env: dict[str, str] | None = None, start: bool = True, extra_top: str = ""
    ) -> DaemonProcess:
        state = tmp_path / "state"
        config = tmp_path / "bridge.toml"
        config.write_text(
            f'state_dir = "{state}"\nlog_level = "debug"\n{extra_top}'
            f"[metrics]\nport = {port}\n"
            f"[spool]\nrescan_seconds = 2\n"
            f"{body}"
        )
        daemon = DaemonProcess(
            config, port, tmp_path / "daemon.log", env=dict(os.environ, **(env or {}))
        )
        made.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    for daemon in made:
        daemon.cleanup()
