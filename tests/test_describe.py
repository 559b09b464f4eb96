"""bridge/describe.py: the phrases the log lines are made of."""

from __future__ import annotations

import time

from bridge.describe import describe_queued, first_paths, next_try


def test_queued_names_each_cache_with_its_count() -> None:
    text = describe_queued({"main": 2, "mirror": 2}, "matched", 2)
    assert text == "queued 2 path(s) for main, 2 for mirror"
    assert describe_queued({"main": 0, "mirror": 1}, "matched", 1) == "queued 1 path(s) for mirror"


def test_nothing_queued_says_why() -> None:
    assert describe_queued({}, "no_rule", 3) == "nothing queued (no_rule, 3 path(s))"
    assert describe_queued({"main": 0}, "matched", 1) == (
        "nothing new queued (1 path(s) already queued or pushed)"
    )


def test_first_paths_shows_three_and_counts_the_rest() -> None:
    paths = [f"/nix/store/{i}" for i in range(5)]
    assert first_paths(paths) == "/nix/store/0, /nix/store/1, /nix/store/2 (+2 more)"
    assert first_paths(paths[:2]) == "/nix/store/0, /nix/store/1"


def test_next_try_gives_the_delay_and_the_local_clock_time() -> None:
    at = 1_700_000_000.0
    expected = time.strftime("%H:%M:%S", time.localtime(at))
    assert next_try(at, at - 12.4) == f"next try in 12s at {expected}"
