"""The daemon: wires the sources, the intake, the push workers and metrics, and supervises them."""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
from collections.abc import Callable, Mapping
from queue import SimpleQueue

from prometheus_client import CollectorRegistry

from bridge import __version__
from bridge.backends import Backend, make_backend
from bridge.clock import Clock, SystemClock
from bridge.config import Config
from bridge.heartbeat import Heartbeat
from bridge.ingest import Ingestor
from bridge.intake import Intake
from bridge.landing import LandingSnapshot, render_landing
from bridge.logfollow import LogFollower
from bridge.quarantine import summarize
from bridge.retrying import FailureBackoff
from bridge.sdnotify import sd_notify, watchdog_interval
from bridge.spool import SpoolLayout
from bridge.statedb import StateDb, StateDbUnavailable
from bridge.statelock import StateLock, StateLocked, lock_path
from bridge.store import NixStore
from bridge.watcher import Notification, SpoolWatcher
from bridge.worker import PushWorkers
from exporter.http import MetricsServer
from exporter.metrics import BridgeMetrics, HydraDbMetrics, QueueCollector

log = logging.getLogger(__name__)

PRUNE_INTERVAL_SECONDS = 3600.0
ORPHAN_CHECK_SECONDS = 60.0
TICK_SECONDS = 1.0
# A busy ingest loop that reads no file for this long is stalled: /healthz turns 503 and
# the watchdog is no longer fed. Above the store query timeout, the longest a single
# event may legitimately take (an output lookup by `nix-store`).
INGEST_STALL_SECONDS = 180.0
LANDING_DEAD_LETTERS = 20


class DaemonError(Exception):
    """The daemon cannot start."""


class DaemonStopped(DaemonError):
    """A stop was requested before the daemon finished starting."""


