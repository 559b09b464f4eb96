"""Record a batch of validated events: match them against the rules and queue their paths."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bridge.config import Rule
from bridge.events import Event
from bridge.matching import match_event
from bridge.statedb import StateDb
from exporter.metrics import BridgeMetrics


@dataclass(frozen=True)
class Recorded:
    """One event as recorded: its outcome (`matched` or an ignore reason) and new paths."""

    event: Event
    outcome: str
    enqueued: dict[str, int]


def record_events(
    queue: StateDb, events: Iterable[Event], rules: Sequence[Rule], now: float
) -> list[Recorded]:
    """Match and record events; call inside the caller's queue.transaction()."""
    recorded: list[Recorded] = []
    for event in events:
        result = match_event(event, rules)
        outcome = result.ignored_reason or "matched"
        enqueued = queue.record_event(
            event, spool_name=None, outcome=outcome, targets=result.targets, now=now
        )
        # Without a spool name an event is never a duplicate row; callers dedup by build.
        recorded.append(Recorded(event, outcome, enqueued or {}))
    return recorded


def count_recorded(metrics: BridgeMetrics, recorded: Iterable[Recorded], now: float) -> bool:
    """After the commit: update the event metrics; True when any path was queued."""
    any_enqueued = False
    for item in recorded:
        count_event(metrics, item.event, item.outcome, item.enqueued, now)
        any_enqueued = any_enqueued or any(item.enqueued.values())
    return any_enqueued


def count_event(
    metrics: BridgeMetrics, event: Event, outcome: str, enqueued: dict[str, int], now: float
) -> None:
    """Update the event metrics for one recorded event."""
    metrics.events_received.labels(event.source).inc()
    metrics.last_event.labels(event.source).set(now)
    if outcome == "matched":
        metrics.events_matched.labels(event.source).inc()
    else:
        metrics.events_ignored.labels(event.source, outcome).inc()
    for cache, count in enqueued.items():
        metrics.paths_enqueued.labels(cache).inc(count)
