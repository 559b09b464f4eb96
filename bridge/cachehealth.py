"""Whether each cache takes pushes: down while every push fails, up at the first success."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from bridge.clock import Clock
from bridge.statedb import CacheHealth, StateDb
from exporter.metrics import BridgeMetrics

log = logging.getLogger(__name__)


def format_time(timestamp: float) -> str:
    """A timestamp as people read it in logs and status (UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


class CacheHealthBook:
    """The up/down state of every cache, shared by the push workers, kept in the database.

    A failed push while the cache is up and nothing was pushed to it meanwhile turns it
    down: its items wait with it and one probe push at a time, backing off up to the cap,
    tells when it is back. A failure while down counts no attempt against any path.
    """

    def __init__(
        self,
        caches: Iterable[str],
        metrics: BridgeMetrics,
        clock: Clock,
        delay: Callable[[int], float],
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.delay = delay
        self._lock = threading.Lock()
        self._health = {name: CacheHealth(name) for name in caches}
        self._last_success: dict[str, float] = {}

    def load(self, db: StateDb) -> None:
        """Take the state recorded before a restart (a cache down stays down)."""
        recorded = db.cache_health()
        with self._lock:
            for name in self._health:
                if name in recorded:
                    self._health[name] = recorded[name]
                health = self._health[name]
                self.metrics.cache_up.labels(name).set(1 if health.up else 0)
                if not health.up and health.down_since is not None:
                    log.warning(
                        "cache %s is down since %s (recorded before this start); next try at "
                        "%s; last error: %s",
                        name,
                        format_time(health.down_since),
                        format_time(health.next_try_at or self.clock.time()),
                        health.last_error,
                    )

    def get(self, cache: str) -> CacheHealth:
        """The current state of a cache."""
        with self._lock:
            return self._health[cache]

    def succeeded_since(self, cache: str, started: float) -> bool:
        """True if a push to the cache succeeded after monotonic time started."""
        with self._lock:
            return self._last_success.get(cache, float("-inf")) >= started

    def succeeded(
        self, db: StateDb, cache: str, persist: Callable[[Callable[[], None]], None]
    ) -> None:
        """A push to cache succeeded: it is up, and everything waiting is due."""
        now = self.clock.time()
        with self._lock:
            self._last_success[cache] = self.clock.monotonic()
            before = self._health[cache]
            if before.up:
                return
            self._health[cache] = CacheHealth(cache)
        persist(lambda: db.save_cache_health(CacheHealth(cache), now))
        self.metrics.cache_up.labels(cache).set(1)
        log.warning(
            "cache %s is up again after %.0fs down (%d failed push(es)); queued paths flow again",
            cache,
            now - (before.down_since or now),
            before.failures,
        )

    def failed(
        self,
        db: StateDb,
        cache: str,
        error: str,
        push_started: float,
        persist: Callable[[Callable[[], None]], None],
    ) -> tuple[bool, float]:
        """A push failed. Returns (the cache was up, when to try it next).

        Up, and nothing else pushed to it since this push started: it goes down. Up with a
        success meanwhile: it stays up (the failure is the paths' fault). A failure while
        up counts as an attempt of its paths; one while down does not.
        """
        now = self.clock.time()
        with self._lock:
            before = self._health[cache]
            if before.up and self._last_success.get(cache, float("-inf")) >= push_started:
                return True, now
            failures = before.failures + 1
            after = CacheHealth(
                cache,
                down_since=before.down_since if not before.up else now,
                next_try_at=now + self.delay(failures),
                failures=failures,
                last_error=error,
            )
            self._health[cache] = after
        persist(lambda: db.save_cache_health(after, now, failed=True))
        if before.up:
            self.metrics.cache_up.labels(cache).set(0)
            log.error(
                "cache %s is down: a push failed and none succeeded meanwhile (%s); its paths "
                "wait with it, spending no attempts, one probe push at a time; next try at %s",
                cache,
                error,
                format_time(after.next_try_at or now),
            )
        else:
            log.info(
                "cache %s still down (probe %d failed: %s); next try at %s",
                cache,
                failures,
                error,
                format_time(after.next_try_at or now),
            )
        return before.up, after.next_try_at or now

    def probe_due(self, cache: str, now: float) -> bool:
        """True when a down cache may be probed now."""
        with self._lock:
            health = self._health[cache]
        return not health.up and (health.next_try_at or 0.0) <= now

    def wake_at(self, cache: str) -> float | None:
        """When a down cache should be probed next (None when up)."""
        with self._lock:
            health = self._health[cache]
        return None if health.up else (health.next_try_at or 0.0)

    def postpone(self, cache: str, until: float) -> None:
        """In memory only: no probe before until (nothing to probe with yet)."""
        with self._lock:
            health = self._health[cache]
            if not health.up:
                self._health[cache] = replace(health, next_try_at=until)