class Daemon:
    """One running bridge; start(), then run_until() a stop event, then it shuts down."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
        backends: Mapping[str, Backend] | None = None,
        store: NixStore | None = None,
        rng: random.Random | None = None,
        serve_metrics: bool | None = None,
        ingest_stall_seconds: float = INGEST_STALL_SECONDS,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock or SystemClock()
        self.store = store or NixStore()
        self.backends = (
            dict(backends)
            if backends is not None
            else {name: make_backend(cache) for name, cache in config.caches.items()}
        )
        self.rng = rng
        self.serve_metrics = config.metrics.enabled if serve_metrics is None else serve_metrics
        self.layout = SpoolLayout.of(config)
        self.metrics = BridgeMetrics(
            self.registry,
            version=__version__,
            caches={name: cache.backend for name, cache in config.caches.items()},
            per_jobset=config.metrics.per_jobset,
            per_jobset_limit=config.metrics.per_jobset_limit,
            log_sources=[str(source.path) for source in config.log_sources],
        )
        self.hydra_db_metrics: HydraDbMetrics | None = None
        if config.hydra_db is not None:
            self.hydra_db_metrics = HydraDbMetrics(self.registry)
        self.stopping = threading.Event()
        self.notifications: SimpleQueue[Notification | None] = SimpleQueue()
        self._lock = StateLock(config.state_dir)
        self._threads: list[threading.Thread] = []
        self._scrape_lock = threading.Lock()
        self._scrape_db: StateDb | None = None
        self._db: StateDb | None = None
        self.watcher: SpoolWatcher | None = None
        self.workers: PushWorkers | None = None
        self.server: MetricsServer | None = None
        self.intake: Intake | None = None
        self.ingestor: Ingestor | None = None
        self.follower: LogFollower | None = None
        self.ready = threading.Event()
        self.ingest_heartbeat = Heartbeat(self.clock.monotonic, ingest_stall_seconds)
        # Set by a signal handler to interrupt a start that is waiting for the database.
        self.abort = threading.Event()

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        """Take the state lock, recover, scan the spool and start every thread."""
        if self.config.hydra_db is not None:
            require_hydra_db_driver()
        self._prepare_directories()
        self._take_lock()
        self._db = self._open_db_patiently()
        self._recover(self._db)
        self._scrape_db = self._open_db_patiently()
        self.registry.register(
            QueueCollector(self._read_queue, self.config.caches, self.clock.time)
        )
        self.workers = self._make_workers()
        self.intake = Intake(self.config.rules, self.metrics, self.clock, self.workers.wake)
        self.ingestor = Ingestor(
            self.config,
            self._open_db_patiently(),
            self.store,
            self.intake,
            self.clock,
            heartbeat=self.ingest_heartbeat,
        )
        self._serve_metrics()
        self._watch_and_scan(self.ingestor)
        self.workers.start()
        self._start_sources(self.ingestor, self.intake)
        self.ready.set()
        sd_notify(f"READY=1\nSTATUS=watching {self.layout.incoming}")
        log.info(
            "hydra-cachix-bridge %s ready: spool %s, %d cache(s), %d worker(s)",
            __version__,
            self.config.spool_dir,
            len(self.config.caches),
            self.config.push.workers,
        )

    def _prepare_directories(self) -> None:
        try:
            self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.layout.ensure(self.config.spool.group_writable)
        except OSError as exc:
            raise DaemonError(
                f"cannot create or set the mode of {exc.filename}: {exc.strerror} (create the "
                "spool with systemd-tmpfiles, see hydra-cachix-bridge.tmpfiles.conf in contrib/)"
            ) from None

    def _take_lock(self) -> None:
        try:
            self._lock.acquire()
        except StateLocked as exc:
            raise DaemonError(str(exc)) from None
        except OSError as exc:
            path = lock_path(self.config.state_dir)
            raise DaemonError(f"cannot open the lock file {path}: {exc.strerror}") from None

    def _open_db_patiently(self) -> StateDb:
        """Open the state database, waiting while it cannot be opened for now (a full disk)."""
        backoff = FailureBackoff("opening the queue database", log, initial=2.0)
        while True:
            try:
                db = StateDb(self.config.database_path, shared=True)
            except StateDbUnavailable as exc:
                sd_notify(f"STATUS=waiting for the queue database: {exc}")
                if self.abort.wait(backoff.failed(exc)):
                    raise DaemonStopped("stopped while waiting for the queue database") from None
                continue
            backoff.succeeded()
            return db

    def _recover(self, db: StateDb) -> None:
        """Queue again what the last run left in flight; restore the per-cache gauges."""
        try:
            released = db.release_all_inflight(self.clock.time())
            if released:
                log.warning(
                    "%d path(s) were in flight when the last run stopped; queued again", released
                )
            for status in db.cache_statuses(self.config.caches):
                if status.cache not in self.config.caches:
                    continue
                if status.last_success_at is not None:
                    self.metrics.last_success.labels(status.cache).set(status.last_success_at)
                if status.last_failure_at is not None:
                    self.metrics.last_failure.labels(status.cache).set(status.last_failure_at)
        except sqlite3.Error as exc:
            # A full disk: in-flight items come back through the orphan check later.
            log.error("cannot recover the last run's in-flight items yet: %s", exc)

    def _make_workers(self) -> PushWorkers:
        config = self.config
        workers = PushWorkers(
            settings=config.push,
            caches=config.caches,
            backends=self.backends,
            db_factory=lambda: StateDb(config.database_path, durable=False),
            store=self.store,
            metrics=self.metrics,
            clock=self.clock,
            rng=self.rng,
        )
        # Before /metrics is served: a cache down before a restart must not read as up while
        # the initial spool scan runs.
        workers.load_health()
        return workers

    def _serve_metrics(self) -> None:
        if not self.serve_metrics:
            return
        settings = self.config.metrics
        try:
            self.server = MetricsServer(
                self.registry,
                self.health,
                address=settings.listen_address,
                port=settings.port,
                version=__version__,
                tls_cert_file=settings.tls_cert_file,
                tls_key_file=settings.tls_key_file,
                landing=self.landing_page,
            )
        except OSError as exc:
            raise DaemonError(
                f"cannot serve metrics on {settings.listen_address}:{settings.port}: {exc.strerror}"
            ) from None
        self.server.start()
        log.info(
            "metrics on http%s://%s:%d/metrics",
            "s" if settings.tls_cert_file else "",
            settings.listen_address,
            self.server.port,
        )

    def _watch_and_scan(self, ingestor: Ingestor) -> None:
        # Watch first, then scan: a file arriving in between is seen by one or the other.
        self.watcher = SpoolWatcher(
            self.layout.incoming, self.notifications, also=(self.layout.hook,)
        )
        self.watcher.start()
        self.metrics.spool_watch_alive.set(1)
        try:
            stats = ingestor.ingest(ingestor.scan())
        except Exception as exc:
            # E.g. the state filesystem is full: the files stay, the ingest loop retries.
            log.error("initial spool scan failed (%s); the files stay in the spool", exc)
            self.notifications.put(None)
            return
        log.info(
            "initial spool scan: %d event(s) recorded, %d quarantined",
            stats.recorded,
            stats.quarantined,
        )
        try:
            ingestor.check_quarantine()
        except Exception as exc:
            log.error("cannot check quarantine/ for rejected events yet: %s", exc)

    def _start_sources(self, ingestor: Ingestor, intake: Intake) -> None:
        self._spawn("ingest", self._ingest_loop, ingestor)
        if self.config.log_sources:
            db = self._open_db_patiently()
            self.follower = LogFollower(self.config, db, intake, self.clock, store=self.store)
            self._spawn("log-follower", self._follow_loop, self.follower)
        if self.config.hydra_db is not None:
            self._spawn("hydra-db", self._hydra_db_loop, intake)

    def _ingest_loop(self, ingestor: Ingestor) -> None:
        try:
            ingestor.run(self.notifications, self.stopping)
        finally:
            ingestor.db.close()

    def _follow_loop(self, follower: LogFollower) -> None:
        try:
            follower.run(self.stopping)
        finally:
            follower.close()
            follower.db.close()

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read_queue(self) -> tuple[dict[tuple[str, str], int], dict[str, float]]:
        with self._scrape_lock:
            if self._scrape_db is None:
                return {}, {}
            return self._scrape_db.counts(), self._scrape_db.oldest_pending()

    def _hydra_db_loop(self, intake: Intake) -> None:
        from bridge.hydrasource import HydraDbSource

        assert self.hydra_db_metrics is not None
        db = StateDb(self.config.database_path)
        try:
            HydraDbSource(
                self.config, db, intake, self.hydra_db_metrics, self.clock, stop=self.stopping
            ).run()
        finally:
            db.close()

    # -- health and maintenance -----------------------------------------------------------

    def health(self) -> list[str]:
        """Problems that make the daemon unhealthy (empty when healthy)."""
        problems: list[str] = []
        if not self.ready.is_set():
            problems.append("starting: the first spool scan has not finished")
        if self.watcher is None or not self.watcher.alive():
            problems.append(f"spool watch on {self.layout.incoming} is not alive")
        with self._scrape_lock:
            if self._scrape_db is None or not self._scrape_db.ping():
                problems.append(f"queue database {self.config.database_path} does not answer")
        dead = [t.name for t in self._threads if not t.is_alive()]
        if dead and not self.stopping.is_set():
            problems.append(f"thread(s) stopped: {', '.join(dead)}")
        stalled = self.ingest_heartbeat.stalled_for()
        if stalled is not None:
            problems.append(f"ingest loop stalled: no event file processed for {stalled:.0f}s")
        return problems

    def landing_page(self) -> str:
        """The live summary served at /."""
        with self._scrape_lock:
            db = self._scrape_db
            statuses = db.cache_statuses(self.config.caches) if db is not None else []
            dead = db.dead_letters(LANDING_DEAD_LETTERS) if db is not None else []
        follower = self.follower
        readable = (
            follower.readable() if follower is not None else [False] * len(self.config.log_sources)
        )
        source = self.config.source_file
        snapshot = LandingSnapshot(
            statuses=statuses,
            dead=dead,
            quarantine=summarize(self.layout),
            log_sources=[
                (str(s.path), ok) for s, ok in zip(self.config.log_sources, readable, strict=True)
            ],
            problems=self.health(),
            config_file=str(source) if source is not None else None,
        )
        return render_landing(snapshot, __version__, self.clock.time())

    def _check_watch(self) -> None:
        assert self.watcher is not None
        if self.watcher.alive():
            self.metrics.spool_watch_alive.set(1)
            return
        self.metrics.spool_watch_alive.set(0)
        log.error("spool watch on %s lost; trying to restore it", self.layout.incoming)
        self.watcher.stop()
        try:
            self.layout.ensure(self.config.spool.group_writable)
            self.watcher.start()
        except OSError as exc:
            log.error("cannot restore the spool watch: %s", exc)
            return
        self.metrics.spool_watch_alive.set(1)
        self.notifications.put(None)  # rescan now: files may have arrived unseen

    def run_until(self, stop: threading.Event) -> None:
        """Run maintenance until stop is set, then shut down."""
        assert self._db is not None
        interval = watchdog_interval()
        next_watchdog = self.clock.monotonic()
        next_prune = self.clock.monotonic()
        next_orphan_check = self.clock.monotonic() + ORPHAN_CHECK_SECONDS
        try:
            while not stop.wait(TICK_SECONDS if interval is None else min(TICK_SECONDS, interval)):
                try:
                    self._check_watch()
                except Exception:
                    # Never let maintenance end the daemon with a clean exit status.
                    log.exception("checking the spool watch failed")
                now = self.clock.monotonic()
                if now >= next_prune:
                    next_prune = now + PRUNE_INTERVAL_SECONDS
                    self._prune()
                if now >= next_orphan_check:
                    next_orphan_check = now + ORPHAN_CHECK_SECONDS
                    self._release_orphans()
                if interval is not None and now >= next_watchdog and not self.health():
                    sd_notify("WATCHDOG=1")
                    next_watchdog = now + interval
        finally:
            self.shutdown()

    def _release_orphans(self) -> None:
        assert self._db is not None and self.workers is not None
        try:
            released = self.workers.release_orphans(self._db)
        except Exception:
            log.exception("releasing orphaned in-flight items failed")
            return
        if released:
            log.warning(
                "%d in-flight path(s) whose worker failed to record them: queued again", released
            )

    def _prune(self) -> None:
        assert self._db is not None
        before = self.clock.time() - self.config.retention_days * 86400
        try:
            removed = self._db.prune(before)
        except Exception:
            log.exception("pruning old queue rows failed")
            return
        if removed:
            log.info(
                "pruned %d finished item(s) older than %g days", removed, self.config.retention_days
            )

    # -- stop -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop taking work, let running pushes finish within the grace period, release all."""
        if self.stopping.is_set():
            return
        sd_notify("STOPPING=1")
        log.info(
            "stopping: no new pushes; waiting up to %.0fs for running ones",
            self.config.push.shutdown_grace_seconds,
        )
        self.stopping.set()
        if self.workers is not None:
            self.workers.stop_claiming()
        if self.watcher is not None:
            self.watcher.stop()
        self.notifications.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
        if self.ingestor is not None and not any(t.name == "ingest" for t in self._threads):
            self.ingestor.db.close()  # start() failed before the ingest loop took it over
        if self.workers is not None:
            self.workers.stop(self.config.push.shutdown_grace_seconds)
        if self._db is not None:
            left = self._db.release_all_inflight(self.clock.time())
            if left:
                log.warning("%d path(s) left pending for the next start", left)
            self._db.close()
            self._db = None
        if self.server is not None:
            self.server.stop()
        with self._scrape_lock:
            if self._scrape_db is not None:
                self._scrape_db.close()
                self._scrape_db = None
        self._lock.release()
        log.info("stopped")


def require_hydra_db_driver() -> None:
    """Fail with the install hint when [hydra_db] is configured but psycopg is missing."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise DaemonError(
            "[hydra_db] needs the PostgreSQL driver psycopg 3: install "
            "'hydra-cachix-bridge[hydra-db]' (or psycopg[binary]>=3.2)"
        ) from None
