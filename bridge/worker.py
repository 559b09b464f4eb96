"""Push workers: claim batches per cache, run the backend, record the outcome, retry or split."""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import TypeVar

from bridge.backends import BACKEND_KINDS, Backend, PushOutcome
from bridge.cachehealth import CacheHealthBook, format_time
from bridge.clock import Clock
from bridge.config import CacheConfig, PushSettings
from bridge.describe import first_paths, next_try
from bridge.retrying import FailureBackoff
from bridge.safeopen import is_transient
from bridge.statedb import Item, StateDb
from bridge.store import NixStore, StoreQueryError
from exporter.metrics import BridgeMetrics
from exporter.vocabulary import FailureReason, SkipReason

log = logging.getLogger(__name__)
T = TypeVar("T")

IDLE_POLL_SECONDS = 5.0
# After the backend could not start for want of descriptors, processes or memory.
EXHAUSTED_RETRY_SECONDS = 5.0
# In flight longer than this and held by no worker: the worker's write failed.
ORPHAN_AGE_SECONDS = 60.0


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff with jitter: initial·2^(n-1), capped, scaled by 0.5 to 1.0."""

    initial: float
    maximum: float
    rng: random.Random

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the attempts-th failure."""
        base = min(self.maximum, self.initial * 2.0 ** max(0, attempts - 1))
        return base * (0.5 + 0.5 * self.rng.random())


