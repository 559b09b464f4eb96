"""The metrics of hydra-cachix-bridge on an injected registry: the bridge's own defined in one
table (METRICS), the Hydra database source's and the queue collector's beside it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from exporter.vocabulary import (
    FailureReason,
    IgnoreReason,
    ItemState,
    RejectReason,
    SkipReason,
    Source,
)

PREFIX = "hydra_cachix_bridge"
# Uploads take from a fraction of a second to an hour: not the client's web defaults.
UPLOAD_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# The project and jobset label values of every pair beyond `per_jobset_limit`: parentheses
# cannot occur in Hydra's project or jobset names, so it never collides with a real one.
OTHER_JOBSET = "(other)"
LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600)
# The labels added to the path counters with `per_jobset`.
JOBSET_LABELS = ("project", "jobset")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its attribute on BridgeMetrics, name, type, help, labels and series."""

    attr: str
    kind: type[MetricWrapperBase]
    name: str
    """Without the `hydra_cachix_bridge_` prefix."""
    labels: tuple[str, ...]
    help: str
    reasons: type[StrEnum] | None = None
    """The vocabulary of the `reason` label."""
    by_jobset: bool = False
    """Labelled by project and jobset too when `per_jobset` is on."""
    buckets: tuple[float, ...] = ()
    precreate: bool = True
    """Create every known label combination up front, so that each series exists at 0."""
    initial: float | None = None
    """The value of a gauge's pre-created series."""


# fmt: off
METRICS: Final[tuple[MetricSpec, ...]] = (
    # MetricSpec(attribute, type, name after PREFIX_, labels,
    #            help, options),
    MetricSpec("build_info", Info, "build", (),
               "Version of hydra-cachix-bridge"),
    MetricSpec("events_received", Counter, "events_received_total", ("source",),
               "Events read from a source"),
    MetricSpec("events_rejected", Counter, "events_rejected_total", ("reason",),
               "Events rejected and quarantined", reasons=RejectReason),
    MetricSpec("events_matched", Counter, "events_matched_total", ("source",),
               "Events that matched at least one rule"),
    MetricSpec("events_ignored", Counter, "events_ignored_total", ("source", "reason"),
               "Events that queued nothing, by reason", reasons=IgnoreReason),
    MetricSpec("paths_enqueued", Counter, "paths_enqueued_total", ("cache",),
               "Store paths queued for a cache"),
    MetricSpec("pushes_started", Counter, "pushes_started_total", ("cache", "backend"),
               "Push invocations started"),
    MetricSpec("pushes_succeeded", Counter, "pushes_succeeded_total", ("cache", "backend"),
               "Push invocations that succeeded"),
    MetricSpec("pushes_failed", Counter, "pushes_failed_total", ("cache", "backend", "reason"),
               "Push invocations that failed, by reason", reasons=FailureReason),
    MetricSpec("paths_pushed", Counter, "paths_pushed_total", ("cache",),
               "Store paths pushed", by_jobset=True),
    MetricSpec("paths_failed", Counter, "paths_failed_total", ("cache", "reason"),
               "Store paths in a failed push, by reason", reasons=FailureReason, by_jobset=True),
    MetricSpec("paths_skipped", Counter, "paths_skipped_total", ("cache", "reason"),
               "Store paths dropped without a push, by reason", reasons=SkipReason),
    MetricSpec("bytes_pushed", Counter, "pushed_bytes_total", ("cache",),
               "NAR bytes of the store paths pushed"),
    MetricSpec("push_duration", Histogram, "push_duration_seconds", ("cache",),
               "Wall time of one push invocation", buckets=UPLOAD_BUCKETS),
    MetricSpec("end_to_end", Histogram, "end_to_end_latency_seconds", ("cache",),
               "From build finished (or event recorded) to path pushed", buckets=LATENCY_BUCKETS),
    MetricSpec("retries", Counter, "retries_total", ("cache",),
               "Store paths scheduled for another attempt"),
    MetricSpec("dead_letters", Counter, "dead_letters_total", ("cache",),
               "Store paths that exhausted their attempts"),
    MetricSpec("last_event", Gauge, "last_event_timestamp_seconds", ("source",),
               "Time of the last event per source", precreate=False),
    MetricSpec("last_success", Gauge, "last_success_timestamp_seconds", ("cache",),
               "Time of the last successful push", precreate=False),
    MetricSpec("last_failure", Gauge, "last_failure_timestamp_seconds", ("cache",),
               "Time of the last failed push", precreate=False),
    MetricSpec("cache_up", Gauge, "cache_up", ("cache",),
               "1 while the cache takes pushes, 0 while every push to it fails (items wait)",
               initial=1),
    MetricSpec("spool_watch_alive", Gauge, "spool_watch_alive", (),
               "1 while the spool directory is being watched"),
    MetricSpec("log_sources_alive", Gauge, "log_source_readable", ("path",),
               "1 while a configured log file can be read"),
)
# fmt: on


