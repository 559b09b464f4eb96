"""bridge/intake.py: the one path from a validated event to queued items and metrics."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bridge.clock import SystemClock
from bridge.events import Event
from bridge.intake import Intake
from bridge.matching import Rule
from bridge.statedb import StateDb
from exporter.metrics import BridgeMetrics
from exporter.vocabulary import Source

OUT = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12"
OTHER = "/nix/store/1123456789abcdfghijklmnpqrsvwxyz-world-1.0"


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.registry = CollectorRegistry()
        metrics = BridgeMetrics(self.registry, version="t", caches={"main": "nix-copy"})
        self.woken = 0
        rules = (Rule(caches=("main",), sources=(Source.HOOK, Source.LOG)),)
        self.intake = Intake(rules, metrics, SystemClock(), self.wake)
        self.db = StateDb(tmp_path / "state.sqlite3")

    def wake(self) -> None:
        self.woken += 1

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(f"hydra_cachix_bridge_{name}", labels)


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    setup = Setup(tmp_path)
    yield setup
    setup.db.close()


def event(source: Source, *paths: str) -> Event:
    return Event(source=source, received_at=1.0, out_paths=paths)


def test_record_then_announce_counts_and_wakes_once(
    s: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    with s.db.transaction():
        first = s.intake.record(s.db, event(Source.HOOK, OUT, OTHER), origin="a.json")
        again = s.intake.record(s.db, event(Source.LOG, OUT), origin="/var/log/x")
    assert first is not None and first.outcome == "matched" and first.enqueued == {"main": 2}
    assert again is not None and again.enqueued == {}  # queued already
    assert s.woken == 0 and s.value("events_received_total", source="hook") == 0
    with caplog.at_level(logging.INFO, logger="bridge.intake"):
        assert s.intake.announce([first, again]) == 2
    assert s.woken == 1
    assert s.value("events_received_total", source="hook") == 1
    assert s.value("events_matched_total", source="log") == 1
    assert s.value("paths_enqueued_total", cache="main") == 2
    assert [r.getMessage() for r in caplog.records] == [
        "event from hook (a.json): queued 2 path(s) for main",
        "event from log (/var/log/x): nothing new queued (1 path(s) already queued or pushed)",
    ]


def test_an_ignored_event_is_counted_with_its_reason_and_wakes_nobody(s: Setup) -> None:
    with s.db.transaction():
        recorded = s.intake.record(s.db, event(Source.HYDRA, OUT), origin="")
    assert recorded is not None and recorded.outcome == "no_rule" and recorded.enqueued == {}
    assert s.intake.announce([recorded]) == 0
    assert s.woken == 0
    assert s.value("events_ignored_total", source="hydra", reason="no_rule") == 1


def test_a_spool_file_recorded_before_is_a_duplicate(s: Setup) -> None:
    with s.db.transaction():
        first = s.intake.record(
            s.db, event(Source.HOOK, OUT), origin="f", spool_name="f.json", spool_digest="d"
        )
        second = s.intake.record(
            s.db, event(Source.HOOK, OUT), origin="f", spool_name="f.json", spool_digest="d"
        )
    assert first is not None and second is None


def test_count_rejected_counts_the_reason(s: Setup) -> None:
    s.intake.count_rejected("invalid_json")
    assert s.value("events_rejected_total", reason="invalid_json") == 1
