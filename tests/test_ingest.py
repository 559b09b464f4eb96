"""bridge/ingest.py: real spool files, a real queue, real Nix for output resolution."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bridge.clock import SystemClock
from bridge.config import CacheConfig, Config, SpoolSettings
from bridge.events import hook_envelope, hydra_envelope
from bridge.ingest import Ingestor
from bridge.intake import Intake
from bridge.matching import JobPattern, Rule
from bridge.spool import SpoolLayout, write_event
from bridge.spoolread import SETTLE_SECONDS
from bridge.statedb import StateDb
from bridge.store import NixStore
from exporter.metrics import BridgeMetrics
from exporter.vocabulary import RejectReason
from tests.dbrows import event_rows
from tests.nixhelpers import Built, build, hydra_payload

P = "hydra_cachix_bridge_"
UNKNOWN_DRV = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hcb-never-instantiated.drv"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> list[Built]:
    return build(tmp_path_factory.mktemp("ingest-nix"), 4, prefix="hcb-ingest")


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.registry = CollectorRegistry()
        self.metrics = BridgeMetrics(
            self.registry,
            version="test",
            caches={"c": "nix-copy"},
        )
        self.queue: StateDb | None = None
        self.woken = 0

    def make(
        self,
        rules: tuple[Rule, ...] = (Rule(caches=("c",)),),
        max_event_bytes: int = 1024 * 1024,
        queue_timeout: float = 30.0,
    ) -> Ingestor:
        state = self.tmp_path / "state"
        config = Config(
            state_dir=state,
            spool_dir=self.tmp_path / "spool",
            caches=MappingProxyType(
                {"c": CacheConfig(name="c", backend="nix-copy", uri="file:///tmp/unused")}
            ),
            rules=rules,
            spool=SpoolSettings(max_event_bytes=max_event_bytes),
        )
        self.layout = SpoolLayout(config.spool_dir)
        self.layout.ensure()
        self.queue = StateDb(config.database_path, timeout=queue_timeout)

        def wake() -> None:
            self.woken += 1

        intake = Intake(config.rules, self.metrics, SystemClock(), wake)
        return Ingestor(config, self.queue, NixStore(), intake, SystemClock())

    def value(self, name: str, **labels: str) -> float:
        sample = self.registry.get_sample_value(P + name, labels)
        assert sample is not None, f"no sample {name} {labels}"
        return sample

    def incoming(self) -> list[str]:
        return sorted(os.listdir(self.layout.incoming))

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """Quarantined file name -> its .reason record."""
        result = {}
        for name in os.listdir(self.layout.quarantine):
            if not name.endswith(".reason"):
                reason = self.layout.quarantine / f"{name}.reason"
                result[name] = json.loads(reason.read_text())
        return result

    def items(self) -> list[tuple[str, str, str]]:
        assert self.queue is not None
        return sorted(self.queue.conn.execute("SELECT cache, path, state FROM items").fetchall())

    def outcomes(self) -> list[str]:
        assert self.queue is not None
        return [row[0] for row in self.queue.conn.execute("SELECT outcome FROM events ORDER BY id")]

    def put(self, name: str, data: bytes, *, age: float = 0.0) -> Path:
        path = self.layout.incoming / name
        path.write_bytes(data)
        if age:
            then = time.time() - age
            os.utime(path, (then, then))
        return path


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    if harness.queue is not None:
        harness.queue.close()


def hydra_doc(built: Built, build_id: int = 1, **kwargs: Any) -> dict[str, Any]:
    return hydra_envelope(hydra_payload(build_id, built, **kwargs), time.time())


# -- accepted events ---------------------------------------------------------------------


def test_hydra_and_hook_files_are_recorded_then_removed(h: Harness, built: list[Built]) -> None:
    ingestor = h.make()
    hydra_file = write_event(h.layout, "hydra", hydra_doc(built[0], 11))
    hook_file = write_event(h.layout, "hook", hook_envelope(built[1].drv, built[1].out, 1.0))
    assert ingestor.scan() == sorted([hydra_file, hook_file])

    stats = ingestor.ingest(ingestor.scan())
    assert (stats.recorded, stats.duplicates, stats.quarantined, stats.deferred) == (2, 0, 0, 0)
    assert stats.enqueued == {"c": 2}
    assert h.incoming() == []
    assert h.items() == sorted([("c", built[0].out, "pending"), ("c", built[1].out, "pending")])
    assert h.queue is not None and h.queue.seen_spool_file(hydra_file.name)
    assert h.woken == 1
    assert h.value("events_received_total", source="hydra") == 1
    assert h.value("events_received_total", source="hook") == 1
    assert h.value("events_matched_total", source="hydra") == 1
    assert h.value("paths_enqueued_total", cache="c") == 2
    assert h.value("last_event_timestamp_seconds", source="hook") > 0
    row = h.queue.conn.execute(
        "SELECT build_id, project, jobset, job, build_status FROM events WHERE spool_name = ?",
        (hydra_file.name,),
    ).fetchone()
    assert row == (11, "proj", "main", "pkg.x86_64-linux", 0)


def test_file_is_kept_until_its_rows_are_committed(h: Harness, built: list[Built]) -> None:
    ingestor = h.make(queue_timeout=0.2)
    event_file = write_event(h.layout, "hydra", hydra_doc(built[0]))
    assert h.queue is not None
    blocker = sqlite3.connect(h.tmp_path / "state" / "queue.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            ingestor.ingest(ingestor.scan())
        assert event_file.exists()
        assert h.incoming() == [event_file.name]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert event_rows(h.queue) == 0
    assert h.items() == []

    stats = ingestor.ingest(ingestor.scan())
    assert stats.recorded == 1
    assert not event_file.exists()
    assert h.items() == [("c", built[0].out, "pending")]


def test_hook_event_without_out_paths_is_resolved_from_the_drv(
    h: Harness, built: list[Built]
) -> None:
    ingestor = h.make()
    write_event(h.layout, "hook", hook_envelope(built[2].drv, "", time.time()))
    stats = ingestor.ingest(ingestor.scan())
    assert stats.recorded == 1
    assert stats.enqueued == {"c": 1}
    assert h.items() == [("c", built[2].out, "pending")]
    assert h.incoming() == []


def test_hook_event_with_unresolvable_drv_is_quarantined(h: Harness) -> None:
    ingestor = h.make()
    event_file = write_event(h.layout, "hook", hook_envelope(UNKNOWN_DRV, "", time.time()))
    stats = ingestor.ingest(ingestor.scan())
    assert stats.quarantined == 1
    assert h.quarantined()[event_file.name]["reason"] == "unresolved_outputs"
    assert h.value("events_rejected_total", reason="unresolved_outputs") == 1
    assert h.items() == []


# -- rejected files ----------------------------------------------------------------------


def _payload_with_bad_path(built: Built) -> bytes:
    payload = hydra_payload(5, built)
    payload["outputs"] = [{"name": "out", "path": "/tmp/not-in-the-store"}]
    return json.dumps(hydra_envelope(payload, 1.0)).encode()


MALFORMED: dict[str, Any] = {
    "invalid_json": lambda b: b'{"version": 1, "kind": "hydra", "payload": {"build": 1',
    "invalid_encoding": lambda b: b'{"version": 1, "kind": "hook", "drv_path": "\xff\xfe"}',
    "invalid_event": lambda b: json.dumps({"version": 99, "kind": "hydra"}).encode(),
    "invalid_store_path": _payload_with_bad_path,
}


@pytest.mark.parametrize("reason", sorted(MALFORMED))
def test_malformed_file_is_quarantined_with_its_reason(
    h: Harness, built: list[Built], reason: str
) -> None:
    ingestor = h.make()
    good = write_event(h.layout, "hydra", hydra_doc(built[0]))
    bad = h.put(f"bad-{reason}.json", MALFORMED[reason](built[0]), age=60)
    stats = ingestor.ingest(ingestor.scan())
    assert stats.quarantined == 1
    assert stats.recorded == 1  # the good file beside it is not held back
    assert h.incoming() == []
    record = h.quarantined()[bad.name]
    assert record["reason"] == reason
    assert record["file"] == bad.name
    assert record["message"]
    assert (h.layout.quarantine / bad.name).read_bytes() == MALFORMED[reason](built[0])
    assert h.value("events_rejected_total", reason=reason) == 1
    others = [r for r in RejectReason if r != reason]
    assert all(h.value("events_rejected_total", reason=r) == 0 for r in others)
    assert h.queue is not None and not h.queue.seen_spool_file(bad.name)
    assert h.queue.seen_spool_file(good.name)


def test_too_large_file_is_quarantined(h: Harness, built: list[Built]) -> None:
    ingestor = h.make(max_event_bytes=256)
    data = json.dumps(hydra_doc(built[0])).encode()
    assert len(data) > 256
    big = h.put("big.json", data)
    stats = ingestor.ingest(ingestor.scan())
    assert stats.quarantined == 1
    assert h.quarantined()[big.name]["reason"] == "too_large"
    assert h.value("events_rejected_total", reason="too_large") == 1


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_non_regular_file_is_quarantined(
    h: Harness, built: list[Built], tmp_path: Path, kind: str
) -> None:
    ingestor = h.make()
    target = h.layout.incoming / f"odd-{kind}.json"
    if kind == "symlink":
        outside = tmp_path / "outside.json"
        outside.write_text(json.dumps(hydra_doc(built[0])))
        target.symlink_to(outside)
    else:
        os.mkfifo(target)
    stats = ingestor.ingest(ingestor.scan())
    assert stats.quarantined == 1
    assert h.quarantined()[target.name]["reason"] == "not_regular_file"
    assert h.value("events_rejected_total", reason="not_regular_file") == 1
    assert h.items() == []
    if kind == "symlink":
        assert (tmp_path / "outside.json").exists()  # the link was moved, not its target
        assert (h.layout.quarantine / target.name).is_symlink()


def test_truncated_young_file_is_deferred_until_settled_or_closed(
    h: Harness, built: list[Built]
) -> None:
    ingestor = h.make()
    full = json.dumps(hydra_doc(built[0])).encode()
    partial = h.put("partial.json", full[: len(full) // 2])
    assert time.time() - partial.stat().st_mtime < SETTLE_SECONDS

    stats = ingestor.ingest(ingestor.scan())
    assert (stats.deferred, stats.quarantined, stats.recorded) == (1, 0, 0)
    assert h.incoming() == [partial.name]
    assert h.value("events_rejected_total", reason="invalid_json") == 0

    # The writer finishes the file in place: it is recorded.
    partial.write_bytes(full)
    stats = ingestor.ingest(ingestor.scan())
    assert stats.recorded == 1
    assert h.incoming() == []

    # A truncated file whose writer has closed it is not waited for.
    closed = h.put("closed.json", full[:40])
    stats = ingestor.ingest([closed], writer_closed=True)
    assert (stats.deferred, stats.quarantined) == (0, 1)
    assert h.quarantined()[closed.name]["reason"] == "invalid_json"

    # Nor is one older than the settle time.
    stale = h.put("stale.json", full[:40], age=SETTLE_SECONDS + 60)
    stats = ingestor.ingest([stale])
    assert (stats.deferred, stats.quarantined) == (0, 1)
    assert h.value("events_rejected_total", reason="invalid_json") == 2


def test_young_file_with_another_defect_is_not_deferred(h: Harness) -> None:
    ingestor = h.make()
    h.put("young.json", json.dumps({"version": 1, "kind": "nonsense"}).encode())
    stats = ingestor.ingest(ingestor.scan())
    assert (stats.deferred, stats.quarantined) == (0, 1)
    assert h.value("events_rejected_total", reason="invalid_event") == 1


# -- duplicates --------------------------------------------------------------------------


def test_already_recorded_file_is_just_removed(h: Harness, built: list[Built]) -> None:
    ingestor = h.make()
    event_file = write_event(h.layout, "hydra", hydra_doc(built[0]))
    content = event_file.read_bytes()
    assert ingestor.ingest(ingestor.scan()).recorded == 1

    # As after a crash between the commit and the unlink: the same file is back.
    event_file.write_bytes(content)
    stats = ingestor.ingest(ingestor.scan())
    assert (stats.recorded, stats.duplicates, stats.quarantined) == (0, 1, 0)
    assert h.incoming() == []
    assert h.quarantined() == {}
    assert h.queue is not None and event_rows(h.queue) == 1
    assert h.value("events_received_total", source="hydra") == 1
    assert h.woken == 1


def test_same_hydra_build_twice_queues_its_paths_once(h: Harness, built: list[Built]) -> None:
    ingestor = h.make()
    write_event(h.layout, "hydra", hydra_doc(built[0], 42))
    write_event(h.layout, "hydra", hydra_doc(built[0], 42))
    stats = ingestor.ingest(ingestor.scan())
    assert stats.recorded == 2
    assert stats.enqueued == {"c": 1}
    assert h.items() == [("c", built[0].out, "pending")]
    assert h.value("paths_enqueued_total", cache="c") == 1
    assert h.value("events_received_total", source="hydra") == 2
    assert h.incoming() == []


# -- ignored events ----------------------------------------------------------------------


def test_ignored_events_are_recorded_and_counted_by_reason(h: Harness, built: list[Built]) -> None:
    rule = Rule(
        caches=("c",),
        jobs=(JobPattern.parse("proj:*:*"),),
        exclude=(built[1].name,),
    )
    ingestor = h.make(rules=(rule,))
    null_output = hydra_payload(4, built[3])
    null_output["outputs"] = [{"name": "out", "path": None}]
    docs = [
        ("no_rule", hydra_doc(built[0], 1, project="elsewhere")),
        ("status_filtered", hydra_doc(built[2], 2, status=1)),
        ("excluded", hydra_doc(built[1], 3)),
        ("no_outputs", hydra_envelope(null_output, time.time())),
    ]
    for _, doc in docs:
        write_event(h.layout, "hydra", doc)
    write_event(h.layout, "hook", hook_envelope(built[0].drv, built[0].out, 1.0))

    stats = ingestor.ingest(ingestor.scan())
    assert stats.recorded == 5
    assert stats.enqueued == {}
    assert h.items() == []
    assert h.incoming() == []
    assert h.woken == 0
    assert sorted(h.outcomes()) == sorted([reason for reason, _ in docs] + ["no_rule"])
    for reason, _ in docs:
        assert h.value("events_ignored_total", source="hydra", reason=reason) == 1
    assert h.value("events_ignored_total", source="hook", reason="no_rule") == 1
    assert h.value("events_matched_total", source="hydra") == 0
    assert h.value("events_received_total", source="hydra") == 4


def test_in_progress_names_are_not_candidates(h: Harness, built: list[Built]) -> None:
    ingestor = h.make()
    data = json.dumps(hydra_doc(built[0])).encode()
    h.put(".hidden.json", data)
    h.put("writing.json.tmp", data)
    h.put("x.json.reason", data)
    assert ingestor.scan() == []
    stats = ingestor.ingest([h.layout.incoming / "writing.json.tmp"])
    assert stats.recorded == 0
    assert len(h.incoming()) == 3


# -- trust in Hydra events and transient errors (issue 11) -------------------------------


def test_hydra_event_naming_a_path_its_drv_did_not_build_is_quarantined(
    h: Harness, built: list[Built]
) -> None:
    ingestor = h.make()
    # drvPath of one real build, out path of another: the store says they do not belong.
    forged = hydra_doc(Built(built[0].name, built[0].drv, built[1].out), 21)
    event_file = write_event(h.layout, "hydra", forged)
    genuine = write_event(h.layout, "hydra", hydra_doc(built[0], 22))
    stats = ingestor.ingest(ingestor.scan())
    assert (stats.recorded, stats.quarantined) == (1, 1)
    record = h.quarantined()[event_file.name]
    assert record["reason"] == "foreign_outputs"
    assert built[1].out in record["message"] and built[0].drv in record["message"]
    assert h.value("events_rejected_total", reason="foreign_outputs") == 1
    assert h.items() == [("c", built[0].out, "pending")]
    assert h.queue is not None and h.queue.seen_spool_file(genuine.name)


def test_hydra_event_whose_drv_is_not_in_the_store_is_quarantined(
    h: Harness, built: list[Built]
) -> None:
    ingestor = h.make()
    event_file = write_event(
        h.layout, "hydra", hydra_doc(Built(built[0].name, UNKNOWN_DRV, built[0].out))
    )
    stats = ingestor.ingest(ingestor.scan())
    assert stats.quarantined == 1
    assert h.quarantined()[event_file.name]["reason"] == "unresolved_outputs"
    assert h.items() == []


TRANSIENT = ["EMFILE", "ENFILE", "ENOMEM", "EIO", "EAGAIN"]


@pytest.mark.parametrize("name", TRANSIENT)
def test_transient_error_reading_an_event_leaves_it_for_the_next_pass(
    h: Harness, built: list[Built], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    import errno

    import bridge.spoolread

    ingestor = h.make()
    event_file = write_event(h.layout, "hydra", hydra_doc(built[0]))
    real = bridge.spoolread.read_event_file

    def failing(path: Path, max_bytes: int) -> Any:
        raise OSError(getattr(errno, name), os.strerror(getattr(errno, name)))

    monkeypatch.setattr(bridge.spoolread, "read_event_file", failing)
    stats = ingestor.ingest(ingestor.scan())
    assert (stats.recorded, stats.quarantined, stats.deferred) == (0, 0, 1)
    assert h.incoming() == [event_file.name]
    assert all(h.value("events_rejected_total", reason=r) == 0 for r in RejectReason)

    monkeypatch.setattr(bridge.spoolread, "read_event_file", real)
    stats = ingestor.ingest(ingestor.scan())
    assert stats.recorded == 1
    assert h.items() == [("c", built[0].out, "pending")]


def test_out_of_descriptors_while_reading_the_drv_defers_the_event(
    h: Harness, built: list[Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import bridge.store

    ingestor = h.make()
    write_event(h.layout, "hydra", hydra_doc(built[0]))
    real = bridge.store.read_regular_file

    def out_of_descriptors(*args: Any, **kwargs: Any) -> bytes:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(bridge.store, "read_regular_file", out_of_descriptors)
    stats = ingestor.ingest(ingestor.scan())
    assert (stats.recorded, stats.quarantined, stats.deferred) == (0, 0, 1)
    monkeypatch.setattr(bridge.store, "read_regular_file", real)
    assert ingestor.ingest(ingestor.scan()).recorded == 1


def test_out_of_memory_defers_the_event(
    h: Harness, built: list[Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bridge.events

    ingestor = h.make()
    write_event(h.layout, "hydra", hydra_doc(built[0]))

    def no_memory(data: bytes) -> Any:
        raise MemoryError

    monkeypatch.setattr(bridge.events, "decode_json", no_memory)
    stats = ingestor.ingest(ingestor.scan())
    assert (stats.recorded, stats.quarantined, stats.deferred) == (0, 0, 1)
    assert len(h.incoming()) == 1


def test_a_hook_dir_set_to_incoming_still_ingests_its_files(
    tmp_path: Path, built: list[Built]
) -> None:
    spool = tmp_path / "spool"
    config = Config(
        state_dir=tmp_path / "state",
        spool_dir=spool,
        caches=MappingProxyType(
            {"c": CacheConfig(name="c", backend="nix-copy", uri="file:///tmp/unused")}
        ),
        rules=(Rule(caches=("c",)),),
        spool=SpoolSettings(hook_dir=spool / "incoming"),
    )
    layout = SpoolLayout.of(config)
    layout.ensure()
    db = StateDb(config.database_path)
    try:
        metrics = BridgeMetrics(CollectorRegistry(), version="t", caches={"c": "nix-copy"})
        intake = Intake(config.rules, metrics, SystemClock())
        ingestor = Ingestor(config, db, NixStore(), intake, SystemClock())
        write_event(layout, "hydra", hydra_doc(built[0]))
        stats = ingestor.ingest(ingestor.scan())
        assert (stats.recorded, stats.quarantined) == (1, 0)
        assert os.listdir(layout.incoming) == []
    finally:
        db.close()


def test_a_file_the_database_refuses_is_quarantined_and_the_others_recorded(
    h: Harness, built: list[Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    ingestor = h.make()
    good = write_event(h.layout, "hydra", hydra_doc(built[0], 21))
    refused = write_event(h.layout, "hydra", hydra_doc(built[1], 22))
    hook_data = json.dumps(hook_envelope(built[2].drv, built[2].out, 1.0)).encode() + b"\n"
    hook_file = h.layout.hook / "1-hook.json"
    hook_file.write_bytes(hook_data)
    real = ingestor.intake.record

    def record(db: StateDb, event: Any, **kwargs: Any) -> Any:
        if event.build_id == 22 or event.source == "hook":
            raise ValueError("a row this database refuses")
        return real(db, event, **kwargs)

    monkeypatch.setattr(ingestor.intake, "record", record)
    stats = ingestor.ingest(ingestor.scan())
    assert (stats.recorded, stats.quarantined) == (1, 2)
    assert h.items() == [("c", built[0].out, "pending")]
    assert h.incoming() == [] and not good.exists()
    quarantined = h.quarantined()
    assert quarantined[refused.name]["reason"] == "invalid_event"
    assert quarantined[refused.name]["message"] == "cannot be recorded: ValueError"
    [hook_copy] = [name for name in quarantined if name != refused.name]
    # The hook file stays in its directory; its copy has its content.
    assert (h.layout.quarantine / hook_copy).read_bytes() == hook_data
    assert hook_file.read_bytes() == hook_data
    assert h.value("events_rejected_total", reason="invalid_event") == 2
    # Consumed: the next pass neither reads nor counts it again.
    monkeypatch.undo()
    assert ingestor.scan() == []
