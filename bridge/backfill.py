"""Record the finished builds of a Hydra jobset (one evaluation, or since a date) as events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.clock import Clock
from bridge.hydradb import HydraReader
from bridge.hydrasource import HydraRecorder
from bridge.intake import Intake
from bridge.statedb import StateDb
from exporter.vocabulary import Source

SOURCE = Source.BACKFILL
PAGE = 2000


class BackfillError(Exception):
    """The selection names a jobset or evaluation that does not exist."""


@dataclass(frozen=True)
class Selection:
    """Which builds of which jobset: an evaluation (by id or the latest), and/or a date."""

    project: str
    jobset: str
    eval_id: int | None = None
    latest: bool = False
    since: int | None = None


@dataclass
class BackfillReport:
    """What a backfill did (or, dry, would do)."""

    eval_id: int | None = None
    builds: int = 0
    recorded: int = 0
    skipped: int = 0  # recorded by an earlier backfill, or cancelled
    rejected: int = 0
    ignored: dict[str, int] = field(default_factory=dict)
    # Per cache: builds with at least one path for it, and distinct paths.
    cache_builds: dict[str, int] = field(default_factory=dict)
    cache_paths: dict[str, int] = field(default_factory=dict)


class Backfill:
    """Reads a selection from Hydra's database and records it through the rules."""

    def __init__(
        self,
        reader: HydraReader,
        db: StateDb,
        intake: Intake,
        clock: Clock,
    ) -> None:
        self.reader = reader
        self.intake = intake
        self.recorder = HydraRecorder(db, intake, clock, source=SOURCE)

    def resolve(self, selection: Selection) -> tuple[int, int | None]:
        """(jobset id, evaluation id or None), checked against Hydra's database."""
        name = f"{selection.project}:{selection.jobset}"
        jobset_id = self.reader.jobset_id(selection.project, selection.jobset)
        if jobset_id is None:
            raise BackfillError(f"Hydra has no jobset {name}")
        eval_id = selection.eval_id
        if selection.latest:
            eval_id = self.reader.latest_eval(jobset_id)
            if eval_id is None:
                raise BackfillError(f"jobset {name} has no evaluation with builds yet")
        elif eval_id is not None and self.reader.eval_jobset(eval_id) != jobset_id:
            raise BackfillError(f"evaluation {eval_id} does not exist or is not of {name}")
        return jobset_id, eval_id

    def count(self, selection: Selection) -> int:
        """How many finished builds the selection holds (for a progress bar)."""
        jobset_id, eval_id = self.resolve(selection)
        return self.reader.count_selected(jobset_id, eval_id, selection.since)

    def run(
        self,
        selection: Selection,
        *,
        dry_run: bool = False,
        progress: Callable[[int], None] = lambda _: None,
    ) -> BackfillReport:
        """Record (or with dry_run only count) the selection, one transaction per page.

        Interrupting loses at most the page in progress (its transaction rolls back); a
        second run skips the builds already recorded by `backfill`.
        """
        jobset_id, eval_id = self.resolve(selection)
        report = BackfillReport(eval_id=eval_id)
        paths: dict[str, set[str]] = {}
        for rows in self.reader.selected(jobset_id, eval_id, selection.since, PAGE):
            events, rejected = self.recorder.record(self.reader, rows, dry_run=dry_run)
            report.builds += len(rows)
            report.rejected += rejected
            if not dry_run:
                report.recorded += len(events)
            report.skipped += len(rows) - len(events) - rejected
            for event in events:
                result = self.intake.match(event)
                if result.ignored_reason is not None:
                    reason = result.ignored_reason
                    report.ignored[reason] = report.ignored.get(reason, 0) + 1
                    continue
                caches = {cache for cache, _ in result.targets}
                for cache in caches:
                    report.cache_builds[cache] = report.cache_builds.get(cache, 0) + 1
                for cache, path in result.targets:
                    paths.setdefault(cache, set()).add(path)
            progress(len(rows))
        report.cache_paths = {cache: len(found) for cache, found in paths.items()}
        return report
