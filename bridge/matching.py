"""Decide which caches each path of an event goes to, following the configured rules."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.config import Rule
from bridge.events import Event
from bridge.storepath import path_name
from exporter.vocabulary import HYDRA_SOURCES, IgnoreReason


@dataclass(frozen=True)
class MatchResult:
    """The (cache, path) targets of an event, or why it was ignored."""

    targets: tuple[tuple[str, str], ...]
    ignored_reason: str | None = None


def _applies(rule: Rule, event: Event) -> bool:
    if event.source not in rule.sources:
        return False
    if not rule.jobs:
        return True
    job = event.hydra_job
    return job is not None and any(p.matches(*job) for p in rule.jobs)


def _status_ok(rule: Rule, event: Event) -> bool:
    # Only Hydra knows a build status; hook and log events come from successful builds.
    return event.source not in HYDRA_SOURCES or event.build_status in rule.build_statuses


def _excluded(rule: Rule, path: str) -> bool:
    name = path_name(path)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in rule.exclude)


def match_event(event: Event, rules: Sequence[Rule]) -> MatchResult:
    """Union of the caches of every rule that applies, per path, in a stable order."""
    applicable = [rule for rule in rules if _applies(rule, event)]
    if not applicable:
        return MatchResult((), IgnoreReason.NO_RULE)
    accepted = [rule for rule in applicable if _status_ok(rule, event)]
    if not accepted:
        return MatchResult((), IgnoreReason.STATUS_FILTERED)
    if not event.out_paths:
        return MatchResult((), IgnoreReason.NO_OUTPUTS)
    targets: dict[tuple[str, str], None] = {}
    for path in event.out_paths:
        for rule in accepted:
            if not _excluded(rule, path):
                for cache in rule.caches:
                    targets[(cache, path)] = None
    if not targets:
        return MatchResult((), IgnoreReason.EXCLUDED)
    return MatchResult(tuple(targets))
