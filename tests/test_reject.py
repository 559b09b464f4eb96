"""bridge/reject.py: a rejected spool file goes into quarantine/ once, counted once."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import reject as reject_module
from bridge.quarantine import RejectionCounter, read_reason, reason_files
from bridge.reject import Rejecter
from bridge.spool import SpoolLayout
from bridge.statedb import StateDb


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.layout = SpoolLayout(tmp_path / "spool")
        self.layout.ensure()
        self.queue = StateDb(tmp_path / "state.sqlite3")
        self.counted: list[str] = []
        self.seen: dict[str, tuple[int, int, int]] = {}
        counter = RejectionCounter(self.layout, self.queue, self.counted.append, lambda: 5.0)
        self.rejecter = Rejecter(self.layout, self.queue, counter, lambda: 7.0, self.seen)


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    setup = Setup(tmp_path)
    yield setup
    setup.queue.close()


def test_an_incoming_file_is_moved_into_quarantine_with_its_reason(s: Setup) -> None:
    path = s.layout.incoming / "1-a.json"
    path.write_bytes(b"{")
    assert s.rejecter.reject(path, "invalid_json", "invalid JSON: line 1")
    assert not path.exists()
    [name] = reason_files(s.layout)
    entry = read_reason(s.layout, name)
    assert (entry.file, entry.reason, entry.message) == (
        "1-a.json",
        "invalid_json",
        "invalid JSON: line 1",
    )
    assert s.counted == ["invalid_json"]
    # The rescan of quarantine/ does not count it a second time.
    assert RejectionCounter(s.layout, s.queue, s.counted.append, lambda: 9.0).check() == 0
    assert s.counted == ["invalid_json"]


def test_a_hook_file_is_copied_and_remembered_as_consumed(s: Setup) -> None:
    path = s.layout.hook / "2-b.json"
    path.write_bytes(b'{"version": 1')
    info = os.lstat(path)
    assert s.rejecter.reject(
        path, "incomplete_event", "hook file has no final newline", data=b'{"version": 1'
    )
    assert path.read_bytes() == b'{"version": 1'  # the hook directory keeps its file
    identity = (info.st_ino, info.st_mtime_ns, info.st_size)
    assert s.seen == {"2-b.json": identity}
    assert s.queue.hook_files() == {"2-b.json": identity}
    [name] = reason_files(s.layout)
    assert read_reason(s.layout, name).reason == "incomplete_event"
    assert s.counted == ["incomplete_event"]


def test_a_file_gone_meanwhile_is_not_counted(s: Setup) -> None:
    assert not s.rejecter.reject(s.layout.incoming / "gone.json", "invalid_json", "x")
    assert not s.rejecter.reject(s.layout.hook / "gone.json", "invalid_json", "x")
    assert s.counted == [] and reason_files(s.layout) == [] and s.seen == {}


def test_a_hook_file_the_database_refuses_is_neither_copied_nor_counted(
    s: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = s.layout.hook / "3-c.json"
    path.write_bytes(b"[\n")

    def disk_full(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    # Refused at the last write of the transaction, after the copy is made.
    monkeypatch.setattr(s.rejecter.counter, "mark", disk_full)
    with pytest.raises(sqlite3.OperationalError):
        s.rejecter.reject(path, "invalid_json", "x", data=b"[\n")
    assert os.listdir(s.layout.quarantine) == []
    assert s.counted == [] and s.seen == {} and s.queue.hook_files() == {}
    monkeypatch.undo()
    # The next pass: one copy, counted once.
    assert s.rejecter.reject(path, "invalid_json", "x", data=b"[\n")
    assert s.rejecter.counter.check() == 0
    [name] = reason_files(s.layout)
    assert (s.layout.quarantine / name.removesuffix(".reason")).read_bytes() == b"[\n"
    assert s.counted == ["invalid_json"] and list(s.seen) == ["3-c.json"]


def test_a_hook_file_that_cannot_be_copied_is_tried_again(
    s: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = s.layout.hook / "4-d.json"
    path.write_bytes(b"[\n")

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reject_module, "quarantine_bytes", no_space)
    assert not s.rejecter.reject(path, "invalid_json", "x", data=b"[\n")
    assert s.queue.hook_files() == {} and s.seen == {} and s.counted == []
    monkeypatch.undo()
    assert s.rejecter.reject(path, "invalid_json", "x", data=b"[\n")
    assert s.counted == ["invalid_json"] and len(reason_files(s.layout)) == 1
