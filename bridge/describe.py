"""Short human phrases for log lines: what was queued, which paths, when the next try is."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

FIRST_PATHS = 3


def describe_queued(enqueued: Mapping[str, int], outcome: str, paths: int) -> str:
    """`queued 2 path(s) for main, 2 for mirror`, or why nothing was queued."""
    queued = [(cache, count) for cache, count in enqueued.items() if count]
    if queued:
        (cache, count), rest = queued[0], queued[1:]
        return f"queued {count} path(s) for {cache}" + "".join(f", {n} for {c}" for c, n in rest)
    if outcome != "matched":
        return f"nothing queued ({outcome}, {paths} path(s))"
    return f"nothing new queued ({paths} path(s) already queued or pushed)"


def first_paths(paths: Sequence[str], limit: int = FIRST_PATHS) -> str:
    """The first few store paths, and how many more there are."""
    shown = ", ".join(paths[:limit])
    more = len(paths) - limit
    return f"{shown} (+{more} more)" if more > 0 else shown


def next_try(at: float, now: float) -> str:
    """`next try in 12s at 14:03:07` (local time, as in the journal)."""
    return (
        f"next try in {max(0.0, at - now):.0f}s at {time.strftime('%H:%M:%S', time.localtime(at))}"
    )


def age(now: float, then: float | None) -> str:
    """How long ago, compact: `45s ago`, `12m34s ago`, `3h05m ago`, `2d04h ago`, or `never`."""
    if then is None:
        return "never"
    s = max(0, int(now - then))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s ago"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m ago"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h ago"