class BridgeMetrics:
    """The bridge's counters, gauges and histograms (see METRICS), pre-created at zero."""

    build_info: Info
    events_received: Counter
    events_rejected: Counter
    events_matched: Counter
    events_ignored: Counter
    paths_enqueued: Counter
    pushes_started: Counter
    pushes_succeeded: Counter
    pushes_failed: Counter
    paths_pushed: Counter
    paths_failed: Counter
    paths_skipped: Counter
    bytes_pushed: Counter
    push_duration: Histogram
    end_to_end: Histogram
    retries: Counter
    dead_letters: Counter
    last_event: Gauge
    last_success: Gauge
    last_failure: Gauge
    cache_up: Gauge
    spool_watch_alive: Gauge
    log_sources_alive: Gauge

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        version: str,
        caches: dict[str, str],
        per_jobset: bool = False,
        per_jobset_limit: int = 200,
        log_sources: Sequence[str] = (),
    ) -> None:
        self.registry = registry
        self.per_jobset = per_jobset
        self.per_jobset_limit = per_jobset_limit
        self._jobsets: set[tuple[str, str]] = set()
        self._jobsets_lock = threading.Lock()
        # The values each label takes in advance. With per_jobset, only the series of
        # events without a job (hook, log) exist in advance; project/jobset series appear
        # with their first push. `backend` follows from `cache`, and `reason` from the spec.
        self._known: dict[str, Sequence[str]] = {
            "source": tuple(Source),
            "cache": tuple(caches),
            "path": tuple(log_sources),
            "project": ("",),
            "jobset": ("",),
        }
        self._backends = caches
        for spec in METRICS:
            setattr(self, spec.attr, self._create(spec))
        self.build_info.info({"version": version})

    def _create(self, spec: MetricSpec) -> MetricWrapperBase:
        """Register the metric of spec and pre-create its known series."""
        labels = spec.labels + (JOBSET_LABELS if spec.by_jobset and self.per_jobset else ())
        name = f"{PREFIX}_{spec.name}"
        if spec.kind is Histogram:
            metric: MetricWrapperBase = Histogram(
                name, spec.help, labels, buckets=spec.buckets, registry=self.registry
            )
        else:
            metric = spec.kind(name, spec.help, labels, registry=self.registry)
        if spec.precreate and labels:
            for values in self._label_sets(labels, spec.reasons):
                child = metric.labels(*values)
                if spec.initial is not None and isinstance(child, Gauge):
                    child.set(spec.initial)
        return metric

    def _label_sets(
        self, labels: Sequence[str], reasons: type[StrEnum] | None
    ) -> list[tuple[str, ...]]:
        """Every known combination of values of labels, in label order."""
        rows: list[dict[str, str]] = [{}]
        for label in labels:
            if label == "backend":
                rows = [{**row, label: self._backends[row["cache"]]} for row in rows]
                continue
            known = tuple(reasons or ()) if label == "reason" else self._known[label]
            rows = [{**row, label: value} for row in rows for value in known]
        return [tuple(row[label] for label in labels) for row in rows]

    def count_paths(
        self,
        cache: str,
        origins: Iterable[tuple[str | None, str | None]],
        reason: str | None = None,
    ) -> None:
        """Count pushed (reason None) or failed paths, by project/jobset when opted in."""
        groups: dict[tuple[str, ...], int] = {}
        for project, jobset in origins:
            key: tuple[str, ...] = self._jobset_labels(project, jobset) if self.per_jobset else ()
            groups[key] = groups.get(key, 0) + 1
        for key, count in groups.items():
            if reason is None:
                self.paths_pushed.labels(cache, *key).inc(count)
            else:
                self.paths_failed.labels(cache, reason, *key).inc(count)

    def _jobset_labels(self, project: str | None, jobset: str | None) -> tuple[str, str]:
        """The label pair for an origin: itself while under the limit, else "(other)"."""
        pair = (project or "", jobset or "")
        if pair == ("", ""):
            return pair  # hook and log events: always their own, pre-created series
        with self._jobsets_lock:
            if pair in self._jobsets:
                return pair
            if len(self._jobsets) < self.per_jobset_limit:
                self._jobsets.add(pair)
                return pair
        return (OTHER_JOBSET, OTHER_JOBSET)


