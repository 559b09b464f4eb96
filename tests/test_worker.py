"""bridge/worker.py: PushWorkers with a real queue, real store and real built paths."""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bridge.backends import Backend, CachixBackend, NixCopyBackend, PushOutcome
from bridge.clock import SystemClock
from bridge.config import CacheConfig, PushSettings
from bridge.events import Event
from bridge.statedb import CacheHealth, StateDb
from bridge.store import NixStore
from bridge.worker import BackoffPolicy, PushWorkers, parallel_limits
from exporter.metrics import BridgeMetrics
from tests.nixhelpers import Built, build, narinfo

pytestmark = pytest.mark.nix

GONE = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hcb-garbage-collected"
P = "hydra_cachix_bridge_"

Handler = Callable[[list[str], float, threading.Event], PushOutcome]


def ok(paths: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
    return PushOutcome(ok=True, duration=0.01)


class ScriptedBackend:
    """A Backend whose outcome is decided by a function of the paths; records every call."""

    def __init__(self, name: str, handler: Handler = ok) -> None:
        self.name = name
        self.handler = handler
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def push(self, paths: Sequence[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        with self.lock:
            self.calls.append(list(paths))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return self.handler(list(paths), timeout, cancel)
        finally:
            with self.lock:
                self.active -= 1


def failing(reason: str = "exit_status", error: str = "cache said no") -> Handler:
    def handler(paths: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        return PushOutcome(ok=False, duration=0.01, reason=reason, error=error)

    return handler


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> list[Built]:
    return build(tmp_path_factory.mktemp("worker-nix"), 10, prefix="hcb-worker")


class Harness:
    """A queue database, metrics on a fresh registry, and the workers under test."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "state" / "queue.sqlite3"
        self.queue = StateDb(self.db)
        self.registry = CollectorRegistry()
        self.workers: list[PushWorkers] = []
        self.metrics: BridgeMetrics | None = None

    def enqueue(self, cache: str, paths: Sequence[str]) -> None:
        now = time.time()
        event = Event(source="hook", received_at=now, out_paths=tuple(paths))
        with self.queue.transaction():
            self.queue.record_event(
                event,
                spool_name=f"{uuid.uuid4().hex}.json",
                outcome="matched",
                targets=[(cache, p) for p in paths],
                now=now,
            )

    def start(
        self,
        caches: dict[str, CacheConfig],
        backends: dict[str, Backend],
        rng: random.Random | None = None,
        **settings: float,
    ) -> PushWorkers:
        workers = self.make(caches, backends, rng, **settings)
        workers.start()
        return workers

    def make(
        self,
        caches: dict[str, CacheConfig],
        backends: dict[str, Backend],
        rng: random.Random | None = None,
        **settings: float,
    ) -> PushWorkers:
        defaults: dict[str, float] = {
            "workers": 1,
            "batch_size": 8,
            "timeout_seconds": 10.0,
            "max_attempts": 2,
            "backoff_initial_seconds": 0.0,
            "backoff_max_seconds": 0.0,
        }
        defaults.update(settings)
        self.metrics = BridgeMetrics(
            self.registry,
            version="test",
            caches={name: cache.backend for name, cache in caches.items()},
        )
        workers = PushWorkers(
            settings=PushSettings(**defaults),  # type: ignore[arg-type]
            caches=caches,
            backends=backends,
            db_factory=lambda: StateDb(self.db),
            store=NixStore(),
            metrics=self.metrics,
            clock=SystemClock(),
            rng=rng,
        )
        self.workers.append(workers)
        return workers

    def value(self, name: str, **labels: str) -> float:
        sample = self.registry.get_sample_value(P + name, labels)
        assert sample is not None, f"no sample {name} {labels}"
        return sample

    def count(self, cache: str, state: str) -> int:
        return self.queue.counts().get((cache, state), 0)

    def settled(self, cache: str) -> bool:
        counts = self.queue.counts()
        return counts.get((cache, "pending"), 0) + counts.get((cache, "inflight"), 0) == 0

    def quiesce(self) -> None:
        """Let running pushes finish and stop the workers.

        A push commits its rows first and counts its metrics and logs after: a test that
        saw the rows reads the metrics only once the worker has stopped.
        """
        for workers in self.workers:
            assert workers.stop(10.0), "a push did not finish within 10 s"

    def settle(self, *caches: str, timeout: float = 15.0) -> None:
        """Wait until nothing is pending or in flight for the caches, then quiesce."""
        wait_until(lambda: all(self.settled(cache) for cache in caches), timeout)
        self.quiesce()

    def item(self, cache: str, path: str) -> tuple[str, int, float, float, str | None]:
        row = self.queue.conn.execute(
            "SELECT state, attempts, next_attempt_at, updated_at, last_reason FROM items"
            " WHERE cache = ? AND path = ?",
            (cache, path),
        ).fetchone()
        assert row is not None
        return row  # type: ignore[no-any-return]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    for workers in h.workers:
        workers.stop(2.0)
    h.queue.close()


def cache(name: str, backend: str = "nix-copy", **kwargs: object) -> CacheConfig:
    uri = f"file:///tmp/unused-{name}" if backend == "nix-copy" else None
    return CacheConfig(name=name, backend=backend, uri=uri, **kwargs)  # type: ignore[arg-type]


# -- batching and success ----------------------------------------------------------------


def test_batches_per_cache_up_to_batch_size(harness: Harness, built: list[Built]) -> None:
    a_paths = [b.out for b in built[:5]]
    b_paths = [b.out for b in built[5:8]]
    harness.enqueue("a", a_paths)
    harness.enqueue("b", b_paths)
    a, b = ScriptedBackend("a"), ScriptedBackend("b")
    harness.start({"a": cache("a"), "b": cache("b")}, {"a": a, "b": b}, batch_size=2)
    harness.settle("a", "b")
    assert harness.count("a", "pushed") == 5
    assert harness.count("b", "pushed") == 3
    assert all(1 <= len(call) <= 2 for call in a.calls + b.calls)
    assert [len(call) for call in a.calls] == [2, 2, 1]
    assert [len(call) for call in b.calls] == [2, 1]
    assert sorted(p for call in a.calls for p in call) == sorted(a_paths)
    assert sorted(p for call in b.calls for p in call) == sorted(b_paths)


def test_one_batch_holds_up_to_batch_size_paths(harness: Harness, built: list[Built]) -> None:
    paths = [b.out for b in built[:6]]
    harness.enqueue("c", paths)
    backend = ScriptedBackend("c")
    harness.start({"c": cache("c")}, {"c": backend}, batch_size=32)
    wait_until(lambda: harness.settled("c"))
    assert backend.calls == [paths]


def test_success_marks_pushed_and_updates_metrics(harness: Harness, built: list[Built]) -> None:
    paths = [b.out for b in built[:3]]
    harness.enqueue("c", paths)
    backend = ScriptedBackend("c")
    before = time.time()
    harness.start({"c": cache("c", backend="cachix")}, {"c": backend})
    harness.settle("c")
    after = time.time()
    assert harness.count("c", "pushed") == 3
    labels = {"cache": "c", "backend": "cachix"}
    assert harness.value("pushes_started_total", **labels) == 1
    assert harness.value("pushes_succeeded_total", **labels) == 1
    assert harness.value("pushes_failed_total", reason="exit_status", **labels) == 0
    assert harness.value("paths_pushed_total", cache="c") == 3
    expected_bytes = sum(NixStore().nar_sizes(paths).values())
    assert expected_bytes > 0
    # Counted off the push path, within about a second.
    wait_until(lambda: harness.value("pushed_bytes_total", cache="c") == expected_bytes)
    assert before <= harness.value("last_success_timestamp_seconds", cache="c") <= after
    assert harness.value("push_duration_seconds_count", cache="c") == 1
    assert harness.value("push_duration_seconds_sum", cache="c") == pytest.approx(0.01)
    assert harness.value("end_to_end_latency_seconds_count", cache="c") == 3
    assert harness.value("retries_total", cache="c") == 0
    (status,) = harness.queue.cache_statuses(["c"])
    assert status.last_success_at is not None and before <= status.last_success_at <= after


def test_enqueue_after_start_is_picked_up_on_wake(harness: Harness, built: list[Built]) -> None:
    backend = ScriptedBackend("c")
    workers = harness.start({"c": cache("c")}, {"c": backend})
    time.sleep(0.1)  # the worker is idle now (it would otherwise poll only every 5 s)
    harness.enqueue("c", [built[0].out])
    workers.wake()
    wait_until(lambda: harness.count("c", "pushed") == 1, timeout=3)


def test_a_cache_down_before_a_restart_reads_down_before_the_workers_start(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # The daemon loads the recorded state before it serves /metrics and only then scans the
    # spool and starts the workers: a scrape meanwhile must not say the cache is up.
    down = CacheHealth("c", down_since=time.time() - 60, next_try_at=time.time() + 60)
    harness.queue.save_cache_health(down, time.time(), failed=True)
    backend = ScriptedBackend("c")
    workers = harness.make({"c": cache("c"), "d": cache("d")}, {"c": backend, "d": backend})
    assert harness.value("cache_up", cache="c") == 1  # the metric's default, before loading
    with caplog.at_level(logging.WARNING, logger="bridge.cachehealth"):
        workers.load_health()
        assert harness.value("cache_up", cache="c") == 0
        assert harness.value("cache_up", cache="d") == 1
        workers.start()  # loads nothing again
    said = [r.getMessage() for r in caplog.records if "is down since" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("cache c is down since "), said
    assert workers.health.get("c") == down


# -- failures ----------------------------------------------------------------------------


def test_poisoned_path_is_isolated_and_dead_lettered_alone(
    harness: Harness, built: list[Built]
) -> None:
    paths = [b.out for b in built[:8]]
    poison = paths[5]

    def handler(batch: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        if poison in batch:
            return PushOutcome(False, 0.01, "exit_status", f"cannot push {poison}")
        return PushOutcome(True, 0.01)

    harness.enqueue("c", paths)
    backend = ScriptedBackend("c", handler)
    harness.start({"c": cache("c")}, {"c": backend}, batch_size=8, max_attempts=2)
    harness.settle("c")

    dead = harness.queue.dead_letters()
    assert [d.path for d in dead] == [poison]
    assert dead[0].reason == "exit_status"
    assert poison in (dead[0].error or "")
    assert harness.count("c", "pushed") == 7
    assert harness.count("c", "dead") == 1
    pushed = {p for call in backend.calls if poison not in call for p in call}
    assert pushed == set(paths) - {poison}
    assert backend.calls[0] == paths  # first the whole batch ...
    with_poison = [call for call in backend.calls if poison in call]
    assert with_poison[-1] == [poison]  # ... and at last the poison alone
    sizes = [len(c) for c in backend.calls if poison in c]
    # Halved each time (a probe of the down cache may take one batch-mate out first).
    assert sizes[0] == 8 and sizes[-1] == 1
    assert all(later <= (earlier + 1) // 2 for earlier, later in itertools.pairwise(sizes))
    assert harness.value("dead_letters_total", cache="c") == 1
    assert harness.value("paths_pushed_total", cache="c") == 7
    assert harness.value("paths_failed_total", cache="c", reason="exit_status") == sum(sizes)


def test_failing_single_path_is_retried_then_dead_lettered(
    harness: Harness, built: list[Built]
) -> None:
    # The cache takes other pushes (here: the path pushed first), so the failures are the
    # path's own. (Before issue 12 this test had no other path: now that is an outage.)
    good, bad = built[1].out, built[0].out

    def handler(paths: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        if bad in paths:
            return PushOutcome(False, 0.01, "timeout", "push timed out")
        return PushOutcome(True, 0.01)

    harness.enqueue("c", [good])
    backend = ScriptedBackend("c", handler)
    harness.start({"c": cache("c")}, {"c": backend}, max_attempts=3)
    wait_until(lambda: harness.settled("c"))
    harness.enqueue("c", [bad])
    harness.workers[0].wake()
    wait_until(lambda: harness.count("c", "dead") == 1)
    # After its last failure the cache was down: a probe with the path it has brings it up.
    wait_until(lambda: harness.value("cache_up", cache="c") == 1)
    harness.quiesce()
    assert sum(bad in call for call in backend.calls) == 3
    state, attempts, *_rest, reason = harness.item("c", bad)
    assert (state, attempts, reason) == ("dead", 3, "timeout")
    labels = {"cache": "c", "backend": "nix-copy", "reason": "timeout"}
    assert harness.value("pushes_failed_total", **labels) == 3
    assert harness.value("retries_total", cache="c") == 2
    assert harness.value("dead_letters_total", cache="c") == 1
    assert harness.value("last_failure_timestamp_seconds", cache="c") > 0
    # Between its failures the cache was probed with the path it already has.
    assert [good] in backend.calls[2:]


def test_every_push_failing_is_an_outage_not_dead_letters(
    harness: Harness, built: list[Built]
) -> None:
    harness.enqueue("c", [b.out for b in built[:3]])
    backend = ScriptedBackend("c", failing("exit_status", "connection refused"))
    harness.start(
        {"c": cache("c")},
        {"c": backend},
        max_attempts=2,
        batch_size=1,
        backoff_initial_seconds=0.05,
        backoff_max_seconds=0.1,
    )
    wait_until(lambda: len(backend.calls) >= 12)
    assert harness.count("c", "dead") == 0
    assert harness.value("cache_up", cache="c") == 0
    assert harness.value("dead_letters_total", cache="c") == 0
    # Only the failure that found the cache up counted; the probes that followed did not.
    attempts = [harness.item("c", b.out)[1] for b in built[:3]]
    assert sorted(attempts) == [0, 0, 1]
    # One probe push at a time, each with one path.
    assert backend.max_active == 1
    assert all(len(call) == 1 for call in backend.calls)
    [status] = harness.queue.cache_statuses(["c"])
    assert status.health is not None and not status.health.up
    assert status.health.last_error == "connection refused"
    assert status.health.next_try_at is not None and status.health.down_since is not None
    # The probes rotate through the waiting paths.
    assert {call[0] for call in backend.calls} == {b.out for b in built[:3]}
    # It comes back: the first push that succeeds brings it up and everything flows.
    backend.handler = ok
    wait_until(lambda: harness.count("c", "pushed") == 3)
    assert harness.value("cache_up", cache="c") == 1
    [status] = harness.queue.cache_statuses(["c"])
    assert status.health is not None and status.health.up


def test_a_down_cache_stays_down_across_a_restart(harness: Harness, built: list[Built]) -> None:
    harness.enqueue("c", [built[0].out, built[1].out])
    backend = ScriptedBackend("c", failing("exit_status", "503"))
    settings = {"max_attempts": 1, "backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.1}
    first = harness.start({"c": cache("c")}, {"c": backend}, batch_size=1, **settings)
    wait_until(lambda: len(backend.calls) >= 3)
    first.stop(2.0)
    # With max_attempts = 1 the first failure could have dead-lettered a path alone in its
    # batch: that is the one failure that found the cache up.
    dead_before = harness.count("c", "dead")
    assert dead_before <= 1
    calls_before = len(backend.calls)
    harness.registry = CollectorRegistry()  # a new process
    second = harness.start({"c": cache("c")}, {"c": backend}, batch_size=1, **settings)
    assert not second.health.get("c").up
    wait_until(lambda: len(backend.calls) >= calls_before + 5)
    assert harness.count("c", "dead") == dead_before  # no attempt burnt after the restart
    backend.handler = ok
    wait_until(lambda: harness.settled("c"))
    assert harness.count("c", "pushed") == 2 - dead_before


def test_failure_schedules_retry_with_jittered_backoff(
    harness: Harness, built: list[Built]
) -> None:
    harness.enqueue("c", [built[0].out])
    backend = ScriptedBackend("c", failing())
    harness.start(
        {"c": cache("c")},
        {"c": backend},
        rng=random.Random(7),
        max_attempts=5,
        backoff_initial_seconds=100.0,
        backoff_max_seconds=1000.0,
    )
    wait_until(lambda: harness.item("c", built[0].out)[1] == 1)
    state, attempts, next_at, updated_at, reason = harness.item("c", built[0].out)
    assert (state, attempts, reason) == ("pending", 1, "exit_status")
    expected = 100.0 * (0.5 + 0.5 * random.Random(7).random())
    assert next_at - updated_at == pytest.approx(expected)
    assert 50.0 <= next_at - updated_at <= 100.0
    time.sleep(0.2)
    assert len(backend.calls) == 1  # not retried before it is due


def test_backoff_policy_is_exponential_capped_and_jittered() -> None:
    policy = BackoffPolicy(initial=2.0, maximum=30.0, rng=random.Random(1234))
    for attempts in range(1, 12):
        base = min(30.0, 2.0 * 2 ** (attempts - 1))
        delays = [policy.delay(attempts) for _ in range(200)]
        assert all(0.5 * base <= d <= base for d in delays), attempts
        assert len(set(delays)) > 100  # jittered, not a constant
        assert min(delays) < 0.6 * base and max(delays) > 0.9 * base
    assert 1.0 <= policy.delay(0) <= 2.0  # before the first failure: like the first
    same_a = BackoffPolicy(2.0, 30.0, random.Random(99))
    same_b = BackoffPolicy(2.0, 30.0, random.Random(99))
    assert [same_a.delay(n) for n in range(1, 8)] == [same_b.delay(n) for n in range(1, 8)]
    assert BackoffPolicy(0.0, 0.0, random.Random(1)).delay(5) == 0.0


def test_unexpected_backend_exception_is_a_failed_push_with_backoff(
    harness: Harness, built: list[Built]
) -> None:
    """A backend that raises (a bug, a NUL byte in an argument) must neither lose the items
    nor be retried in a tight loop: it counts as a failed push, with its backoff."""
    calls = {"n": 0}

    def handler(paths: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("backend bug")
        return PushOutcome(True, 0.01)

    harness.enqueue("c", [built[0].out, built[1].out])
    harness.start({"c": cache("c")}, {"c": ScriptedBackend("c", handler)})
    wait_until(lambda: harness.count("c", "pushed") == 2)
    assert harness.item("c", built[0].out)[1] == 1  # the failed attempt counts
    assert (
        harness.value("pushes_failed_total", cache="c", backend="nix-copy", reason="spawn_error")
        == 1
    )
    assert calls["n"] == 3  # one failure, then the two halves of the split batch


# -- garbage-collected paths -------------------------------------------------------------


def like_a_real_cache(paths: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
    """Fails the whole push when a path is missing from the store, as cachix and nix copy do."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        return PushOutcome(False, 0.01, "exit_status", f"path {missing[0]} is not valid")
    return PushOutcome(True, 0.01)


def test_garbage_collected_path_is_skipped_never_pushed(
    harness: Harness, built: list[Built]
) -> None:
    harness.enqueue("c", [built[0].out, GONE, built[1].out])
    harness.enqueue("d", [GONE])
    c = ScriptedBackend("c", like_a_real_cache)
    d = ScriptedBackend("d", like_a_real_cache)
    harness.start({"c": cache("c"), "d": cache("d")}, {"c": c, "d": d}, max_attempts=5)
    harness.settle("c", "d")
    assert harness.count("c", "pushed") == 2
    assert harness.count("c", "skipped") == 1
    assert harness.count("d", "skipped") == 1
    for name in ("c", "d"):
        state, _attempts, _next, _updated, reason = harness.item(name, GONE)
        assert (state, reason) == ("skipped", "invalid_path")
    # The gone path was never part of a push that succeeded, and never retried forever.
    succeeded = [call for call in c.calls if GONE not in call]
    assert sorted(p for call in succeeded for p in call) == sorted([built[0].out, built[1].out])
    assert sum(GONE in call for call in c.calls + d.calls) <= 2
    # Its batch-mates were not charged for it.
    assert harness.item("c", built[0].out)[1] == 0
    assert harness.item("c", built[1].out)[1] == 0
    assert harness.value("paths_skipped_total", cache="c", reason="invalid_path") == 1
    assert harness.value("paths_skipped_total", cache="d", reason="invalid_path") == 1
    assert harness.value("paths_pushed_total", cache="c") == 2
    assert harness.value("paths_pushed_total", cache="d") == 0
    assert harness.value("dead_letters_total", cache="c") == 0


def like_cachix(paths: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
    """Upstream cachix: a path that is not valid is skipped with a warning, exit 0."""
    return PushOutcome(True, 0.01)


def test_path_skipped_by_a_successful_push_is_skipped_not_pushed(
    harness: Harness, built: list[Built]
) -> None:
    harness.enqueue("c", [built[0].out, GONE, built[1].out])
    harness.enqueue("d", [GONE])
    c = ScriptedBackend("c", like_cachix)
    d = ScriptedBackend("d", like_cachix)
    harness.start({"c": cache("c", "cachix"), "d": cache("d", "cachix")}, {"c": c, "d": d})
    harness.settle("c", "d")
    # One push each, never retried: exit 0 is success, but the gone path was not uploaded.
    assert len(c.calls) == 1 and len(d.calls) == 1
    for name in ("c", "d"):
        state, attempts, _next, _updated, reason = harness.item(name, GONE)
        assert (state, attempts, reason) == ("skipped", 0, "invalid_path")
    assert harness.count("c", "pushed") == 2
    assert harness.value("paths_pushed_total", cache="c") == 2
    assert harness.value("paths_pushed_total", cache="d") == 0
    assert harness.value("paths_skipped_total", cache="c", reason="invalid_path") == 1
    assert harness.value("paths_skipped_total", cache="d", reason="invalid_path") == 1
    assert harness.value("pushes_succeeded_total", cache="d", backend="cachix") == 1
    # last_success is about uploads: d uploaded nothing.
    assert harness.value("last_success_timestamp_seconds", cache="c") > 0
    no_upload = harness.registry.get_sample_value(
        P + "last_success_timestamp_seconds", {"cache": "d"}
    )
    assert no_upload in (None, 0.0)
    statuses = {s.cache: s for s in harness.queue.cache_statuses(["c", "d"])}
    assert statuses["c"].last_success_at is not None
    assert statuses["d"].last_success_at is None


def test_a_path_cachix_reports_skipping_is_skipped_even_if_it_is_on_disk(
    harness: Harness, built: list[Built]
) -> None:
    # A path can be on disk and still not valid (a build or GC in progress): cachix's own
    # warning decides then.
    def reports(paths: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        return PushOutcome(True, 0.01, skipped=frozenset({built[5].out}))

    harness.enqueue("c", [built[5].out, built[6].out])
    harness.start({"c": cache("c", "cachix")}, {"c": ScriptedBackend("c", reports)})
    harness.settle("c")
    assert harness.item("c", built[5].out)[0] == "skipped"
    assert harness.item("c", built[6].out)[0] == "pushed"
    assert harness.value("paths_pushed_total", cache="c") == 1


def test_real_cachix_skips_a_garbage_collected_path_and_the_bridge_says_so(
    harness: Harness,
    built: list[Built],
    fake_cachix: Path,
    token_file: Path,
) -> None:
    config = CacheConfig(name="cx", backend="cachix", auth_token_file=token_file)
    harness.enqueue("cx", [built[4].out, GONE])
    harness.start({"cx": config}, {"cx": CachixBackend(config)})
    harness.settle("cx", timeout=30)
    assert narinfo(fake_cachix / "cx", built[4]).exists()
    assert harness.item("cx", GONE)[0] == "skipped"
    assert harness.item("cx", built[4].out)[0] == "pushed"
    assert harness.value("paths_pushed_total", cache="cx") == 1
    assert harness.value("pushes_succeeded_total", cache="cx", backend="cachix") == 1


# -- fairness between caches -------------------------------------------------------------


def test_parallel_limits_leave_room_for_other_caches() -> None:
    caches = {n: cache(n) for n in ("a", "b", "c")}
    assert parallel_limits(caches, 4) == {"a": 2, "b": 2, "c": 2}
    assert parallel_limits(caches, 1) == {"a": 1, "b": 1, "c": 1}
    assert parallel_limits({"a": cache("a")}, 4) == {"a": 4}
    caches["b"] = cache("b", max_parallel=3)
    assert parallel_limits(caches, 8) == {"a": 6, "b": 3, "c": 6}


def test_a_slow_cache_never_takes_every_worker(harness: Harness, built: list[Built]) -> None:
    gate = threading.Event()

    def blocked(paths: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        gate.wait(10)
        return PushOutcome(True, 0.01)

    harness.enqueue("slow", [b.out for b in built[:4]])
    harness.enqueue("fast", [b.out for b in built[4:6]])
    slow, fast = ScriptedBackend("slow", blocked), ScriptedBackend("fast")
    harness.start(
        {"slow": cache("slow"), "fast": cache("fast")},
        {"slow": slow, "fast": fast},
        workers=2,
        batch_size=1,
    )
    try:
        wait_until(lambda: harness.count("fast", "pushed") == 2, timeout=5)
        assert slow.active == 1
        assert harness.count("slow", "inflight") == 1
        assert harness.count("slow", "pushed") == 0
    finally:
        gate.set()
    wait_until(lambda: harness.count("slow", "pushed") == 4)
    assert slow.max_active == 1


def test_a_cache_that_is_down_does_not_stop_another(harness: Harness, built: list[Built]) -> None:
    harness.enqueue("down", [b.out for b in built[:3]])
    harness.enqueue("up", [b.out for b in built[3:9]])
    down = ScriptedBackend("down", failing("exit_status", "connection refused"))
    up = ScriptedBackend("up")
    harness.start(
        {"down": cache("down", backend="cachix"), "up": cache("up")},
        {"down": down, "up": up},
        workers=2,
        batch_size=2,
        max_attempts=1000,
        backoff_initial_seconds=0.05,
        backoff_max_seconds=0.1,
    )
    wait_until(lambda: harness.count("up", "pushed") == 6, timeout=10)
    labels = {"cache": "down", "backend": "cachix", "reason": "exit_status"}
    wait_until(lambda: harness.value("pushes_failed_total", **labels) >= 3)
    assert len(down.calls) >= 3
    counts = harness.queue.counts()
    assert counts.get(("down", "pushed"), 0) == 0
    assert counts.get(("down", "dead"), 0) == 0
    assert harness.value("last_failure_timestamp_seconds", cache="down") > 0
    (status,) = [s for s in harness.queue.cache_statuses([]) if s.cache == "down"]
    assert status.last_error == "connection refused"
    assert status.last_success_at is None


# -- shutdown ----------------------------------------------------------------------------


def test_stop_lets_a_running_push_finish(harness: Harness, built: list[Built]) -> None:
    started = threading.Event()

    def slow(paths: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        started.set()
        time.sleep(0.5)
        return PushOutcome(not cancel.is_set(), 0.5, None if not cancel.is_set() else "timeout")

    harness.enqueue("c", [built[0].out, built[1].out])
    workers = harness.start({"c": cache("c")}, {"c": ScriptedBackend("c", slow)}, batch_size=2)
    assert started.wait(5)
    assert workers.stop(5.0) is True
    assert not workers.cancel.is_set()
    assert harness.count("c", "pushed") == 2


def test_stop_cancels_a_hanging_push_and_leaves_items_pending(
    harness: Harness, built: list[Built]
) -> None:
    started = threading.Event()

    def hang(paths: list[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        started.set()
        if cancel.wait(30):
            return PushOutcome(False, 0.3, "timeout", "cancelled at shutdown", cancelled=True)
        return PushOutcome(True, 30)

    paths = [built[0].out, built[1].out]
    harness.enqueue("c", paths)
    backend = ScriptedBackend("c", hang)
    workers = harness.start({"c": cache("c")}, {"c": backend}, batch_size=2, max_attempts=1)
    assert started.wait(5)
    began = time.monotonic()
    assert workers.stop(0.3) is False
    assert time.monotonic() - began < 5
    assert workers.cancel.is_set()
    assert harness.count("c", "pending") == 2
    for path in paths:
        state, attempts, *_ = harness.item("c", path)
        assert (state, attempts) == ("pending", 0)
    assert (
        harness.value("pushes_failed_total", cache="c", backend="nix-copy", reason="timeout") == 0
    )
    assert harness.value("dead_letters_total", cache="c") == 0
    assert len(backend.calls) == 1


# -- with the real cachix backend (stand-in on PATH) -------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("worker-test-token")
    return path


def test_real_cachix_backend_pushes_and_isolates_a_poison_path(
    harness: Harness,
    built: list[Built],
    fake_cachix: Path,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good, poison = built[:3], built[3]
    monkeypatch.setenv("FAKE_CACHIX_FAIL_PATHS", poison.name)
    config = CacheConfig(name="cx", backend="cachix", auth_token_file=token_file)
    harness.enqueue("cx", [b.out for b in [*good, poison]])
    harness.start({"cx": config}, {"cx": CachixBackend(config)}, batch_size=4, max_attempts=2)
    harness.settle("cx", timeout=30)
    assert [d.path for d in harness.queue.dead_letters()] == [poison.out]
    assert harness.count("cx", "pushed") == 3
    for b in good:
        assert narinfo(fake_cachix / "cx", b).exists()
    assert not narinfo(fake_cachix / "cx", poison).exists()
    assert harness.value("pushes_succeeded_total", cache="cx", backend="cachix") >= 2
    assert harness.value("dead_letters_total", cache="cx") == 1


def test_real_cachix_hang_is_killed_at_stop_and_items_stay_pending(
    harness: Harness,
    built: list[Built],
    fake_cachix: Path,
    token_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_CACHIX_HANG", "1")
    config = CacheConfig(name="cx", backend="cachix", auth_token_file=token_file)
    harness.enqueue("cx", [built[0].out])
    workers = harness.start({"cx": config}, {"cx": CachixBackend(config)}, max_attempts=1)
    wait_until(lambda: harness.count("cx", "inflight") == 1)
    time.sleep(0.3)  # let the stand-in start and hang
    assert workers.stop(0.2) is False
    state, attempts, *_ = harness.item("cx", built[0].out)
    assert (state, attempts) == ("pending", 0)
    assert harness.value("pushes_started_total", cache="cx", backend="cachix") == 1
    assert harness.value("pushes_failed_total", cache="cx", backend="cachix", reason="timeout") == 0


def test_out_of_descriptors_starting_the_backend_burns_no_attempt(
    harness: Harness, built: list[Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 6: EMFILE/EAGAIN when spawning `nix copy` waits and retries, uncharged."""
    import errno
    import subprocess

    import bridge.process
    import bridge.worker

    monkeypatch.setattr(bridge.worker, "EXHAUSTED_RETRY_SECONDS", 0.2)
    failures = iter([errno.EMFILE, errno.EAGAIN, errno.ENFILE])
    real_popen = subprocess.Popen

    def exhausted_popen(*args: Any, **kwargs: Any) -> Any:
        code = next(failures, None)
        if code is not None:
            raise OSError(code, os.strerror(code))
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(bridge.process.subprocess, "Popen", exhausted_popen)
    binary_cache = tmp_path / "binary-cache"
    config = CacheConfig(name="c", backend="nix-copy", uri=f"file://{binary_cache}")
    harness.enqueue("c", [built[0].out])
    harness.start({"c": config}, {"c": NixCopyBackend(config)}, max_attempts=1)
    wait_until(lambda: harness.count("c", "pushed") == 1, timeout=60)
    assert narinfo(binary_cache, built[0]).exists()
    state, attempts, *_rest = harness.item("c", built[0].out)
    assert (state, attempts) == ("pushed", 0)
    assert harness.count("c", "dead") == 0
    labels = {"cache": "c", "backend": "nix-copy", "reason": "spawn_error"}
    assert harness.value("pushes_failed_total", **labels) == 3
    assert harness.value("dead_letters_total", cache="c") == 0
