"""exporter/metrics.py: names, types, pre-created label sets, the queue collector, promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import typing
from enum import StrEnum
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bridge.statedb import StateDb
from exporter.metrics import (
    METRICS,
    PREFIX,
    UPLOAD_BUCKETS,
    BridgeMetrics,
    QueueCollector,
    without_created,
)
from exporter.vocabulary import (
    BackendKind,
    FailureReason,
    IgnoreReason,
    ItemState,
    RejectReason,
    SkipReason,
    Source,
)

CACHES = {"team": "cachix", "mirror": "nix-copy"}
ALLOWED_LABELS = {"cache", "backend", "source", "reason", "state", "le", "version", "path"}


def make(
    registry: CollectorRegistry, per_jobset: bool = False, per_jobset_limit: int = 200
) -> BridgeMetrics:
    return BridgeMetrics(
        registry,
        version="9.9.9",
        caches=CACHES,
        per_jobset=per_jobset,
        per_jobset_limit=per_jobset_limit,
    )


def test_every_name_follows_prometheus_conventions() -> None:
    registry = CollectorRegistry()
    make(registry)
    for family in registry.collect():
        assert family.name.startswith(f"{PREFIX}_"), family.name
        assert re.fullmatch(r"[a-z_]+", family.name)
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name
        if "timestamp" in family.name:
            assert family.name.endswith("_timestamp_seconds")
        assert family.type != "summary"


def test_known_label_sets_exist_at_zero_before_any_event() -> None:
    registry = CollectorRegistry()
    make(registry)
    value = registry.get_sample_value
    for cache, backend in CACHES.items():
        assert value(f"{PREFIX}_paths_pushed_total", {"cache": cache}) == 0
        assert value(f"{PREFIX}_pushes_started_total", {"cache": cache, "backend": backend}) == 0
        for reason in FailureReason:
            labels = {"cache": cache, "backend": backend, "reason": reason}
            assert value(f"{PREFIX}_pushes_failed_total", labels) == 0
        assert value(f"{PREFIX}_dead_letters_total", {"cache": cache}) == 0
        assert value(f"{PREFIX}_push_duration_seconds_count", {"cache": cache}) == 0
    for source in Source:
        assert value(f"{PREFIX}_events_received_total", {"source": source}) == 0
        for reason in IgnoreReason:
            labels = {"source": source, "reason": reason}
            assert value(f"{PREFIX}_events_ignored_total", labels) == 0
    for reason in RejectReason:
        assert value(f"{PREFIX}_events_rejected_total", {"reason": reason}) == 0
    assert value(f"{PREFIX}_build_info", {"version": "9.9.9"}) == 1


def test_upload_buckets_span_sub_second_to_an_hour() -> None:
    assert UPLOAD_BUCKETS[0] <= 0.25 and UPLOAD_BUCKETS[-1] >= 3600
    assert list(UPLOAD_BUCKETS) == sorted(UPLOAD_BUCKETS)
    registry = CollectorRegistry()
    metrics = make(registry)
    metrics.push_duration.labels("team").observe(42)
    text = generate_latest(registry).decode()
    assert f'{PREFIX}_push_duration_seconds_bucket{{cache="team",le="60.0"}} 1.0' in text
    assert f'{PREFIX}_push_duration_seconds_bucket{{cache="team",le="30.0"}} 0.0' in text


def test_per_jobset_adds_project_and_jobset_to_path_counters_only() -> None:
    registry = CollectorRegistry()
    metrics = make(registry, per_jobset=True)
    metrics.count_paths("team", [("nixpkgs", "trunk"), ("nixpkgs", "trunk"), (None, None)])
    metrics.count_paths("team", [("nixpkgs", "staging")], reason="timeout")
    value = registry.get_sample_value
    labels = {"cache": "team", "project": "nixpkgs", "jobset": "trunk"}
    assert value(f"{PREFIX}_paths_pushed_total", labels) == 2
    assert (
        value(f"{PREFIX}_paths_pushed_total", {"cache": "team", "project": "", "jobset": ""}) == 1
    )
    failed = {"cache": "team", "reason": "timeout", "project": "nixpkgs", "jobset": "staging"}
    assert value(f"{PREFIX}_paths_failed_total", failed) == 1
    for family in registry.collect():
        if family.name not in (f"{PREFIX}_paths_pushed", f"{PREFIX}_paths_failed"):
            for sample in family.samples:
                assert "project" not in sample.labels and "jobset" not in sample.labels


def test_without_per_jobset_path_counters_have_no_job_labels() -> None:
    registry = CollectorRegistry()
    metrics = make(registry)
    metrics.count_paths("team", [("nixpkgs", "trunk")] * 3)
    assert registry.get_sample_value(f"{PREFIX}_paths_pushed_total", {"cache": "team"}) == 3


def test_queue_collector_reads_the_database_at_scrape_time(tmp_path: Path) -> None:
    from bridge.events import Event

    queue = StateDb(tmp_path / "q.sqlite3")
    now = time.time()
    path = "/nix/store/2jmiqxxd2z4ypk8am71rc6kffqzgma57-t"
    registry = CollectorRegistry()
    registry.register(
        QueueCollector(lambda: (queue.counts(), queue.oldest_pending()), CACHES, lambda: now + 30)
    )
    value = registry.get_sample_value
    assert value(f"{PREFIX}_queue_items", {"cache": "team", "state": "pending"}) == 0
    assert value(f"{PREFIX}_oldest_pending_age_seconds", {"cache": "team"}) == 0
    with queue.transaction():
        queue.record_event(
            Event("hook", now, (path,)),
            spool_name="x",
            outcome="matched",
            targets=[("team", path)],
            now=now,
        )
    assert value(f"{PREFIX}_queue_items", {"cache": "team", "state": "pending"}) == 1
    assert value(f"{PREFIX}_queue_items", {"cache": "mirror", "state": "dead"}) == 0
    assert value(f"{PREFIX}_oldest_pending_age_seconds", {"cache": "team"}) == pytest.approx(30)
    queue.close()


def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: the test command installs Debian's prometheus"
    registry = CollectorRegistry()
    metrics = make(registry)
    registry.register(QueueCollector(lambda: ({}, {}), CACHES, time.time))
    metrics.count_paths("team", [(None, None)])
    metrics.last_success.labels("team").set(time.time())
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(registry),
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_log_source_gauge_is_labelled_by_configured_path() -> None:
    registry = CollectorRegistry()
    metrics = BridgeMetrics(
        registry,
        version="1",
        caches=CACHES,
        log_sources=["/var/log/hydra/hook.log"],
    )
    name = f"{PREFIX}_log_source_readable"
    assert registry.get_sample_value(name, {"path": "/var/log/hydra/hook.log"}) == 0
    metrics.log_sources_alive.labels("/var/log/hydra/hook.log").set(1)
    assert registry.get_sample_value(name, {"path": "/var/log/hydra/hook.log"}) == 1


def test_exposition_has_no_created_series_and_leaves_the_registry_alone() -> None:
    registry = CollectorRegistry()
    make(registry).paths_pushed.labels("team").inc(2)
    text = generate_latest(without_created(registry)).decode()
    assert "_created" not in text
    assert 'hydra_cachix_bridge_paths_pushed_total{cache="team"} 2.0' in text
    assert "# TYPE hydra_cachix_bridge_push_duration_seconds histogram" in text
    # The client's process-global switch is not touched: other registries keep theirs.
    assert "_created" in generate_latest(registry).decode()


def test_per_jobset_labels_are_capped_with_an_other_bucket() -> None:
    """Issue 11 finding 10: a Hydra with thousands of (PR) jobsets cannot add unbounded series."""
    registry = CollectorRegistry()
    metrics = make(registry, per_jobset=True, per_jobset_limit=3)
    for index in range(10):
        metrics.count_paths("team", [("nixpkgs", f"pr-{index}")])
    metrics.count_paths("team", [("nixpkgs", "pr-0"), (None, None)])  # known pairs stay
    metrics.count_paths("team", [("nixpkgs", "pr-9")], reason="timeout")
    value = registry.get_sample_value
    pushed = f"{PREFIX}_paths_pushed_total"
    for index in range(3):
        labels = {"cache": "team", "project": "nixpkgs", "jobset": f"pr-{index}"}
        assert value(pushed, labels) == (2 if index == 0 else 1)
    assert value(pushed, {"cache": "team", "project": "(other)", "jobset": "(other)"}) == 7
    assert value(pushed, {"cache": "team", "project": "", "jobset": ""}) == 1
    failed = {"cache": "team", "reason": "timeout", "project": "(other)", "jobset": "(other)"}
    assert value(f"{PREFIX}_paths_failed_total", failed) == 1
    jobsets = {
        sample.labels["jobset"]
        for family in registry.collect()
        if family.name == f"{PREFIX}_paths_pushed"
        for sample in family.samples
    }
    assert jobsets == {"pr-0", "pr-1", "pr-2", "(other)", ""}


def _label_values(registry: CollectorRegistry, sample: str, label: str) -> set[str]:
    return {
        s.labels[label]
        for family in registry.collect()
        for s in family.samples
        if s.name == sample and label in s.labels
    }


def test_pre_created_label_values_are_exactly_the_vocabularies() -> None:
    registry = CollectorRegistry()
    make(registry)
    registry.register(QueueCollector(lambda: ({}, {}), CACHES, time.time))
    expected: list[tuple[str, str, type[StrEnum]]] = [
        ("events_received_total", "source", Source),
        ("events_matched_total", "source", Source),
        ("events_ignored_total", "source", Source),
        ("events_ignored_total", "reason", IgnoreReason),
        ("events_rejected_total", "reason", RejectReason),
        ("pushes_failed_total", "reason", FailureReason),
        ("paths_failed_total", "reason", FailureReason),
        ("paths_skipped_total", "reason", SkipReason),
        ("queue_items", "state", ItemState),
    ]
    for sample, label, vocabulary in expected:
        values = _label_values(registry, f"{PREFIX}_{sample}", label)
        assert values == {member.value for member in vocabulary}, (sample, label)
    backends = _label_values(registry, f"{PREFIX}_pushes_started_total", "backend")
    assert backends == set(CACHES.values()) == {kind.value for kind in BackendKind}


def test_metric_table_matches_the_typed_attributes() -> None:
    names = [spec.name for spec in METRICS]
    attrs = [spec.attr for spec in METRICS]
    assert len(set(names)) == len(names) and len(set(attrs)) == len(attrs)
    assert set(attrs) == set(typing.get_type_hints(BridgeMetrics))
    metrics = make(CollectorRegistry())
    for spec in METRICS:
        assert isinstance(getattr(metrics, spec.attr), spec.kind), spec.attr
