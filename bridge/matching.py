"""Decide which caches each path of an event goes to, following the configured rules."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from bridge.events import Event
from bridge.settings import declared, setting
from bridge.storepath import path_name
from exporter.vocabulary import HYDRA_SOURCES, IgnoreReason, Source


@dataclass(frozen=True)
class JobPattern:
    """Hydra's `project:jobset:job` pattern: each part is `*` or must equal the value.

    Parsed exactly as Hydra's RunCommand plugin does (NixOS/hydra,
    subprojects/hydra/lib/Hydra/Plugin/RunCommand.pm, `configSectionMatches`): the text is
    split with Perl's `split /:/`, which drops trailing empty fields; more than three fields
    is an error; a missing field is `*`. So `""`, `proj:`, `proj::` and `proj:main:simple:`
    are all valid, while an empty field before a non-empty one (`proj::simple`) must equal
    the empty string. `*` is a wildcard only as a whole part: `release-*` is literal.
    """

    project: str
    jobset: str
    job: str

    @classmethod
    def parse(cls, text: str) -> JobPattern:
        """Parse a pattern as Hydra does; more than three parts is a ValueError."""
        parts = text.split(":")
        while parts and not parts[-1]:  # Perl's split drops trailing empty fields
            parts.pop()
        if len(parts) > 3:
            raise ValueError(
                f"invalid job pattern {text!r}: Hydra allows at most three ':'-separated "
                "parts (project:jobset:job)"
            )
        parts += ["*"] * (3 - len(parts))
        return cls(*parts)

    def matches(self, project: str, jobset: str, job: str) -> bool:
        """True when every part is `*` or equal to the value."""
        return all(
            want == "*" or want == got
            for want, got in ((self.project, project), (self.jobset, jobset), (self.job, job))
        )

    def literal_stars(self) -> tuple[str, ...]:
        """Parts that contain `*` without being `*`: Hydra matches them literally."""
        return tuple(p for p in (self.project, self.jobset, self.job) if "*" in p and p != "*")

    def __str__(self) -> str:
        return f"{self.project}:{self.jobset}:{self.job}"


@dataclass(frozen=True)
class Rule:
    """Which events (by source, job and status) and which paths go to which caches."""

    caches: tuple[str, ...] = field(
        metadata=declared(required="is required: a non-empty list of cache names")
    )
    # Read by bridge.config, which parses each pattern and warns about literal stars.
    jobs: tuple[JobPattern, ...] = ()
    sources: tuple[Source, ...] = setting(
        tuple(Source), invalid="unknown source {value!r} (one of {choices})"
    )
    build_statuses: tuple[int, ...] = setting(
        (0,), minimum=0, maximum=99, items="Hydra build status integers"
    )
    exclude: tuple[str, ...] = setting(())


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
