"""The one path every source takes: match an event, record it, count it, wake the workers.

A source (spool files, log lines, Hydra's database) validates its input into `Event`s, then,
inside its own state-database transaction, calls `Intake.record` for each, writes in the
same transaction whatever it keeps with the event itself (a consumed hook file, a log
offset, a checkpoint), and after the commit hands what was recorded to `Intake.announce`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from bridge.clock import Clock
from bridge.describe import describe_queued
from bridge.events import Event
from bridge.logsetup import input_logger
from bridge.matching import MatchResult, Rule, match_event
from bridge.statedb import StateDb
from exporter.metrics import BridgeMetrics
from exporter.vocabulary import MATCHED

log = input_logger(__name__)


@dataclass(frozen=True)
class Recorded:
    """One event as recorded: its outcome (`matched` or an ignore reason) and new paths."""

    event: Event
    outcome: str
    enqueued: dict[str, int]
    origin: str
    """Where the source read it, for the log line: a spool file's name, a log file, or
    nothing (a build row, which the event names itself)."""

    @property
    def queued(self) -> int:
        """How many (cache, path) items this event added to the queue."""
        return sum(self.enqueued.values())


class Intake:
    """Records validated events through the rules, then counts them and wakes the workers."""

    def __init__(
        self,
        rules: Sequence[Rule],
        metrics: BridgeMetrics,
        clock: Clock,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.rules = rules
        self.metrics = metrics
        self.clock = clock
        self.wake = wake

    def match(self, event: Event) -> MatchResult:
        """Which caches each path of the event goes to under the configured rules."""
        return match_event(event, self.rules)

    def record(
        self,
        db: StateDb,
        event: Event,
        *,
        origin: str = "",
        spool_name: str | None = None,
        spool_digest: str | None = None,
    ) -> Recorded | None:
        """Match and record one event; call inside db.transaction().

        None when the spool file (spool_name, spool_digest) was recorded before. Without a
        spool name an event is never a duplicate row: such sources dedup by their own key.
        """
        result = self.match(event)
        outcome = result.ignored_reason or MATCHED
        enqueued = db.record_event(
            event,
            spool_name=spool_name,
            outcome=outcome,
            targets=result.targets,
            now=self.clock.time(),
            spool_digest=spool_digest,
        )
        if enqueued is None:
            return None
        return Recorded(event, outcome, enqueued, origin)

    def announce(self, recorded: Iterable[Recorded]) -> int:
        """After the commit: count and log every event, wake the workers; paths queued."""
        now = self.clock.time()
        queued = 0
        for item in recorded:
            self._count(item, now)
            queued += item.queued
            what = ", ".join(part for part in (_names(item.event), item.origin) if part)
            log.info(
                "event from %s%s: %s",
                item.event.source,
                f" ({what})" if what else "",
                describe_queued(item.enqueued, item.outcome, len(item.event.out_paths)),
            )
        if queued:
            self.wake()
        return queued

    def count_rejected(self, reason: str) -> None:
        """Count one rejected (quarantined or skipped) input of any source."""
        self.metrics.events_rejected.labels(reason).inc()

    def _count(self, item: Recorded, now: float) -> None:
        source = item.event.source
        self.metrics.events_received.labels(source).inc()
        self.metrics.last_event.labels(source).set(now)
        if item.outcome == MATCHED:
            self.metrics.events_matched.labels(source).inc()
        else:
            self.metrics.events_ignored.labels(source, item.outcome).inc()
        for cache, count in item.enqueued.items():
            self.metrics.paths_enqueued.labels(cache).inc(count)


def _names(event: Event) -> str:
    """`build 17 p:j:job` or the derivation, whichever the event knows first."""
    if event.build_id is not None:
        return f"build {event.build_id} {event.project}:{event.jobset}:{event.job}"
    return event.drv_path or ""
