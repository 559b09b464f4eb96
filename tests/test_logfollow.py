"""bridge/logfollow.py: following real log files into a real queue."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client import CollectorRegistry

from bridge.clock import SystemClock
from bridge.config import CacheConfig, Config, LogSource
from bridge.events import Event
from bridge.intake import Intake, Recorded
from bridge.logfollow import LogFollower, extract_store_paths
from bridge.matching import Rule
from bridge.statedb import StateDb
from exporter.metrics import BridgeMetrics
from tests.dbrows import event_rows

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"


def path(n: int, name: str = "pkg") -> str:
    digest = "".join(NIX_BASE32[(n * 7 + i * 13) % 32] for i in range(32))
    return f"/nix/store/{digest}-{name}-{n}"


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.log = tmp_path / "logs" / "hook.log"
        self.log.parent.mkdir()
        self.db = tmp_path / "state" / "queue.sqlite3"
        self.config = Config(
            state_dir=tmp_path / "state",
            spool_dir=tmp_path / "spool",
            caches=MappingProxyType(
                {"c": CacheConfig(name="c", backend="nix-copy", uri="file:///tmp/unused")}
            ),
            rules=(Rule(caches=("c",)),),
            log_sources=(LogSource(self.log),),
        )
        self.queue = StateDb(self.db)
        self.metrics = BridgeMetrics(
            CollectorRegistry(),
            version="test",
            caches={"c": "nix-copy"},
        )
        self.followers: list[LogFollower] = []
        self.counted: list[tuple[Event, str, dict[str, int]]] = []

    def follower(self) -> LogFollower:
        counted = self.counted

        class CountingIntake(Intake):
            def announce(self, recorded: Iterable[Recorded]) -> int:
                recorded = list(recorded)
                counted.extend((r.event, r.outcome, r.enqueued) for r in recorded)
                return super().announce(recorded)

        intake = CountingIntake(self.config.rules, self.metrics, SystemClock())
        follower = LogFollower(self.config, self.queue, intake, SystemClock())
        self.followers.append(follower)
        return follower

    def append(self, text: str, target: Path | None = None) -> None:
        with open(target or self.log, "a", encoding="utf-8") as handle:
            handle.write(text)

    def queued(self) -> list[str]:
        return [p for (p,) in self.queue.conn.execute("SELECT path FROM items ORDER BY id")]

    def saved_offset(self) -> int | None:
        offset = self.queue.log_offset(str(self.log))
        return None if offset is None else offset.offset


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    for follower in harness.followers:
        follower.close()
    harness.queue.close()


def test_appended_lines_with_store_paths_are_queued(h: Harness) -> None:
    h.append("")
    follower = h.follower()
    assert follower.poll() == {}
    assert follower.readable() == [True]
    h.append(f"post-build-hook: built {path(1)} {path(2)}\n")
    assert follower.poll() == {"c": 2}
    h.append(f"copying {path(3)}\nnothing here\n")
    assert follower.poll() == {"c": 1}
    assert h.queued() == [path(1), path(2), path(3)]
    assert h.queue.counts() == {("c", "pending"): 3}
    assert h.saved_offset() == h.log.stat().st_size
    sources = {row[0] for row in h.queue.conn.execute("SELECT source FROM events")}
    assert sources == {"log"}
    assert [c[1:] for c in h.counted] == [("matched", {"c": 2}), ("matched", {"c": 1})]


def test_missing_log_file_is_waited_for(h: Harness) -> None:
    follower = h.follower()
    assert follower.poll() == {}
    assert follower.readable() == [False]
    h.append(f"{path(1)}\n")
    assert follower.poll() == {"c": 1}
    assert follower.readable() == [True]


def test_partial_last_line_waits_until_completed(h: Harness) -> None:
    follower = h.follower()
    h.append(f"done {path(1)}\nbuilding {path(2)}")
    assert follower.poll() == {"c": 1}
    assert h.queued() == [path(1)]
    assert follower.poll() == {}
    # The path at the end of the incomplete line was not cut short either.
    h.append("-extra and more\n")
    assert follower.poll() == {"c": 1}
    assert h.queued() == [path(1), path(2) + "-extra"]


def test_offsets_survive_a_new_follower(h: Harness) -> None:
    first = h.follower()
    h.append(f"{path(1)}\n{path(2)}\n")
    assert first.poll() == {"c": 2}
    first.close()
    events_before = event_rows(h.queue)

    # Written while nobody follows the file: must not be lost.
    h.append(f"{path(3)}\n")
    second = h.follower()
    assert second.poll() == {"c": 1}
    assert event_rows(h.queue) == events_before + 1  # old lines were not read again
    assert h.queued() == [path(1), path(2), path(3)]
    second.close()

    third = h.follower()
    assert third.poll() == {}
    assert event_rows(h.queue) == events_before + 1


def test_offset_is_not_reused_for_another_file_after_restart(h: Harness) -> None:
    first = h.follower()
    h.append(f"{path(1)}\n{path(2)}\n{path(3)}\n")
    assert first.poll() == {"c": 3}
    first.close()
    # Rotated while the daemon was down: the new file is read from its start.
    os.rename(h.log, h.log.with_suffix(".log.1"))
    h.append(f"{path(4)}\n")
    second = h.follower()
    assert second.poll() == {"c": 1}
    assert h.queued()[-1] == path(4)


def test_rotation_by_rename(h: Harness) -> None:
    follower = h.follower()
    h.append(f"{path(1)}\n")
    assert follower.poll() == {"c": 1}
    rotated = h.log.with_name("hook.log.1")
    os.rename(h.log, rotated)
    # The writer still had the old file open for one more line, then reopened the name.
    h.append(f"{path(2)}\n", target=rotated)
    h.append(f"{path(3)}\n")
    assert follower.poll() == {"c": 2}
    assert h.queued() == [path(1), path(2), path(3)]
    h.append(f"{path(4)}\n")
    assert follower.poll() == {"c": 1}
    assert h.saved_offset() == h.log.stat().st_size
    # The old file is not followed any more.
    h.append(f"{path(5)}\n", target=rotated)
    assert follower.poll() == {}


def test_rotation_by_rename_before_the_new_file_exists(h: Harness) -> None:
    follower = h.follower()
    h.append(f"{path(1)}\n")
    assert follower.poll() == {"c": 1}
    rotated = h.log.with_name("hook.log.1")
    os.rename(h.log, rotated)
    h.append(f"{path(2)}\n", target=rotated)
    assert follower.poll() == {"c": 1}  # the rest of the old file
    h.append(f"{path(3)}\n")
    assert follower.poll() == {"c": 1}
    assert h.queued() == [path(1), path(2), path(3)]


def test_rotation_by_truncation(h: Harness) -> None:
    follower = h.follower()
    h.append(f"first {path(1)}\nsecond {path(2)}\n")
    assert follower.poll() == {"c": 2}
    inode = h.log.stat().st_ino
    with open(h.log, "r+", encoding="utf-8") as handle:
        handle.truncate(0)
    h.append(f"{path(3)}\n")
    assert h.log.stat().st_ino == inode
    assert follower.poll() == {"c": 1}
    assert h.queued() == [path(1), path(2), path(3)]
    assert h.saved_offset() == h.log.stat().st_size
    h.append(f"{path(4)}\n")
    assert follower.poll() == {"c": 1}


def test_truncation_followed_by_as_much_new_text_before_a_poll(h: Harness) -> None:
    """A cut file that grew back to (or past) the old offset between two polls."""
    follower = h.follower()
    h.append(f"{path(1)}\n")
    assert follower.poll() == {"c": 1}
    with open(h.log, "r+", encoding="utf-8") as handle:
        handle.truncate(0)
    h.append(f"{path(2)}\n{path(3)}\n")  # longer than what was there
    assert follower.poll() == {"c": 2}
    assert h.queued() == [path(1), path(2), path(3)]


def test_truncation_while_stopped_is_noticed_at_start(h: Harness) -> None:
    h.append(f"{path(1)}\n")
    assert h.follower().poll() == {"c": 1}
    with open(h.log, "r+", encoding="utf-8") as handle:
        handle.truncate(0)
    h.append(f"{path(2)}\n")  # the same length as before: only the content tells
    assert h.follower().poll() == {"c": 1}
    assert h.queued() == [path(1), path(2)]


def test_lines_without_store_paths_queue_nothing(h: Harness) -> None:
    follower = h.follower()
    h.append("starting build\n/nix/store/too-short-name\n/nix/var/nix/db\n\n")
    assert follower.poll() == {}
    assert h.queued() == []
    assert event_rows(h.queue) == 0
    assert h.counted == []
    assert h.saved_offset() == h.log.stat().st_size


def test_derivation_paths_are_ignored(h: Harness) -> None:
    follower = h.follower()
    drv = path(9, "hello-2.12") + ".drv"
    h.append(f"building '{drv}'...\n")
    assert follower.poll() == {}
    h.append(f"built '{drv}' -> {path(1, 'hello-2.12')}\n")
    assert follower.poll() == {"c": 1}
    assert h.queued() == [path(1, "hello-2.12")]


def test_extract_store_paths() -> None:
    text = (
        f"a {path(1)}/bin/hello b '{path(2)}', {path(1)} {path(3)}.drv /nix/store/not-a-hash-name"
    ).encode()
    assert extract_store_paths(text) == [path(1), path(2)]


def test_overlong_line_is_skipped_and_following_lines_still_read(h: Harness) -> None:
    follower = h.follower()
    h.append("x" * (3 * 1024 * 1024 // 2) + "\n" + f"then {path(7)}\n")
    assert follower.poll() == {"c": 1}
    assert h.queued() == [path(7)]
    assert h.saved_offset() == h.log.stat().st_size


def test_a_fifo_as_log_source_is_not_read_and_does_not_block(h: Harness) -> None:
    """Issue 11: nothing the daemon opens may block; a FIFO is no log file."""
    os.mkfifo(h.log)
    follower = h.follower()
    assert follower.poll() == {}
    assert follower.readable() == [False]
    h.log.unlink()
    h.append(f"{path(1)}\n")
    assert follower.poll() == {"c": 1}
    assert follower.readable() == [True]


def test_lines_whose_commit_failed_are_read_again(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    h.append("")
    follower = h.follower()
    follower.poll()
    h.append(f"built {path(1)}\n")
    real = follower.intake.record

    def disk_full(*args: object, **kwargs: object) -> object:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(follower.intake, "record", disk_full)
    with pytest.raises(sqlite3.OperationalError):
        follower.poll()
    assert h.queued() == [] and not h.saved_offset()
    monkeypatch.setattr(follower.intake, "record", real)
    assert follower.poll() == {"c": 1}  # the same line, not skipped
    assert h.queued() == [path(1)]
    assert h.saved_offset() == h.log.stat().st_size