class _WithoutCreated(Collector):
    """Another registry's metrics without the `_created` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        """Copy each family, leaving out its `_created` samples."""
        for family in self.registry.collect():
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield copy

    def describe(self) -> Iterable[Metric]:
        """Nothing to describe ahead of collection."""
        return []


def without_created(registry: CollectorRegistry) -> CollectorRegistry:
    """A registry exposing registry's metrics minus the `_created` series.

    The client's own switch (disable_created_metrics) is process-global; this leaves other
    registries in the process, and the injected registry that tests read, untouched.
    """
    # Without names of its own, the copy is collected for every `name[]` filter, which then
    # keeps only the samples asked for. (Older clients lack the switch: the filter then
    # matches nothing, the unfiltered scrape is unchanged.)
    try:
        exposed = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
    except TypeError:
        exposed = CollectorRegistry(auto_describe=False)
    exposed.register(_WithoutCreated(registry))
    return exposed


class QueueCollector(Collector):
    """Queue depth per cache and state, and oldest pending age, read at scrape time."""

    def __init__(
        self,
        read: Callable[[], tuple[dict[tuple[str, str], int], dict[str, float]]],
        caches: Iterable[str],
        clock: Callable[[], float],
    ) -> None:
        self.read = read
        self.caches = list(caches)
        self.clock = clock

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """Yield the queue gauges."""
        counts, oldest = self.read()
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_items",
            "Queued store paths per cache and state",
            labels=["cache", "state"],
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_oldest_pending_age_seconds",
            "Age of the oldest pending or in-flight path per cache (0 when none)",
            labels=["cache"],
        )
        now = self.clock()
        names = list(dict.fromkeys([*self.caches, *(cache for cache, _ in counts)]))
        for cache in names:
            for state in ItemState:
                depth.add_metric([cache, state], counts.get((cache, state), 0))
            started = oldest.get(cache)
            age.add_metric([cache], max(0.0, now - started) if started is not None else 0.0)
        yield depth
        yield age

    def describe(self) -> Iterable[GaugeMetricFamily]:
        """Describe without reading the database at registration."""
        return []


class HydraDbMetrics:
    """Metrics of the Hydra database source; registered only when [hydra_db] is configured."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            f"{PREFIX}_hydra_db_connected",
            "1 while connected to Hydra's PostgreSQL and listening for build_finished",
            registry=registry,
        )
        self.lag = Gauge(
            f"{PREFIX}_hydra_db_lag_seconds",
            "Now minus the finish time of the newest build read from Hydra's database",
            registry=registry,
        )
        self.reconnects = Counter(
            f"{PREFIX}_hydra_db_reconnects_total",
            "Connections to Hydra's PostgreSQL lost or refused",
            registry=registry,
        )
        self.caught_up = Counter(
            f"{PREFIX}_hydra_db_catch_up_builds_total",
            "Finished builds read by catch-up queries (not via a notification)",
            registry=registry,
        )