class PushedBytes:
    """Counts NAR bytes of pushed paths from a background thread, off the push path.

    One `nix-store --query --size` per second for everything pushed meanwhile, instead of
    one per push: with fast caches the query would cost more than the push.
    """

    MAX_PATHS_PER_QUERY = 1000

    def __init__(self, store: NixStore, metrics: BridgeMetrics, interval: float = 1.0) -> None:
        self.store = store
        self.metrics = metrics
        self.interval = interval
        self._pending: SimpleQueue[tuple[str, list[str]]] = SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pushed-bytes", daemon=True)

    def start(self) -> None:
        """Start the background thread."""
        self._thread.start()

    def add(self, cache: str, paths: list[str]) -> None:
        """Paths just pushed to cache."""
        self._pending.put((cache, paths))

    def stop(self) -> None:
        """Count what is left and stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        self.flush()

    def flush(self) -> None:
        """Query sizes for everything added so far and count them."""
        by_cache: dict[str, list[str]] = {}
        while True:
            try:
                cache, paths = self._pending.get_nowait()
            except Empty:
                break
            by_cache.setdefault(cache, []).extend(paths)
        for cache, paths in by_cache.items():
            for start in range(0, len(paths), self.MAX_PATHS_PER_QUERY):
                chunk = paths[start : start + self.MAX_PATHS_PER_QUERY]
                try:
                    sizes = self.store.nar_sizes(chunk)
                except StoreQueryError as exc:
                    log.debug("cannot read NAR sizes: %s", exc)
                    continue
                self.metrics.bytes_pushed.labels(cache).inc(sum(sizes.values()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:
                log.exception("counting pushed bytes failed")


def parallel_limits(caches: Mapping[str, CacheConfig], workers: int) -> dict[str, int]:
    """Pushes allowed at once per cache; by default one cache can never take every worker."""
    default = max(1, workers - (len(caches) - 1))
    return {name: cache.max_parallel or default for name, cache in caches.items()}


class PushWorkers:
    """A pool of threads that drain the queue, fairly across caches."""

    def __init__(
        self,
        *,
        settings: PushSettings,
        caches: Mapping[str, CacheConfig],
        backends: Mapping[str, Backend],
        db_factory: Callable[[], StateDb],
        store: NixStore,
        metrics: BridgeMetrics,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.caches = dict(caches)
        self.backends = dict(backends)
        self.db_factory = db_factory
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.backoff = BackoffPolicy(
            settings.backoff_initial_seconds, settings.backoff_max_seconds, rng or random.Random()
        )
        self.limits = parallel_limits(caches, settings.workers)
        self.stopping = threading.Event()
        self.cancel = threading.Event()
        self._wakeup = threading.Condition()
        self._woken = False
        self._lock = threading.Lock()
        self._running: dict[str, int] = dict.fromkeys(caches, 0)
        self._next_cache = 0
        self._threads: list[threading.Thread] = []
        self._held: set[int] = set()
        self.pushed_bytes = PushedBytes(store, metrics)
        # Its own jitter source: probing a down cache must not shift the items' backoff.
        probe_backoff = BackoffPolicy(
            settings.backoff_initial_seconds, settings.backoff_max_seconds, random.Random()
        )
        self.health = CacheHealthBook(caches, metrics, clock, probe_backoff.delay)
        self._health_loaded = False

    def load_health(self) -> None:
        """Take the caches' up/down state recorded before this start (once)."""
        if self._health_loaded:
            return
        db = self.db_factory()
        try:
            self.health.load(db)
        finally:
            db.close()
        self._health_loaded = True

    def start(self) -> None:
        """Load the caches' up/down state if not done yet and start the worker threads."""
        self.load_health()
        self.pushed_bytes.start()
        for index in range(self.settings.workers):
            thread = threading.Thread(target=self._run, name=f"push-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """New work may be due: wake idle workers."""
        with self._wakeup:
            self._woken = True
            self._wakeup.notify_all()

    def stop_claiming(self) -> None:
        """Start no new push from now on (running ones go on)."""
        self.stopping.set()
        self.wake()

    def stop(self, grace: float) -> bool:
        """Stop claiming; let running pushes finish within grace, then kill them.

        Returns True when every push finished within the grace period.
        """
        self.stop_claiming()
        deadline = self.clock.monotonic() + grace
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - self.clock.monotonic()))
        clean = not any(thread.is_alive() for thread in self._threads)
        if not clean:
            log.warning("shutdown grace of %.0fs over: killing running pushes", grace)
            self.cancel.set()
            for thread in self._threads:
                thread.join(timeout=30)
        self.pushed_bytes.stop()
        return clean

    # -- worker loop ----------------------------------------------------------------------

    def _run(self) -> None:
        db = self.db_factory()
        backoff = FailureBackoff(f"push worker {threading.current_thread().name}", log)
        try:
            while not self.stopping.is_set():
                try:
                    self._step(db)
                except Exception as exc:
                    # The database is locked for too long, full, or read-only: keep the
                    # thread, pause, try again. Claimed items come back via release_orphans.
                    self.stopping.wait(backoff.failed(exc))
                else:
                    backoff.succeeded()
        finally:
            db.close()

    def _step(self, db: StateDb) -> None:
        claimed = self._claim(db)
        if claimed is None:
            self._idle(db)
            return
        cache, items, control = claimed
        try:
            try:
                if control is not None:
                    self._probe(db, cache, control)
                else:
                    self._push(db, cache, items)
            except sqlite3.Error:
                raise
            except Exception as exc:
                if is_transient(exc) and items:
                    # Out of descriptors or memory around the push: not the paths' fault.
                    error = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
                    outcome = PushOutcome(
                        False, 0.0, FailureReason.SPAWN_ERROR, error, exhausted=True
                    )
                    self._exhausted(
                        db, cache, self.caches[cache], items, outcome, self.clock.time()
                    )
                    return
                # Count it as a failed push (with backoff), never a free immediate retry.
                log.exception("unexpected error pushing to %s", cache)
                outcome = PushOutcome(
                    False,
                    0.0,
                    FailureReason.SPAWN_ERROR,
                    f"internal error: {type(exc).__name__} (see the log)",
                )
                if items:
                    self._failed(db, cache, self.caches[cache], items, outcome, self.clock.time())
        finally:
            with self._lock:
                self._running[cache] -= 1
                self._held.difference_update(item.id for item in items)

    def _claim(self, db: StateDb) -> tuple[str, list[Item], str | None] | None:
        """A batch to push, or for a down cache one probe: (cache, items, control path)."""
        names = list(self.caches)
        now = self.clock.time()
        for offset in range(len(names)):
            cache = names[(self._next_cache + offset) % len(names)]
            down = not self.health.get(cache).up
            with self._lock:
                # A down cache gets one probe push at a time, when its backoff is over.
                busy = self._running[cache] > 0 if down else False
                if busy or self._running[cache] >= self.limits[cache]:
                    continue
                if down and not self.health.probe_due(cache, now):
                    continue
                self._running[cache] += 1
            try:
                if down:
                    control = self._control_path(db, cache)
                    items = [] if control is not None else db.claim_probe(cache, now)
                else:
                    control = None
                    items = db.claim(cache, self.settings.batch_size, now)
            except BaseException:
                with self._lock:
                    self._running[cache] -= 1
                raise
            if items or control is not None:
                with self._lock:
                    self._next_cache = (self._next_cache + offset + 1) % len(names)
                    self._held.update(item.id for item in items)
                return cache, items, control
            with self._lock:
                self._running[cache] -= 1
            if down:
                # Nothing to probe with yet: look again after the backoff.
                self.health.postpone(cache, now + self.backoff.delay(1))
        return None

    def _control_path(self, db: StateDb, cache: str) -> str | None:
        """A path this cache already has and the store still holds: pushing it again can
        only fail because of the cache, so it probes a down cache without risking a path."""
        recent = db.recently_pushed(cache)
        if not recent:
            return None
        try:
            invalid = self.store.invalid_paths(recent)
        except StoreQueryError:
            return None
        return next((path for path in recent if path not in invalid), None)

    def release_orphans(self, db: StateDb) -> int:
        """Items left in flight by a worker whose database write failed go back to pending."""
        with self._lock:
            held = set(self._held)
        now = self.clock.time()
        return db.release_orphans(held, older_than=now - ORPHAN_AGE_SECONDS, now=now)

    def _idle(self, db: StateDb) -> None:
        now = self.clock.time()
        due = []
        for cache in self.caches:
            probe_at = self.health.wake_at(cache)
            due.append(db.next_due_at(cache) if probe_at is None else probe_at)
        timeout = IDLE_POLL_SECONDS
        known = [d for d in due if d is not None]
        if known:
            timeout = min(timeout, max(0.01, min(known) - now))
        with self._wakeup:
            if not self._woken and not self.stopping.is_set():
                self._wakeup.wait(timeout)
            self._woken = False

    def _probe(self, db: StateDb, cache: str, path: str) -> None:
        """Push a path the down cache already has: success means it is back."""
        config = self.caches[cache]
        m = self.metrics
        m.pushes_started.labels(cache, config.backend).inc()
        started = self.clock.monotonic()
        log.info("probing down cache %s (%s) with %s", cache, config.backend, path)
        outcome = self.backends[cache].push([path], self.settings.timeout_seconds, self.cancel)
        m.push_duration.labels(cache).observe(outcome.duration)
        if outcome.ok:
            m.pushes_succeeded.labels(cache, config.backend).inc()
            self.health.succeeded(db, cache, self._persist)
        elif not outcome.cancelled:
            reason = outcome.reason or FailureReason.EXIT_STATUS
            m.pushes_failed.labels(cache, config.backend, reason).inc()
            m.last_failure.labels(cache).set(self.clock.time())
            self.health.failed(db, cache, outcome.error or reason, started, self._persist)

    def _push(self, db: StateDb, cache: str, items: list[Item]) -> None:
        backend = self.backends[cache]
        config = self.caches[cache]
        m = self.metrics
        paths = [item.path for item in items]
        # No store query before the push: it would delay every push for the rare
        # garbage-collected path. cachix skips a path that is not valid and still exits 0,
        # so after its success the batch's validity is checked once (below).
        m.pushes_started.labels(cache, config.backend).inc()
        log.info("pushing %d path(s) to %s (%s)", len(paths), cache, config.backend)
        started = self.clock.monotonic()
        outcome = backend.push(paths, self.settings.timeout_seconds, self.cancel)
        now = self.clock.time()
        m.push_duration.labels(cache).observe(outcome.duration)
        if outcome.ok:
            m.pushes_succeeded.labels(cache, config.backend).inc()
            # `nix copy` fails on a path that is not valid (handled below); cachix skips it
            # and exits 0, so only its successes need the check: the paths it said it
            # skipped, and any no longer on disk (a store query per batch would cost more
            # than the push of an instant cache).
            uploaded = (
                self._skip_uploaded_invalid(db, cache, items, outcome.skipped)
                if BACKEND_KINDS[config.backend].skips_invalid
                else items
            )
            self._persist(lambda: db.mark_pushed(uploaded, now))
            self.health.succeeded(db, cache, self._persist)
            if uploaded:
                m.count_paths(cache, ((item.project, item.jobset) for item in uploaded))
                m.last_success.labels(cache).set(now)
                for item in uploaded:
                    m.end_to_end.labels(cache).observe(max(0.0, now - item.origin_at))
                self.pushed_bytes.add(cache, [item.path for item in uploaded])
            log.info("pushed %d path(s) to %s in %.2fs", len(uploaded), cache, outcome.duration)
        elif outcome.exhausted:
            self._exhausted(db, cache, config, items, outcome, now)
        elif outcome.cancelled:
            self._persist(lambda: db.release(items, now))
            log.warning(
                "push of %d path(s) to %s cancelled at shutdown; left pending", len(items), cache
            )
        else:
            valid = self._skip_invalid(db, cache, items)
            if len(valid) < len(items):
                # The failure is explained by paths that are gone: retry the rest at once,
                # without counting an attempt against them.
                m.pushes_failed.labels(cache, config.backend, FailureReason.INVALID_PATH).inc()
                self._persist(lambda: db.release(valid, now))
            else:
                error = outcome.error or outcome.reason or FailureReason.EXIT_STATUS
                was_up, next_try = self.health.failed(db, cache, error, started, self._persist)
                if was_up:
                    self._failed(db, cache, config, items, outcome, now)
                else:
                    self._deferred(db, cache, config, items, outcome, next_try, now)

    def _exhausted(
        self,
        db: StateDb,
        cache: str,
        config: CacheConfig,
        items: Sequence[Item],
        outcome: PushOutcome,
        now: float,
    ) -> None:
        """The backend could not start (EMFILE, EAGAIN, ENOMEM): wait briefly, uncharged."""
        until = now + EXHAUSTED_RETRY_SECONDS
        error = outcome.error or "cannot start the backend"
        self._persist(
            lambda: db.defer(items, until, reason=FailureReason.SPAWN_ERROR, error=error, now=now)
        )
        self.metrics.pushes_failed.labels(cache, config.backend, FailureReason.SPAWN_ERROR).inc()
        log.warning(
            "cannot start the push of %d path(s) to %s for now (%s); no attempt counted, "
            "trying again in %.0fs",
            len(items),
            cache,
            error,
            EXHAUSTED_RETRY_SECONDS,
        )

    def _deferred(
        self,
        db: StateDb,
        cache: str,
        config: CacheConfig,
        items: Sequence[Item],
        outcome: PushOutcome,
        until: float,
        now: float,
    ) -> None:
        """A push failed while its cache is down: the items wait with it, uncharged."""
        reason = outcome.reason or FailureReason.EXIT_STATUS
        error = outcome.error or reason
        self._persist(lambda: db.defer(items, until, reason=reason, error=error, now=now))
        m = self.metrics
        m.pushes_failed.labels(cache, config.backend, reason).inc()
        m.count_paths(cache, ((item.project, item.jobset) for item in items), reason)
        m.last_failure.labels(cache).set(now)
        m.retries.labels(cache).inc(len(items))
        log.warning(
            "push of %d path(s) to %s failed while the cache is down (%s), first %s; "
            "they wait with the cache, next try at %s: %s",
            len(items),
            cache,
            reason,
            items[0].path if items else "-",
            format_time(until),
            error,
        )

    def _persist(self, write: Callable[[], T]) -> T:
        """Record a push's outcome, retrying while the database cannot take it (disk full).

        The push already happened: giving up would push it again later. Only when the
        shutdown grace is over does the error go up (the items are then released at the
        next start).
        """
        backoff = FailureBackoff("recording a push outcome", log, maximum=10.0)
        while True:
            try:
                result = write()
            except sqlite3.Error as exc:
                if self.cancel.wait(backoff.failed(exc)):
                    raise
                continue
            backoff.succeeded()
            return result

    def _skip_uploaded_invalid(
        self, db: StateDb, cache: str, items: list[Item], reported: frozenset[str]
    ) -> list[Item]:
        """After cachix exited 0: skip what it reported skipping or what is gone from disk."""
        invalid = set(reported) | self.store.missing_paths([item.path for item in items])
        return self._mark_invalid(db, cache, items, invalid, after_success=True)

    def _skip_invalid(self, db: StateDb, cache: str, items: list[Item]) -> list[Item]:
        """After a failed push: mark the items whose path is no longer valid skipped (the
        store says which); return the others, all of them if the store cannot be asked."""
        try:
            invalid = self.store.invalid_paths([item.path for item in items])
        except StoreQueryError as exc:
            log.warning("cannot check store validity: %s", exc)
            return items
        return self._mark_invalid(db, cache, items, invalid, after_success=False)

    def _mark_invalid(
        self,
        db: StateDb,
        cache: str,
        items: list[Item],
        invalid: set[str],
        *,
        after_success: bool,
    ) -> list[Item]:
        if not invalid:
            return items
        gone = [item for item in items if item.path in invalid]
        now = self.clock.time()
        message = "not valid in the local store (garbage-collected?)"
        if after_success:
            message += "; the push skipped it"
        self._persist(lambda: db.mark_skipped(gone, SkipReason.INVALID_PATH, message, now))
        self.metrics.paths_skipped.labels(cache, SkipReason.INVALID_PATH).inc(len(gone))
        for item in gone:
            log.warning("skipping %s for %s: no longer valid in the store", item.path, cache)
        return [item for item in items if item.path not in invalid]

    def _failed(
        self,
        db: StateDb,
        cache: str,
        config: CacheConfig,
        items: Sequence[Item],
        outcome: PushOutcome,
        now: float,
    ) -> None:
        reason = outcome.reason or FailureReason.EXIT_STATUS
        error = outcome.error or reason
        attempts = max(item.attempts for item in items) + 1
        halves = (
            [list(items)]
            if len(items) == 1
            else [list(items[: (len(items) + 1) // 2]), list(items[(len(items) + 1) // 2 :])]
        )
        groups = [(half, now + self.backoff.delay(attempts)) for half in halves]
        dead = self._persist(
            lambda: db.mark_failed(
                groups,
                reason=reason,
                error=error,
                max_attempts=self.settings.max_attempts,
                now=now,
            )
        )
        m = self.metrics
        m.pushes_failed.labels(cache, config.backend, reason).inc()
        m.count_paths(cache, ((item.project, item.jobset) for item in items), reason)
        m.last_failure.labels(cache).set(now)
        m.retries.labels(cache).inc(len(items) - len(dead))
        m.dead_letters.labels(cache).inc(len(dead))
        split = f", split into {len(halves)} batches" if len(halves) > 1 else ""
        # Operator visibility (issue 12): name the first paths and when the next try is.
        retrying = len(dead) < len(items)
        log.warning(
            "push of %d path(s) to %s failed (%s, attempt %d%s): %s; paths: %s%s",
            len(items),
            cache,
            reason,
            attempts,
            split,
            error,
            first_paths([item.path for item in items]),
            f"; {next_try(min(at for _, at in groups), now)}" if retrying else "",
        )
        for item in dead:
            log.error(
                "dead-lettered %s for %s after %d attempts: %s",
                item.path,
                cache,
                item.attempts + 1,
                error,
            )
