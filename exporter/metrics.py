"""Every metric of hydra-cachix-bridge, defined in one place on an injected registry."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "hydra_cachix_bridge"
# Uploads take from a fraction of a second to an hour: not the client's web defaults.
UPLOAD_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# The project and jobset label values of every pair beyond `per_jobset_limit`: parentheses
# cannot occur in Hydra's project or jobset names, so it never collides with a real one.
OTHER_JOBSET = "(other)"
LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600)


class BridgeMetrics:
    """The bridge's counters, gauges and histograms, pre-created for known label values."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        version: str,
        caches: dict[str, str],
        sources: Sequence[str],
        reject_reasons: Sequence[str],
        ignore_reasons: Sequence[str],
        failure_reasons: Sequence[str],
        skip_reasons: Sequence[str],
        per_jobset: bool = False,
        per_jobset_limit: int = 200,
        log_sources: Sequence[str] = (),
    ) -> None:
        self.registry = registry
        self.per_jobset = per_jobset
        self.per_jobset_limit = per_jobset_limit
        self._jobsets: set[tuple[str, str]] = set()
        self._jobsets_lock = threading.Lock()
        jobset_labels = ["project", "jobset"] if per_jobset else []
        r = registry
        self.build_info = Info(f"{PREFIX}_build", "Version of hydra-cachix-bridge", registry=r)
        self.build_info.info({"version": version})
        self.events_received = Counter(
            f"{PREFIX}_events_received_total", "Events read from a source", ["source"], registry=r
        )
        self.events_rejected = Counter(
            f"{PREFIX}_events_rejected_total",
            "Events rejected and quarantined",
            ["reason"],
            registry=r,
        )
        self.events_matched = Counter(
            f"{PREFIX}_events_matched_total",
            "Events that matched at least one rule",
            ["source"],
            registry=r,
        )
        self.events_ignored = Counter(
            f"{PREFIX}_events_ignored_total",
            "Events that queued nothing, by reason",
            ["source", "reason"],
            registry=r,
        )
        self.paths_enqueued = Counter(
            f"{PREFIX}_paths_enqueued_total",
            "Store paths queued for a cache",
            ["cache"],
            registry=r,
        )
        self.pushes_started = Counter(
            f"{PREFIX}_pushes_started_total",
            "Push invocations started",
            ["cache", "backend"],
            registry=r,
        )
        self.pushes_succeeded = Counter(
            f"{PREFIX}_pushes_succeeded_total",
            "Push invocations that succeeded",
            ["cache", "backend"],
            registry=r,
        )
        self.pushes_failed = Counter(
            f"{PREFIX}_pushes_failed_total",
            "Push invocations that failed, by reason",
            ["cache", "backend", "reason"],
            registry=r,
        )
        self.paths_pushed = Counter(
            f"{PREFIX}_paths_pushed_total",
            "Store paths pushed",
            ["cache", *jobset_labels],
            registry=r,
        )
        self.paths_failed = Counter(
            f"{PREFIX}_paths_failed_total",
            "Store paths in a failed push, by reason",
            ["cache", "reason", *jobset_labels],
            registry=r,
        )
        self.paths_skipped = Counter(
            f"{PREFIX}_paths_skipped_total",
            "Store paths dropped without a push, by reason",
            ["cache", "reason"],
            registry=r,
        )
        self.bytes_pushed = Counter(
            f"{PREFIX}_pushed_bytes_total",
            "NAR bytes of the store paths pushed",
            ["cache"],
            registry=r,
        )
        self.push_duration = Histogram(
            f"{PREFIX}_push_duration_seconds",
            "Wall time of one push invocation",
            ["cache"],
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            f"{PREFIX}_end_to_end_latency_seconds",
            "From build finished (or event recorded) to path pushed",
            ["cache"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            f"{PREFIX}_retries_total",
            "Store paths scheduled for another attempt",
            ["cache"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters_total",
            "Store paths that exhausted their attempts",
            ["cache"],
            registry=r,
        )
        self.last_event = Gauge(
            f"{PREFIX}_last_event_timestamp_seconds",
            "Time of the last event per source",
            ["source"],
            registry=r,
        )
        self.last_success = Gauge(
            f"{PREFIX}_last_success_timestamp_seconds",
            "Time of the last successful push",
            ["cache"],
            registry=r,
        )
        self.last_failure = Gauge(
            f"{PREFIX}_last_failure_timestamp_seconds",
            "Time of the last failed push",
            ["cache"],
            registry=r,
        )
        self.cache_up = Gauge(
            f"{PREFIX}_cache_up",
            "1 while the cache takes pushes, 0 while every push to it fails (items wait)",
            ["cache"],
            registry=r,
        )
        self.spool_watch_alive = Gauge(
            f"{PREFIX}_spool_watch_alive",
            "1 while the spool directory is being watched",
            registry=r,
        )
        self.log_sources_alive = Gauge(
            f"{PREFIX}_log_source_readable",
            "1 while a configured log file can be read",
            ["path"],
            registry=r,
        )
        for path in log_sources:
            self.log_sources_alive.labels(path)

        for source in sources:
            self.events_received.labels(source)
            self.events_matched.labels(source)
            for reason in ignore_reasons:
                self.events_ignored.labels(source, reason)
        for reason in reject_reasons:
            self.events_rejected.labels(reason)
        for cache, backend in caches.items():
            self.paths_enqueued.labels(cache)
            self.pushes_started.labels(cache, backend)
            self.pushes_succeeded.labels(cache, backend)
            # With per_jobset, only the series of events without a job (hook, log) exist
            # in advance; project/jobset series appear with their first push.
            extra = ["", ""] if per_jobset else []
            for reason in failure_reasons:
                self.pushes_failed.labels(cache, backend, reason)
                self.paths_failed.labels(cache, reason, *extra)
            for reason in skip_reasons:
                self.paths_skipped.labels(cache, reason)
            self.paths_pushed.labels(cache, *extra)
            self.bytes_pushed.labels(cache)
            self.push_duration.labels(cache)
            self.end_to_end.labels(cache)
            self.retries.labels(cache)
            self.dead_letters.labels(cache)
            self.cache_up.labels(cache).set(1)

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
        states: Sequence[str],
        clock: Callable[[], float],
    ) -> None:
        self.read = read
        self.caches = list(caches)
        self.states = states
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
            for state in self.states:
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
