"""bridge/statelock.py: one daemon per state directory; status and retry can tell."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.statelock import StateLock, StateLocked, daemon_running, lock_path


def test_the_lock_is_exclusive_and_visible_until_released(tmp_path: Path) -> None:
    assert not daemon_running(tmp_path)  # no lock file at all
    first = StateLock(tmp_path)
    first.acquire()
    assert lock_path(tmp_path).is_file()
    assert daemon_running(tmp_path)
    second = StateLock(tmp_path)
    with pytest.raises(
        StateLocked, match=f"another hydra-cachix-bridge daemon is using {tmp_path}"
    ):
        second.acquire()
    first.release()
    first.release()  # twice is harmless
    assert not daemon_running(tmp_path)  # the file stays, unlocked
    second.acquire()
    assert daemon_running(tmp_path)
    second.release()


def test_a_missing_state_directory_cannot_be_locked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        StateLock(tmp_path / "missing").acquire()
    assert not daemon_running(tmp_path / "missing")
