"""bridge/watcher.py: real watchdog (inotify) on real directories."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.watcher import Notification, SpoolWatcher

SETTLE = 0.3  # how long to listen for notifications that must not come


class Watch:
    """A SpoolWatcher on tmp_path/incoming (and what else a test asks for), and its sink."""

    def __init__(self, tmp_path: Path) -> None:
        self.incoming = tmp_path / "incoming"
        self.incoming.mkdir()
        self.hook = tmp_path / "hook"
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        self.sink: queue.SimpleQueue[Notification | None] = queue.SimpleQueue()
        self.watchers: list[SpoolWatcher] = []

    def watcher(self, *also: Path) -> SpoolWatcher:
        watcher = SpoolWatcher(self.incoming, self.sink, also=also)
        self.watchers.append(watcher)
        return watcher

    def until(self, wanted: Notification, timeout: float = 10.0) -> list[Notification]:
        """Every notification up to and including `wanted`; fail if it does not come."""
        seen: list[Notification] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.sink.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no notification {wanted} within {timeout}s; saw {seen}")
            assert item is not None
            seen.append(item)
            if item == wanted:
                return seen

    def quiet(self) -> list[Notification | None]:
        """Whatever arrives within SETTLE seconds."""
        time.sleep(SETTLE)
        found = []
        while True:
            try:
                found.append(self.sink.get_nowait())
            except queue.Empty:
                return found


@pytest.fixture
def w(tmp_path: Path) -> Iterator[Watch]:
    watch = Watch(tmp_path)
    yield watch
    for watcher in watch.watchers:
        watcher.stop()


def test_a_file_written_in_place_is_notified_created_then_closed(w: Watch) -> None:
    watcher = w.watcher()
    watcher.start()
    path = w.incoming / "event.json"
    with path.open("wb") as handle:
        handle.write(b"{")
        handle.flush()
        assert w.until((path, False)) == [(path, False)]
        handle.write(b"}")
    seen = w.until((path, True))
    assert set(seen) <= {(path, False), (path, True)}


def test_a_file_renamed_within_the_watched_directory_is_notified_as_complete(w: Watch) -> None:
    source = w.incoming / "event.json.tmp"
    source.write_bytes(b"{}")
    watcher = w.watcher()
    watcher.start()
    target = w.incoming / "event.json"
    os.rename(source, target)
    assert w.until((target, True)) == [(target, True)]


def test_a_file_renamed_in_from_an_unwatched_directory_is_notified_as_complete(
    w: Watch,
) -> None:
    """What producers do (tmp/ to incoming/). inotify reports only IN_MOVED_TO here, with no
    IN_MOVED_FROM to pair it with; watchdog's full events make that a move, not a
    creation, so ingest knows the writer is done."""
    watcher = w.watcher()
    watcher.start()
    source = w.tmp / "w-1"
    source.write_bytes(b"{}")
    target = w.incoming / "event.json"
    os.rename(source, target)
    assert w.until((target, True)) == [(target, True)]
    assert w.quiet() == []


def test_a_file_moved_out_to_an_unwatched_directory_is_not_notified(w: Watch) -> None:
    path = w.incoming / "event.json"
    path.write_bytes(b"{}")
    watcher = w.watcher()
    watcher.start()
    os.rename(path, w.tmp / "taken.json")
    time.sleep(0.6)  # watchdog holds an unpaired IN_MOVED_FROM 0.5 s for its IN_MOVED_TO
    assert w.quiet() == []


def test_directories_and_other_directories_are_not_notified(w: Watch) -> None:
    watcher = w.watcher()
    watcher.start()
    (w.incoming / "subdir").mkdir()
    (w.tmp / "elsewhere.json").write_bytes(b"{}")
    assert w.quiet() == []


def test_a_file_read_and_closed_without_writing_is_not_notified(w: Watch) -> None:
    path = w.incoming / "old.json"
    path.write_bytes(b"{}")
    watcher = w.watcher()
    watcher.start()
    assert path.read_bytes() == b"{}"
    assert w.quiet() == []


def test_also_directories_are_watched_too(w: Watch) -> None:
    w.hook.mkdir()
    watcher = w.watcher(w.hook)
    watcher.start()
    assert watcher.alive()
    path = w.hook / "hook-event.json"
    path.write_bytes(b"{}\n")
    seen = w.until((path, True))
    assert set(seen) <= {(path, False), (path, True)}
    incoming = w.incoming / "event.json"
    incoming.write_bytes(b"{}")
    assert (incoming, True) in w.until((incoming, True))


def test_alive_only_between_start_and_stop(w: Watch) -> None:
    watcher = w.watcher()
    assert not watcher.alive()
    watcher.start()
    assert watcher.alive()
    watcher.stop()
    assert not watcher.alive()
    watcher.stop()  # twice is harmless
    (w.incoming / "after-stop.json").write_bytes(b"{}")
    assert w.quiet() == []


def test_a_replaced_directory_is_not_alive_until_restarted(w: Watch) -> None:
    watcher = w.watcher()
    watcher.start()
    os.rename(w.incoming, w.incoming.with_name("incoming.old"))
    assert not watcher.alive()
    w.incoming.mkdir()
    assert not watcher.alive()  # a new directory of the same name is not the watched one
    watcher.stop()
    watcher.start()
    assert watcher.alive()
    path = w.incoming / "after-restart.json"
    path.write_bytes(b"{}")
    assert (path, True) in w.until((path, True))


def test_a_removed_directory_is_not_alive(w: Watch) -> None:
    watcher = w.watcher()
    watcher.start()
    w.incoming.rmdir()
    assert not watcher.alive()


def test_start_fails_when_the_directory_is_missing(w: Watch) -> None:
    w.incoming.rmdir()
    watcher = w.watcher()
    with pytest.raises(OSError):
        watcher.start()
    assert not watcher.alive()


def test_an_also_directory_missing_at_start_is_watched_after_a_restart(w: Watch) -> None:
    watcher = w.watcher(w.hook)
    watcher.start()
    assert watcher.alive()  # missing then, missing now: unchanged
    w.hook.mkdir()
    assert not watcher.alive()  # it appeared: a restart is due to watch it
    watcher.stop()
    watcher.start()
    assert watcher.alive()
    path = w.hook / "hook-event.json"
    path.write_bytes(b"{}\n")
    assert (path, True) in w.until((path, True))


def test_a_replaced_also_directory_is_not_alive(w: Watch) -> None:
    w.hook.mkdir()
    watcher = w.watcher(w.hook)
    watcher.start()
    os.rename(w.hook, w.hook.with_name("hook.old"))
    assert not watcher.alive()
