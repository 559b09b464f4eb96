"""bridge/statedb.py against a real SQLite file."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from bridge.events import Event
from bridge.statedb import CacheHealth, DeadLetter, Item, LogOffset, StateDb, StateDbError
from exporter.vocabulary import ItemState
from tests.dbrows import event_rows

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
T0 = 1_700_000_000.0


def store_path(name: str) -> str:
    """A syntactically valid store path, derived from name (nothing needs to exist)."""
    digest = hashlib.sha256(name.encode()).digest()
    return "/nix/store/" + "".join(NIX_BASE32[b % 32] for b in digest[:32]) + f"-{name}"


def hydra_event(*paths: str, build_id: int = 7, finished_at: float | None = T0 - 30) -> Event:
    return Event(
        source="hydra",
        received_at=T0 - 10,
        out_paths=tuple(paths),
        drv_path=store_path("x.drv"),
        build_id=build_id,
        project="proj",
        jobset="main",
        job="pkg.x86_64-linux",
        build_status=0,
        finished_at=finished_at,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "queue.sqlite3"


@pytest.fixture
def queue(db_path: Path) -> Iterator[StateDb]:
    q = StateDb(db_path)
    yield q
    q.close()


def record(
    queue: StateDb,
    targets: Sequence[tuple[str, str]],
    *,
    spool_name: str | None,
    now: float = T0,
    event: Event | None = None,
) -> dict[str, int] | None:
    event = event or hydra_event(*dict.fromkeys(p for _, p in targets))
    with queue.transaction():
        return queue.record_event(
            event, spool_name=spool_name, outcome="matched", targets=targets, now=now
        )


def row(queue: StateDb, cache: str, path: str) -> sqlite3.Row:
    queue.conn.row_factory = sqlite3.Row
    try:
        result = queue.conn.execute(
            "SELECT * FROM items WHERE cache = ? AND path = ?", (cache, path)
        ).fetchone()
    finally:
        queue.conn.row_factory = None
    assert result is not None, f"no item ({cache}, {path})"
    return result


def states(queue: StateDb) -> dict[tuple[str, str], int]:
    return queue.counts()


# -- record_event ------------------------------------------------------------------------


def test_record_event_enqueues_every_target(queue: StateDb) -> None:
    p1, p2 = store_path("one"), store_path("two")
    enqueued = record(queue, [("a", p1), ("a", p2), ("b", p1)], spool_name="ev-1.json")
    assert enqueued == {"a": 2, "b": 1}
    assert states(queue) == {("a", "pending"): 2, ("b", "pending"): 1}
    assert event_rows(queue) == 1
    assert queue.seen_spool_file("ev-1.json")
    assert not queue.seen_spool_file("ev-2.json")

    items = queue.claim("a", 10, T0)
    assert [i.path for i in items] == [p1, p2]
    first = items[0]
    assert first.attempts == 0
    assert first.origin_at == T0 - 30  # the build's stopTime, not the record time
    assert first.enqueued_at == T0
    assert first.source == "hydra"
    assert (first.project, first.jobset) == ("proj", "main")  # for per_jobset metrics
    assert queue.conn.execute(
        "SELECT build_id, project, jobset, job FROM events WHERE id = ?", (first.event_id,)
    ).fetchone() == (7, "proj", "main", "pkg.x86_64-linux")


def test_origin_falls_back_to_received_time(queue: StateDb) -> None:
    p = store_path("nofinish")
    event = hydra_event(p, finished_at=None)
    record(queue, [("a", p)], spool_name="x.json", event=event)
    (item,) = queue.claim("a", 1, T0)
    assert item.origin_at == event.received_at


def test_pending_inflight_or_pushed_item_is_not_queued_again(queue: StateDb) -> None:
    p1, p2, p3 = store_path("p1"), store_path("p2"), store_path("p3")
    assert record(queue, [("a", p1), ("a", p2), ("a", p3)], spool_name="1.json") == {"a": 3}

    # p1 pushed, p2 in flight, p3 still pending.
    claimed = queue.claim("a", 2, T0)
    assert [i.path for i in claimed] == [p1, p2]
    queue.mark_pushed([claimed[0]], T0 + 1)

    again = record(queue, [("a", p1), ("a", p2), ("a", p3)], spool_name="2.json", now=T0 + 5)
    assert again == {}
    assert event_rows(queue) == 2
    assert row(queue, "a", p1)["state"] == "pushed"
    assert row(queue, "a", p2)["state"] == "inflight"
    assert row(queue, "a", p3)["state"] == "pending"
    # The second event did not reset the original enqueue time of the pending item.
    assert row(queue, "a", p3)["enqueued_at"] == T0
    assert states(queue) == {("a", "pushed"): 1, ("a", "inflight"): 1, ("a", "pending"): 1}


def test_dead_and_skipped_items_are_queued_again_by_a_new_event(queue: StateDb) -> None:
    dead_path, skipped_path = store_path("dead"), store_path("skipped")
    record(queue, [("a", dead_path), ("a", skipped_path)], spool_name="1.json")
    items = queue.claim("a", 2, T0)
    by_path = {i.path: i for i in items}
    dead = queue.mark_failed(
        [([by_path[dead_path]], T0 + 10)],
        reason="exit_status",
        error="boom",
        max_attempts=1,
        now=T0 + 1,
    )
    assert [d.path for d in dead] == [dead_path]
    queue.mark_skipped([by_path[skipped_path]], "invalid_path", "gone", T0 + 1)
    assert row(queue, "a", dead_path)["state"] == "dead"
    assert row(queue, "a", skipped_path)["state"] == "skipped"

    again = record(queue, [("a", dead_path), ("a", skipped_path)], spool_name="2.json", now=T0 + 20)
    assert again == {"a": 2}
    for path in (dead_path, skipped_path):
        r = row(queue, "a", path)
        assert r["state"] == "pending"
        assert r["attempts"] == 0
        assert r["batch_limit"] is None
        assert r["last_error"] is None
        assert r["enqueued_at"] == T0 + 20
    # The split limit is gone: both come back together in one batch, due right away.
    assert {i.path for i in queue.claim("a", 10, T0 + 20)} == {dead_path, skipped_path}


def test_duplicate_spool_name_returns_none_and_queues_nothing(queue: StateDb) -> None:
    p1, p2 = store_path("d1"), store_path("d2")
    assert record(queue, [("a", p1)], spool_name="same.json") == {"a": 1}
    assert record(queue, [("a", p2)], spool_name="same.json") is None
    assert event_rows(queue) == 1
    assert states(queue) == {("a", "pending"): 1}


def test_events_without_spool_name_are_never_duplicates(queue: StateDb) -> None:
    p1, p2 = store_path("l1"), store_path("l2")
    assert record(queue, [("a", p1)], spool_name=None) == {"a": 1}
    assert record(queue, [("a", p2)], spool_name=None) == {"a": 1}
    assert event_rows(queue) == 2


def test_record_event_rolls_back_with_its_transaction(queue: StateDb) -> None:
    p = store_path("rollback")
    with pytest.raises(RuntimeError), queue.transaction():
        queue.record_event(
            hydra_event(p), spool_name="r.json", outcome="matched", targets=[("a", p)], now=T0
        )
        raise RuntimeError("crash before commit")
    assert event_rows(queue) == 0
    assert states(queue) == {}
    assert not queue.seen_spool_file("r.json")


# -- claim -------------------------------------------------------------------------------


def test_claim_honours_batch_size_and_marks_inflight(queue: StateDb) -> None:
    paths = [store_path(f"b{i}") for i in range(5)]
    record(queue, [("a", p) for p in paths], spool_name="1.json")
    first = queue.claim("a", 3, T0)
    assert [i.path for i in first] == paths[:3]
    assert states(queue) == {("a", "inflight"): 3, ("a", "pending"): 2}
    second = queue.claim("a", 3, T0)
    assert [i.path for i in second] == paths[3:]
    assert queue.claim("a", 3, T0) == []
    assert queue.claim("other-cache", 3, T0) == []


def test_claim_only_takes_items_of_that_cache(queue: StateDb) -> None:
    p = store_path("shared")
    record(queue, [("a", p), ("b", p)], spool_name="1.json")
    (item,) = queue.claim("b", 10, T0)
    assert item.cache == "b"
    assert states(queue) == {("a", "pending"): 1, ("b", "inflight"): 1}


def test_claim_honours_due_time(queue: StateDb) -> None:
    p = store_path("due")
    record(queue, [("a", p)], spool_name="1.json")
    items = queue.claim("a", 1, T0)
    queue.mark_failed(
        [(items, T0 + 100)], reason="exit_status", error="e", max_attempts=5, now=T0 + 1
    )
    assert queue.next_due_at("a") == T0 + 100
    assert queue.claim("a", 10, T0 + 99.9) == []
    (again,) = queue.claim("a", 10, T0 + 100)
    assert again.path == p
    assert again.attempts == 1
    assert queue.next_due_at("a") is None


def test_split_batch_limit_caps_later_claims(queue: StateDb) -> None:
    paths = [store_path(f"s{i}") for i in range(8)]
    record(queue, [("a", p) for p in paths], spool_name="1.json")
    batch = queue.claim("a", 8, T0)
    assert len(batch) == 8
    dead = queue.mark_failed(
        [(batch[:4], T0 + 1), (batch[4:], T0 + 1)],
        reason="exit_status",
        error="e",
        max_attempts=5,
        now=T0 + 1,
    )
    assert dead == []
    first = queue.claim("a", 32, T0 + 1)
    assert [i.path for i in first] == paths[:4]
    second = queue.claim("a", 32, T0 + 1)
    assert [i.path for i in second] == paths[4:]


def test_limit_one_item_is_claimed_alone(queue: StateDb) -> None:
    fresh = [store_path(f"f{i}") for i in range(3)]
    single = store_path("single")
    record(queue, [("a", single)], spool_name="0.json")
    (item,) = queue.claim("a", 1, T0)
    queue.mark_failed([([item], T0)], reason="exit_status", error="e", max_attempts=5, now=T0)
    record(queue, [("a", p) for p in fresh], spool_name="1.json")

    # The limit-1 item comes first (lowest id, same due time): it goes alone.
    alone = queue.claim("a", 32, T0)
    assert [i.path for i in alone] == [single]
    queue.release(alone, T0)
    queue.conn.execute("UPDATE items SET next_attempt_at = ? WHERE path = ?", (T0 + 5, single))
    # Behind fresh items, it does not join their batch either.
    batch = queue.claim("a", 32, T0 + 5)
    assert [i.path for i in batch] == fresh
    assert [i.path for i in queue.claim("a", 32, T0 + 5)] == [single]


# -- failures, dead letters, retry -------------------------------------------------------


def test_mark_failed_counts_attempts_and_schedules_retry(queue: StateDb) -> None:
    paths = [store_path(f"m{i}") for i in range(3)]
    record(queue, [("a", p) for p in paths], spool_name="1.json")
    batch = queue.claim("a", 3, T0)
    dead = queue.mark_failed(
        [(batch[:2], T0 + 40), (batch[2:], T0 + 50)],
        reason="timeout",
        error="timed out",
        max_attempts=3,
        now=T0 + 2,
    )
    assert dead == []
    for i, (path, due, limit) in enumerate(
        [(paths[0], T0 + 40, 2), (paths[1], T0 + 40, 2), (paths[2], T0 + 50, 1)]
    ):
        r = row(queue, "a", path)
        assert r["state"] == "pending", i
        assert r["attempts"] == 1
        assert r["next_attempt_at"] == due
        assert r["batch_limit"] == limit
        assert r["last_reason"] == "timeout"
        assert r["last_error"] == "timed out"
    (status,) = queue.cache_statuses(["a"])
    assert status.last_failure_at == T0 + 2
    assert status.last_error == "timed out"
    assert status.last_success_at is None


def test_only_a_path_that_failed_alone_is_dead_lettered(queue: StateDb) -> None:
    pair = [store_path("pair0"), store_path("pair1")]
    solo = store_path("solo")
    record(queue, [("a", p) for p in [*pair, solo]], spool_name="1.json")
    by_path = {i.path: i for i in queue.claim("a", 3, T0)}

    def fail(groups: list[list[Item]], max_attempts: int) -> list[Item]:
        return queue.mark_failed(
            [(g, T0) for g in groups],
            reason="exit_status",
            error="e",
            max_attempts=max_attempts,
            now=T0,
        )

    # A failed batch of two, split into two single-item groups, at max_attempts already:
    # neither path is known to be at fault, so both are retried (alone).
    assert fail([[by_path[pair[0]]], [by_path[pair[1]]]], 1) == []
    for path in pair:
        r = row(queue, "a", path)
        assert (r["state"], r["attempts"], r["batch_limit"]) == ("pending", 1, 1)
    # A path that failed alone below the limit is retried ...
    assert fail([[by_path[solo]]], 2) == []
    assert row(queue, "a", solo)["state"] == "pending"
    # ... and dead-lettered once its attempts reach max_attempts.
    claimed = [queue.claim("a", 3, T0) for _ in range(3)]
    assert [len(c) for c in claimed] == [1, 1, 1]  # every item now has batch limit 1
    (solo_again,) = next(c for c in claimed if c[0].path == solo)
    assert solo_again.attempts == 1
    dead = fail([[solo_again]], 2)
    assert [d.path for d in dead] == [solo]
    r = row(queue, "a", solo)
    assert (r["state"], r["attempts"], r["last_reason"]) == ("dead", 2, "exit_status")
    (pair0_again,) = next(c for c in claimed if c[0].path == pair[0])
    assert [d.path for d in fail([[pair0_again]], 1)] == [pair[0]]
    assert states(queue) == {("a", "dead"): 2, ("a", "inflight"): 1}


def make_dead(queue: StateDb, names: list[str], now: float = T0) -> list[Item]:
    record(queue, [("a", store_path(n)) for n in names], spool_name=f"{names[0]}.json", now=now)
    dead: list[Item] = []
    for item in queue.claim("a", len(names), now):
        dead += queue.mark_failed(
            [([item], now)], reason="exit_status", error="bad", max_attempts=1, now=now
        )
    assert len(dead) == len(names)
    return dead


def test_retry_dead_by_id_and_all(queue: StateDb) -> None:
    dead = make_dead(queue, ["r0", "r1", "r2"])
    record(queue, [("a", store_path("alive"))], spool_name="alive.json")
    alive_id = row(queue, "a", store_path("alive"))["id"]

    assert queue.retry_dead([dead[1].id], T0 + 5) == 1
    assert queue.retry_dead([dead[1].id, alive_id, 999_999], T0 + 5) == 0
    r = row(queue, "a", dead[1].path)
    assert (r["state"], r["attempts"], r["batch_limit"], r["next_attempt_at"]) == (
        "pending",
        0,
        None,
        T0 + 5,
    )
    assert row(queue, "a", dead[0].path)["state"] == "dead"

    assert queue.retry_dead(None, T0 + 6) == 2
    assert states(queue) == {("a", "pending"): 4}
    claimed = queue.claim("a", 10, T0 + 6)
    assert len(claimed) == 4  # no split limit left on any of them
    assert all(i.attempts == 0 for i in claimed)
    assert queue.retry_dead(None, T0 + 7) == 0


def test_release_and_release_all_inflight(queue: StateDb) -> None:
    paths = [store_path(f"i{i}") for i in range(4)]
    record(queue, [("a", p) for p in paths], spool_name="1.json")
    claimed = queue.claim("a", 3, T0)
    assert queue.release_all_inflight(T0 + 1) == 3
    assert states(queue) == {("a", "pending"): 4}
    assert all(row(queue, "a", p)["attempts"] == 0 for p in paths)
    assert queue.release_all_inflight(T0 + 2) == 0

    # release() only touches items that are still in flight.
    claimed = queue.claim("a", 4, T0 + 3)
    queue.mark_pushed(claimed[:1], T0 + 4)
    queue.release(claimed, T0 + 5)
    assert states(queue) == {("a", "pushed"): 1, ("a", "pending"): 3}


def test_prune_removes_only_old_pushed_and_skipped(queue: StateDb) -> None:
    names = ["old-pushed", "old-skipped", "old-dead", "old-pending", "new-pushed"]
    paths = {n: store_path(n) for n in names}
    record(queue, [("a", paths[n]) for n in names[:4]], spool_name="old.json", now=T0)
    record(queue, [("a", paths["new-pushed"])], spool_name="new.json", now=T0 + 500)
    by_path = {i.path: i for i in queue.claim("a", 10, T0 + 500)}
    queue.mark_pushed([by_path[paths["old-pushed"]]], T0 + 1)
    queue.mark_skipped([by_path[paths["old-skipped"]]], "invalid_path", "gone", T0 + 1)
    queue.mark_failed(
        [([by_path[paths["old-dead"]]], T0)], reason="r", error="e", max_attempts=1, now=T0 + 1
    )
    queue.release([by_path[paths["old-pending"]]], T0 + 1)
    queue.mark_pushed([by_path[paths["new-pushed"]]], T0 + 600)

    assert queue.prune(T0 + 100) == 2
    left = {p for (p,) in queue.conn.execute("SELECT path FROM items")}
    assert left == {paths["old-dead"], paths["old-pending"], paths["new-pushed"]}
    # Both events still have items pointing at them.
    assert event_rows(queue) == 2


def test_prune_forgets_old_events_without_items(queue: StateDb) -> None:
    p = store_path("pruned")
    record(queue, [("a", p)], spool_name="old.json", now=T0)
    record(queue, [], spool_name="ignored.json", now=T0)  # an event that queued nothing
    queue.mark_pushed(queue.claim("a", 1, T0), T0 + 1)
    assert queue.prune(T0 + 100) == 1
    assert event_rows(queue) == 0
    assert queue.counts() == {}


# -- status ------------------------------------------------------------------------------


def test_counts_oldest_pending_and_cache_statuses(queue: StateDb) -> None:
    pa = [store_path(f"oa{i}") for i in range(3)]
    record(queue, [("a", pa[0])], spool_name="1.json", now=T0)
    record(queue, [("a", pa[1]), ("a", pa[2])], spool_name="2.json", now=T0 + 10)
    record(queue, [("b", pa[0])], spool_name="3.json", now=T0 + 20)

    # The oldest "a" item goes in flight: it still counts as the oldest pending.
    (inflight,) = queue.claim("a", 1, T0 + 30)
    assert inflight.path == pa[0]
    assert queue.oldest_pending() == {"a": T0, "b": T0 + 20}
    queue.mark_pushed([inflight], T0 + 40)
    assert queue.oldest_pending() == {"a": T0 + 10, "b": T0 + 20}
    assert queue.counts() == {("a", "pending"): 2, ("a", "pushed"): 1, ("b", "pending"): 1}

    statuses = {s.cache: s for s in queue.cache_statuses(["c", "a"])}
    assert list(statuses) == ["c", "a", "b"]
    assert statuses["c"].counts == dict.fromkeys(
        ("pending", "inflight", "pushed", "skipped", "dead"), 0
    )
    assert statuses["c"].oldest_pending_at is None
    assert statuses["c"].last_success_at is None
    assert statuses["a"].counts["pending"] == 2
    assert statuses["a"].counts["pushed"] == 1
    assert statuses["a"].oldest_pending_at == T0 + 10
    assert statuses["a"].last_success_at == T0 + 40
    assert statuses["b"].counts["pending"] == 1
    assert statuses["b"].last_success_at is None


def test_dead_letters_newest_first_with_limit(queue: StateDb) -> None:
    first = make_dead(queue, ["dl0"], now=T0)
    second = make_dead(queue, ["dl1"], now=T0 + 10)
    third = make_dead(queue, ["dl2"], now=T0 + 20)
    letters = queue.dead_letters(limit=2)
    assert [d.path for d in letters] == [third[0].path, second[0].path]
    assert letters[0] == DeadLetter(
        id=third[0].id,
        cache="a",
        path=third[0].path,
        attempts=1,
        updated_at=T0 + 20,
        reason="exit_status",
        error="bad",
    )
    assert [d.path for d in queue.dead_letters()][-1] == first[0].path


# -- log offsets, database file ----------------------------------------------------------


def test_log_offsets_are_saved_and_survive_reopen(queue: StateDb, db_path: Path) -> None:
    assert queue.log_offset("/var/log/x") is None
    with queue.transaction():
        queue.save_log_offset("/var/log/x", LogOffset(1, 2, 300), T0)
    assert queue.log_offset("/var/log/x") == LogOffset(1, 2, 300)
    with queue.transaction():
        queue.save_log_offset("/var/log/x", LogOffset(1, 9, 12), T0 + 1)
    assert queue.log_offset("/var/log/x") == LogOffset(1, 9, 12)
    assert queue.log_offset("/var/log/other") is None
    queue.close()
    reopened = StateDb(db_path)
    try:
        assert reopened.log_offset("/var/log/x") == LogOffset(1, 9, 12)
    finally:
        reopened.close()


def test_database_is_in_wal_mode_and_durable(queue: StateDb, db_path: Path) -> None:
    record(queue, [("a", store_path("wal"))], spool_name="1.json")
    assert queue.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert queue.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 1
    finally:
        other.close()
    assert Path(f"{db_path}-wal").exists()
    assert queue.ping()


def test_committed_rows_are_visible_to_a_new_connection(queue: StateDb, db_path: Path) -> None:
    p = store_path("durable")
    record(queue, [("a", p)], spool_name="1.json")
    queue.close()
    again = StateDb(db_path)
    try:
        assert again.seen_spool_file("1.json")
        assert [i.path for i in again.claim("a", 5, T0)] == [p]
    finally:
        again.close()


def test_corrupt_database_file_gives_a_queue_error_with_recovery_advice(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    path.write_bytes(b"this is not a database, just garbage bytes\x00\xff" * 200)
    with pytest.raises(StateDbError) as caught:
        StateDb(path)
    message = str(caught.value)
    assert str(path) in message
    assert "corrupt" in message
    assert "move" in message and "aside" in message
    assert "-wal" in message


def test_database_with_another_schema_version_is_refused(db_path: Path) -> None:
    StateDb(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StateDbError, match="schema 99"):
        StateDb(db_path)


def test_unusable_database_location_gives_a_queue_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateDbError, match="cannot open queue database"):
        StateDb(blocker / "sub" / "queue.sqlite3")


# -- trigger-maintained counts -------------------------------------------------------------


def true_counts(queue: StateDb) -> dict[tuple[str, str], int]:
    return {
        (cache, state): n
        for cache, state, n in queue.conn.execute(
            "SELECT cache, state, COUNT(*) FROM items GROUP BY cache, state"
        )
    }


def test_counts_follow_every_state_change(queue: StateDb) -> None:
    paths = [store_path(f"count{i}") for i in range(12)]
    record(queue, [("a", p) for p in paths] + [("b", p) for p in paths[:3]], spool_name="e1")
    assert queue.counts() == true_counts(queue) == {("a", "pending"): 12, ("b", "pending"): 3}
    batch = queue.claim("a", 8, T0)
    assert queue.counts() == true_counts(queue)
    queue.mark_pushed(batch[:3], T0)
    queue.mark_skipped(batch[3:4], "invalid_path", "gone", T0)
    queue.mark_failed(
        [(batch[4:6], T0), (batch[6:7], T0)],
        reason="exit_status",
        error="x",
        max_attempts=1,
        now=T0,
    )
    queue.release(batch[7:], T0)
    assert queue.counts() == true_counts(queue)
    dead = queue.claim("a", 1, T0 + 1)
    queue.mark_failed([(dead, T0 + 1)], reason="timeout", error="t", max_attempts=1, now=T0 + 1)
    assert queue.counts() == true_counts(queue)
    assert queue.retry_dead(None, T0 + 2) == 1
    queue.release_all_inflight(T0 + 2)
    # A new event re-queues the skipped path; pruning removes the finished ones.
    record(queue, [("a", batch[3].path)], spool_name="e2", now=T0 + 3)
    assert queue.prune(T0 + 10) == 3
    assert queue.counts() == true_counts(queue)
    assert sum(queue.counts().values()) == 12


def test_counts_are_backfilled_for_a_database_made_before_them(db_path: Path) -> None:
    queue = StateDb(db_path)
    paths = [store_path(f"old{i}") for i in range(5)]
    record(queue, [("a", p) for p in paths], spool_name="old")
    queue.mark_pushed(queue.claim("a", 2, T0), T0)
    queue.conn.executescript(
        "DROP TRIGGER item_counts_insert; DROP TRIGGER item_counts_update;"
        " DROP TRIGGER item_counts_delete; DROP TABLE item_counts;"
    )
    queue.close()
    reopened = StateDb(db_path)
    assert reopened.counts() == {("a", "pending"): 3, ("a", "pushed"): 2}
    reopened.close()


def test_release_orphans_frees_only_old_unheld_inflight_items(queue: StateDb) -> None:
    paths = [store_path(f"orphan{i}") for i in range(4)]
    record(queue, [("a", p) for p in paths], spool_name="o")
    old = queue.claim("a", 2, T0)
    fresh = queue.claim("a", 2, T0 + 100)
    released = queue.release_orphans({old[0].id}, older_than=T0 + 50, now=T0 + 101)
    assert released == 1
    assert row(queue, "a", old[1].path)["state"] == "pending"
    assert row(queue, "a", old[0].path)["state"] == "inflight"  # a worker still holds it
    assert all(row(queue, "a", item.path)["state"] == "inflight" for item in fresh)


# -- cache health (issue 12) ---------------------------------------------------------------


def test_cache_health_is_up_until_recorded_and_survives_reopening(
    queue: StateDb, db_path: Path
) -> None:
    assert queue.cache_health() == {}
    [status] = queue.cache_statuses(["c"])
    assert status.health == CacheHealth("c") and status.health.up
    down = CacheHealth("c", down_since=T0, next_try_at=T0 + 2, failures=3, last_error="503")
    queue.save_cache_health(down, T0, failed=True)
    reopened = StateDb(db_path, create=False)
    try:
        assert reopened.cache_health() == {"c": down}
        [status] = reopened.cache_statuses(["c"])
        assert status.health == down and not down.up
        assert status.last_failure_at == T0 and status.last_error == "503"
    finally:
        reopened.close()


def test_claim_probe_takes_one_item_even_before_it_is_due(queue: StateDb) -> None:
    a, b = store_path("a"), store_path("b")
    record(queue, [("c", a), ("c", b)], spool_name="e.json")
    queue.conn.execute("UPDATE items SET next_attempt_at = ? WHERE path = ?", (T0 + 999, a))
    queue.conn.execute("UPDATE items SET next_attempt_at = ? WHERE path = ?", (T0 + 500, b))
    assert queue.claim("c", 10, T0) == []  # nothing is due ...
    [probe] = queue.claim_probe("c", T0)  # ... but a down cache is probed with the next one
    assert probe.path == b and row(queue, "c", b)["state"] == "inflight"
    [probe] = queue.claim_probe("c", T0)
    assert probe.path == a
    assert queue.claim_probe("c", T0) == []
    assert queue.claim_probe("other", T0) == []


def test_defer_counts_no_attempt_and_rotates_the_probe(queue: StateDb) -> None:
    a, b = store_path("a"), store_path("b")
    record(queue, [("c", a), ("c", b)], spool_name="e.json")
    [probe] = queue.claim_probe("c", T0)
    queue.defer([probe], T0 + 5, reason="exit_status", error="down", now=T0)
    r = row(queue, "c", probe.path)
    assert (r["state"], r["attempts"], r["next_attempt_at"]) == ("pending", 0, T0 + 5)
    assert (r["last_reason"], r["last_error"]) == ("exit_status", "down")
    [status] = queue.cache_statuses(["c"])
    assert status.last_failure_at == T0 and status.last_error == "down"
    [other] = queue.claim_probe("c", T0 + 1)
    assert other.path != probe.path  # the next probe takes the path that waited longest
    assert queue.has_pending("c") and not queue.has_pending("x")


def test_coming_up_makes_waiting_items_due_now(queue: StateDb) -> None:
    a, b = store_path("a"), store_path("b")
    record(queue, [("c", a), ("d", b)], spool_name="e.json")
    queue.conn.execute("UPDATE items SET next_attempt_at = ?", (T0 + 900,))
    queue.save_cache_health(CacheHealth("c", down_since=T0, next_try_at=T0 + 1), T0)
    assert queue.claim("c", 10, T0 + 10) == []  # down: items keep their time
    queue.save_cache_health(CacheHealth("c"), T0 + 10)
    assert [i.path for i in queue.claim("c", 10, T0 + 10)] == [a]
    assert row(queue, "d", b)["next_attempt_at"] == T0 + 900  # other caches untouched


def test_recently_pushed_is_newest_first_per_cache(queue: StateDb) -> None:
    paths = [store_path(f"p{i}") for i in range(4)]
    record(queue, [("c", p) for p in paths] + [("d", paths[0])], spool_name="e.json")
    items = queue.claim("c", 10, T0)
    for offset, item in enumerate(items):
        queue.mark_pushed([item], T0 + offset)
    assert queue.recently_pushed("c", limit=2) == [paths[3], paths[2]]
    assert queue.recently_pushed("d") == []


def test_the_schema_allows_exactly_the_item_states(tmp_path: Path) -> None:
    """The CHECK constraint is SQL text: it must list the same states as ItemState."""
    queue = StateDb(tmp_path / "q.sqlite3")
    try:
        (sql,) = queue.conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'items'"
        ).fetchone()
        found = re.search(r"CHECK \(state IN \(([^)]*)\)\)", sql)
        assert found is not None, sql
        listed = [value.strip().strip("'") for value in found.group(1).split(",")]
        assert listed == [state.value for state in ItemState]
    finally:
        queue.close()
