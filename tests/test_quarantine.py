"""bridge/quarantine.py: reading quarantine/ for people, counting each rejected file once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bridge.quarantine import RejectionCounter, read_reason, summarize
from bridge.spool import SpoolLayout, quarantine_bytes
from bridge.statedb import StateDb


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    spool = SpoolLayout(tmp_path / "spool")
    spool.ensure()
    return spool


def test_each_file_is_counted_once_even_with_a_new_counter_on_the_same_database(
    layout: SpoolLayout, tmp_path: Path
) -> None:
    database = tmp_path / "queue.sqlite"
    counted: list[str] = []
    quarantine_bytes(layout, "hydra", b"{", "invalid_json", "bad", 100.0)
    queue = StateDb(database)
    try:
        counter = RejectionCounter(layout, queue, counted.append, lambda: 200.0)
        assert counter.check() == 1 and counted == ["invalid_json"]
        assert counter.check() == 0
    finally:
        queue.close()
    # A restart: a new process, the same database.
    quarantine_bytes(layout, "hydra", b"[]", "invalid_event", "not an object", 300.0)
    queue = StateDb(database)
    try:
        counter = RejectionCounter(layout, queue, counted.append, lambda: 400.0)
        assert counter.check() == 1
        assert counted == ["invalid_json", "invalid_event"]
    finally:
        queue.close()


def test_files_the_daemon_counted_itself_are_not_counted_again(
    layout: SpoolLayout, tmp_path: Path
) -> None:
    counted: list[str] = []
    queue = StateDb(tmp_path / "queue.sqlite")
    try:
        counter = RejectionCounter(layout, queue, counted.append, lambda: 1.0)
        target = quarantine_bytes(layout, "hydra", b"x", "too_large", "big", 1.0)
        assert counter.claim(target, "too_large") is True
        assert counter.claim(target, "too_large") is False
        assert counter.check() == 0 and counted == []
    finally:
        queue.close()


def test_removed_files_are_forgotten_and_odd_reason_files_use_a_bounded_label(
    layout: SpoolLayout, tmp_path: Path
) -> None:
    counted: list[str] = []
    queue = StateDb(tmp_path / "queue.sqlite")
    try:
        counter = RejectionCounter(layout, queue, counted.append, lambda: 1.0)
        (layout.quarantine / "odd.json.reason").write_text('{"reason": "made-up"}')
        (layout.quarantine / "broken.json.reason").write_text("{not json")
        assert counter.check() == 2 and counted == ["invalid_event", "invalid_event"]
        assert queue.quarantine_counted() == {"odd.json.reason", "broken.json.reason"}
        (layout.quarantine / "odd.json.reason").unlink()
        counter.check()
        assert queue.quarantine_counted() == {"broken.json.reason"}
    finally:
        queue.close()
    entry = read_reason(layout, "broken.json.reason")
    assert entry.file == "broken.json" and entry.message.startswith("cannot read the reason")


def test_summary_counts_files_and_lists_the_newest_first(layout: SpoolLayout) -> None:
    for index in range(7):
        quarantine_bytes(layout, "hydra", b"{", "invalid_json", f"message {index}", 10.0 + index)
    summary = summarize(layout, newest=3)
    assert summary.count == 7 and summary.error is None
    assert [entry.message for entry in summary.newest] == ["message 6", "message 5", "message 4"]
    record = json.loads(next(layout.quarantine.glob("*.reason")).read_text())
    assert record["reason"] == "invalid_json"


def test_summary_of_a_spool_without_quarantine(tmp_path: Path) -> None:
    summary = summarize(SpoolLayout(tmp_path / "none"))
    assert summary.count == 0 and summary.newest == () and summary.error is None


def test_undecodable_file_names_are_counted_once_and_shown_escaped(
    layout: SpoolLayout, tmp_path: Path
) -> None:
    counted: list[str] = []
    raw = os.fsencode(layout.quarantine) + b"/bad-\xff.json.reason"
    with open(raw, "w") as handle:
        json.dump({"reason": "invalid_json", "file": os.fsdecode(b"bad-\xff.json")}, handle)
    queue = StateDb(tmp_path / "queue.sqlite")
    try:
        counter = RejectionCounter(layout, queue, counted.append, lambda: 1.0)
        assert counter.check() == 1 and counter.check() == 0
        assert queue.quarantine_counted() == {"bad-\\xff.json.reason"}
    finally:
        queue.close()
    (entry,) = summarize(layout).newest
    assert entry.file == "bad-\\xff.json"
    entry.file.encode("utf-8")  # printable anywhere
